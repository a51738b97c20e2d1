"""Robust statistics of frame stacks: per-frame quantiles and per-pixel trimmed means.

Two reductions that frame calibration (:mod:`gpu2mass.frames`) runs on every frame of a
scan: the quantiles of each frame's usable pixels (sky level, noise) and the trimmed mean of
each pixel over a block of frames (the sky-illumination pattern). Both are sorts at heart:

- ``frame_quantiles`` sorts each frame through the array namespace
  (:mod:`gpu2mass.kernels.reference.robust`) on every target: NumPy's vectorised sort of a
  (273, 65536) float32 stack takes 0.19 s on one core for three quantiles, four times less
  than a Numba quickselect we measured; on CuPy arrays it is CuPy's device sort (DESIGN.md
  section 4: library operations CuPy provides go through the namespace).
- ``trimmed_mean`` on ``"cpu"`` (NumPy arrays, the default for them) is the Numba
  ``prange`` driver of :mod:`gpu2mass.kernels.cpu.robust` (each pixel's ≤ 42 values ranked
  by counting: 0.039 s per 42-frame block of 256 × 256 pixels on one thread, about NumPy's
  sort along the frame axis plus the sums, and parallel over rows); on ``"cuda"`` and
  ``"reference"`` the namespace sort.

All give the same numbers: quantiles interpolate linearly between order statistics exactly
like ``numpy.quantile``; the trimmed mean drops ``floor(trim · count)`` values from each end
of each pixel's usable values. Agreement to float32 rounding of the sums (tests: rtol 1e-6).
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import CALL_TARGETS, resolve_target

from gpu2mass.backend import get_namespace

__all__ = ["ROBUST_TARGETS", "frame_quantiles", "trimmed_mean"]

#: Values of the ``target`` keyword (``None`` picks from the arrays' namespace).
ROBUST_TARGETS = CALL_TARGETS


def frame_quantiles(values, usable, qs, *, target=None):
    """Quantiles of each frame's usable pixels.

    Parameters
    ----------
    values
        float (n, ...) per frame, any trailing shape (flattened per frame).
    usable
        bool, same shape: True = use the value.
    qs
        sequence of quantiles in [0, 1].

    Returns
    -------
    (len(qs), n) float64 in the namespace of ``values``; NaN for a frame with no usable
    value (the caller decides whether that is an error).
    """
    xp = get_namespace(values, usable)
    target = resolve_target(xp, target)
    n = values.shape[0]
    flat = xp.ascontiguousarray(values.reshape(n, -1))
    ok = xp.ascontiguousarray(usable.reshape(n, -1).astype(bool))
    if flat.shape != ok.shape:
        raise ValueError(f"values {values.shape} and usable {usable.shape} must have one shape")
    qs = np.asarray(qs, np.float64).reshape(-1)
    if np.any((qs < 0) | (qs > 1)):
        raise ValueError(f"quantiles must lie in [0, 1], not {qs}")
    from gpu2mass.kernels.reference.robust import frame_quantiles as core

    return core(xp, flat, ok, qs)


def trimmed_mean(stack, usable, trim, *, target=None):
    """Per-pixel mean over axis 0 of the usable values after trimming ``floor(trim · count)``
    of them from each end; 0 where a pixel has no value left.

    ``stack`` float (n, ny, nx), ``usable`` bool (n, ny, nx); ``trim`` in [0, 0.5).
    Returns float32 (ny, nx) in the namespace of ``stack``.
    """
    xp = get_namespace(stack, usable)
    target = resolve_target(xp, target)
    if stack.ndim != 3 or usable.shape != stack.shape:
        raise ValueError(f"stack must be (n, ny, nx) and usable like it, got {stack.shape}, "
                         f"{usable.shape}")
    if not 0.0 <= float(trim) < 0.5:
        raise ValueError(f"trim must lie in [0, 0.5), not {trim!r}")
    if target == "cpu":
        from gpu2mass.kernels.cpu.robust import trimmed_mean as core

        return core(np.ascontiguousarray(stack, dtype=np.float32),
                    np.ascontiguousarray(usable, dtype=bool), float(trim))
    from gpu2mass.kernels.reference.robust import trimmed_mean as core

    return core(xp, stack, usable, float(trim))
