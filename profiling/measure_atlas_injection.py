"""Atlas flux conservation measured on injected stars (issue 3).

The truth stars of a simulated scan that are isolated, unsaturated and bright enough for a
1 % measurement number 20–90 per band and scan (``measure_atlas_flux.py``), too few to
tell a scatter 10 % above the noise from the noise. This script adds ~200 stars per band
to one scan's calibrated frames and measures them, with the real sky, noise, bad pixels,
airglow and seeing of the scan:

1. The scan's front steps as the pipeline runs them (``night.calibrate_and_register``).
2. Stars on a lattice of every Atlas grid (95" apart, jittered; none within 45" of a truth
   source brighter than 15.5 mag), magnitudes uniform over 0.6–2.5 mag below the R2−R1
   saturation limit, drawn as the simulator draws stars (:func:`gpu2mass.sim.inject.inject_stars`:
   a pixel-integrated Moffat, β = 2.5, with each frame's truth seeing and zero point,
   through the truth frame geometry, with photon noise; the gain from the manifest).
3. The coadd as the pipeline makes it (``night.coadd_frames`` and ``atlas.run_atlas``) of
   the frames with the stars and of the frames without them (single-frame detection and
   transients are run again on the frames with the stars, so their bad pixels are filled).
4. Per star: the background-subtracted flux in a 14" radius (sky: median of the 20–40"
   annulus) against the truth flux in 14" (the star's, plus the light in 14" of the
   fainter truth sources near it), as ``measure_atlas_flux.py`` does, with its
   noise model (``NCORFAC``-corrected ``SIGMA`` over the aperture, the star's photon noise
   over the N frames that hold it, the annulus median's noise). And the same flux on the
   difference of the two coadds, which cancels the sky and its noise: what is left is the
   star's photon noise and what the processing does to the star (resampling, background
   mesh, fill, background matching, outlier rejection).

Prints per band the median ratio, the robust scatter in units of each star's noise with
its 16–84 % bootstrap range, the standard deviation of the same, and the processing
error's robust scatter (difference images, % of the flux, photon noise taken out in
quadrature); ``--json`` writes them.

Run: ``python profiling/measure_atlas_injection.py NIGHT [--scan N] [--bands J H K]
[--json PATH]`` (``NIGHT`` from ``gpu2mass simulate``; the scan defaults to the longest
science scan).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from gpu2mass.atlas import plan_atlas_grids, run_atlas
from gpu2mass.config import load_config
from gpu2mass.darks import run_darks
from gpu2mass.framedet import run_frame_detection
from gpu2mass.geometry import frame_geometry_from_truth
from gpu2mass.io.products import read_columns
from gpu2mass.io.rawnight import open_night
from gpu2mass.night import calibrate_and_register, coadd_frames
from gpu2mass.sim.galaxy import moffat_alpha_from_fwhm, moffat_enclosed_fraction
from gpu2mass.sim.inject import inject_stars, stamp_frames
from gpu2mass.sim.psf import optical_fwhm
from gpu2mass.transients import run_transients

sys.path.insert(0, str(Path(__file__).parent))
from measure_atlas_flux import _on_artifact as on_artifact

MAG = {"J": "j_m", "H": "h_m", "K": "k_m"}
SATURATED = {"J": 9.0, "H": 8.5, "K": 8.0}  # docs/simulator.md: R2−R1 saturation
APERTURE, ANNULUS = 14.0, (20.0, 40.0)
BETA = 2.5
#: Lattice step, distance kept from the image edges and from bright truth sources (")
SPACING, EDGE, CLEAR, CLEAR_MAG = 95.0, 60.0, 45.0, 15.5
#: Half-size of the injected stamps (frame pixels): < 0.02 % of the flux beyond.
HALF = 24


def _robust(v):
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def inject_positions(grids, src, rng, spacing=SPACING):
    """(grid index, ra, dec) of the injected stars: a jittered lattice on every grid,
    clear of truth sources brighter than ``CLEAR_MAG`` (any band) within ``CLEAR``"."""
    mags = np.vstack([np.asarray(src[c], float) for c in MAG.values()])
    bright = np.any(np.nan_to_num(mags, nan=99.0) < CLEAR_MAG, axis=0)
    out = []
    for k, grid in enumerate(grids):
        bx, by = grid.sky_to_pixel(src["ra"][bright], src["dec"][bright])
        for yc in np.arange(EDGE, grid.ny - EDGE, spacing):
            for xc in np.arange(EDGE, grid.nx - EDGE, spacing):
                x, y = xc + rng.uniform(-15, 15), yc + rng.uniform(-15, 15)
                if np.any(np.hypot(bx - x, by - y) < CLEAR):
                    continue
                ra, dec = grid.pixel_to_sky(np.array([x]), np.array([y]))
                out.append((k, float(ra[0]), float(dec[0])))
    return out


