"""Pixel-integrated Moffat PSF stamps: render them, add them into images.

Public function -> dispatcher -> core (STYLE.md habit 1). The public functions check their
inputs, take the array namespace from them (:func:`gpu2mass.backend.get_namespace`) and
hand plain arrays to one core:

``"cpu"``
    NumPy arrays (the default for them): Numba ``prange`` drivers,
    :mod:`gpu2mass.kernels.cpu.psf`.
``"cuda"``
    CuPy arrays (the default for them): Numba CUDA kernels on CuPy's current stream,
    :mod:`gpu2mass.kernels.cuda.psf`, results as CuPy arrays. Forced with NumPy arrays
    (tests, the CUDA simulator) the inputs are copied to the device and the results back.
``"reference"``
    NumPy arrays only: the slow NumPy versions in :mod:`gpu2mass.kernels.reference.psf`.

The math is in :mod:`gpu2mass.kernels.scalar.moffat`: a Moffat of unit integral,
``I(r) = (beta-1)/(pi alpha^2) (1 + r^2/alpha^2)^-beta``, integrated over each pixel by
Gauss-Legendre quadrature (8 x 8, 4 x 4 or 2 x 2 nodes by distance). Arrays are indexed
[y, x]; pixel centres are at integer coordinates. Values are computed in float64 and stored
as float32. The CPU and CUDA results agree with the reference to float32 rounding (the
tests hold them to rtol 1e-5 and atol 1e-7 x flux).

Inputs that cannot be rendered (half_size not a non-negative integer, beta <= 1, alpha <= 0,
offsets outside [-0.5, 0.5], non-finite values, mismatched lengths) raise ``ValueError``
naming the argument and the first offending source.
"""

from __future__ import annotations

import numbers
import operator
import types

import numpy as np
from gpu2mass.kernels._targets import CALL_TARGETS as TARGETS
from gpu2mass.kernels._targets import resolve_target

from gpu2mass.backend import get_namespace

__all__ = ["TARGETS", "add_stamps", "render_point_sources", "render_psf_stamps"]


# render_point_sources renders and adds this many sources at a time, so that the stamps in
# flight stay small (16384 stamps of half_size 12: 41 MB) whatever the number of sources.
_POINT_SOURCE_CHUNK = 16384
# Source centres must be within this of the origin so that pixel indices fit in int64 with
# room to spare and rint/subtraction stay exact.
_MAX_COORDINATE = 2.0**31


# -- input checks ------------------------------------------------------------------------


def _namespace(*values) -> types.ModuleType:
    # Python and NumPy scalars are allowed beside arrays of either kind (a common alpha or
    # beta); only real arrays decide where the work runs.
    arrays = [v for v in values if not isinstance(v, (numbers.Number, np.generic))]
    return get_namespace(*arrays)




def _check_half_size(half_size) -> int:
    if isinstance(half_size, (bool, np.bool_)):
        raise ValueError(f"half_size must be a non-negative integer, not {half_size!r}")
    try:
        h = operator.index(half_size)
    except TypeError:
        raise ValueError(f"half_size must be a non-negative integer, not {half_size!r}") from None
    if h < 0:
        raise ValueError(f"half_size must be a non-negative integer, not {h}")
    return h


def _require(xp, name: str, values, ok, rule: str) -> None:
    """Raise ValueError naming the first source where ``ok`` is False (NaN counts as bad)."""
    bad = ~ok
    if values.size and bool(xp.any(bad)):
        i = int(xp.nonzero(bad)[0][0])
        raise ValueError(f"{name} must be {rule}; {name}[{i}] = {float(values[i])!r}")


def _sources(xp, n_src: int | None, **named):
    """float64 C-contiguous (N,) arrays; scalars broadcast to N; N from the first array."""
    out = []
    for name, value in named.items():
        a = xp.asarray(value, dtype=xp.float64)
        if a.ndim == 0 and n_src is not None:
            a = xp.broadcast_to(a, (n_src,))
        if a.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D array (one value per source), got shape {a.shape}"
            )
        if n_src is None:
            n_src = a.shape[0]
        if a.shape[0] != n_src:
            raise ValueError(f"{name} has {a.shape[0]} values but there are {n_src} sources")
        out.append(xp.ascontiguousarray(a))
    return out


def _check_profile(xp, flux, alpha, beta) -> None:
    _require(xp, "flux", flux, xp.isfinite(flux), "finite")
    _require(xp, "alpha", alpha, xp.isfinite(alpha) & (alpha > 0), "finite and > 0 (pixels)")
    _require(xp, "beta", beta, xp.isfinite(beta) & (beta > 1), "finite and > 1")


# -- cores per target --------------------------------------------------------------------


def _cupy_stream():
    import cupy
    from numba import cuda

    ptr = cupy.cuda.get_current_stream().ptr
    # 0 is the legacy default stream, which is also Numba's default: launch there as is.
    return cuda.external_stream(ptr) if ptr else 0


