"""Atlas flux conservation against truth on a processed simulated night (issue 3).

For isolated unsaturated truth stars on every Atlas Image of every sky scan: the
background-subtracted flux in a 14" radius (sky: median of the 20–40" annulus) against the
truth flux ``10^(−0.4 (m − zp))`` (zp: mean truth zero point of the frames that cover the
star) times the fraction of the simulator's Moffat (β = 2.5, the frames' mean truth FWHM)
that falls within 14". Prints, per band, the median ratio and its error, the robust scatter
and the scatter expected from the noise (SIGMA × NCORFAC), and writes them as JSON.

Isolated: no other truth source within 40" brighter than 5 mag below the star (its light
in the aperture or the annulus would exceed ~1 %). The fainter sources that remain still
add their light: the ratio is also given against the truth flux of the star plus the part
of every other truth source's light (point-source Moffat of the same seeing) that falls in
the aperture, which is what a perfect coadd would hold. Unsaturated: fainter than the R2−R1
saturation limit + 0.5 mag; bright enough that the noise is < 1 % (SNR > 100 in 14").

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
from gpu2mass.sim.galaxy import moffat_alpha_from_fwhm, moffat_enclosed_fraction
from gpu2mass.sim.psf import optical_fwhm

MAG = {"J": "j_m", "H": "h_m", "K": "k_m"}
SATURATED = {"J": 9.0, "H": 8.5, "K": 8.0}  # docs/simulator.md: R2−R1 saturation
APERTURE, ANNULUS = 14.0, (20.0, 40.0)
BETA = 2.5


def _grid(h) -> AtlasGrid:
    return AtlasGrid(0, h["CRVAL1"], h["CRVAL2"], h["NAXIS1"], h["NAXIS2"], h["CRPIX1"],
                     h["CRPIX2"], h["CDELT2"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest = json.loads((args.night / "night.json").read_text())
    src = {k: np.asarray(v) for k, v in pq.read_table(args.night / "truth" / "sources.parquet").to_pydict().items()}
    tf = {k: np.asarray(v) for k, v in pq.read_table(args.night / "truth" / "frames.parquet").to_pydict().items()}
    yy, xx = np.mgrid[0:1024, 0:512]
    result = {}
    for band in manifest["instrument"]["bands"]:
        m_all = src[MAG[band]]
        ratios, ratios_all, expected = [], [], []
        for scan in (s for s in manifest["scans"] if s["type"] in ("sci", "cal")):
            geo = frame_geometry_from_truth(args.night, scan["scan"], band)
            fsel = (tf["scan"] == scan["scan"]) & (tf["band"] == band)
            order = np.argsort(tf["frame"][fsel])
            zp_f, fwhm_f = tf["zp_mag"][fsel][order], tf["fwhm_arcsec"][fsel][order]
            for path in sorted((args.out / "atlas").glob(f"{band.lower()}_{scan['scan']:03d}_*.fits")):
                with fits.open(path) as h:
                    data, sigma = h[0].data.astype(float), h["SIGMA"].data.astype(float)
                    grid, k = _grid(h[0].header), h[0].header["NCORFAC"]
                x, y = grid.sky_to_pixel(src["ra"], src["dec"])
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
                    if not np.all(np.isfinite(sub[ap_])) or np.isfinite(sub[ann]).sum() < 0.8 * ann.sum():
                        continue
                    bg = np.nanmedian(sub[ann])
                    flux = float(np.sum(sub[ap_] - bg))
                    noise = k * np.sqrt(np.sum(sig[ap_] ** 2))
                    fx, fy = geo.sky_to_pixel(np.arange(geo.nframes), src["ra"][i], src["dec"][i])
                    cover = (fx > -0.5) & (fx < 255.5) & (fy > -0.5) & (fy < 255.5)
                    if not cover.any():
                        continue
                    fwhm = float(optical_fwhm(fwhm_f[cover].mean(), scale=geo.band.scale_arcsec, beta=BETA))
                    alpha = moffat_alpha_from_fwhm(fwhm, BETA)
                    inside = moffat_enclosed_fraction(APERTURE, alpha, BETA)
                    zp = zp_f[cover].mean()
                    truth = 10.0 ** (-0.4 * (m_all[i] - zp)) * inside
                    if noise / truth > 0.01:
                        continue
                    # Light of the fainter truth sources within the aperture (+ 3 FWHM).
                    others = near_all[(np.hypot(x[near_all] - x[i], y[near_all] - y[i]) < APERTURE + 9)
                                      & (near_all != i) & np.isfinite(m_all[near_all])]
                    extra = 0.0
                    for j in others:
                        rr2 = (xx[:83, :83] + c0 - x[j]) ** 2 + (yy[:83, :83] + r0 - y[j]) ** 2
                        dens = (BETA - 1) / (np.pi * alpha**2) * (1 + rr2 / alpha**2) ** -BETA
                        extra += 10.0 ** (-0.4 * (m_all[j] - zp)) * float(dens[ap_].sum())
                    ratios.append(flux / truth)
                    ratios_all.append(flux / (truth + extra))
                    expected.append(noise / truth)
        r = np.array(ratios)
        ra_ = np.array(ratios_all)
        e = np.array(expected)
        if r.size == 0:
            result[band] = {"n": 0}
            continue
        mad = 1.4826 * np.median(np.abs(r - np.median(r)))
        result[band] = {"n": int(r.size), "median_ratio": float(np.median(r)),
                        "median_error": float(1.2533 * mad / np.sqrt(r.size)),
                        "robust_scatter": float(mad), "expected_scatter": float(np.median(e)),
                        "median_ratio_with_neighbours": float(np.median(ra_))}
        print(f"{band}: {r.size} star images, median ratio {np.median(r):.4f} ± "
              f"{result[band]['median_error']:.4f}, robust scatter {mad:.4f} "
              f"(noise alone {np.median(e):.4f}); with the fainter sources' light in the "
              f"truth: {np.median(ra_):.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
