"""CUDA kernel (Numba) of the Atlas resampling kernel: one thread per (frame, output pixel).

Takes validated device arrays; :mod:`gpu2mass.kernels.resample` is the public entry. The
per-pixel math is the scalar :func:`~gpu2mass.kernels.scalar.resample.resample_pixel`,
the same code the CPU driver calls; results agree with it to float32 rounding (FMA
contraction differs).
"""

from __future__ import annotations

import contextlib
import math
import warnings

from gpu2mass.kernels._targets import cuda_kernel
from gpu2mass.kernels.scalar.resample import resample_pixel
from numba import cuda

__all__ = ["THREADS_PER_BLOCK", "resample_frames"]

#: Threads per block.
THREADS_PER_BLOCK = 256


@cuda_kernel
def _resample_kernel(frames, mask, coef, norm, boxes, min_weight, fill, out, var):
    i = cuda.grid(1)
    n_out = out.shape[0]
    h = out.shape[1]
    w = out.shape[2]
    if i >= n_out * h * w:
        return
    k = i // (h * w)
    p = i - k * h * w
    r = p // w
    c = p - r * w
    if r >= boxes[k, 0] and r < boxes[k, 1] and c >= boxes[k, 2] and c < boxes[k, 3]:
        v, q = resample_pixel(float(c), float(r), k, frames, mask, coef, norm, min_weight)
        out[k, r, c] = v
        var[k, r, c] = q
    elif fill:
        out[k, r, c] = math.nan
        var[k, r, c] = math.nan


@contextlib.contextmanager
def _small_grids_allowed():
    # Small inputs legitimately give grids under 128 blocks; Numba's performance warning
    # must not fail a correct call under warnings-as-errors.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU")
        yield


def resample_frames(frames, mask, coef, norm, boxes, min_weight, out, var, *, fill=True,
                    stream=0) -> None:
    """Resample on the GPU into ``out`` and ``var`` (float32 (n, H, W) device arrays).

    Inputs are contiguous device arrays as described in
    :func:`gpu2mass.kernels.resample_frames`.
    """
    n_threads = out.shape[0] * out.shape[1] * out.shape[2]
    if n_threads == 0:
        return
    blocks = (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    with _small_grids_allowed():
        _resample_kernel[blocks, THREADS_PER_BLOCK, stream](
            frames, mask, coef, norm, boxes, float(min_weight), bool(fill), out, var
        )