def _device_views(arrays):
    from numba import cuda

    # sync=False: the kernels run on CuPy's current stream, after the work that produced
    # these arrays, so waiting for that stream first would only cost time.
    return [cuda.as_cuda_array(a, sync=False) for a in arrays]


def _render_core(target, xp, fx, fy, flux, alpha, beta, h):
    if target == "cpu":
        from gpu2mass.kernels.cpu.psf import render_moffat_stamps

        return render_moffat_stamps(fx, fy, flux, alpha, beta, h)
    if target == "reference":
        from gpu2mass.kernels.reference.psf import render_psf_stamps

        return render_psf_stamps(fx, fy, flux, alpha, beta, half_size=h)
    from gpu2mass.kernels.cuda.psf import render_moffat_stamps

    size = 2 * h + 1
    if xp.__name__ == "cupy":
        out = xp.empty((fx.shape[0], size, size), dtype=xp.float32)
        args = _device_views([fx, fy, flux, alpha, beta, out])
        render_moffat_stamps(*args[:5], h, args[5], stream=_cupy_stream())
        return out
    # NumPy arrays forced onto the CUDA path (tests, the simulator): copy there and back.
    from numba import cuda

    d_in = [cuda.to_device(a) for a in (fx, fy, flux, alpha, beta)]
    d_out = cuda.device_array((fx.shape[0], size, size), dtype=np.float32)
    render_moffat_stamps(*d_in, h, d_out)
    return d_out.copy_to_host()


def _add_core(target, xp, image, stamps, x0, y0) -> None:
    if target == "cpu":
        from gpu2mass.kernels.cpu.psf import add_stamps

        add_stamps(image, stamps, x0, y0)
        return
    if target == "reference":
        from gpu2mass.kernels.reference.psf import add_stamps

        add_stamps(image, stamps, x0, y0)
        return
    from gpu2mass.kernels.cuda.psf import add_stamps

    if xp.__name__ == "cupy":
        add_stamps(*_device_views([image, stamps, x0, y0]), stream=_cupy_stream())
        return
    from numba import cuda

    d_image = cuda.to_device(image)
    add_stamps(d_image, cuda.to_device(stamps), cuda.to_device(x0), cuda.to_device(y0))
    d_image.copy_to_host(image)


# -- public functions --------------------------------------------------------------------


def render_psf_stamps(fx, fy, flux, alpha, beta, *, half_size: int, target: str | None = None):
    """Render pixel-integrated Moffat stamps, one per source.

    Parameters
    ----------
    fx, fy
        float arrays (N,): each source's centre minus the centre of its stamp's central
        pixel, in pixels, each in [-0.5, 0.5].
    flux
        Array (N,) or scalar: total flux of each source (any unit; the stamps carry it).
    alpha
        Array (N,) or scalar: Moffat width in pixels, > 0.
    beta
        Array (N,) or scalar: Moffat index, > 1.
    half_size
        Integer h >= 0: stamps are (2h+1) x (2h+1) pixels.
    target
        ``None`` (NumPy arrays: ``"cpu"``, CuPy arrays: ``"cuda"``), or ``"cpu"``,
        ``"cuda"``, ``"reference"`` to force a path (see the module docstring).

    Returns
    -------
    stamps
        float32 array (N, 2h+1, 2h+1) in the inputs' namespace (NumPy or CuPy; NumPy when
        ``target="cuda"`` was forced on NumPy inputs). ``stamps[k, a, b]`` is ``flux[k]``
        times the integral of the unit-flux Moffat over the pixel at (y = a-h, x = b-h)
        relative to the central pixel. N = 0 gives an empty (0, 2h+1, 2h+1) array.

    Raises
    ------
    ValueError
        Bad half_size, beta <= 1, alpha <= 0, offsets outside [-0.5, 0.5], non-finite
        values, or arrays of different lengths.
    TypeError
        Host and device arrays mixed, or a host-only target asked for with CuPy arrays.
    """
    h = _check_half_size(half_size)
    xp = _namespace(fx, fy, flux, alpha, beta)
    tgt = resolve_target(xp, target)
    fx, fy = _sources(xp, None, fx=fx, fy=fy)
    flux, alpha, beta = _sources(xp, fx.shape[0], flux=flux, alpha=alpha, beta=beta)
    for name, off in (("fx", fx), ("fy", fy)):
        _require(xp, name, off, xp.abs(off) <= 0.5, "in [-0.5, 0.5] (pixels)")
    _check_profile(xp, flux, alpha, beta)
    return _render_core(tgt, xp, fx, fy, flux, alpha, beta, h)


