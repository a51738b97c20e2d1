"""Photometric calibration of a night (2MAPPS IV.8, facts sheet section 7).

The calibration scans go through the same scan pipeline as the survey scans; their point
sources are matched here to the standards of their calibration field
(``calib/standards.parquet``), and per band the night's zero point is solved for::

    M_cal = M_inst + c1(t) − c2 (X − 1)

with ``X`` the airmass, ``c2`` the long-term extinction coefficient (not fitted nightly by
default, as in 2MASS) and ``c1(t)`` the night's zero-point offset and its time dependence.
The form of ``c1(t)`` — constant, linear, quadratic or continuous piecewise-linear in time —
is chosen per band by leave-one-calibration-observation-out residuals, as 2MASS chose its
nightly forms (one calibration observation = the six consecutive scans of one field).

- :func:`calibration_matches`: one calibration scan's point sources matched to its field's
  standards, one row per standard and band, with the quality cuts applied as a flag.
- :func:`solve_night_calibration`: the night's :class:`NightCalibration` from all matches.
- :func:`apply_calibration`: a scan's point sources with calibrated magnitudes, each at its
  own epoch and airmass, the zero point's uncertainty in ``[jhk]_msigcom``.
- :func:`frame_zero_points`, :func:`atlas_magzp`: the calibrated zero point of frames and of
  an Atlas Image (``MAGZP``, ``MAGZPERR``).

Magnitude scale. The scan pipeline's magnitudes are ``m = zp_inst − 2.5 log10(flux)`` with
``flux`` the source's DN in one R2−R1 frame (1.25 s; the ``[jhk]_flux`` columns) and
``zp_inst`` the configured instrumental zero point (``transients.zero_point``). The
simulator's true zero point (``truth/frames.parquet`` ``zp_mag``) is on the same scale
(magnitude of a source giving 1 DN in R2−R1 at flat 1), so the calibrated zero point of a
frame is simply ``zp_inst + offset`` with no exposure-time term.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.table import MaskedColumn, Table, vstack

from gpu2mass.epochs import source_epochs
from gpu2mass.errors import ConfigError, StepError

__all__ = ["FORMS", "BandCalibration", "NightCalibration", "PhotcalConfig", "PhotcalWarning",
           "apply_calibration", "atlas_magzp", "calibration_matches", "frame_zero_points",
           "solve_night_calibration"]

BANDS = ("J", "H", "K")
#: Forms of the zero point's time dependence, simplest first, and their numbers of parameters.
FORMS = {"constant": 1, "linear": 2, "quadratic": 3, "piecewise": 3}
_NPIECE_MIN_SIDE = 2  # calibration observations on each side of a piecewise form's knot


class PhotcalWarning(UserWarning):
    """A calibration scan or band that cannot contribute (no standards, too few matches)."""


@dataclass(frozen=True)
class PhotcalConfig:
    """Settings of the night's photometric calibration (facts sheet section 7).

    Attributes
    ----------
    extinction
        Band → extinction coefficient ``c2`` (mag per airmass): the 2MASS first-release
        long-term averages J 0.109, H 0.031, Ks 0.061 (the All-Sky values are unconfirmed;
        these are used, and the simulator uses the same).
    fit_extinction
        Fit ``c2`` nightly with ``c1`` (2MASS did not: False). Needs calibration scans
        spanning ``min_airmass_range``; otherwise the default is kept and the solution says so.
    min_airmass_range
        Spread of the calibration scans' airmasses needed to fit ``c2`` (0.2).
    forms
        Forms of ``c1(t)`` tried, among ``constant``, ``linear``, ``quadratic``,
        ``piecewise`` (continuous piecewise-linear with one knot, placed at or between
        calibration observations where the fit is best, with at least two observations on
        or before it and two on or after it). 2MASS tested these four and chose piecewise
        for J, constant for H and Ks.
    select_tolerance_mag
        The chosen form is the simplest whose leave-one-observation-out RMS is within this
        of the best (0.002 mag: a more complex form must earn its parameters).
    max_extrapolation_hours
        ``c1(t)`` holds its value at the first (last) calibration observation before (after)
        the calibrated span: a fitted trend is not extrapolated (0 h). A form is still fitted
        over the observations only.
    match_radius_arcsec
        Standard ↔ point source match radius (1.5": the scans' astrometry is good to ~0.1").
    isolation_arcsec, isolation_dmag
        A standard with another point source within 4" brighter than its own magnitude
        + 2.5 (> 10 % of its flux) is confused and not used.
    rd_flg
        ``rd_flg`` digits whose measurements calibrate (``"2"``: PSF photometry on the
        unsaturated R2−R1 frames normalised to the curve-of-growth aperture, which defines
        the photometric scale; R1 and profile-fit magnitudes are normalised to it too but are
        noisier and nonlinear-prone).
    mag_bright, mag_faint
        Band → usable standard magnitude range: 0.5 mag fainter than where R2−R1 saturates
        (J 9.0, H 8.5, Ks 8.0, facts 3.1; the saturation point varies by ~0.5 mag), hence
        J 9.5, H 9.0, Ks 8.5; faint limits J 15.0, H 14.5, Ks 14.0 (the SNR cut is the
        binding one; these only keep out standards with catalogue errors above ~0.02 mag).
    min_snr
        Minimum SNR of the scan measurement (50, cmsig ≤ 0.022 mag: the stars that define
        the scan's photometric scale, as ``catalog.norm_min_snr``; fainter standards carry the
        faint-end biases of detection and sky, −0.013 mag at J 14 in the ci preset).
    max_std_msig
        Standards with a catalogue error above this (mag) are not used (0.05).
    error_floor_mag
        Added in quadrature to each standard's measurement and catalogue errors (0.01:
        flat-field and PSF-model residuals that photon noise does not describe).
    clip_sigma, max_iterations
        Outlier rejection (saturated, variable, confused standards, bad matches): standards
        more than 4 robust σ (1.4826 MAD) from their scan's mean, and scans more than 4 σ from
        the fitted form, are rejected, iterating to convergence (at most 10 passes).
    min_standards_scan
        A calibration scan needs this many usable standards in a band to give a zero point
        (3).
    min_scans
        A band needs this many calibration scans with a zero point to be calibrated (1).
    scans_per_observation, observation_gap_minutes
        Grouping of calibration scans into calibration observations (the unit left out in
        form selection): consecutive scans of one field, at most 6 (a 2MASS calibration
        observation is 6 scans), no gap above 20 minutes between them.
    uncalibrated_zp_err
        1σ uncertainty given to the instrumental zero point of a band without calibration
        (0.1 mag: 2MASS nightly ``c1`` spanned −0.2…+0.2 mag, its night-to-night changes up
        to 0.1–0.2 mag).
    """

    extinction: dict = field(default_factory=lambda: {"J": 0.109, "H": 0.031, "K": 0.061})
    fit_extinction: bool = False
    min_airmass_range: float = 0.2
    forms: tuple = ("constant", "linear", "quadratic", "piecewise")
    select_tolerance_mag: float = 0.002
    max_extrapolation_hours: float = 0.0
    match_radius_arcsec: float = 1.5
    isolation_arcsec: float = 4.0
    isolation_dmag: float = 2.5
    rd_flg: tuple = ("2",)
    mag_bright: dict = field(default_factory=lambda: {"J": 9.5, "H": 9.0, "K": 8.5})
    mag_faint: dict = field(default_factory=lambda: {"J": 15.0, "H": 14.5, "K": 14.0})
    min_snr: float = 50.0
    max_std_msig: float = 0.05
    error_floor_mag: float = 0.01
    clip_sigma: float = 4.0
    max_iterations: int = 10
    min_standards_scan: int = 3
    min_scans: int = 1
    scans_per_observation: int = 6
    observation_gap_minutes: float = 20.0
    uncalibrated_zp_err: float = 0.1

    def __post_init__(self):
        bad = [f for f in self.forms if f not in FORMS]
        if bad or not self.forms:
            raise ConfigError(f"photcal.forms must be a non-empty list among {list(FORMS)}, got {list(self.forms)}")
        for name in ("extinction", "mag_bright", "mag_faint"):
            if set(getattr(self, name)) != set(BANDS):
                raise ConfigError(f"photcal.{name} needs exactly the bands {BANDS}")
        if (self.match_radius_arcsec <= 0 or self.clip_sigma <= 0 or self.min_standards_scan < 1
                or self.min_scans < 1 or self.scans_per_observation < 1 or self.max_iterations < 1
                or self.error_floor_mag < 0 or self.uncalibrated_zp_err < 0 or self.select_tolerance_mag < 0
                or self.max_extrapolation_hours < 0):
            raise ConfigError("photcal: match_radius_arcsec, clip_sigma > 0; min_standards_scan, min_scans, "
                              "scans_per_observation, max_iterations >= 1; error floors, tolerances >= 0")


# --------------------------------------------------------------------------------------
# Matching a calibration scan to its standards


def _float_col(t, name: str) -> np.ndarray:
    """A numeric column as float with NaN where null/masked."""
    c = t[name]
    if hasattr(c, "filled"):
        c = c.filled(np.nan) if c.dtype.kind == "f" else np.ma.asarray(c).astype(float).filled(np.nan)
    a = np.asarray(c)
    if a.dtype == object:
        a = np.array([np.nan if v is None else v for v in a], float)
    return a.astype(float)


def _str_col(t, name: str, n: int, fill: str = "") -> np.ndarray:
    if name not in _colnames(t):
        return np.full(n, fill)
    c = t[name]
    if hasattr(c, "filled"):
        c = c.filled(fill)
    a = np.asarray(c)
    if a.dtype == object:
        a = np.array([fill if v is None else str(v) for v in a])
    return a.astype(str)


def _colnames(t) -> list[str]:
    return list(t.colnames) if hasattr(t, "colnames") else list(t.keys())


def _epochs(ra, dec, frames: Mapping[str, np.ndarray], band: str) -> tuple[np.ndarray, np.ndarray]:
    """Sources' MJD and airmass from the scan's frames of ``band``, or of another band when
    that band has no frames (the bands of one frame are simultaneous)."""
    have = set(np.asarray(frames["band"]).astype(str))
    use = band if band in have else next((b for b in BANDS if b in have), None)
    if use is None:
        raise StepError(f"photcal: the frames table has no rows of any band {BANDS}")
    return source_epochs(ra, dec, frames, use)


def _unit_vectors(ra, dec) -> np.ndarray:
    r, d = np.deg2rad(ra), np.deg2rad(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def calibration_matches(pts, frames: Mapping[str, np.ndarray], standards, *, scan: int, field: str,
                        zp_inst: Mapping[str, float], config: PhotcalConfig = PhotcalConfig()) -> Table:
    """One calibration scan's point sources matched to its field's standards.

    Parameters
    ----------
    pts
        The scan's point sources (``scans/<scan>/pts.parquet`` columns as a Table or a
        mapping of arrays; nulls masked or NaN/None): ``ra``, ``dec`` (deg), ``[jhk]_m``,
        ``[jhk]_cmsig``, ``[jhk]_snr``, ``rd_flg``, ``ph_qual``, ``bl_flg``, ``cc_flg``.
    frames
        The scan's frames table columns (``band``, ``mjd``, ``ra``, ``dec``, ``airmass``).
    standards
        The night's standards (``field``, ``ra``, ``dec``, ``[jhk]_m``, ``[jhk]_msig``;
        :attr:`gpu2mass.io.rawnight.Night.standards`), or None when the night has none.
    scan, field
        Scan number and its calibration field (the manifest's ``field``).
    zp_inst
        Band → instrumental zero point the scan's magnitudes were made with (mag of 1 DN in
        R2−R1).

    Returns
    -------
    Table, one row per standard and band with both a standard magnitude and a measurement:
    ``band``, ``scan``, ``field``, ``std_index`` (row in ``standards``), ``ra``, ``dec``
    (standard, deg), ``sep_arcsec``, ``mjd``, ``airmass`` (of the source's epoch),
    ``m_inst``, ``m_inst_sig`` (cmsig), ``m_std``, ``m_std_sig``, ``sig`` (both with the
    error floor, mag), ``snr``, ``rd_flg``, ``ph_qual``, ``cc_flg`` (the band's characters),
    ``zp_inst``, and ``usable`` (True where every quality cut of ``config`` passes).
    Empty (with a :class:`PhotcalWarning`) when the field has no standards or none is matched.
    """
    cfg = config
    if standards is None or len(standards) == 0:
        warnings.warn(f"calibration scan {scan}: the night has no standards", PhotcalWarning, stacklevel=2)
        return _empty_matches(scan, field, zp_inst)
    nst = len(standards)
    sfield = _str_col(standards, "field", nst)
    in_field = np.flatnonzero(sfield == str(field))
    if in_field.size == 0:
        warnings.warn(f"calibration scan {scan}: field {field!r} has no standards", PhotcalWarning, stacklevel=2)
        return _empty_matches(scan, field, zp_inst)
    sra, sdec = _float_col(standards, "ra")[in_field], _float_col(standards, "dec")[in_field]
    n = len(pts[_colnames(pts)[0]]) if _colnames(pts) else 0
    if n == 0:
        warnings.warn(f"calibration scan {scan}: no point sources", PhotcalWarning, stacklevel=2)
        return _empty_matches(scan, field, zp_inst)
    pra, pdec = _float_col(pts, "ra"), _float_col(pts, "dec")
    from scipy.spatial import cKDTree

    tree = cKDTree(_unit_vectors(pra, pdec))
    chord = 2 * np.sin(np.deg2rad(cfg.match_radius_arcsec / 3600) / 2)
    dist, idx = tree.query(_unit_vectors(sra, sdec), k=1, distance_upper_bound=chord)
    hit = np.isfinite(dist)
    if not hit.any():
        warnings.warn(f"calibration scan {scan}: none of the {in_field.size} standards of field {field!r} "
                      f"is within {cfg.match_radius_arcsec}\" of a point source", PhotcalWarning, stacklevel=2)
        return _empty_matches(scan, field, zp_inst)
    # A point source claimed by two standards is one blend of both: neither calibrates.
    claimed = np.bincount(idx[hit], minlength=n + 1)
    sep = np.degrees(2 * np.arcsin(np.minimum(dist / 2, 1.0))) * 3600
    rows = []
    rd_all = _str_col(pts, "rd_flg", n, "000")
    ph_all = _str_col(pts, "ph_qual", n, "XXX")
    bl_all = _str_col(pts, "bl_flg", n, "000")
    cc_all = _str_col(pts, "cc_flg", n, "000")
    iso_chord = 2 * np.sin(np.deg2rad(cfg.isolation_arcsec / 3600) / 2)
    for k, band in enumerate(BANDS):
        p = band.lower()
        mstd = _float_col(standards, f"{p}_m")[in_field]
        mstd_sig = _float_col(standards, f"{p}_msig")[in_field] if f"{p}_msig" in _colnames(standards) \
            else np.full(in_field.size, np.nan)
        m = _float_col(pts, f"{p}_m")
        sel = np.flatnonzero(hit & np.isfinite(mstd))
        if sel.size == 0:
            continue
        j = idx[sel]
        mi = m[j]
        have = np.isfinite(mi)
        sel, j, mi = sel[have], j[have], mi[have]
        if sel.size == 0:
            continue
        cm = _float_col(pts, f"{p}_cmsig")[j]
        snr = _float_col(pts, f"{p}_snr")[j]
        rd = np.array([s[k] if len(s) > k else "0" for s in rd_all[j]])
        ph = np.array([s[k] if len(s) > k else "X" for s in ph_all[j]])
        bl = np.array([s[k] if len(s) > k else "0" for s in bl_all[j]])
        cc = np.array([s[k] if len(s) > k else "0" for s in cc_all[j]])
        # Confusion: another point source within isolation_arcsec bright enough to matter.
        confused = np.zeros(sel.size, bool)
        for a, (src, mag) in enumerate(zip(j, mi, strict=True)):
            near = tree.query_ball_point(_unit_vectors(pra[src], pdec[src]), iso_chord)
            others = np.array([q for q in near if q != src], int)
            if others.size:
                mo = m[others]
                confused[a] = bool(np.any(~np.isfinite(mo) | (mo < mag + cfg.isolation_dmag)))
        ms = mstd[sel]
        mss = mstd_sig[sel]
        usable = (np.isin(rd, np.asarray(cfg.rd_flg, str)) & (bl == "1") & (cc == "0") & ~confused
                  & (claimed[j] == 1) & np.isfinite(cm) & (snr >= cfg.min_snr)
                  & (ms >= cfg.mag_bright[band]) & (ms <= cfg.mag_faint[band])
                  & ~(mss > cfg.max_std_msig))
        mjd, airmass = _epochs(pra[j], pdec[j], frames, band)
        t = Table()
        t["band"] = np.full(sel.size, band)
        t["scan"] = np.full(sel.size, int(scan), np.int32)
        t["field"] = np.full(sel.size, str(field))
        t["std_index"] = in_field[sel].astype(np.int64)
        t["ra"], t["dec"] = sra[sel], sdec[sel]
        t["sep_arcsec"] = sep[sel]
        t["mjd"], t["airmass"] = mjd, airmass
        t["m_inst"], t["m_inst_sig"] = mi, cm
        t["m_std"], t["m_std_sig"] = ms, np.nan_to_num(mss, nan=0.0)
        t["sig"] = np.sqrt(np.nan_to_num(cm, nan=0.0) ** 2 + np.nan_to_num(mss, nan=0.0) ** 2
                           + cfg.error_floor_mag**2)
        t["snr"] = snr
        t["rd_flg"], t["ph_qual"], t["cc_flg"] = rd, ph, cc
        t["zp_inst"] = np.full(sel.size, float(zp_inst[band]))
        t["usable"] = usable
        rows.append(t)
    if not rows:
        warnings.warn(f"calibration scan {scan}: no standard of field {field!r} has a measurement",
                      PhotcalWarning, stacklevel=2)
        return _empty_matches(scan, field, zp_inst)
    out = vstack(rows, metadata_conflicts="silent")
    out.meta.update(scan=int(scan), field=str(field), zp_inst={b: float(zp_inst[b]) for b in zp_inst},
                    n_field_standards=int(in_field.size))
    return out


_MATCH_COLUMNS = (("band", "U1"), ("scan", np.int32), ("field", "U16"), ("std_index", np.int64),
                  ("ra", float), ("dec", float), ("sep_arcsec", float), ("mjd", float), ("airmass", float),
                  ("m_inst", float), ("m_inst_sig", float), ("m_std", float), ("m_std_sig", float),
                  ("sig", float), ("snr", float), ("rd_flg", "U1"), ("ph_qual", "U1"), ("cc_flg", "U1"),
                  ("zp_inst", float), ("usable", bool))


def _empty_matches(scan, field, zp_inst) -> Table:
    t = Table([np.zeros(0, d) for _, d in _MATCH_COLUMNS], names=[c for c, _ in _MATCH_COLUMNS])
    t.meta.update(scan=int(scan), field=str(field), zp_inst={b: float(zp_inst[b]) for b in zp_inst},
                  n_field_standards=0)
    return t


# --------------------------------------------------------------------------------------
# The zero-point fit


def _basis(form: str, t_hours, knot: float | None) -> np.ndarray:
    """Design matrix (n, p) of ``c1(t)`` for time ``t_hours`` relative to the reference."""
    t = np.atleast_1d(np.asarray(t_hours, float))
    one = np.ones_like(t)
    if form == "constant":
        return one[:, None]
    if form == "linear":
        return np.stack([one, t], axis=1)
    if form == "quadratic":
        return np.stack([one, t, t * t], axis=1)
    if form == "piecewise":
        return np.stack([one, t, np.maximum(t - knot, 0.0)], axis=1)
    raise ValueError(form)


@dataclass
class _Fit:
    coef: np.ndarray
    cov: np.ndarray
    jitter: float
    knot: float | None
    chi2: float


def _wls(a: np.ndarray, y: np.ndarray, e: np.ndarray, jitter: float):
    w = 1.0 / (e**2 + jitter**2)
    aw = a * w[:, None]
    cov = np.linalg.pinv(a.T @ aw)
    coef = cov @ (aw.T @ y)
    r = y - a @ coef
    return coef, cov, float(np.sum(w * r * r))


def _fit_design(a: np.ndarray, y: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Weighted least squares with a scan-to-scan jitter: the extra variance that brings the
    reduced chi² to 1 (none when the errors already explain the scatter)."""
    n, p = a.shape
    coef, cov, chi2 = _wls(a, y, e, 0.0)
    jitter = 0.0
    if n > p and chi2 > n - p:
        lo, hi = 0.0, float(np.ptp(y) + np.max(e) + 1e-6)
        for _ in range(60):  # chi²(jitter) decreases monotonically: bisect for chi² = n − p
            mid = 0.5 * (lo + hi)
            if _wls(a, y, e, mid)[2] > n - p:
                lo = mid
            else:
                hi = mid
        jitter = hi
        coef, cov, chi2 = _wls(a, y, e, jitter)
    return coef, cov, jitter, chi2


def _knot_candidates(t_obs: np.ndarray) -> np.ndarray:
    """Knots of the piecewise form: interior observation times and midpoints between
    observations, with at least two observations on or before and on or after the knot."""
    u = np.unique(np.round(t_obs, 9))
    cand = np.unique(np.concatenate([u, 0.5 * (u[1:] + u[:-1])]))
    ok = ((u[None, :] <= cand[:, None]).sum(1) >= _NPIECE_MIN_SIDE) & \
         ((u[None, :] >= cand[:, None]).sum(1) >= _NPIECE_MIN_SIDE) & (cand > u[0]) & (cand < u[-1])
    return cand[ok]


def _fit_form(form: str, t: np.ndarray, x1: np.ndarray | None, y: np.ndarray, e: np.ndarray,
              t_obs: np.ndarray) -> _Fit:
    """Fit ``c1(t)`` (and ``−c2 (X − 1)`` when ``x1`` = X − 1 is given) to scan points."""
    knots = _knot_candidates(t_obs) if form == "piecewise" else [None]
    best = None
    for knot in knots:
        a = _basis(form, t, knot)
        if x1 is not None:
            a = np.concatenate([a, -x1[:, None]], axis=1)
        coef, cov, jitter, _ = _fit_design(a, y, e)
        # Knots are compared on the fixed-error chi² (the jitter would reward a worse knot).
        chi2_raw = float(np.sum((y - a @ coef) ** 2 / e**2))
        if best is None or chi2_raw < best.chi2:
            best = _Fit(coef, cov, jitter, knot, chi2_raw)
    if best is None:
        raise StepError(f"photcal: no knot for the piecewise form with {np.unique(t_obs).size} observations")
    return best


def _eligible(form: str, n_obs: int) -> bool:
    """A form can be scored if, leaving one observation out, the rest still determine it."""
    if form == "piecewise":
        return n_obs - 1 >= 2 * _NPIECE_MIN_SIDE
    return n_obs - 1 >= FORMS[form]


def _robust_sigma(r: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(r - np.median(r)))) if r.size else 0.0


# --------------------------------------------------------------------------------------
# The solution


@dataclass(frozen=True)
class BandCalibration:
    """One band's zero-point solution (all times in hours from ``t_ref_mjd``).

    ``status`` is ``"calibrated"`` or ``"instrumental"`` (then ``c1`` = 0, the extinction
    term alone is applied and the zero point's error is ``uncalibrated_zp_err``).
    ``coefficients``/``covariance`` are those of the chosen form's basis in ``t`` (hours from
    ``t_ref_mjd``; constant: [a0]; linear: [a0, a1 per h]; quadratic: [a0, a1 per h, a2 per
    h²]; piecewise: [a0, a1 per h, change of slope per h after ``knot_hours``]), then the
    extinction ``c2`` when it was fitted.
    """

    band: str
    status: str
    zp_inst: float
    c2: float
    c2_err: float
    c2_fitted: bool
    form: str | None = None
    coefficients: tuple = ()
    covariance: tuple = ()
    knot_hours: float | None = None
    t_ref_mjd: float = 0.0
    t_span_hours: tuple = (0.0, 0.0)
    jitter: float = 0.0
    zp_err_uncalibrated: float = 0.1
    max_extrapolation_hours: float = 0.0
    loo_rms: Mapping = field(default_factory=dict)
    residual_rms: float = float("nan")
    scan_residual_rms: float = float("nan")
    n_standards: int = 0
    n_used: int = 0
    n_scans: int = 0
    n_observations: int = 0
    scans: tuple = ()
    standards: tuple = ()
    note: str = ""

    def _t(self, mjd) -> np.ndarray:
        t = (np.asarray(mjd, float) - self.t_ref_mjd) * 24.0
        lo, hi = self.t_span_hours
        return np.clip(t, lo - self.max_extrapolation_hours, hi + self.max_extrapolation_hours)

    def c1(self, mjd) -> np.ndarray:
        """``c1(t)`` (mag) at ``mjd`` (array)."""
        mjd = np.asarray(mjd, float)
        if self.status != "calibrated":
            return np.zeros(mjd.shape)
        p = FORMS[self.form]
        a = _basis(self.form, self._t(mjd.ravel()), self.knot_hours)
        return (a @ np.asarray(self.coefficients[:p], float)).reshape(mjd.shape)

    def c1_err(self, mjd, airmass=None) -> np.ndarray:
        """1σ uncertainty (mag) of the zero point at ``mjd``: the fit's, plus the scan-to-scan
        jitter about it (a scan's own zero point scatters that much about the smooth fit),
        plus the fitted ``c2``'s share at ``airmass`` when given."""
        mjd = np.asarray(mjd, float)
        if self.status != "calibrated":
            return np.full(mjd.shape, self.zp_err_uncalibrated)
        p = FORMS[self.form]
        a = _basis(self.form, self._t(mjd.ravel()), self.knot_hours)
        cov = np.asarray(self.covariance, float)
        if self.c2_fitted and airmass is not None:
            x1 = np.broadcast_to(np.asarray(airmass, float), mjd.shape).ravel() - 1.0
            a = np.concatenate([a, -x1[:, None]], axis=1)
        else:
            cov = cov[:p, :p]
        var = np.einsum("ij,jk,ik->i", a, cov, a) + self.jitter**2
        return np.sqrt(np.maximum(var, 0.0)).reshape(mjd.shape)

    def offset(self, mjd, airmass) -> np.ndarray:
        """``c1(t) − c2 (X − 1)``: mag to add to instrumental magnitudes."""
        mjd, airmass = np.broadcast_arrays(np.asarray(mjd, float), np.asarray(airmass, float))
        return self.c1(mjd) - self.c2 * (airmass - 1.0)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["coefficients"] = [float(v) for v in self.coefficients]
        d["covariance"] = [[float(v) for v in row] for row in self.covariance]
        d["t_span_hours"] = [float(v) for v in self.t_span_hours]
        d["loo_rms"] = {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in self.loo_rms.items()}
        d["scans"] = [dict(s) for s in self.scans]
        d["standards"] = _columnar(self.standards)
        d["zero_point_at_ref"] = (float(self.zp_inst + self.c1(self.t_ref_mjd))
                                  if self.status == "calibrated" else float(self.zp_inst))
        for k in ("residual_rms", "scan_residual_rms", "c2_err"):
            d[k] = None if not math.isfinite(d[k]) else float(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> BandCalibration:
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["coefficients"] = tuple(float(v) for v in d.get("coefficients", ()))
        kw["covariance"] = tuple(tuple(float(v) for v in row) for row in d.get("covariance", ()))
        kw["t_span_hours"] = tuple(float(v) for v in d.get("t_span_hours", (0.0, 0.0)))
        kw["loo_rms"] = {k: (float("nan") if v is None else float(v)) for k, v in d.get("loo_rms", {}).items()}
        kw["scans"] = tuple(dict(s) for s in d.get("scans", ()))
        cols = d.get("standards") or {}
        n = len(next(iter(cols.values()))) if cols else 0
        kw["standards"] = tuple({k: v[i] for k, v in cols.items()} for i in range(n))
        for k in ("residual_rms", "scan_residual_rms", "c2_err"):
            kw[k] = float("nan") if d.get(k) is None else float(d[k])
        return cls(**kw)


#: Decimals kept in calibration.json's standards columns (1 µdeg = 3.6 mas, 0.1 mmag, 0.09 s).
_DECIMALS = {"ra": 6, "dec": 6, "mjd": 6, "airmass": 4, "m_inst": 4, "m_std": 4, "sig": 4, "residual": 5}


def _columnar(rows) -> dict:
    """Row dicts as one list per column (calibration.json stays a few MB for a full night)."""
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        v = [r[k] for r in rows]
        if k in _DECIMALS:
            v = [None if x is None else round(float(x), _DECIMALS[k]) for x in v]
        out[k] = v
    return out


@dataclass(frozen=True)
class NightCalibration:
    """The night's photometric calibration, per band (``bands``: band → BandCalibration).

    ``status``: ``"calibrated"`` (every band), ``"partial"`` (some bands calibrated) or
    ``"instrumental"`` (none: instrumental zero points kept, ``c1`` = 0); ``reasons`` say why
    a band is not calibrated.
    """

    status: str
    bands: Mapping[str, BandCalibration]
    reasons: tuple = ()

    def _band(self, band: str) -> BandCalibration:
        if band not in self.bands:
            raise KeyError(f"no calibration for band {band!r}; bands are {list(self.bands)}")
        return self.bands[band]

    def offset(self, band: str, mjd, airmass) -> np.ndarray:
        """``c1(t) − c2 (X − 1)`` (mag, arrays broadcast): add to instrumental magnitudes."""
        return self._band(band).offset(mjd, airmass)

    def offset_err(self, band: str, mjd, airmass=None) -> np.ndarray:
        """1σ uncertainty (mag) of the zero point at ``mjd`` (see :meth:`BandCalibration.c1_err`)."""
        return self._band(band).c1_err(mjd, airmass)

    def zero_point(self, band: str, mjd, airmass) -> np.ndarray:
        """Calibrated zero point (mag giving 1 DN in R2−R1) at ``mjd`` and ``airmass``."""
        b = self._band(band)
        return b.zp_inst + b.offset(mjd, airmass)

    def residual_rms(self, band: str, scan: int | None = None) -> float:
        """RMS (mag) of the used standards' residuals about the solution, over the night or of
        one calibration scan (NaN when there are none)."""
        b = self._band(band)
        r = np.array([s["residual"] for s in b.standards if s["used"] and (scan is None or s["scan"] == scan)],
                     float)
        return float(np.sqrt(np.mean(r**2))) if r.size else float("nan")

    def to_dict(self) -> dict:
        """The content of ``night/calibration.json``."""
        return {"status": self.status, "reasons": list(self.reasons),
                "equation": "m_cal = m_inst + c1(t) - c2 (X - 1); t = (mjd - t_ref_mjd) * 24 h",
                "bands": {b: c.to_dict() for b, c in self.bands.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> NightCalibration:
        return cls(status=d["status"], reasons=tuple(d.get("reasons", ())),
                   bands={b: BandCalibration.from_dict(c) for b, c in d["bands"].items()})


def _observations(scan: np.ndarray, field: np.ndarray, mjd: np.ndarray, cfg: PhotcalConfig) -> dict:
    """Scan → calibration observation number, grouping consecutive scans of one field."""
    order = np.argsort(scan, kind="stable")
    obs, k, count, last = {}, -1, 0, None
    for i in order:
        s, f, t = int(scan[i]), str(field[i]), float(mjd[i])
        new = (last is None or f != last[1] or count >= cfg.scans_per_observation
               or (t - last[2]) * 1440 > cfg.observation_gap_minutes)
        if new:
            k, count = k + 1, 0
        obs[s] = k
        count += 1
        last = (s, f, t)
    return obs


def _instrumental(band: str, zp: float, cfg: PhotcalConfig, note: str, rows: tuple = (), n_std: int = 0):
    return BandCalibration(band=band, status="instrumental", zp_inst=zp, c2=float(cfg.extinction[band]),
                           c2_err=float("nan"), c2_fitted=False, zp_err_uncalibrated=cfg.uncalibrated_zp_err,
                           n_standards=n_std, standards=rows, note=note)


@dataclass
class _ScanPoints:
    """Per calibration scan: its zero-point estimate from its standards (arrays, one per scan)."""

    scan: np.ndarray  # scan numbers
    field: np.ndarray  # calibration fields
    mjd: np.ndarray  # weighted mean epoch of the standards
    x1: np.ndarray  # mean airmass − 1
    y: np.ndarray  # mean (m_std − m_inst [+ c2 (X − 1) when c2 is not fitted]), mag
    err: np.ndarray  # its 1σ error, mag
    n: np.ndarray  # standards used


def _scan_points(scan, field, mjd, x1, z, sig, keep, cfg: PhotcalConfig) -> _ScanPoints:
    """Robust weighted mean of each scan's standards; clears ``keep`` for the rejected ones
    (further than ``clip_sigma`` robust σ from the scan's median) and for scans with fewer
    than ``min_standards_scan`` left."""
    rows = []
    for s in np.unique(scan[keep]):
        sel = np.flatnonzero(keep & (scan == s))
        good = np.ones(sel.size, bool)
        for _ in range(cfg.max_iterations):
            zs = z[sel][good]
            spread = max(_robust_sigma(zs), float(np.median(sig[sel][good])))
            new = np.abs(z[sel] - np.median(zs)) <= cfg.clip_sigma * spread
            if np.array_equal(new, good) or new.sum() == 0:
                break
            good = new
        keep[sel[~good]] = False
        if good.sum() < cfg.min_standards_scan:
            keep[sel] = False
            continue
        i = sel[good]
        w = 1.0 / sig[i] ** 2
        mean = float(np.sum(w * z[i]) / np.sum(w))
        chi2 = float(np.sum(w * (z[i] - mean) ** 2))
        # The stars' scatter beyond their errors (crowding, flat) widens the scan's error.
        err = float(np.sqrt(1.0 / np.sum(w)) * max(1.0, np.sqrt(chi2 / max(i.size - 1, 1))))
        rows.append((int(s), str(field[i[0]]), float(np.sum(w * mjd[i]) / np.sum(w)), float(np.mean(x1[i])),
                     mean, err, int(i.size)))
    cols = list(zip(*rows, strict=True)) if rows else [()] * 7
    types = (np.int64, str, float, float, float, float, np.int64)
    return _ScanPoints(*(np.asarray(c, dtype=t) for c, t in zip(cols, types, strict=True)))


def _design(form: str, t, x1, knot) -> np.ndarray:
    a = _basis(form, t, knot)
    return a if x1 is None else np.concatenate([a, -np.asarray(x1)[:, None]], axis=1)


def _loo_rms(form: str, pt, x1, y, e, obs) -> float:
    """Leave-one-calibration-observation-out RMS (mag): each observation's weighted mean
    zero point predicted by the form fitted to the other observations."""
    res = []
    for o in np.unique(obs):
        tr = obs != o
        f = _fit_form(form, pt[tr], None if x1 is None else x1[tr], y[tr], e[tr], _obs_times(pt, obs, tr))
        a = _design(form, pt[~tr], None if x1 is None else x1[~tr], f.knot)
        w = 1.0 / (e[~tr] ** 2 + f.jitter**2)
        res.append(float(np.sum(w * (y[~tr] - a @ f.coef)) / np.sum(w)))
    return float(np.sqrt(np.mean(np.square(res))))


def _obs_times(pt, obs, sel) -> np.ndarray:
    return np.array([np.mean(pt[sel & (obs == o)]) for o in np.unique(obs[sel])])


def _choose_form(loo: Mapping[str, float], cfg: PhotcalConfig) -> str:
    """The simplest form whose leave-one-out RMS is within ``select_tolerance_mag`` of the
    best; the constant when none could be scored (one calibration observation)."""
    scored = [f for f in cfg.forms if np.isfinite(loo[f])]
    if not scored:
        return "constant"
    best = min(loo[f] for f in scored)
    simplest = sorted(scored, key=lambda f: (FORMS[f], list(FORMS).index(f)))
    return next(f for f in simplest if loo[f] <= best + cfg.select_tolerance_mag)


def _final_fit(form: str, pt, x1, y, e, obs, cfg: PhotcalConfig) -> tuple[_Fit, np.ndarray, np.ndarray]:
    """The form fitted to all scans, rejecting scans far from it (clouds, a bad scan);
    returns the fit, the residual of every scan and which scans were kept."""
    n_obs = np.unique(obs).size
    need_obs = min(n_obs, 3 if form == "piecewise" else FORMS[form])
    good = np.ones(y.size, bool)
    for _ in range(cfg.max_iterations):
        fit = _fit_form(form, pt[good], None if x1 is None else x1[good], y[good], e[good],
                        _obs_times(pt, obs, good))
        r = y - _design(form, pt, x1, fit.knot) @ fit.coef
        if good.sum() <= FORMS[form] + 2:
            break
        scale = max(_robust_sigma(r[good]), float(np.median(e[good])))
        new = np.abs(r) <= cfg.clip_sigma * np.hypot(scale, e)
        # Never clip below what the form needs (piecewise: three observations around its knot).
        if (np.array_equal(new, good) or new.sum() < max(cfg.min_scans, FORMS[form])
                or np.unique(obs[new]).size < need_obs):
            break
        good = new
    return fit, r, good


def _solve_band(band: str, m: Table, zp: float, cfg: PhotcalConfig) -> BandCalibration:
    """One band's solution from its match rows (all calibration scans)."""
    n_all = len(m)
    use = np.asarray(m["usable"], bool)
    scan = np.asarray(m["scan"], np.int64)
    mjd = np.asarray(m["mjd"], float)
    x1 = np.asarray(m["airmass"], float) - 1.0
    y_raw = np.asarray(m["m_std"], float) - np.asarray(m["m_inst"], float)
    sig = np.asarray(m["sig"], float)
    c2_default = float(cfg.extinction[band])
    fields = np.asarray(m["field"]).astype(str)

    def rows_out(resid, used):
        return tuple({"scan": int(scan[i]), "field": str(fields[i]), "std_index": int(m["std_index"][i]),
                      "ra": float(m["ra"][i]), "dec": float(m["dec"][i]), "mjd": float(mjd[i]),
                      "airmass": float(x1[i] + 1), "m_inst": float(m["m_inst"][i]), "m_std": float(m["m_std"][i]),
                      "sig": float(sig[i]), "usable": bool(use[i]), "used": bool(used[i]),
                      "residual": None if not np.isfinite(resid[i]) else float(resid[i])} for i in range(n_all))

    keep = use & np.isfinite(y_raw) & np.isfinite(sig)
    fit_c2, c2_note = cfg.fit_extinction, ""
    if fit_c2:
        xs = np.array([np.mean(x1[keep & (scan == s)]) for s in np.unique(scan[keep])])
        if xs.size < 2 or np.ptp(xs) < cfg.min_airmass_range:
            fit_c2 = False
            c2_note = (f"c2 not fitted: calibration airmasses span {np.ptp(xs) if xs.size else 0:.3f} "
                       f"< {cfg.min_airmass_range}; default kept")
    # Each star's zero-point estimate (extinction-corrected unless c2 is fitted).
    z = y_raw if fit_c2 else y_raw + c2_default * x1
    pts = _scan_points(scan, fields, mjd, x1, z, sig, keep, cfg)
    if pts.scan.size < cfg.min_scans:
        note = (f"band {band}: {pts.scan.size} calibration scan(s) with ≥ {cfg.min_standards_scan} usable "
                f"standards, {cfg.min_scans} needed; instrumental zero point kept")
        return _instrumental(band, zp, cfg, note, rows_out(np.full(n_all, np.nan), np.zeros(n_all, bool)),
                             int(use.sum()))
    obs_of = _observations(pts.scan, pts.field, pts.mjd, cfg)
    obs = np.array([obs_of[int(s)] for s in pts.scan])
    n_obs = int(np.unique(obs).size)
    y = pts.y
    if fit_c2 and n_obs < 2:
        fit_c2, c2_note = False, "c2 not fitted: one calibration observation; default kept"
        y = y + c2_default * pts.x1
    xarg = pts.x1 if fit_c2 else None
    t_ref = float(np.mean(pts.mjd))
    pt = (pts.mjd - t_ref) * 24.0
    loo = {f: (_loo_rms(f, pt, xarg, y, pts.err, obs)
               if _eligible(f, n_obs) and not (fit_c2 and n_obs - 1 < FORMS[f] + 1) else float("nan"))
           for f in cfg.forms}
    form = _choose_form(loo, cfg)
    fit, r, good = _final_fit(form, pt, xarg, y, pts.err, obs, cfg)
    p = FORMS[form]
    c2 = float(fit.coef[p]) if fit_c2 else c2_default
    c2_err = float(np.sqrt(fit.cov[p, p])) if fit_c2 else float("nan")
    band_cal = BandCalibration(
        band=band, status="calibrated", zp_inst=zp, c2=c2, c2_err=c2_err, c2_fitted=fit_c2, form=form,
        coefficients=tuple(float(v) for v in fit.coef),
        covariance=tuple(tuple(float(v) for v in row) for row in fit.cov),
        knot_hours=None if fit.knot is None else float(fit.knot), t_ref_mjd=t_ref,
        t_span_hours=(float(pt[good].min()), float(pt[good].max())), jitter=float(fit.jitter),
        zp_err_uncalibrated=cfg.uncalibrated_zp_err, max_extrapolation_hours=cfg.max_extrapolation_hours,
        loo_rms=loo, n_standards=int(use.sum()), n_scans=int(good.sum()),
        n_observations=int(np.unique(obs[good]).size), note=c2_note)
    # Residuals of every matched standard about the solution (m_std − m_cal).
    resid = y_raw - (band_cal.c1(mjd) - c2 * x1)
    used = keep & np.isin(scan, pts.scan[good])
    c1_scan = y + (c2 * pts.x1 if fit_c2 else 0.0)
    scan_rows = tuple({"scan": int(pts.scan[i]), "field": str(pts.field[i]), "observation": int(obs[i]),
                       "mjd": float(pts.mjd[i]), "airmass": float(pts.x1[i] + 1), "c1": float(c1_scan[i]),
                       "c1_err": float(pts.err[i]), "n_standards": int(pts.n[i]), "residual": float(r[i]),
                       "used": bool(good[i])} for i in range(pts.scan.size))
    ru = resid[used]
    return dataclasses.replace(band_cal, scans=scan_rows, standards=rows_out(resid, used), n_used=int(used.sum()),
                               residual_rms=float(np.sqrt(np.mean(ru**2))) if ru.size else float("nan"),
                               scan_residual_rms=float(np.sqrt(np.mean(r[good] ** 2))))


def solve_night_calibration(matches: Sequence[Table], *, config: PhotcalConfig = PhotcalConfig(),
                            zp_inst: Mapping[str, float] | None = None) -> NightCalibration:
    """The night's zero-point solution from the calibration scans' matches.

    Parameters
    ----------
    matches
        :func:`calibration_matches` tables, one per calibration scan (empty ones allowed;
        an empty sequence gives the instrumental solution).
    zp_inst
        Band → instrumental zero point, needed only when no match table says it (a night
        without calibration scans); defaults to ``transients.zero_point``'s defaults.

    Returns
    -------
    NightCalibration. Bands without enough usable standards keep their instrumental zero
    point (``c1`` = 0) and say why in ``reasons``.

    Raises
    ------
    StepError
        Match tables made with different instrumental zero points for one band.
    """
    cfg = config
    tables = [t for t in matches if t is not None]
    zps: dict[str, float] = {}
    for t in tables:
        for b, v in (t.meta.get("zp_inst") or {}).items():
            if b in zps and abs(zps[b] - float(v)) > 1e-9:
                raise StepError(f"photcal: calibration scan {t.meta.get('scan')} has instrumental zero point "
                                f"{v} in band {b}, others {zps[b]}: magnitudes on different scales")
            zps[b] = float(v)
    if zp_inst is not None:
        zps = {**{b: float(v) for b, v in zp_inst.items()}, **zps}
    missing = [b for b in BANDS if b not in zps]
    if missing:
        from gpu2mass.transients import TransientConfig

        zps.update({b: float(TransientConfig().zero_point[b]) for b in missing})
    nonempty = [t for t in tables if len(t)]
    allm = vstack(nonempty, metadata_conflicts="silent") if nonempty else _empty_matches(0, "", zps)
    bands, reasons = {}, []
    for band in BANDS:
        mb = allm[np.asarray(allm["band"]).astype(str) == band]
        if len(tables) == 0:
            bands[band] = _instrumental(band, zps[band], cfg, "no calibration scans in the night")
        elif len(mb) == 0:
            bands[band] = _instrumental(band, zps[band], cfg, f"band {band}: no standard matched in "
                                        f"{len(tables)} calibration scan(s)")
        else:
            bands[band] = _solve_band(band, mb, zps[band], cfg)
        if bands[band].status != "calibrated":
            reasons.append(bands[band].note)
    n_cal = sum(b.status == "calibrated" for b in bands.values())
    status = "calibrated" if n_cal == len(BANDS) else ("instrumental" if n_cal == 0 else "partial")
    if len(tables) == 0:
        reasons = ["no calibration scans in the night: instrumental zero points kept (c1 = 0)"]
    return NightCalibration(status=status, bands=bands, reasons=tuple(dict.fromkeys(reasons)))


# --------------------------------------------------------------------------------------
# Applying it


def apply_calibration(pts, frames: Mapping[str, np.ndarray], calibration: NightCalibration) -> Table:
    """A scan's point sources with calibrated magnitudes.

    Each source's ``[jhk]_m`` and ``[jhk]_m_stdap`` (upper limits included: ``rd_flg`` 0 and
    6 rows) get the offset ``c1(t) − c2 (X − 1)`` at its own epoch and airmass
    (:func:`gpu2mass.epochs.source_epochs` on the scan's ``frames``); the zero point's
    uncertainty is added in quadrature to ``[jhk]_msigcom`` (the PSC's total error includes
    it; ``[jhk]_cmsig`` and ``[jhk]_msig_stdap`` do not); fluxes stay in DN.

    Parameters
    ----------
    pts
        Astropy Table of the scan's point sources (as written by the scan pipeline); not
        modified.
    frames
        The scan's frames table columns.

    Returns
    -------
    A new Table; ``meta["photcal_status"]`` is the calibration's status.
    """
    out = Table(pts, copy=True)
    n = len(out)
    if n == 0:
        out.meta["photcal_status"] = calibration.status
        return out
    ra, dec = _float_col(out, "ra"), _float_col(out, "dec")
    for band in BANDS:
        p = band.lower()
        if not any(c in out.colnames for c in (f"{p}_m", f"{p}_m_stdap")):
            continue
        mjd, airmass = _epochs(ra, dec, frames, band)
        off = calibration.offset(band, mjd, airmass)
        err = calibration.offset_err(band, mjd, airmass)
        for name in (f"{p}_m", f"{p}_m_stdap"):
            if name in out.colnames:
                out[name] = _shifted(out[name], off)
        if f"{p}_msigcom" in out.colnames:
            c = out[f"{p}_msigcom"]
            v = _float_col(out, f"{p}_msigcom")
            new = np.hypot(v, err)
            mask = np.asarray(c.mask, bool) if hasattr(c, "mask") else ~np.isfinite(v)
            out[f"{p}_msigcom"] = MaskedColumn(new, mask=mask | ~np.isfinite(new))
    out.meta["photcal_status"] = calibration.status
    return out


def _shifted(col, off: np.ndarray):
    v = np.asarray(col.filled(np.nan) if hasattr(col, "filled") else col, float) + off
    mask = np.asarray(col.mask, bool) if hasattr(col, "mask") else np.zeros(v.size, bool)
    return MaskedColumn(v, mask=mask | ~np.isfinite(v))


def frame_zero_points(frames: Mapping[str, np.ndarray], calibration: NightCalibration
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated zero point (mag giving 1 DN in R2−R1) and its 1σ error of every row of a
    scan's frames table (its ``band``, ``mjd`` and ``airmass``): for ``frames.parquet``'s
    ``zp_mag`` column."""
    band = np.asarray(frames["band"]).astype(str)
    mjd, x = np.asarray(frames["mjd"], float), np.asarray(frames["airmass"], float)
    zp, err = np.full(band.size, np.nan), np.full(band.size, np.nan)
    for b in np.unique(band):
        s = band == b
        zp[s] = calibration.zero_point(b, mjd[s], x[s])
        err[s] = calibration.offset_err(b, mjd[s], x[s])
    return zp, err


def atlas_magzp(calibration: NightCalibration, band: str, mjd: float, airmass: float,
                zp_inst: float) -> tuple[float, float]:
    """``MAGZP`` and ``MAGZPERR`` of an Atlas Image whose pixels are on the R2−R1 frame DN
    scale of instrumental zero point ``zp_inst``, at the image's mean ``mjd`` and airmass."""
    b = calibration.bands.get(band)
    # A calibrated band's offset is relative to the instrumental scale it was fitted on.
    if b is not None and b.status == "calibrated" and abs(b.zp_inst - zp_inst) > 1e-9:
        raise StepError(f"photcal: Atlas Image zero point {zp_inst} differs from the calibration's "
                        f"instrumental {b.zp_inst} in band {band}")
    off = float(calibration.offset(band, mjd, airmass))
    return float(zp_inst) + off, float(calibration.offset_err(band, mjd, airmass))
