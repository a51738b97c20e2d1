"""Scalar math written once, compiled per target on first use (DESIGN.md section 4).

A *scalar function* is a plain Python function of numbers (and, where it must, of small
read-only arrays) that does the per-pixel or per-source arithmetic. It is written once, in
``gpu2mass.kernels.scalar``, and compiled on demand for each *target*:

``"cpu"``
    ``numba.njit(error_model="numpy", fastmath={"contract"})``; called from ``numba.prange``
    drivers in ``gpu2mass.kernels.cpu``.
``"cuda"``
    ``numba.cuda.jit(device=True)``; called from ``@cuda.jit`` kernels in
    ``gpu2mass.kernels.cuda``. With ``NUMBA_ENABLE_CUDASIM=1`` set before Numba is
    imported, this is Numba's CUDA simulator and the same code runs as Python.

Nothing is compiled, and Numba is not even imported, when this module or a scalar module is
imported: the target is chosen by the caller at the moment it first needs compiled code, so
one process can compile and compare both (the pattern of hapsira's ``core/jit.py``, without
its import-time global target). Compiled objects are memoized per function and target.

Callees. A scalar function calls other scalar functions by their bare global name
(``from gpu2mass.kernels.scalar.moffat import moffat_profile``, then
``moffat_profile(...)``). When it is compiled for a target, its code is re-bound to a copy of
its module globals in which every name that refers to a :class:`ScalarFunction` is replaced
by that callee compiled for the same target (recursively, memoized). Calls through a module
attribute (``moffat.moffat_profile(...)``) are not re-bound and will not compile; keep to bare
names. Called from Python, a scalar function runs its plain Python body (slow; for checks).

Primitives. A few operations have no portable spelling (reinterpreting the bits of a
float64); :func:`primitive` declares a scalar function whose compiled form comes from a
per-target factory, named by a ``"module:attribute"`` string so that the target's module
(and Numba) is imported only when that target is compiled.

Drivers. :func:`cpu_kernel` and :func:`cuda_kernel` wrap a driver (the loop over sources or
pixels) in a :class:`Kernel` that is re-bound and compiled the same way on its first call.
"""

from __future__ import annotations

import importlib
import os
import threading
import types
from collections.abc import Callable
from typing import Any, Literal

#: ``GPU2MASS_JIT_CACHE=1`` caches compiled CPU code on disk (in ``NUMBA_CACHE_DIR``), so
#: that short-lived processes (the kill-and-resume test, batch jobs) skip recompiling. Off
#: by default: Numba's cache keys on the driver's own source file only, so after an edit to
#: a scalar function a cached driver would be stale.
_JIT_CACHE = os.environ.get("GPU2MASS_JIT_CACHE", "") == "1"

__all__ = [
    "CALL_TARGETS",
    "TARGETS",
    "Kernel",
    "ScalarFunction",
    "Target",
    "cpu_kernel",
    "cuda_kernel",
    "primitive",
    "resolve_target",
    "scalar",
]

Target = Literal["cpu", "cuda"]
TARGETS: tuple[Target, ...] = ("cpu", "cuda")

# One lock for all compilation: compiling a function compiles its callees first (the same
# lock re-entered), and two threads asking for the same function must get one object.
_COMPILE_LOCK = threading.RLock()


def _check_target(target: str) -> Target:
    if target not in TARGETS:
        raise ValueError(f"unknown kernel target {target!r}: use one of {TARGETS}")
    return target  # type: ignore[return-value]


