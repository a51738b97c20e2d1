"""Photometry of stars saturated even in the 51 ms R1 reads: radial-profile fits of the
unsaturated wings, rd_flg 3 (2MAPPS v3.0, facts sheet 3.1, 3.6, 13.2).

2MASS v3.0 measured these stars (J < 4.5, H < 4, Ks < 3.5 on the real camera; J 5.5, H 5.0,
Ks 4.5 in our simulator, whose R1 saturates at the full well of read 2,
``docs/simulator.md``) from the light in the wings: the star is located by the centroid of
its saturated core, radial-profile samples are collected from every R1 frame that holds it,
the pixels next to the core that bleeding leaves anomalously low are rejected, and a
template is scaled in flux to the wings ("counts in the wings proportional to
brightness"). Here, per star:

1. **Frames.** Every R1 frame whose array holds the given position at least
   :attr:`BrightStarConfig.edge_px` from its edge (``geometry.sky_to_pixel``). Positions
   are handled in a common plane: (u, v) arcsec east and north of the given position
   (gnomonic), mapped to each frame's pixels by the local linearisation of its geometry.
2. **Core and position.** In each frame, the saturated pixels (mask bit 4, R1 saturated)
   whose 8-connected group has a pixel within :attr:`~BrightStarConfig.core_search_arcsec`
   of the given position form the core; its centroid (every pixel weighted alike: a
   saturated pixel carries no flux information) is the frame's position. The median of the
   frames' centroids in (u, v), cores touching the frame edge left out, starts the fit and
   anchors it: the wings refine the core's position by at most
   :attr:`~BrightStarConfig.max_shift_arcsec` (2MASS: "position = centroid of the central
   region above a threshold", facts sheet 3.6). The given position only finds the core: an
   Atlas position of a saturated star, or a second detection of its wings, can be several
   arcsec off (measured: 4–5.5" on the scan preset's Ks 3.0 star, whose fit the given
   position used to hold 4" from the truth).
3. **Profile samples.** Pixels within :attr:`~BrightStarConfig.fit_radius_arcsec` of the
   star that are usable (none of the R1 unusable bits: bad, R1 saturated, non-finite) and

   - not within :attr:`~BrightStarConfig.bleed_guard_px` of any saturated pixel (centre to
     centre; 1.5 px: the 8 neighbours of every saturated pixel, where bleeding leaves the
     "anomalously low" pixels of facts sheet 3.6 even below the saturation level);
   - not on a diffraction spike or a stripe: spikes leave a bright star along sky position
     angles 0, ~90, 180, ~270 deg (facts sheet 6, split by up to ±1.5 deg near 90/270 for
     the brightest), i.e. along the array rows and columns through the star, and NICMOS3
     stripes run along the rows through it. Pixels within
     :attr:`~BrightStarConfig.spike_halfwidth_px` (+ the radius × tan
     :attr:`~BrightStarConfig.spike_spread_deg`) of those four rays, beyond
     :attr:`~BrightStarConfig.spike_inner_px`, are rejected. In the wings a spike is
     brighter than the star's own profile (in the simulator 3e-3 F r^-1.5 per pixel of
     length against F (β−1)/(π α²) (r/α)^-2β: ten times brighter at r = 10 px). The strips
     cost 20–40 % of the samples at 5–10 px; the running-median clip (5.) alone also
     removes the spikes (measured), the strips make that independent of the clip.

4. **Fit.** The template is the frames' PSF, a pixel-integrated Moffat (α per frame, β;
   :mod:`gpu2mass.kernels.scalar.moffat`, the same Gauss–Legendre rules as the renderer),
   unit total flux, so the fitted amplitude is the star's total flux. Model per sample
   ``m = F T(x − x_f(u, v)) + b_f`` with a local background ``b_f`` per frame (the frames
   are sky-subtracted; this takes out what is left), fitted by Levenberg–Marquardt in
   (F, u, v, b_1 … b_n), weights ``1/σ²`` with
   ``σ² = noise_f² + max(F T, 0)/gain + (template_error · F T)²``.
5. **Rejection** (iterated with the fit until the kept set no longer changes, at most
   :attr:`~BrightStarConfig.max_clip_rounds` rounds, always from the full candidate set):
   the samples sorted by radius give the profile's *running median* of
   ``q = (d − b_f) / (F T)`` (window :attr:`~BrightStarConfig.median_window` samples); a
   sample deviating from ``b_f + F T median(q)`` by more than
   :attr:`~BrightStarConfig.clip_sigma` σ is rejected (neighbours, ghosts, spike light the
   geometric rule missed, isolated low pixels). Comparing with the running median rather
   than with the template keeps this rejection honest when the template's shape is
   slightly off. Bleeding, though, depresses the whole ring next to the core at once, and
   a running median follows it; so within :attr:`~BrightStarConfig.bleed_zone_px` of the
   core's guard ring a sample is also rejected when it lies more than
   :attr:`~BrightStarConfig.low_clip_sigma` σ below the fitted template, i.e. below the
   profile the rest of the star sets ("anomalously low values near the core", facts sheet
   3.6; iterated, so the template rises as the low ring leaves the fit). Measured on the
   test night (Ks, ``tests/test_brightstars.py``): the 8 neighbours of the core at 30 %
   and the next ring 30 % low leave the fluxes within 0.02 mag (0.11–0.30 mag without the
   rules); a ring only 15 % low (4σ of the 3 % template error) is partly kept: up to
   +0.045 mag.
6. **Errors.** ``flux_err_fit``: from the fit's covariance, scaled up by √(χ²/dof) when
   that exceeds 1. ``flux_err_scatter``: the frame-to-frame scatter, std(F_f)/√n of the
   per-frame fluxes (each frame refitted alone with the common position held; n >= 2).
   ``flux_err`` is the larger: the scatter holds what the noise model does not (per-frame
   PSF and seeing errors) but is itself uncertain by ~1/√(2(n−1)), about 30 % for six frames.

Fluxes are returned in the R2−R1 flux unit (the unit of the zero point, ``MAGZP``):
R1 DN × ``r1_to_r2r1``, the ratio of the effective exposures (spec raw-night 2.1:
``r2r1_exptime_s / r1_exptime_s``, nominal 1.25 s / 0.051 s = 24.5; the caller takes the
night's values from the manifest).

Decisions where 2MASS is silent (facts sheet 3.6 gives the method, not its numbers): the
bleed guard, the spike strips, the running-median window and thresholds, the template
error, the fit radius. Their effect is measured on simulated nights in
``tests/test_brightstars.py`` (module docstring there).

Devices: the frames and the mask may be NumPy or CuPy arrays. The step gathers one cutout
per (star, covering frame) on the frames' device in one indexing operation and brings the
cutouts (a few thousand pixels per star; rd_flg 3 stars are a handful per scan) to the
host, where the small dense fits run in NumPy. The result is a host table.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import numpy as np
from astropy.table import Table
from scipy import ndimage

from gpu2mass.backend import get_namespace, to_host
from gpu2mass.errors import ConfigError, InputError
from gpu2mass.flags import RD_R1_PROFILE, FlagRegistry
from gpu2mass.geometry import FrameGeometry, tan_deproject
from gpu2mass.kernels.calibrate import MASK_R1_SATURATED, MASK_SATURATED
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
    "BRIGHTSTAR_BITS",
    "FLAG_FEW_FRAMES",
    "FLAG_FEW_PIXELS",
    "FLAG_FIT_FAILED",
    "FLAG_NO_COVERAGE",
    "FLAG_POSITION_BOUND",
    "FLAG_UNSATURATED",
    "BrightStarConfig",
    "BrightStarWarning",
    "moffat_pixel_template",
    "run_saturated_photometry",
]

FLAG_FEW_FRAMES = 1
FLAG_FEW_PIXELS = 2
FLAG_FIT_FAILED = 4
FLAG_NO_COVERAGE = 8
FLAG_UNSATURATED = 16
FLAG_POSITION_BOUND = 32

#: ``flags`` of :func:`run_saturated_photometry`.
BRIGHTSTAR_BITS = FlagRegistry("flags", {
    FLAG_FEW_FRAMES: ("few_frames", (
        "fewer than min_frames R1 frames contributed wing samples (measured if at least "
        "one did; no frame-to-frame scatter from fewer than two)")),
    FLAG_FEW_PIXELS: ("few_pixels", (
        "fewer than min_wing_pixels usable wing samples: not measured (flux NaN)")),
    FLAG_FIT_FAILED: ("fit_failed", (
        "the profile fit did not converge, was singular or gave a flux <= 0: not measured "
        "(flux NaN)")),
    FLAG_NO_COVERAGE: ("no_coverage", (
        "no R1 frame holds the position edge_px inside its array: not measured")),
    FLAG_UNSATURATED: ("unsaturated", (
        "no covering frame has a saturated core near the position: the star is not "
        "saturated in R1 (rd_flg 1 territory); the position comes from the fit alone")),
    FLAG_POSITION_BOUND: ("position_bound", (
        "the fitted position wanted to move more than max_shift_arcsec from the saturated "
        "core's centroid (the given position when no core was found) and was held there")),
})


class BrightStarWarning(UserWarning):
    """Something a caller should know that does not stop the step (nothing to measure)."""


@dataclass(frozen=True)
class BrightStarConfig:
    """Configuration of :func:`run_saturated_photometry` (rd_flg 3 radial-profile fits).

    2MASS published the method (facts sheet 3.6) but none of these numbers; each default is
    a decision, explained here and measured in ``tests/test_brightstars.py``.

    Attributes
    ----------
    fit_radius_arcsec
        Outer radius of the profile samples, arcsec (30" = 15 px). The template falls as
        r^-2β = r^-5: at 15 px a Ks 1.5 star leaves ~1.5 R1 DN per pixel against ~6 DN of
        noise, so light beyond adds nothing, while the outer pixels pin the local
        background.
    core_search_arcsec
        Saturated pixels whose 8-connected group reaches within this distance of the given
        position (arcsec) are the star's core (6" = 3 px: Atlas or R1 detection positions
        are good to well under that; a neighbour's core further away is not taken).
    bleed_guard_px
        Samples closer than this (camera pixels, centre to centre) to any saturated pixel
        are rejected (1.5: the 8 neighbours; facts sheet 3.6, bleeding).
    bleed_zone_px
        Width (camera pixels) of the zone beyond the guard ring (radius from the star: the
        outermost core pixel + ``bleed_guard_px`` + this) in which a sample is also
        rejected for lying ``low_clip_sigma`` below the fitted template (3 px).
    spike_position_angles_deg
        Sky position angles (deg east of north) of the diffraction spikes (2MASS: 0, ~90,
        180, ~270, facts sheet 6). NICMOS3 stripes run along the rows, which the ~90/270
        rays cover.
    spike_halfwidth_px
        Samples within this distance (camera pixels) of a spike ray are rejected (1.5: the
        pixel column a spike is drawn in, or the three stripe rows, whatever the star's
        sub-pixel position).
    spike_spread_deg
        The strip widens by radius × tan(this) (1.6°: the ±1.2–1.5° split components of
        the brightest stars' spikes near 90° and 270°).
    spike_inner_px
        The strips start at this radius (camera pixels; 1.5: the 3×3 core, where the
        star's own light dominates any spike, stays in for a star that is not saturated).
    median_window
        Samples (sorted by radius) in the running median of the profile (15, odd).
    clip_sigma
        Samples further than this many σ from the running-median profile are rejected (4).
    low_clip_sigma
        Samples in the bleed zone more than this many σ below the fitted template are
        rejected (2.5: one-sided and tighter than ``clip_sigma``, since bleeding only
        lowers pixels).
    max_clip_rounds
        Most fit-and-reject rounds (5).
    template_error
        Fractional error of the template per pixel, added to the noise model in quadrature
        (0.03): the PSF is known to a few per cent (per-frame seeing estimate); without
        it the brightest wing pixels would hold all the weight.
    gain_e_per_dn
        Detector gain for the star's Poisson noise (e⁻/DN); 0 ignores it. The caller sets
        the band's value (manifest ``gain_e_per_dn``).
    edge_px
        A frame is used if the position lies at least this far inside its array (camera
        pixels; 2).
    min_frames
        Fewer contributing frames set ``few_frames`` (2: one frame gives no scatter).
    min_wing_pixels
        Fewer kept samples leave the star unmeasured (``few_pixels``) (40).
    max_shift_arcsec
        Largest move of the fitted position from the saturated core's centroid, or from
        the given position when no frame shows a core (4" = 2 px).
    max_iter
        Levenberg–Marquardt iterations per fit (30).
    tol_px
        Convergence: position step below this (camera pixels) and relative flux step
        below 1e-6.
    """

    fit_radius_arcsec: float = 30.0
    core_search_arcsec: float = 6.0
    bleed_guard_px: float = 1.5
    bleed_zone_px: float = 3.0
    spike_position_angles_deg: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
    spike_halfwidth_px: float = 1.5
    spike_spread_deg: float = 1.6
    spike_inner_px: float = 1.5
    median_window: int = 15
    clip_sigma: float = 4.0
    low_clip_sigma: float = 2.5
    max_clip_rounds: int = 5
    template_error: float = 0.03
    gain_e_per_dn: float = 0.0
    edge_px: float = 2.0
    min_frames: int = 2
    min_wing_pixels: int = 40
    max_shift_arcsec: float = 4.0
    max_iter: int = 30
    tol_px: float = 1e-3

    def __post_init__(self):
        angles = tuple(float(a) for a in self.spike_position_angles_deg)
        if not all(math.isfinite(a) for a in angles):
            raise ConfigError("brightstars.spike_position_angles_deg must be finite, not "
                              f"{self.spike_position_angles_deg!r}")
        object.__setattr__(self, "spike_position_angles_deg", angles)
        ints = {"median_window": 1, "max_clip_rounds": 1, "min_frames": 1,
                "min_wing_pixels": 1, "max_iter": 1}
        nonneg = {"bleed_guard_px", "bleed_zone_px", "spike_halfwidth_px", "spike_spread_deg",
                  "spike_inner_px",
                  "template_error", "gain_e_per_dn", "edge_px"}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "spike_position_angles_deg":
                continue
            if f.name in ints:
                ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= ints[f.name]
                rule = f"an integer >= {ints[f.name]}"
            elif f.name in nonneg:
                ok = isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                rule = "finite and >= 0"
            else:
                ok = isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                rule = "finite and > 0"
            if not ok:
                raise ConfigError(f"brightstars.{f.name} must be {rule}, not {v!r}")
        if self.median_window % 2 == 0:
            raise ConfigError(f"brightstars.median_window must be odd, not {self.median_window}")
        if self.spike_spread_deg >= 45:
            raise ConfigError("brightstars.spike_spread_deg must be < 45")


# -- the template ---------------------------------------------------------------------------


def moffat_pixel_template(dx, dy, alpha, beta):
    """Pixel-integrated unit-flux Moffat and its gradient with respect to the source position.

    The same Gauss–Legendre rules as :func:`gpu2mass.kernels.scalar.moffat.moffat_pixel_integral`
    (8×8, 4×4 or 2×2 nodes by the distance of the pixel centre), vectorized in NumPy
    (float64) for the profile fits.

    Parameters
    ----------
    dx, dy
        Pixel centre minus source centre, camera pixels (arrays of one shape).
    alpha, beta
        Moffat width (px, > 0) and index (> 1); scalars or arrays broadcasting to ``dx``.

    Returns
    -------
    t, dt_dx0, dt_dy0
        Arrays of ``dx``'s shape: the fraction of the flux in the pixel, and its derivatives
        with respect to the source's x and y (px⁻¹).
    """
    dx = np.asarray(dx, float)
    dy = np.asarray(dy, float)
    alpha = np.broadcast_to(np.asarray(alpha, float), dx.shape)
    beta = np.broadcast_to(np.asarray(beta, float), dx.shape)
    t = np.zeros(dx.shape)
    gx = np.zeros(dx.shape)
    gy = np.zeros(dx.shape)
    d2 = dx * dx + dy * dy
    order = np.where(d2 < GL_RADIUS_NEAR**2, GL_ORDER_NEAR,
                     np.where(d2 < GL_RADIUS_MID**2, GL_ORDER_MID, GL_ORDER_FAR))
    for n in (GL_ORDER_NEAR, GL_ORDER_MID, GL_ORDER_FAR):
        sel = order == n
        if not sel.any():
            continue
        k = n * n
        a = alpha[sel][:, None]
        b = beta[sel][:, None]
        x = dx[sel][:, None] + PIXEL_RULE_DX[n, :k][None, :]
        y = dy[sel][:, None] + PIXEL_RULE_DY[n, :k][None, :]
        w = PIXEL_RULE_W[n, :k][None, :]
        inv_a2 = 1.0 / (a * a)
        base = 1.0 + (x * x + y * y) * inv_a2
        p = base ** (-b)
        norm = (b[:, 0] - 1.0) / (np.pi * a[:, 0] ** 2)
        t[sel] = norm * (w * p).sum(1)
        # d/dx0 of (1 + r²/α²)^-β with x = X − x0: +2 β x/α² (1 + r²/α²)^(−β−1).
        q = w * 2.0 * b * inv_a2 * p / base
        gx[sel] = norm * (q * x).sum(1)
        gy[sel] = norm * (q * y).sum(1)
    return t, gx, gy


# -- geometry and cutouts --------------------------------------------------------------------


def _local_maps(geometry: FrameGeometry, frm, ra, dec, step_arcsec=1.0):
    """Per pair: pixel (x0, y0) of the plane origin and the 2×2 map d(x, y)/d(u, v)
    (px per arcsec, u east, v north) by central differences of the geometry."""
    h = step_arcsec
    out = []
    for du, dv in ((h, 0.0), (-h, 0.0), (0.0, h), (0.0, -h)):
        r, d = tan_deproject(np.full(ra.shape, du), np.full(ra.shape, dv), ra, dec)
        out.append(np.asarray(geometry.sky_to_pixel(frm, r, d), float).reshape(2, -1))
    jac = np.empty((frm.size, 2, 2))
    jac[:, :, 0] = ((out[0] - out[1]) / (2 * h)).T
    jac[:, :, 1] = ((out[2] - out[3]) / (2 * h)).T
    x0, y0 = (np.asarray(a, float).reshape(-1)
              for a in geometry.sky_to_pixel(frm, ra, dec))
    return x0, y0, jac


def _gather(xp, frames, mask, frm, ix, iy, h):
    """Cutouts (P, S, S), S = 2h + 1, centred on pixels (ix, iy) of frames ``frm``: values,
    mask and in-frame flags, on the host."""
    _, ny, nx = frames.shape
    off = np.arange(-h, h + 1)
    yy = iy[:, None, None] + off[None, :, None]
    xx = ix[:, None, None] + off[None, None, :]
    inside = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
    shape = (frm.size, off.size, off.size)
    yc = np.clip(yy, 0, ny - 1)
    xc = np.clip(xx, 0, nx - 1)
    ff = np.broadcast_to(frm[:, None, None], shape)
    yc, xc = np.broadcast_to(yc, shape), np.broadcast_to(xc, shape)
    idx = xp.asarray(np.ascontiguousarray((ff * ny + yc) * nx + xc).ravel())
    vals = to_host(xp.take(frames.reshape(-1), idx)).reshape(shape)
    if mask.ndim == 2:
        midx = xp.asarray(np.ascontiguousarray(yc * nx + xc).ravel())
    else:
        midx = idx
    m = to_host(xp.take(mask.reshape(-1), midx)).reshape(shape)
    return (np.asarray(vals, float), np.asarray(m).astype(np.int64), inside,
            np.broadcast_to(xx, shape), np.broadcast_to(yy, shape))


# -- one star --------------------------------------------------------------------------------


@dataclass
class _Frames:
    """Everything one star's fit needs from its covering frames (host arrays)."""

    frame: np.ndarray  # (nf,) frame indices
    x0: np.ndarray  # (nf,) pixel position of the plane origin
    y0: np.ndarray
    jac: np.ndarray  # (nf, 2, 2) d(x, y)/d(u, v), px per arcsec
    noise: np.ndarray  # (nf,)
    alpha: np.ndarray  # (nf,)
    beta: np.ndarray  # (nf,)
    r_core: np.ndarray  # (nf,) outermost core pixel's distance from the core centroid (px; 0 if none)
    has_core: np.ndarray  # (nf,) bool
    # samples (candidates that pass the pixel-level rules), concatenated over frames
    fi: np.ndarray  # frame slot of each sample
    X: np.ndarray
    Y: np.ndarray
    d: np.ndarray


def _spike_dirs(jac, angles_deg):
    """(nf, k, 2) unit pixel directions of the sky position angles in each frame."""
    t = np.deg2rad(np.asarray(angles_deg, float))
    sky = np.stack([np.sin(t), np.cos(t)], 1)  # (east, north)
    d = np.einsum("fij,kj->fki", jac, sky)
    return d / np.linalg.norm(d, axis=2, keepdims=True)


class _Fit:
    """Levenberg–Marquardt in (F, u, v, b_1..b_n) over a fixed sample set."""

    def __init__(self, fr: _Frames, config: BrightStarConfig, anchor=(0.0, 0.0)):
        self.fr = fr
        self.cfg = config
        self.nf = fr.frame.size
        # The position the fit may move at most max_shift_arcsec from, (u, v) arcsec.
        self.anchor = (float(anchor[0]), float(anchor[1]))

    def positions(self, u, v):
        j = self.fr.jac
        xs = self.fr.x0 + j[:, 0, 0] * u + j[:, 0, 1] * v
        ys = self.fr.y0 + j[:, 1, 0] * u + j[:, 1, 1] * v
        return xs, ys

    def template(self, sel, u, v):
        fr = self.fr
        xs, ys = self.positions(u, v)
        fi = fr.fi[sel]
        return moffat_pixel_template(fr.X[sel] - xs[fi], fr.Y[sel] - ys[fi], fr.alpha[fi],
                                     fr.beta[fi])

    def sigma2(self, sel, model_star):
        fr, cfg = self.fr, self.cfg
        s2 = fr.noise[fr.fi[sel]] ** 2 + (cfg.template_error * model_star) ** 2
        if cfg.gain_e_per_dn > 0:
            s2 = s2 + np.maximum(model_star, 0.0) / cfg.gain_e_per_dn
        return s2

    def linear(self, sel, u, v, t=None):
        """Weighted linear fit of (F, b_f) at a fixed position (two passes for the
        flux-dependent weights). Returns F, b (nf,)."""
        fr = self.fr
        if t is None:
            t = self.template(sel, u, v)[0]
        fi = fr.fi[sel]
        d = fr.d[sel]
        f_est = None
        for _ in range(2):
            w = 1.0 / self.sigma2(sel, np.zeros_like(t) if f_est is None else f_est * t)
            a = np.zeros((1 + self.nf, 1 + self.nf))
            g = np.zeros(1 + self.nf)
            a[0, 0] = np.sum(w * t * t)
            g[0] = np.sum(w * t * d)
            wt = np.bincount(fi, weights=w * t, minlength=self.nf)
            a[0, 1:] = a[1:, 0] = wt
            a[1:, 1:] = np.diag(np.bincount(fi, weights=w, minlength=self.nf))
            g[1:] = np.bincount(fi, weights=w * d, minlength=self.nf)
            present = np.diag(a)[1:] > 0
            a[1:, 1:][~present, ~present] = 1.0
            try:
                p = np.linalg.solve(a, g)
            except np.linalg.LinAlgError:
                return math.nan, np.zeros(self.nf)
            f_est = max(p[0], 0.0)
        return p[0], p[1:]

    def jacobian(self, sel, f, t, gx, gy):
        fi = self.fr.fi[sel]
        jac = self.fr.jac[fi]
        jm = np.zeros((sel.size, 3 + self.nf))
        jm[:, 0] = t
        jm[:, 1] = f * (gx * jac[:, 0, 0] + gy * jac[:, 1, 0])
        jm[:, 2] = f * (gx * jac[:, 0, 1] + gy * jac[:, 1, 1])
        jm[np.arange(sel.size), 3 + fi] = 1.0
        return jm

    def lm(self, sel, f, u, v, b):
        """Levenberg–Marquardt from (f, u, v, b) over samples ``sel`` (indices).

        Returns (f, u, v, b, cov, chi2, converged). Weights follow the model's flux at the
        start of each iteration; a step is taken when it lowers χ² at those weights. The
        fit has converged when a step moves the position by less than ``tol_px`` and the
        flux by less than 1e-6 of itself, or when no step lowers χ² any more (the minimum
        to machine precision)."""
        cfg = self.cfg
        fi = self.fr.fi[sel]
        d = self.fr.d[sel]
        unused = np.flatnonzero(np.bincount(fi, minlength=self.nf) == 0)
        px_per_arcsec = float(np.abs(self.fr.jac).max())

        def state(f, u, v, b):
            t, gx, gy = self.template(sel, u, v)
            w = 1.0 / self.sigma2(sel, f * t)
            return t, gx, gy, w, d - f * t - b[fi]

        def normal(f, t, gx, gy, w):
            jm = self.jacobian(sel, f, t, gx, gy)
            hess = jm.T @ (w[:, None] * jm)
            hess[3 + unused, 3 + unused] = 1.0
            return jm, hess

        lam = 1e-3
        converged = False
        t, gx, gy, w, r = state(f, u, v, b)
        for _ in range(cfg.max_iter):
            jm, hess = normal(f, t, gx, gy, w)
            grad = jm.T @ (w * r)
            chi2 = float(np.sum(w * r * r))
            step = None
            for _ in range(16):
                try:
                    delta = np.linalg.solve(hess + lam * np.diag(np.diag(hess)), grad)
                except np.linalg.LinAlgError:
                    lam *= 10.0
                    continue
                tt = self.template(sel, u + delta[1], v + delta[2])[0]
                rr = d - (f + delta[0]) * tt - (b + delta[3:])[fi]
                if float(np.sum(w * rr * rr)) <= chi2:
                    step = delta
                    break
                lam *= 10.0
            if step is None:
                converged = True
                break
            lam = max(lam / 10.0, 1e-9)
            f, u, v, b = f + step[0], u + step[1], v + step[2], b + step[3:]
            ua, va = self.anchor
            shift = math.hypot(u - ua, v - va)
            if shift > cfg.max_shift_arcsec:
                u = ua + (u - ua) * cfg.max_shift_arcsec / shift
                v = va + (v - va) * cfg.max_shift_arcsec / shift
            t, gx, gy, w, r = state(f, u, v, b)
            if (math.hypot(step[1], step[2]) * px_per_arcsec < cfg.tol_px
                    and abs(step[0]) <= 1e-6 * abs(f)):
                converged = True
                break
        jm, hess = normal(f, t, gx, gy, w)
        chi2 = float(np.sum(w * r * r))
        try:
            cov = np.linalg.inv(hess)
        except np.linalg.LinAlgError:
            cov = np.full(hess.shape, np.nan)
            converged = False
        return f, u, v, b, cov, chi2, converged


def _candidates(fr: _Frames, u, v, config: BrightStarConfig, fit_r_px, dirs):
    """Samples inside the fit radius and off the spike strips for position (u, v)."""
    j = fr.jac
    xs = fr.x0 + j[:, 0, 0] * u + j[:, 0, 1] * v
    ys = fr.y0 + j[:, 1, 0] * u + j[:, 1, 1] * v
    dx = fr.X - xs[fr.fi]
    dy = fr.Y - ys[fr.fi]
    r = np.hypot(dx, dy)
    keep = r <= fit_r_px
    tan_spread = math.tan(math.radians(config.spike_spread_deg))
    for k in range(dirs.shape[1]):
        ux, uy = dirs[fr.fi, k, 0], dirs[fr.fi, k, 1]
        along = dx * ux + dy * uy
        perp = np.abs(dx * uy - dy * ux)
        keep &= ~((along > 0) & (r > config.spike_inner_px)
                  & (perp <= config.spike_halfwidth_px + along * tan_spread))
    return keep, r


def _running_median(values, order, window):
    out = np.empty_like(values)
    out[order] = ndimage.median_filter(values[order], size=window, mode="nearest")
    return out


def _measure_star(fr: _Frames, config: BrightStarConfig, u0, v0, fit_r_px):
    """Fit one star. Returns a dict of results (NaN fluxes and flags on failure)."""
    res = {"flux": math.nan, "flux_err_fit": math.nan, "flux_err_scatter": math.nan,
           "u": u0, "v": v0, "nframes": 0, "npix": 0, "r_inner_px": math.nan,
           "chi2": math.nan, "flags": 0, "frames": np.zeros(0, np.int64)}
    fit = _Fit(fr, config, anchor=(u0, v0))
    dirs = _spike_dirs(fr.jac, config.spike_position_angles_deg)
    u, v = u0, v0
    cand, r = _candidates(fr, u, v, config, fit_r_px, dirs)
    if cand.sum() < config.min_wing_pixels:
        res["flags"] |= FLAG_FEW_PIXELS
        return res
    f, b = fit.linear(np.flatnonzero(cand), u, v)
    if not (math.isfinite(f) and f > 0):
        res["flags"] |= FLAG_FIT_FAILED
        return res
    keep = cand.copy()
    for _ in range(config.max_clip_rounds):
        sel = np.flatnonzero(keep)
        if sel.size < config.min_wing_pixels:
            res["flags"] |= FLAG_FEW_PIXELS
            return res
        # A first round polluted by neighbours or spikes may not converge within
        # max_iter; only the final fit on the clean set must.
        f, u, v, b, cov, chi2, ok = fit.lm(sel, f, u, v, b)
        if not (math.isfinite(f) and f > 0 and math.isfinite(u) and math.isfinite(v)):
            res["flags"] |= FLAG_FIT_FAILED
            return res
        # Re-select with the new position, then judge every candidate against the
        # running-median profile.
        cand, r = _candidates(fr, u, v, config, fit_r_px, dirs)
        ci = np.flatnonzero(cand)
        t = fit.template(ci, u, v)[0]
        star = f * t
        sig = np.sqrt(fit.sigma2(ci, star))
        base = b[fr.fi[ci]]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = (fr.d[ci] - base) / star
        order = np.argsort(r[ci], kind="stable")
        med = _running_median(q, order, config.median_window)
        e = fr.d[ci] - base - star * med
        low = fr.d[ci] - base - star
        near = r[ci] <= fr.r_core[fr.fi[ci]] + config.bleed_guard_px + config.bleed_zone_px
        bad = (np.abs(e) > config.clip_sigma * sig) | (near & (low < -config.low_clip_sigma * sig))
        new_keep = np.zeros_like(keep)
        new_keep[ci[~bad]] = True
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    sel = np.flatnonzero(keep)
    if sel.size < config.min_wing_pixels:
        res["flags"] |= FLAG_FEW_PIXELS
        return res
    f, u, v, b, cov, chi2, ok = fit.lm(sel, f, u, v, b)
    if not (ok and math.isfinite(f) and f > 0 and np.isfinite(cov[0, 0]) and cov[0, 0] > 0):
        res["flags"] |= FLAG_FIT_FAILED
        return res
    npar = 3 + int((np.bincount(fr.fi[sel], minlength=fr.frame.size) > 0).sum())
    dof = max(sel.size - npar, 1)
    red = chi2 / dof
    err_fit = math.sqrt(cov[0, 0]) * max(1.0, math.sqrt(red))
    # Frame-to-frame scatter: each frame alone, position held.
    per = []
    for k in range(fr.frame.size):
        sk = sel[fr.fi[sel] == k]
        if sk.size >= max(10, config.min_wing_pixels // 4):
            fk, _ = fit.linear(sk, u, v)
            if math.isfinite(fk):
                per.append(fk)
    nfr = int((np.bincount(fr.fi[sel], minlength=fr.frame.size) > 0).sum())
    scatter = float(np.std(per, ddof=1) / math.sqrt(len(per))) if len(per) >= 2 else math.nan
    if math.hypot(u - u0, v - v0) >= config.max_shift_arcsec * (1 - 1e-9):
        res["flags"] |= FLAG_POSITION_BOUND
    if nfr < config.min_frames:
        res["flags"] |= FLAG_FEW_FRAMES
    _, r = _candidates(fr, u, v, config, fit_r_px, dirs)
    res.update(flux=f, flux_err_fit=err_fit, flux_err_scatter=scatter, u=u, v=v, nframes=nfr,
               npix=int(sel.size), r_inner_px=float(r[sel].min()), chi2=red,
               frames=np.unique(fr.frame[fr.fi[sel]]))
    return res


# -- public step ------------------------------------------------------------------------------


def _per_frame(name, value, n):
    a = np.asarray(to_host(value) if not np.isscalar(value) else value, float)
    a = np.broadcast_to(a, (n,)) if a.ndim == 0 else a
    if a.shape != (n,) or not np.all(np.isfinite(a)):
        raise InputError(None, f"{name} must be a finite scalar or ({n},) array, got shape "
                               f"{a.shape}")
    return np.array(a, float)


def run_saturated_photometry(r1_frames, *, mask_r1, noise_r1, geometry: FrameGeometry, ra, dec,
                             r1_to_r2r1: float, psf_alpha_px, psf_beta,
                             config: BrightStarConfig = BrightStarConfig()) -> Table:
    """Radial-profile photometry (rd_flg 3) of stars saturated in the R1 frames of one band.

    Parameters
    ----------
    r1_frames
        float32 (n, ny, nx) calibrated, sky-subtracted R1 frames, DN at flat = 1 (NumPy or
        CuPy; :func:`gpu2mass.frames.run_calibrate_frames` ``.r1``).
    mask_r1
        uint8 (n, ny, nx) or (ny, nx) mask bits of the R1 frames
        (:data:`gpu2mass.frames.MASK_BITS`): bit 4 (R1 saturated) marks the core; a pixel
        is used only if no bit other than 2 (read 2 saturated, which R1 is there for) is
        set: bits 1, 4, 8 (:data:`gpu2mass.frames.UNUSABLE_R1`) and any bit a caller adds
        (e.g. a transient mask, 16 and up) leave it out. Same namespace as the frames.
    noise_r1
        (n,) per-pixel noise of each R1 frame, DN (``.noise_r1``).
    geometry
        :class:`~gpu2mass.geometry.FrameGeometry` of these frames.
    ra, dec
        (N,) approximate positions of the saturated stars, deg (Atlas or R1 detections;
        good to about a pixel).
    r1_to_r2r1
        Factor turning R1 DN into the R2−R1 flux unit: the manifest's
        ``r2r1_exptime_s / r1_exptime_s`` (nominal 1.25 / 0.051 = 24.5).
    psf_alpha_px, psf_beta
        (n,) (or scalars) Moffat width (camera pixels) and index of each frame's PSF
        (optical PSF; the template integrates it over the pixel).
    config
        :class:`BrightStarConfig`.

    Returns
    -------
    astropy.table.Table
        One row per star, in input order (host): ``ra``, ``dec`` (deg, refined), ``flux``,
        ``flux_err`` (DN in the R2−R1 unit: total flux of the template; NaN when not
        measured), ``flux_err_fit``, ``flux_err_scatter`` (module docstring),
        ``nframes`` (frames that contributed samples), ``n_cover`` (frames holding the
        star), ``n_sat`` (frames with a saturated core), ``npix_used``, ``r_inner``
        (arcsec, innermost sample radius used), ``chi2`` (reduced χ² of the final fit),
        ``frames`` (N, W) int32 indices of the contributing frames padded with −1,
        ``rd_flg`` (3), ``flags`` (:data:`BRIGHTSTAR_BITS`). ``meta["r1_to_r2r1"]``.

    Raises
    ------
    InputError
        Shapes or namespaces that do not match, non-finite or non-positive noise, PSF or
        exposure ratio.
    """
    try:
        xp = get_namespace(r1_frames, mask_r1)
    except TypeError as exc:
        raise InputError(None, f"brightstars inputs: {exc}") from None
    if r1_frames.ndim != 3:
        raise InputError(None, f"r1_frames must be (n, ny, nx), got shape {tuple(r1_frames.shape)}")
    n, ny, nx = (int(s) for s in r1_frames.shape)
    if tuple(mask_r1.shape) not in ((n, ny, nx), (ny, nx)):
        raise InputError(None, f"mask_r1 must be {(ny, nx)} or {(n, ny, nx)}, got "
                               f"{tuple(mask_r1.shape)}")
    if not isinstance(geometry, FrameGeometry) or geometry.nframes != n:
        raise InputError(None, f"geometry must be a FrameGeometry of {n} frames")
    if (geometry.band.ny, geometry.band.nx) != (ny, nx):
        raise InputError(None, "geometry's array size differs from the frames'")
    noise = _per_frame("noise_r1", noise_r1, n)
    alpha = _per_frame("psf_alpha_px", psf_alpha_px, n)
    beta = _per_frame("psf_beta", psf_beta, n)
    if not np.all(noise > 0):
        raise InputError(None, "noise_r1 must be > 0")
    if not np.all(alpha > 0) or not np.all(beta > 1):
        raise InputError(None, "psf_alpha_px must be > 0 and psf_beta > 1")
    scale_r1 = float(r1_to_r2r1)
    if not (math.isfinite(scale_r1) and scale_r1 > 0):
        raise InputError(None, f"r1_to_r2r1 must be finite and > 0, not {r1_to_r2r1!r}")
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    if ra.shape != dec.shape or ra.ndim != 1 or not np.all(np.isfinite(ra) & np.isfinite(dec)):
        raise InputError(None, "ra and dec must be finite 1-D arrays of one length")

    nstar = ra.size
    scale = geometry.band.scale_arcsec
    fit_r_px = config.fit_radius_arcsec / scale
    # The cutouts reach the fit radius around the farthest position the fit may take: a
    # core found within core_search_arcsec, then max_shift_arcsec of refinement.
    h = math.ceil(fit_r_px + (config.core_search_arcsec + max(config.max_shift_arcsec, 0.0)) / scale + 1)
    src, frm, x, y = geometry.frames_holding(ra, dec, edge_px=config.edge_px)
    out = {k: np.full(nstar, math.nan) for k in
           ("flux", "flux_err", "flux_err_fit", "flux_err_scatter", "r_inner", "chi2")}
    out_ra, out_dec = ra.copy(), dec.copy()
    ints = {k: np.zeros(nstar, np.int32) for k in ("nframes", "n_cover", "n_sat", "npix_used",
                                                    "flags")}
    used_frames = [np.zeros(0, np.int64)] * nstar
    if src.size:
        ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        vals, mbits, inside, xx, yy = _gather(xp, r1_frames, mask_r1, frm, ix, iy, h)
        x0, y0, jac = _local_maps(geometry, frm, ra[src], dec[src])
    search_px = config.core_search_arcsec / scale
    for s in range(nstar):
        pairs = np.flatnonzero(src == s)
        ints["n_cover"][s] = pairs.size
        if pairs.size == 0:
            ints["flags"][s] |= FLAG_NO_COVERAGE
            continue
        fi_l, X_l, Y_l, d_l = [], [], [], []
        r_core = np.zeros(pairs.size)
        has_core = np.zeros(pairs.size, bool)
        uv_core = []
        for k, p in enumerate(pairs):
            ins = inside[p]
            sat = ins & ((mbits[p] & MASK_R1_SATURATED) != 0)
            # Read 2 saturated (bit 2) is what R1 is for; every other bit is left out.
            usable = ins & ((mbits[p] & ~MASK_SATURATED) == 0) & np.isfinite(vals[p])
            if sat.any():
                lab, _ = ndimage.label(sat, structure=np.ones((3, 3), bool))
                dist = np.hypot(xx[p] - x[p], yy[p] - y[p])
                ids = np.unique(lab[sat & (dist <= search_px)])
                core = np.isin(lab, ids[ids > 0])
                if core.any():
                    has_core[k] = True
                    cx, cy = xx[p][core].mean(), yy[p][core].mean()
                    r_core[k] = float(np.hypot(xx[p][core] - cx, yy[p][core] - cy).max())
                    cxx, cyy = xx[p][core], yy[p][core]
                    at_edge = (np.any((cxx == 0) | (cxx == nx - 1) | (cyy == 0) | (cyy == ny - 1))
                               or np.any(core[[0, -1], :]) or np.any(core[:, [0, -1]]))
                    if not at_edge:
                        duv = np.linalg.solve(jac[p], np.array([cx - x0[p], cy - y0[p]]))
                        uv_core.append(duv)
                guard = ndimage.distance_transform_edt(~sat)
                usable &= guard >= config.bleed_guard_px
            sel = np.flatnonzero(usable.ravel())
            fi_l.append(np.full(sel.size, k))
            X_l.append(xx[p].ravel()[sel].astype(float))
            Y_l.append(yy[p].ravel()[sel].astype(float))
            d_l.append(vals[p].ravel()[sel])
        ints["n_sat"][s] = int(has_core.sum())
        f_idx = frm[pairs]
        fr = _Frames(frame=f_idx, x0=x0[pairs], y0=y0[pairs], jac=jac[pairs],
                     noise=noise[f_idx], alpha=alpha[f_idx], beta=beta[f_idx],
                     r_core=r_core, has_core=has_core, fi=np.concatenate(fi_l),
                     X=np.concatenate(X_l), Y=np.concatenate(Y_l), d=np.concatenate(d_l))
        if uv_core:
            # The core's centroid (within core_search_arcsec of the given position, by
            # construction) starts and anchors the fit.
            u0, v0 = np.median(np.array(uv_core), axis=0)
        else:
            u0 = v0 = 0.0
        flags = 0 if has_core.any() else FLAG_UNSATURATED
        res = _measure_star(fr, config, float(u0), float(v0), fit_r_px)
        flags |= res["flags"]
        ints["flags"][s] = flags
        ints["nframes"][s] = res["nframes"]
        ints["npix_used"][s] = res["npix"]
        used_frames[s] = res["frames"]
        if math.isfinite(res["flux"]):
            out["flux"][s] = res["flux"] * scale_r1
            out["flux_err_fit"][s] = res["flux_err_fit"] * scale_r1
            out["flux_err_scatter"][s] = res["flux_err_scatter"] * scale_r1
            out["flux_err"][s] = np.fmax(out["flux_err_fit"][s], out["flux_err_scatter"][s])
            out["r_inner"][s] = res["r_inner_px"] * scale
            out["chi2"][s] = res["chi2"]
            out_ra[s], out_dec[s] = tan_deproject(res["u"], res["v"], ra[s], dec[s])
    t = Table()
    t["ra"] = out_ra
    t["dec"] = out_dec
    for c in ("flux", "flux_err", "flux_err_fit", "flux_err_scatter"):
        t[c] = out[c]
        t[c].unit = "DN"
    t["nframes"] = ints["nframes"].astype(np.int16)
    t["n_cover"] = ints["n_cover"].astype(np.int16)
    t["n_sat"] = ints["n_sat"].astype(np.int16)
    t["npix_used"] = ints["npix_used"]
    t["r_inner"] = out["r_inner"]
    t["r_inner"].unit = "arcsec"
    t["chi2"] = out["chi2"]
    width = max([1] + [u.size for u in used_frames])
    frames_col = np.full((nstar, width), -1, np.int32)
    for s, u in enumerate(used_frames):
        frames_col[s, :u.size] = u
    t["frames"] = frames_col
    t["rd_flg"] = np.full(nstar, RD_R1_PROFILE, np.int8)
    t["flags"] = ints["flags"]
    t.meta["r1_to_r2r1"] = scale_r1
    if nstar == 0:
        warnings.warn("no star to measure", BrightStarWarning, stacklevel=2)
    elif not np.isfinite(out["flux"]).any():
        warnings.warn("no star could be measured", BrightStarWarning, stacklevel=2)
    return t
