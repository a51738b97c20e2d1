"""Atlas flux conservation against truth on a processed simulated night (issue 3).

For isolated unsaturated truth stars on every Atlas Image of every sky scan: the
background-subtracted flux in a 14" radius (sky: median of the 20–40" annulus) against the
truth flux ``10^(−0.4 (m − zp))`` (zp: mean truth zero point of the frames that cover the
star) times the fraction of the simulator's Moffat (β = 2.5, the frames' mean truth FWHM)
that falls within 14", plus the light of the star's own diffraction spikes within 14"
(the simulator draws them on top of the Moffat's full flux for stars brighter than
J 10 / H 9.5 / Ks 9: ~0.8 % of the flux falls in the aperture, which had read as a +0.2 to
+0.5 % bias of the bright half of the sample). Prints, per band, the median ratio and its
error, the robust scatter, the scatter expected from the noise and the robust scatter of
the ratios in units of each star's own expected noise (1 when the scatter is the noise's),
and writes them as JSON.

Expected noise of one star's ratio, in quadrature: the background in the aperture
(``NCORFAC × sqrt(Σ SIGMA²)``), the star's own photon noise (``F / (g N)`` DN² for a flux
of F DN per frame averaged over the N frames that cover it, g the gain) and the noise of
the annulus median times the aperture area (``π/2 · NCORFAC² · mean SIGMA² / n_annulus ×
n_aperture²``). The photon and annulus terms add ~30 % to the background's variance at
SNR 100–300.

The background's part is also measured as it is: the robust scatter of the same aperture
minus annulus sum at random blank positions of each image (no truth source brighter than
15 mag within 40", the truth light of fainter ones taken out), which holds what the
``SIGMA`` extension does not (airglow structure within the 40" annulus, residual steps of
the background matching); the scatter is given in units of that noise too. With 25–90
stars a band, robust spreads of these ratios are uncertain by 8–20 %: the script gives
each spread's 16–84 % bootstrap range.

Isolated: no other truth source within 40" brighter than 5 mag below the star (its light
in the aperture or the annulus would exceed ~1 %), and no truth artifact other than the
star's own spikes and cosmic rays (row stripes and spikes of saturated stars, persistence
ghosts, meteors) within 40" of it in a frame that covers it: a stripe through the
aperture had taken 14 % of one star's flux. The fainter sources that remain still add
their light: the ratio is also given against the truth flux of the star plus the part of
every other truth source's light (point-source Moffat of the same seeing) that falls in
the aperture, which is what a perfect coadd would hold; the scatters are those of this
ratio. Unsaturated: fainter than the R2−R1 saturation limit + 0.5 mag; bright enough that
the background noise is < 1 % (SNR > 100 in 14", ``MAX_BACKGROUND_NOISE``).

Run: ``python profiling/measure_atlas_flux.py NIGHT OUT [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from astropy.io import fits

from gpu2mass.atlas import AtlasGrid
from gpu2mass.geometry import frame_geometry_from_truth
from gpu2mass.sim.artifacts import SPIKE_LIMIT, add_spikes
from gpu2mass.sim.galaxy import moffat_alpha_from_fwhm, moffat_enclosed_fraction
from gpu2mass.sim.psf import optical_fwhm

MAG = {"J": "j_m", "H": "h_m", "K": "k_m"}
SATURATED = {"J": 9.0, "H": 8.5, "K": 8.0}  # docs/simulator.md: R2−R1 saturation
APERTURE, ANNULUS = 14.0, (20.0, 40.0)
BETA = 2.5
#: Stars whose background noise in the aperture exceeds this fraction of their flux are left out.
MAX_BACKGROUND_NOISE = 0.01


def _grid(h) -> AtlasGrid:
    return AtlasGrid(0, h["CRVAL1"], h["CRVAL2"], h["NAXIS1"], h["NAXIS2"], h["CRPIX1"],
                     h["CRPIX2"], h["CDELT2"])


def _segment_distance(px, py, x0, y0, x1, y1):
    """Distance (px) of point (px, py) from the segments (x0, y0)–(x1, y1); arrays."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / np.maximum(dx * dx + dy * dy, 1e-12), 0, 1)
    return np.hypot(x0 + t * dx - px, y0 + t * dy - py)


