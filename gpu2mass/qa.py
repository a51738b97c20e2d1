"""Scan quality assurance: the figures and 0–10 score of one scan (facts sheet section 9).

2MASS scored every scan with a probability-like quality (10: certain to meet the Level-1
specifications, 5: even chances, 0: fails them) from five factors (Kirkpatrick, QA review of
July 2000; All-Sky Explanatory Supplement IV.10):

1. **Photometricity** — zero-point stability of the night's calibration and cloud signatures
   in the frame backgrounds (clouds are warm: the Ks background jumps while J and H, which
   follow the airglow, do not). Here: the calibration's zero-point residual rms per band,
   graded linearly between :attr:`QaConfig.zp_rms_good` (10) and
   :attr:`QaConfig.zp_rms_bad` (0); a cloud signature sets the factor to 0. Without a
   calibration the factor is :attr:`QaConfig.unknown_photometricity_score` and a reason
   says so.
2. **Sensitivity** — 2MASS used a metric ∝ seeing shape × background^0.29 (the PSP), an
   empirical proxy for the depth. The depth itself is measured here: ``m10``, the magnitude
   at SNR 10 from a robust fit of the scan's own SNR-vs-magnitude relation (every R2−R1
   profile-fit detection, :func:`m10_from_snr`); the factor is 10 × the probability that the
   scan meets the 10σ Level-1 limit, P = Φ((m10 − limit) / :attr:`QaConfig.m10_scale_mag`).
   The PSP is reported per band beside it (``psp``) for scan selection.
3. **Seeing and focus** — mean J seeing shape ≥ 1.25 (FWHM ≳ 3.45") or maximum ≥ 1.30 →
   score 1; images with a mean moment ratio < 0.81 (non-round: focus, tracking) → 1.
   Seeing shape from FWHM by the 2MASS relation FWHM = 3.13 sh − 0.46".
4. **Untracked seeing** — frames without a seeing measurement over more than 900" of scan
   → score 1.
5. **Airglow** — measured minus predicted coadd background noise of each Atlas Image
   (:func:`atlas_background_noise`): too many images above the limit → score 1.

The scan's score is the smallest factor score (each factor can only take a scan down, as in
2MASS where a failed seeing test gave 1 whatever the photometry). ``status`` is ``ok`` when
the score reaches :attr:`QaConfig.ok_min_score` and the positions are good (an astrometric
solution exists and its rms is within :attr:`QaConfig.max_astrometric_rms_arcsec`),
``degraded`` otherwise; ``reasons`` names every factor below 10 and every figure that could
not be measured, for ok scans too; ``failed`` is for scans the pipeline could not process
(:func:`failed_scan_qa`).

Inputs are plain columns (the scan's ``frames.parquet`` and calibrated ``pts.parquet`` as
read, astropy Tables or dicts of arrays) and the scan's Atlas Images. Host-only NumPy: the
QA of a scan is a few milliseconds of arithmetic on tables and one pass over each image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpu2mass.errors import ConfigError, InputError, StepError

__all__ = [
    "QaConfig",
    "atlas_background_noise",
    "failed_scan_qa",
    "image_moment_ratio",
    "m10_from_snr",
    "scan_qa",
    "seeing_shape",
]

BANDS = ("J", "H", "K")


@dataclass(frozen=True)
class QaConfig:
    """Configuration of scan QA (2MASS rules as defaults; facts sheet section 9).

    Seeing and focus (2MASS QA review, July 2000):

    seeing_shape_slope, seeing_shape_offset_arcsec
        FWHM = 3.13 sh − 0.46" (facts sheet 11), used to turn our FWHM into 2MASS's
        seeing shape ``sh``.
    max_mean_seeing_shape, max_seeing_shape
        Mean J seeing shape ≥ 1.25, or maximum ≥ 1.30 → score 1 (2MASS values).
    min_moment_ratio
        Mean image moment ratio below 0.81 → score 1 (2MASS value). Our moment ratio is the
        axis ratio b/a = sqrt(λ_min/λ_max) of the second-moment matrix of isolated stars in
        the Atlas Images (:func:`image_moment_ratio`); 2MASS's exact definition is
        unconfirmed.
    moment_snr_min, moment_snr_max, moment_isolation_arcsec, moment_min_stars
        Stars used for moments: R2−R1 profile-fit detections with SNR 30–1000 (bright enough
        for a moment error ≪ 0.1, fainter than R2−R1 saturation), no other source within
        15", at least 5 per band, else the ratio is unknown (null) and not scored.
        Chosen here.
    untracked_seeing_arcsec, frame_step_arcsec
        Frames without a seeing value over more than 900" of scan → score 1 (2MASS); a frame
        is one in-scan step of 82.8" (facts sheet 11).

    Sensitivity:

    m10_limit
        Band → 10σ Level-1 limit (J 15.8, H 15.1, Ks 14.3; facts sheet 11).
    m10_scale_mag
        Width of the probability that the scan meets the limit, P = Φ((m10 − limit)/0.1 mag).
        2MASS's graduated scale is unconfirmed; 0.1 mag is the uncertainty with which the
        depth of a scan is known (m10 fits and the zero point), so a scan 0.2 mag deeper than
        the limit scores 10 and one at the limit 5.
    m10_snr_min, m10_snr_max, m10_min_sources
        The SNR-vs-magnitude fit uses R2−R1 profile-fit detections with 3 ≤ SNR ≤ 200 and
        needs 20 of them (chosen here: below 3 the detection threshold biases the sample,
        above 200 the profile fit's systematic floor flattens the relation).
    unknown_sensitivity_score
        Factor score when a band's m10 cannot be measured (5: even chances).
    psp_exponent
        PSP = seeing shape × sky^0.29 (2MASS's sensitivity parameter; sky in DN per frame).

    Photometricity:

    zp_rms_good, zp_rms_bad
        Calibration residual rms (mag) graded linearly from score 10 at ≤ 0.03 to 0 at
        ≥ 0.10. 2MASS's nightly fit rms was 0.011 (north) to 0.013 (south) in J, so 0.03 is
        a clearly photometric night and 0.10 a cloudy one; the 2MASS grading itself is
        unconfirmed.
    unknown_photometricity_score
        Factor score when the scan has no calibration (5: even chances).
    cloud_band, cloud_sky_jump, cloud_window_frames, cloud_min_frames
        Cloud signature: in ≥ 2 frames the Ks frame background exceeds its running median
        (31 frames) by > 5 % while J and H rise by less than half as much (airglow moves
        J and H together; clouds add thermal emission in Ks). 5 % is chosen here, well above
        the smooth sky drift of a 6-minute scan.

    Airglow:

    airglow_limit
        An Atlas Image is affected when its measured background noise is more than three
        times the predicted (``airglow_excess`` > 2.0). Unconfirmed in 2MASS (a "5σ-type"
        limit on the H residual noise; ~1 % of 2MASS scans had severe H airglow). Chosen
        here: with little structure (J, Ks: airglow 0.3 % and 0.15 % of the sky in the
        simulator) the ratio is 0.96–1.08 on the ci and scan presets' 180 images; the
        simulator's H airglow (0.6 %, modelled on 2MASS's H ripples) gives 0.98–2.63; a
        limit beyond that flags severe airglow only.
    airglow_max_image_fraction
        More than 3 affected images of a 23-image Tile (2MASS's second-release rule) → score
        1; for scans of other lengths the same fraction, 3/23.
    airglow_min_pixels
        An image needs 500 usable background pixels (of those sampled: every 4th row and
        column) for the statistic.

    Astrometry:

    max_astrometric_rms_arcsec
        A band whose rms against the reference catalog exceeds 0.3" gets a reason (status
        degraded; not part of the 2MASS score, which left position reconstruction to its own
        review). Chosen here: 3× the ~0.1" the pipeline reaches on clean nights.

    Status:

    ok_min_score
        A scan is ``ok`` from score 7 (a 70 % or better probability of meeting the Level-1
        requirements), else ``degraded``. Chosen here: 2MASS released the best scan of each
        Tile and reviewed Tiles whose best score was below 5; an uncalibrated scan (5) is
        degraded, a scan 0.1 mag deeper than the 10σ limit (9) is ok.
    """

    seeing_shape_slope: float = 3.13
    seeing_shape_offset_arcsec: float = 0.46
    max_mean_seeing_shape: float = 1.25
    max_seeing_shape: float = 1.30
    min_moment_ratio: float = 0.81
    moment_snr_min: float = 30.0
    moment_snr_max: float = 1000.0
    moment_isolation_arcsec: float = 15.0
    moment_min_stars: int = 5
    untracked_seeing_arcsec: float = 900.0
    frame_step_arcsec: float = 82.8
    m10_limit: dict = field(default_factory=lambda: {"J": 15.8, "H": 15.1, "K": 14.3})
    m10_scale_mag: float = 0.1
    m10_snr_min: float = 3.0
    m10_snr_max: float = 200.0
    m10_min_sources: int = 20
    unknown_sensitivity_score: int = 5
    psp_exponent: float = 0.29
    zp_rms_good: float = 0.03
    zp_rms_bad: float = 0.10
    unknown_photometricity_score: int = 5
    cloud_band: str = "K"
    cloud_sky_jump: float = 0.05
    cloud_window_frames: int = 31
    cloud_min_frames: int = 2
    airglow_limit: float = 2.0
    airglow_max_image_fraction: float = 3.0 / 23.0
    airglow_min_pixels: int = 500
    max_astrometric_rms_arcsec: float = 0.3
    ok_min_score: int = 7

    def __post_init__(self):
        checks = (
            ("seeing_shape_slope", self.seeing_shape_slope > 0, "> 0"),
            ("max_seeing_shape", self.max_seeing_shape >= self.max_mean_seeing_shape,
             ">= max_mean_seeing_shape"),
            ("min_moment_ratio", 0 < self.min_moment_ratio <= 1, "in (0, 1]"),
            ("moment_snr_max", self.moment_snr_max > self.moment_snr_min > 0, "> moment_snr_min > 0"),
            ("moment_min_stars", self.moment_min_stars >= 1, ">= 1"),
            ("untracked_seeing_arcsec", self.untracked_seeing_arcsec > 0, "> 0"),
            ("frame_step_arcsec", self.frame_step_arcsec > 0, "> 0"),
            ("m10_limit", set(self.m10_limit) == set(BANDS), f"keys {BANDS}"),
            ("m10_scale_mag", self.m10_scale_mag > 0, "> 0"),
            ("m10_snr_max", self.m10_snr_max > 10 > self.m10_snr_min > 0, "> 10 > m10_snr_min > 0"),
            ("m10_min_sources", self.m10_min_sources >= 3, ">= 3"),
            ("zp_rms_bad", self.zp_rms_bad > self.zp_rms_good >= 0, "> zp_rms_good >= 0"),
            ("unknown_photometricity_score", 0 <= self.unknown_photometricity_score <= 10, "in 0..10"),
            ("unknown_sensitivity_score", 0 <= self.unknown_sensitivity_score <= 10, "in 0..10"),
            ("cloud_band", self.cloud_band in BANDS, f"one of {BANDS}"),
            ("cloud_sky_jump", self.cloud_sky_jump > 0, "> 0"),
            ("cloud_window_frames", self.cloud_window_frames >= 3, ">= 3"),
            ("cloud_min_frames", self.cloud_min_frames >= 1, ">= 1"),
            ("airglow_limit", self.airglow_limit > 0, "> 0"),
            ("airglow_max_image_fraction", 0 <= self.airglow_max_image_fraction < 1, "in [0, 1)"),
            ("airglow_min_pixels", self.airglow_min_pixels >= 100, ">= 100"),
            ("max_astrometric_rms_arcsec", self.max_astrometric_rms_arcsec > 0, "> 0"),
            ("ok_min_score", 0 <= self.ok_min_score <= 10, "in 0..10"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"qa.{name} must be {rule}, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------
# Small pieces, each testable on its own.


def seeing_shape(fwhm_arcsec, config: QaConfig = QaConfig()):
    """2MASS seeing shape ``sh`` from the FWHM (arcsec): FWHM = 3.13 sh − 0.46"."""
    return (np.asarray(fwhm_arcsec, float) + config.seeing_shape_offset_arcsec) / config.seeing_shape_slope


def m10_from_snr(mag, snr, *, config: QaConfig = QaConfig()) -> tuple[float, int]:
    """Magnitude at SNR 10 from a robust fit of the SNR-vs-magnitude relation.

    The model is that of aperture or profile photometry on a sky-limited detector,
    SNR = F / sqrt(s² + q F) with F = 10^(−0.4 m): background noise ``s`` and source
    Poisson noise ``q``, fitted to log10 SNR with a soft-L1 loss (0.03 dex scale) so that
    blends, variables and bad fits do not pull it. m10 solves SNR = 10 in closed form:
    F10 = (100 q + sqrt(10⁴ q² + 400 s²)) / 2.

    Parameters
    ----------
    mag, snr
        (n,) magnitudes and signal-to-noise ratios of the scan's detections in one band
        (non-finite and out-of-range rows are ignored).

    Returns
    -------
    (m10, n)
        m10 in the magnitudes' system (NaN when fewer than ``m10_min_sources`` usable
        detections or when no detection is fainter than SNR 20: the fit would extrapolate)
        and the number of detections fitted.
    """
    from scipy.optimize import least_squares

    mag = np.asarray(mag, float)
    snr = np.asarray(snr, float)
    use = np.isfinite(mag) & np.isfinite(snr) & (snr >= config.m10_snr_min) & (snr <= config.m10_snr_max)
    n = int(use.sum())
    if n < config.m10_min_sources or not np.any(snr[use] < 20.0):
        return math.nan, n
    m, y = mag[use], np.log10(snr[use])
    # Work relative to a pivot magnitude so that the parameters are O(1).
    pivot = float(np.median(m))
    f = 10.0 ** (-0.4 * (m - pivot))
    # Start: background-limited through the faint half (q tiny).
    s0 = float(np.median(f / snr[use]))

    def resid(p):
        s, q = np.exp(p)
        return y - np.log10(f / np.sqrt(s * s + q * f))

    fit = least_squares(resid, x0=[math.log(s0), math.log(s0 * s0 * 1e-3)], loss="soft_l1", f_scale=0.03,
                        bounds=([-50.0, -60.0], [50.0, 50.0]))
    s, q = np.exp(fit.x)
    f10 = 0.5 * (100.0 * q + math.sqrt(1.0e4 * q * q + 400.0 * s * s))
    return pivot - 2.5 * math.log10(f10), n


def _block_median(a: np.ndarray, b: int) -> np.ndarray:
    """Median of each b × b block (NaN ignored; partial blocks at the edges), expanded back
    to the shape of ``a``; blocks without data take the image's median."""
    ny, nx = a.shape
    py, px = -ny % b, -nx % b
    padded = np.pad(a, ((0, py), (0, px)), constant_values=np.nan)
    blocks = padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b).transpose(0, 2, 1, 3)
    flat = blocks.reshape(blocks.shape[0], blocks.shape[1], -1)
    # All-NaN blocks are filled with the image's median; they are kept away from nanmedian
    # (whose warning would need a catch_warnings, which is not thread-safe: scans' QA runs
    # on several threads).
    empty = ~np.isfinite(flat).any(axis=2)
    flat = np.where(empty[..., None], 0.0, flat)
    med = np.nanmedian(flat, axis=2)
    finite = a[np.isfinite(a)]
    fill = float(np.median(finite)) if finite.size else np.nan
    med = np.where(empty | ~np.isfinite(med), fill, med)
    return np.repeat(np.repeat(med, b, axis=0), b, axis=1)[:ny, :nx]


