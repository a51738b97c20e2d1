"""``gpu2mass night`` end to end on a simulated night, per step (issue 5's speed target).

Run: ``python profiling/bench_night.py --night NIGHT [--device cpu|gpu] [--json PATH] [--out DIR]``
(``NIGHT`` from ``gpu2mass simulate NIGHT --preset scan``: one full 6° science scan of 273
frames, six 1° calibration scans, darks). Prints, for every scan, the seconds of each step;
for the full science scans, their total against the target (≤ 60 s per full scan on 2 CPU
cores) and against the scan's own observing time (273 frames × 1.3 s: a ratio below 1 keeps
up with the telescope); the night-level steps (calibration, PosPts, catalog, Atlas zero
points, QA); the full science scans' share, by frames, of everything in the run that is not
a scan's own step (darks, the night-level steps, the database load); peak host memory and, on a GPU,
peak device memory.

There is no end-to-end peer for a 2MASS night (the original 2MAPPS ran on 1990s Suns);
the peers of the individual steps are in ``bench_atlas_resample.py`` (reproject),
``bench_detect.py`` (SEP), ``bench_psfphot.py`` and ``bench_aperphot.py`` (photutils).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

#: Frames of a full 6° survey scan, and the frame period (s).
FULL_SCAN_FRAMES = 273
FRAME_PERIOD_S = 1.3
TARGET_S = 60.0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--night", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path, help="keep the products here (default: a temporary directory)")
    args = ap.parse_args(argv)

    from gpu2mass.io.rawnight import open_night
    from gpu2mass.night import run_night

    night = open_night(args.night, check_data=False)
    nframes = {s.number: s.nframes for s in night.scans}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or Path(tmp) / "out"
        t0 = time.perf_counter()
        result = run_night(args.night, out_dir, device=args.device)
        total = time.perf_counter() - t0
        run = json.loads((out_dir / "run.json").read_text())
    night_steps = run["seconds"]["night"]
    frames_all = sum(nframes[s["scan"]] for s in run["scans"] if s["status"] == "ok")
    out = {"device": result.device, "night": str(args.night), "night_seconds": total,
           "darks_seconds": run["seconds"]["darks"], "night_step_seconds": night_steps,
           "peak_host_memory_mb": run["peak_host_memory_mb"],
           "peak_device_memory_mb": run["peak_device_memory_mb"], "scans": {}}
    print(f"device {result.device}: night in {total:.1f} s (darks {run['seconds']['darks']:.1f} s, "
          f"peak host memory {run['peak_host_memory_mb']:.0f} MB"
          + (f", peak device memory {run['peak_device_memory_mb']:.0f} MB"
             if run["peak_device_memory_mb"] else "") + ")")
    # Everything of the run that is not a scan's own step (darks, opening the night, the
    # night-level steps, the database load, writing run.json) is shared among the scans by
    # their frames: the night-level steps work on every scan's sources.
    scan_seconds = sum(sum(s["seconds"].values()) for s in run["scans"] if s["status"] == "ok")
    shared = max(total - scan_seconds, 0.0)
    out["shared_seconds"] = shared
    for s in run["scans"]:
        scan_total = sum(s["seconds"].values())
        share = shared * nframes[s["scan"]] / max(frames_all, 1)
        entry = {"type": s["type"], "status": s["status"], "frames": nframes[s["scan"]],
                 "seconds": s["seconds"], "scan_seconds": scan_total,
                 "night_share_seconds": share}
        line = (f"scan {s['scan']:3d} {s['type']:4s} {s['status']:6s} {nframes[s['scan']]:4d} frames "
                f"{scan_total:6.1f} s + night share {share:4.1f} s   "
                + "  ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
        print(line)
        if nframes[s["scan"]] >= FULL_SCAN_FRAMES and s["status"] == "ok":
            full = scan_total + share
            observing = nframes[s["scan"]] * FRAME_PERIOD_S
            entry.update(full_scan_seconds=full, ratio_to_target=full / TARGET_S,
                         ratio_to_observing_time=full / observing)
            print(f"    full scan: {full:.1f} s = {full / TARGET_S:.2f} × the {TARGET_S:.0f} s target, "
                  f"{full / observing:.2f} × its {observing:.0f} s of observing time")
        out["scans"][s["scan"]] = entry
    print("night-level steps: " + "  ".join(f"{k} {v:.1f}" for k, v in night_steps.items())
          + f"; everything outside the scans' steps (shared by frames): {shared:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
