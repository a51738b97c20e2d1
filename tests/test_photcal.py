"""Photometric calibration (gpu2mass.photcal): matching calibration scans to standards, the
night's zero-point solution and its form selection, and applying it, against synthetic
calibration data with known zero points, drifts, extinction and outliers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import MaskedColumn, Table, vstack

from gpu2mass.config import STEP_CONFIGS, RunConfig
from gpu2mass.errors import ConfigError, StepError
from gpu2mass.photcal import (
    NightCalibration,
    PhotcalConfig,
    PhotcalWarning,
    apply_calibration,
    atlas_magzp,
    calibration_matches,
    frame_zero_points,
    solve_night_calibration,
)

BANDS = ("J", "H", "K")
ZP_INST = {"J": 20.95, "H": 20.92, "K": 19.88}
EXT = {"J": 0.109, "H": 0.031, "K": 0.061}
T0 = 51619.0  # MJD of the synthetic night's first calibration observation


def _frames(mjd0: float, airmass0: float, *, dec0=0.0, n=16, step_s=1.3, dxdt=0.0):
    """A north-going scan's frames table: centres 82.8" apart in Dec, 1.3 s apart."""
    k = np.arange(n)
    cols = {"band": [], "mjd": [], "ra": [], "dec": [], "airmass": []}
    for b in BANDS:
        cols["band"] += [b] * n
        cols["mjd"].append(mjd0 + k * step_s / 86400)
        cols["ra"].append(np.full(n, 150.0))
        cols["dec"].append(dec0 + k * 82.8 / 3600)
        cols["airmass"].append(airmass0 + dxdt * k)
    return {c: (np.asarray(v) if c == "band" else np.concatenate(v)) for c, v in cols.items()}


def _synthetic_matches(rng, c1, *, n_obs=6, scans_per_obs=6, hours=8.0, n_std=40, airmass=None,
                       outlier_frac=0.0, cloudy_scan=None, noise=0.01, scan_jitter=0.0, c2=EXT):
    """Match tables of ``n_obs`` calibration observations spread over ``hours``.

    ``c1``: band → callable of hours since T0 giving the true c1. Star measurements are
    ``m_inst = m_std − c1(t) + c2 (X − 1) + noise``; ``outlier_frac`` of them are off by
    0.2–1 mag too faint (saturated cores); ``cloudy_scan`` (a scan number) loses 0.3 mag.
    """
    tables = []
    scan = 2
    for o in range(n_obs):
        t_obs = hours * o / max(n_obs - 1, 1)
        x_obs = 1.0 + (0.0 if airmass is None else airmass[o])
        for k in range(scans_per_obs):
            t_h = t_obs + k * 1.5 / 60
            rows = []
            for b in BANDS:
                m_std = rng.uniform(10, 13.5, n_std)
                x = np.full(n_std, x_obs + 0.002 * k)
                mjd = T0 + t_h / 24 + rng.uniform(0, 20, n_std) / 86400
                m_inst = (m_std - c1[b]((mjd - T0) * 24) + c2[b] * (x - 1) + rng.normal(0, noise, n_std)
                          + rng.normal(0, scan_jitter))
                bad = rng.random(n_std) < outlier_frac
                m_inst[bad] += rng.uniform(0.2, 1.0, bad.sum())
                if scan == cloudy_scan:
                    m_inst += 0.3
                t = Table()
                t["band"] = np.full(n_std, b)
                t["scan"] = np.full(n_std, scan, np.int32)
                t["field"] = np.full(n_std, f"cal{o % 3:02d}")
                t["std_index"] = np.arange(n_std)
                t["ra"], t["dec"] = rng.uniform(0, 1, n_std), rng.uniform(0, 1, n_std)
                t["sep_arcsec"] = np.zeros(n_std)
                t["mjd"], t["airmass"] = mjd, x
                t["m_inst"], t["m_inst_sig"] = m_inst, np.full(n_std, noise)
                t["m_std"], t["m_std_sig"] = m_std, np.zeros(n_std)
                t["sig"] = np.full(n_std, np.hypot(noise, 0.01))
                t["snr"] = np.full(n_std, 100.0)
                t["rd_flg"], t["ph_qual"], t["cc_flg"] = np.full(n_std, "2"), np.full(n_std, "A"), np.full(n_std, "0")
                t["zp_inst"] = np.full(n_std, ZP_INST[b])
                t["usable"] = np.ones(n_std, bool)
                rows.append(t)
            m = vstack(rows)
            m.meta.update(scan=scan, zp_inst=dict(ZP_INST))
            tables.append(m)
            scan += 1
    return tables


