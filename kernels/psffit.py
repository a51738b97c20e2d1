"""Batched PSF fitting of blended point sources on stacks of frames (PROPHOT, facts sheet 3.3).

Public function -> dispatcher -> core (STYLE.md habit 1). :func:`fit_psf_groups` checks
its inputs, takes the array namespace from them (:func:`gpu2mass.backend.get_namespace`)
and hands plain arrays to one core:

``"cpu"``
    NumPy arrays (the default for them): a Numba ``prange`` driver over groups,
    :mod:`gpu2mass.kernels.cpu.psffit`.
``"cuda"``
    CuPy arrays (the default for them): a Numba CUDA kernel, one group per thread block,
    on CuPy's current stream, :mod:`gpu2mass.kernels.cuda.psffit`. Forced with NumPy arrays
    (tests, the CUDA simulator) the inputs are copied to the device and the results back.
``"reference"``
    NumPy arrays only: :mod:`gpu2mass.kernels.reference.psffit` (slow, NumPy linear
    algebra, the same schedule).

The model, the Levenberg-Marquardt schedule and the status bits are described in
:mod:`gpu2mass.kernels.scalar.psffit`. In short: per group, the flux and common-coordinate
position (u, v) of up to 7 sources are fitted simultaneously to every pixel of every frame
with weight > 0, the frames' affine maps (u, v) -> stamp pixel held fixed; the model pixels
are the pixel-integrated Moffat of each frame; derivatives are analytic.

Agreement between targets (``tests/test_kernels_psffit*.py``): CPU, CUDA and reference
compute in float64 and follow the same schedule; they differ only in summation order (and
FMA contraction), so their solutions agree to far better than float32 rounding of the
data: the tests hold parameters to ``PARITY_RTOL`` relative (flux) and ``PARITY_ATOL_POS``
absolute (u, v) and errors and chi2 to ``PARITY_RTOL``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gpu2mass.kernels._targets import CALL_TARGETS, resolve_target
from gpu2mass.kernels.scalar.moffat import PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W
from gpu2mass.kernels.scalar.psffit import MAX_SOURCES, STATUS_BITS

from gpu2mass.backend import get_namespace

__all__ = [
    "PARITY_ATOL_POS",
    "PARITY_RTOL",
    "PSFFIT_TARGETS",
    "STATUS_BITS",
    "PsfFitResult",
    "fit_psf_groups",
]

#: Values of the ``target`` keyword (``None`` picks from the arrays' namespace).
PSFFIT_TARGETS = CALL_TARGETS
#: Relative agreement of fluxes, errors and chi2 between targets (tests hold it).
PARITY_RTOL = 1e-6
#: Absolute agreement of fitted u, v between targets, in (u, v) units.
PARITY_ATOL_POS = 1e-6


@dataclass(frozen=True)
class PsfFitResult:
    """Fitted parameters of every group, in the namespace of the inputs (NumPy or CuPy).

    Attributes
    ----------
    params
        float64 (G, K, 3): fitted flux (common flux unit: frame DN / flux_scale), u, v of
        each source slot; NaN for unused slots (k >= nsrc[g]).
    errors
        float64 (G, K, 3): 1-sigma errors, square roots of the diagonal of the inverse of
        the weighted normal matrix J^T W J at the solution (marginal errors: correlations
        between blended sources included). NaN for unused slots, for parameters that no
        pixel constrains and when the matrix is singular.
    chi2
        float64 (G, K): 2MASS psfchi, sum of w (data - model)^2 over the used pixels within
        ``chi_radius`` stamp pixels of the source (in every frame), divided by
        (npix - 3). NaN when npix < 4 or for unused slots.
    npix
        int32 (G, K): number of those pixels.
    niter
        int32 (G,): trial evaluations made after the one at the initial parameters.
    status
        int32 (G, K): bit flags (:data:`STATUS_BITS`, documented in
        :mod:`gpu2mass.kernels.scalar.psffit`): 1 not converged and 2 singular normal matrix
        (set on every used source of the group), 4 flux <= 0, 8 held at the
        ``max_shift`` bound, 16 no data (too few pixels, or an unconstrained parameter). 0 for
        unused slots.
    """

    params: Any
    errors: Any
    chi2: Any
    npix: Any
    niter: Any
    status: Any


def _cupy_stream():
    import cupy
    from numba import cuda

    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


def _as(xp, name, value, dtype, shape):
    a = xp.ascontiguousarray(xp.asarray(value, dtype=dtype))
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a


def fit_psf_groups(stamps, weights, frame_maps, psf_params, flux_scale, init, nsrc, *,
                   max_iter: int = 20, tol: float = 1e-3, chi_radius: float = 2.0,
                   max_shift: float = 2.0, target: str | None = None) -> PsfFitResult:
    """Fit flux and position of groups of blended point sources on all their frames at once.

    G groups, F frames per group (slots; absent frames have zero weights), S_y x S_x stamps,
    K source slots per group (K <= 7). Stamp pixel centres are at integer coordinates.

    Parameters
    ----------
    stamps
        float32 (G, F, S_y, S_x): background-subtracted frame pixels around group g in frame
        f, DN, indexed [g, f, y, x].
    weights
        float32 (G, F, S_y, S_x): inverse variance of each pixel (DN^-2); pixels whose
        weight is not > 0 (0 = masked, outside the data region, frame absent; also NaN or
        negative) or whose data are not finite are not used. The caller sets the data region
        (2MASS: pixels within 2 camera pixels of any source of the group).
    frame_maps
        float64 (G, F, 2, 3): affine map from the group's common coordinates (u, v) to stamp
        pixel coordinates, ``x = M[0,0] + M[0,1] u + M[0,2] v``, ``y = M[1,0] + M[1,1] u +
        M[1,2] v``; held fixed.
    psf_params
        float64 (G, F, 2): Moffat alpha (stamp pixels, > 0) and beta (> 1) of each frame's
        PSF; checked only for frames with a used pixel.
    flux_scale
        float64 (G, F): throughput of frame f relative to the common flux unit (frame flux
        in DN = flux_scale x flux).
    init
        float64 (G, K, 3): initial flux, u, v of each slot (finite for used slots).
    nsrc
        int (G,): number of used slots, 0 <= nsrc <= K; slots [0, nsrc) are fitted.
    max_iter
        Most trial evaluations per group after the initial one (>= 0).
    tol
        Convergence: every Gauss-Newton step component below ``tol`` times the parameter's
        conditional error 1/sqrt(A_ii) (> 0).
    chi_radius
        Radius (stamp pixels) around each source of the pixels of its psfchi (2MASS: 2
        camera pixels).
    max_shift
        Bound of the fitted positions: each source's (u, v) is kept within this distance
        (in (u, v) units) of its initial (u, v), and flagged (8) when held at the bound
        (the role of photutils' ``xy_bounds``).
    target
        ``"cpu"``, ``"cuda"``, ``"reference"`` or None (from the arrays' namespace).

    Returns
    -------
    PsfFitResult
        In the inputs' namespace (NumPy when ``target="cuda"`` was forced on NumPy arrays).

    Raises
    ------
    ValueError
        Shapes that do not match, K > 7, nsrc out of range, non-finite maps, scales or
        initial values of used slots, bad PSF parameters of a used frame, bad keywords.
    TypeError
        Host and device arrays mixed, or a host-only target with CuPy arrays.
    """
    xp = get_namespace(stamps, weights, frame_maps, psf_params, flux_scale, init, nsrc)
    tgt = resolve_target(xp, target)
    stamps = xp.ascontiguousarray(xp.asarray(stamps, dtype=xp.float32))
    if stamps.ndim != 4:
        raise ValueError(f"stamps must be (G, F, S_y, S_x), got shape {stamps.shape}")
    g, f = stamps.shape[:2]
    weights = _as(xp, "weights", weights, xp.float32, stamps.shape)
    maps = _as(xp, "frame_maps", frame_maps, xp.float64, (g, f, 2, 3))
    psf = _as(xp, "psf_params", psf_params, xp.float64, (g, f, 2))
    fscale = _as(xp, "flux_scale", flux_scale, xp.float64, (g, f))
    init = xp.ascontiguousarray(xp.asarray(init, dtype=xp.float64))
    if init.ndim != 3 or init.shape[0] != g or init.shape[2] != 3:
        raise ValueError(f"init must be (G, K, 3) with G = {g}, got shape {init.shape}")
    k = init.shape[1]
    if not 1 <= k <= MAX_SOURCES:
        raise ValueError(f"init must have 1 to {MAX_SOURCES} source slots, got {k}")
    nsrc_in = xp.asarray(nsrc)
    if nsrc_in.shape != (g,) or (nsrc_in.size and nsrc_in.dtype.kind not in "iu"):
        raise ValueError(f"nsrc must be an integer array of shape ({g},), got "
                         f"{nsrc_in.dtype} {nsrc_in.shape}")
    nsrc = xp.ascontiguousarray(nsrc_in.astype(xp.int32))
    if g and bool(((nsrc < 0) | (nsrc > k)).any()):
        raise ValueError(f"nsrc must be in [0, {k}]")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, not {max_iter!r}")
    for name, value in (("tol", tol), ("chi_radius", chi_radius), ("max_shift", max_shift)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, not {value!r}")
    if g:
        used = xp.arange(k)[None, :] < nsrc[:, None]
        if not bool(xp.isfinite(init[used]).all()):
            raise ValueError("init must be finite for the used source slots")
        frame_used = (weights > 0).any(axis=(2, 3))
        if not bool(xp.isfinite(maps).all() & xp.isfinite(fscale).all()):
            raise ValueError("frame_maps and flux_scale must be finite")
        a, b = psf[..., 0], psf[..., 1]
        good = xp.isfinite(a) & xp.isfinite(b) & (a > 0) & (b > 1)
        if not bool((good | ~frame_used).all()):
            raise ValueError("psf_params must have alpha > 0 and beta > 1 (finite) for every "
                             "frame with a used pixel")
    args = (stamps, weights, maps, psf, fscale, init, nsrc, int(max_iter), float(tol),
            float(chi_radius), float(max_shift))
    if tgt == "reference":
        from gpu2mass.kernels.reference.psffit import fit_psf_groups as core

        return PsfFitResult(*core(*args))
    if tgt == "cpu":
        from gpu2mass.kernels.cpu.psffit import fit_psf_groups as core

        return PsfFitResult(*core(*args, PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W))
    from gpu2mass.kernels.cuda.psffit import fit_psf_groups as core
    from numba import cuda

    shapes = [((g, k, 3), np.float64), ((g, k, 3), np.float64), ((g, k), np.float64),
              ((g, k), np.int32), ((g,), np.int32), ((g, k), np.int32)]
    if xp.__name__ == "cupy":
        outs = [xp.empty(s, dtype=d) for s, d in shapes]
        views = [cuda.as_cuda_array(a, sync=False) for a in (*args[:7], *outs)]
        core(*views[:7], *args[7:], *views[7:], stream=_cupy_stream())
        return PsfFitResult(*outs)
    d_in = [cuda.to_device(a) for a in args[:7]]
    d_out = [cuda.device_array(s, dtype=d) for s, d in shapes]
    core(*d_in, *args[7:], *d_out)
    return PsfFitResult(*(a.copy_to_host() for a in d_out))