def _on_artifact(art, star_id, fx, fy, cover, reach_px) -> bool:
    """Whether a truth artifact other than the star's own spikes and cosmic rays comes
    within ``reach_px`` of the star in a frame that covers it (``art``: one scan-band)."""
    f = art["frame"]
    keep = cover[f] & (art["kind"] != "cosmic_ray") & ~((art["kind"] == "spike")
                                                        & (art["parent_id"] == star_id))
    if not keep.any():
        return False
    x1 = np.where(np.isfinite(art["x1"]), art["x1"], art["x0"])
    y1 = np.where(np.isfinite(art["y1"]), art["y1"], art["y0"])
    d = _segment_distance(fx[f[keep]], fy[f[keep]], art["x0"][keep], art["y0"][keep],
                          x1[keep], y1[keep])
    return bool(np.any(d < reach_px))


def _own_spikes(band, mag, flux, fx, fy, rot_deg, sky_sigma, radius_px, nx, ny) -> float:
    """Mean over the given frames of the star's own diffraction-spike light (DN) within
    ``radius_px`` frame pixels of it, drawn by the simulator's own ``add_spikes``."""
    if mag >= SPIKE_LIMIT[band]:
        return 0.0
    yy, xx = np.mgrid[0:ny, 0:nx]
    total = []
    for f_flux, x, y, rot, sig in zip(flux, fx, fy, rot_deg, sky_sigma, strict=True):
        img = np.zeros((ny, nx))
        add_spikes(img, x, y, f_flux, mag, band, rotation_deg=rot, sky_sigma=sig,
                   ids=(0, band, 0), parent_id=0)
        total.append(float(img[np.hypot(xx - x, yy - y) < radius_px].sum()))
    return float(np.mean(total))