def _const(v):
    return lambda t: np.full(np.shape(t), v)


def _c1_at(cal, band, hours):
    mjd = T0 + np.asarray(hours) / 24
    return cal.offset(band, mjd, np.ones_like(mjd))


def test_constant_zero_point_chosen_and_recovered(rng):
    truth = {"J": _const(0.05), "H": _const(-0.03), "K": _const(0.11)}
    cal = solve_night_calibration(_synthetic_matches(rng, truth), config=PhotcalConfig())
    assert cal.status == "calibrated" and cal.reasons == ()
    h = np.linspace(0, 8, 9)
    for b in BANDS:
        bc = cal.bands[b]
        assert bc.form == "constant", (b, bc.loo_rms)
        assert bc.n_observations == 6 and bc.n_scans == 36
        # 36 scans × 40 stars of 0.01 mag: the mean is good to ~0.0003 mag.
        np.testing.assert_allclose(_c1_at(cal, b, h), truth[b](h), atol=0.002)
        assert 0.009 < cal.residual_rms(b) < 0.011  # the stars' own 0.01 mag
        # Every form was scored on the six observations.
        assert all(np.isfinite(bc.loo_rms[f]) for f in ("constant", "linear", "quadratic", "piecewise"))


def test_linear_drift_chosen_and_recovered(rng):
    # 0.02 mag per hour in J and Ks, constant in H: 0.16 mag over the night.
    truth = {"J": lambda t: 0.03 + 0.02 * t, "H": _const(0.0), "K": lambda t: -0.05 - 0.02 * t}
    cal = solve_night_calibration(_synthetic_matches(rng, truth), config=PhotcalConfig())
    h = np.linspace(0, 8, 17)
    assert cal.bands["J"].form == "linear" and cal.bands["K"].form == "linear"
    assert cal.bands["H"].form == "constant"
    for b in BANDS:
        np.testing.assert_allclose(_c1_at(cal, b, h), truth[b](h), atol=0.003)
    # A constant form would miss the drift by ~0.05 mag rms between observations.
    assert cal.bands["J"].loo_rms["constant"] > 5 * cal.bands["J"].loo_rms["linear"]


def test_piecewise_break_chosen(rng):
    # Clouds clear at 4 h: flat, then a 0.03 mag/h change (2MASS found piecewise best in J).
    truth = {b: (lambda t: 0.02 + 0.03 * np.maximum(np.asarray(t) - 4.0, 0.0)) for b in BANDS}
    cal = solve_night_calibration(_synthetic_matches(rng, truth, n_obs=9), config=PhotcalConfig())
    h = np.linspace(0, 8, 17)
    for b in BANDS:
        assert cal.bands[b].form == "piecewise", cal.bands[b].loo_rms
        np.testing.assert_allclose(_c1_at(cal, b, h), truth[b](h), atol=0.004)


def test_outliers_and_a_cloudy_scan_are_rejected(rng):
    truth = {"J": lambda t: 0.01 * t, "H": _const(0.02), "K": _const(-0.04)}
    matches = _synthetic_matches(rng, truth, outlier_frac=0.15, cloudy_scan=9)
    cal = solve_night_calibration(matches, config=PhotcalConfig())
    h = np.linspace(0, 8, 9)
    for b in BANDS:
        bc = cal.bands[b]
        np.testing.assert_allclose(_c1_at(cal, b, h), truth[b](h), atol=0.004)
        scans = {r["scan"]: r["used"] for r in bc.scans}
        assert scans[9] is False and sum(scans.values()) == 35
        std = [r for r in bc.standards if r["scan"] != 9]
        used = np.array([r["used"] for r in std])
        resid = np.abs(np.array([r["residual"] for r in std]))
        # Outliers (≥ 0.2 mag) are out; the good stars (0.014 mag) stay in.
        assert not used[resid > 0.2].any()
        assert used[resid < 0.04].mean() > 0.99
    # Without rejection the outliers and the cloud pull the zero point off (the test can fail).
    loose = solve_night_calibration(matches, config=PhotcalConfig(clip_sigma=1e6))
    assert np.max(np.abs(_c1_at(loose, "H", h) - 0.02)) > 0.05  # ~0.15 × 0.6 mag


