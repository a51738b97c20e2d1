"""Point Source Catalog rows of a night (2MASS catalog generation, facts sheet sections 10,
12 and 13; ``spec/products.md`` sections 3.1 and 3.2).

Two public steps:

- :func:`finalize_point_sources`: one scan's calibrated, astrometrically final point-source
  rows turned into catalog rows with every PSC column (:data:`PSC_COLUMNS`, in the PSC's
  order) and the added ones (:data:`ADDED_COLUMNS`): designation, Galactic coordinates,
  HEALPix index, observation identifiers and keys, per-source Julian date, cross-scan
  focal-plane position, nearest neighbour, distances to the scan edges, the Atlas Image
  holding the source, and the PSC selection (``use_src``) of a scan standing alone;
- :func:`resolve_duplicates`: the night's scans together: apparitions of one source in
  overlapping scans matched, the one farthest from its scan edge chosen (``dup_src``,
  ``use_src``), and duplicate designations of selected sources told apart by letters.

Column definitions (the PSC's, All-Sky Release Explanatory Supplement section II.2a; where
2MASS left something open, the choice is stated here and in :class:`PscConfig`):

``designation``
    ``hhmmssss+ddmmsss``: RA in hours, minutes and hundredths of seconds of time, Dec in
    degrees, arcminutes and tenths of arcseconds, both TRUNCATED (IAU rule), without the
    ``2MASS J`` prefix (the PSC column omits it too); a trailing letter (A, B, ...) only
    where two selected sources of the night would otherwise share a name.
``glon``, ``glat``
    Galactic coordinates (astropy's ICRS → Galactic), degrees, full precision (the PSC
    quotes 0.001°).
``hemis``
    The observatory code, ``n`` (Mt. Hopkins) or ``s`` (CTIO).
``date``
    ``yyyy-mm-dd``, the PSC's "observation reference date": the UT date at SUNRISE ending
    the night (the raw night's ``night`` is the UT date at sunset; the two differ at CTIO).
``jdate``
    Julian date at which the array centre crossed the source (:func:`gpu2mass.epochs.source_epochs`,
    in the J frames), accurate to a frame period (the PSC: ±30 s).
``x_scan``
    Mean cross-scan focal-plane position of the source, arcsec: its offset from the array
    centre along the frames' +x axis (≈ west; the U-scan x axis, facts sheet section 5),
    averaged over every frame of every band that holds it.
``prox``, ``pxpa``, ``pxcntr``
    Distance (arcsec), position angle (integer degrees east of north, from the source to the
    neighbour) and ``pts_key`` of the nearest other source of the same scan (all rows of the
    scan: the working-database convention; the PSC's own values were recomputed among PSC
    sources). Null for a scan with one source.
``dist_edge_ns``, ``dist_edge_ew``, ``dist_edge_flg``
    Distances (integer arcsec, truncated, never negative) to the nearest north/south end and
    east/west edge of the area the scan covers in all three bands, and which edges those are
    (``n``/``s`` then ``e``/``w``). The covered area is the union of each band's frames,
    intersected over the bands: frame centres, position angles and scales from the scan's
    frames table, and the array outline through the focal-plane distortion when the scan's
    frame geometries are given (without them the outline is undistorted, and on the ci
    night the distances come out ~1" short: the distortion pushes the sides out by ~0.5
    pixel). The sides are measured across the scan at the source, the ends along the scan
    track, in each frame's own projection (arc lengths).
``pts_key``
    ``scan_key × 10⁶ + n``, n = 1, 2, ... in order of increasing Dec (then RA) within the
    scan: unique, and the same on every re-run of the night.
``scan_key``
    ``yyyymmdd × 10⁴ + h × 10³ + scan`` (yyyymmdd from ``date``, h = 0 north, 1 south):
    unique across nights and observatories (:func:`scan_key`).
``coadd``, ``coadd_key``
    Image number (``atlas/<band>_<scan>_<img>.fits``) of the Atlas Image holding the source
    (in an overlap of two images, the one it lies deeper in: the overlap is split at its
    middle, as the Atlas detection splits it) and ``scan_key × 10³ + coadd``
    (:func:`coadd_key`; one key per image position, common to its three bands). Null for a
    source outside every image.
``ext_key``, ``gal_contam``
    With the scan's extended sources (``extended``: XSC rows with ``ext_key``, ``ra``,
    ``dec``, ``r_k20fe``, ``k_ba``, ``k_phi``): ``ext_key`` of the extended source whose
    centre lies within :attr:`PscConfig.xsc_match_arcsec` of the point source (the nearest),
    and ``gal_contam`` 1 when that source is larger than 10" (the point source IS the
    resolved galaxy), else 2 inside the Ks 20 mag/arcsec² fiducial ellipse (semi-major
    ``r_k20fe``, axis ratio ``k_ba``, position angle ``k_phi`` east of north) of an extended
    source larger than 10", else 0 (facts sheet 13.5). Without ``extended`` both are null:
    no association can be known (a 0 would claim "not contaminated").
``mp_flg``
    Null: the pipeline has no minor-planet ephemeris input yet.
``dup_src``, ``use_src``
    2MASS multiple-source resolution: ``use_src`` 1 marks the apparition selected for the
    catalog, so the catalog is the rows with ``use_src`` 1. :func:`finalize_point_sources`
    gives each scan alone (``dup_src`` 0, ``use_src`` 1 where the PSC selection rules 1–6
    pass, :func:`psc_selection`); :func:`resolve_duplicates` then applies rule 7 across the
    night's scans (matches, confusion codes, the distance-to-edge choice, pseudo-apparitions).

Every other column (positions, errors, photometry, flags, ``ndet``, ``scan``) is passed on
unchanged; internal columns of the scan pipeline are dropped.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import MaskedColumn, Table

from gpu2mass import flags
from gpu2mass.epochs import source_epochs
from gpu2mass.errors import ConfigError, StepError
from gpu2mass.geometry import tan_deproject, tan_project

__all__ = [
    "ADDED_COLUMNS",
    "PSC_COLUMNS",
    "PscConfig",
    "atlas_grids_from_files",
    "coadd_key",
    "designation",
    "extended_association",
    "finalize_point_sources",
    "nearest_neighbours",
    "observation_date",
    "psc_selection",
    "resolve_duplicates",
    "scan_edges",
    "scan_key",
]

#: The 2MASS PSC columns, in the PSC's order (spec/products.md section 3.1).
PSC_COLUMNS = (
    "ra", "dec", "err_maj", "err_min", "err_ang", "designation",
    "j_m", "j_cmsig", "j_msigcom", "j_snr",
    "h_m", "h_cmsig", "h_msigcom", "h_snr",
    "k_m", "k_cmsig", "k_msigcom", "k_snr",
    "ph_qual", "rd_flg", "bl_flg", "cc_flg", "ndet", "prox", "pxpa", "pxcntr", "gal_contam",
    "mp_flg", "pts_key", "hemis", "date", "scan", "glon", "glat", "x_scan", "jdate",
    "j_psfchi", "h_psfchi", "k_psfchi",
    "j_m_stdap", "j_msig_stdap", "h_m_stdap", "h_msig_stdap", "k_m_stdap", "k_msig_stdap",
    "dist_edge_ns", "dist_edge_ew", "dist_edge_flg", "dup_src", "use_src",
    "ext_key", "scan_key", "coadd_key", "coadd",
)

#: Columns added to the PSC's (spec/products.md section 3.2), band by band.
ADDED_COLUMNS = (
    "healpix_29",
    "j_x", "j_y", "h_x", "h_y", "k_x", "k_y",
    "j_flux", "j_flux_err", "h_flux", "h_flux_err", "k_flux", "k_flux_err",
    "sep_j_h", "sep_j_k",
)

#: Columns of the scan pipeline's rows that are carried over unchanged.
_CARRIED = tuple(c for c in PSC_COLUMNS + ADDED_COLUMNS if c not in {
    "designation", "prox", "pxpa", "pxcntr", "gal_contam", "mp_flg", "pts_key", "hemis", "date",
    "glon", "glat", "x_scan", "jdate", "dist_edge_ns", "dist_edge_ew", "dist_edge_flg", "dup_src",
    "use_src", "ext_key", "scan_key", "coadd_key", "coadd", "healpix_29"})

#: Site longitudes (deg, east positive) of the 2MASS observatories (facts sheet section 11).
SITE_LON_DEG = {"n": -(110 + 52 / 60 + 41.3 / 3600), "s": -(70 + 48 / 60 + 18.3 / 3600)}

_ROWS_PER_SCAN = 10**6  # pts_key = scan_key * this + n
_IMAGES_PER_SCAN = 10**3  # coadd_key = scan_key * this + coadd
_HEALPIX_ORDER = 29
_ARCSEC_RAD = np.pi / 180 / 3600


@dataclass(frozen=True)
class PscConfig:
    """Settings of the catalog columns and the PSC selection (2MASS values, facts sheet
    section 10).

    Attributes
    ----------
    edge_margin_arcsec
        Rule 1: a selected source lies more than this from every edge of its scan's
        three-band coverage (``dist_edge_ns`` and ``dist_edge_ew``, the stored integer
        arcsec, > 10).
    duplicate_radius_arcsec
        Rule 7: apparitions in different scans closer than this (2") are one source.
    snr_single
        Rule 4: SNR above this (7) in at least one measured band (``[jhk]_snr``, or
        ``[jhk]_cmsig`` ≤ 1.0857/7 = 0.1551) ...
    snr_three_band
        ... or detected in all three bands and SNR above this (5; ``cmsig`` ≤ 0.2171) in at
        least one.
    xsc_min_radius_arcsec
        ``gal_contam``: extended sources with a fiducial semi-major axis above this (10",
        the PSC's) contaminate the point sources inside them.
    xsc_match_arcsec
        ``ext_key``: a point source within this of an extended source's centre is that
        source's point-source counterpart (2"; decision: the PSC text gives no radius, and
        2" is the point-source match radius of the duplicate resolution).
    psfchi_max
        Rule 5: ``[jhk]_psfchi`` below this (10) in at least one band. A band measured
        without a PSF fit (``rd_flg`` 1 or 3: R1 aperture or radial profile of a saturated
        star) passes: the rule rejects cosmic rays and meteor trails, and a star bright
        enough to saturate is neither (decision: the PSC text is silent).

    The rules applied (:func:`psc_selection`): 1 (edges), 2 (no upper-case ``cc_flg``
    letter: not an artifact itself), 3 (``rd_flg`` 1, 2 or 3 in at least one band), 4 (SNR),
    5 (``psfchi``), 6 (frame statistics, :func:`gpu2mass.flags.frames_ok` on the ``ndet``
    digits in every band measured on the R2−R1 frames, ``rd_flg`` 2 or 4; a band brighter
    than J 14.5 / H 14.0 / Ks 13.5 measurable on fewer than 3 frames passes when all three
    bands are so measured, each on at least 2 frames and detected on all of them — the
    memo's fallback); rule 7 (one apparition per source) is :func:`resolve_duplicates`.
    Magnitudes must be calibrated (rule 6's brightness limits are calibrated magnitudes).
    """

    edge_margin_arcsec: float = 10.0
    duplicate_radius_arcsec: float = 2.0
    snr_single: float = 7.0
    snr_three_band: float = 5.0
    xsc_min_radius_arcsec: float = 10.0
    xsc_match_arcsec: float = 2.0
    psfchi_max: float = 10.0

    def __post_init__(self):
        if self.edge_margin_arcsec < 0 or self.duplicate_radius_arcsec <= 0:
            raise ConfigError("psc.edge_margin_arcsec >= 0 and psc.duplicate_radius_arcsec > 0 "
                              "are required")
        if self.xsc_min_radius_arcsec < 0 or self.xsc_match_arcsec <= 0:
            raise ConfigError("psc.xsc_min_radius_arcsec >= 0 and psc.xsc_match_arcsec > 0 are required")
        if not 0 < self.snr_three_band <= self.snr_single or self.psfchi_max <= 0:
            raise ConfigError("psc: 0 < snr_three_band <= snr_single and psfchi_max > 0 are required")


# -- identifiers --------------------------------------------------------------------------


def designation(ra, dec) -> np.ndarray:
    """PSC designations ``hhmmssss+ddmmsss`` of positions ``ra``, ``dec`` (deg, (n,)).

    RA to 0.01 s of time and Dec to 0.1", both truncated, never rounded (so a name's
    coordinates lie at most 0.15" in RA and 0.1" in Dec from the source, as the PSC states).
    """
    ra = np.mod(np.atleast_1d(np.asarray(ra, float)), 360.0)
    dec = np.atleast_1d(np.asarray(dec, float))
    # Integer units; the 1e-6 unit guard keeps values that are exact in decimal (12.00 s
    # stored as 11.99999999) from losing a digit to binary rounding.
    cs = np.minimum(np.floor(ra * (86400 * 100 / 360.0) + 1e-6), 86400 * 100 - 1).astype(np.int64)
    ds = np.minimum(np.floor(np.abs(dec) * 36000.0 + 1e-6), 90 * 36000).astype(np.int64)
    hh, rest = np.divmod(cs, 3600 * 100)
    mm, ss = np.divmod(rest, 6000)
    dd, rest = np.divmod(ds, 36000)
    am, asec = np.divmod(rest, 600)
    sign = np.where(dec < 0, "-", "+")
    return np.array([f"{h:02d}{m:02d}{s:04d}{g}{d:02d}{a:02d}{t:03d}"
                     for h, m, s, g, d, a, t in zip(hh, mm, ss, sign, dd, am, asec, strict=True)],
                    dtype="<U17")


def observation_date(night_date: str, site_lon_deg: float) -> str:
    """The PSC ``date``: UT date at sunrise ending the night whose sunset fell on UT date
    ``night_date`` (``YYYY-MM-DD``), at a site of longitude ``site_lon_deg`` (east positive).

    Sunset and sunrise are taken at 18 h and 6 h local mean solar time; the UT date boundary
    is many hours from either at any observatory, so the seasonal hour or two do not matter.
    """
    try:
        n = datetime.date.fromisoformat(night_date)
    except (TypeError, ValueError):
        raise StepError(f"night date {night_date!r} is not YYYY-MM-DD") from None
    offset = -float(site_lon_deg) / 15.0  # UT − local solar time, hours
    local_evening = n - datetime.timedelta(days=int(np.floor((18.0 + offset) / 24.0)))
    days = 1 + int(np.floor((6.0 + offset) / 24.0))
    return (local_evening + datetime.timedelta(days=days)).isoformat()


def scan_key(date: str, hemis: str, scan: int) -> int:
    """Unique key of a scan: ``yyyymmdd × 10⁴ + h × 10³ + scan`` (h = 0 for ``n``, 1 for
    ``s``; ``date`` the PSC ``date``, ``yyyy-mm-dd``)."""
    if hemis not in ("n", "s") or not 0 < int(scan) < 1000 or not re.fullmatch(r"\d{4}-\d\d-\d\d", date):
        raise StepError(f"scan key: need date yyyy-mm-dd, hemis n/s and 0 < scan < 1000, "
                        f"got {date!r}, {hemis!r}, {scan!r}")
    return int(date.replace("-", "")) * 10_000 + (hemis == "s") * 1000 + int(scan)


def coadd_key(scan_key_value: int, image: int) -> int:
    """Unique key of an Atlas Image position: ``scan_key × 10³ + image``."""
    if not 0 < int(image) < _IMAGES_PER_SCAN:
        raise StepError(f"Atlas image number {image} out of range 1..{_IMAGES_PER_SCAN - 1}")
    return int(scan_key_value) * _IMAGES_PER_SCAN + int(image)


# -- geometry -----------------------------------------------------------------------------


def _frame_columns(frames) -> dict[str, np.ndarray]:
    need = ("band", "ra", "dec", "rot_deg", "scale_arcsec", "mjd", "airmass")
    names = frames.colnames if hasattr(frames, "colnames") else list(frames)
    missing = [c for c in need if c not in names]
    if missing:
        raise StepError(f"the scan's frames table lacks {', '.join(missing)}")
    out = {c: np.asarray(frames[c]) for c in need}
    out["band"] = out["band"].astype(str)
    return out


def _local_xy(ra, dec, fra, fdec, rot_deg):
    """Position of sources in frames: (x, y) arcsec from the array centre along the frame's
    +x (≈ west) and +y (≈ north) axes, as arc lengths (zenithal equidistant, so that far
    frames measure distances along the sky). All arguments broadcast."""
    xi, eta = tan_project(ra, dec, fra, fdec)
    r = np.hypot(xi, eta) * _ARCSEC_RAD
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(r > 1e-12, np.arctan(r) / np.where(r > 1e-12, r, 1.0), 1.0)
    xi, eta = xi * k, eta * k
    th = np.deg2rad(rot_deg)
    return -xi * np.cos(th) + eta * np.sin(th), xi * np.sin(th) + eta * np.cos(th)


def _along_axis(fra, fdec):
    """Scan tangent point and the unit along-scan axis (pointing north) of frame centres."""
    rad = np.deg2rad(fra)
    ra0 = float(np.rad2deg(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())) % 360.0)
    dec0 = float(np.median(fdec))
    fxi, feta = tan_project(fra, fdec, ra0, dec0)
    axis = np.array([np.ptp(fxi), np.ptp(feta)], float)
    if np.hypot(*axis) < 1e-9:
        axis = np.array([0.0, 1.0])
    axis = axis / np.hypot(*axis)
    # Sign: along-scan coordinate grows northwards (the scan's direction is irrelevant).
    if axis[1] < 0 or (axis[1] == 0 and axis[0] < 0):
        axis = -axis
    return ra0, dec0, axis


def scan_edges(ra, dec, frames, *, nx: int, ny: int, geometries: Mapping | None = None):
    """Distances of sources to the edges of a scan's three-band coverage, and their mean
    cross-scan focal-plane position.

    Parameters
    ----------
    ra, dec
        Source positions, deg, (n,).
    frames
        The scan's frames table (``scans/<scan>/frames.parquet`` columns: ``band``, ``ra``,
        ``dec`` of each frame's array centre, ``rot_deg`` (+y axis, east of north),
        ``scale_arcsec``; ``mjd``, ``airmass``).
    nx, ny
        Array size, pixels.
    geometries
        Optional band → :class:`~gpu2mass.geometry.FrameGeometry` of the scan (its frames in
        frame order): the arrays' outlines then include the focal-plane distortion, which
        the frames table does not carry (without it, distances to the sides come out ~1"
        short where the distortion pushes the array's edges out by ~0.5 pixel).

    Returns
    -------
    north, south, east, west
        float arrays (n,): signed distances (arcsec, negative outside) to the north and south
        ends and the east and west edges of the area covered in every band. The ends are
        reached along the scan track (the line of frame centres), the sides across it.
    x_scan
        float array (n,): mean frame +x position (arcsec from the array centre, ≈ west) over
        the frames holding the source (the nearest frame's where none does).
    """
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    f = _frame_columns(frames)
    n = ra.size
    geometries = dict(geometries or {})
    bands = [b for b in flags.BANDS if np.any(f["band"] == b) or b in geometries]
    ra0, dec0, axis = _along_axis(f["ra"].astype(float), f["dec"].astype(float))
    perp = np.array([axis[1], -axis[0]])  # cross-scan axis of the scan plane
    sxi, seta = tan_project(ra, dec, ra0, dec0)
    s_src = sxi * axis[0] + seta * axis[1]
    c_src = sxi * perp[0] + seta * perp[1]
    out = {k: np.full(n, np.inf) for k in ("north", "south", "east", "west")}
    xsum, xcnt = np.zeros(n), np.zeros(n)
    x_near, d_near = np.zeros(n), np.full(n, np.inf)
    for b in bands:
        geom = geometries.get(b)
        if geom is not None:
            fra, fdec = np.asarray(geom.ra, float), np.asarray(geom.dec, float)
            rot = np.full(fra.size, float(geom.band.rotation_deg))
            scale = np.full(fra.size, float(geom.band.scale_arcsec))
        else:
            sel = f["band"] == b
            fra, fdec = f["ra"][sel].astype(float), f["dec"][sel].astype(float)
            rot, scale = f["rot_deg"][sel].astype(float), f["scale_arcsec"][sel].astype(float)
        fxi, feta = tan_project(fra, fdec, ra0, dec0)
        s_f = fxi * axis[0] + feta * axis[1]
        order = np.argsort(s_f, kind="stable")  # frame indices along the scan, south first
        s_f = s_f[order]

        def arc(r, d, k, order=order, fra=fra, fdec=fdec, rot=rot):
            """(x, y) arcsec of points in frames k (sorted indices), as arc lengths."""
            k = order[k]
            return _local_xy(r, d, fra[k], fdec[k], rot[k])

        def pixel(r, d, k, x, y, order=order, scale=scale, geom=geom):
            """Pixel (x, y) of points in frames k: through the distortion where a geometry
            is given and the point is within an array size of the frame, else the rotation."""
            kk = order[k]
            px, py = x / scale[kk] + (nx - 1) / 2, y / scale[kk] + (ny - 1) / 2
            if geom is not None:
                near = (np.abs(x) < nx * scale[kk]) & (np.abs(y) < ny * scale[kk])
                if near.any():
                    gx, gy = geom.sky_to_pixel(kk[near], r[near], d[near])
                    px, py = px.copy(), py.copy()
                    px[near], py[near] = gx, gy
            return px, py

        def undistorted(u, v, geom=geom):
            """Sky (undistorted) pixel offsets from the array centre of points at pixel
            offsets (u, v): the array's outline as it lies on the sky."""
            return (u, v) if geom is None else geom.band.distort(u, v)

        reach = 0.5 * ny * float(scale.max()) + 60.0  # frames whose span can hold a source
        # East/west: the frames spanning the source's along-scan position.
        lo = np.searchsorted(s_f, s_src - reach, "left")
        hi = np.searchsorted(s_f, s_src + reach, "right")
        # Sources beyond the scan's ends are paired with the end frame.
        lo = np.minimum(lo, s_f.size - 1)
        hi = np.maximum(hi, lo + 1)
        cnt = hi - lo
        src = np.repeat(np.arange(n), cnt)
        frm = np.repeat(lo - np.cumsum(np.r_[0, cnt[:-1]]), cnt) + np.arange(cnt.sum())
        x, y = arc(ra[src], dec[src], frm)
        px, py = pixel(ra[src], dec[src], frm, x, y)
        sc = scale[order[frm]]
        spans = (py >= -0.5) & (py <= ny - 0.5)
        # The array's sides at the source's row, in undistorted (sky) pixel offsets.
        u_east, _ = undistorted(np.full(x.size, -nx / 2), py - (ny - 1) / 2)
        u_west, _ = undistorted(np.full(x.size, nx / 2), py - (ny - 1) / 2)
        east_px, west_px = x - u_east * sc, u_west * sc - x
        east_b, west_b = np.full(n, -np.inf), np.full(n, -np.inf)
        np.maximum.at(east_b, src[spans], east_px[spans])
        np.maximum.at(west_b, src[spans], west_px[spans])
        # A source beyond an end: the cross-scan distances of the nearest frame.
        dist = np.hypot(x, y)
        first = np.full(n, np.inf)
        np.minimum.at(first, src, dist)
        nearest = dist <= first[src]
        none = ~np.isfinite(east_b)
        pick = nearest & none[src]
        east_b[src[pick]] = east_px[pick]
        west_b[src[pick]] = west_px[pick]
        out["east"] = np.minimum(out["east"], east_b)
        out["west"] = np.minimum(out["west"], west_b)
        xoff = (px - (nx - 1) / 2) * sc
        inside = spans & (px >= -0.5) & (px <= nx - 0.5)
        np.add.at(xsum, src[inside], xoff[inside])
        np.add.at(xcnt, src[inside], 1.0)
        better = nearest & (first[src] < d_near[src])
        x_near[src[better]] = xoff[better]
        d_near[src[better]] = first[src[better]]
        # North/south: the frames at each end of the scan. Each source is carried along the
        # track to the end frame (point P: the source's cross-scan offset, the frame's
        # along-scan place); the end lies beyond P by P's distance to the frame's edge.
        for name, end in (("north", np.flatnonzero(s_f >= s_f[-1] - 2 * reach)),
                          ("south", np.flatnonzero(s_f <= s_f[0] + 2 * reach))):
            k = np.broadcast_to(end[None, :], (n, end.size)).ravel()
            i = np.repeat(np.arange(n), end.size)
            p_ra, p_dec = tan_deproject(s_f[k] * axis[0] + c_src[i] * perp[0],
                                        s_f[k] * axis[1] + c_src[i] * perp[1], ra0, dec0)
            _, ys_ = arc(ra[i], dec[i], k)
            xp_, yp_ = arc(p_ra, p_dec, k)
            ppx, _ = pixel(p_ra, p_dec, k, xp_, yp_)
            sc = scale[order[k]]
            _, v_end = undistorted(ppx - (nx - 1) / 2, np.full(k.size, ny / 2 if name == "north" else -ny / 2))
            d = v_end * sc - ys_ if name == "north" else ys_ - v_end * sc
            across = (ppx >= -0.5) & (ppx <= nx - 0.5)
            d, across = d.reshape(n, end.size), across.reshape(n, end.size)
            best = np.where(across, d, -np.inf).max(axis=1)
            # Beyond the band's cross-scan extent: the end frames' edge all the same.
            best = np.where(np.isfinite(best), best, d.max(axis=1))
            out[name] = np.minimum(out[name], best)
    x_scan = np.where(xcnt > 0, xsum / np.maximum(xcnt, 1), x_near)
    return out["north"], out["south"], out["east"], out["west"], x_scan


def nearest_neighbours(ra, dec, keys):
    """Nearest other source of a set: distance (arcsec), position angle (deg east of north,
    from the source to the neighbour, in [0, 360)) and the neighbour's key.

    ``ra``, ``dec`` deg (n,), ``keys`` (n,) int. With fewer than two sources the distance and
    angle are NaN and the key −1.
    """
    from scipy.spatial import cKDTree

    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    keys = np.atleast_1d(np.asarray(keys, np.int64))
    n = ra.size
    if n < 2:
        return np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1, np.int64)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    xyz = np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
    chord, idx = cKDTree(xyz).query(xyz, k=2)
    # A source's first neighbour is itself unless another sits exactly on it (then either
    # column may hold it): take the first column that is not the source.
    j = np.where(idx[:, 0] == np.arange(n), idx[:, 1], idx[:, 0])
    c = np.where(idx[:, 0] == np.arange(n), chord[:, 1], chord[:, 0])
    sep = 2 * np.arcsin(np.clip(c / 2, 0, 1)) / _ARCSEC_RAD
    da = a[j] - a
    pa = np.rad2deg(np.arctan2(np.sin(da) * np.cos(d[j]),
                               np.cos(d) * np.sin(d[j]) - np.sin(d) * np.cos(d[j]) * np.cos(da)))
    return sep, np.mod(pa, 360.0), keys[j]


def atlas_grids_from_files(paths) -> list[tuple[int, object]]:
    """``(image number, AtlasGrid)`` of Atlas Image files ``<band>_<scan>_<img>.fits`` (one
    entry per image number; the bands of an image position share its grid)."""
    from astropy.io import fits

    from gpu2mass.atlas import AtlasGrid

    grids = {}
    for p in paths:
        p = Path(p)
        m = re.fullmatch(r"[jhk]_(\d+)_(\d+)\.fits", p.name)
        if m is None:
            raise StepError(f"{p}: not an Atlas Image name <band>_<scan>_<img>.fits")
        img = int(m.group(2))
        if img in grids:
            continue
        h = fits.getheader(p)
        grids[img] = AtlasGrid(img - 1, float(h["CRVAL1"]), float(h["CRVAL2"]), int(h["NAXIS1"]),
                               int(h["NAXIS2"]), float(h["CRPIX1"]), float(h["CRPIX2"]),
                               float(h["CDELT2"]))
    return sorted(grids.items())


def _atlas_image(ra, dec, atlas_images) -> np.ndarray:
    """Image number holding each source (0: none); in an overlap the image it lies deeper in."""
    best_img = np.zeros(ra.size, np.int64)
    best_depth = np.full(ra.size, -np.inf)
    for img, grid in atlas_images:
        x, y = grid.sky_to_pixel(ra, dec)
        x, y = np.asarray(x, float), np.asarray(y, float)
        inside = (x >= -0.5) & (x <= grid.nx - 0.5) & (y >= -0.5) & (y <= grid.ny - 0.5)
        depth = np.minimum(y + 0.5, grid.ny - 0.5 - y)
        take = inside & (depth > best_depth)
        best_img[take] = int(img)
        best_depth[take] = depth[take]
    return best_img


def extended_association(ra, dec, extended, *, config: PscConfig = PscConfig()):
    """``gal_contam`` and ``ext_key`` of point sources from the extended sources around them.

    ``ra``, ``dec`` deg (n,); ``extended`` a table with ``ext_key``, ``ra``, ``dec``,
    ``r_k20fe`` (arcsec), ``k_ba``, ``k_phi`` (deg east of north). Returns ``gal_contam``
    int16 (n,) (0, 1 or 2) and ``ext_key`` int64 (n,) (−1: none); see the module docstring.
    """
    from scipy.spatial import cKDTree

    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    n = ra.size
    gal = np.zeros(n, np.int16)
    key = np.full(n, -1, np.int64)
    if extended is None or len(extended) == 0 or n == 0:
        return gal, key
    missing = [c for c in ("ext_key", "ra", "dec", "r_k20fe", "k_ba", "k_phi") if c not in extended.colnames]
    if missing:
        raise StepError(f"the extended sources lack {', '.join(missing)}")

    def col(name, fill=np.nan):
        c = extended[name]
        return np.asarray(c.filled(fill) if hasattr(c, "filled") else c, float)

    xra, xdec, radius = col("ra"), col("dec"), col("r_k20fe", 0.0)
    ba, phi = col("k_ba", 1.0), np.deg2rad(col("k_phi", 0.0))
    xkey = np.asarray(extended["ext_key"], np.int64)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    tree = cKDTree(np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)]))
    for j in np.argsort(-radius, kind="stable"):  # larger sources first: 1 beats 2
        aj, dj = np.deg2rad(xra[j]), np.deg2rad(xdec[j])
        centre = [np.cos(dj) * np.cos(aj), np.cos(dj) * np.sin(aj), np.sin(dj)]
        reach = max(radius[j], config.xsc_match_arcsec) * _ARCSEC_RAD
        near = np.asarray(tree.query_ball_point(centre, 2 * np.sin(reach / 2) * 1.0001), int)
        if not near.size:
            continue
        xi, eta = tan_project(ra[near], dec[near], xra[j], xdec[j])
        sep = np.hypot(xi, eta)
        m = int(np.argmin(sep))
        big = radius[j] > config.xsc_min_radius_arcsec
        if sep[m] <= config.xsc_match_arcsec and key[near[m]] < 0:
            key[near[m]] = xkey[j]
            if big:
                gal[near[m]] = 1
        if big:
            major = xi * np.sin(phi[j]) + eta * np.cos(phi[j])
            minor = xi * np.cos(phi[j]) - eta * np.sin(phi[j])
            inside = (major / radius[j]) ** 2 + (minor / (radius[j] * max(ba[j], 1e-3))) ** 2 <= 1.0
            gal[near[inside & (gal[near] == 0)]] = 2
    return gal, key


