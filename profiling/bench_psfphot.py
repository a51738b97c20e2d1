"""Benchmark: batched PSF fitting of 6-frame stacks, gpu2mass vs photutils ``PSFPhotometry``.

The same synthetic groups (:func:`gpu2mass.sim.psfgroups.make_psf_groups`: isolated point
sources, 6 dithered and slightly rotated frames of 15 x 15 px, Moffat beta 2.5 with one
alpha for every frame, Gaussian background noise, the 2MASS data region of 2 px around each
source's initial position, initial positions 0.2 px rms off the truth, fluxes 30 % off) are
fitted by

- gpu2mass: :func:`gpu2mass.kernels.psffit.fit_psf_groups`, all 6 frames at once, frame
  offsets held fixed (the CPU path; the CUDA path too when CuPy and a GPU are usable);
- photutils 3.0 ``PSFPhotometry`` frame by frame, then the six fluxes averaged with
  inverse-variance weights (their errors).

Fairness: photutils gets the SAME PSF, an ``ImagePSF`` made of the pixel-integrated Moffat
(the model the data were rendered with) sampled every 1/8 px, so it does not suffer from
point-sampling a 2"-pixel PSF (its ``MoffatPSF`` is point-sampled and would be biased); the
same pixels (everything outside the data region masked, ``fit_shape`` 5 x 5 covering it);
the same per-pixel errors; the same initial fluxes and positions (mapped into each frame);
no grouping (sources are isolated). Each frame's stamps are tiled into one image so that
photutils fits all sources of a frame in one call (its intended use). Times exclude input
preparation; gpu2mass is timed after a warm-up call (Numba compiles once per process).

Printed: flux bias (median of fit/true - 1) and scatter (std of it), flux pull spread (std
of (fit - true) / error) and position error (gpu2mass only: photutils positions are per
frame), sources fitted per second and the speed ratio.

Usage::

    python profiling/bench_psfphot.py --n 300
    python profiling/bench_psfphot.py --n 2000 --json profiling/results/x.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
from gpu2mass.kernels.psffit import fit_psf_groups

from gpu2mass.sim.psfgroups import make_psf_groups

ALPHA = 1.15  # px: FWHM 1.3 px = 2.6" at beta 2.5
BETA = 2.5
OVERSAMPLE = 8


def _image_psf():
    from gpu2mass.kernels.reference.psf import moffat_pixel_integral
    from photutils.psf import ImagePSF

    half = 7
    n = 2 * half * OVERSAMPLE + 1
    off = (np.arange(n) - (n - 1) / 2) / OVERSAMPLE
    cx, cy = np.meshgrid(off, off)
    grid = moffat_pixel_integral(cx, cy, ALPHA, BETA)
    # ImagePSF's data: the pixel value of a unit source as a function of its offset from
    # the pixel centre, sampled OVERSAMPLE times per pixel (it sums to OVERSAMPLE^2, which
    # is ImagePSF's unit-flux normalization for oversampled data).
    return ImagePSF(grid, oversampling=OVERSAMPLE)


def _summary(fit, err, true):
    rel = fit / true - 1.0
    pull = (fit - true) / err
    ok = np.isfinite(rel) & np.isfinite(pull)
    return {"n": int(ok.sum()), "flux_bias": float(np.median(rel[ok])),
            "flux_scatter": float(np.std(rel[ok])), "pull_std": float(np.std(pull[ok])),
            "pull_mean": float(np.mean(pull[ok]))}


def run_photutils(inputs):
    from astropy.table import Table
    from photutils.psf import PSFPhotometry

    stamps, weights = inputs["stamps"], inputs["weights"]
    g_count, nf, s, _ = stamps.shape
    cols = int(np.ceil(np.sqrt(g_count)))
    rows = -(-g_count // cols)
    psf = _image_psf()
    phot = PSFPhotometry(psf, (5, 5), aperture_radius=3)
    flux = np.zeros((g_count, nf))
    ferr = np.zeros((g_count, nf))
    gi = np.arange(g_count)
    oy, ox = (gi // cols) * s, (gi % cols) * s
    init = inputs["init"][:, 0]
    maps = inputs["frame_maps"]
    t0 = time.perf_counter()
    for f in range(nf):
        img = np.zeros((rows * s, cols * s), np.float64)
        err = np.ones_like(img)
        mask = np.ones_like(img, bool)
        for g in range(g_count):
            w = weights[g, f].astype(np.float64)
            sl = (slice(oy[g], oy[g] + s), slice(ox[g], ox[g] + s))
            img[sl] = np.where(w > 0, stamps[g, f], 0.0)
            err[sl] = np.where(w > 0, 1.0 / np.sqrt(np.where(w > 0, w, 1.0)), 1.0)
            mask[sl] = ~(w > 0)
        m = maps[:, f]
        x = m[:, 0, 0] + m[:, 0, 1] * init[:, 1] + m[:, 0, 2] * init[:, 2] + ox
        y = m[:, 1, 0] + m[:, 1, 1] * init[:, 1] + m[:, 1, 2] * init[:, 2] + oy
        table = Table({"x_init": x, "y_init": y,
                       "flux_init": init[:, 0] * inputs["flux_scale"][:, f]})
        res = phot(img, mask=mask, error=err, init_params=table)
        flux[:, f] = np.asarray(res["flux_fit"]) / inputs["flux_scale"][:, f]
        ferr[:, f] = np.asarray(res["flux_err"]) / inputs["flux_scale"][:, f]
    elapsed = time.perf_counter() - t0
    iv = 1.0 / ferr**2
    return (iv * flux).sum(1) / iv.sum(1), 1.0 / np.sqrt(iv.sum(1)), elapsed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="number of sources (groups of one)")
    ap.add_argument("--snr", type=float, nargs=2, default=(20.0, 500.0),
                    help="range of the sources' SNR (log-uniform)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    inputs, truth = make_psf_groups(rng, args.n, nsrc=1, snr=tuple(args.snr),
                                    alpha=(ALPHA, ALPHA), beta=BETA)
    true = truth["params"][:, 0]
    out = {"n_sources": args.n, "n_frames": 6, "snr": list(args.snr),
           "machine": platform.platform(), "processor": platform.processor()}

    fit_psf_groups(**{k: v[:2] for k, v in inputs.items()})  # compile
    t0 = time.perf_counter()
    res = fit_psf_groups(**inputs)
    t_ours = time.perf_counter() - t0
    ours = _summary(res.params[:, 0, 0], res.errors[:, 0, 0], true[:, 0])
    ours["pos_pull_std"] = [float(v) for v in np.std(
        (res.params[:, 0, 1:] - true[:, 1:]) / res.errors[:, 0, 1:], axis=0)]
    ours["flagged"] = int(np.sum(res.status[:, 0] != 0))
    ours["seconds"] = t_ours
    ours["sources_per_s"] = args.n / t_ours
    out["gpu2mass_cpu"] = ours

    try:
        import cupy as cp

        from gpu2mass.backend import gpu_status

        usable = gpu_status()[0]
    except ImportError:
        usable = False
    if usable:
        d_in = {k: cp.asarray(v) for k, v in inputs.items()}
        fit_psf_groups(**{k: v[:2] for k, v in d_in.items()})
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        gres = fit_psf_groups(**d_in)
        cp.cuda.Device().synchronize()
        t_gpu = time.perf_counter() - t0
        gsum = _summary(cp.asnumpy(gres.params[:, 0, 0]), cp.asnumpy(gres.errors[:, 0, 0]),
                        true[:, 0])
        gsum["seconds"] = t_gpu
        gsum["sources_per_s"] = args.n / t_gpu
        out["gpu2mass_cuda"] = gsum

    flux, ferr, t_pu = run_photutils(inputs)
    theirs = _summary(flux, ferr, true[:, 0])
    theirs["seconds"] = t_pu
    theirs["sources_per_s"] = args.n / t_pu
    out["photutils"] = theirs
    out["speed_ratio_cpu"] = theirs["seconds"] and t_pu / t_ours

    print(f"{args.n} isolated sources, 6 frames each, SNR {args.snr[0]:g}-{args.snr[1]:g}")
    print(f"{'':14s} {'bias':>9s} {'scatter':>9s} {'pull std':>9s} {'src/s':>10s}")
    for name in ("gpu2mass_cpu", "gpu2mass_cuda", "photutils"):
        if name in out:
            r = out[name]
            print(f"{name:14s} {r['flux_bias']:9.2e} {r['flux_scatter']:9.2e} "
                  f"{r['pull_std']:9.3f} {r['sources_per_s']:10.1f}")
    print(f"gpu2mass position pull std (u, v): {ours['pos_pull_std'][0]:.3f} "
          f"{ours['pos_pull_std'][1]:.3f}; flagged fits: {ours['flagged']}")
    print(f"speed ratio gpu2mass CPU / photutils: {out['speed_ratio_cpu']:.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
