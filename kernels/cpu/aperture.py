"""CPU driver (Numba ``prange``) of multi-aperture photometry: one iteration per position.

Takes plain, validated NumPy arrays; :mod:`gpu2mass.kernels.aperture` is the public entry.
The math is :func:`gpu2mass.kernels.scalar.aperture.measure_position`.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from gpu2mass.kernels.scalar.aperture import SKY_BUFFER, measure_position
from numba import prange

__all__ = ["aperture_photometry"]


@cpu_kernel(parallel=True)
def _aperture_kernel(frames, mask, fi, xs, ys, radii, r_in, r_out, guard, trim, min_sky,
                     flux, npix, sky, sigma, nsky, flags):
    for i in prange(fi.shape[0]):
        # Per-iteration scratch: the scalar code may not allocate, the driver may.
        buf = np.empty(SKY_BUFFER)
        measure_position(frames, mask, fi[i], xs[i], ys[i], radii, r_in, r_out, guard, trim,
                         min_sky, buf, flux, npix, sky, sigma, nsky, flags, i)


def aperture_photometry(frames, mask, fi, xs, ys, radii, r_in, r_out, guard, trim, min_sky):
    """Measure on the CPU; see :func:`gpu2mass.kernels.aperture.aperture_photometry`.

    Returns ``(flux, npix, sky, sky_sigma, n_sky, flags)``.
    """
    m, nr = fi.shape[0], radii.shape[0]
    flux = np.empty((m, nr))
    npix = np.empty((m, nr))
    sky = np.empty(m)
    sigma = np.empty(m)
    nsky = np.empty(m, np.int32)
    flags = np.empty(m, np.int32)
    if m:
        _aperture_kernel(frames, mask, fi, xs, ys, radii, float(r_in), float(r_out),
                         float(guard), float(trim), int(min_sky), flux, npix, sky, sigma,
                         nsky, flags)
    return flux, npix, sky, sigma, nsky, flags