# -- selection ----------------------------------------------------------------------------


def _band_values(table, p, name, fill=np.nan):
    c = table[f"{p}_{name}"]
    return np.asarray(c.filled(fill) if hasattr(c, "filled") else c, float)


def psc_selection(table: Table, *, config: PscConfig = PscConfig()) -> np.ndarray:
    """PSC selection rules 1–6 (see :class:`PscConfig`) of catalog rows: bool array (n,)."""
    cfg = config
    n = len(table)
    rd = np.array([[int(s[i]) for i in range(3)] for s in np.asarray(table["rd_flg"]).astype(str)],
                  np.int64).reshape(n, 3)
    nd = np.array([[int(s[2 * i]) for i in range(3)] + [int(s[2 * i + 1]) for i in range(3)]
                   for s in np.asarray(table["ndet"]).astype(str)], np.int64).reshape(n, 6)
    n_det, n_meas = nd[:, :3], nd[:, 3:]
    cc = np.asarray(table["cc_flg"]).astype(str)
    ns = np.asarray(table["dist_edge_ns"].filled(-1) if hasattr(table["dist_edge_ns"], "filled")
                    else table["dist_edge_ns"], float)
    ew = np.asarray(table["dist_edge_ew"].filled(-1) if hasattr(table["dist_edge_ew"], "filled")
                    else table["dist_edge_ew"], float)
    rule1 = (ns > cfg.edge_margin_arcsec) & (ew > cfg.edge_margin_arcsec)
    rule2 = np.array([s == s.lower() for s in cc], bool)
    valid = np.isin(rd, (flags.RD_R1_APERTURE, flags.RD_PSF, flags.RD_R1_PROFILE))
    rule3 = valid.any(axis=1)
    measured = valid | (rd == flags.RD_R2_APERTURE)
    snr = np.column_stack([_band_values(table, p, "snr") for p in "jhk"])
    cmsig = np.column_stack([_band_values(table, p, "cmsig") for p in "jhk"])
    mag = np.column_stack([_band_values(table, p, "m") for p in "jhk"])
    psfchi = np.column_stack([_band_values(table, p, "psfchi") for p in "jhk"])
    mag_per_snr = 2.5 / np.log(10.0)
    with np.errstate(invalid="ignore"):
        strong = measured & ((snr > cfg.snr_single) | (cmsig <= mag_per_snr / cfg.snr_single))
        fair = measured & ((snr > cfg.snr_three_band) | (cmsig <= mag_per_snr / cfg.snr_three_band))
        rule4 = strong.any(axis=1) | (measured.all(axis=1) & fair.any(axis=1))
        rule5 = ((rd == flags.RD_PSF) & (psfchi < cfg.psfchi_max)).any(axis=1) | np.isin(
            rd, (flags.RD_R1_APERTURE, flags.RD_R1_PROFILE)).any(axis=1)
    r2 = np.isin(rd, (flags.RD_PSF, flags.RD_R2_APERTURE))
    ok = np.column_stack([flags.frames_ok(n_det[:, i], n_meas[:, i], mag[:, i], b)
                          for i, b in enumerate(flags.BANDS)])
    # The memo's fallback for bright sources measurable on too few frames.
    fallback = (r2 & (n_meas >= 2) & (n_det >= n_meas)).all(axis=1)
    rule6 = np.where(r2, ok, True).all(axis=1) | fallback
    return rule1 & rule2 & rule3 & rule4 & rule5 & rule6


