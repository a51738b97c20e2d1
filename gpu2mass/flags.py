"""Flag registries: the 2MASS PSC flag codes (facts sheet section 13) and gpu2mass's bits.

Two kinds of flags live here.

**2MASS catalogue flags** are per-band characters written in band order J, H, Ks
(``rd_flg``, ``bl_flg``, ``cc_flg``, ``ph_qual``: three characters each; ``ndet``: six
digits). Their meanings are the PSC's (spec/products.md: a 2MASS name never changes
meaning), and the rules that set them are vectorized functions of the per-band quantities:

- :func:`ph_qual_band` / :func:`ph_qual` — photometric quality from ``rd_flg``, ``snr``,
  ``cmsig``, ``psfchi`` and the frame statistics (table 13.1, rule by rule);
- :func:`bl_flg_band` / :func:`bl_flg` — number of components fit simultaneously;
- :func:`cc_flg_band` / :func:`cc_flg` — contamination and confusion letter;
- :func:`ndet` — the "NJMJNHMHNKMK" frame-statistics string;
- :func:`frames_ok` — the frame-statistics rule ``ph_qual`` E uses;
- :func:`join_bands` — three per-band character arrays into one 3-character string.

**Internal bits** (:class:`FlagRegistry`): per-row integer bit masks that a step sets for
conditions the 2MASS letters do not carry, each bit with its documentation, so that a
value can always be decoded (:meth:`FlagRegistry.describe`). :data:`BANDMERGE_BITS` and
:data:`BANDFILL_BITS` belong to :mod:`gpu2mass.bandmerge`; :data:`DETECTION_BITS` is the
single-frame detection registry of :mod:`gpu2mass.kernels.scalar.detect`, registered here
so that every registry can be found in one place.

Everything is host NumPy; inputs broadcast against each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BANDFILL_BITS",
    "BANDMERGE_BITS",
    "BANDS",
    "BF_FEW_PIXELS",
    "BF_FEW_SKY_PIXELS",
    "BF_NEGATIVE",
    "BF_OFF_IMAGE",
    "BM_CONFUSED",
    "BM_HIERARCHICAL",
    "BM_SPLIT_RISK",
    "CC_BANDMERGE",
    "CC_CONFUSION",
    "CC_DIFFRACTION",
    "CC_LETTERS",
    "CC_NONE",
    "CC_PERSISTENCE",
    "CC_PRIORITY",
    "CC_STRIPE",
    "CMSIG_A",
    "CMSIG_B",
    "CMSIG_C",
    "CMSIG_FLAG_VALUE",
    "DETECTION_BITS",
    "FRAME_BRIGHT_MAG",
    "FRAME_MIN_FRACTION",
    "FRAME_MIN_MEASURABLE",
    "PH_QUAL_CODES",
    "PSFCHI_MAX",
    "RD_FLG_CODES",
    "RD_INCONSISTENT",
    "RD_NOT_DETECTED",
    "RD_NO_MEASUREMENT",
    "RD_PSF",
    "RD_R1_APERTURE",
    "RD_R1_PROFILE",
    "RD_R2_APERTURE",
    "SNR_A",
    "SNR_B",
    "SNR_C",
    "FlagRegistry",
    "bl_flg",
    "bl_flg_band",
    "cc_flg",
    "cc_flg_band",
    "frames_ok",
    "join_bands",
    "ndet",
    "ph_qual",
    "ph_qual_band",
]

#: Band order of every 3-character flag and of ``ndet``.
BANDS = ("J", "H", "K")

# -- rd_flg (facts sheet 13.2) -----------------------------------------------------------------

RD_NOT_DETECTED = 0  #: not detected: 95 % upper limit from the 4" Atlas aperture (band-fill)
RD_R1_APERTURE = 1  #: 4" aperture photometry on the 51 ms R1 frames (R2 saturated)
RD_PSF = 2  #: PSF fit on the 1.3 s R2−R1 frames, normalized to COG aperture mags
RD_R1_PROFILE = 3  #: 1-D radial-profile fit on R1 frames (saturated in every R1 frame)
RD_R2_APERTURE = 4  #: COG-corrected 4" aperture on R2−R1 frames: the PSF fit failed
RD_INCONSISTENT = 6  #: detected but not deblended consistently with the other bands: limit
RD_NO_MEASUREMENT = 9  #: nominal detection, no usable measurement (confusion, tile edge)

#: rd_flg code → meaning (facts sheet table 13.2; 8/"888", the earlier releases'
#: bright-star placeholders, is not produced by gpu2mass).
RD_FLG_CODES = {
    RD_NOT_DETECTED: "not detected; 95 % confidence upper limit from a 4\" aperture on the "
    "Atlas Image (sky 14-20\")",
    RD_R1_APERTURE: "4\" aperture photometry on the 51 ms R1 frames (R2 saturated, >= 1 R1 "
    "frame unsaturated)",
    RD_PSF: "PSF fit on the 1.3 s R2-R1 frames, normalized to curve-of-growth aperture mags",
    RD_R1_PROFILE: "1-D radial-profile fit to the unsaturated wings on R1 frames",
    RD_R2_APERTURE: "COG-corrected 4\" aperture on R2-R1 frames because the PSF fit failed",
    RD_INCONSISTENT: "upper limit: detected but not resolved consistently with other bands",
    RD_NO_MEASUREMENT: "nominal detection but no usable measurement; upper limit",
}

# -- ph_qual (facts sheet 13.1) ----------------------------------------------------------------

#: ph_qual letter → rule, in the order the rules are applied (first match wins).
PH_QUAL_CODES = {
    "X": "detection exists but no valid brightness estimate (rd_flg 9)",
    "U": "upper limit: rd_flg 0 (not detected) or 6 (not deblended consistently)",
    "F": "rd_flg 1 or 3 without a reliable error estimate (cmsig null, non-finite or > 8)",
    "E": "rd_flg 2 with psfchi > 10, or rd_flg 4, or rd_flg 1/2 with too few frame "
    "detections for the frames measurable (frames_ok False)",
    "A": "rd_flg 1/2/3, snr > 10 and cmsig < 0.10857",
    "B": "rd_flg 1/2/3, snr > 7 and cmsig < 0.15510",
    "C": "rd_flg 1/2/3, snr > 5 and cmsig < 0.21714",
    "D": "rd_flg 1/2/3, no SNR or cmsig requirement",
}
#: A/B/C thresholds: SNR and cmsig = 1.0857 / SNR for SNR 10, 7, 5.
SNR_A, SNR_B, SNR_C = 10.0, 7.0, 5.0
CMSIG_A, CMSIG_B, CMSIG_C = 0.10857, 0.15510, 0.21714
#: Reduced chi-square of the PSF fit above which rd_flg 2 photometry is poor (E).
PSFCHI_MAX = 10.0
#: cmsig above this is a flag value, not an uncertainty (ph_qual F).
CMSIG_FLAG_VALUE = 8.0

#: Frame statistics (facts sheet section 10, rule 6; the final-selection memo's wording):
#: stars brighter than these (J, H, Ks) must be measurable on >= FRAME_MIN_MEASURABLE frames
#: and detected > 3 sigma on >= FRAME_MIN_FRACTION of them.
FRAME_BRIGHT_MAG = {"J": 14.5, "H": 14.0, "K": 13.5}
FRAME_MIN_MEASURABLE = 3
FRAME_MIN_FRACTION = 0.41

# -- cc_flg (facts sheet 13.4) -----------------------------------------------------------------

CC_PERSISTENCE = "p"  #: latent image of a bright star may contaminate
CC_CONFUSION = "c"  #: photometric confusion: a nearby star biased background or photometry
CC_DIFFRACTION = "d"  #: diffraction-spike contamination
CC_STRIPE = "s"  #: electronic stripe contamination
CC_BANDMERGE = "b"  #: bandmerge confusion: more than one possible cross-band match
CC_NONE = "0"  #: no known artifact, or not detected

#: cc_flg letter → meaning (PSC lower case; upper case marks the artifact itself, which
#: never reaches the PSC).
CC_LETTERS = {
    CC_PERSISTENCE: "persistence (latent image of a bright star) may contaminate",
    CC_CONFUSION: "photometric confusion: a nearby star biased the background/photometry",
    CC_DIFFRACTION: "diffraction-spike contamination",
    CC_STRIPE: "electronic stripe contamination",
    CC_BANDMERGE: "bandmerge confusion (multiple possible cross-band matches)",
    CC_NONE: "no known artifact, or not detected",
}
#: One character per band: when several conditions hold, the first of this tuple wins.
#: Decision (2MASS's own precedence is unconfirmed): the order of table 13.4 — artifacts
#: that bias the measurement (persistence, confusion, spikes, stripes) before bandmerge
#: confusion, which concerns the association only.
CC_PRIORITY = (CC_PERSISTENCE, CC_CONFUSION, CC_DIFFRACTION, CC_STRIPE, CC_BANDMERGE)


# -- internal bit registries -------------------------------------------------------------------


@dataclass(frozen=True)
class FlagRegistry:
    """Named bits of one integer flag column, each with its meaning.

    ``bits`` maps bit value (a power of two) → ``(name, meaning)``.
    """

    column: str
    bits: Mapping

    def __post_init__(self):
        for value in self.bits:
            if value <= 0 or value & (value - 1):
                raise ValueError(f"{self.column}: {value} is not a single bit")

    def describe(self, value: int) -> list[str]:
        """The names of the bits set in ``value`` (unknown bits as ``"bit N"``)."""
        value = int(value)
        out = [name for bit, (name, _) in sorted(self.bits.items()) if value & bit]
        rest = value & ~sum(self.bits)
        out += [f"bit {b}" for b in range(rest.bit_length()) if rest >> b & 1]
        return out

    def __contains__(self, name: str) -> bool:
        return any(n == name for n, _ in self.bits.values())


BM_CONFUSED = 1
BM_HIERARCHICAL = 2
BM_SPLIT_RISK = 4

#: ``[jhk]_bm_flags`` of :func:`gpu2mass.bandmerge.run_bandmerge` (per band of a source).
BANDMERGE_BITS = FlagRegistry("bm_flags", {
    BM_CONFUSED: ("confused", ("more than one acceptable cross-band match of comparable "
                  "probability involved this detection (cc_flg 'b'); left out of the merged "
                  "position unless every band is")),
    BM_HIERARCHICAL: ("hierarchical", ("matched in a later seed stage against the merged "
                      "position of a source (H or Ks joining a J-seeded source)")),
    BM_SPLIT_RISK: ("split_risk", ("an acceptable match of this detection was taken by a "
                    "better-matching detection: it may be part of a split source")),
})

BF_NEGATIVE = 1
BF_FEW_PIXELS = 2
BF_FEW_SKY_PIXELS = 4
BF_OFF_IMAGE = 8

#: ``flags`` of :func:`gpu2mass.bandmerge.band_fill_upper_limits`.
BANDFILL_BITS = FlagRegistry("bf_flags", {
    BF_NEGATIVE: ("negative", ("the aperture flux is negative: the limit is k sigma alone "
                  "and the magnitude is that of |flux|")),
    BF_FEW_PIXELS: ("few_pixels", "too few good pixels in the 4\" aperture: no limit"),
    BF_FEW_SKY_PIXELS: ("few_sky_pixels", "too few good pixels in the 14-20\" annulus: no limit"),
    BF_OFF_IMAGE: ("off_image", "the aperture centre lies outside the image: no limit"),
})


def _detection_bits() -> FlagRegistry:
    from gpu2mass.kernels.scalar.detect import FLAG_BITS

    return FlagRegistry("flags", {bit: (meaning.split(":")[0], meaning)
                                  for bit, meaning in FLAG_BITS.items()})


#: Single-frame detection ``flags`` (:mod:`gpu2mass.framedet`), as a registry.
DETECTION_BITS = _detection_bits()


# -- rules -------------------------------------------------------------------------------------


def _chars(shape, fill):
    return np.full(shape, fill, dtype="<U1")


def frames_ok(n, m, mag, band: str):
    """Frame-statistics rule: are there enough frame detections for the frames measurable?

    Parameters
    ----------
    n, m
        int arrays: frames with a > 3 sigma aperture detection (N) and frames on which a
        measurement was possible (M) (the ``ndet`` digits, uncapped).
    mag
        float array, the band's default magnitude (NaN counts as faint).
    band
        ``"J"``, ``"H"`` or ``"K"``.

    Returns
    -------
    bool array: False where the statistics are too poor (``ph_qual`` E for rd_flg 1/2).

    Rule (facts sheet section 10, rule 6, final-selection memo; decision where it is
    silent): a star brighter than :data:`FRAME_BRIGHT_MAG` must be measurable on at least
    :data:`FRAME_MIN_MEASURABLE` frames and detected on at least
    :data:`FRAME_MIN_FRACTION` of them; a fainter one must be measurable on at least one
    frame (a star near the limit is detected > 3 sigma on few single frames by nature, so
    the fraction is not asked of it).
    """
    n = np.asarray(n)
    m = np.asarray(m)
    mag = np.asarray(mag, float)
    bright = np.isfinite(mag) & (mag < FRAME_BRIGHT_MAG[band.upper()[0]])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(m > 0, n / np.maximum(m, 1), 0.0)
    ok_bright = (m >= FRAME_MIN_MEASURABLE) & (frac >= FRAME_MIN_FRACTION)
    return np.where(bright, ok_bright, m >= 1)


def ph_qual_band(rd_flg, snr, cmsig, psfchi=np.nan, frames_good=True):
    """Per-band ``ph_qual`` letter (facts sheet table 13.1), applied in the order below.

    Parameters (arrays, broadcast together)
    ----------
    rd_flg
        int, :data:`RD_FLG_CODES`.
    snr
        float, the scan SNR ``[jhk]_snr``.
    cmsig
        float, corrected photometric uncertainty, mag; NaN = null.
    psfchi
        float, reduced chi-square of the PSF fit (NaN when there is no fit).
    frames_good
        bool, :func:`frames_ok` of the band.

    ====  =====================================================================================
    code  rule (first match wins)
    ====  =====================================================================================
    X     rd_flg 9: a detection without a valid brightness estimate
    U     rd_flg 0 or 6: upper limit
    F     rd_flg 1 or 3 and cmsig null, non-finite or > 8 (2MASS wrote flag values > 8; we
          write null, and accept both)
    E     rd_flg 2 and psfchi > 10; or rd_flg 4; or rd_flg 1 or 2 and not ``frames_good``
    A     rd_flg 1/2/3, snr > 10 and cmsig < 0.10857
    B     rd_flg 1/2/3, snr > 7 and cmsig < 0.15510
    C     rd_flg 1/2/3, snr > 5 and cmsig < 0.21714
    D     rd_flg 1/2/3 otherwise
    ====  =====================================================================================

    An rd_flg outside these codes raises ``ValueError``.

    Returns
    -------
    ``<U1`` array of letters.
    """
    rd, snr, cmsig, psfchi, fgood = np.broadcast_arrays(
        np.asarray(rd_flg), np.asarray(snr, float), np.asarray(cmsig, float),
        np.asarray(psfchi, float), np.asarray(frames_good, bool))
    known = np.isin(rd, list(RD_FLG_CODES))
    if not known.all():
        raise ValueError(f"unknown rd_flg values {sorted(set(np.unique(rd[~known]).tolist()))}")
    measured = np.isin(rd, (RD_R1_APERTURE, RD_PSF, RD_R1_PROFILE))
    bad_sig = ~np.isfinite(cmsig) | (cmsig > CMSIG_FLAG_VALUE)
    with np.errstate(invalid="ignore"):
        conditions = [
            rd == RD_NO_MEASUREMENT,
            (rd == RD_NOT_DETECTED) | (rd == RD_INCONSISTENT),
            np.isin(rd, (RD_R1_APERTURE, RD_R1_PROFILE)) & bad_sig,
            ((rd == RD_PSF) & (psfchi > PSFCHI_MAX)) | (rd == RD_R2_APERTURE)
            | (np.isin(rd, (RD_R1_APERTURE, RD_PSF)) & ~fgood),
            measured & (snr > SNR_A) & (cmsig < CMSIG_A),
            measured & (snr > SNR_B) & (cmsig < CMSIG_B),
            measured & (snr > SNR_C) & (cmsig < CMSIG_C),
            measured,
        ]
    return np.select(conditions, list("XUFEABCD"), default="?").astype("<U1")


def join_bands(j, h, k):
    """Three per-band character arrays → one array of 3-character strings (J, H, Ks)."""
    j, h, k = np.broadcast_arrays(np.asarray(j).astype(str), np.asarray(h).astype(str),
                                  np.asarray(k).astype(str))
    return np.char.add(np.char.add(j, h), k)


def _per_band(fn, per_band: Mapping, names):
    out = []
    for b in BANDS:
        args = per_band[b]
        out.append(fn(**{k: args[k] for k in names if k in args}))
    return join_bands(*out)


def ph_qual(per_band: Mapping):
    """3-character ``ph_qual``: ``per_band[b]`` holds the keyword arguments of
    :func:`ph_qual_band` for band ``b`` in :data:`BANDS`."""
    return _per_band(ph_qual_band, per_band, ("rd_flg", "snr", "cmsig", "psfchi", "frames_good"))


def bl_flg_band(rd_flg, n_components=1):
    """Per-band ``bl_flg`` digit (facts sheet 13.3).

    ===========  =======================================================================
    value        rule
    ===========  =======================================================================
    0            rd_flg 0 (not detected), 6 (inconsistently deblended) or 9 (no
                 measurement: decision — nothing was fit)
    1            rd_flg 1, 3 or 4 (no profile fit); rd_flg 2 fit alone
    2–7          rd_flg 2: number of components fit simultaneously, capped at 7
    ===========  =======================================================================

    ``n_components`` is the PSF fit's blend size (>= 1; values < 1 count as 1).
    Returns a ``<U1`` array.
    """
    rd, nc = np.broadcast_arrays(np.asarray(rd_flg), np.asarray(n_components))
    val = np.select(
        [np.isin(rd, (RD_NOT_DETECTED, RD_INCONSISTENT, RD_NO_MEASUREMENT)),
         np.isin(rd, (RD_R1_APERTURE, RD_R1_PROFILE, RD_R2_APERTURE)),
         rd == RD_PSF],
        [0, 1, np.clip(nc, 1, 7)], default=-1)
    if (val < 0).any():
        raise ValueError(f"unknown rd_flg values {sorted(set(np.unique(rd[val < 0]).tolist()))}")
    return val.astype(str).astype("<U1")


def bl_flg(per_band: Mapping):
    """3-character ``bl_flg`` from ``per_band[b] = {"rd_flg": ..., "n_components": ...}``."""
    return _per_band(bl_flg_band, per_band, ("rd_flg", "n_components"))


def cc_flg_band(detected, *, persistence=False, confusion=False, diffraction=False,
                stripe=False, bandmerge=False):
    """Per-band ``cc_flg`` letter (facts sheet 13.4) from boolean conditions.

    The first condition that holds in :data:`CC_PRIORITY` order (p, c, d, s, b) gives the
    letter; none, or not ``detected``: ``"0"`` (the PSC writes 0 for undetected bands).
    Returns a ``<U1`` array.
    """
    det = np.asarray(detected, bool)
    conds = np.broadcast_arrays(det, *(np.asarray(c, bool) for c in
                                       (persistence, confusion, diffraction, stripe, bandmerge)))
    det, conds = conds[0], conds[1:]
    letter = np.select(list(conds), list(CC_PRIORITY), default=CC_NONE)
    return np.where(det, letter, CC_NONE).astype("<U1")


def cc_flg(per_band: Mapping):
    """3-character ``cc_flg``: ``per_band[b]`` holds :func:`cc_flg_band`'s arguments."""
    return _per_band(cc_flg_band, per_band,
                     ("detected", "persistence", "confusion", "diffraction", "stripe", "bandmerge"))


def ndet(n, m):
    """``ndet`` strings "NJMJNHMHNKMK" from per-band frame counts, each capped at 9.

    Parameters
    ----------
    n, m
        Mappings band → int array (or int arrays of shape (3, ...) in J, H, Ks order):
        N = frames with a > 3 sigma aperture detection, M = frames on which a measurement
        was possible. Negative or missing counts are 0.

    Returns
    -------
    ``<U6`` array, e.g. ``"666666"`` for a source detected on 6 of 6 frames in every band.
    """
    def stack(v):
        if isinstance(v, Mapping):
            v = [v[b] for b in BANDS]
        a = np.asarray(v)
        if a.shape[0] != 3:
            raise ValueError(f"need 3 bands of counts, got shape {a.shape}")
        return np.clip(np.nan_to_num(a.astype(float), nan=0.0), 0, 9).astype(int)

    nn, mm = np.broadcast_arrays(stack(n), stack(m))
    out = np.char.add(nn[0].astype(str), mm[0].astype(str))
    for i in (1, 2):
        out = np.char.add(out, np.char.add(nn[i].astype(str), mm[i].astype(str)))
    return out.astype("<U6")
