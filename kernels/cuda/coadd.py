"""CUDA kernels (Numba) of the Atlas coadd: two launches, one thread per output pixel.

Take validated device arrays; :mod:`gpu2mass.kernels.coadd` is the public entry. The
per-pixel math is :mod:`gpu2mass.kernels.scalar.coadd`, the code the CPU driver calls;
results agree with it to float32 rounding.
"""

from __future__ import annotations

from gpu2mass.kernels._targets import cuda_kernel
from gpu2mass.kernels.cuda.resample import _small_grids_allowed
from gpu2mass.kernels.scalar.coadd import combine_pixel, find_outlier
from numba import cuda

__all__ = ["THREADS_PER_BLOCK", "combine_frames"]

#: Threads per block.
THREADS_PER_BLOCK = 256


@cuda_kernel
def _outlier_kernel(vals, vfac, offsets, weights, boxes, reject_sigma, reject_fraction,
                    min_frames, outlier):
    i = cuda.grid(1)
    w = outlier.shape[1]
    if i >= outlier.shape[0] * w:
        return
    r = i // w
    c = i - r * w
    outlier[r, c] = find_outlier(r, c, vals, vfac, offsets, weights, boxes, reject_sigma,
                                 reject_fraction, min_frames)


@cuda_kernel
def _combine_kernel(vals, vfac, offsets, weights, boxes, outlier, grow, data, sigma, count,
                    dropped):
    i = cuda.grid(1)
    w = data.shape[1]
    if i >= data.shape[0] * w:
        return
    r = i // w
    c = i - r * w
    m, s, n, j = combine_pixel(r, c, vals, vfac, offsets, weights, boxes, outlier, grow)
    data[r, c] = m
    sigma[r, c] = s
    count[r, c] = n
    dropped[r, c] = j


def combine_frames(vals, vfac, offsets, weights, boxes, reject_sigma, reject_fraction, min_frames,
                   grow, outlier, data, sigma, count, dropped, *, stream=0) -> None:
    """Coadd on the GPU into the (H, W) device arrays ``outlier`` (int32 scratch),
    ``data``, ``sigma``, ``count``, ``dropped``; inputs as in
    :func:`gpu2mass.kernels.coadd.combine_frames`."""
    n_threads = data.shape[0] * data.shape[1]
    if n_threads == 0:
        return
    blocks = (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    with _small_grids_allowed():
        _outlier_kernel[blocks, THREADS_PER_BLOCK, stream](
            vals, vfac, offsets, weights, boxes, float(reject_sigma), float(reject_fraction),
            int(min_frames), outlier)
        _combine_kernel[blocks, THREADS_PER_BLOCK, stream](
            vals, vfac, offsets, weights, boxes, outlier, int(grow), data, sigma, count, dropped)