# -- the scan's catalog rows --------------------------------------------------------------


def _masked(values, mask, dtype):
    return MaskedColumn(np.where(mask, 0, values).astype(dtype), mask=np.asarray(mask, bool))


def finalize_point_sources(pts: Table, *, scan: int, night_date: str, observatory: str, frames,
                           atlas_images: Sequence[tuple[int, object]], nx: int = 256, ny: int = 256,
                           site_lon_deg: float | None = None, geometries: Mapping | None = None,
                           extended: Table | None = None, config: PscConfig = PscConfig()) -> Table:
    """Catalog rows of one scan with every PSC column and the added ones, in spec order.

    Parameters
    ----------
    pts
        The scan's point-source rows (:func:`gpu2mass.catalog.assemble_point_sources` with the
        artifact flags), magnitudes calibrated and positions final.
    scan
        Scan number (the rows' ``scan``).
    night_date
        The raw night's ``night``: UT date at sunset, ``YYYY-MM-DD``.
    observatory
        ``"n"`` or ``"s"``.
    frames
        The scan's frames table (``scans/<scan>/frames.parquet``: ``band``, ``ra``, ``dec``,
        ``rot_deg``, ``scale_arcsec``, ``mjd``, ``airmass`` per band and frame).
    atlas_images
        ``(image number, grid)`` of the scan's Atlas Images, the image number as in
        ``atlas/<band>_<scan>_<img>.fits``; a grid is a :class:`gpu2mass.atlas.AtlasGrid` (or
        anything with ``sky_to_pixel``, ``nx``, ``ny``). Or the Atlas Image files themselves
        (paths), read by :func:`atlas_grids_from_files`.
    nx, ny
        Array size, pixels (the night's ``instrument``).
    site_lon_deg
        Observatory longitude (deg, east positive) for ``date``; default the 2MASS site of
        ``observatory``.
    geometries
        Optional band → :class:`~gpu2mass.geometry.FrameGeometry` of the scan (with the
        focal-plane distortion), for exact edge distances and ``x_scan`` (see
        :func:`scan_edges`).
    extended
        Optional extended sources of the scan (see :func:`extended_association`); without
        them ``gal_contam`` and ``ext_key`` are null.

    Returns
    -------
    Table with :data:`PSC_COLUMNS` then :data:`ADDED_COLUMNS`, one row per input row (same
    order); nulls are masked. ``dup_src`` is 0 and ``use_src`` the selection of rules 1–6
    until :func:`resolve_duplicates` sees the night.
    """
    if observatory not in ("n", "s"):
        raise StepError(f"scan {scan}: observatory must be 'n' or 's', got {observatory!r}")
    missing = [c for c in _CARRIED if c not in pts.colnames]
    if missing:
        raise StepError(f"scan {scan}: the point-source rows lack {', '.join(missing)}")
    n = len(pts)
    if n >= _ROWS_PER_SCAN:
        raise StepError(f"scan {scan}: {n} point sources exceed the key space ({_ROWS_PER_SCAN - 1})")
    if n and np.any(np.asarray(pts["scan"]) != scan):
        raise StepError(f"scan {scan}: the point-source rows carry other scan numbers")
    lon = SITE_LON_DEG[observatory] if site_lon_deg is None else float(site_lon_deg)
    date = observation_date(night_date, lon)
    skey = scan_key(date, observatory, scan)
    ra = np.asarray(pts["ra"], float)
    dec = np.asarray(pts["dec"], float)
    if n and not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise StepError(f"scan {scan}: point sources without a finite position")

    order = np.lexsort((ra, dec))
    keys = np.empty(n, np.int64)
    keys[order] = skey * _ROWS_PER_SCAN + 1 + np.arange(n, dtype=np.int64)

    f = _frame_columns(frames)
    tband = next((b for b in flags.BANDS if np.any(f["band"] == b)), None)
    if tband is None:
        raise StepError(f"scan {scan}: the frames table has no J, H or K rows")
    if n:
        north, south, east, west, x_scan = scan_edges(ra, dec, f, nx=nx, ny=ny, geometries=geometries)
        mjd, _ = source_epochs(ra, dec, f, tband)
        prox, pxpa, pxcntr = nearest_neighbours(ra, dec, keys)
    else:
        north = south = east = west = x_scan = mjd = prox = pxpa = np.zeros(0)
        pxcntr = np.zeros(0, np.int64)
    ns = np.minimum(north, south)
    ew = np.minimum(east, west)
    flg = np.char.add(np.where(north <= south, "n", "s"), np.where(east <= west, "e", "w"))

    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy_healpix import HEALPix

    gal = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs").galactic
    hp = HEALPix(nside=2**_HEALPIX_ORDER, order="nested")
    atlas_images = list(atlas_images)
    if atlas_images and isinstance(atlas_images[0], str | Path):
        atlas_images = atlas_grids_from_files(atlas_images)
    img = _atlas_image(ra, dec, atlas_images)
    contam, ext = extended_association(ra, dec, extended, config=config)

    out = Table()
    cols = {
        "designation": designation(ra, dec) if n else np.zeros(0, "<U17"),
        "prox": MaskedColumn(prox, mask=~np.isfinite(prox)),
        "pxpa": _masked(np.rint(np.nan_to_num(pxpa)) % 360, ~np.isfinite(pxpa), np.int16),
        "pxcntr": _masked(pxcntr, pxcntr < 0, np.int64),
        "gal_contam": _masked(contam, np.full(n, extended is None), np.int16),
        "mp_flg": MaskedColumn(np.zeros(n, np.int16), mask=np.ones(n, bool)),
        "pts_key": keys,
        "hemis": np.full(n, observatory, "<U1"),
        "date": np.full(n, date, "<U10"),
        "scan": np.full(n, int(scan), np.int32),
        "glon": np.asarray(gal.l.deg, float),
        "glat": np.asarray(gal.b.deg, float),
        "x_scan": np.asarray(x_scan, float),
        "jdate": np.asarray(mjd, float) + 2400000.5,
        "dist_edge_ns": np.floor(np.maximum(ns, 0.0)).astype(np.int32),
        "dist_edge_ew": np.floor(np.maximum(ew, 0.0)).astype(np.int32),
        "dist_edge_flg": np.asarray(flg, "<U2"),
        "dup_src": np.zeros(n, np.int16),
        "use_src": np.zeros(n, np.int16),
        "ext_key": _masked(ext, ext < 0, np.int64),
        "scan_key": np.full(n, skey, np.int64),
        "coadd_key": _masked(skey * _IMAGES_PER_SCAN + img, img == 0, np.int64),
        "coadd": _masked(img, img == 0, np.int16),
        "healpix_29": np.asarray(hp.lonlat_to_healpix(ra * u.deg, dec * u.deg), np.int64),
    }
    for name in PSC_COLUMNS + ADDED_COLUMNS:
        if name in cols:
            out[name] = cols[name]
        else:
            out[name] = pts[name]
    out["use_src"] = psc_selection(out, config=config).astype(np.int16)
    out.meta.update(scan=int(scan), scan_key=skey, date=date, hemis=observatory)
    return out


