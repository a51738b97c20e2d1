"""Aperture photometry on the frame stack, curve of growth and R1 photometry (2MAPPS IV.4,
facts sheet 3.1, 3.4, 3.5, 13.5).

Three functions, host bookkeeping around one pixel kernel
(:func:`gpu2mass.kernels.aperture.aperture_photometry`):

:func:`run_aperture_photometry`
    For every source (sky position) and every frame of one band of one scan whose pixel
    grid holds it (``geometry.sky_to_pixel``), sky-subtracted fluxes in apertures of
    3"–14" radius in 1" steps (radii converted with ``geometry.band.scale_arcsec``), sky
    from the 14"–20" annulus. A frame is *excluded* when a masked (or saturated) pixel
    overlaps the 4" guard circle, when that circle crosses the frame edge (2MASS: centre
    < 4" from the edge) or when the annulus has too few usable pixels. The measured frames
    are combined by an UNWEIGHTED average that keeps the non-detections (2MASS: so that the
    faint end is not biased high). ``ndet`` as 2MASS: N = frames whose 4" flux is above
    ``detection_snr`` (3) sigma, M = frames measured, one digit each.
:func:`fit_curve_of_growth`
    The correction from the 4" standard aperture to the total flux, per block of
    ``cog_block_frames`` frames (2MASS re-estimated the seeing about every coadd, ~12
    frames; decision below), from bright, isolated, unsaturated stars.
    :func:`apply_curve_of_growth` gives the 4" "standard aperture" fluxes (``m_stdap``
    before the zero point) and their errors, including the COG's own error.
:func:`run_r1_photometry`
    rd_flg 1: for stars saturated in any covering R2−R1 frame, the same 4" aperture and
    14"–20" annulus on the R1 (51 ms) frames, averaged over the R1 frames that are
    usable (not saturated within 4"), scaled to the R2−R1 flux unit by the exposure ratio
    (``r1_flux_scale``), and COG-corrected like the R2−R1 standard aperture.

Decisions where 2MASS is not explicit (facts sheet 16):

- **Sky estimator** ("trimmed median, trim unconfirmed"): a 20 % two-sided trimmed mean
  (``sky_trim`` = 0.2): unbiased for symmetric noise, 87 % of the mean's efficiency for
  Gaussian noise (the median: 64 %), and most of a neighbour's light in the annulus is
  trimmed away. Its bias on star-crowded annuli is measured in
  ``tests/test_kernels_aperture.py`` beside the median and the plain mean.
- **Errors.** Per frame, the noise model
  ``var = A sigma² + A² c sigma² / n_sky + max(F, 0) / gain`` (A the aperture area in
  pixels, sigma the pixel noise of the annulus, half its 15.87–84.13 % quantile distance,
  or the caller's per-frame noise where the annulus has fewer than ``min_sky_pixels``:
  the frame noise also holds large-scale sky (airglow) structure that the annulus sky
  removes, which made H-band errors 1.5 times too large in the tests, c = :func:`trimmed_mean_variance_factor`
  the trimmed mean's variance relative to a mean, n_sky the annulus pixels). The average
  of M frames has ``flux_err = sqrt(sum var) / M`` (adopted) and, beside it,
  ``flux_err_scatter = std(F_k) / sqrt(M)`` from the frame-to-frame scatter (M >= 2): a
  check of the noise model that also holds what it does not (flat-field, seeing and PSF
  changes); the tests hold their ratio near 1.
- **Curve of growth.** Per block, every selected star's ratios ``F(r) / F(4")`` are
  averaged (inverse-variance weights, 3-sigma clipping about the weighted median); the
  ratio at 14" is the measured part of the correction. Each star's error is its noise
  model's plus, in quadrature, the scan's star-to-star scatter of the ratio beyond it
  (:attr:`CurveOfGrowth.ratio_scatter`: fainter neighbours in the aperture or the
  annulus), measured on the deviations from the block means: without it the brightest
  star carries a block and the curve's error is its photon noise alone. The light beyond
  14" and what the star's own wing adds to the 14"–20" annulus (the annulus sky is biased
  high by it) are not measured: they are extrapolated by a Moffat encircled-energy model
  ``EE(r) = 1 − (1 + r²/alpha²)^(1−beta)``, with the annulus term, fitted (alpha, beta)
  to the averaged curve; 2MASS's real PSF is not exactly a Moffat, so a quarter of that
  extrapolation is added to the correction's error (``cog_extrapolation_error``). With
  2" pixels and 2.5–3" seeing the extrapolation is about 1 %. Blocks with fewer than
  ``cog_min_stars`` stars borrow the stars of the neighbouring blocks, nearest first;
  sources are assigned to a block by the mean index of their measured frames. Seeing in
  2MASS (and in the simulator) changes on scales of minutes, so 12 frames (17 s) follow it;
  a function of the measured FWHM would need the per-frame seeing of every star, which
  this step does not have.

Devices: ``frames`` and masks may be NumPy or CuPy arrays; positions are computed on the
host (the geometry is NumPy), the kernel runs on the frames' device and its per-position
results come back to the host for the per-source combination (a few numbers per source).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, fields

import numpy as np
from astropy.table import Table

from gpu2mass.backend import get_namespace, to_host
from gpu2mass.errors import ConfigError, InputError, StepError
from gpu2mass.geometry import FrameGeometry, tan_project
from gpu2mass.kernels.aperture import aperture_photometry
from gpu2mass.kernels.scalar.aperture import (
    FLAG_EDGE,
    FLAG_INCOMPLETE,
    FLAG_MASKED_NEAR,
    FLAG_OFF_FRAME,
    FLAG_SATURATED_NEAR,
    FLAG_SKY,
    MASK_SATURATED,
)

__all__ = [
    "FLAG_BITS",
    "FLAG_NONE_MEASURED",
    "FLAG_NO_COVERAGE",
    "AperPhotConfig",
    "AperPhotWarning",
    "CurveOfGrowth",
    "apply_curve_of_growth",
    "curve_of_growth_from_psf",
    "fit_curve_of_growth",
    "moffat_aperture_fraction",
    "run_aperture_photometry",
    "run_r1_photometry",
    "trimmed_mean_variance_factor",
]

#: Source-level flag bits (``flags`` column), above the kernel's per-frame bits, which are
#: OR-ed over the measured frames (:data:`gpu2mass.kernels.aperture.FLAG_BITS`).
FLAG_NO_COVERAGE = 256
FLAG_NONE_MEASURED = 512
FLAG_BITS = {
    FLAG_MASKED_NEAR: "kernel: masked pixel within the guard circle (on a measured frame)",
    FLAG_EDGE: "kernel: guard circle over the frame edge",
    FLAG_SKY: "kernel: too few sky-annulus pixels",
    FLAG_INCOMPLETE: "kernel: an aperture lost area to masked or off-frame pixels",
    FLAG_SATURATED_NEAR: "kernel: saturated pixel within the guard circle",
    FLAG_NO_COVERAGE: "no frame holds the source",
    FLAG_NONE_MEASURED: "frames hold the source but every one was excluded",
}
#: Kernel flags that exclude a frame's measurement (2MASS rules, plus an unusable sky).
_EXCLUDE = FLAG_MASKED_NEAR | FLAG_EDGE | FLAG_OFF_FRAME | FLAG_SKY


class AperPhotWarning(UserWarning):
    """Something a caller should know that does not stop the step."""


@dataclass(frozen=True)
class AperPhotConfig:
    """Configuration of aperture photometry, curve of growth and R1 photometry.

    Attributes
    ----------
    radii_arcsec
        Aperture radii, arcsec, increasing (2MASS: 3"–14" in 1" steps).
    standard_radius_arcsec
        The standard aperture (2MASS: 4"); must be one of ``radii_arcsec``.
    sky_inner_arcsec, sky_outer_arcsec
        Sky annulus (2MASS: 14"–20"), by pixel-centre distance.
    guard_radius_arcsec
        A masked/saturated pixel within this distance, or the frame edge closer than this,
        excludes the frame (2MASS: 4").
    sky_trim
        Fraction dropped at each end of the sorted annulus values before averaging
        (2MASS: "trimmed median", trim unconfirmed; decided 0.2, see the module docstring).
    min_sky_pixels
        Fewer usable annulus pixels exclude the frame (2MASS: unstated; 20).
    detection_snr
        Per-frame 4" SNR above which a frame counts as a detection for ndet (2MASS: 3).
    gain_e_per_dn
        Detector gain for the sources' Poisson noise; 0 ignores it (per band: the caller
        sets the band's value, e.g. from the night's manifest).
    cog_block_frames
        Frames per curve-of-growth block (2MASS re-measured the seeing every ~12 frames).
    cog_min_stars
        Least stars for a block's COG; fewer borrow from neighbouring blocks.
    cog_min_snr
        Least 4" SNR (combined over frames) of a COG star.
    cog_max_flux_dn
        Largest 4" flux (DN) of a COG star; ``inf`` (default, as 2MASS: the brightest
        unsaturated stars are the best) keeps all. A star's diffraction spikes are part of
        its PSF in real data, in proportion at every brightness; the simulator draws them
        only for stars brighter than ``gpu2mass.sim.artifacts.SPIKE_LIMIT`` (~0.8 % of the
        flux inside 14"), so tests on simulated nights keep those stars out with this.
    cog_min_frames
        Least measured frames of a COG star.
    cog_isolation_arcsec
        No other source within this distance may be brighter than ``cog_isolation_dmag``
        below the star (a neighbour inside the sky annulus or the 14" aperture biases the COG).
    cog_isolation_dmag
        Magnitudes below a COG star that a neighbour within the isolation radius may reach.
    cog_clip
        Sigma-clipping threshold of the per-radius star average.
    cog_extrapolation_error
        Fraction of the Moffat extrapolation beyond 14" added (in quadrature) to the COG
        correction's relative error (decided 0.25).
    r1_flux_scale
        R2−R1 over R1 effective exposure: multiplies R1 fluxes into the R2−R1 flux unit
        (2MASS nominal 1.25 s / 0.051 s; the caller sets the night's ``r2r1_exptime_s /
        r1_exptime_s`` from the manifest).
    """

    radii_arcsec: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0,
                                       13.0, 14.0)
    standard_radius_arcsec: float = 4.0
    sky_inner_arcsec: float = 14.0
    sky_outer_arcsec: float = 20.0
    guard_radius_arcsec: float = 4.0
    sky_trim: float = 0.2
    min_sky_pixels: int = 20
    detection_snr: float = 3.0
    gain_e_per_dn: float = 0.0
    cog_block_frames: int = 12
    cog_min_stars: int = 5
    cog_min_snr: float = 100.0
    cog_max_flux_dn: float = math.inf
    cog_min_frames: int = 3
    cog_isolation_arcsec: float = 24.0
    cog_isolation_dmag: float = 5.0
    cog_clip: float = 3.0
    cog_extrapolation_error: float = 0.25
    r1_flux_scale: float = 1.25 / 0.051

    def __post_init__(self):
        r = tuple(float(v) for v in self.radii_arcsec)
        if not r or not all(math.isfinite(v) and v > 0 for v in r) or any(
                b <= a for a, b in itertools.pairwise(r)):
            raise ConfigError(f"aperphot.radii_arcsec = {self.radii_arcsec!r}: need positive, "
                              "strictly increasing radii")
        object.__setattr__(self, "radii_arcsec", r)
        if not any(abs(v - self.standard_radius_arcsec) < 1e-9 for v in r):
            raise ConfigError("aperphot.standard_radius_arcsec must be one of radii_arcsec")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "radii_arcsec":
                continue
            if f.name in ("min_sky_pixels", "cog_block_frames", "cog_min_stars", "cog_min_frames"):
                ok = isinstance(v, int) and v >= (0 if f.name == "min_sky_pixels" else 1)
            elif f.name in ("sky_trim",):
                ok = 0.0 <= v < 0.5
            elif f.name == "cog_max_flux_dn":
                ok = v > 0 and not math.isnan(v)
            elif f.name in ("gain_e_per_dn", "cog_extrapolation_error"):
                ok = math.isfinite(v) and v >= 0
            else:
                ok = math.isfinite(v) and v > 0
            if not ok:
                raise ConfigError(f"aperphot.{f.name} = {v!r} is not valid")
        if not self.sky_inner_arcsec < self.sky_outer_arcsec:
            raise ConfigError("aperphot.sky_inner_arcsec must be < sky_outer_arcsec")

    @property
    def standard_index(self) -> int:
        """Index of the standard aperture in ``radii_arcsec``."""
        return int(np.argmin(np.abs(np.array(self.radii_arcsec) - self.standard_radius_arcsec)))


def trimmed_mean_variance_factor(trim: float) -> float:
    """Variance of the two-sided ``trim`` trimmed mean of n Gaussian values, in units of
    sigma²/n (1 for the mean; pi/2 in the limit of the median)."""
    from scipy.stats import norm

    if trim <= 0:
        return 1.0
    z = float(norm.isf(trim))
    keep = 1.0 - 2.0 * trim
    # Asymptotic variance of the trimmed mean = winsorized variance / keep^2.
    return (keep - 2.0 * z * float(norm.pdf(z)) + 2.0 * trim * z * z) / keep**2


# -- frame stack photometry -----------------------------------------------------------------


def _kernel_mask(xp, mask, saturated, shape):
    mask = xp.asarray(mask)
    if mask.shape not in (shape, shape[1:]):
        raise InputError(None, f"mask must be {shape[1:]} or {shape}, got {mask.shape}")
    m8 = (mask != 0).astype(xp.uint8)
    if saturated is not None:
        sat = xp.asarray(saturated)
        if sat.shape not in (shape, shape[1:]):
            raise InputError(None, f"saturated must be {shape[1:]} or {shape}, got {sat.shape}")
        if sat.shape != m8.shape:
            m8 = xp.broadcast_to(m8, shape)
            sat = xp.broadcast_to(sat, shape)
        m8 = xp.where(sat != 0, xp.uint8(1 | MASK_SATURATED), m8)
    return xp.ascontiguousarray(m8)


def _measure(frames, mask, noise, geometry, ra, dec, saturated, radii_arcsec, config):
    """Kernel measurements of every (source, covering frame) pair plus per-frame errors."""
    xp = get_namespace(frames, mask)
    frames = xp.asarray(frames)
    if frames.ndim != 3:
        raise InputError(None, f"frames must be (n, ny, nx), got shape {frames.shape}")
    n = frames.shape[0]
    if not isinstance(geometry, FrameGeometry) or geometry.nframes != n:
        raise InputError(None, f"geometry must be a FrameGeometry of {n} frames")
    if (geometry.band.ny, geometry.band.nx) != frames.shape[1:]:
        raise InputError(None, "geometry's array size differs from the frames'")
    noise = np.asarray(to_host(xp.asarray(noise)), float)
    if noise.shape != (n,) or not np.all(np.isfinite(noise) & (noise > 0)):
        raise InputError(None, f"noise must be ({n},) finite and > 0, got shape {noise.shape}")
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    if ra.shape != dec.shape or ra.ndim != 1 or not np.all(np.isfinite(ra) & np.isfinite(dec)):
        raise InputError(None, "ra and dec must be finite 1-D arrays of one length")
    m8 = _kernel_mask(xp, mask, saturated, frames.shape)
    if bool((m8 != 0).all()):
        raise InputError(None, "every pixel of every frame is masked")
    scale = geometry.band.scale_arcsec
    src, frm, x, y = geometry.frames_holding(ra, dec)
    radii_px = np.asarray(radii_arcsec, float) / scale
    res = aperture_photometry(
        frames, m8, xp.asarray(frm), xp.asarray(x), xp.asarray(y), radii_px,
        config.sky_inner_arcsec / scale, config.sky_outer_arcsec / scale,
        sky_trim=config.sky_trim, guard_radius_px=config.guard_radius_arcsec / scale,
        min_sky=config.min_sky_pixels)
    flux, npix, sky, sky_sigma, nsky, kflags = (to_host(a) for a in res)
    # Local pixel noise from the annulus (large-scale sky structure, which the frame noise
    # holds and the annulus sky removes, is not noise here); the frame's value where the
    # annulus is too small to tell.
    local = (nsky >= max(config.min_sky_pixels, 1)) & np.isfinite(sky_sigma) & (sky_sigma > 0)
    sig = np.where(local, sky_sigma, noise[frm])[:, None]
    c = trimmed_mean_variance_factor(config.sky_trim)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = npix * sig**2 + npix**2 * c * sig**2 / np.maximum(nsky, 1)[:, None]
    if config.gain_e_per_dn > 0:
        var = var + np.maximum(np.nan_to_num(flux), 0.0) / config.gain_e_per_dn
    measured = ((kflags & _EXCLUDE) == 0) & np.all(np.isfinite(flux), axis=1)
    complete = npix >= np.pi * radii_px**2 * (1.0 - 1e-9)
    return {"src": src, "frm": frm, "x": x, "y": y, "flux": flux, "var": var, "sky": sky,
            "kflags": kflags, "measured": measured, "complete": complete, "nsrc": ra.size,
            "ra": ra, "dec": dec}


def _combine(meas, config, std_index, columns_prefix=""):
    """Per-source unweighted averages of the measured frames, ndet and flags.

    Per aperture, only the measured frames on which that aperture is complete (no masked
    or off-frame pixel inside it) are averaged: the standard aperture is always complete
    on a measured frame (the guard circle is at least as large), larger ones may use
    fewer frames (``n_meas_r``)."""
    nsrc = meas["nsrc"]
    src, frm, flux, var = meas["src"], meas["frm"], meas["flux"], meas["var"]
    ok = meas["measured"]
    nr = flux.shape[1]
    n_cover = np.bincount(src, minlength=nsrc)
    n_sat = np.bincount(src, weights=(meas["kflags"] & FLAG_SATURATED_NEAR) != 0,
                        minlength=nsrc).astype(np.int16)
    s = src[ok]
    m = np.bincount(s, minlength=nsrc)
    okr = meas["complete"][ok]
    f = np.where(okr, flux[ok], 0.0)
    v = np.where(okr, var[ok], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux[ok][:, std_index] / np.sqrt(var[ok][:, std_index])
    ndet_n = np.bincount(s, weights=snr > config.detection_snr, minlength=nsrc).astype(int)
    tot = np.zeros((nsrc, nr))
    tot2 = np.zeros((nsrc, nr))
    vtot = np.zeros((nsrc, nr))
    cnt = np.zeros((nsrc, nr))
    np.add.at(tot, s, f)
    np.add.at(tot2, s, f * f)
    np.add.at(vtot, s, v)
    np.add.at(cnt, s, okr.astype(float))
    fsum = np.zeros(nsrc)
    np.add.at(fsum, s, frm[ok].astype(float))
    flags = np.zeros(nsrc, np.int32)
    np.bitwise_or.at(flags, s, meas["kflags"][ok] & ~FLAG_INCOMPLETE)
    flags[(m > 0) & np.any(cnt == 0, axis=1)] |= FLAG_INCOMPLETE
    flags[n_cover == 0] |= FLAG_NO_COVERAGE
    flags[(n_cover > 0) & (m == 0)] |= FLAG_NONE_MEASURED
    mm = cnt
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(mm > 0, tot / mm, np.nan)
        err = np.where(mm > 0, np.sqrt(vtot) / mm, np.nan)
        sdev = np.sqrt(np.maximum(tot2 - mm * mean**2, 0.0) / (mm - 1))
        scat = np.where(mm > 1, sdev / np.sqrt(mm), np.nan)
        fmean = np.where(m > 0, fsum / m, np.nan)
    width = max(int(m.max()) if m.size else 0, 1)
    used = np.full((nsrc, width), -1, np.int32)
    order = np.lexsort((frm[ok], s))
    so, fo = s[order], frm[ok][order]
    if so.size:
        first = np.searchsorted(so, so)
        used[so, np.arange(so.size) - first] = fo
    p = columns_prefix
    t = Table()
    t["ra"] = meas["ra"]
    t["dec"] = meas["dec"]
    t[p + "flux"] = mean
    t[p + "flux_err"] = err
    t[p + "flux_err_scatter"] = scat
    t[p + "n_cover"] = n_cover.astype(np.int16)
    t[p + "n_meas"] = m.astype(np.int16)
    t[p + "n_meas_r"] = cnt.astype(np.int16)
    t[p + "n_det"] = ndet_n.astype(np.int16)
    t[p + "ndet"] = [f"{min(a, 9)}{min(b, 9)}" for a, b in zip(ndet_n, m, strict=True)]
    t[p + "n_sat"] = n_sat
    t[p + "frame_mean"] = fmean
    t[p + "frames"] = used
    t[p + "flags"] = flags
    for c in ("flux", "flux_err", "flux_err_scatter"):
        t[p + c].unit = "DN"
    return t


def run_aperture_photometry(frames, *, mask, noise, geometry: FrameGeometry, ra, dec,
                            saturated=None, config: AperPhotConfig = AperPhotConfig()) -> Table:
    """Multi-aperture photometry of sky positions on the frame stack of one band of a scan.

    Parameters
    ----------
    frames
        (n, ny, nx) float32 calibrated frames (R2−R1, or R1 through
        :func:`run_r1_photometry`), DN, NumPy or CuPy; the annulus sky is subtracted per
        position, so the frames need not be sky-subtracted.
    mask
        (ny, nx) or (n, ny, nx), non-zero = unusable (bad, saturated, transient-masked).
    noise
        (n,) per-frame pixel noise, DN (the noise model's sigma).
    geometry
        :class:`gpu2mass.geometry.FrameGeometry` of these frames.
    ra, dec
        (N,) source positions, deg.
    saturated
        Optional (ny, nx) or (n, ny, nx), non-zero = saturated (also unusable): counted per
        source in ``n_sat`` (frames with a saturated pixel within the guard radius).
    config
        :class:`AperPhotConfig`.

    Returns
    -------
    astropy.table.Table
        One row per source, in input order: ``ra``, ``dec``; ``flux``, ``flux_err``,
        ``flux_err_scatter`` (N, R) DN, the unweighted mean over the measured frames and
        its errors (module docstring), NaN where no frame was measured; ``n_cover``
        (frames holding the source), ``n_meas`` (M), ``n_det`` (N), ``ndet`` (two-digit
        string "NM", each capped at 9), ``n_sat``, ``frame_mean`` (mean index of the
        measured frames), ``frames`` (N, W) int32 measured frame indices padded with −1,
        ``flags`` (:data:`FLAG_BITS`). ``meta``: ``radii_arcsec``, ``standard_index``.
    """
    meas = _measure(frames, mask, noise, geometry, ra, dec, saturated, config.radii_arcsec,
                    config)
    t = _combine(meas, config, config.standard_index)
    t.meta["radii_arcsec"] = list(config.radii_arcsec)
    t.meta["standard_index"] = config.standard_index
    if len(t) and not (t["n_meas"] > 0).any():
        warnings.warn("no source could be measured on any frame", AperPhotWarning, stacklevel=2)
    return t


# -- curve of growth ------------------------------------------------------------------------


def moffat_aperture_fraction(r, alpha, beta, r_in, r_out):
    """Fraction of a Moffat source's total flux measured in an aperture of radius ``r``
    with the sky from the ``r_in``–``r_out`` annulus (its own wing there subtracted);
    all radii and ``alpha`` in one unit."""
    def ee(q):
        return 1.0 - (1.0 + (np.asarray(q, float) / alpha) ** 2) ** (1.0 - beta)

    ann = (ee(r_out) - ee(r_in)) / (r_out**2 - r_in**2)
    return ee(r) - np.asarray(r, float) ** 2 * ann


@dataclass(frozen=True)
class CurveOfGrowth:
    """Curve-of-growth corrections of one band of one scan, per block of frames.

    Attributes
    ----------
    radii_arcsec
        (R,) the apertures.
    block_frames
        Frames per block; block b holds sources whose mean frame index is in
        ``[b block_frames, (b + 1) block_frames)`` (the last block takes the rest).
    curve, curve_err
        (B, R): mean ratio F(r)/F(4") of the block's stars, and its error.
    correction, correction_err
        (B,): multiplicative correction from the 4" flux to the total flux, and its
        absolute error (statistical and extrapolation parts in quadrature).
    extrapolation
        (B,): the part of ``correction`` from the Moffat extrapolation beyond 14"
        (total over 14" flux).
    alpha_arcsec, beta
        (B,): the fitted Moffat parameters.
    n_stars
        (B,): stars that went into each block's curve.
    shared
        (B, B): fraction of the stars two blocks' curves share, ``|S_b ∩ S_c| /
        sqrt(|S_b| |S_c|)`` (1 on the diagonal; blocks short of ``cog_min_stars`` borrow
        their neighbours' stars, so their statistical errors are correlated). ``None``:
        fully correlated (a correction from the PSF model).
    ratio_scatter
        (R,): the star-to-star scatter of F(r)/F(4") beyond the noise model (faint
        neighbours, the sky annulus), added in quadrature to every star's error before
        the block means; ``None`` for a correction from the PSF model.
    """

    radii_arcsec: np.ndarray
    block_frames: int
    curve: np.ndarray
    curve_err: np.ndarray
    correction: np.ndarray
    correction_err: np.ndarray
    extrapolation: np.ndarray
    alpha_arcsec: np.ndarray
    beta: np.ndarray
    n_stars: np.ndarray
    shared: np.ndarray | None = None
    ratio_scatter: np.ndarray | None = None

    def scale_error(self, weights) -> float:
        """Fractional error of the weighted mean of the blocks' corrections: the error of
        the photometric scale a scan gets from this curve of growth (its PSF magnitudes are
        normalised to the standard aperture over all its stars).

        The statistical part of each block's error (the 14" point of the curve) is
        correlated between blocks through the stars they share (``shared``); the rest of
        ``correction_err`` (the extrapolation's model error, or the PSF model's error
        when there is no measured curve) is common to all blocks.

        Parameters
        ----------
        weights
            (B,) non-negative weights of the blocks (e.g. the stars normalised in each).
        """
        w = np.asarray(weights, float)
        if w.shape != self.correction.shape or not np.all(w >= 0) or w.sum() <= 0:
            raise ValueError("scale_error: weights need one non-negative value per block, not all zero")
        w = w / w.sum()
        rel = self.correction_err / self.correction
        stat = np.minimum(self.curve_err[:, -1] * self.extrapolation / self.correction, rel)
        common = np.sqrt(np.maximum(rel**2 - stat**2, 0.0))
        shared = np.ones((w.size, w.size)) if self.shared is None else self.shared
        var = (w * stat) @ shared @ (w * stat) + (w @ common) ** 2
        return float(np.sqrt(var))

    def block_of(self, frame_mean):
        """Block index of sources with mean frame index ``frame_mean`` (NaN → 0)."""
        b = np.floor(np.nan_to_num(np.asarray(frame_mean, float)) / self.block_frames)
        return np.clip(b, 0, self.correction.size - 1).astype(int)


def _cog_stars(phot: Table, config: AperPhotConfig):
    """Row indices of bright, isolated, unsaturated, completely measured stars."""
    si = config.standard_index
    f4 = np.asarray(phot["flux"][:, si], float)
    e4 = np.asarray(phot["flux_err"][:, si], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = f4 / e4
    bad = FLAG_INCOMPLETE | FLAG_SKY | FLAG_SATURATED_NEAR | FLAG_NO_COVERAGE | FLAG_NONE_MEASURED
    ok = ((snr >= config.cog_min_snr) & (f4 <= config.cog_max_flux_dn)
          & (np.asarray(phot["n_meas"]) >= config.cog_min_frames)
          & ((np.asarray(phot["flags"]) & bad) == 0) & (np.asarray(phot["n_sat"]) == 0)
          & np.all(np.isfinite(np.asarray(phot["flux"])), axis=1))
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return idx
    # Isolation against every source of the table (with its 4" flux; unmeasured ones count
    # as bright: a saturated neighbour is exactly what must be avoided).
    ra, dec = np.asarray(phot["ra"], float), np.asarray(phot["dec"], float)
    fl = np.where(np.isfinite(f4), f4, np.inf)
    order = np.argsort(dec)
    dsort = dec[order]
    rad = config.cog_isolation_arcsec / 3600.0
    keep = []
    for i in idx:
        lo, hi = np.searchsorted(dsort, [dec[i] - rad, dec[i] + rad])
        j = order[lo:hi]
        j = j[j != i]
        xi, eta = tan_project(ra[j], dec[j], ra[i], dec[i])
        close = np.hypot(xi, eta) < config.cog_isolation_arcsec
        if not np.any(fl[j][close] > f4[i] * 10 ** (-0.4 * config.cog_isolation_dmag)):
            keep.append(i)
    return np.array(keep, int)


def _weighted_clipped_mean(v, e, clip):
    keep = np.isfinite(v) & np.isfinite(e) & (e > 0)
    for _ in range(5):
        if keep.sum() < 2:
            break
        w = 1.0 / e[keep] ** 2
        order = np.argsort(v[keep])
        cw = np.cumsum(w[order])
        med = v[keep][order][np.searchsorted(cw, 0.5 * cw[-1])]
        mad = 1.4826 * np.median(np.abs(v[keep] - med))
        scale = mad if mad > 0 else float(np.median(e[keep]))
        new = keep & (np.abs(v - med) <= clip * np.maximum(scale, e))
        if np.array_equal(new, keep):
            break
        keep = new
    w = 1.0 / e[keep] ** 2
    mean = float(np.sum(w * v[keep]) / np.sum(w))
    formal = float(1.0 / np.sqrt(np.sum(w)))
    n = int(keep.sum())
    if n >= 3:
        chi2 = float(np.sum(w * (v[keep] - mean) ** 2) / (n - 1))
        formal *= math.sqrt(max(chi2, 1.0))
    return mean, formal, n


def _intrinsic_scatter(dev, err, n_means, clip):
    """Scatter ``tau`` >= 0 beyond ``err`` of deviations ``dev`` from ``n_means`` fitted
    means: the root of ``sum dev² / (err² + tau²) = n − n_means`` over the deviations
    within ``clip`` robust sigma (0 when the noise model already explains them)."""
    from scipy.optimize import brentq

    ok = np.isfinite(dev) & np.isfinite(err) & (err > 0)
    dev, err = dev[ok], err[ok]
    if dev.size == 0:
        return 0.0
    mad = 1.4826 * float(np.median(np.abs(dev)))
    keep = np.abs(dev) <= clip * np.maximum(mad, err)
    d2, e2 = dev[keep] ** 2, err[keep] ** 2
    dof = d2.size - n_means
    if dof < 2 or np.sum(d2 / e2) <= dof:
        return 0.0
    # Each term is below d2 / tau², so at tau² = max(d2) · size / dof the sum is below dof.
    hi = float(d2.max()) * d2.size / dof
    return math.sqrt(brentq(lambda t2: np.sum(d2 / (e2 + t2)) - dof, 0.0, hi))


def _fit_moffat(radii, curve, err, std_r, r_in, r_out):
    """Moffat (alpha, beta) whose aperture fractions relative to ``std_r`` fit ``curve``.

    The cost is first evaluated on a log grid over the whole allowed range (alpha 0.05–20,
    beta 1.05–20: one vectorised pass) and the least-squares fit starts from the grid's
    best point: the global minimum without the nine scipy fits from fixed starts this
    replaced (0.7 s of Python per band for the scan preset; same minimum).
    """
    from scipy.optimize import least_squares

    lo, hi = (0.05, 1.05), (20.0, 20.0)

    def model(a, b):
        return (moffat_aperture_fraction(radii, a, b, r_in, r_out)
                / moffat_aperture_fraction(std_r, a, b, r_in, r_out))

    def resid(p):
        return (model(*p) - curve) / err

    ga = np.geomspace(lo[0], hi[0], 48)[:, None, None]
    gb = np.geomspace(lo[1], hi[1], 48)[None, :, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cost = np.nansum(((model(ga, gb) - curve) / err) ** 2, axis=-1)
    ia, ib = np.unravel_index(np.argmin(np.where(np.isfinite(cost), cost, np.inf)), cost.shape)
    start = (float(ga[ia, 0, 0]), float(gb[0, ib, 0]))
    return least_squares(resid, start, bounds=(lo, hi)).x


def fit_curve_of_growth(phot: Table, *, config: AperPhotConfig = AperPhotConfig(),
                        nframes: int | None = None) -> CurveOfGrowth:
    """Curve-of-growth corrections (4" → total) per block of frames (module docstring).

    Parameters
    ----------
    phot
        Output of :func:`run_aperture_photometry` on the R2−R1 frames of one band of one
        scan (every detected source, so that isolation can be judged).
    config
        The same :class:`AperPhotConfig` (radii, selection and block parameters).
    nframes
        Frames in the scan (default: from the largest frame index in ``phot``).

    Raises
    ------
    StepError
        Fewer than ``cog_min_stars`` usable stars in the whole scan.
    """
    radii = np.asarray(phot.meta.get("radii_arcsec", config.radii_arcsec), float)
    if radii.size != len(config.radii_arcsec) or not np.allclose(radii, config.radii_arcsec):
        raise InputError(None, "phot was measured with other radii than config.radii_arcsec")
    si = config.standard_index
    stars = _cog_stars(phot, config)
    if stars.size < config.cog_min_stars:
        raise StepError(f"curve of growth: {stars.size} usable stars, need "
                        f"{config.cog_min_stars} (cog_min_stars)")
    if nframes is None:
        fr = np.asarray(phot["frames"])
        nframes = int(fr.max()) + 1 if fr.size else 1
    nb = max(1, math.ceil(nframes / config.cog_block_frames))
    flux = np.asarray(phot["flux"], float)[stars]
    ferr = np.asarray(phot["flux_err"], float)[stars]
    ratio = flux / flux[:, si : si + 1]
    # Error of each ratio, ignoring the (positive) correlation of the two apertures' noise:
    # conservative; the clipping and the chi2 scaling take the real scatter into account.
    rerr = np.abs(ratio) * np.sqrt((ferr / flux) ** 2 + (ferr[:, si : si + 1] / flux[:, si : si + 1]) ** 2)
    rerr[:, si] = 1.0
    block = np.clip(np.floor(np.asarray(phot["frame_mean"], float)[stars] / config.cog_block_frames),
                    0, nb - 1).astype(int)
    nr = radii.size
    curve = np.ones((nb, nr))
    cerr = np.zeros((nb, nr))
    corr = np.ones(nb)
    corr_err = np.zeros(nb)
    extra = np.ones(nb)
    alpha = np.zeros(nb)
    beta = np.zeros(nb)
    nst = np.zeros(nb, int)
    members = np.zeros((nb, block.size), bool)
    r_in, r_out = config.sky_inner_arcsec, config.sky_outer_arcsec
    for b in range(nb):
        width = 0
        sel = block == b
        while sel.sum() < config.cog_min_stars and width < nb:
            width += 1
            sel = np.abs(block - b) <= width
        members[b] = sel
        nst[b] = int(sel.sum())
    # The noise model leaves out what makes bright stars' ratios differ from each other
    # (neighbours up to cog_isolation_dmag fainter inside 14" or in the annulus, the ones
    # below detection): against the simulator's PSF, the block curves at 14" were off by
    # 2.3 times their errors in J and 1.6 in H (ci seed 11; one bright star carries a
    # block's inverse-variance mean). That scatter, measured on the scan's deviations from
    # the block means (one pass), joins every star's error; the means are then taken again.
    sigma = np.zeros(nr)
    for j in range(nr):
        if j == si:
            continue
        first = np.array([_weighted_clipped_mean(ratio[members[b], j], rerr[members[b], j],
                                                 config.cog_clip)[0] for b in range(nb)])
        sigma[j] = _intrinsic_scatter(ratio[:, j] - first[block], rerr[:, j],
                                      np.unique(block).size, config.cog_clip)
        tot = np.hypot(rerr[:, j], sigma[j])
        for b in range(nb):
            curve[b, j], cerr[b, j], _ = _weighted_clipped_mean(ratio[members[b], j],
                                                                 tot[members[b]], config.cog_clip)
    for b in range(nb):
        fit_err = np.where(cerr[b] > 0, cerr[b], 1e-4)
        a, bt = _fit_moffat(radii, curve[b], fit_err, radii[si], r_in, r_out)
        alpha[b], beta[b] = a, bt
        extra[b] = 1.0 / moffat_aperture_fraction(radii[-1], a, bt, r_in, r_out)
        corr[b] = curve[b, -1] * extra[b]
        corr_err[b] = math.hypot(cerr[b, -1] * extra[b],
                                 config.cog_extrapolation_error * (extra[b] - 1.0) * curve[b, -1])
    m = members.astype(float)
    size = np.sqrt(np.maximum(m.sum(1), 1.0))
    shared = (m @ m.T) / np.outer(size, size)
    return CurveOfGrowth(radii, config.cog_block_frames, curve, cerr, corr, corr_err, extra,
                         alpha, beta, nst, shared, sigma)


def apply_curve_of_growth(phot: Table, cog: CurveOfGrowth, *,
                          config: AperPhotConfig = AperPhotConfig(), flux_column: str = "flux",
                          prefix: str = "") -> Table:
    """Standard-aperture (COG-corrected 4") fluxes: a copy of ``phot`` with columns
    ``{prefix}cog_correction``, ``{prefix}cog_correction_err`` and ``{prefix}flux_stdap``,
    ``{prefix}flux_stdap_err`` (DN: total flux in the frames' flux unit; a magnitude needs
    the caller's zero point). The error adds the COG correction's error in quadrature to
    the flux's noise-model error."""
    t = phot.copy(copy_data=True)
    fl = np.asarray(t[flux_column], float)
    er = np.asarray(t[flux_column + "_err"], float)
    if fl.ndim == 2:
        fl, er = fl[:, config.standard_index], er[:, config.standard_index]
    b = cog.block_of(t[prefix + "frame_mean"] if prefix + "frame_mean" in t.colnames else t["frame_mean"])
    c, ce = cog.correction[b], cog.correction_err[b]
    t[prefix + "cog_correction"] = c
    t[prefix + "cog_correction_err"] = ce
    t[prefix + "flux_stdap"] = fl * c
    t[prefix + "flux_stdap_err"] = np.sqrt((er * c) ** 2 + (fl * ce) ** 2)
    t[prefix + "flux_stdap"].unit = "DN"
    t[prefix + "flux_stdap_err"].unit = "DN"
    return t


def curve_of_growth_from_psf(alpha_arcsec, beta, *, config: AperPhotConfig = AperPhotConfig(),
                             model_error: float = 0.01) -> CurveOfGrowth:
    """Curve-of-growth corrections from a Moffat PSF model instead of measured stars.

    For scans too short or too sparse for :func:`fit_curve_of_growth` (a 1° calibration
    scan at high latitude can hold fewer than ``cog_min_stars`` usable stars): per block of
    ``cog_block_frames`` frames, the curve F(r)/F(4") and the 4" → total correction of the
    Moffat with the block's mean ``alpha_arcsec`` and ``beta`` (arrays per frame, arcsec),
    sky from the same annulus. ``model_error``: fractional error given to the correction
    (the PSF model's 4" encircled energy is good to ~0.5 %, tests/test_psfmodel.py; 1 % is
    held to cover the wings the model extrapolates).
    """
    a = np.asarray(alpha_arcsec, float)
    b = np.broadcast_to(np.asarray(beta, float), a.shape)
    nb = max(1, -(-a.size // config.cog_block_frames))
    radii = np.asarray(config.radii_arcsec, float)
    r_in, r_out = config.sky_inner_arcsec, config.sky_outer_arcsec
    alpha_b = np.array([a[i * config.cog_block_frames:(i + 1) * config.cog_block_frames].mean()
                        for i in range(nb)])
    beta_b = np.array([b[i * config.cog_block_frames:(i + 1) * config.cog_block_frames].mean()
                       for i in range(nb)])
    std = moffat_aperture_fraction(config.standard_radius_arcsec, alpha_b, beta_b, r_in, r_out)
    curve = np.stack([moffat_aperture_fraction(r, alpha_b, beta_b, r_in, r_out) / std
                      for r in radii], axis=1)
    corr = 1.0 / std
    edge = moffat_aperture_fraction(radii[-1], alpha_b, beta_b, r_in, r_out)
    return CurveOfGrowth(radii, config.cog_block_frames, curve, np.zeros_like(curve), corr,
                         model_error * corr, 1.0 / edge, alpha_b, beta_b, np.zeros(nb, int))


# -- R1 photometry --------------------------------------------------------------------------


def run_r1_photometry(r1_frames, *, mask, noise, geometry: FrameGeometry, phot: Table,
                      cog: CurveOfGrowth, saturated=None,
                      config: AperPhotConfig = AperPhotConfig()) -> Table:
    """R1 (51 ms) photometry, rd_flg 1, of the sources saturated in R2−R1 (facts sheet 3.5).

    Parameters
    ----------
    r1_frames
        (n, ny, nx) calibrated R1 frames, DN (same frames and geometry as the R2−R1 ones).
    mask, saturated, noise
        As for :func:`run_aperture_photometry`, for the R1 frames (``saturated``: R1
        saturation, which excludes a frame within the guard radius).
    phot
        :func:`run_aperture_photometry` on the R2−R1 frames (with their ``saturated`` map):
        sources with ``n_sat > 0`` (saturated in any covering R2−R1 frame) are measured.
    cog
        The scan's R2−R1 :class:`CurveOfGrowth` (applied to R1 as well).

    Returns
    -------
    astropy.table.Table
        One row per selected source: ``index`` (row in ``phot``), ``ra``, ``dec``,
        ``r1_flux``, ``r1_flux_err``, ``r1_flux_err_scatter`` (4", R1 DN, unweighted mean
        over the usable R1 frames), ``r1_n_cover``, ``r1_n_meas``, ``r1_n_det``, ``r1_ndet``,
        ``r1_n_sat``, ``r1_frame_mean``, ``r1_frames``, ``r1_flags``, and
        ``flux_stdap``, ``flux_stdap_err`` (R2−R1 DN: R1 flux × ``r1_flux_scale`` × COG
        correction), ``r1_status`` (1: measured, rd_flg 1; 3: saturated on every covering
        R1 frame, for the radial-profile fit of rd_flg 3; 0: not measurable).
    """
    sel = np.flatnonzero(np.asarray(phot["n_sat"]) > 0)
    ra = np.asarray(phot["ra"], float)[sel]
    dec = np.asarray(phot["dec"], float)[sel]
    r1cfg = config
    std = (config.standard_radius_arcsec,)
    meas = _measure(r1_frames, mask, noise, geometry, ra, dec, saturated, std, r1cfg)
    t = _combine(meas, config, 0, columns_prefix="r1_")
    t["r1_flux"] = t["r1_flux"][:, 0]
    t["r1_flux_err"] = t["r1_flux_err"][:, 0]
    t["r1_flux_err_scatter"] = t["r1_flux_err_scatter"][:, 0]
    t.add_column(sel, name="index", index=0)
    scale = config.r1_flux_scale
    b = cog.block_of(np.where(np.isfinite(t["r1_frame_mean"]), t["r1_frame_mean"],
                              np.asarray(phot["frame_mean"], float)[sel]))
    c, ce = cog.correction[b], cog.correction_err[b]
    fl = np.asarray(t["r1_flux"], float) * scale
    er = np.asarray(t["r1_flux_err"], float) * scale
    t["flux_stdap"] = fl * c
    t["flux_stdap_err"] = np.sqrt((er * c) ** 2 + (fl * ce) ** 2)
    t["flux_stdap"].unit = "DN"
    t["flux_stdap_err"].unit = "DN"
    n_meas = np.asarray(t["r1_n_meas"])
    all_sat = (n_meas == 0) & (np.asarray(t["r1_n_sat"]) > 0) & (
        np.asarray(t["r1_n_sat"]) == np.asarray(t["r1_n_cover"]))
    t["r1_status"] = np.where(n_meas > 0, 1, np.where(all_sat, 3, 0)).astype(np.int8)
    t.meta["r1_flux_scale"] = scale
    return t
