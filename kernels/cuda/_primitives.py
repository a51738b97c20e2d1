"""CUDA implementations of the scalar primitives in :mod:`gpu2mass.kernels.scalar.bits`.

On a real device these are libdevice intrinsics. Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) kernels run as Python, so the plain Python body is used as a
simulated device function. Imported only when the CUDA target is first compiled.
"""

from __future__ import annotations

from numba import config, cuda

__all__ = ["float64_as_int64", "int64_as_float64"]


def _simulated(py_func):
    return cuda.jit(device=True)(py_func)


def float64_as_int64(py_func):
    """Factory for the CUDA target: ``__nv_double_as_longlong`` (the simulator: Python)."""
    if config.ENABLE_CUDASIM:
        return _simulated(py_func)
    from numba.cuda import libdevice

    return libdevice.double_as_longlong


def int64_as_float64(py_func):
    """Factory for the CUDA target: ``__nv_longlong_as_double`` (the simulator: Python)."""
    if config.ENABLE_CUDASIM:
        return _simulated(py_func)
    from numba.cuda import libdevice

    return libdevice.longlong_as_double
