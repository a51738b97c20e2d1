"""Coadd resampled frames into one Atlas Image pixel grid, rejecting single-frame outliers.

Public function -> dispatcher -> core (STYLE.md habit 1), like
:mod:`gpu2mass.kernels.resample`: ``"cpu"`` (Numba ``prange`` over rows,
:mod:`gpu2mass.kernels.cpu.coadd`), ``"cuda"`` (one thread per pixel,
:mod:`gpu2mass.kernels.cuda.coadd`), ``"reference"`` (NumPy,
:mod:`gpu2mass.kernels.reference.coadd`). The per-pixel math, including the rejection rule,
is :mod:`gpu2mass.kernels.scalar.coadd` (two passes: find each pixel's outlier frame, then
combine without the outliers found around each pixel). Work in float64, results float32;
the three agree to float32 rounding (tests: rtol 1e-5; counts and rejections exactly, away
from ties at the threshold).
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import CALL_TARGETS, resolve_target

from gpu2mass.backend import get_namespace

__all__ = ["COADD_TARGETS", "combine_frames"]

#: Values of the ``target`` keyword (``None`` picks from the arrays' namespace).
COADD_TARGETS = CALL_TARGETS


def combine_frames(vals, vfac, offsets, weights, boxes=None, *, reject_sigma=5.0,
                   reject_fraction=1.0, min_frames=2, grow=1, target=None):
    """Weighted mean of resampled frames per output pixel, single-frame outliers left out.

    Parameters
    ----------
    vals, vfac
        float32 (n, H, W): resampled frames (DN per output pixel; NaN where a frame does not
        contribute) and their variance factors, as returned by
        :func:`gpu2mass.kernels.resample.resample_frames`.
    offsets
        float (n,): background offset of each frame, DN per output pixel (subtracted).
    weights
        float (n,): weight of each frame, 1/σ² with σ its per-pixel noise (DN), > 0.
    boxes
        int (n, 4), optional: ``(row0, row1, col0, col1)`` of each frame (half-open), the
        boxes given to the resampling; outside it a frame is not read (its values there may
        be anything). None: the whole grid.
    reject_sigma, reject_fraction, min_frames, grow
        Outlier rejection (:mod:`gpu2mass.kernels.scalar.coadd`): a frame that is the
        outlier at a pixel is left out within ``grow`` pixels of it; ``reject_sigma = 0``
        turns it off.
    target
        ``"cpu"``, ``"cuda"``, ``"reference"`` or None (from the arrays' namespace).

    Returns
    -------
    data, sigma, count, dropped
        (H, W), same namespace as ``vals``: mean (float32, NaN where nothing is left), its
        noise (float32, DN), frames kept (int32), contributing frames left out (uint8).
    """
    xp = get_namespace(vals, vfac)
    target = resolve_target(xp, target)
    vals = xp.ascontiguousarray(xp.asarray(vals, dtype=xp.float32))
    vfac = xp.ascontiguousarray(xp.asarray(vfac, dtype=xp.float32))
    if vals.ndim != 3 or vfac.shape != vals.shape:
        raise ValueError(f"vals and vfac must be (n, H, W) of one shape, got {vals.shape} "
                         f"and {vfac.shape}")
    n = vals.shape[0]
    offsets = xp.ascontiguousarray(xp.asarray(offsets, dtype=xp.float64))
    weights = xp.ascontiguousarray(xp.asarray(weights, dtype=xp.float64))
    if offsets.shape != (n,) or weights.shape != (n,):
        raise ValueError(f"offsets and weights must be ({n},), got {offsets.shape}, {weights.shape}")
    if boxes is None:
        boxes = xp.asarray(np.tile(np.array([0, vals.shape[1], 0, vals.shape[2]], np.int64), (n, 1)))
    boxes = xp.ascontiguousarray(xp.asarray(boxes, dtype=xp.int64))
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must be ({n}, 4), got {boxes.shape}")
    if not bool(xp.all(weights > 0)):
        raise ValueError("weights must be > 0")
    if reject_sigma < 0 or reject_fraction < 0 or min_frames < 2 or grow < 0:
        raise ValueError("reject_sigma, reject_fraction and grow must be >= 0 and "
                         "min_frames >= 2")
    args = (float(reject_sigma), float(reject_fraction), int(min_frames), int(grow))
    if target == "cpu":
        from gpu2mass.kernels.cpu.coadd import combine_frames as core

        return core(vals, vfac, offsets, weights, boxes, *args)
    if target == "reference":
        from gpu2mass.kernels.reference.coadd import combine_frames as core

        return core(vals, vfac, offsets, weights, boxes, *args)
    from gpu2mass.kernels.cuda.coadd import combine_frames as core
    from numba import cuda

    h, w = vals.shape[1:]
    if xp.__name__ == "cupy":
        from gpu2mass.kernels.resample import _cupy_stream

        outs = (xp.empty((h, w), xp.int32), xp.empty((h, w), xp.float32),
                xp.empty((h, w), xp.float32), xp.empty((h, w), xp.int32),
                xp.empty((h, w), xp.uint8))
        views = [cuda.as_cuda_array(a, sync=False)
                 for a in (vals, vfac, offsets, weights, boxes, *outs)]
        core(*views[:5], *args, *views[5:], stream=_cupy_stream())
        return outs[1:]
    d_in = [cuda.to_device(a) for a in (vals, vfac, offsets, weights, boxes)]
    d_out = [cuda.device_array((h, w), dt)
             for dt in (np.int32, np.float32, np.float32, np.int32, np.uint8)]
    core(*d_in, *args, *d_out)
    return tuple(d.copy_to_host() for d in d_out[1:])
