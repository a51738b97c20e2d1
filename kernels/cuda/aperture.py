"""CUDA kernel (Numba) of multi-aperture photometry: one thread per position.

Takes validated device arrays; :mod:`gpu2mass.kernels.aperture` is the public entry. Each
thread keeps its sky annulus in a local array of
:data:`~gpu2mass.kernels.scalar.aperture.SKY_BUFFER` float64 and calls the same scalar
:func:`~gpu2mass.kernels.scalar.aperture.measure_position` as the CPU driver; results agree
with it to float64 rounding (FMA contraction differs).
"""

from __future__ import annotations

import contextlib
import warnings

from gpu2mass.kernels._targets import cuda_kernel
from gpu2mass.kernels.scalar.aperture import SKY_BUFFER, measure_position
from numba import cuda, float64

__all__ = ["THREADS_PER_BLOCK", "aperture_photometry"]

#: Threads per block (each holds a 16 KiB local sky buffer).
THREADS_PER_BLOCK = 64


@cuda_kernel
def _aperture_kernel(frames, mask, fi, xs, ys, radii, r_in, r_out, guard, trim, min_sky,
                     flux, npix, sky, sigma, nsky, flags):
    i = cuda.grid(1)
    if i >= fi.shape[0]:
        return
    buf = cuda.local.array(SKY_BUFFER, float64)
    measure_position(frames, mask, fi[i], xs[i], ys[i], radii, r_in, r_out, guard, trim,
                     min_sky, buf, flux, npix, sky, sigma, nsky, flags, i)


@contextlib.contextmanager
def _small_grids_allowed():
    # Numba warns when a grid has fewer than 128 blocks; small inputs legitimately do.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU")
        yield


def aperture_photometry(frames, mask, fi, xs, ys, radii, r_in, r_out, guard, trim, min_sky,
                        flux, npix, sky, sigma, nsky, flags, *, stream=0) -> None:
    """Measure on the GPU into the device arrays ``flux``, ``npix`` (M, R) float64 and
    ``sky``, ``sigma`` (M,) float64, ``nsky``, ``flags`` (M,) int32."""
    m = fi.shape[0]
    if m == 0:
        return
    blocks = (m + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    with _small_grids_allowed():
        _aperture_kernel[blocks, THREADS_PER_BLOCK, stream](
            frames, mask, fi, xs, ys, radii, float(r_in), float(r_out), float(guard),
            float(trim), int(min_sky), flux, npix, sky, sigma, nsky, flags)
