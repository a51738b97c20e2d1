"""Single-frame detection kernels: 3 x 3 peak finding and per-candidate measurement.

Public function -> dispatcher -> core (STYLE.md habit 1), like :mod:`gpu2mass.kernels.psf`:

``"cpu"``
    NumPy arrays (their default): Numba ``prange`` drivers, :mod:`gpu2mass.kernels.cpu.detect`.
``"cuda"``
    CuPy arrays (their default): Numba CUDA kernels on CuPy's current stream,
    :mod:`gpu2mass.kernels.cuda.detect`. Forced with NumPy arrays (tests, the simulator)
    the inputs are copied to the device and the results back.
``"reference"``
    NumPy only: :mod:`gpu2mass.kernels.reference.detect`.

The math and the flag bits are in :mod:`gpu2mass.kernels.scalar.detect`. Peak maps are
identical on every target; measurements agree between CPU and CUDA to float64 rounding
(FMA contraction aside) and with the reference to the fit's convergence tolerance (tests:
1e-4 px in position, 1e-6 relative in flux).
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import CALL_TARGETS as TARGETS
from gpu2mass.kernels._targets import resolve_target
from gpu2mass.kernels.scalar.detect import MEASURE_COLUMNS, N_PARAMS
from gpu2mass.kernels.scalar.moffat import PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W

from gpu2mass.backend import get_namespace

__all__ = ["MEASURE_COLUMNS", "TARGETS", "find_peaks", "measure_sources"]





def _stack(xp, name, a, shape=None, dtype=None):
    a = xp.asarray(a)
    if a.ndim != 3 or (shape is not None and a.shape != shape):
        want = shape if shape is not None else "(n, ny, nx)"
        raise ValueError(f"{name} must be a stack of shape {want}, got {a.shape}")
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    return xp.ascontiguousarray(a)


def _per_frame(xp, name, a, n):
    a = xp.asarray(a, dtype=xp.float64)
    if a.ndim == 0:
        a = xp.full((n,), float(a))
    if a.shape != (n,):
        raise ValueError(f"{name} must have one value per frame ({n}), got shape {a.shape}")
    return xp.ascontiguousarray(a)


def _stream_and_views(xp, arrays):
    import cupy
    from numba import cuda

    ptr = cupy.cuda.get_current_stream().ptr
    stream = cuda.external_stream(ptr) if ptr else 0
    # sync=False: the kernels run on CuPy's current stream, after the producers.
    return stream, [cuda.as_cuda_array(a, sync=False) for a in arrays]


def find_peaks(image, mask, threshold, *, target: str | None = None):
    """Candidate peaks: unmasked 3 x 3 local maxima above a per-frame threshold.

    Parameters
    ----------
    image
        (n, ny, nx) real array (usually the matched-filtered frames), compared as float32.
    mask
        (n, ny, nx) array, non-zero = unusable (never a peak).
    threshold
        (n,) or scalar, in the units of ``image``: a peak must exceed it strictly.
    target
        ``None`` (NumPy: ``"cpu"``, CuPy: ``"cuda"``) or one of :data:`TARGETS`.

    Returns
    -------
    peaks
        uint8 (n, ny, nx), 1 at peaks, in the inputs' namespace. Plateaus give one peak
        (the first pixel in raster order); neighbours off the frame are ignored.
    """
    xp = get_namespace(image, mask)
    tgt = resolve_target(xp, target)
    image = _stack(xp, "image", image, dtype=xp.float32)
    mask = _stack(xp, "mask", mask, shape=image.shape, dtype=xp.uint8)
    threshold = _per_frame(xp, "threshold", threshold, image.shape[0])
    if tgt == "cpu":
        from gpu2mass.kernels.cpu.detect import find_peaks as core

        return core(image, mask, threshold)
    if tgt == "reference":
        from gpu2mass.kernels.reference.detect import find_peaks as core

        return core(image, mask, threshold)
    from gpu2mass.kernels.cuda.detect import find_peaks as core
    from numba import cuda

    if xp.__name__ == "cupy":
        out = xp.empty(image.shape, dtype=xp.uint8)
        stream, views = _stream_and_views(xp, [image, mask, threshold, out])
        core(*views, stream=stream)
        return out
    d_out = cuda.device_array(image.shape, dtype=np.uint8)
    core(*(cuda.to_device(a) for a in (image, mask, threshold)), d_out)
    return d_out.copy_to_host()


def measure_sources(data, mask, peaks, frame, y, x, *, noise, alpha, beta, params,
                    target: str | None = None):
    """Measure candidates on calibrated, sky-subtracted frames (facts sheet 3.2 and 3.4).

    Parameters
    ----------
    data
        (n, ny, nx) frames, DN (float32 or float64).
    mask
        (n, ny, nx), non-zero = unusable.
    peaks
        (n, ny, nx) candidate map from :func:`find_peaks` (used for the blend flag).
    frame, y, x
        Integer arrays (N,): frame index and peak pixel of each candidate.
    noise, alpha, beta
        (n,) or scalars: per-frame pixel noise (DN), Moffat width (px) and index of the
        frame's PSF template.
    params
        float64 (N_PARAMS,) laid out as the ``P_*`` indices of
        :mod:`gpu2mass.kernels.scalar.detect` (radii px, saturation DN, gain e-/DN, Tsnr).
    target
        As for :func:`find_peaks`.

    Returns
    -------
    values, flags
        float64 (N, len(MEASURE_COLUMNS)) and int32 (N,), in the inputs' namespace. Rows
        whose flags carry ``REJECT_*`` bits failed a 2MASS acceptance rule.
    """
    xp = get_namespace(data, mask, peaks, frame, y, x)
    tgt = resolve_target(xp, target)
    data = _stack(xp, "data", data)
    if data.dtype not in (xp.float32, xp.float64):
        data = data.astype(xp.float32)
    mask = _stack(xp, "mask", mask, shape=data.shape, dtype=xp.uint8)
    peaks = _stack(xp, "peaks", peaks, shape=data.shape, dtype=xp.uint8)
    n = data.shape[0]
    idx = []
    for name, a, hi in (("frame", frame, n), ("y", y, data.shape[1]), ("x", x, data.shape[2])):
        a = xp.asarray(a)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"{name} must be a 1-D integer array, got {a.dtype} {a.shape}")
        a = xp.ascontiguousarray(a.astype(xp.int64, copy=False))
        if a.size and bool(((a < 0) | (a >= hi)).any()):
            raise ValueError(f"{name} holds indices outside [0, {hi})")
        idx.append(a)
    if not (idx[0].shape == idx[1].shape == idx[2].shape):
        raise ValueError("frame, y and x must have the same length")
    noise, alpha, beta = (_per_frame(xp, nm, v, n)
                          for nm, v in (("noise", noise), ("alpha", alpha), ("beta", beta)))
    params = xp.ascontiguousarray(xp.asarray(params, dtype=xp.float64))
    if params.shape != (N_PARAMS,):
        raise ValueError(f"params must have {N_PARAMS} values, got shape {params.shape}")
    if tgt == "reference":
        from gpu2mass.kernels.reference.detect import measure_sources as core

        return core(data, mask, peaks, *idx, noise, alpha, beta, params)
    rules = [xp.asarray(r) for r in (PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W)]
    if tgt == "cpu":
        from gpu2mass.kernels.cpu.detect import measure_sources as core

        return core(data, mask, peaks, *idx, noise, alpha, beta, params, *rules)
    from gpu2mass.kernels.cuda.detect import measure_sources as core
    from numba import cuda

    n_src = idx[0].shape[0]
    shape = (n_src, len(MEASURE_COLUMNS))
    args = [data, mask, peaks, *idx, noise, alpha, beta, params, *rules]
    if xp.__name__ == "cupy":
        out = xp.empty(shape, dtype=xp.float64)
        flags = xp.empty((n_src,), dtype=xp.int32)
        stream, views = _stream_and_views(xp, [*args, out, flags])
        core(*views, stream=stream)
        return out, flags
    d_out = cuda.device_array(shape, dtype=np.float64)
    d_flags = cuda.device_array((n_src,), dtype=np.int32)
    core(*(cuda.to_device(np.ascontiguousarray(a)) for a in args), d_out, d_flags)
    return d_out.copy_to_host(), d_flags.copy_to_host()