def test_no_calibration_scans_keeps_instrumental_zero_points():
    cal = solve_night_calibration([], config=PhotcalConfig(), zp_inst=ZP_INST)
    assert cal.status == "instrumental" and "no calibration scans" in cal.reasons[0]
    for b in BANDS:
        # c1 = 0; the extinction term is still applied; the zero point is uncertain.
        np.testing.assert_allclose(cal.offset(b, [T0, T0 + 0.2], [1.0, 1.5]), [0.0, -0.5 * EXT[b]])
        np.testing.assert_allclose(cal.offset_err(b, [T0]), [0.1])
        assert cal.bands[b].zp_inst == ZP_INST[b]
    assert NightCalibration.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False))).status == "instrumental"
    # An uncalibrated Atlas Image keeps its own instrumental zero point, less the extinction.
    assert atlas_magzp(cal, "K", T0, 1.2, 19.5) == pytest.approx((19.5 - 0.2 * EXT["K"], 0.1))
    # Calibration scans whose field has no standards: instrumental too, saying why.
    with pytest.warns(PhotcalWarning, match="no standards"):
        empty = calibration_matches(Table({"ra": [1.0], "dec": [2.0]}), _frames(T0, 1.0), None, scan=2,
                                    field="cal06p30", zp_inst=ZP_INST)
    cal = solve_night_calibration([empty], config=PhotcalConfig())
    assert cal.status == "instrumental" and "no standard matched in 1 calibration scan" in cal.reasons[0]


def test_one_band_without_standards_is_partial(rng):
    truth = {b: _const(0.02) for b in BANDS}
    matches = [m[m["band"] != "K"] for m in _synthetic_matches(rng, truth, n_obs=2)]
    cal = solve_night_calibration(matches, config=PhotcalConfig())
    assert cal.status == "partial" and cal.bands["K"].status == "instrumental"
    assert cal.bands["J"].status == "calibrated" and any("band K" in r for r in cal.reasons)


def test_single_observation_gives_its_constant(rng):
    truth = {b: _const(-0.07) for b in BANDS}
    cal = solve_night_calibration(_synthetic_matches(rng, truth, n_obs=1, hours=0.0), config=PhotcalConfig())
    for b in BANDS:
        assert cal.bands[b].form == "constant" and all(np.isnan(v) for v in cal.bands[b].loo_rms.values())
        # Held constant away from the observation, not extrapolated.
        np.testing.assert_allclose(_c1_at(cal, b, [0.0, 5.0]), [-0.07, -0.07], atol=0.003)


def test_extinction_fit_recovers_c2(rng):
    truth = {b: _const(0.0) for b in BANDS}
    true_c2 = {"J": 0.15, "H": 0.05, "K": 0.08}
    matches = _synthetic_matches(rng, truth, airmass=[0.0, 0.4, 0.8, 0.2, 0.6, 0.1], c2=true_c2)
    fitted = solve_night_calibration(matches, config=PhotcalConfig(fit_extinction=True))
    fixed = solve_night_calibration(matches, config=PhotcalConfig())
    for b in BANDS:
        bc = fitted.bands[b]
        assert bc.c2_fitted and abs(bc.c2 - true_c2[b]) < 5 * bc.c2_err + 0.003
        assert abs(fitted.offset(b, T0 + 0.1, 1.5) - (-0.5 * true_c2[b])) < 0.005
        # The default c2 misses by (c2_true − c2_default)(X − 1) at X = 1.5, less what c1
        # absorbs at the observations' mean airmass (X − 1 = 0.35).
        assert not fixed.bands[b].c2_fitted
        miss = fixed.offset(b, T0 + 0.1, 1.5) - (-0.5 * true_c2[b])
        assert miss == pytest.approx((true_c2[b] - EXT[b]) * (0.5 - 0.35), abs=0.002)
    # Without an airmass spread c2 stays at its default, and says so.
    flat = solve_night_calibration(_synthetic_matches(rng, truth, n_obs=3), config=PhotcalConfig(fit_extinction=True))
    assert not flat.bands["J"].c2_fitted and "not fitted" in flat.bands["J"].note