def _code_names(code: types.CodeType) -> set[str]:
    """Global names a code object may look up, including those of nested functions."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _retarget(py_func: types.FunctionType, target: Target) -> types.FunctionType:
    """A copy of ``py_func`` whose scalar-function callees are compiled for ``target``.

    Numba resolves the globals of the function it compiles from ``__globals__`` (and
    closure cells), so giving the code object a private copy of its module's globals, with
    callees swapped for their compiled forms, makes the same source compile for any target
    without touching the module that defined it.
    """
    glb = dict(py_func.__globals__)
    for name in _code_names(py_func.__code__):
        obj = glb.get(name)
        if isinstance(obj, ScalarFunction):
            glb[name] = obj.compile(target)
    closure = py_func.__closure__
    if closure:
        cells = []
        for cell in closure:
            value = cell.cell_contents
            if isinstance(value, ScalarFunction):
                value = value.compile(target)
            cells.append(types.CellType(value))
        closure = tuple(cells)
    fn = types.FunctionType(py_func.__code__, glb, py_func.__name__, py_func.__defaults__, closure)
    fn.__qualname__ = py_func.__qualname__
    fn.__module__ = py_func.__module__
    fn.__doc__ = py_func.__doc__
    fn.__kwdefaults__ = py_func.__kwdefaults__
    return fn


def _compile_scalar_for(fn: types.FunctionType, target: Target) -> Any:
    if target == "cpu":
        import numba

        # error_model="numpy": division by zero gives inf/nan as on the GPU instead of
        # raising, which also removes the branch that keeps LLVM from vectorizing loops.
        # fastmath={"contract"} only: fused multiply-adds (as NVVM does by default on CUDA)
        # make polynomials ~1.7x faster and no less accurate; no reassociation, so code
        # whose rounding order matters (Cody-Waite reduction, compensated sums) stays exact.
        return numba.njit(error_model="numpy", fastmath={"contract"}, cache=_JIT_CACHE)(fn)
    from numba import cuda

    return cuda.jit(device=True)(fn)


class ScalarFunction:
    """A scalar function written once in Python and compiled per target on demand.

    Create with the :func:`scalar` (or :func:`primitive`) decorator. Calling the object
    runs the plain Python body; :meth:`compile` returns the compiled form for a target.

    Parameters
    ----------
    py_func
        The plain Python function.
    factories
        For a primitive only: ``{target: "module:attribute"}`` naming a callable that takes
        ``py_func`` and returns the target's compiled object.
    """

    def __init__(self, py_func: types.FunctionType, factories: dict[str, str] | None = None):
        if not isinstance(py_func, types.FunctionType):
            raise TypeError(f"a scalar function must be a plain Python function, not {py_func!r}")
        self.py_func = py_func
        self._factories = dict(factories or {})
        self._compiled: dict[Target, Any] = {}
        self.__name__ = py_func.__name__
        self.__qualname__ = py_func.__qualname__
        self.__module__ = py_func.__module__
        self.__doc__ = py_func.__doc__
        self.__wrapped__ = py_func

    def __call__(self, *args):
        return self.py_func(*args)

    def __repr__(self) -> str:
        done = ", ".join(self.compiled_targets) or "none"
        return f"<scalar function {self.__module__}.{self.__qualname__} (compiled: {done})>"

    @property
    def compiled_targets(self) -> tuple[Target, ...]:
        """The targets this function has been compiled for so far, in order."""
        return tuple(self._compiled)

    def compile(self, target: Target) -> Any:
        """The function compiled for ``target`` (``"cpu"`` or ``"cuda"``), memoized.

        For ``"cpu"`` a Numba dispatcher (callable from Python and from ``njit`` code);
        for ``"cuda"`` a CUDA device function (callable from CUDA kernels only).
        """
        target = _check_target(target)
        with _COMPILE_LOCK:
            compiled = self._compiled.get(target)
            if compiled is None:
                if self._factories:
                    module, _, attr = self._factories[target].partition(":")
                    factory = getattr(importlib.import_module(module), attr)
                    compiled = factory(self.py_func)
                else:
                    compiled = _compile_scalar_for(_retarget(self.py_func, target), target)
                self._compiled[target] = compiled
            return compiled


def scalar(func: Callable) -> ScalarFunction:
    """Declare ``func`` a scalar function, compiled for a target on first use.

    Scalar functions must stay inside the subset of Python that both ``numba.njit`` and
    ``numba.cuda.jit(device=True)`` accept: numbers, ``math``, loops and branches, indexing
    of arrays passed in, calls of other scalar functions by bare name. No allocation.
    """
    return ScalarFunction(func)


def primitive(*, cpu: str, cuda: str) -> Callable[[Callable], ScalarFunction]:
    """Declare a scalar function whose compiled forms come from per-target factories.

    ``cpu`` and ``cuda`` are ``"module:attribute"`` strings naming a callable that receives
    the plain Python function (the slow fallback, e.g. for the CUDA simulator) and returns
    what a compiled caller should call. The Python body is what calling the object runs.
    """
    factories = {"cpu": cpu, "cuda": cuda}

    def wrap(func: Callable) -> ScalarFunction:
        return ScalarFunction(func, factories)

    return wrap


class Kernel:
    """A driver (the loop over sources or pixels) compiled for one target on first use.

    Create with :func:`cpu_kernel` or :func:`cuda_kernel`. For ``"cpu"`` call it like the
    function; for ``"cuda"`` launch it like a Numba CUDA kernel,
    ``kernel[blocks, threads, stream](*args)``.
    """

    def __init__(self, py_func: types.FunctionType, target: Target, options: dict[str, Any]):
        self.py_func = py_func
        self.target = _check_target(target)
        self.options = dict(options)
        self._compiled: Any = None
        self.__name__ = py_func.__name__
        self.__qualname__ = py_func.__qualname__
        self.__module__ = py_func.__module__
        self.__doc__ = py_func.__doc__
        self.__wrapped__ = py_func

    def __repr__(self) -> str:
        state = "compiled" if self.is_compiled else "not compiled"
        return f"<{self.target} kernel {self.__module__}.{self.__qualname__} ({state})>"

    @property
    def is_compiled(self) -> bool:
        """Whether the driver has been compiled (or, for CUDA, wrapped) yet."""
        return self._compiled is not None

    def compile(self) -> Any:
        """The compiled driver: a Numba dispatcher or a CUDA kernel dispatcher, memoized."""
        with _COMPILE_LOCK:
            if self._compiled is None:
                fn = _retarget(self.py_func, self.target)
                if self.target == "cpu":
                    import numba

                    self._compiled = numba.njit(**self.options, cache=_JIT_CACHE)(fn)
                else:
                    from numba import cuda

                    self._compiled = cuda.jit(**self.options)(fn)
            return self._compiled

    def __call__(self, *args):
        if self.target != "cpu":
            raise TypeError(f"{self!r} is a CUDA kernel: launch it as kernel[blocks, threads]")
        return self.compile()(*args)

    def __getitem__(self, config):
        if self.target != "cuda":
            raise TypeError(f"{self!r} is a CPU driver: call it directly")
        return self.compile()[config]


def cpu_kernel(func: Callable | None = None, *, parallel: bool = False):
    """Wrap a CPU driver, compiled with ``numba.njit(parallel=..., error_model="numpy")``.

    ``parallel=True`` lets the driver use ``numba.prange`` over independent iterations.
    Usable bare (``@cpu_kernel``) or with arguments (``@cpu_kernel(parallel=True)``).
    """
    options = {"parallel": parallel, "error_model": "numpy"}

    def wrap(f: Callable) -> Kernel:
        return Kernel(f, "cpu", options)

    return wrap(func) if func is not None else wrap


def cuda_kernel(func: Callable) -> Kernel:
    """Wrap a CUDA kernel (compiled with ``numba.cuda.jit`` on its first launch)."""
    return Kernel(func, "cuda", {})


#: Values of the ``target`` keyword of the public kernel functions (``None`` picks from
#: the arrays' namespace: NumPy → ``"cpu"``, CuPy → ``"cuda"``).
CALL_TARGETS = ("cpu", "cuda", "reference")


def resolve_target(xp, target: str | None) -> str:
    """The target a kernel call runs on, from the inputs' namespace and ``target``.

    Raises ``ValueError`` for an unknown target and ``TypeError`` for a host target with
    CuPy arrays: kernels never copy device arrays to the host.
    """
    on_gpu = xp.__name__ == "cupy"
    if target is None:
        return "cuda" if on_gpu else "cpu"
    if target not in CALL_TARGETS:
        raise ValueError(f"target must be one of {CALL_TARGETS} or None, not {target!r}")
    if on_gpu and target != "cuda":
        raise TypeError(
            f"target={target!r} runs on the host but the arrays are CuPy arrays; "
            "kernels never copy device arrays to the host: pass NumPy arrays or target='cuda'"
        )
    return target
