"""Final astrometry of the night's point sources (PosPts, facts sheet section 5).

Frame registration (:mod:`gpu2mass.register`, PosFrm) already ties every frame of a scan to
the reference catalog and solves a focal-plane distortion per scan and band. What is left
in the band-merged positions is small and systematic: a residual focal-plane distortion
common to the night (the per-scan fits see each part of the array through different stars)
and a slow along-scan error of each scan's pointing track between the reference stars. This
step solves both from all the night's scans together, as the 2MASS global step ("each scan
split into 12 segments", tied to the reference catalog) did, and gives every source its final
position and error ellipse.

Model (one least-squares solution per sky coordinate, ξ east and η north, arcsec): the
reference-minus-source offset of a matched source is

``Δ = Σ_b w_b f_b(x_b) + g_s(t)``

- ``f_b``: the night-wide correction of band ``b`` (Legendre polynomials P1…Pd of the
  cross-scan pixel position ``[jhk]_x`` in the band's first frame system, normalised to
  [−1, 1] over the array; no constant term, which the tracks carry), weighted by the band's
  share ``w_b`` of the merged position (band merging averages band positions with SNR
  weights, :mod:`gpu2mass.bandmerge`);
- ``g_s``: scan ``s``'s pointing-track correction, piecewise linear in the along-scan
  coordinate ``t`` (arcsec along the line of frame centres) on knots ``track_knot_arcsec``
  apart (a 6° survey scan gets 13 knots, the 2MASS 12 segments).

Weak Gaussian priors on every parameter keep scans with few reference stars well posed;
outliers (unresolved blends, mismatches) are clipped iteratively. The parameter covariance,
scaled by the reduced χ² when that exceeds 1, gives each source the solution's own error.

Position errors (why the scan pipeline's are too small): the per-band PSF-fit errors describe
the core of the residual distribution well (normalised spread 0.9–1.0 against truth), but
about 2 % of SNR > 20 sources sit 5–60 σ off: unresolved blends with a neighbour 0.5–3"
away whose fitted position is the light centroid. Their PSF fits show it (reduced χ²
``psfchi`` of 2–10 where isolated stars give 1.0–1.4), and so do their band positions
(blended stars of different colours have J, H and Ks centroids apart). The measurement
covariance is scaled by the SNR-weighted ``psfchi`` of the source relative to the scan's
typical one (the usual rescaling of a least-squares covariance by the fit's reduced χ²), or
by the significant excess of its band separations over their errors, before the solution's
error and a systematic floor are added. The floor is measured per scan from the reference
residuals: the smallest σ for which the median normalised squared residual equals that of a
unit Gaussian (0.455); on the simulated nights it comes out 0–3 mas.

Measured (``profiling/measure_astrometry.py``, SNR > 20 against truth; figures in
``profiling/results/cpu-2cores-2026-11-24-astrometry.json``): means ≤ 4 mas, robust σ
22–25 mas per coordinate; normalised spread 0.89–0.93 (1.4826 MAD), 1.01–1.08 (5σ-clipped),
1.25–1.28 (plain std) on the ci and tiny nights, 1.75 on the scan preset, whose tail is two
R1-saturated stars with a neighbour 3–4" away, quoted 10 mas and 0.3–0.9" off in all six
calibration scans (their positions come from the R1 / profile fits, not this step).
Systematics of 60 mas injected into the ci night's sources are removed to < 1 mas.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from astropy.table import Table
from numpy.polynomial import legendre
from scipy.optimize import brentq
from scipy.spatial import cKDTree

from gpu2mass.errors import ConfigError, StepError
from gpu2mass.geometry import tan_deproject, tan_project
from gpu2mass.refcat import ReferenceStars

__all__ = ["AstrometryConfig", "NightAstrometry", "solve_night_astrometry"]

_BANDS = ("J", "H", "K")
#: Median of χ² with one degree of freedom: the median of z² for a unit Gaussian z.
_MEDIAN_CHI2_1 = 0.45493642311957283
#: MJD of J2000.0 (JD 2451545.0); Julian years of 365.25 days.
_J2000_MJD = 51544.5


@dataclass(frozen=True)
class AstrometryConfig:
    """Settings of the final astrometric solution.

    Attributes
    ----------
    match_radius_arcsec
        Source–reference match radius (1": frame registration leaves positions good to
        ~0.05"). Matches are one-to-one: a source and a reference star pair only when each is
        the other's nearest.
    min_snr
        Sources used in the solution: best-band SNR at least this (20; fainter sources add
        noise, not information).
    array_width_px
        Cross-scan size of the arrays, pixels (256: NICMOS3), for normalising ``[jhk]_x``.
    cross_scan_degree
        Degree of the per-band cross-scan Legendre correction (3: the sim's and a real
        camera's residual distortion is smooth; terms P1…P3, no constant).
    track_knot_arcsec
        Spacing of the along-scan track knots (1800" = 0.5°: a 273-frame survey scan of
        ~6.3° gets 12–13 segments as in the 2MASS global step, a 16-frame calibration scan 2).
    cross_scan_prior_arcsec, track_prior_arcsec
        σ of the zero-mean Gaussian priors on the correction coefficients, arcsec (0.1": frame
        registration leaves systematics of tens of mas; where a knot has no reference star the
        prior is also the error the solution quotes there).
    clip_sigma
        Matches whose normalised residual exceeds this (per coordinate) are dropped,
        re-evaluated each iteration (4σ).
    iterations
        Solve–clip iterations (4: the clipped set is stable after 2–3).
    psfchi_power
        The measurement errors are scaled by ``(χ / χ_typ)^psfchi_power`` where above 1: χ the
        source's SNR-weighted PSF-fit reduced χ² (``[jhk]_psfchi``), χ_typ its median over the
        scan's sources above ``min_snr`` (0.5: the covariance scales with the reduced χ², the
        usual least-squares rescaling; 0 turns it off). See the module docstring.
    band_consistency, band_consistency_threshold
        Also scale the errors of sources whose band positions disagree: the J–H and J–K
        separations (``sep_j_h``, ``sep_j_k``) over the per-band errors give a χ² per pair;
        its mean over pairs relative to the scan's median, where above the threshold (5: a
        disagreement at the 3 % level for 2 degrees of freedom; below, the statistic of one
        separation is too noisy to rescale by), scales the covariance (the larger of this and
        the PSF-χ² factor is used).
    max_floor_arcsec
        Upper bound of the systematic floor search (0.5").
    min_floor_matches
        A scan with fewer usable reference matches than this takes the night's floor
        (measured from all scans together) instead of its own; a night with fewer gets no
        floor (30: a median of fewer squared residuals is too noisy to set errors by).
    min_reference_matches
        With fewer usable matches than this in the whole night nothing is solved (see
        :attr:`NightAstrometry.status`): frame registration's positions stand.
    """

    match_radius_arcsec: float = 1.0
    min_snr: float = 20.0
    array_width_px: int = 256
    cross_scan_degree: int = 3
    track_knot_arcsec: float = 1800.0
    cross_scan_prior_arcsec: float = 0.1
    track_prior_arcsec: float = 0.1
    clip_sigma: float = 4.0
    iterations: int = 4
    psfchi_power: float = 0.5
    band_consistency: bool = True
    band_consistency_threshold: float = 5.0
    max_floor_arcsec: float = 0.5
    min_floor_matches: int = 30
    min_reference_matches: int = 10

    def __post_init__(self):
        if self.match_radius_arcsec <= 0 or self.track_knot_arcsec <= 0 or self.clip_sigma <= 0:
            raise ConfigError("astrometry.match_radius_arcsec, track_knot_arcsec and clip_sigma must be > 0")
        if self.cross_scan_degree < 0 or self.iterations < 1 or self.array_width_px < 2:
            raise ConfigError("astrometry.cross_scan_degree >= 0, iterations >= 1 and array_width_px >= 2 "
                              "are required")
        if self.cross_scan_prior_arcsec <= 0 or self.track_prior_arcsec <= 0 or self.max_floor_arcsec <= 0:
            raise ConfigError("astrometry priors and max_floor_arcsec must be > 0")


def _col(t, name, fill=np.nan):
    """Column ``name`` of a table or mapping as a float array (masked/None → ``fill``)."""
    names = t.colnames if hasattr(t, "colnames") else list(t)
    if name not in names:
        return None
    c = t[name]
    if hasattr(c, "filled"):
        c = c.filled(fill)
    a = np.asarray(c)
    if a.dtype == object:
        a = np.array([fill if v is None else v for v in a], float)
    return a.astype(float)


def _jyear(mjd: float) -> float:
    return 2000.0 + (float(mjd) - _J2000_MJD) / 365.25


@dataclass
class _ScanAxis:
    """A scan's along-scan coordinate: tangent point, unit axis, knot positions (arcsec)."""

    ra0: float
    dec0: float
    axis: np.ndarray
    knots: np.ndarray
    mjd: float

    @classmethod
    def from_frames(cls, frames: Mapping[str, np.ndarray], width_arcsec: float, spacing: float, scan: int):
        band = np.asarray(frames["band"]).astype(str)
        first = band == band[0] if band.size else np.zeros(0, bool)
        ra, dec = np.asarray(frames["ra"], float)[first], np.asarray(frames["dec"], float)[first]
        ok = np.isfinite(ra) & np.isfinite(dec)
        if not ok.any():
            raise StepError(f"scan {scan}: the frames table has no frame positions")
        ra, dec = ra[ok], dec[ok]
        ra0 = float(np.rad2deg(np.angle(np.mean(np.exp(1j * np.deg2rad(ra))))) % 360.0)
        dec0 = float(np.median(dec))
        xi, eta = tan_project(ra, dec, ra0, dec0)
        axis = np.array([np.ptp(xi), np.ptp(eta)], float)
        axis = axis / np.hypot(*axis) if np.hypot(*axis) > 0 else np.array([0.0, 1.0])
        t = xi * axis[0] + eta * axis[1]
        lo, hi = t.min() - width_arcsec / 2, t.max() + width_arcsec / 2
        nseg = max(1, int(np.ceil((hi - lo) / spacing)))
        mjd = float(np.nanmean(np.asarray(frames["mjd"], float)))
        return cls(ra0, dec0, axis, np.linspace(lo, hi, nseg + 1), mjd)

    def along(self, ra, dec):
        xi, eta = tan_project(ra, dec, self.ra0, self.dec0)
        return xi * self.axis[0] + eta * self.axis[1]

    def hats(self, t):
        """(n, k) piecewise-linear (hat) basis on the knots; clamped beyond the ends."""
        k = self.knots
        t = np.clip(t, k[0], k[-1])
        j = np.clip(np.searchsorted(k, t, side="right") - 1, 0, k.size - 2)
        f = (t - k[j]) / (k[j + 1] - k[j])
        out = np.zeros((t.size, k.size))
        out[np.arange(t.size), j] = 1 - f
        out[np.arange(t.size), j + 1] = f
        return out


@dataclass
class _Sources:
    """What the solution needs of one scan's pts rows."""

    ra: np.ndarray
    dec: np.ndarray
    cov: np.ndarray  # (n, 2, 2) measurement covariance (E, N), arcsec², psfchi-scaled
    weights: np.ndarray  # (n, 3) band shares of the merged position
    xnorm: np.ndarray  # (n, 3) cross-scan position per band, [-1, 1] (0 where absent)
    snr: np.ndarray  # (n,) best-band SNR
    chi_scale: np.ndarray  # (n,) the factor applied to the covariance


def _ellipse_to_cov(maj, mnr, ang_deg):
    """Error ellipse (semi-axes, position angle of the major axis east of north) → (n, 2, 2)
    covariance in (east, north)."""
    th = np.deg2rad(ang_deg)
    u = np.stack([np.sin(th), np.cos(th)], -1)  # major axis direction (E, N)
    v = np.stack([np.cos(th), -np.sin(th)], -1)
    return maj[:, None, None] ** 2 * u[:, :, None] * u[:, None, :] + \
        mnr[:, None, None] ** 2 * v[:, :, None] * v[:, None, :]


def _cov_to_ellipse(c):
    """(n, 2, 2) covariance (E, N) → err_maj, err_min (arcsec), err_ang (deg E of N, [0, 180))."""
    sx2, sy2, sxy = c[:, 0, 0], c[:, 1, 1], c[:, 0, 1]
    tr, det = sx2 + sy2, sx2 * sy2 - sxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0.0))
    maj = np.sqrt(tr / 2 + disc)
    mnr = np.sqrt(np.maximum(tr / 2 - disc, 0.0))
    ang = np.mod(np.rad2deg(0.5 * np.arctan2(2 * sxy, sy2 - sx2)), 180.0)
    return maj, mnr, ang


