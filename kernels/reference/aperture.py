"""NumPy reference of multi-aperture photometry (slow, one position at a time, host only).

Written independently of the scalar code: the exact pixel/circle overlap areas come from
photutils (``photutils.geometry.circular_overlap_grid`` with ``use_exact=1``), the sky from
``numpy.sort`` and ``numpy.quantile``.
"""

from __future__ import annotations

import math

import numpy as np
from gpu2mass.kernels.scalar.aperture import (
    FLAG_EDGE,
    FLAG_FILLED,
    FLAG_INCOMPLETE,
    FLAG_MASKED_NEAR,
    FLAG_OFF_FRAME,
    FLAG_SATURATED_NEAR,
    FLAG_SKY,
    MASK_SATURATED,
)
from photutils.geometry import circular_overlap_grid

__all__ = ["aperture_photometry", "overlap_grid"]


def overlap_grid(x, y, r, half):
    """Exact overlap areas (2 half + 1, 2 half + 1) of the pixels centred on
    (round(x) + j, round(y) + i), j, i in [−half, half], with the circle (x, y, r)."""
    cx, cy = round(x), round(y)
    xmin = cx - half - 0.5 - x
    ymin = cy - half - 0.5 - y
    n = 2 * half + 1
    return circular_overlap_grid(xmin, xmin + n, ymin, ymin + n, n, n, r, 1, 1)


def _sky(values, trim):
    v = np.sort(values)
    n = v.size
    if n == 0:
        return math.nan, math.nan
    lo = math.floor(trim * n)
    sky = float(np.median(v)) if n - 2 * lo < 1 else float(v[lo:n - lo].mean())
    q = np.quantile(v, [0.15865525393145707, 0.8413447460685429])
    return sky, float(0.5 * (q[1] - q[0]))


def aperture_photometry(frames, mask, fi, xs, ys, radii, r_in, r_out, guard, trim, min_sky):
    """Reference of :func:`gpu2mass.kernels.aperture.aperture_photometry`; same returns."""
    m, nr = fi.shape[0], radii.shape[0]
    ny, nx = frames.shape[1:]
    flux = np.zeros((m, nr))
    npix = np.zeros((m, nr))
    sky = np.full(m, np.nan)
    sigma = np.full(m, np.nan)
    nsky = np.zeros(m, np.int32)
    flags = np.zeros(m, np.int32)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for i in range(m):
        k, x, y = int(fi[i]), float(xs[i]), float(ys[i])
        if not (-0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5):
            flux[i] = np.nan
            flags[i] = FLAG_OFF_FRAME
            continue
        img = frames[k].astype(np.float64)
        msk = mask[k if mask.shape[0] > 1 else 0]
        good = (msk == 0) & np.isfinite(img)
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        ann = good & (d2 >= r_in**2) & (d2 <= r_out**2)
        sky[i], sigma[i] = _sky(img[ann], trim)
        nsky[i] = int(ann.sum())
        flag = FLAG_SKY if nsky[i] < min_sky else 0
        # Pixel (ix, iy) -> grid cell; the grid spans every pixel the largest circle reaches.
        half = math.ceil(max(radii[-1], guard)) + 2
        cx, cy = round(x), round(y)
        gy, gx = np.mgrid[cy - half:cy + half + 1, cx - half:cx + half + 1]
        inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny)
        cgx, cgy = np.clip(gx, 0, nx - 1), np.clip(gy, 0, ny - 1)
        direct = inside & good[cgy, cgx]
        # Unusable pixels: the pixel nearest to their mirror image through (x, y).
        mx = np.floor(2 * x - gx + 0.5).astype(int)
        my = np.floor(2 * y - gy + 0.5).astype(int)
        m_in = (mx >= 0) & (mx < nx) & (my >= 0) & (my < ny)
        cmx, cmy = np.clip(mx, 0, nx - 1), np.clip(my, 0, ny - 1)
        mirror = ~direct & m_in & good[cmy, cmx]
        ok = direct | mirror
        vals = np.where(direct, img[cgy, cgx], np.where(mirror, img[cmy, cmx], 0.0)) - sky[i]
        vals = np.where(ok, vals, 0.0)
        g = overlap_grid(x, y, guard, half) > 0
        if (g & ~inside).any():
            flag |= FLAG_EDGE
        bad_in = g & inside & ~good[cgy, cgx]
        if bad_in.any():
            flag |= FLAG_MASKED_NEAR
            if (msk[cgy, cgx][bad_in] & MASK_SATURATED).any():
                flag |= FLAG_SATURATED_NEAR
        for j, r in enumerate(radii):
            w = overlap_grid(x, y, float(r), half)
            if (mirror & (w > 0)).any():
                flag |= FLAG_FILLED
            flux[i, j] = (w * vals).sum()
            npix[i, j] = (w * ok).sum()
            if npix[i, j] < math.pi * r * r * (1 - 1e-9):
                flag |= FLAG_INCOMPLETE
        if nsky[i] == 0:
            flux[i] = np.nan
        flags[i] = flag
    return flux, npix, sky, sigma, nsky, flags
