"""The per-scan PSF model from the calibrated frames (2MAPPS SEEMAN, facts sheet 3.2 / 3.3).

:func:`run_psf_model` fits the point-spread function of one band of one scan: a Moffat
profile ``I(r) = (beta-1)/(pi alpha^2) (1 + r^2/alpha^2)^-beta`` integrated over the 2"
camera pixels (the model of :mod:`gpu2mass.kernels.scalar.moffat`), with one index
``beta`` for the whole scan and a core width ``alpha`` (frame pixels) per block of
``block_frames`` frames (2MASS's SEEMAN re-estimated the seeing about every coadd, ~12
frames), interpolated to every frame. The steps, and the decisions this implementation
made where 2MASS is not explicit:

1. **Stars.** Detections of :func:`gpu2mass.framedet.run_frame_detection` with
   ``flags == 0`` (so not saturated, blended, masked-near, fit-failed or edge), aperture
   SNR >= ``min_snr``, detected peak below ``saturation_dn``, 4" flux at most
   ``max_flux_dn``, no other detection of the same frame within ``isolation_arcsec``
   (8"), and a stamp of (2 ``stamp_half_size`` + 1)^2 pixels (11 x 11) wholly on the
   frame with at least half its pixels usable.
2. **Stamps.** Cut on the frames' device (fancy indexing in the frames' namespace); only
   the stamps, their masks and the star list come to the host, where the small fits run.
   Masked or non-finite pixels, and pixels within ``neighbour_mask_arcsec`` of any other
   detection of the frame, get zero weight.
3. **Model of one stamp.** ``F P(x - xc, y - yc; alpha, beta) + B``: flux ``F``, centre
   ``(xc, yc)`` and a local background ``B`` per star (the frames are sky-subtracted; ``B``
   takes up the local residual sky), ``P`` the pixel integral of the unit-flux Moffat. The
   Gauss-Legendre order of each pixel (8, 4 or 2 nodes per axis by distance, as in the
   renderer) is fixed at the star's initial position, so the model is smooth in the
   parameters. Pixel variance ``noise[frame]^2 + max(F P, 0) / gain`` (no Poisson term for
   ``gain_e_per_dn = 0``), from the initial model in the first pass and from the fitted one
   in the second.
4. **Fit (stage 1).** All stars of the scan at once by Levenberg-Marquardt with analytic
   derivatives: four parameters per star, ``alpha`` per block that has stars, ``beta``
   shared by all blocks (the atmosphere changes the width, the index is stable). The
   normal equations are solved by the Schur complement of the 4 x 4 per-star blocks (the
   global system is only (blocks + 1) wide), so the cost is linear in the stars. After
   the first pass, stars whose reduced chi^2 lies more than ``clip_sigma`` robust sigmas
   (1.4826 MAD) above the median, whose centre moved more than ``max_shift_px``, or whose
   flux is not positive are dropped (cosmic rays, undetected neighbours, persistence,
   saturated cores that framedet did not flag), the weights are recomputed from the
   model, and the fit is repeated. With fewer than ``beta_min_stars`` stars in the scan
   ``beta`` is held at ``beta_init`` (:data:`FLAG_BETA_FIXED`).
5. **Sparse blocks (stage 2).** A block with fewer than ``min_stars`` stars widens its
   frame range by one frame on each side at a time (neighbours' stars, nearest first)
   until it has them, and its ``alpha`` is refitted with ``beta`` fixed
   (:data:`FLAG_BORROWED`; :data:`FLAG_WHOLE_SCAN` when even the whole scan has too few).
6. **Per frame.** ``alpha`` is interpolated linearly between the block centres (the
   middle frame of each nominal block) and held constant beyond the first and last
   centre: continuous in time, exact for a seeing that drifts linearly, and a step in the
   seeing is followed within one block (the block that holds the step takes the width of
   most of its stars, the others failing the chi^2 clip; frames one block or more from
   the step have their own width, ``tests/test_psfmodel.py``). Optical FWHM ``2 alpha sqrt(2^(1/beta) - 1)``
   times the pixel scale; the FWHM as the 2" pixels sample it from
   :func:`gpu2mass.sim.psf.sampled_fwhm_table` (the simulator's definition of its truth
   ``fwhm_arcsec``: the FWHM of the pixel-convolved profile through the centre).

Quality numbers per block: ``residual_rms``, the fit's residual relative to the star
signal, ``sqrt(sum (d - m)^2) / sqrt(sum (m - B)^2)`` over the used pixels of the block's
stars (noise included: about ``noise_rms``, its expectation from the pixel variances,
when the model fits), and ``chi2`` (reduced).

Devices: ``frames`` and ``mask`` NumPy or CuPy (not mixed); the result is on the host.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from gpu2mass.backend import get_namespace, to_host
from gpu2mass.errors import ConfigError, InputError, StepError
from gpu2mass.kernels.psf import render_psf_stamps
from gpu2mass.kernels.scalar.moffat import (
    GL_ORDER_FAR,
    GL_ORDER_MID,
    GL_ORDER_NEAR,
    GL_RADIUS_MID,
    GL_RADIUS_NEAR,
    PIXEL_RULE_DX,
    PIXEL_RULE_DY,
    PIXEL_RULE_W,
)

__all__ = [
    "FLAG_AT_BOUND",
    "FLAG_BETA_FIXED",
    "FLAG_BITS",
    "FLAG_BORROWED",
    "FLAG_NOT_CONVERGED",
    "FLAG_WHOLE_SCAN",
    "PsfModel",
    "PsfModelConfig",
    "PsfModelWarning",
    "moffat_encircled_energy",
    "moffat_fwhm_px",
    "psf_stamp",
    "run_psf_model",
]

#: Per-block flag bits (``PsfModel.flags``).
FLAG_BORROWED = 1
FLAG_WHOLE_SCAN = 2
FLAG_NOT_CONVERGED = 4
FLAG_AT_BOUND = 8
FLAG_BETA_FIXED = 16
FLAG_BITS = {
    FLAG_BORROWED: "fewer than min_stars stars: the block borrowed its neighbours' frames",
    FLAG_WHOLE_SCAN: "fewer than min_stars stars in the whole scan: alpha from all of them",
    FLAG_NOT_CONVERGED: "the fit stopped at max_iter before converging",
    FLAG_AT_BOUND: "alpha (or the scan's beta) ended at a bound of its allowed range",
    FLAG_BETA_FIXED: "fewer than beta_min_stars stars in the scan: beta held at beta_init",
}

_ORDERS = (GL_ORDER_NEAR, GL_ORDER_MID, GL_ORDER_FAR)


class PsfModelWarning(UserWarning):
    """Something a caller should know that does not stop the step."""


@dataclass(frozen=True)
class PsfModelConfig:
    """Configuration of the per-scan PSF model; 2MASS values as defaults where known.

    Attributes
    ----------
    pixel_scale_arcsec
        Camera pixel scale, arcsec/px (2MASS nominal 2.0; measured J 1.9966, H 2.0060,
        Ks 1.9839): converts the fitted ``alpha`` (px) to arcsec. The fit is in pixels.
    block_frames
        Frames per ``alpha`` block (2MASS SEEMAN re-estimated about every 12 frames).
    min_stars
        Least stars for a block's own ``alpha``; fewer borrow neighbouring frames
        (decided 10: the mean of ten SNR >= 50 stars fixes alpha to about 1 %).
    beta_min_stars
        Least stars in the scan to fit ``beta``; fewer hold it at ``beta_init`` (decided 20).
    min_snr
        Least framedet aperture SNR of a PSF star (decided 50, framedet's seeing stars).
    max_stars_per_block
        At most this many stars (the highest SNR) per nominal block, so that dense fields
        cost no more than ~100 stars per block (decided 100: alpha to ~0.3 %).
    saturation_dn
        Stars whose detected peak (DN, sky-subtracted frame) is at or above this are not
        used; ``inf`` relies on framedet's saturation flag (bit 4) alone.
    max_flux_dn
        Largest framedet 4" flux (DN) of a PSF star; ``inf`` (default, as 2MASS: the
        brightest unsaturated stars are the best) keeps all. A star's diffraction spikes
        are part of its PSF in real data, in proportion at every brightness; the simulator
        draws them only for stars brighter than ``gpu2mass.sim.artifacts.SPIKE_LIMIT``,
        and on the tiny night those stars pull ``beta`` 0.02-0.07 low and the 4" encircled
        energy 0.1-0.5 % low, so tests on simulated nights keep them out with this.
    isolation_arcsec
        No other detection of the same frame within this distance (decided 8": beyond it
        a neighbour's core is outside the 4" fit radius of both).
    neighbour_mask_arcsec
        Stamp pixels within this distance of another detection get zero weight (4").
    stamp_half_size
        Stamps are (2 h + 1)^2 frame pixels (decided 5: 11 x 11 px = 22", the core and the
        wing that fixes beta; Moffat beta 2.5 at 2.8" FWHM leaves ~1 % of the light outside).
    gain_e_per_dn
        Detector gain for the stars' Poisson variance, e-/DN; 0 ignores it (per band: the
        caller sets the band's value, e.g. from the night's manifest).
    beta_init
        Starting ``beta`` of the fit and the value held when the scan has too few stars
        (2.5: framedet's template and a typical seeing-limited index).
    fwhm_init_arcsec
        Starting optical FWHM when the detections carry no ``meta["seeing_fwhm"]`` (2.8").
    alpha_min_px, alpha_max_px
        Allowed range of ``alpha``, pixels (0.3-6: FWHM 0.6"-12" at beta 2.5).
    beta_min, beta_max
        Allowed range of ``beta`` (1.2-10).
    max_shift_px
        A star whose fitted centre moves more than this from its detection is dropped.
    clip_sigma
        Reduced-chi^2 outlier threshold, robust sigmas above the median.
    max_passes
        Most outlier-rejection passes of the joint fit (it stops when the star set repeats).
    max_iter
        Levenberg-Marquardt iterations per fit.
    tol
        Convergence: the undamped Gauss-Newton step would lower chi^2 by less than this
        (absolute, in chi^2 units, times the reduced chi^2 where above 1: parameter changes
        far below their errors).
    """

    pixel_scale_arcsec: float = 2.0
    block_frames: int = 12
    min_stars: int = 10
    beta_min_stars: int = 20
    min_snr: float = 50.0
    max_stars_per_block: int = 100
    saturation_dn: float = math.inf
    max_flux_dn: float = math.inf
    isolation_arcsec: float = 8.0
    neighbour_mask_arcsec: float = 4.0
    stamp_half_size: int = 5
    gain_e_per_dn: float = 0.0
    beta_init: float = 2.5
    fwhm_init_arcsec: float = 2.8
    alpha_min_px: float = 0.3
    alpha_max_px: float = 6.0
    beta_min: float = 1.2
    beta_max: float = 10.0
    max_shift_px: float = 1.0
    clip_sigma: float = 5.0
    max_passes: int = 4
    max_iter: int = 200
    tol: float = 1e-3

    def __post_init__(self):
        ints = {"block_frames", "min_stars", "beta_min_stars", "stamp_half_size", "max_iter",
                "max_passes", "max_stars_per_block"}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ints:
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
            elif f.name in ("saturation_dn", "max_flux_dn"):
                ok = isinstance(v, (int, float)) and not math.isnan(v) and v > 0
            elif f.name == "gain_e_per_dn":
                ok = isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
            else:
                ok = isinstance(v, (int, float)) and math.isfinite(v) and v > 0
            if not ok:
                raise ConfigError(f"psfmodel.{f.name} = {v!r} is not valid")
        if self.stamp_half_size < 2:
            raise ConfigError("psfmodel.stamp_half_size must be >= 2 (the 4\" core and a wing)")
        if not self.alpha_min_px < self.alpha_max_px:
            raise ConfigError("psfmodel.alpha_min_px must be < alpha_max_px")
        if not 1.0 < self.beta_min < self.beta_max:
            raise ConfigError("psfmodel.beta_min must be > 1 and < beta_max")
        if not self.beta_min <= self.beta_init <= self.beta_max:
            raise ConfigError("psfmodel.beta_init must lie in [beta_min, beta_max]")


@dataclass(frozen=True)
class PsfModel:
    """The PSF of one band of one scan: a pixel-integrated Moffat per frame.

    Attributes
    ----------
    alpha_px
        float64 (n,): Moffat core width of each frame, frame pixels.
    beta
        float64 (n,): Moffat index (one value per scan, repeated).
    fwhm_arcsec
        float64 (n,): optical FWHM, ``2 alpha sqrt(2^(1/beta) - 1)`` x pixel scale, arcsec.
    sampled_fwhm_arcsec
        float64 (n,): FWHM of the profile as the pixels sample it (pixel response
        included), arcsec; the quantity a pipeline measuring images reports.
    block_start, block_stop
        int64 (m,): each block's nominal frames ``[start, stop)``.
    block_alpha
        float64 (m,): fitted ``alpha`` of each block, px.
    block_nstars
        int64 (m,): stars the block's ``alpha`` rests on (after outlier rejection; for a
        borrowed block those of its widened range).
    residual_rms
        float64 (m,): ``sqrt(sum (d - m)^2) / sqrt(sum (m - B)^2)`` over the used stamp
        pixels of the block's stars: the fit residual relative to the stars' signal.
    noise_rms
        float64 (m,): the same ratio expected from the pixel variances alone (the value
        ``residual_rms`` takes when the model is right).
    chi2
        float64 (m,): reduced chi^2 of the block's stars.
    flags
        int64 (m,): :data:`FLAG_BITS`.
    pixel_scale_arcsec
        The pixel scale used for the arcsec quantities.
    """

    alpha_px: np.ndarray
    beta: np.ndarray
    fwhm_arcsec: np.ndarray
    sampled_fwhm_arcsec: np.ndarray
    block_start: np.ndarray
    block_stop: np.ndarray
    block_alpha: np.ndarray
    block_nstars: np.ndarray
    residual_rms: np.ndarray
    noise_rms: np.ndarray
    chi2: np.ndarray
    flags: np.ndarray
    pixel_scale_arcsec: float

    @property
    def nframes(self) -> int:
        return int(self.alpha_px.shape[0])

    def encircled_energy(self, radius_arcsec: float) -> np.ndarray:
        """(n,) fraction of each frame's PSF light within ``radius_arcsec`` of its centre
        (the optical Moffat, before pixel integration)."""
        return moffat_encircled_energy(radius_arcsec / self.pixel_scale_arcsec,
                                       self.alpha_px, self.beta)


def moffat_fwhm_px(alpha, beta):
    """FWHM of a Moffat (same unit as ``alpha``): ``2 alpha sqrt(2^(1/beta) - 1)``."""
    return 2.0 * np.asarray(alpha, float) * np.sqrt(2.0 ** (1.0 / np.asarray(beta, float)) - 1.0)


def moffat_encircled_energy(radius, alpha, beta):
    """Light fraction of a unit-flux Moffat within ``radius`` (unit of ``alpha``):
    ``1 - (1 + r^2/alpha^2)^(1 - beta)``; broadcasts."""
    r, a, b = (np.asarray(v, float) for v in (radius, alpha, beta))
    return 1.0 - (1.0 + r * r / (a * a)) ** (1.0 - b)


def psf_stamp(model: PsfModel, frame, dx, dy, half_size: int) -> np.ndarray:
    """The model PSF of ``frame`` on a stamp, as fractions of the star's total flux.

    Parameters
    ----------
    model
        A :class:`PsfModel`.
    frame
        Frame index, int or (N,) ints.
    dx, dy
        Source centre minus the centre of the stamp's central pixel, px, in [-0.5, 0.5];
        scalars or (N,) (broadcast with ``frame``).
    half_size
        Stamps are (2 h + 1)^2 pixels.

    Returns
    -------
    numpy.ndarray
        float32 (2h+1, 2h+1) for scalar arguments, else (N, 2h+1, 2h+1), indexed [y, x]:
        the pixel integrals of the unit-flux PSF (they sum to slightly less than 1, by the
        light beyond the stamp).
    """
    f, x, y = np.broadcast_arrays(np.asarray(frame), np.asarray(dx, float), np.asarray(dy, float))
    scalar = f.ndim == 0
    f, x, y = (np.atleast_1d(v).ravel() for v in (f, x, y))
    if not np.issubdtype(f.dtype, np.integer) or np.any((f < 0) | (f >= model.nframes)):
        raise InputError(None, f"frame must be integers in [0, {model.nframes}), got {frame!r}")
    try:
        st = render_psf_stamps(x, y, 1.0, model.alpha_px[f], model.beta[f], half_size=half_size)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    return st[0] if scalar else st


# -- the pixel-integrated Moffat and its derivatives, vectorized on the host ------------


@dataclass(frozen=True)
class _Geometry:
    """Stamp pixels grouped by quadrature order: for each order, the (star, pixel) pairs."""

    half: int
    groups: tuple  # of (order, star index (P,), flat pixel index (P,), cx (P,), cy (P,))


def _pixel_groups(half: int, xc0: np.ndarray, yc0: np.ndarray) -> _Geometry:
    """Quadrature order of every stamp pixel, fixed at the initial centres ``(xc0, yc0)``
    (px relative to the central pixel); pixel centre offsets ``cx, cy`` (no centre)."""
    off = np.arange(-half, half + 1, dtype=np.float64)
    px = np.tile(off, off.size)
    py = np.repeat(off, off.size)
    d2 = (px[None, :] - xc0[:, None]) ** 2 + (py[None, :] - yc0[:, None]) ** 2
    order = np.where(d2 < GL_RADIUS_NEAR**2, GL_ORDER_NEAR,
                     np.where(d2 < GL_RADIUS_MID**2, GL_ORDER_MID, GL_ORDER_FAR))
    groups = []
    for n in _ORDERS:
        k, p = np.nonzero(order == n)
        groups.append((n, k, p, px[p], py[p]))
    return _Geometry(half, tuple(groups))


def _rows_of(geom: _Geometry, rows: np.ndarray) -> _Geometry:
    """The pixel groups of the stars where ``rows`` (bool (N,)) is True."""
    groups = []
    for n, k, p, cx, cy in geom.groups:
        sel = rows[k]
        groups.append((n, k[sel], p[sel], cx[sel], cy[sel]))
    return _Geometry(geom.half, tuple(groups))


def _moffat_pixels(geom: _Geometry, nstar, xc, yc, alpha, beta, derivs=True):
    """Unit-flux pixel integrals P (N, S) and dP/d(xc, yc, alpha, beta), each (N, S).

    ``alpha`` (N,) per star, ``beta`` scalar. Compiled loop
    (:func:`gpu2mass.kernels.cpu.moffat_pixels.moffat_pixel_sums`); the NumPy statement of
    the same sums is :func:`_moffat_pixels_reference`.
    """
    from gpu2mass.kernels.cpu.moffat_pixels import moffat_pixel_sums

    size = (2 * geom.half + 1) ** 2
    out = np.zeros((5 if derivs else 1, nstar, size))
    xc, yc = np.ascontiguousarray(xc, float), np.ascontiguousarray(yc, float)
    alpha = np.ascontiguousarray(alpha, float)
    for n, k, p, cx, cy in geom.groups:
        m = n * n
        moffat_pixel_sums(k, p, cx, cy, xc, yc, alpha, float(beta), PIXEL_RULE_DX[n, :m],
                          PIXEL_RULE_DY[n, :m], PIXEL_RULE_W[n, :m], derivs, out)
    return list(out)


def _moffat_pixels_reference(geom: _Geometry, nstar, xc, yc, alpha, beta, derivs=True):
    """NumPy statement of :func:`_moffat_pixels` (the tests hold the two together).

    Derivatives under the integral sign:
    df/dxc = f 2 beta dx / (alpha^2 u), df/dalpha = f (-2/alpha + 2 beta r^2 / (alpha^3 u)),
    df/dbeta = f (1/(beta-1) - ln u), with u = 1 + r^2/alpha^2.
    """
    size = (2 * geom.half + 1) ** 2
    out = [np.zeros((nstar, size)) for _ in range(5 if derivs else 1)]
    norm = (beta - 1.0) / math.pi
    for n, k, p, cx, cy in geom.groups:
        if k.size == 0:
            continue
        m = n * n
        rdx, rdy, rw = PIXEL_RULE_DX[n, :m], PIXEL_RULE_DY[n, :m], PIXEL_RULE_W[n, :m]
        # In chunks of ~64k (pair, node) values: the temporaries stay in the CPU cache
        # (1.8x faster than whole-group arrays of millions; the same numbers, bit for bit).
        step = max(1, _CHUNK_NODES // m)
        for s0 in range(0, k.size, step):
            kk, pp = k[s0:s0 + step], p[s0:s0 + step]
            a = alpha[kk][:, None]
            inv_a2 = 1.0 / (a * a)
            X = (cx[s0:s0 + step] - xc[kk])[:, None] + rdx[None, :]
            Y = (cy[s0:s0 + step] - yc[kk])[:, None] + rdy[None, :]
            r2 = X * X + Y * Y
            u = 1.0 + r2 * inv_a2
            lnu = np.log(u)
            f = norm * inv_a2 * np.exp(-beta * lnu) * rw[None, :]
            out[0][kk, pp] = f.sum(1)
            if derivs:
                g = f * (2.0 * beta * inv_a2 / u)
                out[1][kk, pp] = (g * X).sum(1)
                out[2][kk, pp] = (g * Y).sum(1)
                out[3][kk, pp] = (f * (-2.0 / a) + g * r2 / a).sum(1)
                out[4][kk, pp] = (f * (1.0 / (beta - 1.0) - lnu)).sum(1)
    return out


#: (star-pixel pair, quadrature node) values per chunk of :func:`_moffat_pixels_reference`.
_CHUNK_NODES = 65536


@dataclass
class _FitResult:
    local: np.ndarray  # (N, 4): flux, background, xc, yc
    glob: np.ndarray  # (g,): alphas of the global groups, then beta
    converged: bool
    chi2_star: np.ndarray  # (N,)
    dof_star: np.ndarray  # (N,)


def _model(geom, local, glob, gidx, derivs):
    nstar = local.shape[0]
    alpha = glob[gidx[:, 0]]
    beta = float(glob[-1])
    parts = _moffat_pixels(geom, nstar, local[:, 2], local[:, 3], alpha, beta, derivs)
    model = local[:, 0:1] * parts[0] + local[:, 1:2]
    return model, parts


def _normal_equations(parts, local, weight, res, gidx, g):
    """Per-star blocks A (N,4,4), B (N,4,2), b (N,4) and the global C (g,g), c (g,)."""
    F = local[:, 0:1]
    Jl = np.stack([parts[0], np.ones_like(parts[0]), F * parts[1], F * parts[2]], axis=-1)
    Jg = np.stack([F * parts[3], F * parts[4]], axis=-1)
    wJl = weight[..., None] * Jl
    wJg = weight[..., None] * Jg
    # Batched matrix products (BLAS) rather than einsum's generic loops: 4x faster here.
    wJlT, wJgT = wJl.transpose(0, 2, 1), wJg.transpose(0, 2, 1)
    A = wJlT @ Jl
    B = wJlT @ Jg
    Cl = wJgT @ Jg
    bl = (wJlT @ res[..., None])[..., 0]
    cl = (wJgT @ res[..., None])[..., 0]
    C = np.zeros((g, g))
    c = np.zeros(g)
    for i in range(2):
        np.add.at(c, gidx[:, i], cl[:, i])
        for j in range(2):
            np.add.at(C, (gidx[:, i], gidx[:, j]), Cl[:, i, j])
    return A, B, bl, C, c


def _damped(A, lam):
    """A + (lam + 1e-12) diag(A), lam per star (N,); a zero diagonal (a star whose flux
    reached 0 has no position derivatives) is damped as if it were 1, so that the system
    stays solvable and the step in that direction is 0."""
    d = A[:, np.arange(4), np.arange(4)]
    d = np.where(d > 0, d, 1.0)
    return A + ((lam[:, None] + 1e-12) * d)[:, :, None] * np.eye(4)


def _schur_step(A, B, bl, C, c, gidx, fidx, lam):
    """Damped Gauss-Newton step (per-star (N,4), global (g,)) by the Schur complement."""
    g = c.size
    Ad = _damped(A, np.full(A.shape[0], lam))
    Cd = C + lam * np.diag(np.diag(C))
    AiB = np.linalg.solve(Ad, B)
    Aib = np.linalg.solve(Ad, bl[..., None])[..., 0]
    Sl = np.einsum("nki,nkj->nij", B, AiB)
    rl = np.einsum("nki,nk->ni", B, Aib)
    S = Cd.copy()
    r = c.copy()
    for i in range(2):
        np.add.at(r, gidx[:, i], -rl[:, i])
        for j in range(2):
            np.add.at(S, (gidx[:, i], gidx[:, j]), -Sl[:, i, j])
    dg = np.zeros(g)
    dg[fidx] = np.linalg.solve(S[np.ix_(fidx, fidx)], r[fidx])
    dl = Aib - np.einsum("nij,nj->ni", AiB, dg[gidx])
    return dl, dg


def _lm(geom, data, weight, local, glob, gidx, free, lo, hi, x0, y0, cfg):
    """Levenberg-Marquardt over per-star (F, B, xc, yc) and global (alphas, beta).

    ``gidx`` (N, 2): each star's global columns (its alpha, and beta = g - 1); ``free``
    (g,) bool; ``lo, hi`` (g,) bounds. With free globals the normal equations are solved
    by the Schur complement of the 4 x 4 per-star blocks and a step is taken or refused for
    all parameters together; with none, every star is its own problem, with its own
    damping and its own accepted steps. Centres are held within 2 ``max_shift_px`` of
    ``(x0, y0)``. Converged when the undamped Gauss-Newton step would lower chi^2 by less
    than ``cfg.tol`` (per star without free globals), chi^2 counted in units of the reduced
    chi^2 where that exceeds 1, so that a star the model does not describe (an outlier to
    be rejected) does not hold the fit up.
    """
    g = glob.size
    nstar = local.shape[0]
    local, glob = local.copy(), glob.copy()
    fidx = np.flatnonzero(free)
    joint = fidx.size > 0
    lam = np.full(nstar, 1e-3)
    lam_g = 1e-3
    active = np.ones(nstar, bool)
    model, parts = _model(geom, local, glob, gidx, True)
    res = data - model
    chi2_k = (weight * res * res).sum(1)
    converged = False
    shift = 2.0 * cfg.max_shift_px
    dof = np.maximum((weight > 0).sum(1) - 4.0, 1.0)

    def trial(dl, dg, rows=None):
        """The trial point; ``rows`` (bool (N,)): only their model is evaluated (the
        others' rows of the model and its parts are left 0: the caller ignores them)."""
        tg = np.clip(glob + dg, lo, hi)
        tl = local + dl
        tl[:, 2] = np.clip(tl[:, 2], x0 - shift, x0 + shift)
        tl[:, 3] = np.clip(tl[:, 3], y0 - shift, y0 + shift)
        tmodel, tparts = _model(geom if rows is None else _rows_of(geom, rows), tl, tg, gidx, True)
        tres = data - tmodel
        return tl, tg, tparts, tres, (weight * tres * tres).sum(1)

    for _ in range(cfg.max_iter):
        A, B, bl, C, c = _normal_equations(parts, local, weight, res, gidx, g)
        if not joint:
            # Converged where the undamped Gauss-Newton step would lower chi^2 by < tol.
            undamped = np.linalg.solve(_damped(A, np.zeros(nstar)), bl[..., None])[..., 0]
            pred = np.einsum("ni,ni->n", bl, undamped)
            active &= pred > cfg.tol * np.maximum(1.0, chi2_k / dof)
            if not active.any():
                converged = True
                break
            dl = np.linalg.solve(_damped(A, lam), bl[..., None])[..., 0]
            dl[~active] = 0.0
            # Only the stars still fitted are evaluated (most converge in a few steps).
            tl, _tg, tparts, tres, tchi2 = trial(dl, np.zeros(g), active)
            better = active & (tchi2 <= chi2_k)
            local[better] = tl[better]
            res[better] = tres[better]
            for q in range(5):
                parts[q][better] = tparts[q][better]
            chi2_k[better] = tchi2[better]
            lam[better] = np.maximum(lam[better] / 3.0, 1e-9)
            lam[active & ~better] *= 8.0
            # A star held at the centre bound cannot converge; it fails max_shift_px anyway.
            held = np.maximum(np.abs(local[:, 2] - x0),
                              np.abs(local[:, 3] - y0)) >= shift * (1 - 1e-9)
            active &= (lam <= 1e12) & ~held
            continue
        chi2 = float(chi2_k.sum())
        scale = max(1.0, chi2 / max(float(dof.sum()) - fidx.size, 1.0))
        _dl, _dg = _schur_step(A, B, bl, C, c, gidx, fidx, 0.0)
        if float(np.einsum("ni,ni->", bl, _dl) + c @ _dg) <= cfg.tol * scale:
            converged = True
            break
        while True:
            dl, dg = _schur_step(A, B, bl, C, c, gidx, fidx, lam_g)
            tl, tg, tparts, tres, tchi2_k = trial(dl, dg)
            if float(tchi2_k.sum()) <= chi2:
                local, glob, parts, res, chi2_k = tl, tg, tparts, tres, tchi2_k
                lam_g = max(lam_g / 3.0, 1e-9)
                break
            lam_g *= 8.0
            if lam_g > 1e12:
                break
        if lam_g > 1e12:
            break
    chi2_star = (weight * res * res).sum(1)
    dof_star = (weight > 0).sum(1) - 4.0
    return _FitResult(local, glob, converged, chi2_star, dof_star)


# -- the step -----------------------------------------------------------------------------


def _select_stars(det: Table, n: int, ny: int, nx: int, cfg: PsfModelConfig):
    """Indices of PSF stars in ``det`` and, per frame, a KD-tree of all its detections."""
    frame = np.asarray(det["frame"], dtype=np.int64)
    x = np.asarray(det["x"], float)
    y = np.asarray(det["y"], float)
    h = cfg.stamp_half_size
    ix, iy = np.rint(x), np.rint(y)
    ok = ((np.asarray(det["flags"]) == 0) & (np.asarray(det["snr"], float) >= cfg.min_snr)
          & (np.asarray(det["peak"], float) < cfg.saturation_dn)
          & (np.asarray(det["flux"], float) <= cfg.max_flux_dn)
          & (ix >= h) & (ix <= nx - 1 - h) & (iy >= h) & (iy <= ny - 1 - h))
    iso = cfg.isolation_arcsec / cfg.pixel_scale_arcsec
    trees = {}
    for f in np.unique(frame):
        rows = np.flatnonzero(frame == f)
        pts = np.column_stack([x[rows], y[rows]])
        tree = cKDTree(pts)
        trees[int(f)] = (tree, pts)
        cnt = np.array([len(v) for v in tree.query_ball_point(pts, iso)])
        ok[rows[cnt > 1]] = False
    sel = np.flatnonzero(ok)
    # At most max_stars_per_block per nominal block: the highest SNR.
    snr = np.asarray(det["snr"], float)[sel]
    order = np.lexsort((-snr, frame[sel] // cfg.block_frames))
    blk = (frame[sel] // cfg.block_frames)[order]
    rank = np.arange(order.size) - np.searchsorted(blk, blk)
    return np.sort(sel[order[rank < cfg.max_stars_per_block]]), trees


def _neighbour_weights(sel_x, sel_y, sel_f, trees, half, cfg):
    """(N, S) 0/1: stamp pixels farther than neighbour_mask_arcsec from other detections."""
    rmask = cfg.neighbour_mask_arcsec / cfg.pixel_scale_arcsec
    off = np.arange(-half, half + 1, dtype=np.float64)
    px = np.tile(off, off.size)
    py = np.repeat(off, off.size)
    keep = np.ones((sel_x.size, px.size))
    reach = half * math.sqrt(2.0) + rmask
    for k in range(sel_x.size):
        tree, pts = trees[int(sel_f[k])]
        for j in tree.query_ball_point([sel_x[k], sel_y[k]], reach):
            nxp, nyp = pts[j]
            if nxp == sel_x[k] and nyp == sel_y[k]:
                continue
            cx = np.rint(sel_x[k]) + px - nxp
            cy = np.rint(sel_y[k]) + py - nyp
            keep[k, cx * cx + cy * cy < rmask * rmask] = 0.0
    return keep


def _cut_stamps(xp, frames, mask, fi, yi, xi, half):
    """Stamps and masks cut on the frames' device; only they come back to the host."""
    off = xp.arange(-half, half + 1)
    f = xp.asarray(fi)[:, None, None]
    yy = xp.asarray(yi)[:, None, None] + off[None, :, None]
    xx = xp.asarray(xi)[:, None, None] + off[None, None, :]
    st = frames[f, yy, xx]
    mk = mask[f, yy, xx] if mask.ndim == 3 else mask[yy, xx]
    return to_host(st).astype(np.float64), to_host(mk) != 0


def _variance(noise_f, model_star, gain):
    var = (noise_f * noise_f)[:, None] + np.zeros_like(model_star)
    if gain > 0:
        var = var + np.maximum(model_star, 0.0) / gain
    return var


def _initial_linear(P, data, weight):
    """Weighted least-squares flux and background of each stamp for fixed unit profiles P."""
    s_w = weight.sum(1)
    s_p = (weight * P).sum(1)
    s_pp = (weight * P * P).sum(1)
    s_d = (weight * data).sum(1)
    s_pd = (weight * P * data).sum(1)
    det = s_pp * s_w - s_p * s_p
    flux = (s_pd * s_w - s_p * s_d) / det
    bkg = (s_pp * s_d - s_p * s_pd) / det
    return flux, bkg


def _outliers(fit: _FitResult, x0, y0, cfg) -> np.ndarray:
    """Stars to drop after a pass: chi^2 outliers, large shifts, non-positive flux."""
    red = fit.chi2_star / np.maximum(fit.dof_star, 1.0)
    med = np.median(red)
    mad = 1.4826 * np.median(np.abs(red - med))
    shift = np.hypot(fit.local[:, 2] - x0, fit.local[:, 3] - y0)
    return (red > med + cfg.clip_sigma * max(mad, 1e-3 * med)) | (shift > cfg.max_shift_px) | (
        fit.local[:, 0] <= 0)


def run_psf_model(frames, *, mask, noise, detections: Table,
                  config: PsfModelConfig = PsfModelConfig()) -> PsfModel:
    """Fit the pixel-integrated Moffat PSF of one band of one scan (module docstring).

    Parameters
    ----------
    frames
        (n, ny, nx) float32 calibrated, sky-subtracted R2−R1 frames, DN; NumPy or CuPy.
    mask
        (ny, nx) or (n, ny, nx), non-zero = unusable pixel; same namespace as ``frames``.
    noise
        (n,) per-frame pixel noise, DN, finite and > 0 (NumPy, CuPy or a sequence).
    detections
        The table of :func:`gpu2mass.framedet.run_frame_detection` for these frames
        (columns ``frame``, ``x``, ``y``, ``flux``, ``snr``, ``peak``, ``flags``; 0-based pixels,
        centres at integers). ``meta["seeing_fwhm"]`` (arcsec, optical), when present,
        gives the fit's starting width.
    config
        :class:`PsfModelConfig`.

    Returns
    -------
    PsfModel
        On the host; per frame and per block (``m = ceil(n / block_frames)``).

    Raises
    ------
    InputError
        Wrong shapes, bad noise, detections missing columns or outside the frames.
    StepError
        No usable PSF star in the scan.
    """
    xp = get_namespace(frames, mask)
    if frames.ndim != 3 or min(frames.shape) == 0:
        raise InputError(None, f"frames must be a non-empty (n, ny, nx) array, got {frames.shape}")
    n, ny, nx = frames.shape
    if mask.shape not in (frames.shape, frames.shape[1:]):
        raise InputError(None, f"mask must be {frames.shape[1:]} or {frames.shape}, got {mask.shape}")
    noise = np.asarray(to_host(noise), dtype=np.float64)
    if noise.shape != (n,) or not np.all(np.isfinite(noise) & (noise > 0)):
        raise InputError(None, f"noise must be ({n},) finite and > 0, got shape {noise.shape}")
    missing = {"frame", "x", "y", "flux", "snr", "peak", "flags"} - set(detections.colnames)
    if missing:
        raise InputError(None, f"detections lack the columns {sorted(missing)}")
    if len(detections) and (np.min(detections["frame"]) < 0 or np.max(detections["frame"]) >= n):
        raise InputError(None, f"detections name frames outside [0, {n})")
    cfg = config
    h = cfg.stamp_half_size
    bf = cfg.block_frames
    starts = np.arange(0, n, bf, dtype=np.int64)
    stops = np.minimum(starts + bf, n)
    m = starts.size

    sel, trees = _select_stars(detections, n, ny, nx, cfg)
    nostar = (f"no usable PSF star on {n} frames (flags == 0, SNR >= {cfg.min_snr}, isolated "
              f"within {cfg.isolation_arcsec}\", stamp on the frame and half usable)")
    if sel.size == 0:
        raise StepError(nostar)
    fr = np.asarray(detections["frame"], dtype=np.int64)[sel]
    xd = np.asarray(detections["x"], float)[sel]
    yd = np.asarray(detections["y"], float)[sel]
    xi, yi = np.rint(xd).astype(np.int64), np.rint(yd).astype(np.int64)
    data, bad = _cut_stamps(xp, frames, mask, fr, yi, xi, h)
    data = data.reshape(sel.size, -1)
    bad = bad.reshape(sel.size, -1)
    finite = np.isfinite(data)
    if not finite.all():
        warnings.warn("non-finite pixels in PSF-star stamps were given zero weight",
                      PsfModelWarning, stacklevel=2)
        bad |= ~finite
        data = np.where(finite, data, 0.0)
    usable = (~bad) * _neighbour_weights(xd, yd, fr, trees, h, cfg)
    enough = usable.sum(1) >= 0.5 * usable.shape[1]
    keep = np.flatnonzero(enough)
    fr, data, usable = fr[keep], data[keep], usable[keep]
    x0, y0 = (xd - xi)[keep], (yd - yi)[keep]
    if keep.size == 0:
        raise StepError(nostar)

    # Starting point: framedet's seeing (median over the scan) or the configured FWHM.
    fw = detections.meta.get("seeing_fwhm")
    fwhm0 = float(np.nanmedian(fw)) if fw is not None and np.size(fw) else cfg.fwhm_init_arcsec
    alpha0 = float(np.clip(fwhm0 / cfg.pixel_scale_arcsec / moffat_fwhm_px(1.0, cfg.beta_init),
                           cfg.alpha_min_px, cfg.alpha_max_px))
    blk = fr // bf
    nblk = np.bincount(blk, minlength=m)
    fit_beta = keep.size >= cfg.beta_min_stars
    glob = np.append(np.full(m, alpha0), cfg.beta_init)
    lo = np.append(np.full(m, cfg.alpha_min_px), cfg.beta_min)
    hi = np.append(np.full(m, cfg.alpha_max_px), cfg.beta_max)
    free = np.append(nblk > 0, fit_beta)
    gidx = np.column_stack([blk, np.full(blk.size, m)])

    # Stage 1. Each pass: every candidate's flux, background and centre fitted under the
    # current (alpha, beta) with the pixel variances of its own model; outliers among all
    # candidates (so that a star rejected under a poor early model can come back); then
    # the joint fit of the survivors. Pass 0 uses the starting (alpha, beta).
    geom_all = _pixel_groups(h, x0, y0)
    P0 = _moffat_pixels(geom_all, x0.size, x0, y0, np.full(x0.size, alpha0), cfg.beta_init,
                        False)[0]
    flux, bkg = _initial_linear(P0, data, usable / (noise[fr] ** 2)[:, None])
    local_all = np.column_stack([flux, bkg, x0, y0])
    no_global = np.zeros(m + 1, bool)
    good = None
    fit = None
    for _pass in range(cfg.max_passes):
        mdl, _p = _model(geom_all, local_all, glob, gidx, False)
        weight_all = usable / _variance(noise[fr], mdl - local_all[:, 1:2], cfg.gain_e_per_dn)
        each = _lm(geom_all, data, weight_all, local_all, glob, gidx, no_global, lo, hi, x0, y0,
                   cfg)
        local_all = each.local
        new_good = ~_outliers(each, x0, y0, cfg)
        if not new_good.any():
            raise StepError(f"every PSF star of the scan was rejected as an outlier ({x0.size})")
        if good is not None and np.array_equal(new_good, good):
            break
        good = new_good
        gs = np.flatnonzero(good)
        nblk = np.bincount(blk[gs], minlength=m)
        free = np.append(nblk > 0, fit_beta and gs.size >= cfg.beta_min_stars)
        geom = _pixel_groups(h, x0[gs], y0[gs])
        weight = weight_all[gs]
        fit = _lm(geom, data[gs], weight, local_all[gs], glob, gidx[gs], free, lo, hi, x0[gs],
                  y0[gs], cfg)
        glob = fit.glob
        local_all[gs] = fit.local
    beta = float(fit.glob[-1])
    flags = np.zeros(m, np.int64)
    if not fit.converged:
        flags[:] |= FLAG_NOT_CONVERGED
    if not free[-1]:
        flags[:] |= FLAG_BETA_FIXED
    elif beta <= cfg.beta_min or beta >= cfg.beta_max:
        flags[:] |= FLAG_AT_BOUND

    # Survivors, with their stage-1 parameters and weights, for the per-block numbers.
    s_fr, s_data, s_w, s_local = fr[gs], data[gs], weight, fit.local
    s_x0, s_y0 = x0[gs], y0[gs]
    block_alpha = fit.glob[:m].copy()
    block_nstars = np.zeros(m, np.int64)
    members = []
    for b in range(m):
        a, z = int(starts[b]), int(stops[b])
        inside = (s_fr >= a) & (s_fr < z)
        while inside.sum() < cfg.min_stars and (a > 0 or z < n):
            a, z = max(0, a - 1), min(n, z + 1)
            inside = (s_fr >= a) & (s_fr < z)
        if (a, z) != (int(starts[b]), int(stops[b])):
            flags[b] |= FLAG_BORROWED
            if inside.sum() < cfg.min_stars:
                flags[b] |= FLAG_WHOLE_SCAN
            k = np.flatnonzero(inside)
            g2 = _pixel_groups(h, s_x0[k], s_y0[k])
            f2 = _lm(g2, s_data[k], s_w[k], s_local[k], np.array([block_alpha[b], beta]),
                     np.column_stack([np.zeros(k.size, np.int64), np.ones(k.size, np.int64)]),
                     np.array([True, False]), lo[[b, m]], hi[[b, m]], s_x0[k], s_y0[k], cfg)
            block_alpha[b] = f2.glob[0]
            if not f2.converged:
                flags[b] |= FLAG_NOT_CONVERGED
            members.append((k, f2.local))
        else:
            k = np.flatnonzero(inside)
            members.append((k, s_local[k]))
        block_nstars[b] = k.size
        if block_alpha[b] <= cfg.alpha_min_px or block_alpha[b] >= cfg.alpha_max_px:
            flags[b] |= FLAG_AT_BOUND

    residual_rms = np.zeros(m)
    noise_rms = np.zeros(m)
    chi2 = np.zeros(m)
    for b, (k, loc) in enumerate(members):
        g3 = _pixel_groups(h, s_x0[k], s_y0[k])
        ga = np.array([block_alpha[b], beta])
        gi = np.column_stack([np.zeros(k.size, np.int64), np.ones(k.size, np.int64)])
        mdl, _p = _model(g3, loc, ga, gi, False)
        used = s_w[k] > 0
        star = (mdl - loc[:, 1:2]) * used
        res = (s_data[k] - mdl) * used
        sig = math.sqrt(float((star * star).sum()))
        residual_rms[b] = math.sqrt(float((res * res).sum())) / sig
        var = np.where(used, 1.0 / np.where(used, s_w[k], 1.0), 0.0)
        noise_rms[b] = math.sqrt(float(var.sum())) / sig
        chi2[b] = float((s_w[k] * res * res).sum()) / max(float(used.sum() - 4 * k.size - 1), 1.0)

    centres = 0.5 * (starts + stops - 1)
    alpha_px = np.interp(np.arange(n, dtype=np.float64), centres, block_alpha)
    beta_n = np.full(n, beta)
    fwhm = moffat_fwhm_px(alpha_px, beta) * cfg.pixel_scale_arcsec
    # The simulator's definition of the sampled FWHM (imported here: gpu2mass.sim pulls in
    # the whole simulator, which the library does not otherwise need).
    from gpu2mass.sim.psf import sampled_fwhm_table

    sampled = sampled_fwhm_table(fwhm, scale=cfg.pixel_scale_arcsec, beta=beta)
    out = {"alpha_px": alpha_px, "beta": beta_n, "fwhm_arcsec": fwhm,
           "sampled_fwhm_arcsec": sampled, "block_start": starts, "block_stop": stops,
           "block_alpha": block_alpha, "block_nstars": block_nstars,
           "residual_rms": residual_rms, "noise_rms": noise_rms, "chi2": chi2, "flags": flags}
    for v in out.values():
        v.flags.writeable = False
    return PsfModel(**out, pixel_scale_arcsec=float(cfg.pixel_scale_arcsec))
