"""Photometric error calibration from calibration-scan repeats: ``[jhk]_cmsig`` (facts
sheet 3.3; https://web.ipac.caltech.edu/staff/davy/2mass/QA/photom_precision.html).

2MASS compared the profile-fit errors of ``rd_flg`` 2 stars with the repeatability of their
measurements in the calibration scans, derived empirical corrections from those repeats and
applied them to the science scans' ``rd_flg`` 2 errors: ``[jhk]_cmsig``. ``rd_flg`` 1 errors
(R1 apertures, from the scatter of six measurements) and the profile fits of stars
saturated in R1 are left alone. The same here, per night and band:

- :func:`repeat_residuals`: the calibration scans' calibrated ``rd_flg`` 2 measurements
  grouped into stars (each calibration field is scanned several times a night: 6 to 12
  measurements a star), each scan's common offset, and each measurement's residual from
  its star's weighted mean once its scan's offset is taken out.
- :func:`solve_error_calibration`: per band, the correction ``cmsig = sqrt((a·σ)² + s² +
  (k·q)²)`` of a raw error σ in a scan whose photometric scale has the quoted error q
  (``psf_scale_err``: the normalisation's and the curve of growth's, from the scan's own
  stars, :func:`gpu2mass.catalog.band_photometry`): a floor ``s`` fitted so that the
  residuals have unit robust spread in every magnitude bin (and, where allowed, a factor
  ``a``; 1 by default), and a scale factor ``k`` that makes the quoted q match the
  scatter of the calibration scans' offsets (:class:`ErrorCalibration`, written to
  ``night/errors.json``).
- :func:`apply_error_calibration`: a scan's point sources with ``[jhk]_cmsig``,
  ``[jhk]_msigcom`` and ``ph_qual`` of ``rd_flg`` 2 measurements rewritten.

The form. Per magnitude bin, the factor that makes a bin's residuals unit-spread is 1.2–3 at
J 9–11 and 1.0–1.1 fainter than J 13 (ci, scan and night presets); inside a bin it
over-corrects the stars with the larger raw errors and under-corrects those with the
smaller (spreads 0.6–0.9 against 1.1–1.4 for the two halves split at the bin's median
error), whereas a floor added in quadrature brings both halves mostly to 0.9–1.1. The excess
is an error of a few mmag that does not scale with the photon noise: each scan's PSF →
aperture normalisation and curve of growth (one value per scan and band, from a few dozen
stars) is off by 1–15 mmag, independently from scan to scan. One floor per band describes
every bin (k² ≈ a² + s²/σ²), is smooth and monotone in magnitude by construction (the
effective factor falls as σ grows) and is still determined on a night with one bright
star per bin, where per-bin factors are not. Fainter than J 14 the repeats of the ci
preset's 16-frame calibration scans are 5–13 % wider than their raw errors, but the
science scans' faint stars are not (their ``Δm/msigcom`` spreads against the truth are
0.98–1.08 on the ci, scan and night presets): a fitted factor (1.09–1.13 on ci) took the
faint science spreads to 0.87–0.99. So the factor is held at 1 by default
(:attr:`ErrcalConfig.factor_range`) and the floor alone is fitted.

What cmsig holds. Two parts of the excess behave differently. The per-scan part — each
scan's PSF → aperture normalisation and curve of growth, one value per scan and band from
a few dozen stars — shifts all of a scan's stars together and shrinks with the scan's
length: against the truth through the true zero points it was 2–7 mmag rms (up to 17) in
the 16- and 44-frame calibration scans of the ci and night presets, 4–6 mmag in the ci
preset's 60-frame science scans and 1–2 mmag in 273-frame ones. A floor fitted to
residuals about the stars' means carried the calibration scans' share into every science
scan (0.0035–0.0054 mag: Δm/cmsig spreads of 0.81 in the night preset's Ks). So the
repeats' scan offsets are taken out before the floor is fitted (the floor is what
differs from star to star: 0.5–1 mmag in the presets), and each scan gets its own scale
error instead: the quoted q of its curve of growth and normalisation, times the factor
k by which the calibration scans' offsets exceed their own quoted q (1.0–1.6 in the
presets). The offsets also hold the transparency changes that the night's zero-point
form does not follow; they count as scale error in k, on the safe side, and the night's
zero point's own error and jitter go to ``msigcom`` by
:func:`gpu2mass.photcal.apply_calibration`, as in 2MASS. A science scan's ``m − m_true``
through the true zero points (issue 4's comparison) holds its scale error, and cmsig
holds it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from astropy.table import MaskedColumn, Table
from scipy.optimize import minimize
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from gpu2mass import flags
from gpu2mass.errors import ConfigError, StepError

__all__ = ["BandErrors", "ErrcalConfig", "ErrorCalibration", "apply_error_calibration",
           "repeat_residuals", "solve_error_calibration"]

_MAD = 1.4826  # robust σ per median absolute deviation of a normal distribution
_MAG = 2.5 / np.log(10.0)  # 1.0857: mag per unit relative flux error


@dataclass(frozen=True)
class ErrcalConfig:
    """Settings of the error calibration from calibration-scan repeats.

    Attributes
    ----------
    match_radius_arcsec
        Detections of two calibration scans closer than this are one star (1.0": the scans'
        relative astrometry is good to ~0.1", the stars used are SNR ≥ 20). A group holding
        two detections of one scan (a pair closer than this) is left out.
    min_repeats
        A star needs ``rd_flg`` 2 measurements in at least this many calibration scans (3:
        with two, the residuals' spread is that of one difference and says nothing about
        which measurement is off).
    min_snr
        Stars whose median SNR over the repeats is below this are left out (20, cmsig ≈
        0.05 mag: fainter stars are detected only in the scans where the noise pushed them
        up, which shrinks their residuals about the mean of the detected ones; the fainter
        end needs no correction in the presets, the faint ``Δm/msigcom`` spreads are 1.0).
    bin_width_mag
        Magnitude bins over the stars' mean magnitudes, from the brightest star (1.0 mag).
    min_stars_bin, min_measurements_bin
        A bin with fewer stars or residuals than these (5, 30) is merged with its fainter
        neighbour (the bright end is sparse); the faintest leftover with its brighter one.
    max_weight_bin
        A bin counts in the fit with the number of its residuals, at most this many (200),
        so that the few bright bins, where the floor shows, are not outvoted by the
        thousands of faint residuals.
    factor_range
        Range of the factor ``a`` (1, 1: not fitted, see the module notes; 2MASS's raw
        errors were 2× too large at the bright end and needed factors below 1, which a
        range such as (0.5, 3) allows).
    max_floor_mag
        Upper clamp of the floor ``s`` (0.03 mag; 2MASS's nightly calibration scatter
        about the zero-point fit was 0.011 mag).
    min_stars
        Fewer stars with repeats in a band than this (20) or fewer than two bins: no
        correction (factor 1, floor 0) and the band is marked ``uncorrected`` with the
        reason (a night with a single calibration scan has no repeats at all).
    remove_scan_offsets, offset_passes
        Take each calibration scan's common offset out of its residuals (True; the median
        residual of its stars, alternated with the stars' means ``offset_passes`` times),
        so that the floor holds only what differs from star to star within a scan (see
        the module notes: the scan-to-scan part is the zero point's jitter, in msigcom).
    min_scale_scans, max_scale_factor
        The scale factor (module notes) needs the offsets of at least this many (4)
        calibration scans in fields scanned at least twice; it is clamped to at most
        ``max_scale_factor`` (5).
    """

    match_radius_arcsec: float = 1.0
    min_repeats: int = 3
    min_snr: float = 20.0
    bin_width_mag: float = 1.0
    min_stars_bin: int = 5
    min_measurements_bin: int = 30
    max_weight_bin: int = 200
    factor_range: tuple = (1.0, 1.0)
    max_floor_mag: float = 0.03
    min_stars: int = 20
    remove_scan_offsets: bool = True
    offset_passes: int = 4
    min_scale_scans: int = 4
    max_scale_factor: float = 5.0

    def __post_init__(self):
        lo, hi = (tuple(self.factor_range) + (None, None))[:2]
        if (self.match_radius_arcsec <= 0 or self.min_repeats < 2 or self.min_snr < 0
                or self.bin_width_mag <= 0 or self.min_stars_bin < 1 or self.min_measurements_bin < 2
                or self.max_weight_bin < 1 or self.max_floor_mag < 0 or self.min_stars < 1
                or self.offset_passes < 1 or self.min_scale_scans < 2 or self.max_scale_factor < 1
                or len(self.factor_range) != 2 or not 0 < lo <= 1 <= hi):
            raise ConfigError("errcal: match_radius_arcsec, bin_width_mag > 0; min_repeats >= 2; "
                              "min_stars, min_stars_bin, max_weight_bin >= 1; min_measurements_bin >= 2; "
                              "offset_passes >= 1; min_scale_scans >= 2; max_scale_factor >= 1; min_snr, max_floor_mag >= 0; factor_range = [lo, hi] with 0 < lo <= 1 <= hi")


@dataclass(frozen=True)
class BandErrors:
    """One band's correction ``cmsig = sqrt((factor·σ)² + floor_mag²)`` of a raw ``rd_flg``
    2 error σ (mag), and the repeats it was fitted to.

    ``bins``: one dict per magnitude bin with ``mag_lo``, ``mag_hi`` (stars' mean
    magnitudes), ``n`` (residuals), ``n_stars``, ``median_cmsig`` (raw, mag),
    ``spread_raw`` and ``spread`` (1.4826 MAD of the residuals over their expected σ, raw
    and corrected: 1 when the errors are right).
    """

    band: str
    status: str  # "corrected" or "uncorrected" (factor 1, floor 0)
    factor: float = 1.0
    floor_mag: float = 0.0
    scale_factor: float = 1.0
    n_stars: int = 0
    n_measurements: int = 0
    bins: tuple = ()
    scans: tuple = ()
    note: str = ""

    def cmsig(self, sigma, scale_err: float = 0.0):
        """Corrected error (mag) of raw errors ``sigma`` (mag, any shape) of a scan whose
        quoted photometric-scale error is ``scale_err`` (fractional, ``psf_scale_err``)."""
        s = np.asarray(sigma, float)
        return np.sqrt((self.factor * s) ** 2 + self.floor_mag**2
                       + (_MAG * self.scale_factor * scale_err) ** 2)

    def to_dict(self) -> dict:
        return {"band": self.band, "status": self.status, "factor": self.factor,
                "floor_mag": self.floor_mag, "scale_factor": self.scale_factor,
                "n_stars": self.n_stars, "n_measurements": self.n_measurements,
                "bins": list(self.bins), "scans": list(self.scans), "note": self.note}


@dataclass(frozen=True)
class ErrorCalibration:
    """The night's error calibration: ``status`` ``corrected`` (all bands), ``partial`` or
    ``uncorrected``; ``bands``: band → :class:`BandErrors`."""

    status: str
    bands: dict = field(default_factory=dict)
    scans: tuple = ()

    def to_dict(self) -> dict:
        """The content of ``night/errors.json``."""
        return {"status": self.status, "form": "cmsig = sqrt((factor * sigma)^2 + floor_mag^2), rd_flg 2",
                "calibration_scans": list(self.scans),
                "bands": {b: e.to_dict() for b, e in self.bands.items()}}


def _column(t, name: str) -> np.ndarray:
    c = t[name]
    if hasattr(c, "filled"):
        c = c.filled(np.nan) if c.dtype.kind == "f" else np.ma.asarray(c).astype(float).filled(np.nan)
    return np.asarray(c, float)


def _rd_digit(t, k: int) -> np.ndarray:
    rd = np.asarray(t["rd_flg"]).astype(str)
    return np.array([int(s[k]) for s in rd], np.int16) if rd.size else np.zeros(0, np.int16)


def repeat_residuals(tables: Mapping[int, Table], band: str, config: ErrcalConfig = ErrcalConfig()) -> dict:
    """The calibration scans' ``rd_flg`` 2 measurements of ``band`` grouped into stars.

    Parameters
    ----------
    tables
        Calibration scan number → its point sources with calibrated ``[jhk]_m``
        (:func:`gpu2mass.photcal.apply_calibration`), ``[jhk]_cmsig``, ``[jhk]_snr``,
        ``rd_flg``, ``ra``, ``dec``.
    band
        ``"J"``, ``"H"`` or ``"K"``.

    Returns
    -------
    dict of arrays, one entry per measurement of a usable star (``min_repeats`` scans, one
    detection per scan, median SNR ≥ ``min_snr``): ``star`` (0…n_stars−1), ``scan``, ``m``
    (mag), ``sigma`` (raw cmsig, mag), ``mean`` (the star's inverse-variance weighted mean
    magnitude), ``resid`` (``m − scan_offset − mean``), ``w_frac`` (the measurement's share
    of its star's weights, w_i/Σw), ``scan_offset`` (mag, the offset of the measurement's
    scan from the stars' means; 0 unless ``remove_scan_offsets``).
    """
    k = flags.BANDS.index(band)
    p = band.lower()
    cfg = config
    parts = {"scan": [], "m": [], "sigma": [], "snr": [], "ra": [], "dec": []}
    for scan, t in tables.items():
        if len(t) == 0:
            continue
        m, c = _column(t, f"{p}_m"), _column(t, f"{p}_cmsig")
        ok = (_rd_digit(t, k) == flags.RD_PSF) & np.isfinite(m) & np.isfinite(c) & (c > 0)
        parts["scan"].append(np.full(ok.sum(), int(scan)))
        parts["m"].append(m[ok])
        parts["sigma"].append(c[ok])
        parts["snr"].append(_column(t, f"{p}_snr")[ok])
        parts["ra"].append(_column(t, "ra")[ok])
        parts["dec"].append(_column(t, "dec")[ok])
    keys = ("star", "scan", "m", "sigma", "mean", "resid", "w_frac", "scan_offset")
    if not parts["m"] or sum(a.size for a in parts["m"]) == 0:
        return {name: np.zeros(0) for name in keys}
    a = {name: np.concatenate(v) for name, v in parts.items()}
    # Groups: detections linked within the match radius, over all scans (local tangent plane).
    dec0 = np.deg2rad(np.median(a["dec"]))
    xy = np.column_stack([a["ra"] * np.cos(dec0), a["dec"]]) * 3600.0
    from scipy.spatial import cKDTree

    pairs = cKDTree(xy).query_pairs(cfg.match_radius_arcsec, output_type="ndarray")
    n = a["m"].size
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    size = np.bincount(group)
    # Distinct scans per group: a group with two detections of one scan is confused.
    uniq = np.unique(np.column_stack([group, a["scan"]]), axis=0)
    n_scans = np.bincount(uniq[:, 0], minlength=size.size)
    order = np.argsort(group, kind="stable")
    starts = np.r_[0, np.cumsum(size)[:-1]]
    med_snr = np.array([np.median(a["snr"][order[s:s + z]]) for s, z in zip(starts, size, strict=True)])
    good_group = (n_scans == size) & (size >= cfg.min_repeats) & (med_snr >= cfg.min_snr)
    keep = good_group[group]
    if not keep.any():
        return {name: np.zeros(0) for name in keys}
    _, star = np.unique(group[keep], return_inverse=True)
    scan = a["scan"][keep]
    m, sig = a["m"][keep], a["sigma"][keep]
    w = 1.0 / sig**2
    sw = np.bincount(star, w)
    offset = np.zeros(m.size)
    if cfg.remove_scan_offsets:
        # Each scan's offset from the stars' means (the median residual of its stars,
        # robust against a few bad measurements), alternated with the means: a few
        # passes converge to well below a millimagnitude.
        _, scan_index = np.unique(scan, return_inverse=True)
        for _ in range(cfg.offset_passes):
            mean = np.bincount(star, w * (m - offset)) / sw
            r = m - mean[star]
            offset = np.array([np.median(r[scan_index == k]) for k in range(scan_index.max() + 1)])[scan_index]
    mean = np.bincount(star, w * (m - offset)) / sw
    return {"star": star, "scan": scan, "m": m, "sigma": sig, "mean": mean[star],
            "resid": m - offset - mean[star], "w_frac": w / sw[star], "scan_offset": offset}


def _expected_sigma(rr: dict, factor: float, floor: float) -> np.ndarray:
    """σ of each residual about its star's weighted mean (weights from the raw errors)
    when the true errors are sqrt((factor·σ)² + floor²): var(m_i − Σ f_j m_j) =
    v_i (1 − 2 f_i) + Σ f_j² v_j, f = w/Σw (sqrt(1 − 1/n)·σ for n equal errors)."""
    v = (factor * rr["sigma"]) ** 2 + floor**2
    f = rr["w_frac"]
    s2 = np.bincount(rr["star"], f**2 * v)
    return np.sqrt(np.maximum(v * (1 - 2 * f) + s2[rr["star"]], 1e-30))


def _robust_spread(x: np.ndarray) -> float:
    return float(_MAD * np.median(np.abs(x - np.median(x)))) if x.size else np.nan


def _bins(mean_mag: np.ndarray, star: np.ndarray, cfg: ErrcalConfig) -> list[tuple[float, float]]:
    """Magnitude bins (lo, hi] of ``bin_width_mag`` from the brightest star, sparse ones
    merged with their fainter neighbour, the faintest leftover with its brighter one."""
    lo = np.floor(mean_mag.min() / cfg.bin_width_mag) * cfg.bin_width_mag
    edges = np.arange(lo, mean_mag.max() + cfg.bin_width_mag, cfg.bin_width_mag)
    out, start = [], edges[0]
    for hi in edges[1:]:
        sel = (mean_mag >= start) & (mean_mag < hi)
        if np.unique(star[sel]).size >= cfg.min_stars_bin and sel.sum() >= cfg.min_measurements_bin:
            out.append((float(start), float(hi)))
            start = hi
    if start <= mean_mag.max():
        if out:
            out[-1] = (out[-1][0], float(mean_mag.max() + 1e-6))
        else:
            out.append((float(start), float(mean_mag.max() + 1e-6)))
    return out


def _scale_factor(rr: dict, quoted: Mapping[int, float], cfg: ErrcalConfig) -> tuple[float, tuple]:
    """The factor that makes the calibration scans' quoted photometric-scale errors
    (``psf_scale_err``) match the scatter of their offsets, and a row per scan.

    A scan's offset ``o`` (mag, from :func:`repeat_residuals`) is its photometric scale's
    error plus the night's zero-point jitter, measured against the mean of the scans that
    share its stars (a connected set of scans: one calibration field) and with the
    statistical error ``e`` of a median of its residuals. By moments over the sets,
    ``k² = Σ[(o − ō)² − e²(1 − 1/n)] / Σ q²(1 − 1/n)`` with ``q`` the quoted errors (mag),
    clamped to ``[1, max_scale_factor]`` (1: quoted errors are not shrunk; with no quoted
    errors or fewer than ``min_scale_scans`` scans in sets of two or more, 1). The zero
    point's jitter counts as scale error here, which errs on the safe side.
    """
    scans = np.unique(rr["scan"])
    if scans.size == 0:
        return 1.0, ()
    # Scans linked by shared stars: one calibration field each.
    _, si = np.unique(rr["scan"], return_inverse=True)
    _, first = np.unique(rr["star"], return_index=True)
    link = coo_matrix((np.ones(si.size), (si, si[first][rr["star"]])), shape=(scans.size, scans.size))
    _, field_of = connected_components(link, directed=False)
    rows, num, den = [], 0.0, 0.0
    for k, scan in enumerate(scans):
        sel = si == k
        o = float(rr["scan_offset"][sel][0])
        e = float(1.2533 * _robust_spread(rr["resid"][sel]) / np.sqrt(sel.sum()))
        q = quoted.get(int(scan))
        q_mag = _MAG * q if q is not None and np.isfinite(q) else np.nan
        rows.append({"scan": int(scan), "field": int(field_of[k]), "offset_mag": round(o, 5),
                     "offset_err_mag": round(e, 5), "n": int(sel.sum()),
                     "quoted_scale_err_mag": None if not np.isfinite(q_mag) else round(q_mag, 5)})
    n_used = 0
    for f in np.unique(field_of):
        members = [r for r in rows if r["field"] == f]
        if len(members) < 2 or any(r["quoted_scale_err_mag"] is None for r in members):
            continue
        o = np.array([r["offset_mag"] for r in members])
        dof = 1.0 - 1.0 / len(members)
        num += float(np.sum((o - o.mean()) ** 2 - dof * np.array([r["offset_err_mag"] for r in members]) ** 2))
        den += float(np.sum(dof * np.array([r["quoted_scale_err_mag"] for r in members]) ** 2))
        n_used += len(members)
    if n_used < cfg.min_scale_scans or den <= 0:
        return 1.0, tuple(rows)
    return float(np.clip(np.sqrt(max(num, 0.0) / den), 1.0, cfg.max_scale_factor)), tuple(rows)


def _solve_band(band: str, rr: dict, cfg: ErrcalConfig, quoted: Mapping[int, float]) -> BandErrors:
    n_stars = int(rr["star"].max() + 1) if rr["star"].size else 0
    n_meas = int(rr["star"].size)
    if n_stars < cfg.min_stars:
        return BandErrors(band, "uncorrected", n_stars=n_stars, n_measurements=n_meas,
                          note=f"{n_stars} stars with >= {cfg.min_repeats} calibration-scan repeats at "
                               f"SNR >= {cfg.min_snr:g} (need {cfg.min_stars}): errors left as measured")
    bins = _bins(rr["mean"], rr["star"], cfg)
    if len(bins) < 2:
        return BandErrors(band, "uncorrected", n_stars=n_stars, n_measurements=n_meas,
                          note="the repeats fill fewer than two magnitude bins: errors left as measured")
    in_bin = [(rr["mean"] >= lo) & (rr["mean"] < hi) for lo, hi in bins]
    weight = np.array([min(b.sum(), cfg.max_weight_bin) for b in in_bin], float)
    a_lo, a_hi = (float(x) for x in cfg.factor_range)

    def spreads(factor, floor):
        z = rr["resid"] / _expected_sigma(rr, factor, floor)
        return np.array([_robust_spread(z[b]) for b in in_bin])

    def cost(p):
        factor, floor = np.clip(p[0], a_lo, a_hi), np.clip(p[1], 0.0, cfg.max_floor_mag)
        return float(np.sum(weight * np.log(spreads(factor, floor)) ** 2))

    # The robust spreads are step functions of the parameters: the floor alone on a 0.1 mmag
    # grid; with a factor, a simplex from a few starts.
    if a_lo == a_hi:
        grid = np.arange(0.0, cfg.max_floor_mag + 5e-5, 1e-4)
        costs = [cost((a_lo, f)) for f in grid]
        x = (a_lo, float(grid[int(np.argmin(costs))]))
    else:
        best = None
        for start in ((1.0, 0.002), (1.0, 0.008), (1.5, 0.0)):
            res = minimize(cost, np.array(start), method="Nelder-Mead",
                           options={"xatol": 1e-4, "fatol": 1e-6, "initial_simplex":
                                    np.array([start, (start[0] + 0.2, start[1]), (start[0], start[1] + 0.004)])})
            if best is None or res.fun < best.fun:
                best = res
        x = (float(best.x[0]), float(best.x[1]))
    factor = float(np.clip(x[0], a_lo, a_hi))
    floor = float(np.clip(x[1], 0.0, cfg.max_floor_mag))
    note = ""
    if (a_lo < a_hi and not a_lo < x[0] < a_hi) or not x[1] < cfg.max_floor_mag:
        note = f"fit clamped to factor {factor:.3f}, floor {floor:.4f} mag (fit {x[0]:.3f}, {x[1]:.4f})"
    scale_factor, scan_rows = _scale_factor(rr, quoted, cfg) if cfg.remove_scan_offsets else (1.0, ())
    raw, fitted = spreads(1.0, 0.0), spreads(factor, floor)
    table = [{"mag_lo": round(lo, 3), "mag_hi": round(hi, 3), "n": int(b.sum()),
              "n_stars": int(np.unique(rr["star"][b]).size),
              "median_cmsig": round(float(np.median(rr["sigma"][b])), 5),
              "spread_raw": round(float(s0), 3), "spread": round(float(s1), 3)}
             for (lo, hi), b, s0, s1 in zip(bins, in_bin, raw, fitted, strict=True)]
    return BandErrors(band, "corrected", factor=round(factor, 4), floor_mag=round(floor, 5),
                      scale_factor=round(scale_factor, 3), n_stars=n_stars, n_measurements=n_meas,
                      bins=tuple(table), scans=scan_rows, note=note)


def solve_error_calibration(tables: Mapping[int, Table], *, scale_errors: Mapping | None = None,
                            config: ErrcalConfig = ErrcalConfig()) -> ErrorCalibration:
    """The night's ``rd_flg`` 2 error correction per band from its calibration scans.

    Parameters
    ----------
    tables
        Calibration scan number → its point sources with calibrated magnitudes (see
        :func:`repeat_residuals`); empty when the night has none.
    scale_errors
        Calibration scan number → band → its quoted photometric-scale error
        (``psf_scale_err``, fractional; the scan's ``photometry.json``), for the scale
        factor; None or missing entries: the factor is 1.

    Returns
    -------
    :class:`ErrorCalibration`; bands without enough repeats are ``uncorrected`` (factor 1,
    floor 0) with the reason in their ``note``.
    """
    se = scale_errors or {}
    bands = {b: _solve_band(b, repeat_residuals(tables, b, config), config,
                            {int(s): (se.get(s) or {}).get(b) for s in tables})
             for b in flags.BANDS}
    n = sum(e.status == "corrected" for e in bands.values())
    status = "corrected" if n == len(bands) else ("uncorrected" if n == 0 else "partial")
    return ErrorCalibration(status=status, bands=bands, scans=tuple(sorted(int(s) for s in tables)))


def apply_error_calibration(pts: Table, errors: ErrorCalibration, *, systematic_mag: float,
                            scale_err: Mapping | None = None, scan: int | None = None) -> Table:
    """A scan's point sources with the error calibration applied to ``rd_flg`` 2.

    Per band, rows with ``rd_flg`` 2 get ``[jhk]_cmsig`` = the band's correction of the
    raw error, ``[jhk]_msigcom`` = sqrt(cmsig² + ``systematic_mag``²) and their ``ph_qual``
    letter re-derived from ``[jhk]_snr`` and the new cmsig where it was A–D (E, F, U, X do
    not depend on cmsig). The catalog step's msigcom also held the scan's quoted
    photometric-scale error; it moves into cmsig, times the band's ``scale_factor``, and is
    not added twice. Other ``rd_flg`` rows are unchanged.

    Parameters
    ----------
    pts
        The scan's point sources as the scan pipeline wrote them, magnitudes instrumental
        or calibrated but ``msigcom`` not yet holding the night's zero-point error (apply
        this before :func:`gpu2mass.photcal.apply_calibration`); not modified.
    errors
        :func:`solve_error_calibration`'s result.
    systematic_mag
        The catalog's flat-field and PSF-mismatch term (``catalog.systematic_mag``), mag.
    scale_err
        Band → the scan's quoted photometric-scale error (``psf_scale_err``, fractional),
        scaled by the band's ``scale_factor`` into cmsig; None or missing: 0.
    scan
        For error messages.

    Returns
    -------
    A new Table; ``meta["errcal_status"]`` is the calibration's status.
    """
    out = Table(pts, copy=True)
    out.meta["errcal_status"] = errors.status
    if len(out) == 0:
        return out
    if "rd_flg" not in out.colnames or "ph_qual" not in out.colnames:
        raise StepError(f"errcal: scan {scan}: point sources without rd_flg/ph_qual columns")
    letters = np.array([list(s) for s in np.asarray(out["ph_qual"]).astype("<U3")])
    for k, band in enumerate(flags.BANDS):
        e = errors.bands.get(band)
        p = band.lower()
        if e is None or e.status != "corrected" or f"{p}_cmsig" not in out.colnames:
            continue
        c = _column(out, f"{p}_cmsig")
        sel = (_rd_digit(out, k) == flags.RD_PSF) & np.isfinite(c)
        q = (scale_err or {}).get(band)
        new = np.where(sel, e.cmsig(c, q if q is not None and np.isfinite(q) else 0.0), c)
        out[f"{p}_cmsig"] = MaskedColumn(new, mask=~np.isfinite(new))
        if f"{p}_msigcom" in out.colnames:
            ms = _column(out, f"{p}_msigcom")
            ms = np.where(sel, np.hypot(new, systematic_mag), ms)
            out[f"{p}_msigcom"] = MaskedColumn(ms, mask=~np.isfinite(ms))
        redo = sel & np.isin(letters[:, k], list("ABCD"))
        if redo.any():
            snr = _column(out, f"{p}_snr")[redo]
            letters[redo, k] = flags.ph_qual_band(flags.RD_PSF, snr, new[redo])
    out["ph_qual"] = np.array(["".join(r) for r in letters]).astype("<U3")
    return out