def aperture_flux(data, x, y):
    """14" aperture sum less the 20–40" annulus median (DN), the aperture and annulus
    masks and the 83 × 83 cut-out's origin; None when the aperture has a NaN or the
    annulus is less than 80 % usable."""
    r0, c0 = int(y) - 41, int(x) - 41
    sub = data[r0:r0 + 83, c0:c0 + 83].astype(float)
    yy, xx = np.mgrid[0:83, 0:83]
    r = np.hypot(xx + c0 - x, yy + r0 - y)
    ap, ann = r < APERTURE, (r > ANNULUS[0]) & (r < ANNULUS[1])
    ann_ok = ann & np.isfinite(sub)
    if not np.all(np.isfinite(sub[ap])) or ann_ok.sum() < 0.8 * ann.sum():
        return None
    return float(np.sum(sub[ap]) - ap.sum() * np.median(sub[ann_ok])), ap, ann_ok, (r0, c0)


def measure_band(night, night_dir: Path, info, band, darks, cfg, rng, spacing=SPACING) -> dict:
    inst = night.instrument
    gain = inst.gain_e_per_dn[band]
    scan = night.load_scan(info.number)
    cal, reg, tr, det, _ = calibrate_and_register(night, info, scan, band, darks, cfg, np)
    geo = reg.geometry
    n, ny, nx = cal.r2r1.shape
    scale = geo.band.scale_arcsec
    truth_geo = frame_geometry_from_truth(night_dir, info.number, band)
    tf = read_columns(night_dir / "truth" / "frames.parquet")
    sel = (tf["scan"] == info.number) & (tf["band"].astype(str) == band)
    order = np.argsort(tf["frame"][sel])
    zp, fwhm = tf["zp_mag"][sel][order], tf["fwhm_arcsec"][sel][order]
    src = read_columns(night_dir / "truth" / "sources.parquet")

    art = read_columns(night_dir / "truth" / "artifacts.parquet")
    asel = (art["scan"] == info.number) & (art["band"].astype(str) == band)
    art = {k: np.asarray(v)[asel] for k, v in art.items()}
    art["parent_id"] = np.array([-1 if p is None else p for p in art["parent_id"]], np.int64)

    grids = plan_atlas_grids({band: geo}, config=cfg.atlas)
    where, stars = [], []
    for k, ra, dec in inject_positions(grids, src, rng, spacing):
        frames, fx, fy = stamp_frames(truth_geo, ra, dec, HALF)
        # Clear of the scan's truth artifacts (electronic stripes and spikes of saturated
        # stars, persistence ghosts, meteors) in every frame, as measure_atlas_flux.py's
        # truth stars are: a stripe had taken up to 60 % of an injected star's 14" flux.
        cover = np.zeros(n, bool)
        cover[frames] = True
        fx_all, fy_all = np.full(n, -1e4), np.full(n, -1e4)
        fx_all[frames], fy_all[frames] = fx, fy
        if on_artifact(art, -2, fx_all, fy_all, cover, ANNULUS[1] / scale + 2.0):
            continue
        where.append((k, ra, dec))
        stars.append((frames, fx, fy))
    lo = SATURATED[band] + 0.6
    mags = rng.uniform(lo, lo + 1.9, len(where))
    stars = [(m, *s) for m, s in zip(mags, stars, strict=True)]
    add = inject_stars(cal.r2r1.shape, truth_geo, [w[1] for w in where], [w[2] for w in where], mags,
                       zp_mag=zp, fwhm_arcsec=fwhm, beta=BETA, gain=gain, rng=rng, half_size=HALF)

    def coadd(c, d, t):
        frames, mask, noise = coadd_frames(c, t, d, geo, cfg, np)
        return [run_atlas(frames, mask=mask, geometry=geo, noise=noise, grid=g, config=cfg.atlas) for g in grids]

    plain = coadd(cal, det, tr)
    cal_in = replace(cal, r2r1=cal.r2r1 + add)
    det_in = run_frame_detection(cal_in.r2r1, mask=cal.mask_r2r1, noise=cal.noise_r2r1, config=cfg.framedet)
    tr_in = run_transients(det_in, geometry=geo, band=band, nframes=n, frames=cal_in.r2r1,
                           frame_mask=cal.mask_r2r1, noise=cal.noise_r2r1,
                           seeing_fwhm=det_in.meta["seeing_fwhm"], config=cfg.transients)
    injected = coadd(cal_in, det_in, tr_in)

    m_band = np.asarray(src[MAG[band]], float)
    has = np.isfinite(m_band)
    m_band = m_band[has]
    src_xy = [g.sky_to_pixel(src["ra"][has], src["dec"][has]) for g in grids]
    yy, xx = np.mgrid[0:83, 0:83]  # the cut-outs of aperture_flux
    rows = []
    for (k, ra, dec), (mag, frames, fx, fy) in zip(where, stars, strict=True):
        x, y = (float(v[0]) for v in grids[k].sky_to_pixel(np.array([ra]), np.array([dec])))
        img, img0 = injected[k], plain[k]
        got = aperture_flux(img.data, x, y)
        got0 = aperture_flux(img0.data, x, y)
        diff = aperture_flux(img.data - img0.data, x, y)
        if got is None or got0 is None or diff is None:
            continue
        flux, ap, ann_ok, (r0, c0) = got
        held = (fx > -0.5) & (fx < nx - 0.5) & (fy > -0.5) & (fy < ny - 0.5)
        f_held = frames[held]
        total = 10.0 ** (-0.4 * (mag - zp[f_held].mean()))
        alpha = moffat_alpha_from_fwhm(float(optical_fwhm(fwhm[f_held].mean(), scale=scale, beta=BETA)), BETA)
        truth = truth_star = total * moffat_enclosed_fraction(APERTURE, alpha, BETA)
        # The fainter truth sources' light in the aperture (all are fainter than CLEAR_MAG).
        sx, sy = src_xy[k]
        for j in np.flatnonzero((np.abs(sx - x) < APERTURE + 9) & (np.abs(sy - y) < APERTURE + 9)):
            rr2 = (xx + c0 - sx[j]) ** 2 + (yy + r0 - sy[j]) ** 2
            dens = (BETA - 1) / (np.pi * alpha**2) * (1 + rr2 / alpha**2) ** -BETA
            truth += 10.0 ** (-0.4 * (m_band[j] - zp[f_held].mean())) * float(dens[ap].sum())
        sig = img.sigma[r0:r0 + 83, c0:c0 + 83].astype(float)
        kc = img.header["NCORFAC"]
        var_bg = kc**2 * np.sum(sig[ap] ** 2)
        var_ann = np.pi / 2 * kc**2 * np.mean(sig[ann_ok] ** 2) / ann_ok.sum() * ap.sum() ** 2
        var_star = total / (gain * f_held.size)
        rows.append({"m": float(mag), "image": k, "x": x, "y": y, "nframes": int(f_held.size),
                     "truth": truth, "truth_star": truth_star, "flux": flux, "flux_difference": diff[0], "flux_plain": got0[0],
                     "noise_background": float(np.sqrt(var_bg + var_ann)),
                     "noise": float(np.sqrt(var_bg + var_ann + var_star)),
                     "photon_noise": float(np.sqrt(var_star))})
    ratio = np.array([r["flux"] / r["truth"] for r in rows])
    z = np.array([(r["flux"] - r["truth"]) / r["noise"] for r in rows])
    zc = z - np.median(z)
    boot = rng.integers(0, z.size, (2000, z.size))
    spread = np.array([_robust(z[b]) for b in boot])
    # The difference of the coadds holds the injected star alone.
    proc = np.array([(r["flux_difference"] - r["truth_star"]) / r["truth_star"] for r in rows])
    phot = np.median([r["photon_noise"] / r["truth_star"] for r in rows])
    proc_spread = _robust(proc)
    # The same aperture on the coadd without the stars: the background's own part.
    blank = np.array([r["flux_plain"] / r["noise_background"] for r in rows])
    out = {"scan": info.number, "n": len(rows), "median_ratio": float(np.median(ratio)),
           "median_error": float(1.2533 * _robust(ratio) / np.sqrt(ratio.size)),
           "normalised_scatter": _robust(zc), "normalised_scatter_68": np.percentile(spread, [16, 84]).tolist(),
           "normalised_std": float(np.std(zc)),
           "background_normalised_scatter": _robust(blank), "background_normalised_std": float(np.std(blank)),
           "median_noise_fraction": float(np.median([r["noise"] / r["truth"] for r in rows])),
           "processing_ratio_median": float(np.median(1 + proc)),
           "processing_scatter": proc_spread,
           "processing_scatter_less_photon": float(np.sqrt(max(proc_spread**2 - phot**2, 0.0))),
           "stars": rows}
    print(f"{band} scan {info.number}: {len(rows)} injected stars (m {lo:.1f}-{lo + 1.9:.1f}), median ratio "
          f"{out['median_ratio']:.4f} ± {out['median_error']:.4f}; scatter in units of each star's noise "
          f"{out['normalised_scatter']:.2f} (68 %: {out['normalised_scatter_68'][0]:.2f}-"
          f"{out['normalised_scatter_68'][1]:.2f}), std {out['normalised_std']:.2f} (without the stars: "
          f"{out['background_normalised_scatter']:.2f}, std {out['background_normalised_std']:.2f}); noise "
          f"{100 * out['median_noise_fraction']:.2f} % of the flux. Difference images: median "
          f"{out['processing_ratio_median']:.4f}, robust scatter {100 * proc_spread:.3f} % "
          f"(photon noise {100 * phot:.3f} %)")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("--scan", type=int)
    ap.add_argument("--bands", nargs="+", default=["J", "H", "K"])
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--spacing", type=float, default=SPACING, help="lattice step (\")")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    night = open_night(args.night)
    cfg = load_config()
    sky = [s for s in night.scans if s.type == "sci"] or [s for s in night.scans if s.type == "cal"]
    info = (next(s for s in night.scans if s.number == args.scan) if args.scan is not None
            else max(sky, key=lambda s: s.nframes))
    darks = run_darks((night.load_scan(s.number) for s in night.scans if s.type == "dark"), config=cfg.darks)
    result = {}
    for band in args.bands:
        rng = np.random.default_rng([args.seed, ord(band)])
        result[band] = measure_band(night, args.night, info, band, darks, cfg, rng, args.spacing)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
