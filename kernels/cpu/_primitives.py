"""CPU (``numba.njit``) implementations of the scalar primitives in
:mod:`gpu2mass.kernels.scalar.bits`. Imported only when the CPU target is first compiled."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["float64_as_int64", "int64_as_float64"]


@intrinsic
def _bitcast_f64_to_i64(typingctx, x):
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[0], signature.args[0], types.float64)
        return builder.bitcast(value, ir.IntType(64))

    return types.int64(x), codegen


@intrinsic
def _bitcast_i64_to_f64(typingctx, i):
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[0], signature.args[0], types.int64)
        return builder.bitcast(value, ir.DoubleType())

    return types.float64(i), codegen


def float64_as_int64(py_func):
    """Factory for the CPU target: an LLVM bitcast (one register move, vectorizable)."""
    return _bitcast_f64_to_i64


def int64_as_float64(py_func):
    """Factory for the CPU target: an LLVM bitcast (one register move, vectorizable)."""
    return _bitcast_i64_to_f64
