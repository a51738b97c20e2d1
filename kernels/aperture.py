"""Multi-aperture photometry of many positions on a stack of frames (facts sheet 3.4).

Public function -> dispatcher -> core (STYLE.md habit 1), like :mod:`gpu2mass.kernels.resample`:

``"cpu"``
    NumPy arrays (their default): a Numba ``prange`` driver over positions,
    :mod:`gpu2mass.kernels.cpu.aperture`.
``"cuda"``
    CuPy arrays (their default): a Numba CUDA kernel, one thread per position, on CuPy's
    current stream, :mod:`gpu2mass.kernels.cuda.aperture`. Forced with NumPy arrays (tests,
    the CUDA simulator) the inputs are copied to the device and the results back.
``"reference"``
    NumPy only: :mod:`gpu2mass.kernels.reference.aperture` (photutils' exact overlaps).

The math, the flag bits and the sky estimator are documented in
:mod:`gpu2mass.kernels.scalar.aperture`. CPU and CUDA run the same float64 code (FMA
contraction aside); the reference agrees to 1e-9 relative in areas and fluxes (tests).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gpu2mass.kernels._targets import CALL_TARGETS as TARGETS
from gpu2mass.kernels._targets import resolve_target
from gpu2mass.kernels.scalar.aperture import FLAG_BITS, MASK_SATURATED, MAX_SKY_RADIUS_PX

from gpu2mass.backend import get_namespace

__all__ = ["FLAG_BITS", "MASK_SATURATED", "TARGETS", "AperturePhotometry", "aperture_photometry"]


class AperturePhotometry(NamedTuple):
    """Per-position results of :func:`aperture_photometry`, in the inputs' namespace.

    Attributes
    ----------
    flux
        float64 (M, R): sky-subtracted sums in each aperture, DN (NaN: nothing measured).
    npix
        float64 (M, R): good area inside each aperture, pixels (``pi r**2`` when complete).
    sky
        float64 (M,): sky per pixel, DN (trimmed mean of the annulus).
    sky_sigma
        float64 (M,): sky noise per pixel, DN (half the 15.87–84.13 % quantile distance).
    n_sky
        int32 (M,): usable annulus pixels.
    flags
        int32 (M,): :data:`FLAG_BITS`.
    """

    flux: object
    npix: object
    sky: object
    sky_sigma: object
    n_sky: object
    flags: object


def _stream_and_views(arrays):
    import cupy
    from numba import cuda

    ptr = cupy.cuda.get_current_stream().ptr
    stream = cuda.external_stream(ptr) if ptr else 0
    return stream, [cuda.as_cuda_array(a, sync=False) for a in arrays]


def aperture_photometry(frames, mask, frame_index, x, y, radii_px, sky_inner_px, sky_outer_px,
                        *, sky_trim=0.2, guard_radius_px=2.0, min_sky=20, target=None):
    """Multi-aperture photometry of M positions on a stack of frames, in one call.

    Parameters
    ----------
    frames
        float32 (or float64) (n, ny, nx), DN, [frame, y, x].
    mask
        bool or uint8 (ny, nx) or (n, ny, nx): non-zero = unusable; the value
        :data:`MASK_SATURATED` (bit 2) also marks a saturated pixel (flagged separately).
        Non-finite pixels are treated as masked.
    frame_index
        int (M,): frame of each position.
    x, y
        float64 (M,): 0-based pixel positions (pixel centres at integers).
    radii_px
        (R,) strictly increasing aperture radii, pixels.
    sky_inner_px, sky_outer_px
        Sky annulus (pixel centres with ``inner <= d <= outer``), pixels; outer at most
        :data:`~gpu2mass.kernels.scalar.aperture.MAX_SKY_RADIUS_PX`.
    sky_trim
        Fraction in [0, 0.5) of the annulus values dropped at each end before averaging.
    guard_radius_px
        Radius of the circle whose masked / off-frame pixels set the flags (2MASS: 4").
    min_sky
        Fewer usable annulus pixels set the sky flag.
    target
        ``"cpu"``, ``"cuda"``, ``"reference"`` or None (from the arrays' namespace).

    Returns
    -------
    AperturePhotometry
        ``(flux, npix, sky, sky_sigma, n_sky, flags)``.
    """
    xp = get_namespace(frames, mask, frame_index, x, y)
    tgt = resolve_target(xp, target)
    frames = xp.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (n, ny, nx), got shape {frames.shape}")
    if frames.dtype not in (xp.float32, xp.float64):
        frames = frames.astype(xp.float32)
    frames = xp.ascontiguousarray(frames)
    n = frames.shape[0]
    mask = xp.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[1:] != frames.shape[1:] or mask.shape[0] not in (1, n):
        raise ValueError(f"mask must be (ny, nx) or (n, ny, nx) like frames, got {mask.shape}")
    mask = xp.ascontiguousarray(mask.astype(xp.uint8))
    fi = xp.asarray(frame_index)
    if fi.ndim != 1 or (fi.size and fi.dtype.kind not in "iu"):
        raise ValueError(f"frame_index must be a 1-D integer array, got {fi.dtype} {fi.shape}")
    fi = xp.ascontiguousarray(fi.astype(xp.int64))
    if fi.size and bool(((fi < 0) | (fi >= n)).any()):
        raise ValueError(f"frame_index holds indices outside [0, {n})")
    xs = xp.ascontiguousarray(xp.asarray(x, dtype=xp.float64))
    ys = xp.ascontiguousarray(xp.asarray(y, dtype=xp.float64))
    if xs.shape != fi.shape or ys.shape != fi.shape:
        raise ValueError("frame_index, x and y must have the same length")
    radii_h = np.asarray(radii_px.get() if hasattr(radii_px, "get") else radii_px, np.float64)
    if radii_h.ndim != 1 or radii_h.size == 0 or not np.all(np.isfinite(radii_h)) \
            or radii_h[0] <= 0 or np.any(np.diff(radii_h) <= 0):
        raise ValueError(f"radii_px must be positive and strictly increasing, got {radii_h}")
    r_in, r_out = float(sky_inner_px), float(sky_outer_px)
    if not (0 <= r_in < r_out <= MAX_SKY_RADIUS_PX):
        raise ValueError(f"need 0 <= sky_inner_px < sky_outer_px <= {MAX_SKY_RADIUS_PX}, "
                         f"got {r_in}, {r_out}")
    if not 0.0 <= float(sky_trim) < 0.5:
        raise ValueError(f"sky_trim must be in [0, 0.5), got {sky_trim}")
    if not float(guard_radius_px) > 0:
        raise ValueError(f"guard_radius_px must be > 0, got {guard_radius_px}")
    if int(min_sky) < 0:
        raise ValueError(f"min_sky must be >= 0, got {min_sky}")
    args = (float(r_in), float(r_out), float(guard_radius_px), float(sky_trim), int(min_sky))
    if tgt == "cpu":
        from gpu2mass.kernels.cpu.aperture import aperture_photometry as core

        return AperturePhotometry(*core(frames, mask, fi, xs, ys, radii_h, *args))
    if tgt == "reference":
        from gpu2mass.kernels.reference.aperture import aperture_photometry as core

        return AperturePhotometry(*core(frames, mask, fi, xs, ys, radii_h, *args))
    from gpu2mass.kernels.cuda.aperture import aperture_photometry as core
    from numba import cuda

    m, nr = fi.shape[0], radii_h.size
    if xp.__name__ == "cupy":
        radii = xp.asarray(radii_h)
        outs = [xp.empty((m, nr)), xp.empty((m, nr)), xp.empty(m), xp.empty(m),
                xp.empty(m, xp.int32), xp.empty(m, xp.int32)]
        stream, views = _stream_and_views([frames, mask, fi, xs, ys, radii, *outs])
        core(*views[:6], *args, *views[6:], stream=stream)
        return AperturePhotometry(*outs)
    d_in = [cuda.to_device(a) for a in (frames, mask, fi, xs, ys, radii_h)]
    d_out = [cuda.device_array((m, nr), np.float64), cuda.device_array((m, nr), np.float64),
             cuda.device_array(m, np.float64), cuda.device_array(m, np.float64),
             cuda.device_array(m, np.int32), cuda.device_array(m, np.int32)]
    core(*d_in, *args, *d_out)
    return AperturePhotometry(*(d.copy_to_host() for d in d_out))