def test_json_round_trip_and_zero_point_errors(rng):
    truth = {"J": lambda t: 0.01 * t, "H": _const(0.02), "K": _const(-0.04)}
    cal = solve_night_calibration(_synthetic_matches(rng, truth, scan_jitter=0.005), config=PhotcalConfig())
    d = json.loads(json.dumps(cal.to_dict(), allow_nan=False))
    assert set(d["bands"]["J"]) >= {"form", "coefficients", "covariance", "c2", "loo_rms", "scans", "standards"}
    back = NightCalibration.from_dict(d)
    mjd = T0 + np.linspace(-0.1, 0.5, 7)
    x = np.linspace(1.0, 2.0, 7)
    for b in BANDS:
        np.testing.assert_allclose(back.offset(b, mjd, x), cal.offset(b, mjd, x), rtol=0, atol=1e-12)
        np.testing.assert_allclose(back.offset_err(b, mjd), cal.offset_err(b, mjd), rtol=0, atol=1e-12)
        assert back.residual_rms(b) == pytest.approx(cal.residual_rms(b), abs=1e-5)  # 5 decimals kept
        # The quoted error covers the scan-to-scan jitter the data were made with.
        err = cal.offset_err(b, mjd)
        assert np.all((err > 0.003) & (err < 0.01)), err
        assert 0.0025 < cal.bands[b].jitter < 0.008


def test_mixed_instrumental_zero_points_raise(rng):
    truth = {b: _const(0.0) for b in BANDS}
    m = _synthetic_matches(rng, truth, n_obs=2)
    m[1].meta["zp_inst"] = {**ZP_INST, "H": 21.0}
    with pytest.raises(StepError, match="instrumental zero point"):
        solve_night_calibration(m, config=PhotcalConfig())


def test_config_is_registered_and_checked():
    assert STEP_CONFIGS["photcal"] == ("gpu2mass.photcal", "PhotcalConfig")
    cfg = RunConfig({}).with_overrides(["photcal.fit_extinction=true", "photcal.forms=['constant', 'linear']"])
    assert cfg.photcal.fit_extinction and cfg.photcal.forms == ("constant", "linear")
    with pytest.raises(ConfigError):
        PhotcalConfig(forms=("cubic",))


# --- Matching a calibration scan and applying the solution ----------------------------


def _pts_for(standards, field, frames, c1, rng, *, extra=()):
    """A cal scan's pts rows at the standards of ``field`` (plus ``extra`` rows), with
    instrumental magnitudes made from the true zero point."""
    sel = np.flatnonzero(standards["field"] == field)
    n = sel.size + len(extra)
    ra = np.concatenate([standards["ra"][sel] + rng.normal(0, 0.1, sel.size) / 3600, [e[0] for e in extra]])
    dec = np.concatenate([standards["dec"][sel] + rng.normal(0, 0.1, sel.size) / 3600, [e[1] for e in extra]])
    from gpu2mass.epochs import source_epochs

    t = Table()
    t["ra"], t["dec"] = ra, dec
    for b in BANDS:
        p = b.lower()
        _, x = source_epochs(ra, dec, frames, b)
        m = np.concatenate([standards[f"{p}_m"][sel], [e[2] for e in extra]])
        t[f"{p}_m"] = MaskedColumn(m - c1[b] + EXT[b] * (x - 1) + rng.normal(0, 0.005, n), mask=np.isnan(m))
        t[f"{p}_cmsig"] = np.full(n, 0.005)
        t[f"{p}_msigcom"] = MaskedColumn(np.full(n, 0.008), mask=np.isnan(m))
        t[f"{p}_snr"] = np.full(n, 200.0)
        t[f"{p}_m_stdap"] = t[f"{p}_m"] + 0.001
        t[f"{p}_flux"] = 10 ** (-0.4 * (t[f"{p}_m"].filled(np.nan) - ZP_INST[b]))
    t["rd_flg"] = np.full(n, "222")
    t["ph_qual"] = np.full(n, "AAA")
    t["bl_flg"] = np.full(n, "111")
    t["cc_flg"] = np.full(n, "000")
    return t


