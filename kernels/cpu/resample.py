"""CPU driver (Numba ``prange``) of the Atlas resampling kernel.

Takes plain, validated NumPy arrays; :mod:`gpu2mass.kernels.resample` is the public entry.
One ``prange`` iteration per (frame, output row): every output pixel is evaluated once per
frame, the inverse mapping through the frame's fitted cubic (a few dozen flops) and a
bilinear interpolation, so no per-pixel WCS calls happen. Rows and columns outside the
frame's box are filled with NaN without evaluating anything.
"""

from __future__ import annotations

import math

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from gpu2mass.kernels.scalar.resample import resample_pixel
from numba import prange

__all__ = ["resample_frames"]


@cpu_kernel(parallel=True)
def _resample_kernel(frames, mask, coef, norm, boxes, min_weight, out, var):
    n_out, h, w = out.shape
    for task in prange(n_out * h):
        k = task // h
        r = task - k * h
        inside_row = r >= boxes[k, 0] and r < boxes[k, 1]
        for c in range(w):
            if inside_row and c >= boxes[k, 2] and c < boxes[k, 3]:
                v, q = resample_pixel(float(c), float(r), k, frames, mask, coef, norm, min_weight)
                out[k, r, c] = v
                var[k, r, c] = q
            else:
                out[k, r, c] = math.nan
                var[k, r, c] = math.nan


def resample_frames(frames, mask, coef, norm, boxes, shape, min_weight):
    """Resample frames onto a grid on the CPU; see :func:`gpu2mass.kernels.resample_frames`.

    Returns (values, var_factor), float32 (n, H, W) each.
    """
    n = frames.shape[0]
    out = np.empty((n, *shape), np.float32)
    var = np.empty((n, *shape), np.float32)
    if n and shape[0] * shape[1]:
        _resample_kernel(frames, mask, coef, norm, boxes, float(min_weight), out, var)
    return out, var