def add_stamps(image, stamps, x0, y0, *, target: str | None = None) -> None:
    """Add stamps into an image, in place, clipping them at the image edges.

    Parameters
    ----------
    image
        float32 array (ny, nx), C-contiguous; modified in place.
    stamps
        float32 array (N, sy, sx) (any other float dtype is converted).
    x0, y0
        Integer arrays (N,): image column and row where each stamp's element [0, 0] lands.
        Stamps may lie partly or wholly outside the image; what falls outside is dropped.
    target
        As for :func:`render_psf_stamps`.

    Notes
    -----
    The CPU and reference paths add stamps in order, so results are reproducible bit for
    bit; the CUDA path uses atomic float32 additions, whose order (and so the last bits of
    pixels where stamps overlap) may vary from run to run.
    """
    xp = _namespace(image, stamps, x0, y0)
    tgt = resolve_target(xp, target)
    if not hasattr(image, "flags"):
        raise ValueError(
            f"image must be a float32 array, modified in place; got {type(image).__name__}"
        )
    if image.ndim != 2 or image.dtype != xp.float32 or not image.flags.c_contiguous:
        raise ValueError(
            "image must be a C-contiguous float32 2-D array (it is modified in place), got "
            f"{image.dtype} of shape {image.shape}"
        )
    stamps = xp.ascontiguousarray(xp.asarray(stamps, dtype=xp.float32))
    if stamps.ndim != 3:
        raise ValueError(f"stamps must be a 3-D array (N, sy, sx), got shape {stamps.shape}")
    origins = []
    for name, value in (("x0", x0), ("y0", y0)):
        a = xp.asarray(value)
        if a.ndim != 1 or a.shape[0] != stamps.shape[0]:
            raise ValueError(
                f"{name} must be 1-D with one entry per stamp ({stamps.shape[0]}), "
                f"got shape {a.shape}"
            )
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integers (pixel indices), got {a.dtype}")
        origins.append(xp.ascontiguousarray(a.astype(xp.int64, copy=False)))
    _add_core(tgt, xp, image, stamps, origins[0], origins[1])


def render_point_sources(
    shape, x, y, flux, alpha, beta, *, half_size: int, target: str | None = None
):
    """Render point sources (Moffat PSFs) into a new image.

    Each source is rendered on a (2h+1) x (2h+1) stamp centred on the pixel nearest to it
    (``rint`` of its coordinates) and added into the image, clipped at its edges; light
    beyond the stamp is not rendered. Sources whose stamp misses the image cost nothing.

    Parameters
    ----------
    shape
        (ny, nx) of the image.
    x, y
        float arrays (N,): source centres in pixel coordinates, 0-based, pixel centres at
        integers (x along a row, y down the columns), finite.
    flux, alpha, beta
        As for :func:`render_psf_stamps` (arrays (N,) or scalars).
    half_size
        Integer h >= 0, the stamp half size in pixels.
    target
        As for :func:`render_psf_stamps`.

    Returns
    -------
    image
        float32 array ``shape`` in the inputs' namespace (NumPy or CuPy).
    """
    h = _check_half_size(half_size)
    try:
        ny, nx = (operator.index(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"shape must be two non-negative integers (ny, nx), not {shape!r}"
        ) from None
    if ny < 0 or nx < 0:
        raise ValueError(f"shape must be two non-negative integers (ny, nx), not {shape!r}")
    xp = _namespace(x, y, flux, alpha, beta)
    tgt = resolve_target(xp, target)
    x, y = _sources(xp, None, x=x, y=y)
    flux, alpha, beta = _sources(xp, x.shape[0], flux=flux, alpha=alpha, beta=beta)
    for name, pos in (("x", x), ("y", y)):
        _require(
            xp,
            name,
            pos,
            xp.abs(pos) < _MAX_COORDINATE,
            f"finite and within +-{_MAX_COORDINATE:.0f} px",
        )
    _check_profile(xp, flux, alpha, beta)

    ix = xp.rint(x)
    iy = xp.rint(y)
    fx = x - ix  # exact, and in [-0.5, 0.5] (rint rounds halves to even)
    fy = y - iy
    x0 = ix.astype(xp.int64) - h
    y0 = iy.astype(xp.int64) - h
    size = 2 * h + 1
    seen = (x0 < nx) & (x0 + size > 0) & (y0 < ny) & (y0 + size > 0)
    if not bool(xp.all(seen)):
        keep = xp.nonzero(seen)[0]
        fx, fy, flux, alpha, beta, x0, y0 = (a[keep] for a in (fx, fy, flux, alpha, beta, x0, y0))
    image = xp.zeros((ny, nx), dtype=xp.float32)
    for start in range(0, fx.shape[0], _POINT_SOURCE_CHUNK):
        part = slice(start, start + _POINT_SOURCE_CHUNK)
        stamps = _render_core(tgt, xp, fx[part], fy[part], flux[part], alpha[part], beta[part], h)
        _add_core(tgt, xp, image, stamps, x0[part], y0[part])
    return image