@pytest.fixture
def standards(rng):
    """Two fields: 30 standards in a 0.3° strip at Dec 0 and 5 elsewhere."""
    n = 30
    t = Table()
    t["field"] = np.array(["cal06p30"] * n + ["cal12m00"] * 5)
    t["ra"] = np.concatenate([150 + rng.uniform(-0.02, 0.02, n), np.full(5, 180.0)])
    t["dec"] = np.concatenate([rng.uniform(0.0, 0.3, n), np.zeros(5)])
    for b, lo in zip(BANDS, (9.0, 8.6, 8.3), strict=True):
        t[f"{b.lower()}_m"] = np.concatenate([rng.uniform(lo, 14.0, n), np.full(5, 12.0)])
        t[f"{b.lower()}_msig"] = np.full(n + 5, 0.01)
    for b in BANDS:  # the three standards the cuts are tested on: isolated, unsaturated
        t[f"{b.lower()}_m"][:3] = 12.0
    t["ra"][:3], t["dec"][:3] = 150.03, [0.05, 0.15, 0.25]
    t["k_m"][3] = np.nan  # a standard without Ks
    return t


def test_calibration_matches_cuts_and_epochs(standards, rng):
    frames = _frames(T0 + 0.1, 1.2, dxdt=0.01)
    c1 = {"J": 0.04, "H": -0.02, "K": 0.01}
    # A confusing neighbour 2" from standard 0, as bright as it: it is not used.
    extra = [(standards["ra"][0], standards["dec"][0] + 2 / 3600, standards["j_m"][0] - 0.0)]
    pts = _pts_for(standards, "cal06p30", frames, c1, rng, extra=extra)
    pts["rd_flg"][1] = "122"  # J measured on R1: not a calibrator in J
    pts["cc_flg"][2] = "0d0"  # a diffraction spike in H
    m = calibration_matches(pts, frames, standards, scan=5, field="cal06p30", zp_inst=ZP_INST)
    assert set(m["field"]) == {"cal06p30"} and set(m["scan"]) == {5}
    assert len(m[m["band"] == "K"]) == 29 and len(m[m["band"] == "J"]) == 30
    mj = m[m["band"] == "J"]
    assert not mj["usable"][mj["std_index"] == 0][0] and not mj["usable"][mj["std_index"] == 1][0]
    mh = m[m["band"] == "H"]
    assert not mh["usable"][mh["std_index"] == 2][0] and mh["usable"][mh["std_index"] == 1][0]
    # Standards brighter than the R2−R1 saturation regime are not used.
    assert not np.any(m["usable"] & (m["band"] == "J") & (m["m_std"] < 9.5))
    # Each standard's epoch and airmass are its own: along the scan.
    from gpu2mass.epochs import source_epochs

    _, x = source_epochs(standards["ra"][:30], standards["dec"][:30], frames, "J")
    np.testing.assert_allclose(np.sort(mj["airmass"]), np.sort(x), atol=1e-4)
    assert np.ptp(mj["airmass"]) > 0.1
    assert np.all(m["sep_arcsec"] < 1.0)
    with pytest.warns(PhotcalWarning, match="no standards"):
        e = calibration_matches(pts, frames, standards, scan=5, field="nowhere", zp_inst=ZP_INST)
    assert len(e) == 0


