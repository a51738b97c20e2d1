"""CPU time of each per-scan step on one scan of a simulated night (issue 5's speed target).

Run: ``python profiling/bench_scan_steps.py --night NIGHT [--scan N] [--bands JHK]
[--cache DIR] [--steps point] [--profile PATH] [--json PATH]``.

Runs the steps of ``gpu2mass.night._process_scan`` (frames → framedet → register →
transients → Atlas images) and ``_point_sources`` (detect → psfmodel → psfphot → aperphot
→ bandmerge → artifacts) on the CPU and prints, per step, the process CPU time (all
threads: the figure that counts on a shared 2-core machine) and the wall time. ``--cache``
keeps the inputs of the point-source steps (the calibrated frames, registration, Atlas
images) in DIR so that ``--steps point`` re-times only those; ``--profile`` writes a
cProfile of the timed steps (``python -m pstats PATH``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pickle
import time
from dataclasses import replace
from pathlib import Path


class CpuTimer:
    """``with timer("step"):``: adds the step's CPU and wall seconds (night._Timer's API)."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def __call__(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.c0, self.w0 = time.process_time(), time.perf_counter()

            def __exit__(self, *exc):
                timer.cpu[stage] = timer.cpu.get(stage, 0.0) + time.process_time() - self.c0
                timer.wall[stage] = timer.wall.get(stage, 0.0) + time.perf_counter() - self.w0
                return False

        return _Ctx()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--night", type=Path, required=True)
    ap.add_argument("--scan", type=int, help="scan number (default: the first science scan)")
    ap.add_argument("--bands", default="JHK")
    ap.add_argument("--cache", type=Path, help="directory for the point-source steps' inputs")
    ap.add_argument("--steps", choices=("all", "point"), default="all")
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--warmup", action="store_true",
                    help="first run the steps untimed (Numba compilation): on the night's shortest "
                         "scan, or with --steps point on the cached inputs")
    args = ap.parse_args(argv)

    from gpu2mass import backend
    from gpu2mass import night as night_mod
    from gpu2mass.config import RunConfig
    from gpu2mass.darks import run_darks
    from gpu2mass.io.rawnight import open_night

    cfg = RunConfig.defaults()
    night = open_night(args.night, check_data=False)
    info = next(s for s in night.scans if (s.number == args.scan if args.scan else s.type == "sci"))
    # Only the asked bands: the instrument's band list drives the per-band loops.
    night = replace(night, instrument=replace(night.instrument,
                                              bands=tuple(b for b in night.instrument.bands if b in args.bands)))
    cache = args.cache / f"scan{info.number:03d}_{args.bands}.pkl" if args.cache else None
    timer = CpuTimer()
    prof = cProfile.Profile() if args.profile else None
    captured = {}

    def capture(nt, inf, per_band, images, noises, mjd_mid, cfg_, timer_):
        captured.update(per_band=per_band, images=images, noises=noises, mjd_mid=mjd_mid)
        return original(nt, inf, per_band, images, noises, mjd_mid, cfg_, timer_)

    original = night_mod._point_sources
    if args.steps == "all":
        darks = run_darks((night.load_scan(s.number) for s in night.scans if s.type == "dark"),
                          config=cfg.darks)
        dev = backend.resolve_device("cpu")
        outcome = night_mod.ScanOutcome(info.number, info.type)
        night_mod._Timer = lambda seconds, xp, on_step=None: timer
        night_mod._point_sources = capture
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            if args.warmup:  # compile the kernels on the night's shortest scan, untimed
                small = min((s for s in night.scans if s.type in ("sci", "cal")), key=lambda s: s.nframes)
                night_mod._Timer = lambda seconds, xp, on_step=None: CpuTimer()
                night_mod._process_scan(night, small, darks, cfg, dev, Path(tmp) / "warm",
                                        night_mod.ScanOutcome(small.number, small.type))
                night_mod._Timer = lambda seconds, xp, on_step=None: timer
            if prof:
                prof.enable()
            night_mod._process_scan(night, info, darks, cfg, dev, Path(tmp), outcome)
            if prof:
                prof.disable()
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "wb") as f:
                pickle.dump(captured, f, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        with open(cache, "rb") as f:
            captured = pickle.load(f)
        if args.warmup:
            original(night, info, captured["per_band"], captured["images"], captured["noises"],
                     captured["mjd_mid"], cfg, CpuTimer())
        if prof:
            prof.enable()
        original(night, info, captured["per_band"], captured["images"], captured["noises"],
                 captured["mjd_mid"], cfg, timer)
        if prof:
            prof.disable()
    if prof:
        prof.dump_stats(args.profile)
    out = {"night": str(args.night), "scan": info.number, "nframes": info.nframes, "bands": args.bands,
           "cpu_s": timer.cpu, "wall_s": timer.wall}
    print(f"scan {info.number} ({info.nframes} frames, bands {args.bands}): step  cpu_s  wall_s")
    for k in timer.cpu:
        print(f"  {k:12s} {timer.cpu[k]:7.2f} {timer.wall[k]:7.2f}")
    print(f"  {'total':12s} {sum(timer.cpu.values()):7.2f} {sum(timer.wall.values()):7.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # as gpu2mass night runs
        main()
