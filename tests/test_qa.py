"""Scan QA: each 2MASS rule on synthetic scans with a known answer (seeing, untracked seeing,
clouds, calibration residuals, m10, airglow, elongated images) and the qa.json contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from astropy.table import MaskedColumn, Table

from gpu2mass.errors import ConfigError
from gpu2mass.qa import (
    QaConfig,
    atlas_background_noise,
    failed_scan_qa,
    image_moment_ratio,
    m10_from_snr,
    scan_qa,
    seeing_shape,
)
from gpu2mass.sim.mergetruth import atlas_like_image

M10 = {"J": 16.1, "H": 15.4, "K": 14.6}  # deeper than the Level-1 limits by 0.3 mag
BAND_KEYS = ("seeing_fwhm", "sky_dn", "sky_sigma_dn", "m10", "n_sources", "astrometric_rms_arcsec",
             "zp_residual_rms", "airglow_excess")


def snr_model(mag, m10, q_rel=0.02):
    """SNR = F / sqrt(s² + q F), with s and q such that SNR(m10) = 10 exactly; q_rel is the
    source's share of the variance at m10 (background-limited there, as in 2MASS)."""
    f = 10 ** (-0.4 * (np.asarray(mag) - m10))  # F(m10) = 1
    q, s2 = q_rel / 100, (1 - q_rel) / 100  # s² + q = 1/100
    return f / np.sqrt(s2 + q * f)


def make_frames(n=40, *, seeing=2.6, sky=None, rng=None):
    """Frames table columns of an n-frame scan, three bands."""
    rng = rng or np.random.default_rng(0)
    sky = sky or {"J": 750.0, "H": 2800.0, "K": 1700.0}
    rows = {k: [] for k in ("band", "frame", "mjd", "airmass", "seeing_arcsec", "sky_dn", "noise_dn")}
    for b in ("J", "H", "K"):
        for f in range(n):
            rows["band"].append(b)
            rows["frame"].append(f)
            rows["mjd"].append(51600.1 + f * 1.4 / 86400)
            rows["airmass"].append(1.2)
            rows["seeing_arcsec"].append(seeing + 0.02 * rng.standard_normal())
            rows["sky_dn"].append(sky[b] * (1 + 0.002 * rng.standard_normal()))
            rows["noise_dn"].append(math.sqrt(sky[b] / 7 + 30))
    return {k: np.asarray(v) for k, v in rows.items()}


def make_pts(rng, n=600):
    """A scan's pts: magnitudes from a rising count law, SNR from :func:`snr_model` with 0.04 dex
    scatter, detections in all bands (rd_flg 222)."""
    cols = {"ra": rng.uniform(10.0, 10.1, n), "dec": rng.uniform(-5.2, -5.0, n)}
    for b in "JHK":
        m = M10[b] + 2.5 - rng.exponential(1.2, n)  # more faint than bright stars, to m10 + 2.5
        cols[f"{b.lower()}_m"] = m
        cols[f"{b.lower()}_snr"] = snr_model(m, M10[b]) * 10 ** (0.04 * rng.standard_normal(n))
    cols["rd_flg"] = np.full(n, "222")
    return cols


def test_config_checks():
    with pytest.raises(ConfigError, match="qa.zp_rms_bad"):
        QaConfig(zp_rms_good=0.2, zp_rms_bad=0.1)
    with pytest.raises(ConfigError, match="qa.m10_limit"):
        QaConfig(m10_limit={"J": 15.8})
    # The 2MASS seeing-shape relation: FWHM 3.5" ~ shape 1.265.
    assert seeing_shape(3.5) == pytest.approx((3.5 + 0.46) / 3.13)