def _blank_sky_scatter(data, x, y, m_all, alpha, zp, rng, n_try=400):
    """Robust scatter (DN) of the aperture-minus-annulus sum at random positions of an
    Atlas Image away from bright sources (no truth source brighter than 15 mag within 40"),
    less the truth light of the fainter sources in the aperture: the background's part of
    a star's measurement as it is, sky structure (airglow) and the annulus median
    included. ``x``, ``y``: the truth sources' pixel positions on the image."""
    ny, nx = data.shape
    yy, xx = np.mgrid[0:83, 0:83]
    fin = np.isfinite(m_all)
    bright = fin & (m_all < 15.0) & (x > -45) & (x < nx + 45) & (y > -45) & (y < ny + 45)
    faint = fin & ~bright & (x > -60) & (x < nx + 60) & (y > -60) & (y < ny + 60)
    out = []
    for _ in range(n_try):
        cx, cy = rng.uniform(45, nx - 45), rng.uniform(45, ny - 45)
        if np.any(np.hypot(x[bright] - cx, y[bright] - cy) < 40.0):
            continue
        r0, c0 = int(cy) - 41, int(cx) - 41
        sub = data[r0:r0 + 83, c0:c0 + 83]
        r = np.hypot(xx + c0 - cx, yy + r0 - cy)
        ap_, ann = r < APERTURE, (r > ANNULUS[0]) & (r < ANNULUS[1])
        ann_ok = ann & np.isfinite(sub)
        if not np.all(np.isfinite(sub[ap_])) or ann_ok.sum() < 0.8 * ann.sum():
            continue
        flux = float(np.sum(sub[ap_] - np.median(sub[ann_ok])))
        extra = 0.0
        for j in np.flatnonzero(faint & (np.hypot(x - cx, y - cy) < APERTURE + 9)):
            rr2 = (xx + c0 - x[j]) ** 2 + (yy + r0 - y[j]) ** 2
            dens = (BETA - 1) / (np.pi * alpha**2) * (1 + rr2 / alpha**2) ** -BETA
            extra += 10.0 ** (-0.4 * (m_all[j] - zp)) * float(dens[ap_].sum())
        out.append(flux - extra)
    out = np.asarray(out)
    return float(1.4826 * np.median(np.abs(out - np.median(out)))) if out.size >= 30 else np.nan


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest = json.loads((args.night / "night.json").read_text())
    inst = manifest["instrument"]
    src = {k: np.asarray(v) for k, v in pq.read_table(args.night / "truth" / "sources.parquet").to_pydict().items()}
    tf = {k: np.asarray(v) for k, v in pq.read_table(args.night / "truth" / "frames.parquet").to_pydict().items()}
    art_all = {k: np.asarray(v) for k, v in pq.read_table(args.night / "truth" / "artifacts.parquet").to_pydict().items()}
    art_all["parent_id"] = np.array([-1 if p is None else p for p in art_all["parent_id"]], np.int64)
    yy, xx = np.mgrid[0:83, 0:83]
    result = {}
    for band in inst["bands"]:
        m_all = src[MAG[band]]
        gain, read_noise = inst["gain_e_per_dn"][band], inst["read_noise_e"][band]
        ratios, ratios_all, expected, expected_blank, mags, where = [], [], [], [], [], []
        rng = np.random.default_rng(0)
        for scan in (s for s in manifest["scans"] if s["type"] in ("sci", "cal")):
            geo = frame_geometry_from_truth(args.night, scan["scan"], band)
            nx, ny, scale = geo.band.nx, geo.band.ny, geo.band.scale_arcsec
            fsel = (tf["scan"] == scan["scan"]) & (tf["band"] == band)
            order = np.argsort(tf["frame"][fsel])
            zp_f, fwhm_f = tf["zp_mag"][fsel][order], tf["fwhm_arcsec"][fsel][order]
            rot_f = tf["rot_deg"][fsel][order]
            sky_sigma_f = np.sqrt(tf["sky_dn"][fsel][order] / gain + (read_noise / gain) ** 2)
            asel = (art_all["scan"] == scan["scan"]) & (art_all["band"] == band)
            art = {k: v[asel] for k, v in art_all.items()}
            for path in sorted((args.out / "atlas").glob(f"{band.lower()}_{scan['scan']:03d}_*.fits")):
                with fits.open(path) as h:
                    data, sigma = h[0].data.astype(float), h["SIGMA"].data.astype(float)
                    coverage = h["COVERAGE"].data.astype(float)
                    grid, k = _grid(h[0].header), h[0].header["NCORFAC"]
                x, y = grid.sky_to_pixel(src["ra"], src["dec"])
                blank = None  # the image's blank-sky scatter, measured on its first star
                on = (x > 45) & (x < grid.nx - 45) & (y > 45) & (y < grid.ny - 45) & np.isfinite(m_all)
                cand = np.flatnonzero(on & (src["kind"] == "star") & (m_all > SATURATED[band] + 0.5))
                near_all = np.flatnonzero(on | ((x > 0) & (x < grid.nx) & (y > 0) & (y < grid.ny)))
                for i in cand:
                    d = np.hypot(x[near_all] - x[i], y[near_all] - y[i])
                    nb = near_all[(d < 40.0) & (near_all != i)]
                    if np.any(m_all[nb] < m_all[i] + 5.0):
                        continue
                    r0, c0 = int(y[i]) - 41, int(x[i]) - 41
                    sub = data[r0:r0 + 83, c0:c0 + 83]
                    sig = sigma[r0:r0 + 83, c0:c0 + 83]
                    r = np.hypot(xx[:83, :83] + c0 - x[i], yy[:83, :83] + r0 - y[i])
                    ap_, ann = r < APERTURE, (r > ANNULUS[0]) & (r < ANNULUS[1])
                    ann_ok = ann & np.isfinite(sub)
                    if not np.all(np.isfinite(sub[ap_])) or ann_ok.sum() < 0.8 * ann.sum():
                        continue
                    bg = np.median(sub[ann_ok])
                    flux = float(np.sum(sub[ap_] - bg))
                    noise_bg = k * np.sqrt(np.sum(sig[ap_] ** 2))
                    fx, fy = geo.sky_to_pixel(np.arange(geo.nframes), src["ra"][i], src["dec"][i])
                    cover = (fx > -0.5) & (fx < nx - 0.5) & (fy > -0.5) & (fy < ny - 0.5)
                    if not cover.any():
                        continue
                    fwhm = float(optical_fwhm(fwhm_f[cover].mean(), scale=scale, beta=BETA))
                    alpha = moffat_alpha_from_fwhm(fwhm, BETA)
                    zp = zp_f[cover].mean()
                    total = 10.0 ** (-0.4 * (m_all[i] - zp))
                    truth = total * moffat_enclosed_fraction(APERTURE, alpha, BETA)
                    if noise_bg / truth > MAX_BACKGROUND_NOISE:
                        continue
                    reach = ANNULUS[1] / scale + 2.0
                    if _on_artifact(art, src["id"][i], fx, fy, cover, reach):
                        continue
                    truth += _own_spikes(band, m_all[i], 10.0 ** (-0.4 * (m_all[i] - zp_f[cover])),
                                         fx[cover], fy[cover], rot_f[cover], sky_sigma_f[cover],
                                         APERTURE / scale, nx, ny)
                    # The star's photon noise in the mean of N frames and the noise of the
                    # annulus median (π/2 × the mean's variance) over the aperture's area.
                    var_star = total / (gain * cover.sum())
                    var_ann = (np.pi / 2 * k**2 * np.mean(sig[ann_ok] ** 2) / ann_ok.sum()
                               * ap_.sum() ** 2)
                    noise = np.sqrt(noise_bg**2 + var_star + var_ann)
                    # Light of the fainter truth sources within the aperture (+ 3 FWHM).
                    others = near_all[(np.hypot(x[near_all] - x[i], y[near_all] - y[i]) < APERTURE + 9)
                                      & (near_all != i) & np.isfinite(m_all[near_all])]
                    extra = 0.0
                    for j in others:
                        rr2 = (xx[:83, :83] + c0 - x[j]) ** 2 + (yy[:83, :83] + r0 - y[j]) ** 2
                        dens = (BETA - 1) / (np.pi * alpha**2) * (1 + rr2 / alpha**2) ** -BETA
                        extra += 10.0 ** (-0.4 * (m_all[j] - zp)) * float(dens[ap_].sum())
                    if blank is None:
                        blank = _blank_sky_scatter(data, x, y, np.asarray(m_all, float), alpha, zp, rng)
                    ratios.append(flux / truth)
                    ratios_all.append(flux / (truth + extra))
                    expected.append(noise / (truth + extra))
                    expected_blank.append(np.sqrt(blank**2 + var_star) / (truth + extra))
                    mags.append(float(m_all[i]))
                    where.append({"image": path.stem, "x": float(x[i]), "y": float(y[i]),
                                  "nframes": int(cover.sum()), "fwhm": fwhm,
                                  "coverage": float(np.mean(coverage[r0:r0 + 83, c0:c0 + 83][ap_])),
                                  "coverage_core": float(np.mean(coverage[r0:r0 + 83, c0:c0 + 83][r < 4.0]))})
        r = np.array(ratios)
        ra_ = np.array(ratios_all)
        e = np.array(expected)
        if r.size == 0:
            result[band] = {"n": 0}
            continue
        med = float(np.median(ra_))
        mad = 1.4826 * np.median(np.abs(ra_ - med))
        norm = 1.4826 * np.median(np.abs(ra_ - med) / e)
        eb = np.array(expected_blank)
        norm_blank = 1.4826 * np.nanmedian(np.abs(ra_ - med) / eb)
        # The robust spreads' own uncertainty: 16-84 % range over bootstrap resamples.
        boot = np.random.default_rng(1).integers(0, ra_.size, (2000, ra_.size))
        dev = ra_[boot] - np.median(ra_[boot], axis=1, keepdims=True)
        ci = np.percentile(1.4826 * np.median(np.abs(dev) / e[boot], axis=1), [16, 84])
        ci_blank = np.percentile(1.4826 * np.nanmedian(np.abs(dev) / eb[boot], axis=1), [16, 84])
        result[band] = {"n": int(r.size), "median_ratio": float(np.median(r)),
                        "median_ratio_with_neighbours": med,
                        "median_error": float(1.2533 * mad / np.sqrt(r.size)),
                        "robust_scatter": float(mad), "expected_scatter": float(np.median(e)),
                        "normalised_scatter": float(norm),
                        "expected_scatter_blank_sky": float(np.nanmedian(eb)),
                        "normalised_scatter_blank_sky": float(norm_blank),
                        "normalised_scatter_68": ci.tolist(),
                        "normalised_scatter_blank_sky_68": ci_blank.tolist(),
                        "stars": [{"m": m_, "ratio": float(q_), "noise": float(e_), "noise_blank_sky": float(b_), **w_}
                                  for m_, q_, e_, b_, w_ in zip(mags, ra_, e, eb, where, strict=True)]}
        print(f"{band}: {r.size} star images, median ratio {np.median(r):.4f}; with the fainter "
              f"sources' light in the truth {med:.4f} ± {result[band]['median_error']:.4f}, "
              f"robust scatter {mad:.4f} (noise {np.median(e):.4f}), in units of each star's "
              f"noise {norm:.2f} (68 %: {ci[0]:.2f}-{ci[1]:.2f}); with the background's scatter "
              f"measured on blank sky (noise {np.nanmedian(eb):.4f}) {norm_blank:.2f} "
              f"({ci_blank[0]:.2f}-{ci_blank[1]:.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
