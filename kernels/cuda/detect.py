"""CUDA kernels (Numba) of single-frame peak finding and source measurement.

Take validated device arrays; :mod:`gpu2mass.kernels.detect` is the public entry point.
One thread per pixel (peaks) or per candidate (measurement), calling the same scalars as
the CPU drivers (:mod:`gpu2mass.kernels.scalar.detect`).
"""

from __future__ import annotations

import contextlib
import warnings

from gpu2mass.kernels._targets import cuda_kernel
from gpu2mass.kernels.scalar.detect import SKY_BUFFER, is_local_peak, measure_source
from numba import cuda, float64

__all__ = ["THREADS_PER_BLOCK", "find_peaks", "measure_sources"]

#: Threads per block (peaks); the measurement uses MEASURE_THREADS (big local arrays).
THREADS_PER_BLOCK = 256
MEASURE_THREADS = 64


@cuda_kernel
def _peaks_kernel(img, mask, threshold, out):
    i = cuda.grid(1)
    n = img.shape[0]
    ny = img.shape[1]
    nx = img.shape[2]
    npix = ny * nx
    if i >= n * npix:
        return
    f = i // npix
    p = i - f * npix
    y = p // nx
    x = p - y * nx
    if mask[f, y, x] != 0:
        out[f, y, x] = 0
    else:
        out[f, y, x] = is_local_peak(img, f, y, x, threshold[f])


@cuda_kernel
def _measure_kernel(data, mask, peaks, fi, yi, xi, noise, alpha, beta, params,
                    rule_dx, rule_dy, rule_w, out, flags):
    i = cuda.grid(1)
    if i >= fi.shape[0]:
        return
    buf = cuda.local.array(SKY_BUFFER, float64)
    grad = cuda.local.array(2, float64)
    f = fi[i]
    measure_source(data, mask, peaks, f, yi[i], xi[i], noise[f], alpha[f], beta[f],
                   params, rule_dx, rule_dy, rule_w, buf, grad, out, flags, i)


@contextlib.contextmanager
def _small_grids_allowed():
    # Numba warns when a grid has fewer than 128 blocks; small inputs legitimately do.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU")
        yield


def find_peaks(img, mask, threshold, out, *, stream=0) -> None:
    """Peak map into ``out`` (uint8 device array (n, ny, nx)); see the CPU driver."""
    n_threads = img.shape[0] * img.shape[1] * img.shape[2]
    if n_threads == 0:
        return
    blocks = (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    with _small_grids_allowed():
        _peaks_kernel[blocks, THREADS_PER_BLOCK, stream](img, mask, threshold, out)


def measure_sources(data, mask, peaks, fi, yi, xi, noise, alpha, beta, params,
                    rule_dx, rule_dy, rule_w, out, flags, *, stream=0) -> None:
    """Measurements into ``out`` (float64 (N, n_columns)) and ``flags`` (int32 (N,))."""
    n = fi.shape[0]
    if n == 0:
        return
    blocks = (n + MEASURE_THREADS - 1) // MEASURE_THREADS
    with _small_grids_allowed():
        _measure_kernel[blocks, MEASURE_THREADS, stream](
            data, mask, peaks, fi, yi, xi, noise, alpha, beta, params,
            rule_dx, rule_dy, rule_w, out, flags)