@pytest.mark.parametrize("q_rel", [0.0, 0.1, 0.4, 0.6])
def test_m10_recovered_from_snr_relation(q_rel):
    rng = np.random.default_rng(11)
    m = 16.3 + 2.0 - rng.exponential(1.5, 1500)
    snr = snr_model(m, 16.3, q_rel) * 10 ** (0.05 * rng.standard_normal(m.size))
    # 8 % outliers: blends and bad fits with SNR a factor 2-4 off.
    bad = rng.random(m.size) < 0.08
    snr[bad] *= 10 ** rng.uniform(-0.6, -0.3, bad.sum())
    m10, n = m10_from_snr(m, snr)
    # Within 0.02 mag (measured: 0.007 at most). Where the sources' own noise matters at
    # SNR 10 (q_rel 0.6), the median of per-star m + 2.5 log10(SNR/10) is off by 0.11 mag.
    assert abs(m10 - 16.3) < 0.02, m10
    assert n > 500
    # Too few detections, or none near SNR 10, give no m10 at all: through scan_qa, the
    # sensitivity factor is then 5 and a reason says why.
    assert math.isnan(m10_from_snr(m[:10], snr[:10])[0])
    bright = snr > 100
    assert math.isnan(m10_from_snr(m[bright], snr[bright])[0])  # no faint stars: no extrapolation
    pts = make_pts(rng, n=600)
    pts["k_snr"][pts["k_snr"] < 20] = np.nan
    q = scan_qa(3, "sci", frames=make_frames(rng=rng), pts=pts, astrometry=None, calibration=None)
    assert q["bands"]["K"]["m10"] is None and q["factors"]["sensitivity"] == 5
    assert any(r.startswith("sensitivity unknown: K m10 not measured") for r in q["reasons"])


def test_good_scan_scores_ten_and_has_the_contract_keys():
    rng = np.random.default_rng(1)
    cal = {b: {"zp_residual_rms": 0.012, "zp_offset": 0.01} for b in "JHK"}
    ast = {b: {"astrometric_rms_arcsec": 0.08, "n_ref": 300, "offset_ra_mas": 5.0, "offset_dec_mas": -3.0}
           for b in "JHK"}
    q = scan_qa(14, "sci", frames=make_frames(rng=rng), pts=make_pts(rng), atlas_images=(),
                astrometry=ast, calibration=cal)
    assert q["score"] == 10 and q["status"] == "ok" and q["reasons"] == []
    assert set(q["bands"]) == {"J", "H", "K"}
    for b, row in q["bands"].items():
        assert set(BAND_KEYS) <= set(row)
        assert abs(row["m10"] - M10[b]) < 0.1
        assert row["seeing_fwhm"] == pytest.approx(2.6, abs=0.02)
        assert row["n_sources"] == 600 and row["zp_residual_rms"] == 0.012
    json.dumps(q, allow_nan=False)  # JSON-able, nulls not NaN


def test_bad_seeing_scores_one_with_a_reason():
    rng = np.random.default_rng(2)
    # Mean J FWHM 3.7" = seeing shape 1.33 >= 1.25.
    q = scan_qa(5, "sci", frames=make_frames(seeing=3.7, rng=rng), pts=make_pts(rng), astrometry=None,
                calibration=None)
    assert q["factors"]["seeing"] == 1 and q["score"] == 1 and q["status"] == "degraded"
    assert any(r.startswith("seeing: J seeing shape mean 1.33") for r in q["reasons"])
    # A single frame above shape 1.30 (FWHM 3.61") is enough too; at 2.6" nothing fires.
    fr = make_frames(seeing=2.6, rng=rng)
    fr["seeing_arcsec"][5] = 3.7
    q = scan_qa(5, "sci", frames=fr, pts=make_pts(rng), astrometry=None, calibration=None)
    assert q["factors"]["seeing"] == 1
    fr["seeing_arcsec"][5] = 2.6
    q = scan_qa(5, "sci", frames=fr, pts=make_pts(rng), astrometry=None, calibration=None)
    assert q["factors"]["seeing"] == 10
    # Missing calibration and astrometry: figures null, photometricity unknown, reasons say so.
    assert q["factors"]["photometricity"] == 5 and q["score"] == 5
    assert q["bands"]["J"]["zp_residual_rms"] is None and q["bands"]["J"]["astrometric_rms_arcsec"] is None
    assert any("photometricity unknown" in r for r in q["reasons"])
    assert any("astrometry unknown" in r for r in q["reasons"])


def test_untracked_seeing_over_900_arcsec():
    rng = np.random.default_rng(3)
    fr = make_frames(n=60, rng=rng)
    j = np.flatnonzero(fr["band"] == "J")
    fr["seeing_arcsec"][j[20:30]] = np.nan  # 10 frames = 828": tracked enough
    q = scan_qa(7, "sci", frames=fr, pts=make_pts(rng), astrometry=None, calibration=None)
    assert q["factors"]["untracked_seeing"] == 10 and q["untracked_seeing_arcsec"] == pytest.approx(828.0)
    fr["seeing_arcsec"][j[30:32]] = np.nan  # 12 frames = 994"
    q = scan_qa(7, "sci", frames=fr, pts=make_pts(rng), astrometry=None, calibration=None)
    assert q["factors"]["untracked_seeing"] == 1 and q["score"] == 1
    assert any(r.startswith("untracked seeing over 994") for r in q["reasons"])