def _read_sources(pts, cfg: AstrometryConfig, scan: int) -> _Sources:
    ra, dec = _col(pts, "ra"), _col(pts, "dec")
    if ra is None or dec is None:
        raise StepError(f"scan {scan}: the point-source table has no ra/dec columns")
    n = ra.size
    maj, mnr, ang = (_col(pts, c) for c in ("err_maj", "err_min", "err_ang"))
    if maj is None:
        raise StepError(f"scan {scan}: the point-source table has no err_maj/err_min/err_ang columns")
    maj = np.where(np.isfinite(maj) & (maj > 0), maj, 1.0)
    mnr = np.where(np.isfinite(mnr) & (mnr > 0), mnr, maj)
    cov = _ellipse_to_cov(maj, mnr, np.nan_to_num(ang))
    snr = np.zeros((n, 3))
    chi = np.full((n, 3), np.nan)
    xn = np.zeros((n, 3))
    half = (cfg.array_width_px - 1) / 2
    for k, b in enumerate(_BANDS):
        p = b.lower()
        s = _col(pts, f"{p}_snr")
        x = _col(pts, f"{p}_x")
        if s is None or x is None:
            continue
        have = np.isfinite(s) & (s > 0) & np.isfinite(x)
        snr[:, k] = np.where(have, s, 0.0)
        xn[:, k] = np.where(have, np.clip((x - half) / (half + 0.5), -1.0, 1.0), 0.0)
        c = _col(pts, f"{p}_psfchi")
        if c is not None:
            chi[:, k] = np.where(have, c, np.nan)
    tot = snr.sum(1, keepdims=True)
    w = np.divide(snr, tot, out=np.zeros_like(snr), where=tot > 0)
    wc = np.where(np.isfinite(chi), w, 0.0)
    wsum = wc.sum(1)
    chi_eff = np.where(wsum > 0, np.nansum(np.where(np.isfinite(chi), chi, 0.0) * wc, 1)
                       / np.where(wsum > 0, wsum, 1.0), 1.0)
    # Relative to the scan's typical isolated star (whose χ² reflects the PSF model's
    # flux-profile mismatch, not a position error the PSF-fit errors miss).
    bright = (snr.max(1) >= cfg.min_snr) & (wsum > 0)
    typical = float(np.median(chi_eff[bright])) if bright.sum() >= 10 else 1.0
    ratio = np.maximum(chi_eff / max(typical, 1e-3), 1.0)
    scale = ratio ** (2 * cfg.psfchi_power) if cfg.psfchi_power > 0 else np.ones(n)
    if cfg.band_consistency:
        # Band positions that disagree by more than their errors allow: the per-band errors
        # (σ_b = σ_merged · S / (√n_b · SNR_b) for SNR-weighted merging of errors ∝ 1/SNR)
        # give each J–H, J–K separation a χ² with 2 degrees of freedom.
        var_m = (maj**2 + mnr**2) / 2
        nb = (snr > 0).sum(1)
        tot1 = tot[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            var_b = var_m[:, None] * (tot1[:, None] / (np.sqrt(np.maximum(nb, 1))[:, None] * snr)) ** 2
        chi_sep, npair = np.zeros(n), np.zeros(n)
        for k, name in ((1, "sep_j_h"), (2, "sep_j_k")):
            sep = _col(pts, name)
            if sep is None:
                continue
            ok = np.isfinite(sep) & (snr[:, 0] > 0) & (snr[:, k] > 0)
            v = np.where(ok, var_b[:, 0] + var_b[:, k], 1.0)
            chi_sep += np.where(ok, sep**2 / v / 2, 0.0)
            npair += ok
        r_sep = np.where(npair > 0, chi_sep / np.maximum(npair, 1), np.nan)
        use = bright & np.isfinite(r_sep)
        typ = float(np.median(r_sep[use])) if use.sum() >= 10 else 1.0
        rel = np.where(np.isfinite(r_sep), r_sep / max(typ, 1e-3), 0.0)
        scale = np.maximum(scale, np.where(rel > cfg.band_consistency_threshold, rel, 1.0))
    return _Sources(ra, dec, cov * scale[:, None, None], w, xn, snr.max(1), scale)


@dataclass(frozen=True)
class NightAstrometry:
    """The night's PosPts solution (:func:`solve_night_astrometry`).

    Attributes
    ----------
    config
        The settings used.
    params, covariance
        Per coordinate (0: ξ east, 1: η north) the solved parameters (p,) and their
        covariance (p, p), arcsec and arcsec²: first the cross-scan terms of J, H, K
        (``cross_scan_degree`` each), then each scan's track knots in ``scans`` order.
    scans
        Scan numbers, in parameter order.
    axes
        Scan → its along-scan coordinate (tangent point, axis, knots, mean MJD).
    floors_arcsec
        Scan → systematic floor (arcsec per coordinate) added to every source's covariance.
    night_floor_arcsec
        The floor measured from all scans together (used by scans with too few matches).
    reference_source
        Name of the reference catalog.
    stats
        Scan → per-band and overall figures against the reference (see :meth:`figures`),
        before (``"before"``) and after (``"after"``) the correction.
    chi2_reduced
        Reduced χ² of the final fit per coordinate.
    status
        ``"solved"``, or why not: with fewer than ``min_reference_matches`` matches in the
        night (e.g. the default catalog's few G < 10 stars) no correction is applied
        (parameters and their covariance are zero); the errors are still rescaled and floored.
    """

    config: AstrometryConfig
    params: np.ndarray
    covariance: np.ndarray
    scans: tuple[int, ...]
    axes: dict = field(repr=False)
    floors_arcsec: dict
    night_floor_arcsec: float
    reference_source: str
    stats: dict
    chi2_reduced: tuple[float, float]
    status: str = "solved"

    def _offsets(self, scan: int, src: _Sources):
        """Correction (n, 2) arcsec and its covariance diagonal (n, 2) for sources of ``scan``."""
        A, idx = _design(self, scan, src)
        corr = np.stack([A @ self.params[c][idx] for c in (0, 1)], -1)
        var = np.stack([np.einsum("ij,jk,ik->i", A, self.covariance[c][np.ix_(idx, idx)], A) for c in (0, 1)], -1)
        return corr, var

    def apply(self, scan: int, pts) -> Table:
        """The scan's point sources with final positions and error ellipses.

        Parameters
        ----------
        scan
            Scan number (one of the scans the solution was made from).
        pts
            The scan's point-source table as given to :func:`solve_night_astrometry`.

        Returns
        -------
        A copy of ``pts`` (astropy Table) with ``ra``, ``dec`` (deg, ICRS at the scan's epoch)
        corrected and ``err_maj``, ``err_min`` (arcsec), ``err_ang`` (deg east of north)
        from the measurement covariance (PSF-χ²-scaled) + the solution's error + the floor.
        """
        scan = int(scan)
        if scan not in self.axes:
            raise StepError(f"scan {scan} is not part of the night's astrometric solution")
        src = _read_sources(pts, self.config, scan)
        corr, var = self._offsets(scan, src)
        ra, dec = tan_deproject(corr[:, 0], corr[:, 1], src.ra, src.dec)
        floor = self.floors_arcsec.get(scan, self.night_floor_arcsec)
        cov = src.cov.copy()
        cov[:, 0, 0] += var[:, 0] + floor**2
        cov[:, 1, 1] += var[:, 1] + floor**2
        maj, mnr, ang = _cov_to_ellipse(cov)
        out = Table(pts, copy=True) if not isinstance(pts, Table) else pts.copy()
        # Rows without a position, or not moved at all, keep their coordinates bit for bit.
        bad = ~(np.isfinite(src.ra) & np.isfinite(src.dec)) | np.all(corr == 0, axis=1)
        out["ra"] = np.where(bad, src.ra, ra)
        out["dec"] = np.where(bad, src.dec, dec)
        out["err_maj"], out["err_min"], out["err_ang"] = maj, mnr, ang
        return out

    def figures(self, scan: int) -> dict:
        """Per band (``"J"``, ``"H"``, ``"K"``) the scan's final positions against the reference
        catalog: ``astrometric_rms_arcsec`` (rms per coordinate of the unclipped matches with
        that band detected), ``n_ref``, ``offset_ra_mas``, ``offset_dec_mas`` (mean source −
        reference, east and north); bands without matches are absent."""
        return {b: dict(v) for b, v in self.stats.get(int(scan), {}).get("after", {}).items() if b in _BANDS}

    def to_dict(self) -> dict:
        """JSON-ready summary: configuration, reference catalog, the night-wide cross-scan
        corrections per band (mas at P1…Pd) with errors, each scan's track (knots along the
        scan, arcsec; corrections and errors, mas), floors, figures before/after."""
        d = self.config.cross_scan_degree
        cross = {}
        for k, b in enumerate(_BANDS):
            sl = slice(k * d, (k + 1) * d)
            cross[b] = {c: {"coeff_mas": (1e3 * self.params[i][sl]).round(3).tolist(),
                            "error_mas": (1e3 * np.sqrt(np.diag(self.covariance[i])[sl])).round(3).tolist()}
                        for i, c in enumerate(("east", "north"))}
        tracks = {}
        off = 3 * d
        for s in self.scans:
            ax = self.axes[s]
            sl = slice(off, off + ax.knots.size)
            off += ax.knots.size
            tracks[str(s)] = {"knots_arcsec": ax.knots.round(1).tolist(),
                              **{f"{c}_mas": (1e3 * self.params[i][sl]).round(2).tolist()
                                 for i, c in enumerate(("east", "north"))},
                              **{f"{c}_error_mas": (1e3 * np.sqrt(np.diag(self.covariance[i])[sl])).round(2).tolist()
                                 for i, c in enumerate(("east", "north"))}}
        return {"status": self.status, "config": asdict(self.config), "reference_catalog": self.reference_source,
                "cross_scan": cross, "tracks": tracks,
                "floor_arcsec": {str(s): round(float(v), 4) for s, v in self.floors_arcsec.items()},
                "night_floor_arcsec": round(float(self.night_floor_arcsec), 4),
                "chi2_reduced": [round(float(c), 3) for c in self.chi2_reduced],
                "figures": {str(s): v for s, v in self.stats.items()}}


def _design(sol_like, scan: int, src: _Sources) -> tuple[np.ndarray, np.ndarray]:
    """Design matrix of ``scan``'s sources over the parameters that touch them: (n, q) with
    q = 3 × degree + the scan's knots, and the (q,) indices of those parameters in the
    solution's order (a night of many scans never builds a night-wide dense matrix)."""
    cfg = sol_like.config
    d = cfg.cross_scan_degree
    ax = sol_like.axes[scan]
    A = np.zeros((src.ra.size, 3 * d + ax.knots.size))
    for k in range(3):
        # Legendre P1..Pd of the band's cross-scan position, times the band's share.
        V = legendre.legvander(src.xnorm[:, k], d)[:, 1:]
        A[:, k * d:(k + 1) * d] = src.weights[:, k, None] * V
    A[:, 3 * d:] = ax.hats(ax.along(src.ra, src.dec))
    off = 3 * d + sum(sol_like.axes[s].knots.size for s in sol_like.scans[:sol_like.scans.index(scan)])
    return A, np.concatenate([np.arange(3 * d), off + np.arange(ax.knots.size)])


@dataclass
class _Layout:
    config: AstrometryConfig
    scans: tuple
    axes: dict


def _match(src: _Sources, ref: ReferenceStars, ax: _ScanAxis, radius: float, min_snr: float):
    """One-to-one source–reference matches: (source rows, reference rows)."""
    use = np.flatnonzero((src.snr >= min_snr) & np.isfinite(src.ra) & np.isfinite(src.dec))
    if use.size == 0 or len(ref) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sx, sy = tan_project(src.ra[use], src.dec[use], ax.ra0, ax.dec0)
    rx, ry = tan_project(ref.ra, ref.dec, ax.ra0, ax.dec0)
    rtree = cKDTree(np.column_stack([rx, ry]))
    d, j = rtree.query(np.column_stack([sx, sy]), distance_upper_bound=radius)
    ok = np.isfinite(d)
    i, j = use[ok], j[ok]
    # Mutual nearest: the reference star's nearest usable source must be this one.
    stree = cKDTree(np.column_stack([sx, sy]))
    _, back = stree.query(np.column_stack([rx[j], ry[j]]))
    mutual = use[back] == i
    return i[mutual], j[mutual]


def _floor(r2, var, max_floor):
    """Smallest σ ≥ 0 with median(r²/(var + σ²)) = median of χ²₁ (r2, var: flat arrays)."""
    def f(s):
        return np.median(r2 / (var + s * s)) - _MEDIAN_CHI2_1

    if r2.size == 0 or f(0.0) <= 0:
        return 0.0
    if f(max_floor) > 0:
        return float(max_floor)
    return float(brentq(f, 0.0, max_floor, xtol=1e-5))


def solve_night_astrometry(scans: Mapping[int, Table], frames: Mapping[int, Mapping[str, np.ndarray]],
                           reference: Callable[[tuple[float, float], tuple[float, float], float], ReferenceStars],
                           *, config: AstrometryConfig = AstrometryConfig()) -> NightAstrometry:
    """Solve the night's final astrometric correction (see the module docstring).

    Parameters
    ----------
    scans
        Scan number → the scan's point-source table (``scans/<scan>/pts.parquet`` as the scan
        pipeline writes it: ``ra``, ``dec``, ``err_maj``, ``err_min``, ``err_ang``, and per
        band ``[jhk]_snr``, ``[jhk]_x``, ``[jhk]_psfchi``). Tables or mappings of arrays.
    frames
        Scan number → columns of the scan's frames table (``band``, ``mjd``, ``ra``, ``dec``
        per frame; ``scans/<scan>/frames.parquet``).
    reference
        ``reference(ra_range, dec_range, epoch_jyear)`` → :class:`~gpu2mass.refcat.ReferenceStars`
        at that epoch inside the box (RA range may wrap), e.g. a wrapper of
        :func:`gpu2mass.refcat.load_reference_stars` with the night's catalog.

    Returns
    -------
    :class:`NightAstrometry`.

    Raises
    ------
    StepError
        A scan without frames or frame positions.
    """
    cfg = config
    order = tuple(sorted(int(s) for s in scans))
    if not order:
        raise StepError("no scans to solve the night's astrometry from")
    axes, srcs, matches, ref_src = {}, {}, {}, "none"
    width = cfg.array_width_px * 2.0  # arcsec: the array's along-scan extent (2" pixels)
    for s in order:
        if s not in frames:
            raise StepError(f"scan {s}: no frames table for the astrometric solution")
        ax = axes[s] = _ScanAxis.from_frames(frames[s], width, cfg.track_knot_arcsec, s)
        src = srcs[s] = _read_sources(scans[s], cfg, s)
        ok = np.isfinite(src.ra) & np.isfinite(src.dec)
        if not ok.any():
            matches[s] = (np.zeros(0, np.int64), None)
            continue
        pad = 2 * cfg.match_radius_arcsec / 3600.0
        dec_range = (float(src.dec[ok].min() - pad), float(src.dec[ok].max() + pad))
        dra = np.mod(src.ra[ok] - ax.ra0 + 180.0, 360.0) - 180.0
        cosd = max(np.cos(np.deg2rad(max(abs(dec_range[0]), abs(dec_range[1])))), 1e-3)
        ra_range = (float((ax.ra0 + dra.min() - pad / cosd) % 360.0), float((ax.ra0 + dra.max() + pad / cosd) % 360.0))
        ref = reference(ra_range, dec_range, _jyear(ax.mjd))
        ref_src = ref.source
        i, j = _match(src, ref, ax, cfg.match_radius_arcsec, cfg.min_snr)
        # Reference minus source in the source's own tangent plane (east, north), arcsec.
        rx, ry = tan_project(ref.ra[j], ref.dec[j], src.ra[i], src.dec[i])
        matches[s] = (i, np.column_stack([rx, ry]), ref.error_arcsec[j] ** 2)
    lay = _Layout(cfg, order, axes)
    n_total = sum(m[0].size for m in matches.values())
    solved = n_total >= cfg.min_reference_matches
    status = "solved" if solved else (
        f"not solved: only {n_total} point sources match reference stars (need "
        f"{cfg.min_reference_matches}); positions left as frame registration placed them")
    have = [s for s in order if matches[s][0].size]
    d = cfg.cross_scan_degree
    p = 3 * d + sum(axes[s].knots.size for s in order)
    design = {s: _design(lay, s, srcs[s]) for s in have}
    design = {s: (A_s[matches[s][0]], idx) for s, (A_s, idx) in design.items()}
    r = np.concatenate([matches[s][1] for s in have]) if have else np.zeros((0, 2))
    v_ref = np.concatenate([matches[s][2] for s in have]) if have else np.zeros(0)
    v_meas = np.concatenate([np.stack([srcs[s].cov[matches[s][0], 0, 0], srcs[s].cov[matches[s][0], 1, 1]], -1)
                             for s in have]) if have else np.zeros((0, 2))
    scan_of = np.concatenate([np.full(matches[s][0].size, s) for s in have]) if have else np.zeros(0, int)
    prior = np.full(p, 1.0 / cfg.track_prior_arcsec**2)
    prior[:3 * d] = 1.0 / cfg.cross_scan_prior_arcsec**2
    floors = {s: 0.0 for s in order}
    keep = np.ones(r.shape[0], bool)
    params = np.zeros((2, p))
    covs = np.zeros((2, p, p))
    chi2 = [1.0, 1.0]
    bounds = np.cumsum([0] + [matches[s][0].size for s in have])
    blocks = {s: slice(bounds[k], bounds[k + 1]) for k, s in enumerate(have)}

    def model(par):
        """(m, 2) the solution's offsets at the matches."""
        out = np.zeros((r.shape[0], 2))
        for s, sl in blocks.items():
            A_s, idx = design[s]
            out[sl] = np.stack([A_s @ par[c][idx] for c in (0, 1)], -1)
        return out

    for _ in range(cfg.iterations):
        fl = np.array([floors[s] for s in scan_of]) ** 2
        var = v_meas + v_ref[:, None] + fl[:, None]
        for c in (0, 1) if solved else ():
            w = np.where(keep, 1.0 / var[:, c], 0.0)
            # Normal equations accumulated scan by scan (each touches the cross-scan terms
            # and its own knots only).
            N = np.diag(prior)
            rhs = np.zeros(p)
            for s, sl in blocks.items():
                A_s, idx = design[s]
                N[np.ix_(idx, idx)] += (A_s.T * w[sl]) @ A_s
                rhs[idx] += A_s.T @ (w[sl] * r[sl, c])
            try:
                Ninv = np.linalg.inv(N)
            except np.linalg.LinAlgError as exc:
                raise StepError(f"the night's astrometric solution is singular: {exc}") from None
            params[c] = Ninv @ rhs
            res_c = r[:, c] - model(params)[:, c]
            dof = max(int(keep.sum()) - p, 1)
            chi2[c] = float(np.sum(w * res_c**2) / dof)
            covs[c] = Ninv * max(chi2[c], 1.0)
        res = r - model(params)
        keep = np.all(np.abs(res) <= cfg.clip_sigma * np.sqrt(var), axis=1)
        # Floors from the unclipped residuals (both coordinates), per scan where there are
        # enough. (The fit lowers those residuals by the leverage of ~p/n_matches, < 5 %.)
        base = v_meas + v_ref[:, None]
        night_floor = (_floor(res[keep].ravel() ** 2, base[keep].ravel(), cfg.max_floor_arcsec)
                       if keep.sum() >= cfg.min_floor_matches else 0.0)
        for s in order:
            sel = keep & (scan_of == s)
            floors[s] = (_floor(res[sel].ravel() ** 2, base[sel].ravel(), cfg.max_floor_arcsec)
                         if sel.sum() >= cfg.min_floor_matches else night_floor)
    sol = NightAstrometry(cfg, params, covs, order, axes, floors, night_floor, ref_src, {}, tuple(chi2), status)
    # Figures per scan and band, before and after the correction.
    for s in order:
        i = matches[s][0]
        sel = scan_of == s
        entry = {}
        for tag, rr in (("before", r[sel]), ("after", res[sel])):
            k = keep[sel]
            fig = {}
            for kb, b in enumerate(_BANDS):
                m = k & (srcs[s].weights[i, kb] > 0)
                if m.any():
                    # Offsets are source − reference: the negative of the residual.
                    fig[b] = {"astrometric_rms_arcsec": round(float(np.sqrt(np.mean(rr[m] ** 2))), 4),
                              "n_ref": int(m.sum()),
                              "offset_ra_mas": round(float(-1e3 * rr[m, 0].mean()), 2),
                              "offset_dec_mas": round(float(-1e3 * rr[m, 1].mean()), 2)}
            fig["n_matched"] = int(i.size)
            fig["n_clipped"] = int((~k).sum())
            entry[tag] = fig
        entry["floor_arcsec"] = round(float(floors[s]), 4)
        sol.stats[s] = entry
    return sol
