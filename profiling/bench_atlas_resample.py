"""Benchmark: Atlas resampling of a scan's frames, gpu2mass vs reproject.

Times :func:`gpu2mass.atlas.run_atlas` (per-frame cubic fit, the Numba resampling kernel,
background matching, coadd, noise) over every Atlas grid of one band of a scan, against
``reproject.reproject_and_coadd`` with ``reproject_interp`` (bilinear, order 1, no background
matching) on the same frames and grids, each frame given an astropy TAN WCS of its centre,
scale and rotation. Prints both times and the ratio, and compares the two outputs on the
middle grid.

Input: ``--night DIR`` (a simulated night, e.g. ``gpu2mass simulate /tmp/x --preset scan``,
273 frames per band) or, by default, a synthetic scan of ``--frames`` noise frames with the
2MASS step (82.8") through a distorted 2MASS-like band geometry.

Usage::

    python profiling/bench_atlas_resample.py --frames 60 --threads 2
    python profiling/bench_atlas_resample.py --night /tmp/x --band K --frames 273
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from gpu2mass.atlas import AtlasConfig, plan_atlas_grids, run_atlas
from gpu2mass.geometry import BandGeometry, FrameGeometry, tan_deproject


def synthetic_scan(n: int, seed: int = 1):
    """n noise frames (256x256, DN, on a flat 100 DN level) stepping 82.8" in Dec."""
    rng = np.random.default_rng(seed)
    r = 128.0
    k, q1, q2 = 0.0029 * r, 0.08, 0.14
    band = BandGeometry(256, 256, 1.9839, 0.335,
                        np.array([[q1, 0, -q1, k, 0, k, 0], [0, 2 * q2, 0, 0, k, 0, k]]))
    eta = (np.arange(n) - n / 2) * 82.8 + rng.normal(0, 0.3, n)
    xi = rng.normal(0, 0.3, n)
    ra, dec = tan_deproject(xi, eta, 150.0, 20.0)
    geo = FrameGeometry(band, np.asarray(ra), np.asarray(dec))
    # A flat 100 DN background makes the total-flux comparison meaningful.
    frames = (100.0 + rng.normal(0.0, 15.0, (n, 256, 256))).astype(np.float32)
    return frames, np.zeros((256, 256), bool), geo, np.full(n, 15.0)


def night_scan(night: Path, band: str, n: int | None):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _frames import simple_scan

    s = simple_scan(night, band)
    m = s.geometry.nframes if n is None else min(n, s.geometry.nframes)
    geo = FrameGeometry(s.geometry.band, s.geometry.ra[:m], s.geometry.dec[:m])
    return s.data[:m], s.bad, geo, s.noise[:m]


def frame_wcs(geo: FrameGeometry, k: int):
    """TAN WCS of frame k: its centre, scale and rotation (distortion left out)."""
    from astropy.wcs import WCS

    b = geo.band
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [(b.nx + 1) / 2, (b.ny + 1) / 2]
    w.wcs.crval = [geo.ra[k], geo.dec[k]]
    th, s = np.deg2rad(b.rotation_deg), b.scale_arcsec / 3600
    w.wcs.cd = [[-s * np.cos(th), s * np.sin(th)], [s * np.sin(th), s * np.cos(th)]]
    return w


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--night", type=Path, help="simulated night directory (default: synthetic)")
    ap.add_argument("--band", default="K")
    ap.add_argument("--frames", type=int, default=60, help="number of frames of the scan")
    ap.add_argument("--threads", type=int, help="Numba threads (default: all)")
    ap.add_argument("--skip-reproject", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    if args.night:
        frames, mask, geo, noise = night_scan(args.night, args.band, args.frames)
    else:
        frames, mask, geo, noise = synthetic_scan(args.frames)
    grids = plan_atlas_grids([geo])
    cfg = AtlasConfig()
    # Compile outside the timing (a few seconds, once per process).
    run_atlas(frames, mask=mask, geometry=geo, noise=noise, grid=grids[0], config=cfg)

    t0 = time.perf_counter()
    ours = [run_atlas(frames, mask=mask, geometry=geo, noise=noise, grid=g, config=cfg)
            for g in grids]
    t_ours = time.perf_counter() - t0
    result = {
        "machine": platform.node(), "date": time.strftime("%Y-%m-%d"),
        "input": str(args.night) if args.night else "synthetic", "band": args.band,
        "frames": int(geo.nframes), "grids": len(grids), "numba_threads": numba.get_num_threads(),
        "gpu2mass_s": t_ours, "gpu2mass_frames_per_s": geo.nframes / t_ours,
    }
    print(f"{geo.nframes} frames onto {len(grids)} Atlas grids, {numba.get_num_threads()} threads")
    print(f"gpu2mass run_atlas (resample + match + coadd): {t_ours:8.2f} s")
    if not args.skip_reproject:
        from reproject import reproject_interp
        from reproject.mosaicking import reproject_and_coadd

        t0 = time.perf_counter()
        theirs = []
        for g, im in zip(grids, ours, strict=True):
            inputs = [(frames[k], frame_wcs(geo, int(k))) for k in im.frames]
            arr, _ = reproject_and_coadd(inputs, g.wcs, shape_out=g.shape,
                                         reproject_function=reproject_interp,
                                         combine_function="mean")
            theirs.append(arr)
        t_rep = time.perf_counter() - t0
        result.update(reproject_s=t_rep, speedup=t_rep / t_ours)
        print(f"reproject_and_coadd (reproject_interp):         {t_rep:8.2f} s")
        print(f"speed-up: {t_rep / t_ours:.1f}x")
        # Output check on the middle grid, where both cover: reproject keeps surface
        # brightness per input pixel, ours per 1" pixel (x area ratio). On the synthetic
        # scan (flat 100 DN) the ratio of means is the flux scale; on a night, whose frames
        # are sky-subtracted and which ours background-matches, the pixel correlation is
        # the meaningful figure (the TAN WCS given to reproject also omits distortion).
        k = len(grids) // 2
        area = (grids[k].pixel_deg * 3600 / geo.band.scale_arcsec) ** 2
        a, b = ours[k].data, theirs[k] * area
        both = np.isfinite(a) & np.isfinite(b)
        ratio = float(np.mean(a[both]) / np.mean(b[both]))
        corr = float(np.corrcoef(a[both], b[both])[0, 1])
        result.update(mean_ratio=ratio, pixel_correlation=corr)
        print(f"grid {k}: mean level ours / reproject {ratio:.4f}, pixel correlation {corr:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
