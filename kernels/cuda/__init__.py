"""CUDA kernels (Numba) that call the scalar math as device functions.

They take validated device arrays (CuPy or Numba, via ``__cuda_array_interface__``); the
public functions of :mod:`gpu2mass.kernels` check inputs and dispatch here. Importing a
module of this package imports ``numba.cuda``; kernels are compiled on their first launch.
With ``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported they run in Numba's CUDA
simulator (as Python, slowly: tiny inputs only). Modules: :mod:`.psf` (Moffat stamps and
the atomic scatter-add); ``_primitives`` (CUDA forms of scalar primitives).
"""

__all__: list[str] = []
