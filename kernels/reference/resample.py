"""NumPy reference of the Atlas resampling kernel (slow, vectorized per frame, host only).

Written independently of the scalar code: the cubic is evaluated from
:data:`~gpu2mass.kernels.scalar.resample.POLY_TERMS`, its Jacobian by the analytic
derivatives of each term, the bilinear weights with explicit masks.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels.scalar.resample import POLY_TERMS

__all__ = ["resample_frames"]


def _poly(c, s, t):
    v = np.zeros_like(s)
    ds = np.zeros_like(s)
    dt = np.zeros_like(s)
    for (i, j), a in zip(POLY_TERMS, c, strict=True):
        v += a * s**i * t**j
        if i:
            ds += a * i * s ** (i - 1) * t**j
        if j:
            dt += a * j * s**i * t ** (j - 1)
    return v, ds, dt


def resample_frames(frames, mask, coef, norm, boxes, shape, min_weight):
    """Reference of :func:`gpu2mass.kernels.resample_frames`; returns (values, var_factor)."""
    n = frames.shape[0]
    h, w = shape
    out = np.full((n, h, w), np.nan, np.float32)
    var = np.full((n, h, w), np.nan, np.float32)
    ny, nx = frames.shape[1:]
    for k in range(n):
        r0, r1, c0, c1 = (int(b) for b in boxes[k])
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, h), min(c1, w)
        if r1 <= r0 or c1 <= c0:
            continue
        gy, gx = np.mgrid[r0:r1, c0:c1].astype(float)
        q = norm[k, 2]
        s, t = (gx - norm[k, 0]) * q, (gy - norm[k, 1]) * q
        x, xs, xt = _poly(coef[k, 0], s, t)
        y, ys, yt = _poly(coef[k, 1], s, t)
        jac = np.abs(xs * yt - xt * ys) * q * q
        ok = (x > -1) & (x < nx) & (y > -1) & (y < ny)
        x = np.where(ok, x, 0.0)
        y = np.where(ok, y, 0.0)
        ix, iy = np.floor(x).astype(int), np.floor(y).astype(int)
        fx, fy = x - ix, y - iy
        bad = mask[k if mask.shape[0] > 1 else 0]
        wsum = np.zeros_like(x)
        w2sum = np.zeros_like(x)
        vsum = np.zeros_like(x)
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                xx, yy = ix + dx, iy + dy
                inside = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
                xc, yc = np.clip(xx, 0, nx - 1), np.clip(yy, 0, ny - 1)
                good = inside & (bad[yc, xc] == 0) & ok
                wgt = np.where(good, wx * wy, 0.0)
                wsum += wgt
                w2sum += wgt**2
                vsum += wgt * np.where(good, frames[k, yc, xc], 0.0)
        use = ok & (wsum >= min_weight) & (wsum > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            val = np.where(use, jac * vsum / wsum, np.nan)
            vf = np.where(use, jac**2 * w2sum / wsum**2, np.nan)
        out[k, r0:r1, c0:c1] = val
        var[k, r0:r1, c0:c1] = vf
    return out, var