def test_clouds_and_calibration_residuals_grade_photometricity():
    rng = np.random.default_rng(4)
    cal = {b: {"zp_residual_rms": 0.02} for b in "JHK"}
    fr = make_frames(n=60, rng=rng)
    k = np.flatnonzero(fr["band"] == "K")
    # Airglow: J and H rise 8 % together with Ks: not a cloud.
    for b in "JHK":
        fr["sky_dn"][np.flatnonzero(fr["band"] == b)[30:34]] *= 1.08
    q = scan_qa(9, "sci", frames=fr, pts=make_pts(rng), astrometry=None, calibration=cal)
    assert q["factors"]["photometricity"] == 10 and q["cloud_frames"] == 0
    # A cloud: Ks alone up 12 % in 3 frames.
    fr["sky_dn"][k[40:43]] *= 1.12
    q = scan_qa(9, "sci", frames=fr, pts=make_pts(rng), astrometry=None, calibration=cal)
    assert q["factors"]["photometricity"] == 0 and q["score"] == 0 and q["cloud_frames"] == 3
    assert any(r.startswith("clouds: K frame background up to 12 %") and "(40-42)" in r for r in q["reasons"])
    # Zero-point residual rms: 0.065 mag is halfway between 0.03 (10) and 0.10 (0).
    cal = {b: {"zp_residual_rms": 0.02} for b in "JH"} | {"K": {"zp_residual_rms": 0.065}}
    q = scan_qa(9, "sci", frames=make_frames(rng=rng), pts=make_pts(rng), astrometry=None, calibration=cal)
    assert q["factors"]["photometricity"] == 5
    assert any(r.startswith("photometricity: K zero-point residual rms 0.065") for r in q["reasons"])


def test_shallow_scan_loses_sensitivity():
    rng = np.random.default_rng(5)
    pts = make_pts(rng)
    pts["h_m"] = pts["h_m"] - 0.4  # H m10 15.0, 0.1 mag short of the 15.1 limit: P = 16 %
    q = scan_qa(3, "sci", frames=make_frames(rng=rng), pts=pts, astrometry=None, calibration=None)
    assert q["factors"]["sensitivity"] == 2
    assert any(r.startswith("sensitivity: H m10 15.0") for r in q["reasons"])


def test_pts_tables_of_every_kind():
    """astropy masked Tables and pyarrow Tables (nulls) read alike; upper limits are not sources."""
    rng = np.random.default_rng(6)
    cols = make_pts(rng, n=300)
    cols["rd_flg"] = np.array(["222"] * 250 + ["220"] * 50)
    kmask = np.zeros(300, bool)
    kmask[250:] = True
    t = Table(cols)
    t["k_m"] = MaskedColumn(cols["k_m"], mask=kmask)
    t["k_snr"] = MaskedColumn(cols["k_snr"], mask=kmask)
    arrow = pa.table({k: pa.array(np.where(kmask, None, v).tolist() if k in ("k_m", "k_snr") else v)
                      for k, v in cols.items()})
    fr = make_frames(rng=rng)
    qa_t = scan_qa(2, "cal", frames=Table(fr), pts=t, astrometry=None, calibration=None)
    qa_a = scan_qa(2, "cal", frames=pa.table(fr), pts=arrow, astrometry=None, calibration=None)
    for q in (qa_t, qa_a):
        assert q["bands"]["K"]["n_sources"] == 250 and q["bands"]["J"]["n_sources"] == 300
    assert qa_t["bands"]["K"]["m10"] == pytest.approx(qa_a["bands"]["K"]["m10"])


@pytest.fixture(scope="module")
def atlas_image():
    """An Atlas-like 512 x 512 image with 80 stars, its SIGMA and the star positions."""
    rng = np.random.default_rng(7)
    n = 80
    x, y = rng.uniform(20, 490, n), rng.uniform(20, 490, n)
    img, sig, _ = atlas_like_image(rng, shape=(512, 512), sources=(x, y, 10 ** rng.uniform(2.5, 4.0, n)))
    return img, sig, x, y


