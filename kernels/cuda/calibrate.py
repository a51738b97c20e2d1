"""CUDA kernel (Numba) of the fused per-pixel frame calibration.

Takes validated device arrays (CuPy or Numba, via ``__cuda_array_interface__``);
:mod:`gpu2mass.kernels.calibrate` is the public entry point. One thread per pixel of the
stack, calling the same scalars as the CPU driver
(:mod:`gpu2mass.kernels.scalar.calibrate`), compiled on first launch and memoized.
"""

from __future__ import annotations

import contextlib
import warnings

from gpu2mass.kernels._targets import cuda_kernel
from gpu2mass.kernels.scalar.calibrate import MASK_NONFINITE, calibrated_value, pixel_flags
from numba import cuda

__all__ = ["THREADS_PER_BLOCK", "calibrate_frames"]

#: Threads per block.
THREADS_PER_BLOCK = 256


@cuda_kernel
def _calibrate_kernel(r1, r2r1, dark, flat, sat, badpix, margin, use_r1, out, mask):
    i = cuda.grid(1)
    n = r1.shape[0]
    ny = r1.shape[1]
    nx = r1.shape[2]
    npix = ny * nx
    if i >= n * npix:
        return
    f = i // npix
    p = i - f * npix
    y = p // nx
    x = p - y * nx
    a = r1[f, y, x]
    b = r2r1[f, y, x]
    raw = a if use_r1 else b
    v = calibrated_value(raw, dark[y, x], flat[y, x])
    m = pixel_flags(a, b, sat[y, x], margin, badpix[y, x], v)
    if m & MASK_NONFINITE:
        v = 0.0
    out[f, y, x] = v
    mask[f, y, x] = m


@contextlib.contextmanager
def _small_grids_allowed():
    # Numba warns when a grid has fewer than 128 blocks; small (test) inputs legitimately
    # do, and under warnings-as-errors that must not fail a correct call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU")
        yield


def calibrate_frames(r1, r2r1, dark, flat, sat, badpix, margin: float, use_r1: bool, out, mask,
                     *, stream=0) -> None:
    """Calibrate one read type of a stack on the GPU into ``out`` (float32) and ``mask``
    (uint8), both (n, ny, nx) device arrays; the inputs as for
    :func:`gpu2mass.kernels.cpu.calibrate.calibrate_frames`, on the device."""
    n_threads = r1.shape[0] * r1.shape[1] * r1.shape[2]
    if n_threads == 0:
        return
    blocks = (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    with _small_grids_allowed():
        _calibrate_kernel[blocks, THREADS_PER_BLOCK, stream](
            r1, r2r1, dark, flat, sat, badpix, float(margin), bool(use_r1), out, mask
        )
