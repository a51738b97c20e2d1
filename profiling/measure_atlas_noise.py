"""Atlas noise against ``SIGMA`` and background seams, on every Atlas Image of a processed
simulated night (issue 3).

Per band, over the Atlas Images of the sky scans:

- **noise**: on star-free pixels (more than 15" from every truth source brighter than
  17 mag, coverage ≥ 5), the robust std within 32 × 32-pixel blocks (larger-scale airglow
  structure is not pixel noise) against the rms ``SIGMA`` of the same pixels; the median
  over blocks of each, their ratio per image, and the median ratio over images (target:
  within 10 % of 1);
- **seams**: at every row where a frame starts or stops contributing (a step of the
  median coverage across the central 472 columns), the difference of the background
  medians of the 16 rows above and below (each row's median, then the median of 16 rows),
  in units of the image's median ``SIGMA``; the median |step| over all such rows (target
  < 0.1), beside the same figure at rows at least 8 rows from any seam: the sky's airglow
  structure changes the background over 32" as well, which is not a seam.

The same measures as ``tests/test_atlas.py`` asserts on the tiny night, here on full nights.

Run: ``python profiling/measure_atlas_noise.py NIGHT OUT [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from astropy.io import fits
from measure_atlas_flux import MAG, _grid  # the sibling script (profiling/ is on sys.path)

from gpu2mass.io.products import read_columns


def noise_ratio(data, sigma, coverage, x, y) -> float | None:
    """Median block robust std / median block rms SIGMA on star-free pixels (``x``, ``y``:
    pixel positions of the sources to stay 15" from)."""
    ny, nx = data.shape
    free = np.isfinite(data) & (coverage >= 5)
    yy, xx = np.mgrid[:ny, :nx]
    on = (x > -30) & (x < nx + 30) & (y > -30) & (y < ny + 30)
    for xi, yi in zip(x[on], y[on], strict=True):
        y0, y1 = max(int(yi) - 15, 0), min(int(yi) + 16, ny)
        x0, x1 = max(int(xi) - 15, 0), min(int(xi) + 16, nx)
        if y1 > y0 and x1 > x0:
            free[y0:y1, x0:x1] &= np.hypot(xx[y0:y1, x0:x1] - xi, yy[y0:y1, x0:x1] - yi) > 15
    emp, model = [], []
    for i in range(0, ny, 32):
        for j in range(0, nx, 32):
            f = free[i:i + 32, j:j + 32]
            if f.sum() > 300:
                v = data[i:i + 32, j:j + 32][f]
                emp.append(1.4826 * np.median(np.abs(v - np.median(v))))
                model.append(np.sqrt(np.mean(sigma[i:i + 32, j:j + 32][f] ** 2)))
    return float(np.median(emp) / np.median(model)) if len(emp) >= 20 else None


def seam_steps(data, coverage) -> tuple[np.ndarray, np.ndarray]:
    """Background step (DN) at each row where a frame starts or stops contributing, and the
    same difference at the rows at least 8 rows from any such row (the control: what the
    sky's own structure and the noise give without a seam)."""
    cols = slice(20, data.shape[1] - 20)
    cov = coverage[:, cols].astype(int)
    rows = np.flatnonzero(np.abs(np.diff(np.median(cov, axis=1))) > 0) + 1
    med = np.array([np.nanmedian(data[r, cols]) if np.isfinite(data[r, cols]).any() else np.nan
                    for r in range(data.shape[0])])

    def step(r):
        return np.nanmedian(med[r:r + 16]) - np.nanmedian(med[r - 16:r])

    ok = np.arange(16, data.shape[0] - 16)
    seams = np.array([step(r) for r in rows if 16 <= r <= data.shape[0] - 16], float)
    far = ok[np.min(np.abs(ok[:, None] - rows[None, :]), axis=1) >= 8] if rows.size else ok
    control = np.array([step(r) for r in far[::4]], float)
    return seams, control


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest = json.loads((args.night / "night.json").read_text())
    src = read_columns(args.night / "truth" / "sources.parquet")
    sky_scans = {s["scan"] for s in manifest["scans"] if s["type"] in ("sci", "cal")}
    result = {}
    for band in manifest["instrument"]["bands"]:
        m = np.nan_to_num(np.asarray(src[MAG[band]], float), nan=99.0)
        bright = m < 17.0
        ratios, steps, controls = [], [], []
        for path in sorted((args.out / "atlas").glob(f"{band.lower()}_*.fits")):
            if int(path.stem.split("_")[1]) not in sky_scans:
                continue
            with fits.open(path) as h:
                data = h[0].data.astype(float)
                sigma, cov = h["SIGMA"].data.astype(float), h["COVERAGE"].data
                grid = _grid(h[0].header)
            x, y = grid.sky_to_pixel(src["ra"][bright], src["dec"][bright])
            r = noise_ratio(data, sigma, cov, np.asarray(x), np.asarray(y))
            if r is not None:
                ratios.append(r)
            s, c = seam_steps(data, cov)
            if s.size:
                steps.append(np.abs(s) / np.nanmedian(sigma))
                controls.append(np.abs(c) / np.nanmedian(sigma))
        steps = np.concatenate(steps) if steps else np.zeros(0)
        controls = np.concatenate(controls) if controls else np.zeros(0)
        res = {"images": len(ratios), "noise_over_sigma_median": float(np.median(ratios)) if ratios else None,
               "noise_over_sigma_range": [float(np.min(ratios)), float(np.max(ratios))] if ratios else None,
               "seams": int(steps.size),
               "median_abs_step_over_sigma": float(np.median(steps)) if steps.size else None,
               "median_abs_step_over_sigma_control": float(np.median(controls)) if controls.size else None}
        result[band] = res
        print(f"{band}: empirical noise / SIGMA {res['noise_over_sigma_median']:.3f} (median of "
              f"{len(ratios)} images, range {res['noise_over_sigma_range'][0]:.3f}-"
              f"{res['noise_over_sigma_range'][1]:.3f}); median |seam step| "
              f"{res['median_abs_step_over_sigma']:.3f} SIGMA over {steps.size} seams (rows away from "
              f"seams: {res['median_abs_step_over_sigma_control']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
