"""CPU loop (Numba) of the band-fill aperture measurements on an Atlas Image.

:func:`gpu2mass.bandmerge.band_fill_upper_limits` measures, at every position where a band
has no detection, the sky (median of the 14–20" annulus) and the 4" aperture flux with
8 × 8 sub-sampled area fractions. Written per source in NumPy that cost ~0.3 ms of Python
per position (a second per full scan); this loop does the same arithmetic, source by source,
in compiled code (flag bits: :data:`gpu2mass.flags.BANDFILL_BITS`).
"""

from __future__ import annotations

import math

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel

from gpu2mass.flags import BF_FEW_PIXELS, BF_FEW_SKY_PIXELS, BF_NEGATIVE, BF_OFF_IMAGE

__all__ = ["measure_band_fill"]

@cpu_kernel
def _band_fill_kernel(img, sig, bad, x, y, r_ap, r_in, r_out, sub, min_sky, min_area,
                      f_ap, f_sky, median_factor, flux, flux_err, sky_out, n_ap, n_sky, flags):
    ny, nx = img.shape
    h_out = math.ceil(r_out) + 1
    h_ap = math.ceil(r_ap) + 1
    side = 2 * h_out + 1
    ring = np.empty(side * side)
    for i in range(x.shape[0]):
        xi = x[i]
        yi = y[i]
        if not (math.isfinite(xi) and math.isfinite(yi)) or not (
                -0.5 <= xi < nx - 0.5 and -0.5 <= yi < ny - 0.5):
            flags[i] |= BF_OFF_IMAGE
            continue
        cx = round(xi)
        cy = round(yi)
        # Sky: pixels whose centres lie in the annulus.
        m = 0
        s2 = 0.0
        for yy in range(max(cy - h_out, 0), min(cy + h_out + 1, ny)):
            for xx in range(max(cx - h_out, 0), min(cx + h_out + 1, nx)):
                r = math.hypot(xx - xi, yy - yi)
                if r >= r_in and r <= r_out and not bad[yy, xx]:
                    ring[m] = img[yy, xx]
                    s2 += sig[yy, xx] * sig[yy, xx]
                    m += 1
        n_sky[i] = m
        if m < min_sky:
            flags[i] |= BF_FEW_SKY_PIXELS
            continue
        sky = np.median(ring[:m])
        sky_err = median_factor * f_sky * math.sqrt(s2 / m / m)
        # Aperture: area fractions by sub × sub sampling.
        w_all = 0.0
        area = 0.0
        total = 0.0
        var = 0.0
        for py in range(cy - h_ap, cy + h_ap + 1):
            for px in range(cx - h_ap, cx + h_ap + 1):
                inside = 0
                for a in range(sub):
                    fy = py + (a + 0.5) / sub - 0.5 - yi
                    for b in range(sub):
                        fx = px + (b + 0.5) / sub - 0.5 - xi
                        if fy * fy + fx * fx <= r_ap * r_ap:
                            inside += 1
                w = inside / (sub * sub)
                w_all += w
                if w == 0.0 or py < 0 or py >= ny or px < 0 or px >= nx or bad[py, px]:
                    continue
                area += w
                total += w * (img[py, px] - sky)
                var += w * w * sig[py, px] * sig[py, px]
        n_ap[i] = area
        if area < min_area:
            flags[i] |= BF_FEW_PIXELS
            continue
        scale = w_all / area
        f = scale * total
        flux[i] = f
        flux_err[i] = math.hypot(scale * f_ap * math.sqrt(var), w_all * sky_err)
        sky_out[i] = sky
        if f < 0:
            flags[i] |= BF_NEGATIVE


def measure_band_fill(img, sig, bad, x, y, *, r_ap, r_in, r_out, sub, min_sky, min_area, f_ap,
                      f_sky, median_factor):
    """Sky and aperture measurements at ``(x, y)`` (0-based pixels) on one image.

    ``img``, ``sig`` float64 (ny, nx), ``bad`` bool (ny, nx); radii in pixels; ``min_area``
    the least good aperture area (pixels); ``f_ap``, ``f_sky`` the correlated-noise factors
    of the aperture and the annulus; ``median_factor`` the noise of the annulus median over
    that of its mean. Returns ``(flux, flux_err, sky, n_ap, n_sky, flags)``, float64 (n,)
    with NaN where nothing was measured, and int32 flags.
    """
    n = x.shape[0]
    out = [np.full(n, np.nan) for _ in range(5)]
    flags = np.zeros(n, np.int32)
    if n:
        _band_fill_kernel(img, sig, bad, x, y, float(r_ap), float(r_in), float(r_out), int(sub),
                          int(min_sky), float(min_area), float(f_ap), float(f_sky),
                          float(median_factor), *out, flags)
    return (*out, flags)
