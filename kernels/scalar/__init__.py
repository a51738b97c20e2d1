"""Scalar math written once: plain Python functions of numbers, compiled per target.

Each function here is a :class:`gpu2mass.kernels._targets.ScalarFunction`: called from
Python it runs as Python; ``f.compile("cpu")`` gives a ``numba.njit`` dispatcher and
``f.compile("cuda")`` a ``numba.cuda`` device function, each built on first request and
memoized. Scalar functions call each other by bare name and stay inside what both Numba
targets accept (no allocation, no Python objects). Importing this package imports no Numba.

Modules: :mod:`.bits` (float64 bit reinterpretation primitives), :mod:`.elementary`
(:func:`~.elementary.pow_positive`, a vectorizable power), :mod:`.moffat` (the Moffat PSF,
its pixel-integration rule and tables).
"""

from gpu2mass.kernels.scalar.elementary import pow_positive
from gpu2mass.kernels.scalar.moffat import (
    moffat_density,
    moffat_normalization,
    moffat_pixel_integral,
    moffat_profile,
    moffat_quadrature_order,
)

__all__ = [
    "moffat_density",
    "moffat_normalization",
    "moffat_pixel_integral",
    "moffat_profile",
    "moffat_quadrature_order",
    "pow_positive",
]
