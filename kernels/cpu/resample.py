"""CPU driver (Numba ``prange``) of the Atlas resampling kernel.

Takes plain, validated NumPy arrays; :mod:`gpu2mass.kernels.resample` is the public entry.
One ``prange`` iteration per (frame, output row): every output pixel of the frame's box is
evaluated once, the inverse mapping through the frame's fitted cubic and a bilinear
interpolation, so no per-pixel WCS calls happen. Along a row the cubic is regrouped into a
cubic in the column coordinate (coefficients once per row); the interpolation is the
scalar :func:`~gpu2mass.kernels.scalar.resample.interpolate_bilinear` that the CUDA kernel
also calls (through :func:`~gpu2mass.kernels.scalar.resample.resample_pixel`). Pixels
outside the box are filled with NaN without evaluating anything.
"""

from __future__ import annotations

import math

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from gpu2mass.kernels.scalar.resample import interpolate_bilinear
from numba import prange

__all__ = ["resample_frames"]


@cpu_kernel(parallel=True)
def _resample_kernel(frames, mask, coef, norm, boxes, min_weight, fill, out, var):
    n_out, h, w = out.shape
    for task in prange(n_out * h):
        k = task // h
        r = task - k * h
        c0 = w
        c1 = w
        if r >= boxes[k, 0] and r < boxes[k, 1]:
            c0 = min(max(boxes[k, 2], 0), w)
            c1 = min(max(boxes[k, 3], c0), w)
        if fill:
            for c in range(c0):
                out[k, r, c] = math.nan
                var[k, r, c] = math.nan
        if c1 > c0:
            # Along a row t is fixed: the cubics and their derivatives reduce to cubics in
            # s, whose coefficients are computed once per row (the same polynomial as
            # poly3 & co., regrouped; 3x fewer operations per pixel).
            qn = norm[k, 2]
            t = (r - norm[k, 1]) * qn
            t2 = t * t
            px = np.empty(4)
            py = np.empty(4)
            dxt = np.empty(3)
            dyt = np.empty(3)
            for a in range(2):
                p = px if a == 0 else py
                d = dxt if a == 0 else dyt
                p[0] = (coef[k, a, 0] + coef[k, a, 2] * t + coef[k, a, 5] * t2
                        + coef[k, a, 9] * t2 * t)
                p[1] = coef[k, a, 1] + coef[k, a, 4] * t + coef[k, a, 8] * t2
                p[2] = coef[k, a, 3] + coef[k, a, 7] * t
                p[3] = coef[k, a, 6]
                # d/dt as a polynomial in s
                d[0] = coef[k, a, 2] + 2.0 * coef[k, a, 5] * t + 3.0 * coef[k, a, 9] * t2
                d[1] = coef[k, a, 4] + 2.0 * coef[k, a, 8] * t
                d[2] = coef[k, a, 7]
            for c in range(c0, c1):  # only the frame's box is evaluated
                s = (c - norm[k, 0]) * qn
                x = px[0] + s * (px[1] + s * (px[2] + s * px[3]))
                y = py[0] + s * (py[1] + s * (py[2] + s * py[3]))
                xs = px[1] + s * (2.0 * px[2] + 3.0 * s * px[3])
                ys = py[1] + s * (2.0 * py[2] + 3.0 * s * py[3])
                xt = dxt[0] + s * (dxt[1] + s * dxt[2])
                yt = dyt[0] + s * (dyt[1] + s * dyt[2])
                jac = abs(xs * yt - xt * ys) * qn * qn
                v, q = interpolate_bilinear(x, y, jac, k, frames, mask, min_weight)
                out[k, r, c] = v
                var[k, r, c] = q
        if fill:
            for c in range(c1, w):
                out[k, r, c] = math.nan
                var[k, r, c] = math.nan


def resample_frames(frames, mask, coef, norm, boxes, shape, min_weight, fill=True):
    """Resample frames onto a grid on the CPU; see :func:`gpu2mass.kernels.resample_frames`.

    Returns (values, var_factor), float32 (n, H, W) each.
    """
    n = frames.shape[0]
    out = np.empty((n, *shape), np.float32)
    var = np.empty((n, *shape), np.float32)
    if n and shape[0] * shape[1]:
        _resample_kernel(frames, mask, coef, norm, boxes, float(min_weight), bool(fill), out, var)
    return out, var
