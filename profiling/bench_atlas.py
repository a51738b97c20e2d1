"""The first half of scan processing, end to end, on a simulated night (issue 3):
darks → frame calibration → single-frame detection → registration → transients → Atlas
Images, per step on the chosen device, with the resampling peer (``reproject``) on the
same frames from ``bench_atlas_resample.py``.

Run: ``python profiling/bench_atlas.py --night NIGHT [--device cpu] [--json PATH]``
(``NIGHT`` e.g. from ``gpu2mass simulate NIGHT --preset scan``). Prints the per-step
seconds of every scan (the science scan of the ``scan`` preset is the full 6° scan; target
≤ 30 s on 2 cores), then our resampling vs ``reproject_and_coadd`` of one band with the
ratio (target ≥ 5×).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

#: Steps of the first half of scan processing (darks are per night, reported apart).
FIRST_HALF = ("read", "upload", "frames", "framedet", "register", "transients", "starfill", "atlas")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--night", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--band", default="K", help="band for the reproject comparison")
    ap.add_argument("--skip-reproject", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from gpu2mass.night import run_night

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_night(args.night, Path(tmp) / "out", device=args.device)
        total = time.perf_counter() - t0
        run = json.loads((Path(tmp) / "out" / "run.json").read_text())
    out = {"device": result.device, "night_seconds": total, "darks_seconds": run["seconds"]["darks"],
           "scans": {}}
    print(f"device {result.device}: night in {total:.1f} s (darks {run['seconds']['darks']:.1f} s)")
    for s in run["scans"]:
        # The first half of scan processing (this chain) and what follows it.
        chain = sum(v for k, v in s["seconds"].items() if k in FIRST_HALF)
        rest = sum(v for k, v in s["seconds"].items() if k not in FIRST_HALF)
        out["scans"][s["scan"]] = {"type": s["type"], "status": s["status"], "seconds": s["seconds"],
                                   "chain_seconds": chain, "point_source_seconds": rest}
        steps = "  ".join(f"{k} {v:5.1f}" for k, v in s["seconds"].items())
        print(f"scan {s['scan']:3d} {s['type']:4s} {s['status']:6s} chain {chain:6.1f} s "
              f"(+ point sources {rest:5.1f} s)   {steps}")
    if not args.skip_reproject:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_atlas_resample

        sci = max((s for s in run["scans"] if s["type"] == "sci"), key=lambda s: s["scan"], default=None)
        if sci is not None:
            out["resampling"] = bench_atlas_resample.main(
                ["--night", str(args.night), "--band", args.band])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