def test_airglow_excess_detected_on_structured_noise(atlas_image):
    img, sig, _, _ = atlas_image
    clean = atlas_background_noise(img, sig)
    assert abs(clean["ratio"] - 1.0) < 0.03, clean  # stars masked, SIGMA is the pixel noise
    yy, xx = np.mgrid[0:512, 0:512]
    # Airglow-like ripples: a plane wave of 4' wavelength, 4 x the per-pixel noise; a plane
    # gradient (removed by the background model) on top must not count.
    ripple = 4.0 * np.median(sig) * np.sin(2 * np.pi * (0.8 * xx + 0.6 * yy) / 240.0)
    gradient = 0.01 * xx + 0.02 * yy
    res = atlas_background_noise(img + ripple + gradient, sig)
    assert res["airglow_excess"] > QaConfig().airglow_limit, res
    assert abs(atlas_background_noise(img + gradient, sig)["ratio"] - 1.0) < 0.03
    # Through scan_qa: 2 of 3 H images with ripples is more than 3/23 of them -> score 1.
    hdr = {"FILTER": "h", "CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN", "CRPIX1": 256.5, "CRPIX2": 256.5,
           "CRVAL1": 10.05, "CRVAL2": -5.1, "CDELT1": -1 / 3600, "CDELT2": 1 / 3600}
    rng = np.random.default_rng(8)
    images = [(hdr, img, sig), (hdr, img + ripple, sig), (hdr, img + ripple, sig)]
    q = scan_qa(4, "sci", frames=make_frames(rng=rng), pts=make_pts(rng), atlas_images=images,
                astrometry=None, calibration=None)
    h = q["bands"]["H"]
    assert h["n_images"] == 3 and h["airglow_images"] == 2 and q["factors"]["airglow"] == 1
    assert any(r.startswith("airglow: 2 of 3 H Atlas Images") for r in q["reasons"])
    assert q["bands"]["J"]["n_images"] == 0 and q["bands"]["J"]["airglow_excess"] is None


def gaussian_stars(shape, x, y, sx, sy, flux=5000.0, noise=1.0, seed=9):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    img = rng.normal(0.0, noise, shape)
    for xi, yi in zip(x, y, strict=True):
        img += flux / (2 * np.pi * sx * sy) * np.exp(-0.5 * (((xx - xi) / sx) ** 2 + ((yy - yi) / sy) ** 2))
    return img


def test_moment_ratio_round_and_elongated():
    x = np.arange(20, 200, 30.0) + 0.3
    y = np.full(x.size, 40.0) - 0.2
    round_ = image_moment_ratio(gaussian_stars((80, 220), x, y, 1.2, 1.2), x, y, fwhm_px=2.8)
    assert np.all(np.abs(round_ - 1.0) < 0.05), round_
    elong = image_moment_ratio(gaussian_stars((80, 220), x, y, 1.2, 1.8), x, y, fwhm_px=2.8)
    assert np.all(np.abs(elong - 1.2 / 1.8) < 0.05), elong
    # Off the image: NaN.
    assert math.isnan(image_moment_ratio(np.zeros((20, 20)), [2.0], [2.0], fwhm_px=2.8)[0])


def test_elongated_images_score_one():
    rng = np.random.default_rng(10)
    n = 12
    x, y = 40.0 + 36.0 * np.arange(n), np.full(n, 60.0)
    hdr = {"FILTER": "j", "CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN", "CRPIX1": 256.5, "CRPIX2": 60.5,
           "CRVAL1": 10.0, "CRVAL2": 0.0, "CDELT1": -1 / 3600, "CDELT2": 1 / 3600}
    from astropy.io import fits
    from astropy.wcs import WCS

    ra, dec = WCS(fits.Header(list(hdr.items())[1:])).all_pix2world(x, y, 0)
    pts = make_pts(rng, n=n + 400)
    pts["ra"][:n], pts["dec"][:n] = ra, dec
    pts["ra"][n:], pts["dec"][n:] = 10.5, 1.0  # the others far away: the stars are isolated
    pts["j_snr"][:n] = 100.0
    fwhm = 2.6  # 1" pixels
    for sy, expect in ((fwhm / 2.3548, 10), (1.6 * fwhm / 2.3548, 1)):
        img = gaussian_stars((120, 512), x, y, fwhm / 2.3548, sy, seed=11)
        q = scan_qa(6, "sci", frames=make_frames(seeing=fwhm, rng=rng), pts=pts,
                    atlas_images=[(hdr, img, np.ones_like(img))], astrometry=None, calibration=None)
        assert q["factors"]["seeing"] == expect, q["bands"]["J"]["moment_ratio"]
    assert q["bands"]["J"]["moment_ratio"] == pytest.approx(1 / 1.6, abs=0.05)
    assert any(r.startswith("focus: J images are elongated") for r in q["reasons"])


