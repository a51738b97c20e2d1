"""CPU drivers (Numba ``prange``) of single-frame peak finding and source measurement.

Take plain, validated NumPy arrays; :mod:`gpu2mass.kernels.detect` is the public entry
point. The math is in :mod:`gpu2mass.kernels.scalar.detect`.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from gpu2mass.kernels.scalar.detect import (
    MEASURE_COLUMNS,
    SKY_BUFFER,
    is_local_peak,
    measure_source,
)
from numba import prange

__all__ = ["find_peaks", "measure_sources"]


@cpu_kernel(parallel=True)
def _peaks_kernel(img, mask, threshold, out):
    n, ny, nx = img.shape
    for fy in prange(n * ny):
        f = fy // ny
        y = fy - f * ny
        thr = threshold[f]
        for x in range(nx):
            out[f, y, x] = 0 if mask[f, y, x] != 0 else is_local_peak(img, f, y, x, thr)


@cpu_kernel(parallel=True)
def _measure_kernel(data, mask, peaks, fi, yi, xi, noise, alpha, beta, params,
                    rule_dx, rule_dy, rule_w, out, flags):
    for i in prange(fi.shape[0]):
        # Per-iteration scratch: the scalar code may not allocate, the driver may.
        buf = np.empty(SKY_BUFFER)
        grad = np.empty(2)
        f = fi[i]
        measure_source(data, mask, peaks, f, yi[i], xi[i], noise[f], alpha[f], beta[f],
                       params, rule_dx, rule_dy, rule_w, buf, grad, out, flags, i)


def find_peaks(img, mask, threshold):
    """uint8 (n, ny, nx): 1 at unmasked 3 x 3 local maxima of ``img`` above
    ``threshold[f]``. ``img`` float32 (n, ny, nx), ``mask`` uint8 (n, ny, nx),
    ``threshold`` float64 (n,)."""
    out = np.empty(img.shape, dtype=np.uint8)
    if img.size:
        _peaks_kernel(img, mask, threshold, out)
    return out


def measure_sources(data, mask, peaks, fi, yi, xi, noise, alpha, beta, params,
                    rule_dx, rule_dy, rule_w):
    """Measure candidates (fi, yi, xi) int64 (N,); returns float64 (N, n_columns) in
    :data:`~gpu2mass.kernels.scalar.detect.MEASURE_COLUMNS` order and int32 flags (N,)."""
    n = fi.shape[0]
    out = np.empty((n, len(MEASURE_COLUMNS)), dtype=np.float64)
    flags = np.empty(n, dtype=np.int32)
    if n:
        _measure_kernel(data, mask, peaks, fi, yi, xi, noise, alpha, beta, params,
                        rule_dx, rule_dy, rule_w, out, flags)
    return out, flags
