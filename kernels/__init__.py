"""gpu2mass compute kernels: scalar math written once, compiled for the CPU and for CUDA.

Layout (DESIGN.md sections 2 and 4):

- :mod:`gpu2mass.kernels.scalar`: per-pixel and per-source math as plain Python scalar
  functions, compiled per target on first use by the private ``_targets`` mechanism.
- :mod:`gpu2mass.kernels.cpu`: ``numba.prange`` drivers calling the scalars (``njit``).
- :mod:`gpu2mass.kernels.cuda`: ``numba.cuda`` kernels calling the scalars (device
  functions); under ``NUMBA_ENABLE_CUDASIM=1`` they run in Numba's simulator.
- :mod:`gpu2mass.kernels.reference`: slow NumPy versions the fast ones are tested against.

Public functions, re-exported here, dispatch on the arrays they get (NumPy: CPU, CuPy: CUDA;
``target=`` forces a path): :func:`render_psf_stamps`, :func:`add_stamps`,
:func:`render_point_sources` (from :mod:`gpu2mass.kernels.psf`).

Importing this package is cheap: it imports neither Numba nor ``numba.cuda`` and compiles
nothing. The first call on a target compiles what it needs (Numba, on this project's CI
machine: about 4 s for the CPU stamp renderer, 1 s for the CPU scatter-add) and keeps it for
the life of the process; nothing is cached on disk.
"""

from gpu2mass.kernels.calibrate import calibrate_frames
from gpu2mass.kernels.detect import find_peaks, measure_sources
from gpu2mass.kernels.psf import TARGETS, add_stamps, render_point_sources, render_psf_stamps
from gpu2mass.kernels.resample import resample_frames

__all__ = ["TARGETS", "add_stamps", "calibrate_frames", "render_point_sources", "render_psf_stamps"]
__all__ += ["find_peaks", "measure_sources"]
__all__ += ["resample_frames"]