def test_failed_scan_qa():
    q = failed_scan_qa(8, "sci", "frame calibration: all frames saturated")
    assert q["status"] == "failed" and q["score"] == 0
    assert q["reasons"] == ["frame calibration: all frames saturated"]
    assert set(BAND_KEYS) <= set(q["bands"]["H"])
    json.dumps(q, allow_nan=False)


def test_status_from_score_and_positions():
    rng = np.random.default_rng(12)
    cal = {b: {"zp_residual_rms": 0.012} for b in "JHK"}
    ast = {b: {"astrometric_rms_arcsec": 0.08, "n_ref": 300} for b in "JHK"}
    pts = make_pts(rng)
    pts["j_m"] = pts["j_m"] - 0.2  # J m10 15.92 (fitted): 0.12 mag deeper than the limit, P = 88 %
    fr = make_frames(rng=rng)
    q = scan_qa(3, "sci", frames=fr, pts=pts, astrometry=ast, calibration=cal)
    assert q["score"] == 9 and q["status"] == "ok"  # ok, and the reason still says why not 10
    assert len(q["reasons"]) == 1 and q["reasons"][0].startswith("sensitivity: J m10 15.9")
    bad = {**ast, "H": {"astrometric_rms_arcsec": 0.45, "n_ref": 300}}
    q = scan_qa(3, "sci", frames=fr, pts=pts, astrometry=bad, calibration=cal)
    assert q["score"] == 9 and q["status"] == "degraded"
    assert any(r.startswith('astrometry: H rms 0.450"') for r in q["reasons"])
    q = scan_qa(3, "sci", frames=fr, pts=pts, astrometry=None, calibration=cal)
    assert q["status"] == "degraded"
    q = scan_qa(3, "sci", frames=fr, pts=pts, astrometry=ast, calibration=None)  # score 5
    assert q["score"] == 5 and q["status"] == "degraded"


def check_processed_night_qa(out, night):
    """The QA products of a processed tiny night against its truth (used by the test below)."""
    import pyarrow.parquet as pq

    truth = pq.read_table(night / "truth" / "frames.parquet").to_pydict()
    t_scan, t_band = np.asarray(truth["scan"]), np.asarray(truth["band"])
    t_fwhm, t_sky = np.asarray(truth["fwhm_arcsec"]), np.asarray(truth["sky_dn"])
    for scan in (2, 3):
        q = json.loads((out / "scans" / f"{scan:03d}" / "qa.json").read_text())
        assert q["scan"] == scan and 0 <= q["score"] <= 10 and q["status"] in ("ok", "degraded")
        assert q["status"] == "ok" or q["reasons"]
        for b in "JHK":
            row = q["bands"][b]
            assert set(BAND_KEYS) <= set(row)
            sel = (t_scan == scan) & (t_band == b)
            # Seeing and background are the frames' own measurements: the truth within 0.1"
            # (measured -0.04 to +0.02") and 1 % (0.1 %).
            assert abs(row["seeing_fwhm"] - np.median(t_fwhm[sel])) < 0.1
            assert abs(row["sky_dn"] / np.median(t_sky[sel]) - 1) < 0.01
            # Three Atlas Images per band; the simulator's airglow (<= 0.6 % of the sky) is far
            # from the limit, the PSF is round (ratio 0.95-0.97 measured).
            assert row["n_images"] == 3 and row["airglow_excess"] < QaConfig().airglow_limit
            assert row["moment_ratio"] > 0.9
            assert row["n_sources"] > 100 and 13.5 < row["m10"] < 17.0
    html = (out / "night" / "qa.html").read_text()
    assert html[html.index('<table id="scans">'):].count("<tr class=") == 2
    assert html.count("data:image/png;base64,") >= 3


def test_processed_tiny_night_qa(processed_tiny, tiny_night):
    check_processed_night_qa(processed_tiny, tiny_night)
