"""A processed simulated night against its truth: ``gpu2mass validate OUT --truth NIGHT/truth``.

The pipeline never reads truth; this module does, after the fact. It compares the point
sources of the night's scans (``OUT/scans/<scan>/pts.parquet``, the scans of the types in
:attr:`ValidateConfig.scan_types` that ``OUT/run.json`` lists as processed: science scans
only by default, since calibration scans are the zero point's own input) with the
simulator's truth (``truth/sources.parquet``, ``truth/frames.parquet``,
``truth/artifacts.parquet``, ``truth/night.json``) and returns, per band and overall, the
figures below. Positions are compared in the scan's tangent plane (about the median truth
frame centre); truth positions are moved to the scan's mid-time by their proper motions,
and asteroids to the epoch at which the scan passed them (:func:`gpu2mass.epochs.source_epochs`).

Definitions
-----------
usable area
    A truth position is in the usable area of a band when at least
    :attr:`~ValidateConfig.min_frames` of the band's frames of the scan hold it at least
    :attr:`~ValidateConfig.edge_px` pixels inside their edges (the true frame footprints,
    :func:`gpu2mass.geometry.frame_geometry_from_truth`).
match radius
    A scan's and band's: :attr:`~ValidateConfig.match_fwhm_factor` × the median seeing FWHM of
    the band's frames (``frames.parquet`` ``seeing_arcsec``), kept within
    [:attr:`~ValidateConfig.match_min_arcsec`, :attr:`~ValidateConfig.match_max_arcsec`]
    (2.0" at 2.5" seeing: ≥ 4σ of the faintest detections' position errors, well under the
    5" isolation). Stars brighter than the band's R1 saturation magnitude (rd_flg 3: a
    profile fit of the wings, whose centroid can be off by a few arcsec) match within
    :attr:`~ValidateConfig.saturated_match_arcsec`.
detection
    A row whose band ``rd_flg`` is 1, 2, 3, 4 or 9 (a measurement or a nominal detection;
    0 and 6 are upper limits).
completeness
    Fraction of the truth *stars* in the usable area, isolated (no brighter truth source of
    any kind within :attr:`~ValidateConfig.isolation_arcsec`), that have a detection within the
    match radius; per magnitude bin (:attr:`~ValidateConfig.mag_bin`), to the band's 10σ
    limit m10, in the faintest 0.5 mag to m10 (2MASS's Level-1 requirement: 0.99 there),
    and the magnitudes m99 and m90: the faint edge of the last bin, counted from the bright
    end, down to which every bin with at least :attr:`~ValidateConfig.min_bin_stars` stars
    has completeness ≥ 0.99 (0.90).
reliability
    Fraction of the PSC-like sample — detections with ``rd_flg`` 1, 2 or 3, band SNR above
    each threshold of :attr:`~ValidateConfig.reliability_snr` (10 as the 2MASS PSC's
    reliability figure, and 5), no upper-case ``cc_flg`` letter (2MASS's marks of a
    detection that *is* an artifact), ``use_src`` 1 (all rows when the column is absent), in
    the usable area — that lie within the match radius of a truth source of any kind
    (stars, galaxies, asteroids) no fainter in the band than m10 + :attr:`~ValidateConfig.real_faint_margin_mag`
    (a fainter truth source cannot make such a detection; counting it would let random
    coincidences with the faint sky pass as real). Overall: rows with any band in the
    sample, matched with the band's radius.
photometry by regime
    For detected truth stars (completeness sample) the residual Δm = ``[jhk]_m`` − m_true,
    by the band's ``rd_flg``: ``R1`` (1; stars fainter than the R1 saturation by truth),
    ``PSF`` (2; from the R2−R1 saturation magnitude to m10 − 2, where no Eddington bias
    enters), ``PSF faint`` (2; m10 − 2 to m10), ``saturated`` (3; all). Per regime: n, bias =
    median Δm, scatter = 1.4826 × MAD, the median ``msigcom``, and the normalized spread
    1.4826 × MAD of Δm / ``msigcom`` (1 when the combined uncertainties are right).
    Saturation magnitudes and m10 come from the truth's noise budget (``truth/night.json``),
    the 2MASS values of the config otherwise. Before the night's calibration is applied the
    magnitudes are instrumental and the bias shows the instrumental zero-point offset.
astrometry
    Rows matched to completeness-sample stars whose band SNR exceeds
    :attr:`~ValidateConfig.astrometry_snr` with ``rd_flg`` 1 or 2 (profile-fit centroids of
    saturated stars are judged by their photometry only): mean offset and rms (about zero)
    per coordinate, ξ = ΔRA cos Dec and η = ΔDec, in mas; and the normalized spreads
    (1.4826 × MAD) of the residual components along the error ellipse's major and minor
    axes (``err_ang``, east of north) divided by ``err_maj`` and ``err_min``. Overall: every
    row selected in any band, once.
zero-point error
    Fitted − true zero point (mag) at every frame of the validated scans, per band: fitted =
    ``RunConfig.defaults().transients.zero_point[band]`` + the night calibration's offset at
    the frame's MJD and airmass (``OUT/night/calibration.json``, read by
    :class:`gpu2mass.photcal.NightCalibration`), true = ``truth/frames.parquet`` ``zp_mag``;
    n, mean, rms, max |error|. Null (with the reason) when the night has no calibration.
artifact contamination
    Detections (any SNR) with no truth source within the match radius (the ``real`` rule of
    reliability) that lie within :attr:`~ValidateConfig.artifact_radius_arcsec` of a truth
    artifact of the scan and band (``truth/artifacts.parquet``: segments in frame pixels,
    mapped through the true frame geometry; a detection on several is counted once, for
    the nearest), per kind: ``n``, ``unflagged`` (band ``cc_flg`` 0: contamination of the
    catalog), ``flagged_lower`` (a lower-case letter: kept in the PSC, still
    contamination), ``flagged_upper`` (recognised as the artifact and excluded). Spurious
    detections on no artifact are counted under ``none``.

:func:`validate_night` returns a JSON-able dict; :func:`format_validation` prints it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.spatial import cKDTree

from gpu2mass.epochs import source_epochs
from gpu2mass.errors import ConfigError, InputError
from gpu2mass.geometry import FrameGeometry, frame_geometry_from_truth, tan_project

__all__ = ["ValidateConfig", "format_validation", "validate_night"]

BANDS = ("J", "H", "K")
#: rd_flg codes of a detection (0 and 6 are upper limits).
DETECTED = (1, 2, 3, 4, 9)
#: rd_flg codes of a measurement the PSC keeps (facts sheet 10, rule 3).
MEASURED = (1, 2, 3)
#: The photometric regimes, in the order of the table (see the module docstring).
REGIMES = ("R1", "PSF", "PSF faint", "saturated")


def _bands_dict(values) -> dict:
    return dict(zip(BANDS, values, strict=True))


@dataclass(frozen=True)
class ValidateConfig:
    """How a processed night is compared with its truth (see the module docstring).

    Not a pipeline step (the pipeline never reads truth), so not part of ``RunConfig``.

    Attributes
    ----------
    scan_types
        Scan types of ``run.json`` to validate (``("sci",)``; add ``"cal"`` to include the
        calibration scans, whose magnitudes fit the zero point and so are not independent).
    match_fwhm_factor, match_min_arcsec, match_max_arcsec
        Match radius = factor × the band's median seeing FWHM, clipped to [min, max]
        (0.8, 1.5", 3.0": 2.0" at 2.5" seeing, the radius of the point-source measurements
        so far, ``profiling/measure_point_sources.py``).
    saturated_match_arcsec
        Match radius for stars brighter than the R1 saturation magnitude (5.0": rd_flg 3
        centroids are off by up to ~3.5", ``tests/test_artifacts.py``).
    isolation_arcsec
        A completeness star has no brighter truth source within this (5.0": two seeing
        FWHM; closer pairs blend and are not a completeness failure of the detector).
    edge_px, min_frames
        Usable area: held ≥ ``edge_px`` inside the edges of ≥ ``min_frames`` of the band's
        frames (10 px, 3 frames: 20", the PSC's 10" edge rule plus the frame's own
        corners; three frames for a measurement of the 6 the source should have).
    mag_bin, mag_range
        Completeness bins (0.25 mag from 3.0 to 18.0).
    min_bin_stars
        Bins with fewer truth stars do not decide m99/m90 (5).
    completeness_levels
        The completeness magnitudes reported (0.99, 0.90: 2MASS's requirement and the
        conventional 90 % limit).
    reliability_snr
        Band SNR thresholds of the reliability samples (10, 5: the PSC's SNR > 10 figure
        and its faint limit).
    real_faint_margin_mag
        A detection is real when a truth source no fainter than m10 + this (2.0 mag,
        SNR ≈ 1.6) lies within the match radius.
    astrometry_snr
        Astrometry uses matched stars above this band SNR (20).
    artifact_radius_arcsec
        A detection sits on an artifact within this of its segment (3.0": about the
        width of a spike plus the position error of a faint detection).
    m10, r2r1_saturation_mag, r1_saturation_mag
        Used when ``truth/night.json`` has no noise budget: 2MASS's 10σ limits (J 15.8,
        H 15.1, Ks 14.3) and saturation magnitudes (R2−R1 J 9.0, H 8.5, Ks 8.0; R1 J 4.5,
        H 4.0, Ks 3.5), facts sheet 3.1 and 15.1.
    """

    scan_types: tuple[str, ...] = ("sci",)
    match_fwhm_factor: float = 0.8
    match_min_arcsec: float = 1.5
    match_max_arcsec: float = 3.0
    saturated_match_arcsec: float = 5.0
    isolation_arcsec: float = 5.0
    edge_px: float = 10.0
    min_frames: int = 3
    mag_bin: float = 0.25
    mag_range: tuple[float, float] = (3.0, 18.0)
    min_bin_stars: int = 5
    completeness_levels: tuple[float, ...] = (0.99, 0.90)
    reliability_snr: tuple[float, ...] = (10.0, 5.0)
    real_faint_margin_mag: float = 2.0
    astrometry_snr: float = 20.0
    artifact_radius_arcsec: float = 3.0
    m10: dict = field(default_factory=lambda: _bands_dict((15.8, 15.1, 14.3)))
    r2r1_saturation_mag: dict = field(default_factory=lambda: _bands_dict((9.0, 8.5, 8.0)))
    r1_saturation_mag: dict = field(default_factory=lambda: _bands_dict((4.5, 4.0, 3.5)))

    def __post_init__(self):
        if not self.scan_types or not set(self.scan_types) <= {"sci", "cal"}:
            raise ConfigError(f"validate.scan_types must be a non-empty subset of ('sci', 'cal'), got {self.scan_types}")
        for name in ("match_fwhm_factor", "match_min_arcsec", "saturated_match_arcsec", "isolation_arcsec",
                     "mag_bin", "astrometry_snr", "artifact_radius_arcsec"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"validate.{name} must be > 0, got {getattr(self, name)}")
        if not self.match_max_arcsec >= self.match_min_arcsec:
            raise ConfigError("validate.match_max_arcsec must be >= match_min_arcsec")
        if self.edge_px < 0 or self.min_frames < 1 or self.min_bin_stars < 1:
            raise ConfigError("validate.edge_px must be >= 0, min_frames and min_bin_stars >= 1")
        if not self.mag_range[1] > self.mag_range[0]:
            raise ConfigError(f"validate.mag_range must be increasing, got {self.mag_range}")
        if not all(0 < lv <= 1 for lv in self.completeness_levels):
            raise ConfigError("validate.completeness_levels must lie in (0, 1]")
        for name in ("m10", "r2r1_saturation_mag", "r1_saturation_mag"):
            if not isinstance(getattr(self, name), Mapping) or set(getattr(self, name)) != set(BANDS):
                raise ConfigError(f"validate.{name} needs exactly the bands {BANDS}")


# ----------------------------------------------------------------------------------------
# Reading


def _read_parquet(path: Path, what: str, columns=None) -> dict[str, np.ndarray]:
    """Columns of a Parquet file (``columns``: those present of these names; all when
    ``None``) as NumPy arrays: float and nullable integer nulls → NaN, string nulls → ''."""
    if not path.is_file():
        raise InputError(path, f"{what} is missing")
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=None if columns is None else [c for c in columns if c in names])
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(path, f"{what} is not a readable Parquet file ({exc})") from exc
    out = {}
    for name in table.column_names:
        col = table.column(name)
        kind = str(col.type)
        if kind in ("string", "large_string"):
            out[name] = np.asarray(col.fill_null("").to_numpy(zero_copy_only=False)).astype(str)
        elif kind.startswith(("double", "float", "halffloat")) or (kind.startswith(("int", "uint")) and col.null_count):
            out[name] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=float)
        else:
            out[name] = np.asarray(col.to_numpy(zero_copy_only=False))
    return out


def _require(cols: Mapping, names, path: Path, what: str):
    missing = [n for n in names if n not in cols]
    if missing:
        raise InputError(path, f"{what} lacks the columns {', '.join(missing)}")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(path, f"{what} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"{what} is not valid JSON ({exc})") from exc


@dataclass(frozen=True)
class _Truth:
    night_dir: Path
    sources: dict
    frames: dict
    artifacts: dict
    m10: dict
    r2r1_sat: dict
    r1_sat: dict


def _read_truth(truth_dir: Path, cfg: ValidateConfig) -> _Truth:
    if not truth_dir.is_dir():
        raise InputError(truth_dir, "the truth directory does not exist")
    night_dir = truth_dir.parent
    # The true frame geometry needs the array size from the night's manifest, so the truth
    # directory must be the simulated night's own truth/ folder.
    if truth_dir.name != "truth" or not (night_dir / "night.json").is_file():
        raise InputError(truth_dir, "expected the truth/ folder of a simulated night (NIGHT/truth, "
                                    "next to NIGHT/night.json)")
    meta = _read_json(truth_dir / "night.json", "the truth's night description")
    src = _read_parquet(truth_dir / "sources.parquet", "truth sources")
    _require(src, ("kind", "ra", "dec", "epoch_mjd", "pmra", "pmdec", "j_m", "h_m", "k_m", "ra_rate",
                   "dec_rate"), truth_dir / "sources.parquet", "truth sources")
    frames = _read_parquet(truth_dir / "frames.parquet", "truth frames")
    _require(frames, ("scan", "band", "frame", "mjd", "ra", "dec", "zp_mag", "airmass"),
             truth_dir / "frames.parquet", "truth frames")
    art_path = truth_dir / "artifacts.parquet"
    art = (_read_parquet(art_path, "truth artifacts") if art_path.is_file()
           else {k: np.zeros(0) for k in ("scan", "band", "frame", "kind", "x0", "y0", "x1", "y1")})
    m10, r2, r1 = dict(cfg.m10), dict(cfg.r2r1_saturation_mag), dict(cfg.r1_saturation_mag)
    for row in meta.get("noise_budget", ()):
        b = row.get("band")
        if b in BANDS:
            m10[b] = float(row.get("m10", m10[b]))
            r2[b] = float(row.get("r2r1_saturation_mag", r2[b]))
            r1[b] = float(row.get("r1_saturation_mag", r1[b]))
    return _Truth(night_dir, src, frames, art, m10, r2, r1)


def _read_calibration(out_dir: Path):
    """The night's calibration (``NightCalibration``) or ``None`` when there is none."""
    path = out_dir / "night" / "calibration.json"
    if not path.is_file():
        return None
    from gpu2mass.photcal import NightCalibration

    try:
        return NightCalibration.from_dict(_read_json(path, "the night's calibration"))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"the night's calibration does not have the photcal structure ({exc})") from exc


