"""Bit reinterpretation of float64 values, as scalar primitives.

These have no portable Python spelling that both Numba targets compile, so each target
supplies its own (:func:`gpu2mass.kernels._targets.primitive`): an LLVM ``bitcast`` on the
CPU, libdevice's ``__nv_double_as_longlong``/``__nv_longlong_as_double`` on CUDA, and the
plain Python bodies below (``struct``) when called from Python or run in Numba's CUDA
simulator. They let :func:`gpu2mass.kernels.scalar.elementary.pow_positive` split a float64
into exponent and mantissa without a library call, which keeps loops vectorizable.
"""

from __future__ import annotations

import struct

from gpu2mass.kernels._targets import primitive

__all__ = ["float64_as_int64", "int64_as_float64"]

_PACK_F64 = struct.Struct("<d")
_PACK_I64 = struct.Struct("<q")


@primitive(
    cpu="gpu2mass.kernels.cpu._primitives:float64_as_int64",
    cuda="gpu2mass.kernels.cuda._primitives:float64_as_int64",
)
def float64_as_int64(x):
    """The IEEE-754 bits of float64 ``x`` as a signed int64 (no numeric conversion)."""
    return _PACK_I64.unpack(_PACK_F64.pack(x))[0]


@primitive(
    cpu="gpu2mass.kernels.cpu._primitives:int64_as_float64",
    cuda="gpu2mass.kernels.cuda._primitives:int64_as_float64",
)
def int64_as_float64(i):
    """The float64 whose IEEE-754 bits are the int64 ``i`` (inverse of float64_as_int64)."""
    return _PACK_F64.unpack(_PACK_I64.pack(i))[0]