def atlas_background_noise(data, sigma, *, config: QaConfig = QaConfig()) -> dict:
    """Measured and predicted background noise of an Atlas Image (2MASS's airglow statistic).

    2MASS compared the measured coadd background noise — the width of the pixel histogram
    after bright sources are masked and a four-parameter background (a, b x, c y, d xy) is
    removed — with the noise predicted from the frames. Airglow structure (and any other
    unmodelled background) widens the histogram; white noise does not. Here the prediction
    is the image's own ``SIGMA`` map, so the comparison is made pixel by pixel: the measured
    noise is 1.4826 × MAD of (data − background) / SIGMA, on one pixel per 4 × 4 cell. Cells
    within 4" of a pixel 4σ above the local level (median of its 32" block: sources, not
    airglow) and uncovered pixels are left out.

    Parameters
    ----------
    data, sigma
        (ny, nx) Atlas image and its ``SIGMA`` extension (DN per pixel); NaN or SIGMA ≤ 0:
        uncovered.

    Returns
    -------
    dict
        ``ratio`` (measured / predicted noise; 1 for pure noise), ``airglow_excess``
        (ratio − 1: measured minus predicted noise, in units of the predicted),
        ``measured_dn`` and ``predicted_dn`` (DN per pixel: ratio × median SIGMA and median
        SIGMA), ``n_pixels``. NaN (n_pixels 0) when fewer than ``airglow_min_pixels`` pixels
        are usable.
    """
    from scipy.ndimage import maximum_filter

    data = np.asarray(data)
    sigma = np.asarray(sigma)
    if data.shape != sigma.shape or data.ndim != 2:
        raise StepError(f"Atlas image {data.shape} and SIGMA {sigma.shape} must be one 2-d shape")
    nan = {"ratio": math.nan, "airglow_excess": math.nan, "measured_dn": math.nan, "predicted_dn": math.nan,
           "n_pixels": 0}
    # The statistic is taken on one pixel of each 4 × 4 cell: a pixel's noise is the same
    # whether its neighbours are looked at or not, and the ~30,000 cells of a 512 × 1024
    # image fix a noise ratio to 0.5 %, at a 16th of the cost. Sources are found on every
    # pixel: a cell is on a source when its brightest pixel is 4σ above the local level
    # (median of 32" blocks: follows airglow, not stars; 4σ: a 16-pixel cell of pure noise
    # exceeds it once in 2000), and the cells next to it are left out too (±4").
    step = 4
    ny, nx = (data.shape[0] // step) * step, (data.shape[1] // step) * step
    if ny == 0 or nx == 0:
        return nan
    full = np.asarray(data[:ny, :nx], np.float32)
    # Brightest pixel of each cell: element-wise maxima of the cells' strided rows, then
    # columns (7x faster than a max over the small axes of a 4-d view).
    finite = np.where(np.isfinite(full), full, -np.inf)
    rows = np.maximum.reduce([finite[k::step] for k in range(step)])
    peak = np.maximum.reduce([rows[:, k::step] for k in range(step)])
    data = full[::step, ::step].astype(float)
    sigma = np.asarray(sigma[:ny:step, :nx:step], float)
    with np.errstate(invalid="ignore"):
        good = np.isfinite(data) & np.isfinite(sigma) & (sigma > 0)
    if good.sum() < config.airglow_min_pixels:
        return nan
    local = _block_median(np.where(good, data, np.nan), 32 // step)
    with np.errstate(invalid="ignore"):
        hot = good & (peak - local > 4.0 * np.where(good, sigma, np.inf))
    use = good & ~(maximum_filter(hot.astype(np.uint8), size=3) > 0)
    if use.sum() < config.airglow_min_pixels:
        return nan
    yy, xx = np.nonzero(use)
    d, s = data[use], sigma[use]
    u, v = xx / data.shape[1], yy / data.shape[0]
    a = np.column_stack([np.ones(u.size), u, v, u * v]) / s[:, None]
    # The background, weighted by 1/SIGMA; once more without the pixels beyond 5σ of the
    # first fit (residual sources, artifacts).
    keep = np.ones(u.size, bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(a[keep], d[keep] / s[keep], rcond=None)
        z = d / s - a @ coef
        med = float(np.median(z))
        ratio = 1.4826 * float(np.median(np.abs(z - med)))
        keep = np.abs(z - med) < 5.0 * ratio
    predicted = float(np.median(s))
    return {"ratio": ratio, "airglow_excess": ratio - 1.0, "measured_dn": ratio * predicted,
            "predicted_dn": predicted, "n_pixels": int(use.sum())}


def image_moment_ratio(data, x, y, *, fwhm_px: float, half_size: int = 6) -> np.ndarray:
    """Axis ratio b/a of each star's second moments in an image.

    Moments are taken with a circular Gaussian weight of the seeing's width
    (σ_w = FWHM / 2.355) about the flux-weighted centre, background = median of the stamp's
    border, and the weight removed exactly for a Gaussian star: C = (M⁻¹ − W⁻¹)⁻¹, so a
    round star gives 1 and the ratio of an elliptical Gaussian is its axis ratio.

    Parameters
    ----------
    data
        (ny, nx) image (DN).
    x, y
        (n,) 0-based pixel positions of the stars.
    fwhm_px
        Seeing FWHM in the image's pixels.

    Returns
    -------
    (n,) float: sqrt(λ_min / λ_max) of C; NaN where the stamp leaves the image, is not
    finite, or the moments are not positive definite.
    """
    data = np.asarray(data, float)
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    out = np.full(x.size, np.nan)
    sw2 = (fwhm_px / 2.3548) ** 2
    h = half_size
    gy, gx = np.mgrid[-h:h + 1, -h:h + 1].astype(float)
    border = (np.abs(gy) == h) | (np.abs(gx) == h)
    ny, nx = data.shape
    for i in range(x.size):
        cx, cy = round(x[i]), round(y[i])
        if not (h <= cx < nx - h and h <= cy < ny - h):
            continue
        st = data[cy - h:cy + h + 1, cx - h:cx + h + 1]
        if not np.all(np.isfinite(st)):
            continue
        st = st - np.median(st[border])
        mx, my = 0.0, 0.0
        for _ in range(3):  # centre: weighted centroid, iterated
            w = np.exp(-0.5 * ((gx - mx) ** 2 + (gy - my) ** 2) / sw2) * st
            tot = w.sum()
            if not tot > 0:
                break
            mx, my = float((w * gx).sum() / tot), float((w * gy).sum() / tot)
        w = np.exp(-0.5 * ((gx - mx) ** 2 + (gy - my) ** 2) / sw2) * st
        tot = w.sum()
        if not tot > 0:
            continue
        dx, dy = gx - mx, gy - my
        m = np.array([[(w * dx * dx).sum(), (w * dx * dy).sum()],
                      [(w * dx * dy).sum(), (w * dy * dy).sum()]]) / tot
        try:
            minv = np.linalg.inv(m)
            c = np.linalg.inv(minv - np.eye(2) / sw2)
        except np.linalg.LinAlgError:
            continue
        lam = np.linalg.eigvalsh(c)
        if lam[0] > 0:
            out[i] = math.sqrt(lam[0] / lam[1])
    return out


def _cloud_frames(frames: dict, config: QaConfig) -> tuple[np.ndarray, float]:
    """Frames (indices) with a Ks-only background jump and the largest jump (fraction)."""
    from scipy.ndimage import median_filter

    rel = {}
    for b in BANDS:
        sel = frames["band"] == b
        if not np.any(sel):
            return np.zeros(0, int), math.nan
        order = np.argsort(frames["frame"][sel])
        fr = frames["frame"][sel][order]
        sky = frames["sky_dn"][sel][order]
        # The running median's window: odd, at most the scan's length.
        win = min(config.cloud_window_frames, fr.size if fr.size % 2 else fr.size - 1)
        if win < 3:
            return np.zeros(0, int), math.nan
        base = median_filter(sky, size=win, mode="nearest")
        with np.errstate(divide="ignore", invalid="ignore"):
            rel[b] = dict(zip(fr.tolist(), (sky / base - 1.0).tolist(), strict=True))
    cb = config.cloud_band
    others = [b for b in BANDS if b != cb]
    bad, worst = [], math.nan
    for f, r in rel[cb].items():
        if not np.isfinite(r):
            continue
        other = max((rel[o].get(f, 0.0) for o in others), default=0.0)
        if r > config.cloud_sky_jump and r > 2.0 * other:
            bad.append(f)
            worst = r if not np.isfinite(worst) else max(worst, r)
    return np.asarray(bad, int), worst


def _longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for v in flags:
        run = run + 1 if v else 0
        best = max(best, run)
    return best


# ----------------------------------------------------------------------------------------
# Column access: astropy Tables (masked → NaN), pyarrow Tables and dicts of arrays alike.


def _col(table, name, *, dtype=float):
    """Column ``name`` of ``table`` as a NumPy array (float: null → NaN; str: null → "")."""
    if table is None:
        return None
    try:
        c = table[name]
    except (KeyError, ValueError, TypeError, IndexError):
        return None
    if hasattr(c, "to_pylist") and not isinstance(c, np.ndarray):  # pyarrow (Chunked)Array
        c = c.to_pylist()
    elif np.ma.isMaskedArray(c) or hasattr(c, "mask"):
        c = np.ma.asarray(c).astype(object).filled(None)
    a = np.asarray(c, dtype=object if not isinstance(c, np.ndarray) else None)
    if dtype is float:
        if a.dtype == object:
            return np.array([np.nan if v is None else v for v in a.ravel()], float)
        return a.astype(float)
    if a.dtype == object:
        return np.array(["" if v is None else str(v) for v in a.ravel()])
    return a.astype(str)


def _frames_columns(frames) -> dict:
    cols = {}
    for name in ("seeing_arcsec", "sky_dn", "noise_dn", "airmass", "mjd", "frame"):
        c = _col(frames, name)
        if c is None:
            raise StepError(f"scan QA: the frames table has no column {name!r}")
        cols[name] = c
    cols["band"] = np.char.upper(_col(frames, "band", dtype=str))
    cols["band"] = np.where(cols["band"] == "KS", "K", cols["band"])
    return cols


def _header_get(header, key, default=None):
    """``header[key]`` for a FITS header or a dict, ``default`` when absent."""
    return header.get(key, default)


def _read_atlas(item):
    """(header, data, sigma) from a path or a (header, data, sigma) tuple."""
    if isinstance(item, str | Path):
        from astropy.io import fits

        try:
            with fits.open(item, memmap=False) as hdul:
                # Native float32 (FITS is big-endian): one conversion, no float64 copies.
                return (hdul[0].header.copy(), hdul[0].data.astype(np.float32),
                        hdul["SIGMA"].data.astype(np.float32))
        except (OSError, KeyError) as exc:
            raise InputError(item, f"cannot read an Atlas Image with a SIGMA extension: {exc}") from exc
    header, data, sigma = item
    host = (lambda a: a.get() if hasattr(a, "get") else np.asarray(a))
    return header, host(data), host(sigma)


def _wcs(header):
    from astropy.io import fits
    from astropy.wcs import WCS

    h = header if isinstance(header, fits.Header) else fits.Header(
        [(k, v) for k, v in dict(header).items() if k in _WCS_KEYS])
    return WCS(h)


_WCS_KEYS = {"CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CDELT1", "CDELT2", "CROTA2",
             "RADESYS", "EQUINOX", "NAXIS1", "NAXIS2", "NAXIS"}


def _json_number(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------
# The scan's QA.


def scan_qa(
    scan: int,
    scan_type: str,
    *,
    frames,
    pts,
    atlas_images: Sequence = (),
    astrometry: Mapping[str, dict] | None = None,
    calibration: Mapping[str, dict] | None = None,
    config: QaConfig = QaConfig(),
) -> dict:
    """Quality figures and 2MASS-style score of one processed scan (``qa.json`` content).

    Parameters
    ----------
    scan, scan_type
        Nightly scan number and type (``sci``, ``cal``).
    frames
        The scan's frames table (``frames.parquet`` columns: band, frame, mjd, airmass,
        seeing_arcsec, sky_dn, noise_dn — DN per frame pixel).
    pts
        The scan's calibrated point sources (``[jhk]_m``, ``[jhk]_snr``, ``rd_flg``, ``ra``,
        ``dec``; ``cc_flg`` optional).
    atlas_images
        The scan's Atlas Images: paths to the FITS files or ``(header, data, sigma)`` tuples
        (header: a dict or FITS header with ``FILTER`` and the WCS), read one at a time.
    astrometry
        Band → ``{"astrometric_rms_arcsec", "n_ref", "offset_ra_mas", "offset_dec_mas"}``
        from the night's astrometric solution, or ``None`` (figures null, reason given).
    calibration
        Band → ``{"zp_residual_rms", "zp_offset", ...}`` from the night's photometric
        calibration, or ``None`` (figures null, photometricity unknown, reason given).
        ``zp_residual_rms`` is the rms (mag) of the calibration scans' zero points about the
        night's fit (2MASS's nightly-fit rms, 0.011–0.013 mag in J; photcal's
        ``BandCalibration.scan_residual_rms``), the zero-point stability the photometricity
        grade is about; ``zp_offset`` (the calibration applied to the scan, mag) is
        reported only.

    Returns
    -------
    dict
        JSON-able: ``scan``, ``scan_type``, ``score`` (int 0–10), ``status``, ``reasons``
        (list of str), ``factors`` (the five factor scores), ``bands`` (band →
        ``seeing_fwhm``, ``seeing_shape_mean``, ``seeing_shape_max``, ``sky_dn``,
        ``sky_sigma_dn``, ``psp``, ``m10``, ``m10_n``, ``n_sources``, ``moment_ratio``,
        ``astrometric_rms_arcsec``, ``n_ref``, ``offset_ra_mas``, ``offset_dec_mas``,
        ``zp_residual_rms``, ``zp_offset``, ``airglow_excess`` (median over the images),
        ``airglow_images``, ``n_images``, ``atlas_noise_dn``, ``atlas_noise_predicted_dn``),
        ``untracked_seeing_arcsec``, ``cloud_frames``, ``mjd_start``, ``mjd_end``.
    """
    fr = _frames_columns(frames)
    reasons: list[str] = []
    factors = {"photometricity": 10, "sensitivity": 10, "seeing": 10, "untracked_seeing": 10, "airglow": 10}
    bands: dict[str, dict] = {}

    rd = _col(pts, "rd_flg", dtype=str) if pts is not None else None
    ra, dec = _col(pts, "ra"), _col(pts, "dec")
    stars: dict[str, tuple] = {}  # band → (ra, dec, FWHM") of the stars for image moments

    for i, b in enumerate(BANDS):
        sel = fr["band"] == b
        see = fr["seeing_arcsec"][sel]
        fin = see[np.isfinite(see)]
        sh = seeing_shape(fin, config)
        sky = fr["sky_dn"][sel]
        row = {
            "seeing_fwhm": float(np.median(fin)) if fin.size else None,
            "seeing_shape_mean": float(np.mean(sh)) if fin.size else None,
            "seeing_shape_max": float(np.max(sh)) if fin.size else None,
            "sky_dn": _json_number(np.nanmedian(sky)) if np.any(np.isfinite(sky)) else None,
            "sky_sigma_dn": _json_number(np.nanmedian(fr["noise_dn"][sel])) if np.any(np.isfinite(fr["noise_dn"][sel])) else None,
        }
        row["psp"] = (_json_number(float(np.mean(sh)) * row["sky_dn"] ** config.psp_exponent)
                      if fin.size and row["sky_dn"] and row["sky_dn"] > 0 else None)
        # Sources: detections in the band (rd_flg digit not 0 / 6 = upper limit or none).
        m10, n_fit, n_src = math.nan, 0, 0
        if rd is not None and rd.size:
            digit = np.array([r[i] if len(r) > i else "0" for r in rd])
            n_src = int(np.sum(~np.isin(digit, ("0", "6"))))
            mag, snr = _col(pts, f"{b.lower()}_m"), _col(pts, f"{b.lower()}_snr")
            if mag is not None and snr is not None:
                prof = digit == "2"
                m10, n_fit = m10_from_snr(mag[prof], snr[prof], config=config)
                if ra is not None and dec is not None and row["seeing_fwhm"]:
                    idx = _moment_stars(ra, dec, snr, prof, config)
                    if idx.size >= config.moment_min_stars:
                        stars[b] = (ra[idx], dec[idx], row["seeing_fwhm"])
        row.update({"m10": _json_number(m10), "m10_n": n_fit, "n_sources": n_src})
        # Astrometry and calibration figures, as given.
        ast = (astrometry or {}).get(b) if astrometry is not None else None
        for key in ("astrometric_rms_arcsec", "offset_ra_mas", "offset_dec_mas"):
            row[key] = _json_number(ast.get(key)) if ast else None
        row["n_ref"] = int(ast["n_ref"]) if ast and ast.get("n_ref") is not None else None
        cal = (calibration or {}).get(b) if calibration is not None else None
        for key in ("zp_residual_rms", "zp_offset"):
            row[key] = _json_number(cal.get(key)) if cal else None
        bands[b] = row

    # The Atlas Images, one at a time (a 273-frame scan has 72 of 2 MB each): airglow
    # statistic and the moments of the band's stars.
    noise = {b: [] for b in BANDS}
    moments = {b: [] for b in BANDS}
    count = dict.fromkeys(BANDS, 0)
    for item in atlas_images:
        header, data, sigma = _read_atlas(item)
        filt = str(_header_get(header, "FILTER", "")).strip().upper()
        b = "K" if filt in ("K", "KS") else filt
        if b not in noise:
            raise InputError(item if isinstance(item, str | Path) else None,
                             f"scan {scan}: Atlas Image with FILTER {filt!r}, expected j, h or k")
        count[b] += 1
        res = atlas_background_noise(data, sigma, config=config)
        if res["n_pixels"]:
            noise[b].append((res["airglow_excess"], res["measured_dn"], res["predicted_dn"]))
        if b in stars:
            moments[b].extend(_image_moment_ratios(header, data, *stars[b]))
    for b in BANDS:
        row = bands[b]
        ex, meas, pred = (np.array(v) for v in zip(*noise[b], strict=True)) if noise[b] else ([], [], [])
        row["n_images"] = count[b]
        row["airglow_excess"] = float(np.median(ex)) if len(ex) else None
        row["airglow_images"] = int(np.sum(np.asarray(ex) > config.airglow_limit)) if len(ex) else 0
        row["atlas_noise_dn"] = float(np.median(meas)) if len(meas) else None
        row["atlas_noise_predicted_dn"] = float(np.median(pred)) if len(pred) else None
        row["moment_ratio"] = (float(np.median(moments[b])) if len(moments[b]) >= config.moment_min_stars
                               else None)

    # (3) Seeing and focus: J seeing shape; moment ratio in every band.
    j = bands["J"]
    if j["seeing_shape_mean"] is None:
        factors["seeing"] = 1
        reasons.append("seeing: no J frame has a seeing measurement; check frame registration / PSF")
    elif j["seeing_shape_mean"] >= config.max_mean_seeing_shape or j["seeing_shape_max"] >= config.max_seeing_shape:
        factors["seeing"] = 1
        reasons.append(
            f"seeing: J seeing shape mean {j['seeing_shape_mean']:.3f} / max {j['seeing_shape_max']:.3f} "
            f"(FWHM {j['seeing_fwhm']:.2f}\"), limits {config.max_mean_seeing_shape} / "
            f"{config.max_seeing_shape}: re-observe the Tile in better seeing")
    for b in BANDS:
        r = bands[b]["moment_ratio"]
        if r is not None and r < config.min_moment_ratio:
            factors["seeing"] = 1
            reasons.append(f"focus: {b} images are elongated (moment ratio {r:.2f} < {config.min_moment_ratio}); "
                           "check focus and tracking")
    # (4) Untracked seeing: the longest stretch of frames without a seeing value.
    untracked = 0.0
    for b in BANDS:
        sel = fr["band"] == b
        order = np.argsort(fr["frame"][sel])
        untracked = max(untracked, _longest_run(~np.isfinite(fr["seeing_arcsec"][sel][order])) * config.frame_step_arcsec)
    if untracked > config.untracked_seeing_arcsec:
        factors["untracked_seeing"] = 1
        reasons.append(f"untracked seeing over {untracked:.0f}\" of scan (> {config.untracked_seeing_arcsec:.0f}\"): "
                       "too few stars for the PSF; re-observe")
    # (2) Sensitivity: the probability of reaching the 10-sigma limit.
    from scipy.special import ndtr

    probs = {}
    for b in BANDS:
        m10 = bands[b]["m10"]
        if m10 is None:
            factors["sensitivity"] = min(factors["sensitivity"], int(config.unknown_sensitivity_score))
            reasons.append(f"sensitivity unknown: {b} m10 not measured ({bands[b]['m10_n']} detections with "
                           f"{config.m10_snr_min:g} <= SNR <= {config.m10_snr_max:g}, need {config.m10_min_sources})")
            continue
        probs[b] = float(ndtr((m10 - config.m10_limit[b]) / config.m10_scale_mag))
    if probs:
        worst = min(probs, key=probs.get)
        factors["sensitivity"] = min(factors["sensitivity"], round(10.0 * probs[worst]))
        if factors["sensitivity"] < 10:
            reasons.append(f"sensitivity: {worst} m10 {bands[worst]['m10']:.2f} vs the 10-sigma limit "
                           f"{config.m10_limit[worst]} ({100 * probs[worst]:.0f} % probability of meeting it); "
                           "background or seeing too high")
    # (1) Photometricity: calibration residuals and cloud signatures.
    if calibration is None or all(bands[b]["zp_residual_rms"] is None for b in BANDS):
        factors["photometricity"] = int(config.unknown_photometricity_score)
        reasons.append("photometricity unknown: no photometric calibration for this scan "
                       "(calibration scans missing or failed); magnitudes are instrumental")
    else:
        for b in BANDS:
            rms = bands[b]["zp_residual_rms"]
            if rms is None:
                continue
            frac = (config.zp_rms_bad - rms) / (config.zp_rms_bad - config.zp_rms_good)
            s = round(10.0 * min(max(frac, 0.0), 1.0))
            factors["photometricity"] = min(factors["photometricity"], s)
            if s < 10:
                reasons.append(f"photometricity: {b} zero-point residual rms {rms:.3f} mag "
                               f"(> {config.zp_rms_good} mag): unstable transparency")
    cloud, worst_jump = _cloud_frames(fr, config)
    if cloud.size >= config.cloud_min_frames:
        factors["photometricity"] = 0
        reasons.append(f"clouds: {config.cloud_band} frame background up to {100 * worst_jump:.0f} % above its "
                       f"running median in {cloud.size} frames ({int(cloud.min())}-{int(cloud.max())}) "
                       "without a J/H rise; non-photometric")
    # (5) Airglow.
    for b in BANDS:
        n_img, n_bad = bands[b]["n_images"], bands[b]["airglow_images"]
        if n_img and n_bad / n_img > config.airglow_max_image_fraction:
            factors["airglow"] = 1
            reasons.append(f"airglow: {n_bad} of {n_img} {b} Atlas Images have background noise > "
                           f"{1 + config.airglow_limit:.2f}x the predicted (median excess "
                           f"{bands[b]['airglow_excess']:.2f}); strong airglow structure")
    # Astrometry: not a score factor, but bad or unknown positions degrade the scan.
    positions_ok = astrometry is not None
    if astrometry is None:
        reasons.append("astrometry unknown: no astrometric solution against the reference catalog")
    else:
        for b in BANDS:
            rms = bands[b]["astrometric_rms_arcsec"]
            if rms is None:
                positions_ok = False
                reasons.append(f"astrometry: no {b} residuals against the reference catalog")
            elif rms > config.max_astrometric_rms_arcsec:
                positions_ok = False
                reasons.append(f"astrometry: {b} rms {rms:.3f}\" against the reference catalog "
                               f"(> {config.max_astrometric_rms_arcsec}\"); check the reference catalog and the "
                               "frame registration")

    score = int(min(factors.values()))
    mjd = fr["mjd"][np.isfinite(fr["mjd"])]
    return {
        "scan": int(scan),
        "scan_type": str(scan_type),
        "score": score,
        "status": "ok" if score >= config.ok_min_score and positions_ok else "degraded",
        "reasons": reasons,
        "factors": factors,
        "bands": bands,
        "untracked_seeing_arcsec": untracked,
        "cloud_frames": int(cloud.size),
        "mjd_start": float(mjd.min()) if mjd.size else None,
        "mjd_end": float(mjd.max()) if mjd.size else None,
    }


def _moment_stars(ra, dec, snr, prof, config: QaConfig) -> np.ndarray:
    """Indices of the isolated, well-measured profile-fit stars used for image moments."""
    from scipy.spatial import cKDTree

    ok = prof & np.isfinite(snr) & (snr >= config.moment_snr_min) & (snr <= config.moment_snr_max)
    ok &= np.isfinite(ra) & np.isfinite(dec)
    if ok.sum() < config.moment_min_stars:
        return np.zeros(0, int)
    # Isolation against every source of the scan (tangent plane at the scan centre, arcsec).
    good = np.isfinite(ra) & np.isfinite(dec)
    d0, r0 = np.deg2rad(np.median(dec[good])), np.median(ra[good])
    xy = np.column_stack([(ra - r0) * np.cos(d0) * 3600.0, (dec - np.rad2deg(d0)) * 3600.0])
    tree = cKDTree(xy[good])
    cnt = np.array([len(v) for v in tree.query_ball_point(xy[ok], config.moment_isolation_arcsec)])
    return np.flatnonzero(ok)[cnt <= 1]


def _sky_to_pixel(header, ra, dec):
    """0-based pixel (x, y) of (ra, dec) on an Atlas Image: the grid's own SIN mapping
    (:class:`gpu2mass.atlas.AtlasGrid`, 10x faster than building an astropy WCS per image)
    when the header is the plain north-up SIN grid gpu2mass writes, astropy's WCS otherwise."""
    from gpu2mass.atlas import AtlasGrid

    get = header.get
    plain = (str(get("CTYPE1", "")).strip() == "RA---SIN" and str(get("CTYPE2", "")).strip() == "DEC--SIN"
             and float(get("CROTA2", 0.0)) == 0.0 and "CDELT2" in header
             and float(get("CDELT1", 0.0)) == -float(get("CDELT2"))
             and not any(k in header for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CD1_1", "CD1_2",
                                               "CD2_1", "CD2_2", "PV2_1", "PV2_2")))
    if not plain:
        return _wcs(header).all_world2pix(ra, dec, 0)
    grid = AtlasGrid(0, float(get("CRVAL1")), float(get("CRVAL2")), int(get("NAXIS1", 0)),
                     int(get("NAXIS2", 0)), float(get("CRPIX1")), float(get("CRPIX2")),
                     float(get("CDELT2")))
    return grid.sky_to_pixel(np.asarray(ra, float), np.asarray(dec, float))


def _image_moment_ratios(header, data, ra, dec, fwhm_arcsec: float) -> list[float]:
    """Moment ratios of the stars (ra, dec) that fall on one Atlas Image."""
    px, py = _sky_to_pixel(header, ra, dec)
    scale = abs(float(_header_get(header, "CDELT2", 1.0 / 3600.0))) * 3600.0
    ny, nx = data.shape
    inside = (px > 6) & (px < nx - 7) & (py > 6) & (py < ny - 7)
    if not np.any(inside):
        return []
    r = image_moment_ratio(data, px[inside], py[inside], fwhm_px=fwhm_arcsec / scale)
    return r[np.isfinite(r)].tolist()


def failed_scan_qa(scan: int, scan_type: str, reason: str) -> dict:
    """QA of a scan the pipeline could not process: score 0, status ``failed``, the reason.

    Every figure of :func:`scan_qa` is present and null, so the night's report and the
    working database can read failed and processed scans alike.
    """
    nulls = dict.fromkeys(
        ("seeing_fwhm", "seeing_shape_mean", "seeing_shape_max", "sky_dn", "sky_sigma_dn", "psp", "m10",
         "moment_ratio", "astrometric_rms_arcsec", "n_ref", "offset_ra_mas", "offset_dec_mas",
         "zp_residual_rms", "zp_offset", "airglow_excess", "atlas_noise_dn", "atlas_noise_predicted_dn"))
    band = {**nulls, "m10_n": 0, "n_sources": 0, "airglow_images": 0, "n_images": 0}
    return {
        "scan": int(scan),
        "scan_type": str(scan_type),
        "score": 0,
        "status": "failed",
        "reasons": [str(reason)],
        "factors": None,
        "bands": {b: dict(band) for b in BANDS},
        "untracked_seeing_arcsec": None,
        "cloud_frames": None,
        "mjd_start": None,
        "mjd_end": None,
    }