# -- duplicates across the night ----------------------------------------------------------


def resolve_duplicates(tables: Mapping[int, Table], *, frames: Mapping | None = None, nx: int = 256,
                       ny: int = 256, geometries: Mapping | None = None,
                       config: PscConfig = PscConfig()) -> dict[int, Table]:
    """Rule 7: one apparition per source where the night's scans overlap (2MASS multiple
    source resolution: Explanatory Supplement V.4 and the final-processing memos on
    ``use_src`` and ``dup_src``).

    Parameters
    ----------
    tables
        Scan → :func:`finalize_point_sources` rows. Pass the scans whose catalog is built
        together (the science scans, for the PSC; repeated calibration scans of one field
        form a catalog of their own).
    frames
        Optional scan → frames table (as for :func:`finalize_point_sources`): the scans'
        footprints, for pseudo-apparitions (below). Without it, a source seen in one scan only
        is always kept.
    nx, ny
        Array size, pixels.
    geometries
        Optional scan → band → :class:`~gpu2mass.geometry.FrameGeometry` (see
        :func:`scan_edges`).

    Returns
    -------
    Scan → a copy of its table with ``dup_src``, ``use_src`` and ``designation`` set. Only the
    rows that pass rules 1–6 (:func:`psc_selection`: the 2MASS catalog-generation database,
    > 10" from the edges, no artifacts) take part; every other row gets ``use_src`` 0 and
    ``dup_src`` 0. Among them:

    - apparitions in different scans within :attr:`PscConfig.duplicate_radius_arcsec` are
      linked, and linked groups (connected components) are one source or one confused
      cluster; ``dup_src`` of each member: 0 alone, 1 one apparition per scan (a clean
      match), 3 two scans, split in one of them (triangle), 4 two scans, split in both
      (2 × 2), 5 anything larger (a chain);
    - the group's chosen scan is the one whose apparitions lie farthest from its edges
      (largest min(``dist_edge_ns``, ``dist_edge_ew``) of its members; then the larger sum
      over its members, then the lower scan number), "independent of source brightness or
      measurement quality"; all its members are chosen (a pair that one scan split stays two
      sources);
    - a scan that covers the source more than the edge margin inside its edges but has no
      apparition of it in the group (it toggled below the limit there, failed rules 1–6
      there, or moved) holds a pseudo-apparition; when that lies farther from its scan's
      edges than the chosen apparition, nothing is chosen (``use_src`` 0, ``dup_src`` as
      above: 0 for a source seen once) — so overlaps are no deeper than the rest of the sky
      (needs ``frames``; without them a source seen once is always kept);
    - ``use_src`` is 1 for the chosen apparitions: the catalog is the rows with ``use_src``
      1 (which pass rules 1–6 by construction);
    - a designation shared by two rows with ``use_src`` 1 gets trailing letters A, B, ... in
      order of ``pts_key``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    scans = sorted(int(s) for s in tables)
    out = {s: tables[s].copy(copy_data=True) for s in scans}
    if not scans:
        return out
    ra = np.concatenate([np.asarray(out[s]["ra"], float) for s in scans])
    dec = np.concatenate([np.asarray(out[s]["dec"], float) for s in scans])
    scan_of = np.concatenate([np.full(len(out[s]), s) for s in scans])
    edge = np.concatenate([np.minimum(np.asarray(out[s]["dist_edge_ns"], float),
                                      np.asarray(out[s]["dist_edge_ew"], float)) for s in scans])
    cand = np.concatenate([psc_selection(out[s], config=config) for s in scans])
    n = ra.size
    dup = np.zeros(n, np.int16)
    use = cand.copy()
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    xyz = np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
    ci = np.flatnonzero(cand)
    members_of = {}  # a linked row → the scans its group spans
    if ci.size > 1:
        r = 2 * np.sin(0.5 * config.duplicate_radius_arcsec * _ARCSEC_RAD)
        pairs = ci[cKDTree(xyz[ci]).query_pairs(r, output_type="ndarray")]
        pairs = pairs[scan_of[pairs[:, 0]] != scan_of[pairs[:, 1]]]
        if len(pairs):
            g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
            _, label = connected_components(g, directed=False)
            size = np.bincount(label)
            grouped = np.flatnonzero(size[label] > 1)
            grouped = grouped[np.argsort(label[grouped], kind="stable")]
            bounds = np.flatnonzero(np.diff(label[grouped])) + 1
            for members in np.split(grouped, bounds):
                ms = scan_of[members]
                us, counts = np.unique(ms, return_counts=True)
                if np.all(counts == 1):
                    code = 1
                elif us.size == 2 and sorted(counts) == [1, 2]:
                    code = 3
                elif us.size == 2 and sorted(counts) == [2, 2]:
                    code = 4
                else:
                    code = 5
                dup[members] = code
                rank = [(edge[members][ms == s].min(), edge[members][ms == s].sum(), -s) for s in us]
                best = us[max(range(us.size), key=lambda i: rank[i])]
                use[members] = ms == best
                spans = set(us.tolist())
                members_of.update((int(i), spans) for i in members)
    if frames:
        # Pseudo-apparitions: a chosen apparition loses to a scan that covers the source
        # deeper but did not detect it (or not well enough to pass rules 1-6).
        chosen = np.flatnonzero(use)
        for other in scans:
            if other not in frames or not chosen.size:
                continue
            f = _frame_columns(frames[other])
            fa, fd = np.deg2rad(f["ra"].astype(float)), np.deg2rad(f["dec"].astype(float))
            centres = np.column_stack([np.cos(fd) * np.cos(fa), np.cos(fd) * np.sin(fa), np.sin(fd)])
            # Near the other scan: within an array's half-diagonal of one of its frames.
            reach = 0.75 * max(nx, ny) * float(np.max(f["scale_arcsec"])) * _ARCSEC_RAD
            dist, _ = cKDTree(centres).query(xyz[chosen], distance_upper_bound=2 * np.sin(reach / 2))
            rows = chosen[np.isfinite(dist)]
            rows = rows[[other not in members_of.get(int(i), {int(scan_of[i])}) for i in rows]]
            if not rows.size:
                continue
            geo = (geometries or {}).get(other)
            north, south, east, west, _ = scan_edges(ra[rows], dec[rows], frames[other], nx=nx,
                                                     ny=ny, geometries=geo)
            d_other = np.floor(np.minimum(np.minimum(north, south), np.minimum(east, west)))
            beaten = (d_other > config.edge_margin_arcsec) & (d_other > edge[rows])
            use[rows[beaten]] = False
    # Designations: distinct names for distinct selected sources.
    desig = np.concatenate([np.asarray(out[s]["designation"]).astype("<U17") for s in scans])
    keys = np.concatenate([np.asarray(out[s]["pts_key"], np.int64) for s in scans])
    sel = np.flatnonzero(use)
    _, inv, cnt = np.unique(desig[sel], return_inverse=True, return_counts=True)
    for k in np.flatnonzero(cnt > 1):
        rows = sel[inv == k]
        rows = rows[np.argsort(keys[rows], kind="stable")]
        for i, r_ in enumerate(rows):
            desig[r_] = desig[r_] + _suffix(i)
    start = 0
    for s in scans:
        m = len(out[s])
        out[s]["dup_src"] = dup[start:start + m]
        out[s]["use_src"] = use[start:start + m].astype(np.int16)
        out[s]["designation"] = desig[start:start + m]
        start += m
    return out


def _suffix(i: int) -> str:
    """A, B, ..., Z, AA, AB, ...: the letters 2MASS appended to otherwise equal names."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("A") + r) + s
    return s