def test_end_to_end_matches_solve_apply(standards, rng):
    from gpu2mass.epochs import source_epochs

    c1 = {"J": 0.04, "H": -0.02, "K": 0.01}
    cal_frames = [_frames(T0 + 0.1 + k * 0.001, 1.1 + 0.05 * k) for k in range(6)]
    matches = [calibration_matches(_pts_for(standards, "cal06p30", f, c1, rng), f, standards, scan=2 + k,
                                   field="cal06p30", zp_inst=ZP_INST) for k, f in enumerate(cal_frames)]
    cal = solve_night_calibration(matches, config=PhotcalConfig())
    assert cal.status == "calibrated"
    # A science scan later at higher airmass: its sources' true magnitudes come back.
    sci_frames = _frames(T0 + 0.15, 1.4, dec0=0.0, dxdt=0.005)
    sci = _pts_for(standards, "cal06p30", sci_frames, c1, rng)
    # An upper limit (rd_flg 0, msigcom null) in Ks.
    sci["rd_flg"][5] = "220"
    sci["k_msigcom"].mask[5] = True
    out = apply_calibration(sci, sci_frames, cal)
    for b in BANDS:
        p = b.lower()
        truth = standards[f"{p}_m"][:30]
        good = np.isfinite(truth)
        dm = np.asarray(out[f"{p}_m"].filled(np.nan))[good] - truth[good]
        assert abs(np.median(dm)) < 0.004 and np.std(dm) < 0.01
        # The shift is per source, and the same for the standard-aperture magnitude.
        shift = np.asarray(out[f"{p}_m"].filled(np.nan)) - np.asarray(sci[f"{p}_m"].filled(np.nan))
        np.testing.assert_allclose(np.asarray(out[f"{p}_m_stdap"].filled(np.nan)) - np.asarray(
            sci[f"{p}_m_stdap"].filled(np.nan)), shift, equal_nan=True)
        mjd, x = source_epochs(np.asarray(sci["ra"]), np.asarray(sci["dec"]), sci_frames, b)
        assert np.ptp(x[good]) > 0.05  # the airmass changes along the scan: so does the shift
        np.testing.assert_allclose(shift[good], cal.offset(b, mjd, x)[good], rtol=0, atol=1e-9)
        # msigcom gets the zero point's error; cmsig and fluxes stay.
        err = np.asarray(out[f"{p}_msigcom"].filled(np.nan))
        zerr = cal.offset_err(b, T0 + 0.15)
        has = good & ~np.asarray(sci[f"{p}_msigcom"].mask)
        np.testing.assert_allclose(err[has], np.hypot(0.008, zerr), rtol=1e-6)
        assert 0 < zerr < 0.01
        np.testing.assert_array_equal(out[f"{p}_cmsig"], sci[f"{p}_cmsig"])
        np.testing.assert_array_equal(out[f"{p}_flux"], sci[f"{p}_flux"])
    # A band without frames rows is timed by another band's (simultaneous) frames.
    no_k = {c: np.asarray(v)[np.asarray(sci_frames["band"]) != "K"] for c, v in sci_frames.items()}
    np.testing.assert_allclose(apply_calibration(sci, no_k, cal)["k_m"].filled(np.nan), out["k_m"].filled(np.nan),
                               atol=1e-9)
    assert out["k_msigcom"].mask[5] and np.isfinite(out["k_m"][5])
    assert out["k_m"][5] != sci["k_m"][5]  # the upper limit is calibrated too
    # Frame and Atlas zero points: instrumental + offset.
    zp, zerr = frame_zero_points(sci_frames, cal)
    j = np.asarray(sci_frames["band"]) == "J"
    np.testing.assert_allclose(zp[j], ZP_INST["J"] + c1["J"] - EXT["J"] * (sci_frames["airmass"][j] - 1), atol=0.004)
    magzp, magzperr = atlas_magzp(cal, "H", T0 + 0.15, 1.4, ZP_INST["H"])
    assert magzp == pytest.approx(ZP_INST["H"] + c1["H"] - EXT["H"] * 0.4, abs=0.004) and 0 < magzperr < 0.01
    with pytest.raises(StepError):
        atlas_magzp(cal, "H", T0 + 0.15, 1.4, 20.0)
