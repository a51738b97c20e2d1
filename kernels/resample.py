"""Resample frames onto an Atlas grid: inverse cubic mapping, bilinear kernel, Jacobian.

Public function -> dispatcher -> core (STYLE.md habit 1). :func:`resample_frames` checks
its inputs, takes the array namespace from them (:func:`gpu2mass.backend.get_namespace`)
and hands plain arrays to one core:

``"cpu"``
    NumPy arrays (the default for them): a Numba ``prange`` driver,
    :mod:`gpu2mass.kernels.cpu.resample`.
``"cuda"``
    CuPy arrays (the default for them): a Numba CUDA kernel on CuPy's current stream,
    :mod:`gpu2mass.kernels.cuda.resample`. Forced with NumPy arrays (tests, the CUDA
    simulator) the inputs are copied to the device and the results back.
``"reference"``
    NumPy arrays only: :mod:`gpu2mass.kernels.reference.resample`.

The per-pixel math is :func:`gpu2mass.kernels.scalar.resample.resample_pixel`: each output
pixel's centre is mapped into the frame through a cubic fitted per frame, the frame is
interpolated bilinearly (masked pixels dropped, weights renormalised) and multiplied by the
Jacobian of the mapping so that the result is flux-preserving. Work is in float64, results
are float32; CPU, CUDA and reference agree to float32 rounding (the tests hold them to
rtol 1e-5 with an absolute floor of 1e-6 of the largest value).
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import CALL_TARGETS, resolve_target

from gpu2mass.backend import get_namespace

__all__ = ["RESAMPLE_TARGETS", "resample_frames"]

#: Values of the ``target`` keyword (``None`` picks from the arrays' namespace).
RESAMPLE_TARGETS = CALL_TARGETS


def _cupy_stream():
    import cupy
    from numba import cuda

    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


def resample_frames(frames, mask, coef, norm, boxes, *, shape, min_weight=0.5, fill_outside=True,
                    target=None):
    """Resample each frame onto one output grid, separately (no combination).

    Parameters
    ----------
    frames
        float32 (n, ny, nx): frame surface brightness, DN per frame pixel, [frame, y, x].
    mask
        bool or uint8 (ny, nx) or (n, ny, nx): True/nonzero = bad pixel, never used.
    coef
        float64 (n, 2, 10): per frame, the cubic (terms
        :data:`~gpu2mass.kernels.scalar.resample.POLY_TERMS`) giving frame x (axis 0) and
        y (axis 1), 0-based pixels, from normalised output coordinates ``s, t``.
    norm
        float64 (n, 3): ``(X0, Y0, q)``; ``s = (X − X0) q``, ``t = (Y − Y0) q`` with (X, Y)
        the 0-based output pixel (column, row).
    boxes
        int64 (n, 4): ``(row0, row1, col0, col1)``, the output pixels to evaluate per frame
        (half-open; everything else is NaN).
    shape
        (H, W) of the output grid.
    min_weight
        Least fraction in (0, 1] of the bilinear kernel on good pixels for a contribution.
    fill_outside
        True: pixels outside a frame's box are NaN. False: they are left unwritten (any
        value; for callers that read only within the boxes, like
        :func:`gpu2mass.kernels.coadd.combine_frames`: half the memory traffic).
    target
        ``"cpu"``, ``"cuda"``, ``"reference"`` or None (from the arrays' namespace).

    Returns
    -------
    values, var_factor
        float32 (n, H, W), same namespace as the input: surface brightness in DN per output
        pixel (sums over a source give its frame flux in DN), and the variance of each value
        in units of the frame's per-pixel variance (``J² Σw²/(Σw)²``). NaN where the frame
        does not contribute.
    """
    xp = get_namespace(frames, mask, coef, norm, boxes)
    target = resolve_target(xp, target)
    frames = xp.ascontiguousarray(xp.asarray(frames, dtype=xp.float32))
    if frames.ndim != 3:
        raise ValueError(f"frames must be (n, ny, nx), got shape {frames.shape}")
    n = frames.shape[0]
    mask = xp.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[1:] != frames.shape[1:] or mask.shape[0] not in (1, n):
        raise ValueError(f"mask must be (ny, nx) or (n, ny, nx) like frames, got {mask.shape}")
    mask = xp.ascontiguousarray(mask.astype(xp.uint8))
    coef = xp.ascontiguousarray(xp.asarray(coef, dtype=xp.float64))
    norm = xp.ascontiguousarray(xp.asarray(norm, dtype=xp.float64))
    boxes = xp.ascontiguousarray(xp.asarray(boxes, dtype=xp.int64))
    if coef.shape != (n, 2, 10) or norm.shape != (n, 3) or boxes.shape != (n, 4):
        raise ValueError(
            f"coef, norm, boxes must be (n, 2, 10), (n, 3), (n, 4) for n = {n} frames; got "
            f"{coef.shape}, {norm.shape}, {boxes.shape}"
        )
    h, w = (int(v) for v in shape)
    if h < 0 or w < 0:
        raise ValueError(f"shape must be non-negative, got {shape}")
    if not 0.0 < float(min_weight) <= 1.0:
        raise ValueError(f"min_weight must be in (0, 1], not {min_weight!r}")
    if target == "cpu":
        from gpu2mass.kernels.cpu.resample import resample_frames as core

        return core(frames, mask, coef, norm, boxes, (h, w), min_weight, fill_outside)
    if target == "reference":
        from gpu2mass.kernels.reference.resample import resample_frames as core

        return core(frames, mask, coef, norm, boxes, (h, w), min_weight)
    from gpu2mass.kernels.cuda.resample import resample_frames as core
    from numba import cuda

    if xp.__name__ == "cupy":
        out = xp.empty((n, h, w), xp.float32)
        var = xp.empty((n, h, w), xp.float32)
        arrays = (frames, mask, coef, norm, boxes, out, var)
        views = [cuda.as_cuda_array(a, sync=False) for a in arrays]
        core(*views[:5], min_weight, views[5], views[6], fill=fill_outside, stream=_cupy_stream())
        return out, var
    d_in = [cuda.to_device(a) for a in (frames, mask, coef, norm, boxes)]
    d_out = cuda.device_array((n, h, w), np.float32)
    d_var = cuda.device_array((n, h, w), np.float32)
    core(*d_in, min_weight, d_out, d_var, fill=fill_outside)
    return d_out.copy_to_host(), d_var.copy_to_host()
