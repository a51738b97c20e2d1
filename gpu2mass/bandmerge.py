"""Band merging of J, H, Ks detections and band-fill upper limits (2MAPPS IV.4e, facts 3.7).

Two public functions, host NumPy/SciPy (the lists are small; this step runs after the
source lists have come back from the device):

- :func:`run_bandmerge`: associate each band's detections of a scan into sources;
- :func:`band_fill_upper_limits`: 95 %-confidence upper-limit magnitudes measured on an
  Atlas Image at the positions of sources not detected in that band.

Band merging
------------
Coordinates are the scan's "U-scan" frame (arcsec): ``x_scan`` cross-scan, ``y_scan``
in-scan offsets from the scan's reference point, computed by the caller from registration
(pixel-based, independent of the sky mapping, as in 2MASS). Each detection carries its
position error covariance ``[[sig_x², sig_xy], [sig_xy, sig_y²]]``: ``sig_x``, ``sig_y`` are
1-sigma errors (arcsec) along x_scan and y_scan and ``sig_xy`` is the covariance (arcsec²,
``rho * sig_x * sig_y``), so unequal and correlated in-scan/cross-scan errors are allowed.

The decision uses positions only (no brightness or colour). For a detection a and a
candidate b the separation d = p_a − p_b is tested against ``C = C_a + C_b + (s_a² + s_b²) I``
(s: :attr:`BandMergeConfig.sys_sigma_arcsec`, the band-to-band systematic left by
registration): ``chi² = dᵀ C⁻¹ d``, and its probability under the null hypothesis "same
source" is the 2-degree-of-freedom tail ``P = exp(−chi²/2)``. The pair is acceptable when
``P > p_min(ρ)``, where ρ is the local surface density of the candidates' band (detections
per arcmin² within :attr:`~BandMergeConfig.density_radius_arcsec`, edge-corrected by the
area of that circle inside the detections' bounding box). The threshold (2MASS's values
are unconfirmed) is chosen here as::

    p_min(ρ) = min(p_max, p_floor + p_slope · ρ)

so that in sparse fields almost every true pair is kept (p_floor = 1e-5 rejects 0.001 %
of true pairs whose errors are as stated) while in crowded fields, where a chance neighbour inside a lenient
acceptance region becomes likely, the region shrinks. The defaults and what they give are
measured in ``tests/test_bandmerge.py`` on seeded synthetic fields from ~1 to ~27
detections per arcmin² per band (see the config docstring for the numbers).

Order (facts sheet 3.7): J seeds first — J–H, then J–Ks pair matching; then the H
detections left, H–J against J-seeded sources still lacking H (at their merged position:
the hierarchical second chance) and H–Ks against the Ks left; then the Ks left, against
every source lacking Ks (merged position); what remains becomes a one-band source. Within
each stage, the acceptable pairs are assigned greedily by decreasing P, so a detection
goes to the candidate that matches it best and no detection is used twice; a detection
whose acceptable partners all went to better matches gets
:data:`~gpu2mass.flags.BM_SPLIT_RISK`. A merged source's systematic term is the
SNR-weighted mean of its bands' ``sys_sigma_arcsec``.

Confusion (cc_flg ``b``): when a detection has two or more acceptable candidates whose
probabilities are comparable (the second ≥ :attr:`~BandMergeConfig.ambiguity_ratio` ×
the best), that detection and every such candidate are marked
:data:`~gpu2mass.flags.BM_CONFUSED` in their bands; the best one is still used.

Merged position: the SNR-weighted mean over the unconfused bands of the source (over all
its bands when every band is confused), with covariance ``Σ w_b² C_b`` (random errors only;
the systematic term is left to the astrometric step). ``sep_j_h``/``sep_j_k`` are the raw
band separations (arcsec).

Band-fill upper limits
----------------------
On an Atlas Image (1" pixels, DN): flux in a 4" radius aperture (pixels weighted by the
fraction of their area inside, 8 × 8 sub-sampling) at the source position, minus the sky,
the median of the pixels whose centres lie 14"–20" away (2MASS includes annulus pixels
by centre distance; the median is the robust estimator). Masked and NaN pixels are left
out; the flux is scaled by (aperture area / good area) when some aperture pixels are
missing, and is null when less than ``min_good_fraction`` of the area is good or the
annulus has fewer than ``min_sky_pixels`` good pixels.

Noise. The Atlas ``SIGMA`` map is the noise of one pixel; the resampling kernel correlates
neighbours, so the noise of a sum is larger than the quadrature sum of SIGMA by a factor
that grows with the area (``NCORFAC`` in the header is the value for a 14" aperture,
2.97; see :mod:`gpu2mass.atlas`). :func:`atlas_noise_factor` computes that factor for any
aperture shape from the Atlas kernel (bilinear, 2" frame pixels onto 1" pixels, averaged
over sub-pixel phases); the 4" aperture's factor is taken as
``ncorfac × atlas_noise_factor(4") / atlas_noise_factor(14")`` and the annulus's likewise,
so a header value measured on real images rescales both. The sky error is
``1.07 × f_annulus × rms(SIGMA_annulus) / √n_annulus`` per pixel and enters the aperture
sum times its area (1.07: the median's noise relative to the mean's on Atlas-like
correlated noise, measured; white noise would give √(π/2) = 1.2533).

Upper limit (95 % by default). With F the aperture flux and σ its error, the limit flux
is ``max(F, 0) + k σ`` with k the one-sided normal quantile of ``confidence`` (1.645).
Negative fluxes: 2MASS "specially encoded" them in the aperture-magnitude field; with no
sentinels allowed here (spec/products.md), a negative aperture flux gives the limit
``k σ`` (a negative measurement says no more than a zero one, so the limit is never
brighter than the noise allows), the measured magnitude ``m_ap`` is that of ``|F|`` and the
:data:`~gpu2mass.flags.BF_NEGATIVE` bit says the flux was negative. For a source of true
flux F_t > kσ the limit exceeds F_t with probability ``confidence`` (fainter ones: always).
Magnitudes are ``zp_mag − 2.5 log10(aperture_correction × flux)``; ``aperture_correction``
is the scan's 4"-to-total curve-of-growth factor, so the limit bounds the total flux.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from astropy.table import MaskedColumn, Table
from scipy.spatial import cKDTree
from scipy.special import ndtri

from gpu2mass.errors import ConfigError, InputError
from gpu2mass.flags import (
    BANDS,
    BM_CONFUSED,
    BM_HIERARCHICAL,
    BM_SPLIT_RISK,
    cc_flg,
)

__all__ = [
    "REQUIRED_COLUMNS",
    "BandMergeConfig",
    "BandMergeWarning",
    "atlas_noise_factor",
    "band_fill_upper_limits",
    "local_density",
    "match_threshold",
    "run_bandmerge",
]

#: Columns every band's detection table must have (arcsec, arcsec², dimensionless).
REQUIRED_COLUMNS = ("x_scan", "y_scan", "sig_x", "sig_y", "sig_xy", "snr")
#: Input columns not carried into the output (they are merged instead); ``snr`` is carried
#: (as ``[jhk]_snr``, a PSC column).
_NOT_CARRIED = ("x_scan", "y_scan", "sig_x", "sig_y", "sig_xy")


class BandMergeWarning(UserWarning):
    """Something a caller should know that does not stop the step (e.g. no detections)."""


@dataclass(frozen=True)
class BandMergeConfig:
    """Configuration of band merging (2MASS values are unconfirmed: decisions, measured).

    Attributes
    ----------
    sys_sigma_arcsec
        Band → 1-sigma systematic position error per axis, arcsec, added to each
        detection's covariance in the match test (J, H, Ks: 0.1"). Covers the
        band-to-band offsets registration leaves (0.1–0.2" between bands).
    p_floor, p_slope, p_max
        Acceptance threshold on the pair probability P = exp(−chi²/2):
        ``p_min(ρ) = min(p_max, p_floor + p_slope · ρ)``, ρ in candidates per arcmin².
        Defaults 1e-5, 4e-5 per (arcmin⁻²), 1e-2: 1e-5 (chi² < 23.0) at zero density,
        1.01e-3 (chi² < 13.8) at 25 per arcmin². Measured (tests/test_bandmerge.py, seeded
        synthetic fields with 2MASS-like errors, incompleteness, blends and 0.1–0.2"
        offsets), at J/H/Ks detection densities 2.3/2.0/1.3, 9.1/8.2/5.3 and 27.3/24.7/16.0
        per arcmin²: stars detected in all three bands merged whole 100 %, 99.96 %,
        99.91 %; false merges 0, 0 and 0.11 % (13 of 12,066 multi-band sources). The
        density term matters at the densest: over three fields there, 0.100 % false
        merges against 0.133 % with ``p_slope = 0``.
    density_radius_arcsec
        Radius of the circle over which the local density is counted (60").
    ambiguity_ratio
        A second acceptable candidate with P ≥ this × the best one's makes the match
        ambiguous (cc_flg ``b``) (0.1: Δchi² < 4.6 between the two).
    max_radius_arcsec
        No pair is considered beyond this separation (10"), whatever the errors.
    """

    sys_sigma_arcsec: dict = field(default_factory=lambda: {"J": 0.1, "H": 0.1, "K": 0.1})
    p_floor: float = 1e-5
    p_slope: float = 4e-5
    p_max: float = 1e-2
    density_radius_arcsec: float = 60.0
    ambiguity_ratio: float = 0.1
    max_radius_arcsec: float = 10.0

    def __post_init__(self):
        sys = self.sys_sigma_arcsec
        checks = (
            ("sys_sigma_arcsec", isinstance(sys, Mapping) and set(sys) == set(BANDS)
             and all(math.isfinite(v) and v >= 0 for v in sys.values()),
             "a table J, H, K of finite values >= 0"),
            ("p_floor", 0 < self.p_floor < 1, "in (0, 1)"),
            ("p_slope", self.p_slope >= 0 and math.isfinite(self.p_slope), ">= 0"),
            ("p_max", self.p_floor <= self.p_max < 1, "in [p_floor, 1)"),
            ("density_radius_arcsec", self.density_radius_arcsec > 0, "> 0"),
            ("ambiguity_ratio", 0 < self.ambiguity_ratio <= 1, "in (0, 1]"),
            ("max_radius_arcsec", self.max_radius_arcsec > 0, "> 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"bandmerge.{name} must be {rule}, not {getattr(self, name)!r}")


def match_threshold(density_per_arcmin2, config: BandMergeConfig = BandMergeConfig()):
    """``p_min(ρ)`` of the config for a local density ρ (per arcmin²; array or scalar)."""
    rho = np.asarray(density_per_arcmin2, float)
    return np.minimum(config.p_max, config.p_floor + config.p_slope * rho)


# -- geometry helpers --------------------------------------------------------------------------

_GL_T, _GL_W = np.polynomial.legendre.leggauss(64)


def _disc_in_box_area(x, y, r, box):
    """Area (arcsec²) of the disc of radius r at (x, y) inside box = (x0, x1, y0, y1)."""
    x0, x1, y0, y1 = box
    # Integrate the chord length inside [y0, y1] over t ∈ [−r, r] (Gauss–Legendre, 64).
    t = x[:, None] + r * _GL_T[None, :]
    h = r * np.sqrt(np.clip(1.0 - _GL_T**2, 0.0, None))[None, :]
    lo = np.maximum(y[:, None] - h, y0)
    hi = np.minimum(y[:, None] + h, y1)
    inside = (t >= x0) & (t <= x1)
    return r * np.sum(_GL_W * np.where(inside, np.clip(hi - lo, 0.0, None), 0.0), axis=1)


def local_density(at_xy, of_xy, radius_arcsec: float, box=None):
    """Surface density (per arcmin²) of the points ``of_xy`` around each of ``at_xy``.

    ``at_xy`` (n, 2) and ``of_xy`` (m, 2) arcsec. Counts within ``radius_arcsec`` divided by
    the area of the circle inside ``box`` = (x0, x1, y0, y1) (default: the bounding box of
    both sets), so positions near the edge of the covered area are not under-counted.
    """
    at_xy = np.asarray(at_xy, float).reshape(-1, 2)
    of_xy = np.asarray(of_xy, float).reshape(-1, 2)
    if at_xy.shape[0] == 0:
        return np.zeros(0)
    if of_xy.shape[0] == 0:
        return np.zeros(at_xy.shape[0])
    if box is None:
        both = np.vstack([at_xy, of_xy])
        box = (both[:, 0].min(), both[:, 0].max(), both[:, 1].min(), both[:, 1].max())
    counts = cKDTree(of_xy).query_ball_point(at_xy, radius_arcsec, return_length=True)
    area = _disc_in_box_area(at_xy[:, 0], at_xy[:, 1], radius_arcsec, box)
    area = np.maximum(area, 0.25 * math.pi * radius_arcsec**2)  # a corner: a quarter disc
    return counts / area * 3600.0


# -- the matching core -------------------------------------------------------------------------


@dataclass
class _Set:
    """Positions (n, 2), covariances (n, 2, 2) including the systematic term."""

    xy: np.ndarray
    cov: np.ndarray


def _chi2(d, cov):
    a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    det = a * c - b * b
    return (c * d[:, 0] ** 2 - 2 * b * d[:, 0] * d[:, 1] + a * d[:, 1] ** 2) / det


def _match(seeds: _Set, seed_ok, cands: _Set, cand_ok, density, cfg: BandMergeConfig):
    """One pair-matching stage.

    Returns ``(pairs, conf_seed, conf_cand, lost_seed, lost_cand)``: pairs (k, 3) rows
    (seed index, candidate index, P) assigned greedily by decreasing P; bool arrays marking
    confused seeds and candidates, and seeds and candidates whose acceptable partners all
    went elsewhere.
    """
    ns, nc = seeds.xy.shape[0], cands.xy.shape[0]
    conf_s, conf_c = np.zeros(ns, bool), np.zeros(nc, bool)
    lost, lost_c = np.zeros(ns, bool), np.zeros(nc, bool)
    si, ci = np.flatnonzero(seed_ok), np.flatnonzero(cand_ok)
    if si.size == 0 or ci.size == 0:
        return np.zeros((0, 3)), conf_s, conf_c, lost, lost_c
    # Search radius: the largest separation the lowest threshold could accept.
    lam = lambda cov: 0.5 * (cov[:, 0, 0] + cov[:, 1, 1]) + np.sqrt(
        0.25 * (cov[:, 0, 0] - cov[:, 1, 1]) ** 2 + cov[:, 0, 1] ** 2)
    chi2_max = -2.0 * math.log(cfg.p_floor)
    radius = np.minimum(np.sqrt(chi2_max * (lam(seeds.cov[si]) + lam(cands.cov[ci]).max())),
                        cfg.max_radius_arcsec)
    tree = cKDTree(cands.xy[ci])
    hits = tree.query_ball_point(seeds.xy[si], radius)
    lens = np.fromiter((len(h) for h in hits), int, si.size)
    if lens.sum() == 0:
        return np.zeros((0, 3)), conf_s, conf_c, lost, lost_c
    a = np.repeat(si, lens)
    b = ci[np.concatenate([np.asarray(h, int) for h in hits if h])]
    chi2 = _chi2(seeds.xy[a] - cands.xy[b], seeds.cov[a] + cands.cov[b])
    p = np.exp(-0.5 * chi2)
    ok = p > match_threshold(density[a], cfg)
    a, b, p = a[ok], b[ok], p[ok]
    if a.size == 0:
        return np.zeros((0, 3)), conf_s, conf_c, lost, lost_c
    # Ambiguity, seen from either side: candidates within ratio × the best P.
    for key, other, conf, conf_other, n in ((a, b, conf_s, conf_c, ns), (b, a, conf_c, conf_s, nc)):
        best = np.zeros(n)
        np.maximum.at(best, key, p)
        comparable = p >= cfg.ambiguity_ratio * best[key]
        count = np.bincount(key[comparable], minlength=n)
        amb = comparable & (count[key] >= 2)
        conf[key[amb]] = True
        conf_other[other[amb]] = True
    # Greedy assignment by decreasing P.
    order = np.argsort(-p, kind="stable")
    used_s, used_c = np.zeros(ns, bool), np.zeros(nc, bool)
    keep = []
    for k in order:
        if not used_s[a[k]] and not used_c[b[k]]:
            used_s[a[k]] = used_c[b[k]] = True
            keep.append(k)
    keep = np.asarray(keep, int)
    had, had_c = np.zeros(ns, bool), np.zeros(nc, bool)
    had[a] = True
    had_c[b] = True
    return (np.column_stack([a[keep], b[keep], p[keep]]), conf_s, conf_c, had & ~used_s,
            had_c & ~used_c)


# -- inputs ------------------------------------------------------------------------------------


def _band_inputs(detections: Mapping):
    """Validated per-band arrays: xy (n, 2), cov (n, 2, 2) without sys, snr (n,), table."""
    unknown = set(detections) - set(BANDS)
    if unknown:
        raise InputError(None, f"band merging takes bands {', '.join(BANDS)}; got {sorted(unknown)}")
    out = {}
    for b in BANDS:
        t = detections.get(b)
        if t is None:
            t = Table({c: np.zeros(0) for c in REQUIRED_COLUMNS})
        if not isinstance(t, Table):
            t = Table(t)
        missing = [c for c in REQUIRED_COLUMNS if c not in t.colnames]
        if missing:
            raise InputError(None, f"band {b} detections lack column(s) {', '.join(missing)}")
        arr = {c: np.ma.filled(np.asarray(t[c], float), np.nan) if np.ma.isMaskedArray(t[c])
               else np.asarray(t[c], float) for c in REQUIRED_COLUMNS}
        finite = np.all([np.isfinite(arr[c]) for c in REQUIRED_COLUMNS], axis=0)
        posdef = (arr["sig_x"] > 0) & (arr["sig_y"] > 0) & (
            arr["sig_xy"] ** 2 < arr["sig_x"] ** 2 * arr["sig_y"] ** 2)
        bad = ~(finite & posdef & (arr["snr"] > 0))
        if bad.any():
            raise InputError(None, f"band {b}: {int(bad.sum())} detection(s) with non-finite "
                             "position, errors or SNR, errors <= 0, |sig_xy| >= sig_x*sig_y or "
                             "snr <= 0 (first row {})".format(int(np.flatnonzero(bad)[0])))
        xy = np.column_stack([arr["x_scan"], arr["y_scan"]])
        cov = np.empty((len(t), 2, 2))
        cov[:, 0, 0] = arr["sig_x"] ** 2
        cov[:, 1, 1] = arr["sig_y"] ** 2
        cov[:, 0, 1] = cov[:, 1, 0] = arr["sig_xy"]
        out[b] = (xy, cov, arr["snr"], t)
    return out


def _with_sys(cov, s):
    c = cov.copy()
    c[:, 0, 0] += s * s
    c[:, 1, 1] += s * s
    return c


# -- the step ----------------------------------------------------------------------------------


def run_bandmerge(detections: Mapping[str, Table], *, config: BandMergeConfig = BandMergeConfig()) -> Table:
    """Merge one scan's J, H and Ks detections into sources (facts sheet 3.7).

    Parameters
    ----------
    detections
        Band (``"J"``, ``"H"``, ``"K"``; a missing band has no detections) → table with at
        least :data:`REQUIRED_COLUMNS`: ``x_scan``, ``y_scan`` (arcsec, U-scan frame),
        ``sig_x``, ``sig_y`` (1-sigma position errors along them, arcsec), ``sig_xy`` (their
        covariance, arcsec²) and ``snr``. Every other column (and ``snr``) is carried into
        the output as ``<b>_<name>`` (b = j, h, k), or unchanged if already so prefixed.
    config
        :class:`BandMergeConfig`.

    Returns
    -------
    astropy.table.Table
        One row per merged source, ordered by seed band then by row of the seed: ``j_idx``,
        ``h_idx``, ``k_idx`` (int64, row in that band's input, −1 if none); ``x_scan``,
        ``y_scan`` (arcsec, SNR-weighted mean over the unconfused bands) with ``sig_x``,
        ``sig_y``, ``sig_xy`` (its covariance, random part); ``sep_j_h``, ``sep_j_k``
        (arcsec, masked when a band is missing); ``[jhk]_bm_flags``
        (:data:`gpu2mass.flags.BANDMERGE_BITS`); ``cc_flg`` (3 characters: ``b`` where the
        band is bandmerge-confused, else ``0``; later steps add the artifact letters with
        :func:`gpu2mass.flags.cc_flg_band`); the carried columns, masked where the band is
        missing.

    Raises
    ------
    gpu2mass.errors.InputError
        An unknown band, a missing column, or a detection with non-finite or impossible
        position errors or SNR (the whole input is rejected: name and first row given).
    """
    cfg = config
    bands = _band_inputs(detections)
    n = {b: bands[b][0].shape[0] for b in BANDS}
    if sum(n.values()) == 0:
        warnings.warn("no detections in any band: empty band-merged table", BandMergeWarning,
                      stacklevel=2)
    xy = {b: bands[b][0] for b in BANDS}
    cov = {b: bands[b][1] for b in BANDS}
    snr = {b: bands[b][2] for b in BANDS}
    sys = {b: float(cfg.sys_sigma_arcsec[b]) for b in BANDS}
    dets = {b: _Set(xy[b], _with_sys(cov[b], sys[b])) for b in BANDS}
    allxy = np.vstack([xy[b] for b in BANDS]) if sum(n.values()) else np.zeros((0, 2))
    box = (tuple(np.r_[allxy[:, 0].min(), allxy[:, 0].max(), allxy[:, 1].min(), allxy[:, 1].max()])
           if allxy.shape[0] else None)

    def density(at, of):
        return local_density(at, of, cfg.density_radius_arcsec, box)

    # Source arrays, grown stage by stage.
    idx = {b: [] for b in BANDS}
    bm = {b: [] for b in BANDS}
    conf = {b: np.zeros(n[b], bool) for b in BANDS}  # per detection
    lost = {b: np.zeros(n[b], bool) for b in BANDS}
    taken = {b: np.zeros(n[b], bool) for b in BANDS}

    def add_sources(seed_band, rows):
        for b in BANDS:
            idx[b].append(rows.astype(np.int64) if b == seed_band
                          else np.full(rows.size, -1, np.int64))
            bm[b].append(np.zeros(rows.size, np.int64))
        taken[seed_band][rows] = True

    def cat(d):
        return {b: np.concatenate(d[b]) if d[b] else np.zeros(0, np.int64) for b in BANDS}

    def pair_stage(seed_band, cand_band, seed_rows_src):
        """Detections of seed_band (sources' rows, via idx) vs free cand_band detections."""
        src = cat(idx)
        s_rows = src[seed_band][seed_rows_src]
        seeds = _Set(dets[seed_band].xy[s_rows], dets[seed_band].cov[s_rows])
        free = ~taken[cand_band]
        rho = density(seeds.xy, xy[cand_band])
        pairs, cs, cc, ls, lc = _match(seeds, np.ones(s_rows.size, bool), dets[cand_band], free,
                                       rho, cfg)
        conf[seed_band][s_rows[cs]] = True
        conf[cand_band][cc] = True
        lost[seed_band][s_rows[ls]] = True
        lost[cand_band][lc] = True
        return pairs

    def assign(src_rows, band, det_rows, bits=0):
        off = 0
        for k, arr in enumerate(idx[band]):
            m = arr.size
            sel = (src_rows >= off) & (src_rows < off + m)
            arr[src_rows[sel] - off] = det_rows[sel]
            bm[band][k][src_rows[sel] - off] |= bits
            off += m
        taken[band][det_rows] = True

    def merged(src_rows):
        """Merged position and covariance (+ weighted systematic) of existing sources."""
        src = cat(idx)
        pos, c, w_sys = _merge_positions(src, src_rows, xy, cov, snr, conf, sys)
        return _Set(pos, _with_sys(c, w_sys))

    def hierarchical_stage(band, lacking_rows):
        """Free detections of ``band`` vs sources (rows) lacking it, at merged positions."""
        free = np.flatnonzero(~taken[band])
        if free.size == 0 or lacking_rows.size == 0:
            return
        targets = merged(lacking_rows)
        seeds = _Set(dets[band].xy[free], dets[band].cov[free])
        rho = density(seeds.xy, targets.xy)
        pairs, cs, ct, ls, _ = _match(seeds, np.ones(free.size, bool), targets,
                                   np.ones(lacking_rows.size, bool), rho, cfg)
        conf[band][free[cs]] = True
        lost[band][free[ls]] = True
        src = cat(idx)
        for b in BANDS:
            have = src[b][lacking_rows[ct]]
            conf[b][have[have >= 0]] = True
        if pairs.shape[0]:
            assign(lacking_rows[pairs[:, 1].astype(int)], band, free[pairs[:, 0].astype(int)],
                   BM_HIERARCHICAL)

    # Stage 1: J seeds; J–H then J–Ks.
    add_sources("J", np.arange(n["J"]))
    for cand in ("H", "K"):
        pairs = pair_stage("J", cand, np.arange(n["J"]))
        if pairs.shape[0]:
            assign(pairs[:, 0].astype(int), cand, pairs[:, 1].astype(int))
    # Stage 2: H seeds. H–J against J-seeded sources lacking H; then H–Ks among the rest.
    src = cat(idx)
    hierarchical_stage("H", np.flatnonzero(src["H"] < 0))
    start = sum(a.size for a in idx["J"])
    add_sources("H", np.flatnonzero(~taken["H"]))
    new = np.arange(start, start + idx["H"][-1].size)
    if new.size:
        pairs = pair_stage("H", "K", new)
        if pairs.shape[0]:
            assign(new[pairs[:, 0].astype(int)], "K", pairs[:, 1].astype(int))
    # Stage 3: Ks seeds against every source lacking Ks (Ks–J, Ks–H), then alone.
    src = cat(idx)
    hierarchical_stage("K", np.flatnonzero(src["K"] < 0))
    add_sources("K", np.flatnonzero(~taken["K"]))

    src = cat(idx)
    bmf = cat(bm)
    nsrc = src["J"].size
    for b in BANDS:
        bmf[b][_gather(conf[b], src[b], False)] |= BM_CONFUSED
        bmf[b][_gather(lost[b], src[b], False)] |= BM_SPLIT_RISK
    pos, pcov, _ = _merge_positions(src, np.arange(nsrc), xy, cov, snr, conf, sys)
    return _output_table(src, bmf, pos, pcov, xy, bands)


def _gather(values, rows, fill):
    """``values[rows]`` where ``rows >= 0``, else ``fill`` (works for empty ``values``)."""
    out = np.full(rows.shape + values.shape[1:], fill, dtype=values.dtype)
    have = rows >= 0
    if have.any():
        out[have] = values[rows[have]]
    return out


def _merge_positions(src, rows, xy, cov, snr, conf, sys):
    """SNR-weighted mean over unconfused bands (all if all confused) of sources ``rows``.

    Returns positions (m, 2), random covariances (m, 2, 2) and the weighted systematic
    sigma (m,)."""
    m = rows.size
    w = np.column_stack([_gather(snr[b], src[b][rows], 0.0) for b in BANDS]) if m else np.zeros((0, 3))
    confused = np.column_stack([_gather(conf[b], src[b][rows], False) for b in BANDS]) if m \
        else np.zeros((0, 3), bool)
    clean = w * ~confused
    use = np.where(clean.sum(1, keepdims=True) > 0, clean, w)
    wn = use / np.where(use.sum(1, keepdims=True) > 0, use.sum(1, keepdims=True), 1.0)
    pos = np.zeros((m, 2))
    c = np.zeros((m, 2, 2))
    w_sys = np.zeros(m)
    for k, b in enumerate(BANDS):
        r = src[b][rows]
        pos += wn[:, k, None] * _gather(xy[b], r, 0.0)
        c += wn[:, k, None, None] ** 2 * _gather(cov[b], r, 0.0)
        w_sys += wn[:, k] * sys[b]
    return pos, c, w_sys


def _output_table(src, bmf, pos, pcov, xy, bands) -> Table:
    out = Table()
    nsrc = src["J"].size
    for b in BANDS:
        out[f"{b.lower()}_idx"] = src[b].astype(np.int64)
    out["x_scan"] = pos[:, 0]
    out["y_scan"] = pos[:, 1]
    out["sig_x"] = np.sqrt(pcov[:, 0, 0])
    out["sig_y"] = np.sqrt(pcov[:, 1, 1])
    out["sig_xy"] = pcov[:, 0, 1]
    for col in ("x_scan", "y_scan", "sig_x", "sig_y"):
        out[col].unit = "arcsec"
    out["sig_xy"].unit = "arcsec2"
    for other in ("H", "K"):
        have = (src["J"] >= 0) & (src[other] >= 0)
        sep = np.full(nsrc, np.nan)
        if have.any():
            sep[have] = np.hypot(*(xy["J"][src["J"][have]] - xy[other][src[other][have]]).T)
        out[f"sep_j_{other.lower()}"] = MaskedColumn(sep, mask=~have, unit="arcsec")
    for b in BANDS:
        out[f"{b.lower()}_bm_flags"] = bmf[b].astype(np.int32)
    out["cc_flg"] = cc_flg({b: {"detected": src[b] >= 0,
                                "bandmerge": (bmf[b] & BM_CONFUSED) > 0} for b in BANDS})
    for b in BANDS:
        t = bands[b][3]
        have = src[b] >= 0
        rows = np.where(have, src[b], 0)
        pre = f"{b.lower()}_"
        for name in t.colnames:
            if name in _NOT_CARRIED:
                continue
            new = name if name.lower().startswith(pre) else pre + name
            if new in out.colnames:
                raise InputError(None, f"band {b} column {name!r} would overwrite output "
                                 f"column {new!r}")
            col = t[name]
            data = np.asarray(col)
            if len(t):
                vals = data[rows]
            else:
                vals = np.zeros((nsrc,) + data.shape[1:], data.dtype)
            mask = ~have
            cm = getattr(col, "mask", None)
            if cm is not None and len(t):
                cm = np.asarray(cm, bool)
                mask = mask | (cm[rows] if cm.ndim == 1 else cm[rows].reshape(nsrc, -1).any(1))
            if vals.ndim > 1:
                mask = np.broadcast_to(mask.reshape((nsrc,) + (1,) * (vals.ndim - 1)), vals.shape)
            out[new] = MaskedColumn(vals, mask=mask, unit=getattr(col, "unit", None),
                                    description=getattr(col, "description", None))
    return out


# -- band-fill upper limits ----------------------------------------------------------------------


def _tent_matrix(n_out, phase):
    """(n_out, n_frame) bilinear weights of frame pixels (2 output px wide) at output pixel
    centres p, for frame coordinate u = (p + phase) / 2 (phase in output pixels)."""
    u = (np.arange(n_out) + phase) / 2.0
    k = np.arange(math.floor(u.min()) - 1, math.ceil(u.max()) + 2)
    return np.clip(1.0 - np.abs(u[:, None] - k[None, :]), 0.0, None)


@functools.lru_cache(maxsize=64)
def _noise_factor_cached(weights_bytes, shape, phases):
    g = np.frombuffer(weights_bytes, float).reshape(shape)
    var = quad = 0.0
    for px in np.arange(phases) * 2.0 / phases:
        tx = _tent_matrix(shape[1], px)
        sx = (tx**2).sum(1)
        for py in np.arange(phases) * 2.0 / phases:
            ty = _tent_matrix(shape[0], py)
            sy = (ty**2).sum(1)
            w = ty.T @ g @ tx  # weight of each frame pixel in the aperture sum
            var += float((w**2).sum())
            quad += float((g**2 * sy[:, None] * sx[None, :]).sum())
    return math.sqrt(var / quad)


def atlas_noise_factor(weights, *, phases: int = 8) -> float:
    """Noise of a weighted sum over an Atlas Image / quadrature sum of weighted SIGMA.

    ``weights`` (ny, nx) on the 1" grid (e.g. aperture area fractions). The Atlas kernel
    (:mod:`gpu2mass.atlas`) interpolates 2" frame pixels bilinearly onto 1" pixels, so one
    frame pixel feeds a 4 × 4 block of output pixels; this computes, for that kernel, the
    ratio ``sqrt(Var(Σ g_p I_p) / Σ g_p² SIGMA_p²)`` averaged over ``phases``² sub-pixel
    phases of the frame grid (each frame of a coadd has its own phase; variances add). It
    reproduces :mod:`gpu2mass.atlas`'s measurements on resampled noise frames: 2.46 for a
    5 × 5 box, 2.97 for 25 × 25 (see ``tests/test_bandmerge.py``); the limit for large
    areas is 3.
    """
    g = np.ascontiguousarray(np.asarray(weights, float))
    if g.ndim != 2 or not np.any(g):
        raise ValueError("weights must be a non-zero 2-D array")
    return _noise_factor_cached(g.tobytes(), g.shape, int(phases))


def _disc_weights(radius_px: float, sub: int = 8):
    """Area fractions of the pixels of a centred (2h+1)² box inside a disc (centre at the
    centre of the middle pixel)."""
    h = math.ceil(radius_px) + 1
    s = (np.arange(sub) + 0.5) / sub - 0.5
    c = np.arange(-h, h + 1)
    fx = (c[:, None] + s[None, :]).ravel()
    inside = (fx[:, None] ** 2 + fx[None, :] ** 2) <= radius_px**2
    return inside.reshape(2 * h + 1, sub, 2 * h + 1, sub).mean(axis=(1, 3))


def _annulus_weights(r_in: float, r_out: float):
    h = math.ceil(r_out) + 1
    c = np.arange(-h, h + 1)
    r = np.hypot(c[:, None], c[None, :])
    return ((r >= r_in) & (r <= r_out)).astype(float)


#: Noise of the annulus median / noise of the annulus mean on Atlas Images. For white
#: noise it would be sqrt(pi/2) = 1.2533; the Atlas kernel's correlations (one frame pixel
#: feeds 4 x 4 output pixels) leave less to lose: 1.066 +- 0.014 measured on 3025 annuli of
#: Atlas-like noise images (:func:`gpu2mass.sim.mergetruth.atlas_like_image`, see
#: ``tests/test_bandmerge.py``).
_MEDIAN_NOISE_FACTOR = 1.07


def band_fill_upper_limits(
    image,
    sigma,
    x,
    y,
    *,
    ncorfac: float,
    zp_mag: float,
    pixel_arcsec: float = 1.0,
    mask=None,
    aperture_arcsec: float = 4.0,
    annulus_arcsec: tuple[float, float] = (14.0, 20.0),
    confidence: float = 0.95,
    aperture_correction: float = 1.0,
    min_good_fraction: float = 0.9,
    min_sky_pixels: int = 50,
    ncorfac_area_arcsec: float = 14.0,
) -> Table:
    """Band-fill upper limits on an Atlas Image at given pixel positions (facts sheet 3.7).

    Parameters
    ----------
    image
        float (ny, nx), host array: Atlas Image, DN per pixel, background-subtracted or not
        (the annulus sky is subtracted); NaN = no data.
    sigma
        float (ny, nx): the Atlas ``SIGMA`` map (per-pixel noise, DN).
    x, y
        float (n,): 0-based pixel positions (x along columns) of the sources.
    ncorfac
        The image's noise-correlation factor for a circular aperture of radius
        ``ncorfac_area_arcsec`` (the Atlas header's ``NCORFAC``, 2.97 for 14"); rescaled to
        the aperture and the annulus with :func:`atlas_noise_factor`.
    zp_mag
        Magnitude of a source whose (total) flux is 1 DN (``MAGZP``).
    pixel_arcsec
        Pixel size (1" for Atlas Images).
    mask
        bool (ny, nx), optional: True = pixel not to use.
    aperture_arcsec, annulus_arcsec
        Aperture radius (4") and sky annulus radii (14", 20").
    confidence
        One-sided confidence of the limit (0.95).
    aperture_correction
        Aperture-to-total flux factor (>= 1; curve of growth); 1 = the 4" aperture flux.
    min_good_fraction
        Least fraction of the aperture area on good pixels, else null (0.9).
    min_sky_pixels
        Least number of good annulus pixels, else null (50 of the ~640).
    ncorfac_area_arcsec
        Radius the given ``ncorfac`` refers to (14").

    Returns
    -------
    astropy.table.Table, one row per position: ``m_ul`` (upper-limit magnitude), ``flux``
    (aperture flux, DN, sky-subtracted, before the aperture correction), ``flux_err``,
    ``sky`` (DN per pixel), ``m_ap`` and ``msig_ap`` (magnitude of |flux| × correction and
    its error: the PSC's ``[jhk]_m_stdap`` for a band-fill), ``n_ap`` (good aperture area,
    pixels), ``n_sky`` and ``flags`` (:data:`gpu2mass.flags.BANDFILL_BITS`). Null (masked)
    values where no measurement was possible; see the module docstring for the method.
    """
    img = np.asarray(image, float)
    sig = np.asarray(sigma, float)
    if img.ndim != 2 or sig.shape != img.shape:
        raise ValueError(f"image and sigma must be 2-D of one shape, got {img.shape}, {sig.shape}")
    bad = ~np.isfinite(img) | ~np.isfinite(sig)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != img.shape:
            raise ValueError(f"mask must be {img.shape}, got {mask.shape}")
        bad = bad | mask
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of one length")
    for name, v, ok in (("ncorfac", ncorfac, ncorfac >= 1), ("confidence", confidence, 0.5 < confidence < 1),
                        ("aperture_correction", aperture_correction, aperture_correction > 0),
                        ("min_good_fraction", min_good_fraction, 0 < min_good_fraction <= 1),
                        ("pixel_arcsec", pixel_arcsec, pixel_arcsec > 0)):
        if not (math.isfinite(v) and ok):
            raise ValueError(f"{name} out of range: {v!r}")
    r_ap = aperture_arcsec / pixel_arcsec
    r_in, r_out = (a / pixel_arcsec for a in annulus_arcsec)
    if not 0 < r_ap <= r_in < r_out:
        raise ValueError("need 0 < aperture radius <= annulus inner < outer radius")
    ref = atlas_noise_factor(_disc_weights(ncorfac_area_arcsec / pixel_arcsec))
    f_ap = ncorfac * atlas_noise_factor(_disc_weights(r_ap)) / ref
    f_sky = ncorfac * atlas_noise_factor(_annulus_weights(r_in, r_out)) / ref
    k = float(ndtri(confidence))

    from gpu2mass.kernels.cpu.bandfill import measure_band_fill

    # The per-position sky and aperture sums (compiled: a Python loop over the positions
    # cost a second per full scan).
    names = ("flux", "flux_err", "sky", "n_ap", "n_sky")
    *values, flags = measure_band_fill(
        np.ascontiguousarray(img), np.ascontiguousarray(sig), np.ascontiguousarray(bad), x, y,
        r_ap=r_ap, r_in=r_in, r_out=r_out, sub=8, min_sky=min_sky_pixels,
        min_area=min_good_fraction * math.pi * r_ap * r_ap, f_ap=f_ap, f_sky=f_sky,
        median_factor=_MEDIAN_NOISE_FACTOR)
    res = dict(zip(names, values, strict=True))

    flux, err = res["flux"], res["flux_err"]
    ok = np.isfinite(flux)
    ul = np.where(ok, np.maximum(flux, 0.0) + k * err, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        m_ul = zp_mag - 2.5 * np.log10(aperture_correction * ul)
        m_ap = zp_mag - 2.5 * np.log10(aperture_correction * np.abs(flux))
        msig = 1.0857 * err / np.abs(flux)
    fin = ok & np.isfinite(m_ap)
    out = Table()
    out["m_ul"] = MaskedColumn(m_ul, mask=~(ok & np.isfinite(m_ul)), unit="mag")
    out["flux"] = MaskedColumn(flux, mask=~ok, unit="DN")
    out["flux_err"] = MaskedColumn(err, mask=~ok, unit="DN")
    out["sky"] = MaskedColumn(res["sky"], mask=~np.isfinite(res["sky"]), unit="DN")
    out["m_ap"] = MaskedColumn(m_ap, mask=~fin, unit="mag")
    out["msig_ap"] = MaskedColumn(msig, mask=~fin, unit="mag")
    out["n_ap"] = MaskedColumn(res["n_ap"], mask=~np.isfinite(res["n_ap"]))
    out["n_sky"] = MaskedColumn(res["n_sky"], mask=~np.isfinite(res["n_sky"]))
    out["flags"] = flags
    out.meta["ncorfac_aperture"] = f_ap
    out.meta["ncorfac_annulus"] = f_sky
    out.meta["k_sigma"] = k
    return out