# ----------------------------------------------------------------------------------------
# Small robust statistics


def _robust(x) -> tuple[float | None, float | None]:
    """(median, 1.4826 MAD) of the finite values; ``None`` for none."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None, None
    med = float(np.median(x))
    return med, float(1.4826 * np.median(np.abs(x - med)))


def _completeness_mag(mags, found, level: float, cfg: ValidateConfig) -> float | None:
    """Faint edge of the last bin, from the bright end, down to which every populated bin's
    completeness is ≥ ``level`` (``None`` when the brightest populated bin already fails)."""
    edges = np.arange(cfg.mag_range[0], cfg.mag_range[1] + 0.5 * cfg.mag_bin, cfg.mag_bin)
    last = None
    for lo, hi in itertools.pairwise(edges):
        sel = (mags >= lo) & (mags < hi)
        if sel.sum() < cfg.min_bin_stars:
            continue
        if found[sel].mean() < level:
            return last
        last = round(float(hi), 4)
    return last


def _segment_distance(px, py, x0, y0, x1, y1) -> np.ndarray:
    """Distance of points (n,) to segments (m,): array (n, m), same units."""
    px, py = np.asarray(px, float)[:, None], np.asarray(py, float)[:, None]
    dx, dy = (x1 - x0)[None, :], (y1 - y0)[None, :]
    len2 = dx * dx + dy * dy
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(len2 > 0, ((px - x0) * dx + (py - y0) * dy) / len2, 0.0)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(px - (x0 + t * dx), py - (y0 + t * dy))


# ----------------------------------------------------------------------------------------
# One scan


def _truth_positions(src: Mapping, frames: Mapping, mjd_mid: float) -> tuple[np.ndarray, np.ndarray]:
    """Truth (ra, dec) deg at the scan: proper motions to its mid-time, asteroids to the
    epoch at which the scan passed them (their rate is arcsec/h, RA rate with cos Dec)."""
    dt_yr = (mjd_mid - src["epoch_mjd"]) / 365.25
    dec = src["dec"] + np.nan_to_num(src["pmdec"]) * dt_yr / 3.6e6
    ra = src["ra"] + np.nan_to_num(src["pmra"]) * dt_yr / 3.6e6 / np.cos(np.deg2rad(dec))
    moving = np.flatnonzero(np.isfinite(src["ra_rate"]) & np.isfinite(src["dec_rate"]))
    if moving.size:
        t = np.full(moving.size, mjd_mid)
        for _ in range(2):  # the epoch depends on the position it fixes: iterate once more
            dt_h = (t - src["epoch_mjd"][moving]) * 24.0
            d = src["dec"][moving] + src["dec_rate"][moving] * dt_h / 3600.0
            r = src["ra"][moving] + src["ra_rate"][moving] * dt_h / 3600.0 / np.cos(np.deg2rad(d))
            t, _x = source_epochs(r, d, frames, str(np.asarray(frames["band"])[0]))
        ra, dec = ra.copy(), dec.copy()
        ra[moving], dec[moving] = r, d
    return ra, dec


def _usable(geo: FrameGeometry, ra, dec, xy, frame_xy, cfg: ValidateConfig) -> np.ndarray:
    """Boolean (n,): held by ≥ min_frames frames at ≥ edge_px inside their edges.

    ``xy`` (n, 2) and ``frame_xy`` (nframes, 2) are the positions and the frame centres in
    the scan's tangent plane (arcsec). The same test as :meth:`FrameGeometry.frames_holding`
    (which projects every source about every frame: ~25 s on four 273-frame scans), made
    cheap: a k-d tree pairs each frame with the sources near it, the undistorted linear
    mapping places them, and only pairs within the distortion's reach of an edge limit go
    through the exact (iterative) mapping.
    """
    n = np.size(ra)
    if n == 0:
        return np.zeros(0, bool)
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    b = geo.band
    th = np.deg2rad(b.rotation_deg)
    # Half-width of the frame's footprint along the tangent-plane axes (a square box), with
    # room for the distortion and the difference between the scan's and the frame's planes.
    half = 0.5 * max(b.nx, b.ny) * b.scale_arcsec * (abs(np.cos(th)) + abs(np.sin(th))) * 1.02 + 10.0
    near = cKDTree(xy).query_ball_point(frame_xy, r=half, p=np.inf)
    frm = np.repeat(np.arange(len(near)), [len(v) for v in near])
    src = np.fromiter((i for v in near for i in v), dtype=np.int64, count=frm.size)
    if src.size == 0:
        return np.zeros(n, bool)
    xi, eta = tan_project(ra[src], dec[src], geo.ra[frm], geo.dec[frm])
    # Linear inverse of BandGeometry.pixel_to_tangent (no distortion).
    x = (-xi * np.cos(th) + eta * np.sin(th)) / b.scale_arcsec + (b.nx - 1) / 2
    y = (xi * np.sin(th) + eta * np.cos(th)) / b.scale_arcsec + (b.ny - 1) / 2
    lo, hx, hy = -0.5 + cfg.edge_px, b.nx - 0.5 - cfg.edge_px, b.ny - 0.5 - cfg.edge_px
    # Inside the array |s|, |t| <= 1, so every distortion term is at most its coefficient.
    reach = 1.0 + float(np.abs(np.asarray(b.distortion, float)).sum(axis=1).max())
    unsure = ((np.abs(x - lo) < reach) | (np.abs(x - hx) < reach) | (np.abs(y - lo) < reach)
              | (np.abs(y - hy) < reach))
    if unsure.any():
        x[unsure], y[unsure] = geo.sky_to_pixel(frm[unsure], ra[src[unsure]], dec[src[unsure]])
    inside = (x >= lo) & (x <= hx) & (y >= lo) & (y <= hy)
    return np.bincount(src[inside], minlength=n) >= cfg.min_frames


def _band_char(col: np.ndarray, k: int) -> np.ndarray:
    """The k-th character of each string of a per-band flag column ('' → '0')."""
    return np.array([s[k] if len(s) > k else "0" for s in col.astype(str)], dtype="<U1")


#: The point-source columns validation reads.
_PTS_COLUMNS = ("ra", "dec", "err_maj", "err_min", "err_ang", "rd_flg", "cc_flg", "use_src") + tuple(
    f"{b.lower()}_{c}" for b in BANDS for c in ("m", "msigcom", "snr"))


def _validate_scan(scan: int, out_dir: Path, truth: _Truth, cfg: ValidateConfig, acc: dict) -> None:
    sdir = out_dir / "scans" / f"{scan:03d}"
    pts = _read_parquet(sdir / "pts.parquet", f"scan {scan}'s point sources", _PTS_COLUMNS)
    _require(pts, tuple(c for c in _PTS_COLUMNS if c != "use_src"), sdir / "pts.parquet",
             f"scan {scan}'s point sources")
    frames = _read_parquet(sdir / "frames.parquet", f"scan {scan}'s frames table")
    _require(frames, ("band", "mjd", "ra", "dec", "airmass", "seeing_arcsec"), sdir / "frames.parquet",
             f"scan {scan}'s frames table")
    tf = truth.frames
    fsel = tf["scan"] == scan
    if not fsel.any():
        raise InputError(truth.night_dir / "truth" / "frames.parquet", f"the truth has no frames of scan {scan}")
    src = truth.sources
    ra0, dec0 = float(np.median(tf["ra"][fsel])), float(np.median(tf["dec"][fsel]))
    ra_t, dec_t = _truth_positions(src, frames, float(np.median(frames["mjd"])))
    tx, ty = tan_project(ra_t, dec_t, ra0, dec0)
    # Truth sources near the scan: within the frame centres' box plus a frame's half-diagonal.
    fx, fy = tan_project(tf["ra"][fsel], tf["dec"][fsel], ra0, dec0)
    pad = 400.0
    near = np.flatnonzero((tx > fx.min() - pad) & (tx < fx.max() + pad) & (ty > fy.min() - pad)
                          & (ty < fy.max() + pad))
    nx_, ny_ = tx[near], ty[near]
    n_rows = pts["ra"].size
    px, py = tan_project(pts["ra"], pts["dec"], ra0, dec0)
    use = (np.nan_to_num(pts["use_src"], nan=0.0).astype(int) == 1) if "use_src" in pts else np.ones(n_rows, bool)
    rd_all = {b: _band_char(pts["rd_flg"], k).astype(int) for k, b in enumerate(BANDS)}
    cc_all = {b: _band_char(pts["cc_flg"], k) for k, b in enumerate(BANDS)}
    kind = src["kind"][near]
    is_asteroid = kind == "asteroid"
    sc = acc["scan_rows"].setdefault(scan, {"rows": n_rows, "astrometry": {}, "reliability": {}})
    art = truth.artifacts
    ttree = cKDTree(np.column_stack([nx_, ny_]))
    for b in BANDS:
        p = b.lower()
        geo = frame_geometry_from_truth(truth.night_dir, scan, b)
        frame_xy = np.column_stack(tan_project(geo.ra, geo.dec, ra0, dec0))
        bsel = frames["band"].astype(str) == b
        seeing = float(np.nanmedian(frames["seeing_arcsec"][bsel])) if bsel.any() else np.nan
        radius = float(np.clip(cfg.match_fwhm_factor * seeing, cfg.match_min_arcsec, cfg.match_max_arcsec)) \
            if np.isfinite(seeing) else cfg.match_max_arcsec
        acc["bands"][b]["match_radius"].append(radius)
        m_true = src[f"{p}_m"][near]
        m_fill = np.nan_to_num(m_true, nan=99.0)
        rd, cc = rd_all[b], cc_all[b]
        det = np.isin(rd, DETECTED)
        m, msig, snr = pts[f"{p}_m"], pts[f"{p}_msigcom"], np.nan_to_num(pts[f"{p}_snr"], nan=0.0)

        # Completeness sample: isolated truth stars in the usable area.
        cand = np.flatnonzero((kind == "star") & (m_true < cfg.mag_range[1]))
        dd, jj = ttree.query(np.column_stack([nx_[cand], ny_[cand]]), k=12,
                             distance_upper_bound=cfg.isolation_arcsec)
        nb = np.where(np.isfinite(dd), m_fill[np.minimum(jj, near.size - 1)], 99.0)
        nb[jj == cand[:, None]] = 99.0  # the star itself
        iso = ~np.any(nb < m_fill[cand][:, None], axis=1)
        cand = cand[iso]
        cand = cand[_usable(geo, ra_t[near][cand], dec_t[near][cand], np.column_stack([nx_[cand], ny_[cand]]),
                            frame_xy, cfg)]
        r_star = np.where(m_true[cand] < truth.r1_sat[b], cfg.saturated_match_arcsec, radius)
        found = np.zeros(cand.size, bool)
        j_row = np.full(cand.size, -1)
        det_idx = np.flatnonzero(det)
        if det_idx.size and cand.size:
            d, j = cKDTree(np.column_stack([px[det_idx], py[det_idx]])).query(
                np.column_stack([nx_[cand], ny_[cand]]), distance_upper_bound=max(radius, cfg.saturated_match_arcsec))
            found = np.isfinite(d) & (d <= r_star)
            j_row[found] = det_idx[j[found]]
        a = acc["bands"][b]
        a["m_true"].append(m_true[cand])
        a["found"].append(found)
        rows = j_row[found]
        a["dm"].append(m[rows] - m_true[cand][found])
        a["msig"].append(msig[rows])
        a["rd"].append(rd[rows])
        a["m_true_found"].append(m_true[cand][found])

        # Astrometry: matched stars with SNR above the threshold, rd_flg 1 or 2.
        ast = (snr[rows] > cfg.astrometry_snr) & np.isin(rd[rows], (1, 2))
        ar = rows[ast]
        ai = cand[found][ast]
        a["ast_dxi"].append((px[ar] - nx_[ai]) * 1000.0)
        a["ast_deta"].append((py[ar] - ny_[ai]) * 1000.0)
        a["ast_err"].append(np.column_stack([pts["err_maj"][ar], pts["err_min"][ar], pts["err_ang"][ar]]))
        for r_, i_ in zip(ar, ai, strict=True):
            sc["astrometry"].setdefault(int(r_), ((px[r_] - nx_[i_]) * 1000.0, (py[r_] - ny_[i_]) * 1000.0,
                                                  pts["err_maj"][r_], pts["err_min"][r_], pts["err_ang"][r_]))

        # Reliability and spurious detections: is there a truth source that can make it?
        real_src = np.flatnonzero((m_fill <= truth.m10[b] + cfg.real_faint_margin_mag) | is_asteroid)
        real = np.zeros(n_rows, bool)
        if real_src.size and det_idx.size:
            d2, j2 = cKDTree(np.column_stack([nx_[real_src], ny_[real_src]])).query(
                np.column_stack([px[det_idx], py[det_idx]]), distance_upper_bound=max(radius, cfg.saturated_match_arcsec))
            ok = np.isfinite(d2)
            lim = np.full(det_idx.size, radius)
            lim[ok] = np.where(m_fill[real_src[j2[ok]]] < truth.r1_sat[b], cfg.saturated_match_arcsec, radius)
            real[det_idx] = ok & (d2 <= lim)
        in_area = np.zeros(n_rows, bool)
        in_area[det_idx] = _usable(geo, pts["ra"][det_idx], pts["dec"][det_idx],
                                   np.column_stack([px[det_idx], py[det_idx]]), frame_xy, cfg)
        for thr in cfg.reliability_snr:
            key = f"snr>{thr:g}"
            sample = np.isin(rd, MEASURED) & (snr > thr) & ~np.char.isupper(cc) & use & in_area
            rb = a["reliability"].setdefault(key, [0, 0])
            rb[0] += int(sample.sum())
            rb[1] += int((sample & real).sum())
            srel = sc["reliability"].setdefault(key, {"sample": np.zeros(n_rows, bool), "real": np.zeros(n_rows, bool)})
            srel["sample"] |= sample
            srel["real"] |= sample & real

        # Artifact contamination: spurious detections on truth artifacts.
        spur = np.flatnonzero(det & ~real)
        if spur.size:
            asel = np.flatnonzero((art["scan"] == scan) & (art["band"].astype(str) == b))
            kinds = np.full(spur.size, "none", dtype=object)
            if asel.size:
                f = art["frame"][asel].astype(int)
                valid = (f >= 0) & (f < geo.nframes)
                asel, f = asel[valid], f[valid]
                r0, d0 = geo.pixel_to_sky(f, art["x0"][asel], art["y0"][asel])
                r1, d1 = geo.pixel_to_sky(f, art["x1"][asel], art["y1"][asel])
                x0, y0 = tan_project(r0, d0, ra0, dec0)
                x1, y1 = tan_project(r1, d1, ra0, dec0)
                dist = _segment_distance(px[spur], py[spur], x0, y0, x1, y1)
                k_near = np.argmin(dist, axis=1)
                on = dist[np.arange(spur.size), k_near] <= cfg.artifact_radius_arcsec
                kinds[on] = art["kind"][asel][k_near[on]].astype(str)
            letters = cc[spur]
            for kd, letter in zip(kinds, letters, strict=True):
                row = a["contamination"].setdefault(str(kd), {"n": 0, "unflagged": 0, "flagged_lower": 0,
                                                              "flagged_upper": 0})
                row["n"] += 1
                if letter == "0":
                    row["unflagged"] += 1
                elif letter.isupper():
                    row["flagged_upper"] += 1
                else:
                    row["flagged_lower"] += 1


# ----------------------------------------------------------------------------------------
# Figures


def _astrometry(dxi, deta, err) -> dict:
    n = int(dxi.size)
    if n == 0:
        return {"n": 0, "offset_ra_mas": None, "offset_dec_mas": None, "rms_ra_mas": None, "rms_dec_mas": None,
                "norm_spread_major": None, "norm_spread_minor": None}
    out = {"n": n, "offset_ra_mas": float(np.mean(dxi)), "offset_dec_mas": float(np.mean(deta)),
           "rms_ra_mas": float(np.sqrt(np.mean(dxi**2))), "rms_dec_mas": float(np.sqrt(np.mean(deta**2)))}
    if err is not None and len(err):
        maj, mnr, ang = (np.asarray(err[:, i], float) for i in range(3))
        th = np.deg2rad(ang)
        # err_ang: position angle of the major axis, east of north (ξ east, η north).
        along = (dxi * np.sin(th) + deta * np.cos(th)) / 1000.0
        across = (dxi * np.cos(th) - deta * np.sin(th)) / 1000.0
        with np.errstate(divide="ignore", invalid="ignore"):
            out["norm_spread_major"] = _robust(along / maj)[1]
            out["norm_spread_minor"] = _robust(across / mnr)[1]
    else:
        out["norm_spread_major"] = out["norm_spread_minor"] = None
    return out


def _zero_point(calibration, truth: _Truth, scans: list[int]) -> dict:
    if calibration is None:
        return {"status": "absent", "reason": "no night/calibration.json (magnitudes are instrumental)",
                "bands": {b: {"n": 0, "mean": None, "rms": None, "max_abs": None} for b in BANDS}}
    tf = truth.frames
    out = {"status": str(getattr(calibration, "status", "calibrated")), "reason": None, "bands": {}}
    allerr = []
    for b in BANDS:
        sel = np.isin(tf["scan"], scans) & (tf["band"].astype(str) == b)
        if not sel.any():
            out["bands"][b] = {"n": 0, "mean": None, "rms": None, "max_abs": None}
            continue
        mjd, airmass = tf["mjd"][sel], tf["airmass"][sel]
        # The calibration's own instrumental zero point when it records one (the one applied).
        if hasattr(calibration, "zero_point"):
            fitted = np.asarray(calibration.zero_point(b, mjd, airmass), float)
        else:
            from gpu2mass.config import RunConfig

            zp_inst = RunConfig.defaults().transients.zero_point[b]
            fitted = zp_inst + np.asarray(calibration.offset(b, mjd, airmass), float)
        err = fitted - tf["zp_mag"][sel]
        allerr.append(err)
        out["bands"][b] = {"n": int(err.size), "mean": float(np.mean(err)), "rms": float(np.sqrt(np.mean(err**2))),
                           "max_abs": float(np.max(np.abs(err)))}
    if allerr:
        e = np.concatenate(allerr)
        out["overall"] = {"n": int(e.size), "rms": float(np.sqrt(np.mean(e**2)))}
    return out


def _new_acc() -> dict:
    def band():
        return {"m_true": [], "found": [], "dm": [], "msig": [], "rd": [], "m_true_found": [],
                "ast_dxi": [], "ast_deta": [], "ast_err": [], "reliability": {},
                "contamination": {}, "match_radius": []}
    return {"bands": {b: band() for b in BANDS}, "scan_rows": {}}


def _cat(parts, dtype=float):
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _band_figures(b: str, a: dict, truth: _Truth, cfg: ValidateConfig) -> dict:
    m_true, found = _cat(a["m_true"]), _cat(a["found"], bool)
    dm, msig, rd, mt = _cat(a["dm"]), _cat(a["msig"]), _cat(a["rd"], int), _cat(a["m_true_found"])
    m10 = truth.m10[b]
    edges = np.arange(cfg.mag_range[0], cfg.mag_range[1] + 0.5 * cfg.mag_bin, cfg.mag_bin)
    curve = []
    for lo, hi in itertools.pairwise(edges):
        sel = (m_true >= lo) & (m_true < hi)
        if sel.any():
            curve.append({"lo": round(float(lo), 4), "hi": round(float(hi), 4), "n": int(sel.sum()),
                          "completeness": float(found[sel].mean())})
    to_lim = m_true <= m10
    last = (m_true > m10 - 0.5) & to_lim
    comp = {"n_stars": int(m_true.size), "m10": m10, "n_to_m10": int(to_lim.sum()),
            "to_m10": float(found[to_lim].mean()) if to_lim.any() else None,
            "n_faintest_half_mag": int(last.sum()),
            "faintest_half_mag": float(found[last].mean()) if last.any() else None,
            "levels": {f"m{round(lv * 100):d}": _completeness_mag(m_true, found, lv, cfg)
                       for lv in cfg.completeness_levels},
            "curve": curve}
    regimes = {}
    sel_by = {
        "R1": (rd == 1) & (mt >= truth.r1_sat[b]),
        "PSF": (rd == 2) & (mt >= truth.r2r1_sat[b]) & (mt <= m10 - 2.0),
        "PSF faint": (rd == 2) & (mt > m10 - 2.0) & (mt <= m10),
        "saturated": rd == 3,
    }
    for name in REGIMES:
        sel = sel_by[name] & np.isfinite(dm)
        bias, scatter = _robust(dm[sel])
        with np.errstate(divide="ignore", invalid="ignore"):
            _nm, nspread = _robust(dm[sel] / msig[sel])
        regimes[name] = {"rd_flg": {"R1": 1, "PSF": 2, "PSF faint": 2, "saturated": 3}[name], "n": int(sel.sum()),
                         "bias": bias, "scatter": scatter,
                         "median_msigcom": float(np.nanmedian(msig[sel])) if np.isfinite(msig[sel]).any() else None,
                         "norm_spread": nspread}
    err = np.concatenate(a["ast_err"]) if a["ast_err"] else np.zeros((0, 3))
    reliability = {k: {"n": v[0], "n_real": v[1], "reliability": (v[1] / v[0]) if v[0] else None}
                   for k, v in a["reliability"].items()}
    return {"match_radius_arcsec": float(np.median(a["match_radius"])) if a["match_radius"] else None,
            "completeness": comp, "reliability": reliability, "photometry": regimes,
            "astrometry": _astrometry(_cat(a["ast_dxi"]), _cat(a["ast_deta"]), err),
            "contamination": dict(sorted(a["contamination"].items()))}


def validate_night(out_dir, truth_dir, *, config: ValidateConfig | None = None) -> dict:
    """Compare a processed simulated night with its truth (definitions: module docstring).

    Parameters
    ----------
    out_dir
        The output of ``gpu2mass night`` (``run.json``, ``scans/<scan>/pts.parquet`` and
        ``frames.parquet``, optionally ``night/calibration.json``).
    truth_dir
        The simulated night's ``truth/`` folder (next to its ``night.json``).
    config
        :class:`ValidateConfig` (defaults when ``None``).

    Returns
    -------
    dict
        JSON-able: ``out``, ``truth``, ``scans`` (validated scan numbers), ``magnitudes``
        (``calibrated`` or ``instrumental``), ``bands`` (per band: ``match_radius_arcsec``,
        ``completeness``, ``reliability``, ``photometry``, ``astrometry``,
        ``contamination``), ``zero_point`` and ``overall`` (row-level reliability and
        astrometry, contamination totals).

    Raises
    ------
    InputError
        A missing or unreadable ``out_dir``/``truth_dir`` product, or no scan to validate.
    """
    cfg = config or ValidateConfig()
    out_dir, truth_dir = Path(out_dir), Path(truth_dir)
    if not out_dir.is_dir():
        raise InputError(out_dir, "the night's output directory does not exist")
    run = _read_json(out_dir / "run.json", "the night's run.json")
    truth = _read_truth(truth_dir, cfg)
    scans = sorted(int(s["scan"]) for s in run.get("scans", ())
                   if s.get("type") in cfg.scan_types and s.get("status") == "ok"
                   and (out_dir / "scans" / f"{int(s['scan']):03d}" / "pts.parquet").is_file())
    if not scans:
        raise InputError(out_dir / "run.json", f"no processed scan of type {'/'.join(cfg.scan_types)} "
                                               "with a pts.parquet to validate")
    calibration = _read_calibration(out_dir)
    acc = _new_acc()
    for scan in scans:
        _validate_scan(scan, out_dir, truth, cfg, acc)
    bands = {b: _band_figures(b, acc["bands"][b], truth, cfg) for b in BANDS}
    # Overall, row by row: astrometry of every row selected in any band, reliability of rows
    # in any band's sample.
    ast = np.array([v for sc in acc["scan_rows"].values() for v in sc["astrometry"].values()], float).reshape(-1, 5)
    rel = {}
    for sc in acc["scan_rows"].values():
        for key, r in sc["reliability"].items():
            t = rel.setdefault(key, [0, 0])
            t[0] += int(r["sample"].sum())
            t[1] += int(r["real"].sum())
    contamination = {}
    for b in BANDS:
        for kd, row in bands[b]["contamination"].items():
            tot = contamination.setdefault(kd, dict.fromkeys(row, 0))
            for k, v in row.items():
                tot[k] += v
    overall = {
        "rows": int(sum(sc["rows"] for sc in acc["scan_rows"].values())),
        "reliability": {k: {"n": v[0], "n_real": v[1], "reliability": (v[1] / v[0]) if v[0] else None}
                        for k, v in rel.items()},
        "astrometry": _astrometry(ast[:, 0], ast[:, 1], ast[:, 2:]),
        "contamination": dict(sorted(contamination.items())),
    }
    return {"out": str(out_dir), "truth": str(truth_dir), "scan_types": list(cfg.scan_types), "scans": scans,
            "magnitudes": "instrumental" if calibration is None or getattr(calibration, "status", "") == "instrumental"
            else "calibrated",
            "bands": bands, "zero_point": _zero_point(calibration, truth, scans), "overall": overall}


# ----------------------------------------------------------------------------------------
# The printed table


def _f(v, fmt: str, none: str = "—") -> str:
    return none if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def format_validation(result: Mapping) -> str:
    """The validation as a compact text table: one block per figure kind, one column per band
    (and an ``all`` column where a row-level figure exists)."""
    bands = result["bands"]
    w = 13
    scans = ", ".join(str(s) for s in result["scans"])
    lines = [f"validation of {result['out']} against {result['truth']}",
             f"scans {scans} ({'/'.join(result['scan_types'])}); magnitudes {result['magnitudes']}"]

    def header(title, all_col=False):
        lines.append("")
        lines.append(f"{title:<34}" + "".join(f"{b:>{w}}" for b in BANDS) + (f"{'all':>{w}}" if all_col else ""))

    def row(label, cells, all_cell=None):
        lines.append(f"  {label:<32}" + "".join(f"{c:>{w}}" for c in cells)
                     + (f"{all_cell:>{w}}" if all_cell is not None else ""))

    header("completeness (isolated stars)")
    row("match radius (\")", [_f(bands[b]["match_radius_arcsec"], ".2f") for b in BANDS])
    row("m10 (truth's 10σ limit, mag)", [_f(bands[b]["completeness"]["m10"], ".2f") for b in BANDS])
    row("stars to m10", [str(bands[b]["completeness"]["n_to_m10"]) for b in BANDS])
    row("to m10", [_f(bands[b]["completeness"]["to_m10"], ".4f") for b in BANDS])
    row("faintest 0.5 mag to m10", [_f(bands[b]["completeness"]["faintest_half_mag"], ".4f") for b in BANDS])
    for key in bands[BANDS[0]]["completeness"]["levels"]:
        row(f"{key} (mag)", [_f(bands[b]["completeness"]["levels"][key], ".2f") for b in BANDS])
    # Completeness vs magnitude, in whole-magnitude bins for the table (the result has the
    # fine bins).
    lo = min((c["lo"] for b in BANDS for c in bands[b]["completeness"]["curve"]), default=None)
    hi = max((c["hi"] for b in BANDS for c in bands[b]["completeness"]["curve"]), default=None)
    if lo is not None:
        for m0 in np.arange(np.floor(lo), np.ceil(hi)):
            cells = []
            for b in BANDS:
                cs = [c for c in bands[b]["completeness"]["curve"] if m0 <= c["lo"] < m0 + 1]
                n = sum(c["n"] for c in cs)
                cells.append(f"{sum(c['n'] * c['completeness'] for c in cs) / n:.3f}/{n}" if n else "")
            if any(cells):
                row(f"{m0:4.0f}–{m0 + 1:.0f} mag (frac/n)", cells)

    header("reliability", all_col=True)
    for key in result["overall"]["reliability"]:
        cells = [bands[b]["reliability"].get(key, {}) for b in BANDS]
        tot = result["overall"]["reliability"][key]
        row(f"{key}", [_f(c.get("reliability"), ".4f") for c in cells], _f(tot["reliability"], ".4f"))
        row(f"{key} n (not real)", [f"{c.get('n', 0)} ({c.get('n', 0) - c.get('n_real', 0)})" for c in cells],
            f"{tot['n']} ({tot['n'] - tot['n_real']})")

    header("photometry  Δm = m − m_true (mag)")
    for name in REGIMES:
        regs = [bands[b]["photometry"][name] for b in BANDS]
        tag = f"{name} (rd {regs[0]['rd_flg']})"
        row(f"{tag} n", [str(r["n"]) for r in regs])
        row("  bias (median)", [_f(r["bias"], "+.4f") for r in regs])
        row("  scatter (1.4826 MAD)", [_f(r["scatter"], ".4f") for r in regs])
        row("  median msigcom", [_f(r["median_msigcom"], ".4f") for r in regs])
        row("  spread of Δm/msigcom", [_f(r["norm_spread"], ".2f") for r in regs])

    header("astrometry (band SNR > 20; mas)", all_col=True)
    ast = [bands[b]["astrometry"] for b in BANDS]
    tot = result["overall"]["astrometry"]
    row("n", [str(a["n"]) for a in ast], str(tot["n"]))
    for key, label in (("offset_ra_mas", "offset ξ (RA cos Dec)"), ("offset_dec_mas", "offset η (Dec)"),
                       ("rms_ra_mas", "rms ξ"), ("rms_dec_mas", "rms η")):
        row(label, [_f(a[key], "+.1f" if key.startswith("offset") else ".1f") for a in ast], _f(tot[key], "+.1f"
            if key.startswith("offset") else ".1f"))
    row("spread of Δ/err_maj", [_f(a["norm_spread_major"], ".2f") for a in ast], _f(tot["norm_spread_major"], ".2f"))
    row("spread of Δ/err_min", [_f(a["norm_spread_minor"], ".2f") for a in ast], _f(tot["norm_spread_minor"], ".2f"))

    zp = result["zero_point"]
    header("zero point fitted − true (mag)")
    if zp["status"] == "absent":
        lines.append(f"  {zp['reason']}")
    else:
        lines.append(f"  calibration status {zp['status']}")
        zb = [zp["bands"][b] for b in BANDS]
        row("frames", [str(z["n"]) for z in zb])
        row("mean", [_f(z["mean"], "+.4f") for z in zb])
        row("rms", [_f(z["rms"], ".4f") for z in zb])
        row("max |error|", [_f(z["max_abs"], ".4f") for z in zb])

    header("spurious detections by artifact", all_col=True)
    kinds = list(result["overall"]["contamination"])
    if not kinds:
        lines.append("  none")
    for kd in kinds:
        cells = []
        for b in BANDS:
            c = bands[b]["contamination"].get(kd)
            cells.append(f"{c['unflagged'] + c['flagged_lower']}/{c['n']}" if c else "0/0")
        t = result["overall"]["contamination"][kd]
        row(f"{kd} (in catalog/all)", cells, f"{t['unflagged'] + t['flagged_lower']}/{t['n']}")
    lines.append("  (in catalog: cc_flg 0 or lower case; the rest carry the artifact's upper-case letter)")
    return "\n".join(lines)
