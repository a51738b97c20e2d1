"""Per-band photometry by regime and the PSC rows of merged sources (synthetic inputs with
known answers: which measurement each source must take, and the flags that follow)."""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from gpu2mass.bandmerge import run_bandmerge
from gpu2mass.catalog import assemble_point_sources, band_photometry


def _inputs(rng, n=40):
    flux = np.geomspace(50.0, 2e5, n)
    psf = Table({"ra": np.full(n, 10.0), "dec": np.linspace(0, 0.01, n), "ra_err": np.full(n, 0.05),
                 "dec_err": np.full(n, 0.05), "flux": flux * 0.9, "flux_err": 0.02 * flux + 5,
                 "psfchi": np.ones(n), "bl_flg": np.ones(n, int), "status": np.zeros(n, int)})
    # The standard aperture sees 1/0.9 of the PSF flux (normalisation 1.111), with noise.
    ap = flux * (1 + rng.normal(0, 0.002, n))
    aper = Table({"flux_stdap": ap, "flux_stdap_err": 0.003 * ap + 5, "n_sat": np.zeros(n, int),
                  "n_det": np.full(n, 6), "n_meas": np.full(n, 6), "ndet": np.full(n, "66")})
    return psf, aper


def test_regimes_and_normalisation(rng):
    psf, aper = _inputs(rng)
    psf["status"][3] = 16  # no data: the 4" aperture (rd_flg 4)
    psf["status"][5] = 48  # no frame holds it inside the array's edge: no measurement (rd_flg 9)
    aper["n_sat"][-3:] = 2  # saturated in R2-R1: R1 photometry for two, nothing for one
    r1 = Table({"index": [37, 38], "r1_status": [1, 1], "flux_stdap": [3e5, 4e5],
                "flux_stdap_err": [3e3, 4e3]})
    fit = Table({"index": [39], "flux": [9e5], "flux_err": [9e4], "ra": [10.0], "dec": [0.2]})
    t = band_photometry(psf, aper, r1=r1, saturated_fit=fit, zp=20.0, band="K")
    assert abs(t.meta["psf_norm"] - 1 / 0.9) < 0.003
    rd = np.asarray(t["rd_flg"])
    assert rd[3] == 4 and list(rd[-3:]) == [1, 1, 3] and np.all(rd[[0, 1, 2, 10, 20]] == 2)
    assert rd[5] == 9 and not np.isfinite(t["m"][5]) and not np.isfinite(t["snr"][5])
    # PSF magnitudes land on the standard-aperture scale.
    ok = rd == 2
    np.testing.assert_allclose(t["m"][ok], 20.0 - 2.5 * np.log10(aper["flux_stdap"][ok]), atol=0.01)
    assert np.isclose(t["m"][-1], 20.0 - 2.5 * np.log10(9e5))
    assert t["dec"][-1] == 0.2 and not t["duplicate"].any()  # the profile fit's position
    # ph_qual follows the SNR: the faintest are C/D, the bright ones A; rd_flg 4 is E.
    assert t["ph_qual"][3] == "E" and t["ph_qual"][20] == "A"
    assert set(np.asarray(t["bl_flg"])[rd != 9]) <= set("1") and t["bl_flg"][5] == "0"


def test_merged_rows(rng):
    psf, aper = _inputs(rng, n=10)
    bands = {}
    for b in ("J", "H", "K"):
        t = band_photometry(psf, aper, zp=20.0, band=b)
        t["x_scan"] = np.zeros(10)
        t["y_scan"] = np.arange(10) * 30.0 + (0.1 if b == "H" else 0.0)
        t["sig_x"] = np.full(10, 0.1)
        t["sig_y"] = np.full(10, 0.1)
        t["sig_xy"] = np.zeros(10)
        t["x"], t["y"] = np.zeros(10), np.zeros(10)
        if b == "K":
            t = t[:8]  # the last two have no Ks detection
        bands[b] = t
    merged = run_bandmerge(bands)
    lim = {"K": {"m_ul": np.ma.masked_invalid(np.full(len(merged), 16.5))}}
    pts = assemble_point_sources(merged, scan=3, ra0=10.0, dec0=0.0, jdate=2461000.5,
                                 upper_limits=lim)
    assert len(pts) == 10
    no_k = np.asarray(pts["rd_flg"].astype(str))
    assert sorted(s[2] for s in no_k)[:2] == ["0", "0"]
    rows = [i for i, s in enumerate(no_k) if s[2] == "0"]
    assert all(pts["ph_qual"][i][2] == "U" and pts["k_m"][i] == 16.5 for i in rows)
    assert all(len(s) == 3 for s in pts["ph_qual"]) and all(len(s) == 6 for s in pts["ndet"])
    assert np.all(pts["err_maj"] >= pts["err_min"]) and np.all(pts["scan"] == 3)


def test_a_saturated_star_detected_twice_is_one(rng):
    psf, aper = _inputs(rng, n=6)
    aper["n_sat"][-2:] = 3
    fit = Table({"index": [4, 5], "flux": [8e5, 9e5], "flux_err": [8e4, 9e4],
                 "ra": [10.0, 10.0], "dec": [0.1, 0.1 + 3.0 / 3600]})
    t = band_photometry(psf, aper, saturated_fit=fit, zp=20.0, band="J")
    assert list(t["duplicate"]) == [False] * 4 + [True, False]


def test_a_poor_fit_on_one_frame_is_a_cosmic_ray(rng):
    """``lone_max_psfchi``: a PSF fit that at most one frame measured, with psfchi above 6 and
    SNR below 50, is flagged for dropping; the same fit on six frames, a good fit on one
    frame, and a bright star's poor fit on one frame are kept."""
    psf, aper = _inputs(rng, n=10)
    psf["flux"] = np.full(10, 1000.0)
    psf["flux_err"] = np.full(10, 70.0)  # SNR ~15
    psf["psfchi"][[1, 2, 3]] = [9.0, 9.0, 2.0]
    aper["n_meas"][[1, 3, 4]] = 1
    aper["n_det"][[1, 3, 4]] = 1
    psf["psfchi"][4] = 9.0
    psf["flux_err"][4] = 10.0  # SNR 100
    t = band_photometry(psf, aper, zp=20.0, band="K")
    assert list(np.flatnonzero(t["cosmic_ray"])) == [1]
