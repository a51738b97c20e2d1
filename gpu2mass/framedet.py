"""Single-frame detection and 4" aperture photometry (2MAPPS IV.4, facts sheet 3.2 / 3.4).

:func:`run_frame_detection` finds point sources on each calibrated, sky-subtracted frame of
one band of one scan (R2−R1 or R1: the same rules, only the fluxes differ) and measures
them. The steps, and the decisions this implementation made where 2MASS is not explicit:

1. **Matched filter.** Masked pixels are set to 0 and each frame is smoothed with a
   normalized Gaussian of ``filter_sigma_px`` (0.7 px: a 2.8" Moffat integrated over 2"
   pixels is close to a Gaussian of that width, so this is near the optimal matched filter
   for 2" pixels). The smoothed image's noise is ``noise * sqrt(sum(K**2))`` for the
   discrete kernel K (exact for white noise), through the namespace's ``ndimage``.
2. **Candidates (Tpk).** Unmasked 3 x 3 local maxima of the smoothed frame exceeding the
   local background by ``tpk`` = 4 *smoothed-image* noise units. Decision: the unit is the
   matched-filter noise, not the raw pixel noise (on raw 2" pixels 4 sigma would miss
   the faint end and multiply noise peaks); the background is 0 because the frames are
   sky-subtracted (the local sky is measured in step 4 for the photometry).
3. **3 x 3 rule.** Candidates with a masked or off-frame pixel in the 3 x 3 box around the
   peak are dropped (2MASS). The 3 x 3 centroid starts the fit.
4. **Sky and Tsnr.** Sky = median of unmasked pixels whose centres lie 14"–20" (7–10 px)
   from the centroid. Decision: ``Fs >= Tsnr = 10`` is read as the SNR of the
   sky-subtracted 3 x 3 flux, ``(sum3x3 − 9 sky) / (3 noise)`` (a flux of 10 DN would be
   meaningless across bands and reads); candidates below are dropped.
5. **Position.** A Moffat template (index ``psf_beta``, FWHM ``seeing_fwhm``) integrated
   over pixels is fitted for (x, y, flux) to the unmasked pixels within ``fit_radius``
   (4", as PROPHOT) of the peak, the sky held fixed, by iteratively reweighted
   Gauss-Newton (weights ``1 / (noise² + model / gain)``). This replaces 2MASS's per-axis
   maximum-likelihood zero crossing by the joint optimum of the same likelihood. If it
   fails the centroid is kept and :data:`FLAG_FIT_FAILED` set.
6. **Aperture.** Flux in a 4" (2 px) radius circle at the fitted position, partial pixels
   by area (16 x 16 sub-sampling), minus the sky; error
   ``sqrt(A noise² + A² (pi/2) noise² / n_sky + flux / gain)`` (A = aperture area in
   pixels; the median's variance is pi/2 that of a mean).
7. **Seeing.** When ``seeing_fwhm`` is not given it is estimated per frame, as 2MASS did,
   from the fraction of the flux in the peak pixel: a first pass with ``nominal_fwhm``
   measures ``(peak − sky) / aperture flux`` of bright (SNR > 50), unflagged sources;
   for each the Moffat FWHM giving that ratio at its sub-pixel phase is found on a grid,
   and the per-frame median (then a running median over ``seeing_window`` frames, the
   seeing changing slowly) is used for the final pass.

Flags (``flags`` column, bits; :data:`FLAG_BITS` documents them): masked pixel within 4",
aperture off the frame edge, saturated-looking peak (``saturation`` level given), blended
(another candidate within ``blend_radius``, 5"), fit failed, too few sky pixels.

Devices: NumPy or CuPy inputs (not mixed); the pixel work runs in
:mod:`gpu2mass.kernels.detect` on the inputs' device, and the table comes back to the host
at the end (the sanctioned copy at a step's end). The seeing estimate copies only the few
bright sources' measurements to the host.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import numpy as np
from astropy.table import Table

from gpu2mass.backend import get_namespace, get_ndimage, to_host
from gpu2mass.errors import ConfigError, InputError
from gpu2mass.kernels.detect import find_peaks, measure_sources
from gpu2mass.kernels.scalar.detect import (
    FLAG_BITS,
    FLAG_BLENDED,
    FLAG_EDGE,
    FLAG_FIT_FAILED,
    FLAG_MASKED_NEAR,
    FLAG_SATURATED,
    FLAG_SKY,
    MEASURE_COLUMNS,
    N_PARAMS,
    P_BLEND_RADIUS,
    P_FIT_RADIUS,
    P_GAIN,
    P_R_AP,
    P_R_IN,
    P_R_OUT,
    P_SATURATION,
    P_TSNR,
    REJECT_LOW_SNR,
    REJECT_MASKED,
)

__all__ = [
    "COLUMNS",
    "FLAG_BITS",
    "FLAG_BLENDED",
    "FLAG_EDGE",
    "FLAG_FIT_FAILED",
    "FLAG_MASKED_NEAR",
    "FLAG_SATURATED",
    "FLAG_SKY",
    "FrameDetConfig",
    "FrameDetWarning",
    "moffat_alpha_px",
    "run_frame_detection",
]

#: Output columns, in order, with their dtypes.
COLUMNS = {
    "frame": np.int32, "x": np.float64, "y": np.float64, "x_err": np.float64,
    "y_err": np.float64, "flux": np.float64, "flux_err": np.float64, "peak": np.float64,
    "snr": np.float64, "fpeak": np.float64, "flags": np.int32,
}
_UNITS = {"x": "pix", "y": "pix", "x_err": "pix", "y_err": "pix", "flux": "DN",
          "flux_err": "DN", "peak": "DN"}


class FrameDetWarning(UserWarning):
    """Something a caller should know but that does not stop the step (e.g. no sources)."""


@dataclass(frozen=True)
class FrameDetConfig:
    """Configuration of single-frame detection; 2MASS values as defaults.

    Attributes
    ----------
    tpk
        Peak threshold above the local background, in units of the matched-filtered
        frame's noise (2MASS Tpk = 4; unit decided here, see the module docstring).
    tsnr
        Minimum SNR of the sky-subtracted 3 x 3 flux (2MASS Tsnr = 10).
    filter_sigma_px
        Gaussian matched-filter sigma, pixels (0.7: a 2.8" Moffat on 2" pixels).
    aperture_radius_arcsec
        Aperture radius (2MASS standard: 4").
    sky_inner_arcsec, sky_outer_arcsec
        Sky annulus radii (2MASS 14"–20").
    fit_radius_arcsec
        Radius of the pixels used by the PSF-template fit (PROPHOT: 2 pixels = 4").
    blend_radius_arcsec
        Another candidate peak within this distance sets the blend flag (2MASS fit
        candidates within ~5" together).
    pixel_scale_arcsec
        Camera pixel scale (2MASS: 2.0"/px).
    psf_beta
        Moffat index of the PSF template.
    nominal_fwhm_arcsec
        Moffat FWHM (before pixel integration) for the first pass of the seeing estimate.
    seeing_min_snr
        Sources above this aperture SNR (and unflagged) feed the seeing estimate.
    seeing_window
        Frames in the running median of the per-frame seeing estimate (odd).
    saturation_dn
        Peak level (DN, on the calibrated frame) at or above which a source is flagged
        saturated; ``inf`` for none.
    gain_e_per_dn
        Detector gain for the sources' Poisson noise in weights and errors; 0 to ignore it.
    """

    tpk: float = 4.0
    tsnr: float = 10.0
    filter_sigma_px: float = 0.7
    aperture_radius_arcsec: float = 4.0
    sky_inner_arcsec: float = 14.0
    sky_outer_arcsec: float = 20.0
    fit_radius_arcsec: float = 4.0
    blend_radius_arcsec: float = 5.0
    pixel_scale_arcsec: float = 2.0
    psf_beta: float = 2.5
    nominal_fwhm_arcsec: float = 2.8
    seeing_min_snr: float = 50.0
    seeing_window: int = 5
    saturation_dn: float = math.inf
    gain_e_per_dn: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "saturation_dn":
                ok = not math.isnan(v)
            elif f.name == "seeing_window":
                ok = isinstance(v, int) and v >= 1 and v % 2 == 1
            elif f.name == "gain_e_per_dn":
                ok = math.isfinite(v) and v >= 0
            else:
                ok = math.isfinite(v) and v > 0
            if not ok:
                raise ConfigError(f"framedet.{f.name} = {v!r} is not valid")
        if self.psf_beta <= 1:
            raise ConfigError("framedet.psf_beta must be > 1")
        if not self.sky_inner_arcsec < self.sky_outer_arcsec:
            raise ConfigError("framedet.sky_inner_arcsec must be < sky_outer_arcsec")
        if self.sky_outer_arcsec / self.pixel_scale_arcsec > 11:
            raise ConfigError("framedet.sky_outer_arcsec must be <= 11 pixels (kernel buffer)")


def moffat_alpha_px(fwhm_arcsec, beta: float, pixel_scale_arcsec: float):
    """Moffat alpha (px) of a Moffat of FWHM ``fwhm_arcsec`` (before pixel integration)."""
    return np.asarray(fwhm_arcsec, float) / pixel_scale_arcsec / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _params(cfg: FrameDetConfig) -> np.ndarray:
    p = np.zeros(N_PARAMS)
    s = cfg.pixel_scale_arcsec
    p[P_R_AP] = cfg.aperture_radius_arcsec / s
    p[P_R_IN] = cfg.sky_inner_arcsec / s
    p[P_R_OUT] = cfg.sky_outer_arcsec / s
    p[P_FIT_RADIUS] = cfg.fit_radius_arcsec / s
    p[P_BLEND_RADIUS] = cfg.blend_radius_arcsec / s
    p[P_SATURATION] = cfg.saturation_dn
    p[P_GAIN] = cfg.gain_e_per_dn
    p[P_TSNR] = cfg.tsnr
    return p


def _empty_table() -> Table:
    t = Table({k: np.zeros(0, dtype=v) for k, v in COLUMNS.items()})
    for k, u in _UNITS.items():
        t[k].unit = u
    return t


def _smooth(xp, frames, mask, sigma):
    """Gaussian-filtered frames (masked pixels as 0) and the filter's noise gain."""
    clean = xp.where(mask, xp.float32(0), frames).astype(xp.float32)
    if xp is np:
        # SciPy's filter, computed the same way bit for bit, on both cores.
        from gpu2mass.kernels.cpu.gauss import gaussian_smooth_frames

        smoothed = gaussian_smooth_frames(clean, sigma)
    else:
        smoothed = get_ndimage(xp).gaussian_filter(clean, sigma=(0, sigma, sigma), mode="constant",
                                                   cval=0.0)
    # The noise of a filtered white-noise image is sigma_pix * sqrt(sum K^2): filter a delta.
    size = 2 * math.ceil(4 * sigma) + 3
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    import scipy.ndimage as snd

    gain = math.sqrt(float((snd.gaussian_filter(delta, sigma, mode="constant") ** 2).sum()))
    return smoothed, gain


def _detect_pass(xp, frames, mask, noise, alpha, cfg, smoothed, filt_gain, min_sigma=0.0):
    """Find and measure candidates; only those whose filtered peak exceeds ``min_sigma``
    filtered-noise units are measured (all candidates still count for the blend flag)."""
    threshold = cfg.tpk * filt_gain * noise
    peaks = find_peaks(smoothed, mask, threshold)
    fi, yi, xi = xp.nonzero(peaks)
    if min_sigma > 0:
        strong = smoothed[fi, yi, xi] > min_sigma * filt_gain * noise[fi]
        fi, yi, xi = fi[strong], yi[strong], xi[strong]
    values, flags = measure_sources(
        frames, mask, peaks, fi, yi, xi, noise=noise, alpha=alpha, beta=cfg.psf_beta,
        params=_params(cfg) if xp is np else xp.asarray(_params(cfg)))
    keep = (flags & (REJECT_MASKED | REJECT_LOW_SNR)) == 0
    return fi[keep], values[keep], flags[keep]


def _interp_decreasing(r, pred, grid):
    """Per source i, ``np.interp(-r[i], -p_i, grid)`` for a curve p_i decreasing along
    ``grid``, evaluating p_i only where a bisection needs it.

    ``pred(k)`` gives every source's p at grid indices ``k`` (int array (m,)). The bracket
    of each r (p[j] >= r > p[j+1]) is found in log2(len(grid)) steps instead of evaluating
    the whole curve (each value is a pixel integral: the full curves cost seconds per scan);
    ratios beyond the curve's ends take the end's grid value and NaN stays NaN, as np.interp.
    """
    m, g = r.size, grid.size
    lo, hi = np.zeros(m, np.int64), np.full(m, g - 1)
    p_lo, p_hi = pred(lo), pred(hi)
    first, last = p_lo, p_hi  # the curve's ends
    # Invariant inside: p[lo] >= r > p[hi]; bisect until hi = lo + 1.
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        p_mid = pred(mid)
        up = p_mid >= r  # the bracket moves to [mid, hi]
        lo, p_lo = np.where(up, mid, lo), np.where(up, p_mid, p_lo)
        hi, p_hi = np.where(up, hi, mid), np.where(up, p_hi, p_mid)
    # np.interp's formula on the increasing abscissae -p.
    x, x0, x1 = -r, -p_lo, -p_hi
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (grid[hi] - grid[lo]) / (x1 - x0) * (x - x0) + grid[lo]
    out = np.where(r >= first, grid[0], out)
    out = np.where(r <= last, grid[-1], out)
    return np.where(np.isfinite(r), out, np.nan)


def _estimate_alpha(fi, values, flags, n, cfg):
    """Per-frame Moffat alpha (px) from the peak-pixel fraction of bright sources."""
    from gpu2mass.kernels.reference.psf import moffat_pixel_integral

    cols = {c: i for i, c in enumerate(MEASURE_COLUMNS)}
    fi, values, flags = to_host(fi), to_host(values), to_host(flags)
    sel = (flags == 0) & (values[:, cols["snr"]] > cfg.seeing_min_snr)
    nominal = float(moffat_alpha_px(cfg.nominal_fwhm_arcsec, cfg.psf_beta, cfg.pixel_scale_arcsec))
    if not sel.any():
        return np.full(n, nominal)
    v = values[sel]
    ratio = (v[:, cols["peak"]] - v[:, cols["sky"]]) / v[:, cols["flux"]]
    px = v[:, cols["x"]] - np.rint(v[:, cols["x"]])
    py = v[:, cols["y"]] - np.rint(v[:, cols["y"]])
    r_ap = cfg.aperture_radius_arcsec / cfg.pixel_scale_arcsec
    grid = np.linspace(0.4, 3.0, 105)  # alpha, px (FWHM 1.2"-9" at beta 2.5)
    b = cfg.psf_beta
    # Peak-pixel fraction at each source's phase over aperture fraction (encircled energy,
    # 1 - (1 + r^2/alpha^2)^(1-beta); the phase dependence of the aperture is < 0.5 %),
    # decreasing in alpha; each source's alpha interpolated linearly between the grid
    # values that bracket its ratio.
    ee = 1.0 - (1.0 + r_ap**2 / grid**2) ** (1.0 - b)

    def pred(k):
        """The prediction of every source at grid index k (m,)."""
        return moffat_pixel_integral(-px, -py, grid[k], b) / ee[k]

    est = _interp_decreasing(ratio, pred, grid)
    frame_of = fi[sel]
    per_frame = np.full(n, np.nan)
    for f in range(n):
        e = est[frame_of == f]
        if e.size:
            per_frame[f] = np.median(e)
    if np.all(np.isnan(per_frame)):
        return np.full(n, nominal)
    h = cfg.seeing_window // 2
    out = np.empty(n)
    for f in range(n):
        w = per_frame[max(0, f - h) : f + h + 1]
        w = w[np.isfinite(w)]
        out[f] = np.median(w) if w.size else np.nanmedian(per_frame)
    return out


def run_frame_detection(frames, *, mask, noise, seeing_fwhm=None,
                        config: FrameDetConfig = FrameDetConfig()) -> Table:
    """Detect and measure point sources on each frame of one band of one scan.

    Parameters
    ----------
    frames
        (n, ny, nx) float32 calibrated, sky-subtracted frames (R2−R1 or R1), DN, NumPy or
        CuPy. Non-finite pixels join the mask (one warning).
    mask
        (ny, nx) or (n, ny, nx) bool/integer, non-zero = unusable; same namespace.
    noise
        (n,) per-frame pixel noise, DN (e.g. half the 15.87–84.13 % quantile distance).
    seeing_fwhm
        Moffat FWHM (arcsec, before pixel integration) of each frame's PSF, scalar or
        (n,); ``None`` estimates it from the frames (module docstring, step 7).
    config
        :class:`FrameDetConfig`.

    Returns
    -------
    astropy.table.Table
        One row per accepted detection, on the host: ``frame`` (index into ``frames``),
        ``x``, ``y`` (0-based pixel, centres at integers), ``x_err``, ``y_err`` (px, from
        the fit's covariance; NaN when the fit failed), ``flux``, ``flux_err`` (4" aperture,
        DN), ``peak`` (DN), ``snr`` (flux / flux_err), ``fpeak`` (peak-pixel fraction of
        the fitted PSF flux), ``flags`` (:data:`FLAG_BITS`). ``meta["seeing_fwhm"]`` holds
        the per-frame FWHM used (arcsec). No frames or no detections: an empty table with
        the columns (and a :class:`FrameDetWarning` when frames had no detections).

    Raises
    ------
    InputError
        Wrong shapes, non-positive or non-finite noise, all pixels masked.
    """
    xp = get_namespace(frames, mask, noise)
    frames = xp.asarray(frames)
    if frames.ndim != 3:
        raise InputError(None, f"frames must be (n, ny, nx), got shape {frames.shape}")
    n = frames.shape[0]
    if n == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        return _empty_table()
    mask = xp.asarray(mask)
    if mask.shape == frames.shape[1:]:
        mask = xp.broadcast_to(mask, frames.shape)
    if mask.shape != frames.shape:
        raise InputError(None, f"mask must be {frames.shape[1:]} or {frames.shape}, got {mask.shape}")
    mask = mask != 0
    finite = xp.isfinite(frames)
    if not bool(finite.all()):
        warnings.warn("non-finite pixels in frames were added to the mask", FrameDetWarning,
                      stacklevel=2)
        mask = mask | ~finite
        frames = xp.where(finite, frames, 0)
    if bool(mask.all()):
        raise InputError(None, "every pixel of every frame is masked")
    frames = xp.ascontiguousarray(frames.astype(xp.float32, copy=False))
    noise = xp.asarray(noise, dtype=xp.float64)
    if noise.shape != (n,) or not bool((xp.isfinite(noise) & (noise > 0)).all()):
        raise InputError(None, f"noise must be ({n},) finite and > 0, got {noise.shape}")
    mask_u8 = xp.ascontiguousarray(mask.astype(xp.uint8))

    smoothed, filt_gain = _smooth(xp, frames, mask, config.filter_sigma_px)
    if seeing_fwhm is None:
        a0 = np.full(n, moffat_alpha_px(config.nominal_fwhm_arcsec, config.psf_beta,
                                        config.pixel_scale_arcsec))
        # The first pass measures only candidates that can reach the seeing sample's SNR:
        # the matched filter's SNR is at least about the aperture's, so half of
        # seeing_min_snr in filtered-noise units keeps every one of them (and ~10 % of all).
        fi, values, flags = _detect_pass(xp, frames, mask_u8, noise, xp.asarray(a0), config,
                                         smoothed, filt_gain, 0.5 * config.seeing_min_snr)
        alpha = _estimate_alpha(fi, values, flags, n, config)
    else:
        fw = np.broadcast_to(np.asarray(to_host(xp.asarray(seeing_fwhm)), float), (n,))
        if not np.all(np.isfinite(fw) & (fw > 0)):
            raise InputError(None, "seeing_fwhm must be finite and > 0")
        alpha = moffat_alpha_px(fw, config.psf_beta, config.pixel_scale_arcsec)
    fi, values, flags = _detect_pass(xp, frames, mask_u8, noise, xp.asarray(alpha), config,
                                     smoothed, filt_gain)
    fi, values, flags = to_host(fi), to_host(values), to_host(flags)
    fwhm_used = alpha * config.pixel_scale_arcsec * 2.0 * np.sqrt(2.0 ** (1.0 / config.psf_beta) - 1.0)
    if fi.size == 0:
        warnings.warn(f"no sources detected on {n} frames", FrameDetWarning, stacklevel=2)
        t = _empty_table()
        t.meta["seeing_fwhm"] = fwhm_used
        return t
    cols = {c: i for i, c in enumerate(MEASURE_COLUMNS)}
    order = np.lexsort((values[:, cols["x"]], values[:, cols["y"]], fi))
    data = {"frame": fi[order].astype(np.int32)}
    for c in ("x", "y", "x_err", "y_err", "flux", "flux_err", "peak", "snr", "fpeak"):
        data[c] = values[order, cols[c]]
    data["flags"] = flags[order].astype(np.int32)
    t = Table(data)
    for k, u in _UNITS.items():
        t[k].unit = u
    t.meta["seeing_fwhm"] = fwhm_used
    return t
