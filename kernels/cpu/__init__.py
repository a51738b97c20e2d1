"""CPU drivers: ``numba.prange`` loops over sources or pixels that call the scalar math.

They take plain, validated NumPy arrays; the public functions of :mod:`gpu2mass.kernels`
check inputs and dispatch here. Importing a module of this package imports Numba (not
``numba.cuda``); drivers are compiled on their first call. Modules: :mod:`.psf` (Moffat
stamps and the stamp scatter-add); ``_primitives`` (CPU forms of scalar primitives).
"""

__all__: list[str] = []
