"""Simulator speed: the ``tiny`` and ``scan`` presets end to end, and the PSF stamp
renderer against a peer (astropy ``Moffat2D`` integrated by ``discretize_model``, which is
what photutils' PSF simulation utilities build on) on the same stamps.

Run: ``.venv/bin/python profiling/bench_simulate.py [--presets tiny,scan] [--json PATH]``.
Targets (issue 2): ``scan`` ≤ 60 s and ``tiny`` ≤ 20 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_presets(presets: list[str]) -> dict:
    from gpu2mass.sim import SimulationRequest, simulate_night

    out = {}
    for name in presets:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            s = simulate_night(Path(tmp) / "night", SimulationRequest(preset=name, seed=1))
            dt = time.perf_counter() - t0
        out[name] = {"seconds": dt, "frames": s.frames, "scans": s.scans, "sources": s.sources,
                     "seconds_per_scan": {str(k): v for k, v in s.seconds_per_scan.items()}}
        print(f"preset {name:5s}: {dt:7.1f} s for {s.frames} frames ({s.scans}), "
              f"{1e3 * dt / s.frames:.1f} ms/frame")
    return out


def bench_psf_renderer(n: int = 2000, half: int = 10) -> dict:
    """Our pixel-integrated Moffat stamps vs astropy discretize_model(mode='integrate'-like
    oversampling) on the same ``n`` stamps; both checked against each other."""
    from astropy.convolution import discretize_model
    from astropy.modeling.models import Moffat2D
    from gpu2mass.kernels import render_psf_stamps

    rng = np.random.default_rng(3)
    fx, fy = rng.uniform(-0.5, 0.5, (2, n))
    alpha = rng.uniform(0.8, 1.4, n)
    beta = np.full(n, 2.5)
    flux = np.full(n, 1000.0)
    render_psf_stamps(fx[:2], fy[:2], flux[:2], alpha[:2], beta[:2], half_size=half)  # compile
    t0 = time.perf_counter()
    ours = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=half)
    t_ours = time.perf_counter() - t0
    m = min(n, 200)  # the peer is slow: time a subset and scale
    peer = np.empty((m, 2 * half + 1, 2 * half + 1))
    t0 = time.perf_counter()
    for k in range(m):
        amp = flux[k] * (beta[k] - 1) / (np.pi * alpha[k] ** 2)
        model = Moffat2D(amp, fx[k], fy[k], alpha[k], beta[k])
        # Ranges are pixel centres, upper bound exclusive: centres -h … h.
        peer[k] = discretize_model(model, (-half, half + 1), (-half, half + 1),
                                   mode="oversample", factor=10)
    t_peer = (time.perf_counter() - t0) * n / m
    diff = np.abs(ours[:m] - peer).max() / flux[0]
    print(f"PSF stamps (half {half}): ours {1e3 * t_ours:.1f} ms per {n}, astropy discretize_model "
          f"{1e3 * t_peer:.1f} ms per {n}: ratio {t_peer / t_ours:.1f}x; max |diff| {diff:.1e} of flux")
    return {"n": n, "half_size": half, "ours_s": t_ours, "peer_s": t_peer, "ratio": t_peer / t_ours,
            "max_abs_diff_rel_flux": float(diff), "peer": "astropy.convolution.discretize_model(Moffat2D, oversample 10)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", default="tiny,scan")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    res = {"machine": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "psf_renderer": bench_psf_renderer(),
           "presets": bench_presets([p for p in args.presets.split(",") if p])}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
