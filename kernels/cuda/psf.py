"""CUDA kernels (Numba) for the Moffat stamp renderer and the stamp scatter-add.

These take device arrays (CuPy arrays or Numba device arrays, anything with
``__cuda_array_interface__``), already validated; :mod:`gpu2mass.kernels.psf` is the public
entry point. Kernels are compiled on their first launch and memoized. Importing this module
imports ``numba.cuda``; nothing else in ``gpu2mass.kernels`` does until the CUDA path is used.

Rendering: one thread per stamp pixel, evaluating the scalar
:func:`~gpu2mass.kernels.scalar.moffat.moffat_pixel_integral` (the same rule, nodes and
profile code as the CPU driver); the quadrature tables are module-level NumPy arrays that
Numba places in constant memory, so no host-to-device copy happens per call.

Scatter-add: one thread per stamp pixel, ``cuda.atomic.add`` into the image. Float32 atomic
additions land in an unspecified order, so overlapping stamps can differ from the CPU result
(which adds in stamp order) by float32 rounding, and from one run to the next.
"""

from __future__ import annotations

import contextlib
import warnings

from gpu2mass.kernels._targets import cuda_kernel
from gpu2mass.kernels.scalar.moffat import (
    PIXEL_RULE_DX,
    PIXEL_RULE_DY,
    PIXEL_RULE_W,
    moffat_pixel_integral,
)
from numba import cuda

__all__ = ["THREADS_PER_BLOCK", "add_stamps", "render_moffat_stamps"]

#: Threads per block of both kernels.
THREADS_PER_BLOCK = 128


@cuda_kernel
def _render_kernel(fx, fy, flux, alpha, beta, half_size, out):
    i = cuda.grid(1)
    size = 2 * half_size + 1
    n_pix = size * size
    if i >= fx.shape[0] * n_pix:
        return
    k = i // n_pix
    p = i - k * n_pix
    a = p // size
    b = p - a * size
    cx = (b - half_size) - fx[k]
    cy = (a - half_size) - fy[k]
    value = moffat_pixel_integral(
        cx, cy, alpha[k], beta[k], PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W
    )
    out[k, a, b] = flux[k] * value  # float64 rounded to the float32 output


@cuda_kernel
def _add_kernel(image, stamps, x0, y0):
    i = cuda.grid(1)
    n_src = stamps.shape[0]
    sy = stamps.shape[1]
    sx = stamps.shape[2]
    n_pix = sy * sx
    if i >= n_src * n_pix:
        return
    k = i // n_pix
    p = i - k * n_pix
    a = p // sx
    b = p - a * sx
    yy = y0[k] + a
    xx = x0[k] + b
    if yy >= 0 and yy < image.shape[0] and xx >= 0 and xx < image.shape[1]:
        cuda.atomic.add(image, (yy, xx), stamps[k, a, b])


@contextlib.contextmanager
def _small_grids_allowed():
    # Numba warns (NumbaPerformanceWarning) when a grid has fewer than 128 blocks. Small
    # inputs legitimately give small grids; under warnings-as-errors that warning must
    # not turn a correct call into a failure.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU")
        yield


def _blocks(n_threads: int) -> int:
    return (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK


def render_moffat_stamps(fx, fy, flux, alpha, beta, half_size: int, out, *, stream=0) -> None:
    """Render pixel-integrated Moffat stamps on the GPU into ``out``.

    Parameters
    ----------
    fx, fy, flux, alpha, beta
        Contiguous float64 device arrays of shape (N,), validated by the caller (see
        :func:`gpu2mass.kernels.cpu.psf.render_moffat_stamps` for their meaning).
    half_size
        h >= 0.
    out
        Contiguous float32 device array of shape (N, 2h+1, 2h+1), overwritten.
    stream
        The CUDA stream to launch on (a Numba stream; 0 for the default stream).
    """
    size = 2 * half_size + 1
    n_threads = fx.shape[0] * size * size
    if n_threads == 0:
        return
    with _small_grids_allowed():
        _render_kernel[_blocks(n_threads), THREADS_PER_BLOCK, stream](
            fx, fy, flux, alpha, beta, half_size, out
        )


def add_stamps(image, stamps, x0, y0, *, stream=0) -> None:
    """Add stamps into ``image`` in place on the GPU (atomic float32 adds), clipping edges.

    Parameters
    ----------
    image
        Contiguous float32 device array (ny, nx), modified in place.
    stamps
        Contiguous float32 device array (N, sy, sx).
    x0, y0
        Contiguous int64 device arrays (N,): image column and row of element [0, 0].
    stream
        The CUDA stream to launch on (a Numba stream; 0 for the default stream).
    """
    n_threads = stamps.shape[0] * stamps.shape[1] * stamps.shape[2]
    if n_threads == 0 or image.shape[0] * image.shape[1] == 0:
        return
    with _small_grids_allowed():
        _add_kernel[_blocks(n_threads), THREADS_PER_BLOCK, stream](image, stamps, x0, y0)
