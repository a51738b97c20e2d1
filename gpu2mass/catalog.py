"""Point-source catalog rows of a scan: per-band photometry chosen by regime, then the
band-merged sources with 2MASS PSC columns (facts sheet 3.1, 3.3–3.7, 12, 13).

- :func:`band_photometry`: one band's sources from the measurements of the PSF fit
  (:mod:`gpu2mass.psfphot`), the aperture photometry and curve of growth
  (:mod:`gpu2mass.aperphot`), the R1 photometry and the radial-profile fits of stars
  saturated even in R1: the default magnitude by regime (``rd_flg`` 1, 2, 3 or 4), the PSF
  magnitudes normalised per scan to the curve-of-growth-corrected 4" standard aperture,
  errors and flags.
- :func:`assemble_point_sources`: the merged sources of :func:`gpu2mass.bandmerge.run_bandmerge`
  turned into the PSC columns (three-letter flags, ``ndet``, ``err_maj``/``err_min``/
  ``err_ang``, band-fill upper limits for undetected bands).

Magnitudes are instrumental here (the zero point given is the instrumental one until the
night's calibration replaces it); everything else is final.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from astropy.table import MaskedColumn, Table

from gpu2mass import flags
from gpu2mass.errors import ConfigError
from gpu2mass.geometry import tan_deproject

__all__ = ["CatalogConfig", "assemble_point_sources", "band_photometry"]

_MAG = 2.5 / np.log(10.0)  # 1.0857: mag per unit relative flux error


@dataclass(frozen=True)
class CatalogConfig:
    """Settings of the per-band photometry choice and the catalog rows.

    Attributes
    ----------
    norm_min_snr
        Stars used for the PSF → standard-aperture normalisation: SNR of the aperture
        magnitude above this (50), fitted alone (``bl_flg`` 1), unsaturated, PSF fit clean.
    norm_min_stars
        Fewer such stars: no normalisation (ratio 1, flagged in the table's meta).
    psf_fail_bits
        PSF status bits (:data:`gpu2mass.psfphot.PSF_STATUS_BITS`) that make the fit unusable
        (singular, non-positive flux, no data, no frames: 2|4|16|32); the 4" aperture
        magnitude is used instead (``rd_flg`` 4).
    systematic_mag
        Systematic term added in quadrature to ``cmsig`` to give ``msigcom``, mag (0.005:
        flat-field and PSF-mismatch residuals; the normalisation's own error is added
        separately, the absolute calibration's by the night calibration).
    duplicate_arcsec
        Two radial-profile fits (stars saturated in R1) closer than this are one star seen
        twice by the Atlas detection (10": the saturated cores of J < 4.5 stars reach ~6"
        in radius).
    psf_floor_in_errors
        Add the scan's PSF-model error (``meta["psf_error_floor"]``: the scatter of PSF
        against aperture magnitudes beyond their errors) to every PSF flux error (False).
        The night's error calibration measures that excess from calibration-scan repeats
        (:mod:`gpu2mass.errcal`, 2MASS's cmsig correction); the per-scan estimate, a
        difference of two similar spreads, was 0 in 40 of the ci preset's 42 scan-bands
        and 5 mmag in two, where it made the science errors 15–25 % too large. True for
        nights without calibration scans.
    lone_max_psfchi, lone_max_snr
        A PSF-measured source that at most one frame could measure (``n_meas`` ≤ 1: the
        scan's ends, where one frame alone covers the sky), with ``psfchi`` above
        ``lone_max_psfchi`` (6) and SNR below ``lone_max_snr`` (50), is a cosmic ray the
        frame's transient masking could not tell from a star: dropped (``cosmic_ray``).
        With no second frame there is no repeat to test; only the shape is left. Decided
        on 13 ci nights: such rays made 6 of the 9 false SNR ≥ 10 detections, at psfchi
        2.4–10 (four above 6), where real stars measured on one frame at SNR 10–50 gave at
        most 5.5 (99th percentile 2.7–3.4). 2MASS kept them in the working database; its
        PSC's frame rules (facts sheet 10, rule 6) and tile overlaps removed them. Brighter
        stars are exempt: PSF mismatch alone gives psfchi up to 30 there. ``inf`` turns
        the test off.
    edge_status_bits
        PSF status bits that mark a source no frame holds inside the array's edge margin
        (32, ``no_frames``): ``rd_flg`` 9 (no usable measurement) instead of a 4" aperture
        on a star cut by the array's edge (0: the aperture, ``rd_flg`` 4).
    """

    norm_min_snr: float = 50.0
    norm_min_stars: int = 5
    psf_fail_bits: int = 2 | 4 | 16 | 32
    systematic_mag: float = 0.005
    duplicate_arcsec: float = 10.0
    psf_floor_in_errors: bool = False
    edge_status_bits: int = 32
    lone_max_psfchi: float = 6.0
    lone_max_snr: float = 50.0

    def __post_init__(self):
        if self.norm_min_snr <= 0 or self.norm_min_stars < 1 or self.systematic_mag < 0:
            raise ConfigError("catalog.norm_min_snr > 0, norm_min_stars >= 1 and "
                              "systematic_mag >= 0 are required")


def _mag(flux, zp):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, zp - 2.5 * np.log10(flux), np.nan)


def band_photometry(psf: Table, aper: Table, *, r1: Table | None = None, saturated_fit: Table | None = None,
                    zp: float, band: str, cog=None, config: CatalogConfig = CatalogConfig()) -> Table:
    """One band's photometry by regime.

    Parameters
    ----------
    psf
        :func:`gpu2mass.psfphot.run_psf_photometry` rows (one per source).
    aper
        :func:`gpu2mass.aperphot.apply_curve_of_growth` of the aperture photometry at the
        PSF positions (same rows): ``flux_stdap``, ``flux_stdap_err``, ``n_sat``, ``n_det``,
        ``n_meas``, ``ndet``.
    r1
        :func:`gpu2mass.aperphot.run_r1_photometry` rows (``index`` into the sources,
        ``r1_status``, ``flux_stdap``, ``flux_stdap_err``), or None.
    saturated_fit
        Radial-profile fits (rd_flg 3) with ``index``, ``flux``, ``flux_err``, or None.
    zp
        Zero point: magnitude of 1 DN in the R2−R1 frames.
    band
        ``"J"``, ``"H"`` or ``"K"``.
    cog
        The :class:`gpu2mass.aperphot.CurveOfGrowth` the standard-aperture fluxes were made
        with (its error is part of the scan's photometric scale error), or None.

    Returns
    -------
    Table, one row per source: ``ra``, ``dec``, ``ra_err``, ``dec_err``, ``flux``,
    ``flux_err`` (DN, the default measurement), ``m``, ``cmsig``, ``msigcom``, ``snr``,
    ``psfchi``, ``m_stdap``, ``msig_stdap``, ``rd_flg``, ``bl_flg`` (digit), ``ph_qual``,
    ``ndet`` ("NM"), ``n_det``, ``n_meas``, ``psf_flux``, ``psf_flux_err``, ``psf_status``,
    ``duplicate`` (True: a second detection of a star saturated in R1; the caller drops it),
    ``cosmic_ray`` (True: a poor PSF fit where at most one frame measured it,
    :attr:`CatalogConfig.lone_max_psfchi`; the caller drops it),
    ``saturated`` (saturated in a covering R2−R1 frame).
    ``meta["psf_norm"]``, ``meta["psf_norm_err"]``, ``meta["psf_norm_n"]``: the ratio of
    standard-aperture to PSF flux, its error and the number of stars; ``meta["psf_error_floor"]``:
    the scatter of PSF vs aperture fluxes of those stars beyond their errors (PSF-model
    error, fractional; added to every PSF flux error when ``psf_floor_in_errors``);
    ``meta["psf_scale_err"]``: the fractional error of the scan's PSF photometric scale,
    common to all its ``rd_flg`` 2 fluxes: the normalisation's and the curve of growth's
    (:meth:`gpu2mass.aperphot.CurveOfGrowth.scale_error` over the blocks of the
    normalisation stars) in quadrature. It goes into ``msigcom`` here; the night's error
    calibration (:mod:`gpu2mass.errcal`) moves it, scaled to what the calibration scans
    show, into ``cmsig``.
    """
    cfg = config
    n = len(psf)
    pf = np.asarray(psf["flux"], float)
    pe = np.asarray(psf["flux_err"], float)
    st = np.asarray(psf["status"], np.int64)
    af = np.asarray(aper["flux_stdap"], float)
    ae = np.asarray(aper["flux_stdap_err"], float)
    nsat = np.asarray(aper["n_sat"], np.int64)
    psf_ok = ((st & cfg.psf_fail_bits) == 0) & np.isfinite(pf) & (pf > 0) & np.isfinite(pe)
    with np.errstate(divide="ignore", invalid="ignore"):
        sel = (psf_ok & (np.asarray(psf["bl_flg"]) == 1) & (nsat == 0) & np.isfinite(af)
               & (af / ae > cfg.norm_min_snr))
        ratio = af[sel] / pf[sel]
    floor = 0.0
    if ratio.size >= cfg.norm_min_stars:
        med = np.median(ratio)
        mad = 1.4826 * np.median(np.abs(ratio - med))
        keep = np.abs(ratio - med) < 5 * max(mad, 1e-6)
        norm = float(np.median(ratio[keep]))
        norm_err = float(1.2533 * 1.4826 * np.median(np.abs(ratio[keep] - norm)) / np.sqrt(keep.sum()))
        # Error recalibration (the role of 2MASS's cmsig correction): the spread of the PSF
        # against the standard-aperture magnitudes of these stars, beyond what both errors
        # explain, is the PSF model's own error (mismatch, seeing within a block): a
        # fractional floor added to every PSF error of the scan.
        d = np.log(ratio[keep] / norm)
        # The aperture's own noise, without the curve of growth's error (common to a block).
        if "flux_err" in aper.colnames and "flux" in aper.colnames:
            k = aper.meta.get("standard_index", 1)
            f4 = np.asarray(aper["flux"], float)
            e4 = np.asarray(aper["flux_err"], float)
            rel_ap = (e4[:, k] / f4[:, k]) if e4.ndim == 2 else e4 / f4
        else:
            rel_ap = ae / af
        expected = (pe[sel][keep] / pf[sel][keep]) ** 2 + rel_ap[sel][keep] ** 2
        floor = float(np.sqrt(max((1.4826 * np.median(np.abs(d))) ** 2 - np.median(expected), 0.0)))
    else:
        norm, norm_err = 1.0, np.nan
    # The scan's photometric scale: the normalisation's error and the curve of growth's,
    # whose blocks weigh as many as the normalisation stars they hold.
    cog_err = 0.0
    if cog is not None:
        fm = aper["frame_mean"] if "frame_mean" in aper.colnames else np.zeros(n)
        blocks = cog.block_of(np.asarray(fm, float)[sel][keep] if ratio.size >= cfg.norm_min_stars
                              else np.asarray(fm, float))
        weights = np.bincount(blocks, minlength=cog.correction.size).astype(float)
        if weights.sum() > 0:
            cog_err = cog.scale_error(weights)
    rd = np.where(psf_ok, flags.RD_PSF, flags.RD_R2_APERTURE).astype(np.int16)
    flux = np.where(psf_ok, pf * norm, af)
    applied_floor = floor if cfg.psf_floor_in_errors else 0.0
    ferr = np.where(psf_ok, np.hypot(pe, applied_floor * pf) * norm, ae)
    norm_rel = 0.0 if not np.isfinite(norm_err) else norm_err / norm
    scale_err = float(np.hypot(norm_rel, cog_err))
    syst = np.where(psf_ok, scale_err, 0.0)
    # No frame holds the source the PSF fit's margin inside the array (``no_frames``: the
    # scan's side edges, where the Atlas Image holds stars cut by the array's edge): a
    # nominal detection without a usable measurement, 2MASS's rd_flg 9 at tile edges. The
    # 4" aperture there measured part of a star at a position the cut pulled inwards (4 of
    # the 8 such rows with SNR >= 10 on the scan preset lay 4-5" from a star 1 mag brighter).
    # Saturated in a covering R2−R1 frame: R1 photometry, or the profile fit, below.
    sat = nsat > 0
    unmeasured = sat | ((st & cfg.edge_status_bits) != 0)
    rd = np.where(unmeasured, flags.RD_NO_MEASUREMENT, rd).astype(np.int16)
    flux = np.where(unmeasured, np.nan, flux)
    ferr = np.where(unmeasured, np.nan, ferr)
    if r1 is not None and len(r1):
        i = np.asarray(r1["index"], np.int64)
        good = np.asarray(r1["r1_status"]) == 1
        rd[i[good]] = flags.RD_R1_APERTURE
        flux[i[good]] = np.asarray(r1["flux_stdap"], float)[good]
        ferr[i[good]] = np.asarray(r1["flux_stdap_err"], float)[good]
        syst[i[good]] = 0.0
    ra = np.asarray(psf["ra"], float).copy()
    dec = np.asarray(psf["dec"], float).copy()
    duplicate = np.zeros(n, bool)
    if saturated_fit is not None and len(saturated_fit):
        i = np.asarray(saturated_fit["index"], np.int64)
        good = np.isfinite(np.asarray(saturated_fit["flux"], float)) & (rd[i] == flags.RD_NO_MEASUREMENT)
        rd[i[good]] = flags.RD_R1_PROFILE
        flux[i[good]] = np.asarray(saturated_fit["flux"], float)[good]
        ferr[i[good]] = np.asarray(saturated_fit["flux_err"], float)[good]
        syst[i[good]] = 0.0
        # The profile fit's position (centroid of the saturated core, refined on the wings)
        # is better than a PSF fit to a masked core.
        ra[i[good]] = np.asarray(saturated_fit["ra"], float)[good]
        dec[i[good]] = np.asarray(saturated_fit["dec"], float)[good]
        # A saturated star the Atlas detection split in two is one star: the fainter fit
        # of two within ``duplicate_arcsec`` is dropped.
        rows = i[good][np.argsort(-flux[i[good]], kind="stable")]
        for a, r in enumerate(rows):
            if duplicate[r]:
                continue
            for q in rows[a + 1:]:
                d = np.hypot((ra[q] - ra[r]) * np.cos(np.deg2rad(dec[r])), dec[q] - dec[r]) * 3600
                if d < cfg.duplicate_arcsec:
                    duplicate[q] = True
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / ferr
        cmsig = _MAG * ferr / flux
        msigcom = np.sqrt(cmsig**2 + (_MAG * syst) ** 2 + cfg.systematic_mag**2)
        msig_stdap = _MAG * ae / af
    m = _mag(flux, zp)
    cmsig = np.where(np.isfinite(m), cmsig, np.nan)
    n_det = np.asarray(aper["n_det"], np.int64)
    n_meas = np.asarray(aper["n_meas"], np.int64)
    psfchi = np.where(rd == flags.RD_PSF, np.asarray(psf["psfchi"], float), np.nan)
    good_frames = flags.frames_ok(n_det, n_meas, m, band)
    with np.errstate(invalid="ignore"):
        cosmic_ray = ((rd == flags.RD_PSF) & (n_meas <= 1) & (psfchi > cfg.lone_max_psfchi)
                      & (snr < cfg.lone_max_snr))
    out = Table()
    out["ra"], out["dec"] = ra, dec
    for c in ("ra_err", "dec_err"):
        out[c] = np.asarray(psf[c], float)
    out["flux"], out["flux_err"] = flux, ferr
    out["m"], out["cmsig"], out["msigcom"], out["snr"] = m, cmsig, msigcom, snr
    out["psfchi"] = psfchi
    out["m_stdap"], out["msig_stdap"] = _mag(af, zp), msig_stdap
    out["rd_flg"] = rd
    out["bl_flg"] = flags.bl_flg_band(rd, np.asarray(psf["bl_flg"]))
    out["ph_qual"] = flags.ph_qual_band(rd, snr, cmsig, psfchi, good_frames)
    out["ndet"] = np.asarray(aper["ndet"]).astype("<U2")
    out["n_det"], out["n_meas"] = n_det, n_meas
    out["psf_flux"], out["psf_flux_err"], out["psf_status"] = pf, pe, st
    out["duplicate"] = duplicate
    out["cosmic_ray"] = cosmic_ray
    out["saturated"] = sat
    out.meta.update(psf_norm=norm, psf_norm_err=norm_err, psf_norm_n=int(ratio.size),
                    psf_error_floor=floor, psf_scale_err=scale_err)
    assert len(out) == n
    return out


def assemble_point_sources(merged: Table, *, scan: int, ra0: float, dec0: float, jdate: float,
                           upper_limits: Mapping[str, Table] | None = None) -> Table:
    """PSC-style rows from the band-merged table.

    Parameters
    ----------
    merged
        :func:`gpu2mass.bandmerge.run_bandmerge` output whose band inputs were
        :func:`band_photometry` tables with ``x_scan``, ``y_scan`` added (so the band columns
        are ``j_m``, ``j_rd_flg``, ...).
    scan
        Scan number.
    ra0, dec0
        Tangent point of the scan frame (``x_scan`` east, ``y_scan`` north, arcsec).
    jdate
        Julian date of the scan's mid time.
    upper_limits
        Band → band-fill table (:func:`gpu2mass.bandmerge.band_fill_upper_limits`, one row per
        merged source) for undetected bands; their ``m_ul`` becomes the band's magnitude with
        ``rd_flg`` 0.

    Returns
    -------
    Table with the PSC columns the scan pipeline fills (magnitudes instrumental until the
    night's calibration), nulls (masked) where a band has no value.
    """
    n = len(merged)
    out = Table()
    ra, dec = tan_deproject(np.asarray(merged["x_scan"], float), np.asarray(merged["y_scan"], float),
                            ra0, dec0)
    out["ra"], out["dec"] = ra, dec
    sx, sy = np.asarray(merged["sig_x"], float), np.asarray(merged["sig_y"], float)
    sxy = np.asarray(merged["sig_xy"], float)
    # Error ellipse from the covariance (x east, y north); angle east of north.
    tr, det = sx**2 + sy**2, sx**2 * sy**2 - sxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0.0))
    out["err_maj"] = np.sqrt(tr / 2 + disc)
    out["err_min"] = np.sqrt(np.maximum(tr / 2 - disc, 0.0))
    out["err_ang"] = np.mod(np.rad2deg(0.5 * np.arctan2(2 * sxy, sy**2 - sx**2)), 180.0)
    per = {}
    for b in flags.BANDS:
        p = b.lower()
        have = np.asarray(merged[f"{p}_idx"]) >= 0

        def col(name, fill=np.nan, p=p, have=have):
            c = merged[f"{p}_{name}"]
            v = np.asarray(c.filled(fill) if hasattr(c, "filled") else c)
            return np.where(have, v, fill) if v.dtype.kind in "fiu" else v

        rd = np.where(have, col("rd_flg", 0), flags.RD_NOT_DETECTED).astype(np.int16)
        m = col("m")
        for name in ("cmsig", "msigcom", "psfchi", "m_stdap", "msig_stdap", "flux", "flux_err"):
            out[f"{p}_{name}"] = MaskedColumn(col(name), mask=~have | ~np.isfinite(col(name)))
        snr = col("snr_meas") if f"{p}_snr_meas" in merged.colnames else col("snr")
        out[f"{p}_snr"] = MaskedColumn(snr, mask=~have | ~np.isfinite(snr))
        if upper_limits is not None and b in upper_limits:
            lim = np.asarray(upper_limits[b]["m_ul"].filled(np.nan), float)
            use = ~have & np.isfinite(lim)
            m = np.where(use, lim, m)
        out[f"{p}_m"] = MaskedColumn(m, mask=~np.isfinite(m))
        bl = np.where(have, np.asarray(merged[f"{p}_bl_flg"]).astype(str), "0")
        ph = np.where(have, np.asarray(merged[f"{p}_ph_qual"]).astype(str),
                      np.where(np.isfinite(m), "U", "X"))
        nd = np.where(have, np.asarray(merged[f"{p}_ndet"]).astype(str), "00")
        per[b] = {"rd": rd, "bl": bl, "ph": ph, "nd": nd}
        out[f"{p}_x"] = MaskedColumn(col("x"), mask=~have)
        out[f"{p}_y"] = MaskedColumn(col("y"), mask=~have)
    out["ph_qual"] = flags.join_bands(*(per[b]["ph"] for b in flags.BANDS))
    out["rd_flg"] = flags.join_bands(*(per[b]["rd"] for b in flags.BANDS))
    out["bl_flg"] = flags.join_bands(*(per[b]["bl"] for b in flags.BANDS))
    out["cc_flg"] = np.asarray(merged["cc_flg"]).astype("<U3")
    out["ndet"] = np.char.add(np.char.add(per["J"]["nd"], per["H"]["nd"]), per["K"]["nd"])
    for other in ("h", "k"):
        out[f"sep_j_{other}"] = merged[f"sep_j_{other}"]
    out["scan"] = np.full(n, int(scan), np.int32)
    out["jdate"] = np.full(n, float(jdate))
    out["x_scan"] = np.asarray(merged["x_scan"], float)
    return out
