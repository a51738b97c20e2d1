"""Bright-star artifacts of a scan's point sources: ``cc_flg`` p, d, s, c (facts sheet 6, 13.4).

2MASS's MAPCOR approach, one band of one scan at a time: find the **parents** (sources of
the scan bright in the band), predict where each of their artifacts falls, and look at
the detections there. A detection inside an artifact's zone gets the band's lower-case
letter (a real source the artifact may contaminate); a detection whose brightness is
consistent with the artifact itself — no fainter than the artifact's expected level
at that place would allow, given the parent's brightness — gets the upper-case letter
(spurious; excluded from the PSC, facts sheet 10 rule 2).

Artifacts, per band (every number in :class:`ArtifactConfig`):

- **Diffraction spikes** (``d``/``D``): parents brighter than J 10.0, H 9.5, Ks 9.0. The
  spikes lie at fixed sky position angles (2MASS's measured PAs, facts sheet 6); a
  detection is on a spike within a width and an angular tolerance of the spike line,
  out to the radius where the spike's expected brightness falls to the scan's detection
  limit (which grows with the parent's flux). The spike's expected brightness at radius
  ``r`` is ``m_parent + spike_dmag_ref + spike_dmag_per_dex · log10(r / spike_ref_arcsec)``,
  plus the parent's wing light in a 4" aperture there (the halo model), which dominates
  within ~10".
- **Persistence** (``p``/``P``): a star that saturates the array leaves a latent image at
  its *detector* pixels, released in the following frames while the sky moves one frame
  step per frame. For every frame ``f`` in which the parent lies on the array at pixel
  ``(x_f, y_f)``, the ghost of frame ``f + k`` is at ``pixel_to_sky(f + k, x_f, y_f)``:
  since the star crossed the array one step per frame, the ghosts of all its frames
  pile up at sky offsets of ``k`` whole frame steps along the scan. The expected ghost
  brightness fades by ``persistence_decay_mag`` per frame from
  ``m_parent + persistence_dmag``.
- **Stripes** (``s``/``S``): NICMOS3 electronic stripes along the array rows through a
  bright parent, across the whole array, in every frame that holds the parent. A row
  offset is not point-like: a stripe detection is spurious only when it is far fainter
  than the parent *and* its PSF fit is poor.
- **Halo confusion** (``c``/``C``): sources within the radius where a very bright
  parent's wings (a Moffat profile at a nominal seeing) put more than about one sigma of
  a faint source's aperture noise into a 4" aperture; a detection no brighter than the
  halo's own light in its aperture (within a margin) is a piece of the halo.

Where the detection limit is needed, it is the scan's: the magnitude at SNR 5 of the
band's PSF-fit detections (sky-limited, ``m + 2.5 log10(snr / 5)``), from the table.

Per-band bits are in ``[jhk]_art`` (:data:`ARTIFACT_BITS`); ``[jhk]_parent`` is the row
index of the parent responsible for the band's letter (-1 for none). Everything is
host NumPy; the work per scan is a few k-d tree queries per parent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from gpu2mass import flags
from gpu2mass.errors import ConfigError, InputError
from gpu2mass.geometry import FrameGeometry, tan_project

__all__ = [
    "ARTIFACT_BITS",
    "ART_HALO",
    "ART_HALO_SPURIOUS",
    "ART_PARENT",
    "ART_PERSISTENCE",
    "ART_PERSISTENCE_SPURIOUS",
    "ART_SPIKE",
    "ART_SPIKE_SPURIOUS",
    "ART_STRIPE",
    "ART_STRIPE_SPURIOUS",
    "ART_UNMEASURED",
    "ArtifactConfig",
    "persistence_ghosts",
    "run_artifacts",
]

ART_SPIKE = 1
ART_SPIKE_SPURIOUS = 2
ART_PERSISTENCE = 4
ART_PERSISTENCE_SPURIOUS = 8
ART_STRIPE = 16
ART_STRIPE_SPURIOUS = 32
ART_HALO = 64
ART_HALO_SPURIOUS = 128
ART_PARENT = 256
ART_UNMEASURED = 512

#: ``[jhk]_art`` of :func:`run_artifacts` (per band of a source).
ARTIFACT_BITS = flags.FlagRegistry("art", {
    ART_SPIKE: ("spike", "on a diffraction spike of a brighter parent (cc_flg d)"),
    ART_SPIKE_SPURIOUS: ("spike_artifact", ("no brighter than the spike itself there: the "
                         "detection is the spike (cc_flg D)")),
    ART_PERSISTENCE: ("persistence", ("at a persistence-ghost position of a saturating parent "
                      "(whole frame steps along the scan; cc_flg p)")),
    ART_PERSISTENCE_SPURIOUS: ("persistence_artifact", ("no brighter than the ghost expected "
                               "there: the detection is the latent image (cc_flg P)")),
    ART_STRIPE: ("stripe", "on the array rows through a bright parent (cc_flg s)"),
    ART_STRIPE_SPURIOUS: ("stripe_artifact", ("far fainter than the parent and not point-like: "
                          "the detection is the stripe (cc_flg S)")),
    ART_HALO: ("halo", "inside a very bright parent's halo radius (cc_flg c)"),
    ART_HALO_SPURIOUS: ("halo_artifact", ("no brighter than the halo's light in its aperture: "
                        "the detection is a piece of the halo (cc_flg C)")),
    ART_PARENT: ("parent", "bright enough in this band to be a parent of artifacts"),
    ART_UNMEASURED: ("unmeasured", ("in an artifact zone without a magnitude (rd_flg 6/9): "
                     "its brightness cannot be compared, left lower case")),
})

_ARCSEC_RAD = np.pi / 180 / 3600
#: rd_flg 9 rows this close to the scan's edges (") are detections no frame held inside
#: the array's 2-pixel edge margin (gpu2mass.catalog), not saturated stars.
EDGE_UNMEASURED_ARCSEC = 5.0


@dataclass(frozen=True)
class ArtifactConfig:
    """Settings of the bright-star artifact flags (2MASS values where the facts sheet has
    them; decisions documented where it says "unconfirmed").

    Magnitudes are the table's band magnitudes (instrumental until the night's
    calibration: the limits then apply to within the zero-point offset, < 0.3 mag).

    Attributes
    ----------
    spike_limit
        Band → parents at least this bright (mag) make visible spikes (J 10.0, H 9.5,
        Ks 9.0; facts sheet 6).
    spike_pa_deg
        Band → spike position angles, degrees east of north (facts sheet 6; the split
        components near 90° and 270° of very bright parents). Ks's last two are
        unconfirmed: decision, the mean of J's and H's (269.48, 271.62). Components
        closer than 5° form one span (the unsplit spike of a fainter parent lies
        between them); a detection is on a spike when it lies within the width and the
        angular tolerance of a span.
    spike_tolerance_deg
        Angular tolerance of a spike line (0.3°: the scatter of the published component
        PAs between bands and the camera rotation, −0.11°).
    spike_width_arcsec, spike_width_per_mag
        Half-width of a spike line at the spike limit (2.5") and its growth per
        magnitude brighter (0.4"/mag): wider spikes, and the larger centroid errors of
        saturated parents (rd_flg 3 cores: up to ~3.5" measured on the tiny nights;
        spike detections lie within 3" of the parent's spike line there: 2.0" and
        0.25"/mag give 3.5" for a J 4 parent).
    spike_inner_arcsec
        Spikes start this far from the parent (4"); closer in is the core (halo rule).
    spike_ref_arcsec, spike_dmag_ref, spike_dmag_per_dex
        Expected magnitude difference between a detection made by a spike at radius r
        and its parent: ``spike_dmag_ref + spike_dmag_per_dex · log10(r / spike_ref)``.
        Unconfirmed in 2MASS; decision: surface brightness falling as r^-1.5 along the
        spike (3.75 mag/dex), 10.2 mag at 40" (measured on tiny nights: spike detections
        of J 3.5–4.4 parents at 18–116" lie at 10.4 ± 0.5 mag at 40"; parents less than
        3 mag above the limit put their light into 4 rather than 6 components, 0.44 mag
        brighter each).
    spike_split_below_limit_mag, spike_unsplit_dmag
        Very bright parents split each spike near 90° and 270° into two components (facts
        sheet 6), six in all, which ``spike_dmag_ref`` was measured on. A parent less than
        ``spike_split_below_limit_mag`` brighter than the band's spike limit (decision,
        unconfirmed in 2MASS: 3 mag) puts the same light into four spikes, each brighter
        by ``spike_unsplit_dmag`` = 2.5 log10(6/4) = 0.44 mag; without it, a J 14.2 spike
        detection 6.8" from a J 8.06 parent passed for a real source on a ci night.
    spike_margin_mag
        A detection up to this much brighter than the expected spike is still the spike
        (1.0 mag: twice the measured scatter of spike detections about the model). The
        expected spike includes the parent's wing light in the 4" aperture at that radius
        (the halo model, ``halo_fwhm_arcsec``, ``halo_beta``), which dominates within ~10".
    persistence_limit
        Band → parents at least this bright saturate the array and leave latent images
        (the R2−R1 saturation levels, J 9.0, H 8.5, Ks 8.0; facts sheet 11). rd_flg 1 and
        3 sources are saturated whatever their magnitude.
    persistence_dmag, persistence_decay_mag
        Expected magnitude difference between a parent and its first ghost (k = 1), and
        the fading per further frame. Unconfirmed; decisions from the ci preset's
        detections at predicted ghost places that no truth source explains (nine nights,
        ~250 per band, parents J 5.5–8.9, H 4.8–7.7, Ks 4.7–7.0): 7.6 mag (medians of the
        first ghost J 7.61, H 7.21, Ks 7.23; range 6.5–8.1) and 0.28 mag per frame (from
        the first ghost to the ninth–eleventh: J 0.27, H 0.30, Ks 0.35; a 6 s release time
        constant at 1.45 s per frame alone gives 0.26). The earlier 8.0 and 0.35, from
        the tiny nights, left the ninth ghost of a J 5.8 parent (9.6 mag below it) out
        of the predicted range, a false J 15.4 source on ci seed 7.
    persistence_margin_mag
        A detection up to this much brighter than the expected ghost is still the ghost
        (1.5 mag).
    persistence_radius_arcsec
        Match radius around a predicted ghost position (5": the ghost's own centroid
        plus the parent's, up to ~3.5" for R1-saturated cores).
    stripe_limit
        Band → parents at least this bright make electronic stripes. Extent unconfirmed;
        decision: the facts sheet's "stars with K < 7 cause ... stripes", with J and H
        1.0 and 0.5 mag fainter (the colour offsets of its R1-saturation levels):
        J 8.0, H 7.5, Ks 7.0.
    stripe_halfwidth_px
        Half-width of a stripe in array rows (2.0 px: the parent row ±1 and the
        detection's centroid).
    stripe_dmag, stripe_min_psfchi
        A detection on a stripe is the stripe only when it is at least ``stripe_dmag``
        fainter than the parent (9.0 mag: a 2e-5 F row offset over a 4" aperture's
        ~12 pixels), its PSF fit is poor (reduced chi-square >= 3: a row offset is not
        point-like; isolated real stars measure ~1) and it is detected in this band only
        (decision: each band's array has its own readout electronics, so a stripe's
        spurious detections have no counterpart in the other bands, while a real star on
        a stripe — whose profile the row offset also spoils — is seen in all three).
    halo_limit
        Band → parents at least this bright have halos that bias their neighbours
        ("K < 7 cause halos", facts sheet 6; J 8.0, H 7.5 as for stripes).
    halo_fwhm_arcsec, halo_beta
        Nominal profile of the halo: a Moffat of this FWHM (3.0": typical 2MASS seeing
        as sampled, above the 2.4–2.5" floor) and β (2.5, the PSF model's).
    halo_aperture_arcsec
        Aperture in which the halo's light is compared (4", the standard aperture).
    halo_zone_sigma
        The halo radius is where the halo's aperture light falls to this fraction of the
        aperture flux of an SNR-5 source (0.2: one sigma of the aperture noise).
    halo_margin_mag
        A detection up to this much brighter than the halo's aperture light at its
        radius is a piece of the halo (1.0 mag).
    zone_margin_mag
        Spikes and ghosts are searched out to where their expected brightness is this
        much fainter than the scan's SNR-5 magnitude (0.0: beyond, the artifact cannot
        make a detection and adds less than the faintest detections' noise).
    r1_saturation_mag, r2_saturation_mag
        Magnitudes assumed for parents with rd_flg 3 (or 9: saturated, unmeasured) or 1
        whose band magnitude is null
        (R1: J 4.5, H 4.0, Ks 3.5; R2−R1: J 9.0, H 8.5, Ks 8.0; facts sheet 11).
    snr5_mag
        Band → SNR-5 magnitude used when the table has fewer than 10 PSF-fit detections
        with 5 <= SNR <= 20 to measure it (the 2MASS 10σ limits J 15.8, H 15.1, Ks 14.3
        plus 0.75 mag).
    """

    spike_limit: dict = field(default_factory=lambda: {"J": 10.0, "H": 9.5, "K": 9.0})
    spike_pa_deg: dict = field(default_factory=lambda: {
        "J": (0.0, 89.05, 91.48, 180.0, 269.47, 271.63),
        "H": (0.0, 89.12, 91.46, 180.0, 269.49, 271.60),
        "K": (0.0, 89.10, 91.49, 180.0, 269.48, 271.62)})
    spike_tolerance_deg: float = 0.3
    spike_width_arcsec: float = 2.0
    spike_width_per_mag: float = 0.25
    spike_inner_arcsec: float = 4.0
    spike_ref_arcsec: float = 40.0
    spike_dmag_ref: float = 10.2
    spike_dmag_per_dex: float = 3.75
    spike_margin_mag: float = 1.0
    spike_split_below_limit_mag: float = 3.0
    spike_unsplit_dmag: float = 0.44
    persistence_limit: dict = field(default_factory=lambda: {"J": 9.0, "H": 8.5, "K": 8.0})
    persistence_dmag: float = 7.6
    persistence_decay_mag: float = 0.28
    persistence_margin_mag: float = 1.5
    persistence_radius_arcsec: float = 5.0
    stripe_limit: dict = field(default_factory=lambda: {"J": 8.0, "H": 7.5, "K": 7.0})
    stripe_halfwidth_px: float = 2.0
    stripe_dmag: float = 9.0
    stripe_min_psfchi: float = 3.0
    halo_limit: dict = field(default_factory=lambda: {"J": 8.0, "H": 7.5, "K": 7.0})
    halo_fwhm_arcsec: float = 3.0
    halo_beta: float = 2.5
    halo_aperture_arcsec: float = 4.0
    halo_zone_sigma: float = 0.2
    halo_margin_mag: float = 1.0
    zone_margin_mag: float = 0.0
    r1_saturation_mag: dict = field(default_factory=lambda: {"J": 4.5, "H": 4.0, "K": 3.5})
    r2_saturation_mag: dict = field(default_factory=lambda: {"J": 9.0, "H": 8.5, "K": 8.0})
    snr5_mag: dict = field(default_factory=lambda: {"J": 16.55, "H": 15.85, "K": 15.05})

    def __post_init__(self):
        for name in ("spike_limit", "persistence_limit", "stripe_limit", "halo_limit",
                     "r1_saturation_mag", "r2_saturation_mag", "snr5_mag", "spike_pa_deg"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or set(value) != set(flags.BANDS):
                raise ConfigError(f"artifacts.{name} needs exactly the bands {flags.BANDS}")
        for band, pas in self.spike_pa_deg.items():
            if len(pas) == 0 or not all(np.isfinite(pas)):
                raise ConfigError(f"artifacts.spike_pa_deg[{band}] must be finite angles")
        positive = ("spike_width_arcsec", "spike_ref_arcsec", "spike_dmag_per_dex",
                    "persistence_radius_arcsec", "stripe_halfwidth_px", "halo_fwhm_arcsec",
                    "halo_aperture_arcsec", "halo_zone_sigma")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"artifacts.{name} must be > 0, got {getattr(self, name)}")
        non_negative = ("spike_tolerance_deg", "spike_width_per_mag", "spike_inner_arcsec",
                        "spike_margin_mag", "spike_split_below_limit_mag", "spike_unsplit_dmag",
                        "persistence_decay_mag", "persistence_margin_mag",
                        "stripe_min_psfchi", "halo_margin_mag")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"artifacts.{name} must be >= 0, got {getattr(self, name)}")
        if not self.spike_tolerance_deg < 10:
            raise ConfigError("artifacts.spike_tolerance_deg must be < 10")
        if not self.halo_beta > 1:
            raise ConfigError("artifacts.halo_beta must be > 1 (finite flux)")


# -- the band's detections --------------------------------------------------------------------


def _float(col):
    return np.asarray(np.ma.filled(np.ma.asarray(col).astype(float), np.nan), float)


def _band_digits(strings, i: int) -> np.ndarray:
    s = np.asarray(strings).astype("<U3")
    out = np.full(s.shape, "0", "<U1")
    ok = np.char.str_len(s) == 3
    out[ok] = np.array([v[i] for v in s[ok]], dtype="<U1")
    return out


@dataclass(frozen=True)
class _Band:
    det: np.ndarray  # bool (n,): detected in the band with a position
    ra: np.ndarray
    dec: np.ndarray
    m: np.ndarray  # NaN: unknown
    rd: np.ndarray  # <U1 digit
    psfchi: np.ndarray
    snr: np.ndarray
    nbands: np.ndarray  # int (n,): bands in which the row is detected (rd_flg 1-4, 6, 9)


def _band_data(pts: Table, band: str, geometry: FrameGeometry) -> _Band:
    p = band.lower()
    i = flags.BANDS.index(band)
    n = len(pts)
    rd = _band_digits(pts["rd_flg"], i)
    x, y = _float(pts[f"{p}_x"]), _float(pts[f"{p}_y"])
    det = np.isfinite(x) & np.isfinite(y) & np.isin(rd, list("123469"))
    ra, dec = np.full(n, np.nan), np.full(n, np.nan)
    if det.any():
        ra[det], dec[det] = geometry.pixel_to_sky(0, x[det], y[det])
    m = _float(pts[f"{p}_m"])
    m[~det] = np.nan
    psfchi = _float(pts[f"{p}_psfchi"]) if f"{p}_psfchi" in pts.colnames else np.full(n, np.nan)
    snr = _float(pts[f"{p}_snr"])
    nbands = sum(np.isin(_band_digits(pts["rd_flg"], k), list("123469")).astype(int)
                 for k in range(len(flags.BANDS)))
    return _Band(det, ra, dec, m, rd, psfchi, snr, np.asarray(nbands))


def _snr5_mag(b: _Band, default: float) -> float:
    """The scan's SNR-5 magnitude from its sky-limited PSF-fit detections."""
    with np.errstate(invalid="ignore"):
        sel = b.det & (b.rd == "2") & np.isfinite(b.m) & (b.snr >= 5) & (b.snr <= 20)
    if sel.sum() < 10:
        return default
    return float(np.median(b.m[sel] + 2.5 * np.log10(b.snr[sel] / 5.0)))


def _unit(ra, dec):
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    return np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])


def _chord(arcsec):
    return 2 * np.sin(np.asarray(arcsec, float) * _ARCSEC_RAD / 2)


# -- one band ---------------------------------------------------------------------------------


class _Flags:
    """Per-row bits and, per bit, the first (brightest) parent that set it."""

    def __init__(self, n):
        self.bits = np.zeros(n, np.int32)
        self.parent = {bit: np.full(n, -1, np.int64) for bit in ARTIFACT_BITS.bits}

    def set(self, rows, bit, parent):
        rows = np.asarray(rows, np.int64)
        if rows.size == 0:
            return
        self.bits[rows] |= bit
        first = self.parent[bit][rows] < 0
        self.parent[bit][rows[first]] = parent


def _mark(fl: _Flags, b: _Band, rows, zone_bit, spurious_bit, dmag, threshold, parent, extra=None):
    """Zone bit on ``rows``; the spurious bit where the detection is at least ``threshold``
    fainter than the parent (``extra``: a further condition), unmeasured where unknown."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return
    fl.set(rows, zone_bit, parent)
    known = np.isfinite(dmag)
    fl.set(rows[~known], ART_UNMEASURED, parent)
    with np.errstate(invalid="ignore"):
        spur = known & (dmag >= threshold)
    if extra is not None:
        spur &= extra
    fl.set(rows[spur], spurious_bit, parent)


def _halo_dmag(r, cfg: ArtifactConfig):
    """Magnitude difference between a parent and its Moffat halo's light in the standard
    aperture at radius ``r`` (arcsec)."""
    beta = cfg.halo_beta
    alpha = cfg.halo_fwhm_arcsec / (2 * np.sqrt(2 ** (1 / beta) - 1))
    frac = ((beta - 1) / (np.pi * alpha**2) * (1 + (np.asarray(r, float) / alpha) ** 2) ** (-beta)
            * np.pi * cfg.halo_aperture_arcsec**2)
    return -2.5 * np.log10(np.minimum(frac, 1.0))


def _halo_radius(dmag_max, cfg: ArtifactConfig) -> float:
    """Radius (arcsec) where :func:`_halo_dmag` reaches ``dmag_max``."""
    beta = cfg.halo_beta
    alpha = cfg.halo_fwhm_arcsec / (2 * np.sqrt(2 ** (1 / beta) - 1))
    frac = 10 ** (-0.4 * dmag_max)
    q = frac / ((beta - 1) / (np.pi * alpha**2) * np.pi * cfg.halo_aperture_arcsec**2)
    if q >= 1:
        return 0.0
    return float(alpha * np.sqrt(q ** (-1 / beta) - 1))


def _spike_spans(pas, gap_deg=5.0):
    """Spike PAs grouped into spans: components closer than ``gap_deg`` (a split spike)
    form one span [lo, hi] (deg), covering the unsplit spike between them too."""
    pas = np.sort(np.asarray(pas, float) % 360)
    spans = [[pas[0], pas[0]]]
    for pa in pas[1:]:
        if pa - spans[-1][1] < gap_deg:
            spans[-1][1] = pa
        else:
            spans.append([pa, pa])
    if len(spans) > 1 and spans[0][0] + 360 - spans[-1][1] < gap_deg:
        spans[0][0] = spans.pop()[0] - 360
    return [(float(lo), float(hi)) for lo, hi in spans]


def _spike_dmag(r, m_p, band, cfg: ArtifactConfig):
    """Expected magnitude difference between a parent of magnitude ``m_p`` and a detection
    its spike makes at radius ``r`` (arcsec): the spike's light (four components, each
    brighter, for parents near the spike limit) plus the parent's wing light in the
    4" aperture there (the halo model): close in, the spike sits on the wing and a
    detection measures both (6-7" from J 8.0-8.5 parents the wing is 4 mag below the
    parent, the spike 7)."""
    rr = np.maximum(np.asarray(r, float), 1e-3)
    spike = cfg.spike_dmag_ref + cfg.spike_dmag_per_dex * np.log10(rr / cfg.spike_ref_arcsec)
    if m_p > cfg.spike_limit[band] - cfg.spike_split_below_limit_mag:
        spike = spike - cfg.spike_unsplit_dmag  # four spikes, not six: each brighter
    return -2.5 * np.log10(10 ** (-0.4 * spike) + 10 ** (-0.4 * _halo_dmag(rr, cfg)))


def _spikes(fl, b, i, m_p, cand, xi, eta, r, limit_faint, band, cfg):
    if not m_p <= cfg.spike_limit[band]:
        return
    # Out to where the expected spike (on the wing) reaches the faint limit.
    grid = np.geomspace(cfg.spike_inner_arcsec, 2000.0, 400)
    inside = grid[_spike_dmag(grid, m_p, band, cfg) <= limit_faint - m_p]
    if inside.size == 0:
        return
    r_max = float(inside.max())
    width = cfg.spike_width_arcsec + cfg.spike_width_per_mag * (cfg.spike_limit[band] - m_p)
    tol = np.tan(np.deg2rad(cfg.spike_tolerance_deg))
    theta = np.rad2deg(np.arctan2(xi, eta)) % 360  # PA of each candidate, east of north
    on = np.zeros(cand.size, bool)
    for lo, hi in _spike_spans(cfg.spike_pa_deg[band]):
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        off = np.abs((theta - mid + 180) % 360 - 180)
        delta = np.deg2rad(np.maximum(off - half, 0.0))  # angle outside the span
        along, perp = r * np.cos(delta), r * np.sin(delta)
        on |= (along >= cfg.spike_inner_arcsec) & (along <= r_max) & (perp <= width + along * tol)
    if not on.any():
        return
    _mark(fl, b, cand[on], ART_SPIKE, ART_SPIKE_SPURIOUS, b.m[cand[on]] - m_p,
          _spike_dmag(r[on], m_p, band, cfg) - cfg.spike_margin_mag, i)


def _halo(fl, b, i, m_p, cand, r, limit_snr5, band, cfg):
    if not m_p <= cfg.halo_limit[band]:
        return
    r_halo = _halo_radius(limit_snr5 - m_p - 2.5 * np.log10(cfg.halo_zone_sigma), cfg)
    on = r <= r_halo
    if not on.any():
        return
    _mark(fl, b, cand[on], ART_HALO, ART_HALO_SPURIOUS, b.m[cand[on]] - m_p,
          _halo_dmag(r[on], cfg) - cfg.halo_margin_mag, i)


def persistence_ghosts(ra: float, dec: float, geometry: FrameGeometry, kmax: int) -> Table:
    """Where a star's latent images fall on the sky.

    For every frame ``f`` in which the star at (``ra``, ``dec``) (deg) lies on the array,
    at pixel ``(x_f, y_f)``, the latent image released in frame ``f + k`` (``1 <= k <=
    kmax``, within the scan) is at ``geometry.pixel_to_sky(f + k, x_f, y_f)``.

    Returns
    -------
    Table: ``frame`` (the frame showing the ghost), ``trap_frame`` (``f``), ``k``, ``x``,
    ``y`` (the detector pixel), ``ra``, ``dec`` (deg). Empty when the star is never on the
    array or ``kmax < 1``.
    """
    out = {"frame": [], "trap_frame": [], "k": [], "x": [], "y": []}
    n = geometry.nframes
    nx, ny = geometry.band.nx, geometry.band.ny
    x, y = geometry.sky_to_pixel(np.arange(n), ra, dec)
    on = (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    for f in np.flatnonzero(on):
        k = np.arange(1, min(int(kmax), n - 1 - f) + 1)
        out["frame"].append(f + k)
        out["trap_frame"].append(np.full(k.size, f))
        out["k"].append(k)
        out["x"].append(np.full(k.size, x[f]))
        out["y"].append(np.full(k.size, y[f]))
    t = Table({name: (np.concatenate(v) if v else np.zeros(0, float if name in "xy" else np.int64))
               for name, v in out.items()})
    gra, gdec = geometry.pixel_to_sky(np.asarray(t["frame"], np.int64), np.asarray(t["x"], float),
                                      np.asarray(t["y"], float))
    t["ra"], t["dec"] = np.atleast_1d(gra).astype(float), np.atleast_1d(gdec).astype(float)
    return t


def _persistence(fl, b, tree, det_rows, i, m_p, geo: FrameGeometry, limit_faint, cfg):
    kmax = int(np.floor((limit_faint - m_p - cfg.persistence_dmag)
                        / max(cfg.persistence_decay_mag, 1e-6))) + 1
    kmax = min(kmax, geo.nframes - 1)
    if kmax < 1:
        return
    ghosts = persistence_ghosts(b.ra[i], b.dec[i], geo, kmax)
    if len(ghosts) == 0:
        return
    g_k = np.asarray(ghosts["k"])
    hits = tree.query_ball_point(_unit(np.asarray(ghosts["ra"]), np.asarray(ghosts["dec"])),
                                 _chord(cfg.persistence_radius_arcsec))
    kmin = {}
    for k, h in zip(g_k, hits, strict=True):
        for j in h:
            row = int(det_rows[j])
            if row != i:
                kmin[row] = min(kmin.get(row, k), k)
    if not kmin:
        return
    rows = np.fromiter(kmin, np.int64)
    ks = np.fromiter(kmin.values(), float)
    expected = cfg.persistence_dmag + cfg.persistence_decay_mag * (ks - 1)
    _mark(fl, b, rows, ART_PERSISTENCE, ART_PERSISTENCE_SPURIOUS, b.m[rows] - m_p,
          expected - cfg.persistence_margin_mag, i)


def _stripes(fl, b, i, m_p, geo: FrameGeometry, band, cfg):
    if not m_p <= cfg.stripe_limit[band]:
        return
    nx, ny = geo.band.nx, geo.band.ny
    frames = np.arange(geo.nframes)
    x, y = geo.sky_to_pixel(frames, b.ra[i], b.dec[i])
    on = (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    others = np.flatnonzero(b.det)
    others = others[others != i]
    hit = np.zeros(others.size, bool)
    for f in np.flatnonzero(on):
        # Only detections near the frame's rows: a cheap cut on declination first.
        near = np.abs(b.dec[others] - geo.dec[f]) < 0.2
        if not near.any():
            continue
        cx, cy = geo.sky_to_pixel(f, b.ra[others[near]], b.dec[others[near]])
        hit[near] |= ((cx >= -0.5) & (cx <= nx - 0.5) & (np.abs(cy - y[f]) <= cfg.stripe_halfwidth_px))
    rows = others[hit]
    with np.errstate(invalid="ignore"):
        stripe_like = (b.psfchi[rows] >= cfg.stripe_min_psfchi) & (b.nbands[rows] == 1)
    _mark(fl, b, rows, ART_STRIPE, ART_STRIPE_SPURIOUS, b.m[rows] - m_p, cfg.stripe_dmag, i,
          extra=stripe_like)


def _band_artifacts(b: _Band, geo: FrameGeometry, band: str, cfg: ArtifactConfig) -> _Flags:
    n = b.det.size
    fl = _Flags(n)
    det_rows = np.flatnonzero(b.det)
    if det_rows.size == 0:
        return fl
    snr5 = _snr5_mag(b, cfg.snr5_mag[band])
    faint = snr5 + cfg.zone_margin_mag
    # Parent magnitudes: measured, or the saturation level of the regime when null.
    m_par = b.m.copy()
    # rd_flg 9 here means saturated in R2−R1 with no usable R1 or profile measurement (the
    # regime choice of gpu2mass.catalog): a parent as bright as an R1-saturated star.
    fill = np.where(np.isin(b.rd, ("3", "9")), cfg.r1_saturation_mag[band],
                    np.where(b.rd == "1", cfg.r2_saturation_mag[band], np.nan))
    m_par = np.where(np.isfinite(m_par), m_par, fill)
    loosest = max(cfg.spike_limit[band], cfg.persistence_limit[band], cfg.stripe_limit[band],
                  cfg.halo_limit[band])
    with np.errstate(invalid="ignore"):
        is_parent = b.det & ((m_par <= loosest) | np.isin(b.rd, ("1", "3", "9")))
        # rd_flg 1/3/9 sources are saturated: parents of persistence whatever their magnitude.
        saturated = np.isin(b.rd, ("1", "3", "9"))
    parents = np.flatnonzero(is_parent & np.isfinite(m_par))
    parents = parents[np.argsort(m_par[parents], kind="stable")]
    fl.set(parents, ART_PARENT, -1)
    tree = cKDTree(_unit(b.ra[det_rows], b.dec[det_rows]))
    for i in parents:
        m_p = float(m_par[i])
        # Everything a spike or the halo can reach.
        r_spike = cfg.spike_ref_arcsec * 10 ** ((faint - m_p - cfg.spike_dmag_ref) / cfg.spike_dmag_per_dex)
        r_halo = _halo_radius(snr5 - m_p - 2.5 * np.log10(cfg.halo_zone_sigma), cfg)
        reach = max(r_spike, r_halo) + cfg.spike_width_arcsec
        cand = det_rows[tree.query_ball_point(_unit(b.ra[i], b.dec[i])[0], _chord(reach))]
        cand = cand[cand != i]
        if cand.size:
            xi, eta = tan_project(b.ra[cand], b.dec[cand], b.ra[i], b.dec[i])
            r = np.hypot(xi, eta)
            _spikes(fl, b, i, m_p, cand, xi, eta, r, faint, band, cfg)
            _halo(fl, b, i, m_p, cand, r, snr5, band, cfg)
        if m_p <= cfg.persistence_limit[band] or saturated[i]:
            _persistence(fl, b, tree, det_rows, i, m_p, geo, faint, cfg)
        _stripes(fl, b, i, m_p, geo, band, cfg)
    return fl


# -- letters ----------------------------------------------------------------------------------

#: Letter order (flags.CC_PRIORITY) → (zone bit, spurious bit).
_LETTER_BITS = {
    flags.CC_PERSISTENCE: (ART_PERSISTENCE, ART_PERSISTENCE_SPURIOUS),
    flags.CC_CONFUSION: (ART_HALO, ART_HALO_SPURIOUS),
    flags.CC_DIFFRACTION: (ART_SPIKE, ART_SPIKE_SPURIOUS),
    flags.CC_STRIPE: (ART_STRIPE, ART_STRIPE_SPURIOUS),
}


def _letters(fl: _Flags, det: np.ndarray, previous: np.ndarray):
    """Per-band letter and parent: an upper-case letter when any artifact explains the
    detection (first in CC_PRIORITY order), else the first lower-case zone letter, else
    a previous 'b', else '0'."""
    n = det.size
    letter = np.where(det & (previous == flags.CC_BANDMERGE), flags.CC_BANDMERGE, flags.CC_NONE)
    letter = letter.astype("<U1")
    parent = np.full(n, -1, np.int64)
    done = ~det
    for upper in (True, False):
        for code, (zone, spur) in _LETTER_BITS.items():
            bit = spur if upper else zone
            sel = ~done & ((fl.bits & bit) != 0)
            letter[sel] = code.upper() if upper else code
            parent[sel] = fl.parent[bit][sel]
            done |= sel
    return letter, parent


def run_artifacts(pts: Table, *, geometries: Mapping[str, FrameGeometry],
                  saturated: Mapping[str, np.ndarray] | None = None,
                  config: ArtifactConfig = ArtifactConfig()) -> Table:
    """Bright-star artifact flags of one scan's point sources (see the module docstring).

    Parameters
    ----------
    pts
        The scan's point-source rows (``scans/<scan>/pts.parquet`` of ``gpu2mass night``):
        ``rd_flg``, ``cc_flg`` (3 characters, J H Ks), per band ``[jhk]_m`` (mag, null or
        NaN when absent), ``[jhk]_snr``, ``[jhk]_psfchi`` (optional), ``[jhk]_x``,
        ``[jhk]_y`` (pixels in the band's first frame; null when the band has no
        detection). Masked columns and NaN are both read as "absent".
    geometries
        Band → the scan's :class:`~gpu2mass.geometry.FrameGeometry` (frame 0 defines the
        ``[jhk]_x``/``[jhk]_y`` system). A band without one keeps its letters and gets
        no artifact flags.
    saturated
        Band → bool (n,): the row's detection is saturated in a covering R2−R1 frame. Given,
        only those ``rd_flg`` 9 rows are parents as bright as an R1-saturated star; the
        others (no frame held them inside the array's edge margin) are unmeasured
        detections like ``rd_flg`` 6. None: from the catalog columns, ``rd_flg`` 9 rows
        within ``EDGE_UNMEASURED_ARCSEC`` of the scan's edges (``dist_edge_ew``,
        ``dist_edge_ns``, where they exist) are the edges', the others saturated.
    config
        :class:`ArtifactConfig`.

    Returns
    -------
    Table with the rows of ``pts`` in order: ``cc_flg`` (``<U3``; per band an upper-case
    letter P/C/D/S for a detection that is the artifact itself, lower case p/c/d/s for
    one the artifact may contaminate, a previous ``b`` kept otherwise, ``0`` for none or
    no detection), ``j_art``, ``h_art``, ``k_art`` (int32 bits, :data:`ARTIFACT_BITS`),
    ``j_parent``, ``h_parent``, ``k_parent`` (int64 row index of the parent behind the
    band's letter, -1 for none).

    Raises :class:`~gpu2mass.errors.InputError` when a needed column is missing.
    """
    cfg = config
    n = len(pts)
    need = ["rd_flg", "cc_flg"] + [f"{b.lower()}_{c}" for b in flags.BANDS for c in ("m", "snr", "x", "y")]
    missing = [c for c in need if c not in pts.colnames]
    if missing:
        raise InputError(None, f"point-source table lacks columns {missing}")
    previous = np.asarray(pts["cc_flg"]).astype("<U3") if n else np.zeros(0, "<U3")
    out = Table()
    per_band_letter = []
    for k, band in enumerate(flags.BANDS):
        p = band.lower()
        prev = _band_digits(previous, k)
        geo = geometries.get(band)
        if geo is None or n == 0:
            per_band_letter.append(prev)
            out[f"{p}_art"] = np.zeros(n, np.int32)
            out[f"{p}_parent"] = np.full(n, -1, np.int64)
            continue
        b = _band_data(pts, band, geo)
        if saturated is not None and band in saturated:
            sat = np.asarray(saturated[band], bool)
        elif saturated is None and {"dist_edge_ew", "dist_edge_ns"} <= set(pts.colnames):
            edge = np.fmin(_float(pts["dist_edge_ew"]), _float(pts["dist_edge_ns"]))
            sat = ~(edge <= EDGE_UNMEASURED_ARCSEC)
        else:
            sat = np.ones(n, bool)
        b = replace(b, rd=np.where((b.rd == "9") & ~sat, "6", b.rd))
        fl = _band_artifacts(b, geo, band, cfg)
        letter, parent = _letters(fl, b.det, prev)
        per_band_letter.append(letter)
        out[f"{p}_art"] = fl.bits
        out[f"{p}_parent"] = parent
    out["cc_flg"] = flags.join_bands(*per_band_letter).astype("<U3")
    return out[["cc_flg", "j_art", "h_art", "k_art", "j_parent", "h_parent", "k_parent"]]
