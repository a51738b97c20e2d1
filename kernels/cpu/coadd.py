"""CPU driver (Numba ``prange``) of the Atlas coadd: two passes, one iteration per row.

Takes plain, validated NumPy arrays; :mod:`gpu2mass.kernels.coadd` is the public entry. The
per-pixel math is :mod:`gpu2mass.kernels.scalar.coadd`, shared with CUDA. The first pass
finds each pixel's outlier and, from the same sums, its mean over every contribution; the
second recombines only the pixels with an outlier within ``grow`` (a few per cent): the
frame stack is read once instead of twice (the same numbers as combining every pixel in the
second pass, which is what the CUDA driver does).
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from gpu2mass.kernels.scalar.coadd import combine_pixel, outlier_and_mean
from numba import prange

__all__ = ["combine_frames"]


@cpu_kernel(parallel=True)
def _outlier_kernel(vals, vfac, offsets, weights, boxes, reject_sigma, reject_fraction,
                    min_frames, outlier, data, sigma, count):
    h = outlier.shape[0]
    w = outlier.shape[1]
    for r in prange(h):
        for c in range(w):
            k, m, s, n = outlier_and_mean(r, c, vals, vfac, offsets, weights, boxes,
                                          reject_sigma, reject_fraction, min_frames)
            outlier[r, c] = k
            data[r, c] = m
            sigma[r, c] = s
            count[r, c] = n


@cpu_kernel(parallel=True)
def _combine_kernel(vals, vfac, offsets, weights, boxes, outlier, grow, data, sigma, count,
                    dropped):
    h = data.shape[0]
    w = data.shape[1]
    for r in prange(h):
        r0 = max(r - grow, 0)
        r1 = min(r + grow + 1, h)
        for c in range(w):
            dropped[r, c] = 0
            near = False
            for rr in range(r0, r1):
                for cc in range(max(c - grow, 0), min(c + grow + 1, w)):
                    if outlier[rr, cc] >= 0:
                        near = True
            if near:
                m, s, n, j = combine_pixel(r, c, vals, vfac, offsets, weights, boxes, outlier,
                                           grow)
                data[r, c] = m
                sigma[r, c] = s
                count[r, c] = n
                dropped[r, c] = j


def combine_frames(vals, vfac, offsets, weights, boxes, reject_sigma, reject_fraction, min_frames,
                   grow):
    """Coadd on the CPU; see :func:`gpu2mass.kernels.coadd.combine_frames`."""
    h, w = vals.shape[1:]
    outlier = np.empty((h, w), np.int32)
    data = np.empty((h, w), np.float32)
    sigma = np.empty((h, w), np.float32)
    count = np.empty((h, w), np.int32)
    dropped = np.empty((h, w), np.uint8)
    if h * w:
        _outlier_kernel(vals, vfac, offsets, weights, boxes, float(reject_sigma),
                        float(reject_fraction), int(min_frames), outlier, data, sigma, count)
        _combine_kernel(vals, vfac, offsets, weights, boxes, outlier, int(grow), data, sigma,
                        count, dropped)
    return data, sigma, count, dropped
