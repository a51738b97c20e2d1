"""Error calibration from calibration-scan repeats (gpu2mass.errcal): synthetic repeats
with known per-scan offsets, quoted scale errors and floors, the fallback without repeats, the rewrite of
cmsig/msigcom/ph_qual, and the tiny night's products."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from gpu2mass import flags
from gpu2mass.config import STEP_CONFIGS, RunConfig
from gpu2mass.errcal import (
    BandErrors,
    ErrcalConfig,
    ErrorCalibration,
    apply_error_calibration,
    repeat_residuals,
    solve_error_calibration,
)
from gpu2mass.errors import ConfigError

SYSTEMATIC = 0.005


def _raw_sigma(m):
    """A photon-plus-sky error law: 1.2 mmag at 9th, 0.05 mag at 14th, 0.12 at 15th magnitude."""
    f = 10 ** (-0.4 * (m - 9.0))
    return 1.0857 * np.sqrt(f * 1e-6 + 1.6e-7) / f


def _field(rng, n_stars=400):
    m = rng.uniform(9.0, 15.0, n_stars)
    # Stars on a 20" grid (well apart at the 1" match radius), about RA 100°, Dec +30°.
    side = int(np.ceil(np.sqrt(n_stars)))
    i = np.arange(n_stars)
    dec = 30.0 + (i // side) * 20.0 / 3600
    ra = 100.0 + (i % side) * 20.0 / 3600 / np.cos(np.deg2rad(30.0))
    return m, ra, dec


def _scan(rng, m_true, ra, dec, *, scan_offset, floor, factor=1.0):
    """One scan's rows: magnitudes off by the scan's offset plus noise of
    sqrt((factor·σ)² + floor²); quoted errors σ (the raw cmsig)."""
    sig = _raw_sigma(m_true)
    m = m_true + scan_offset + rng.normal(0, np.sqrt((factor * sig) ** 2 + floor**2))
    t = Table()
    t["ra"] = ra + rng.normal(0, 0.05 / 3600, ra.size)
    t["dec"] = dec + rng.normal(0, 0.05 / 3600, ra.size)
    for p in "jhk":
        t[f"{p}_m"] = m
        t[f"{p}_cmsig"] = sig
        t[f"{p}_msigcom"] = np.hypot(sig, SYSTEMATIC)
        t[f"{p}_snr"] = 1.0857 / sig
        t[f"{p}_psfchi"] = np.ones(m.size)
    t["rd_flg"] = np.full(m.size, "222")
    t["ph_qual"] = np.full(m.size, "AAA")
    return t


def _spread(x):
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def test_floor_and_scale_factor_recovered_from_repeats_normalise_new_scans(rng):
    """Per-scan offsets (4 mmag rms) whose quoted scale errors say 2 mmag, and a 2 mmag
    per-measurement floor: the floor comes out without the offsets, the scale factor ≈ 2,
    and a further scan's errors against the truth come out unit spread in every magnitude
    range (the raw ones are 2-4x too small at the bright end)."""
    m_true, ra, dec = _field(rng)
    offsets = rng.normal(0, 0.004, 12)
    offsets = (offsets - offsets.mean()) / offsets.std(ddof=1) * 0.004
    quoted = 0.002 / 1.0857  # fractional
    cal = {s: _scan(rng, m_true, ra, dec, scan_offset=offsets[s - 2], floor=0.002) for s in range(2, 14)}
    errors = solve_error_calibration(cal, scale_errors={s: dict.fromkeys("JHK", quoted) for s in cal})
    assert errors.status == "corrected"
    for b in flags.BANDS:
        e = errors.bands[b]
        assert e.factor == 1.0
        assert e.floor_mag == pytest.approx(0.002, abs=0.0008)
        assert e.scale_factor == pytest.approx(2.0, abs=0.3)
        assert 250 < e.n_stars < 400 and len(e.bins) >= 4
        bright = e.bins[0]
        assert bright["spread_raw"] > 1.5 and 0.8 < bright["spread"] < 1.2
        # The offsets found are the ones put in (about their mean).
        found = np.array([r["offset_mag"] for r in e.scans])
        assert np.allclose(found - found.mean(), offsets, atol=0.0008)
    # Science scans with their own offsets from the same distribution, pooled against the
    # truth as profiling/measure_point_sources.py does.
    dm, raw_sig, new_sig = [], [], []
    sci_offsets = rng.normal(0, 1, 8)
    for off in (sci_offsets - sci_offsets.mean()) / sci_offsets.std(ddof=1) * 0.004:
        sci = _scan(rng, m_true, ra, dec, scan_offset=off, floor=0.002)
        out = apply_error_calibration(sci, errors, systematic_mag=SYSTEMATIC,
                                      scale_err=dict.fromkeys("JHK", quoted), scan=20)
        dm.append(np.asarray(out["j_m"]) - m_true)
        raw_sig.append(np.asarray(sci["j_cmsig"]))
        new_sig.append(np.asarray(out["j_cmsig"]))
    dm, raw_sig, new_sig, mags = (np.concatenate(x) for x in (dm, raw_sig, new_sig, [m_true] * 8))
    for lo, hi in ((9, 11), (11, 13), (13, 14.5)):
        sel = (mags >= lo) & (mags < hi)
        raw = _spread(dm[sel] / raw_sig[sel])
        new = _spread(dm[sel] / new_sig[sel])
        assert 0.85 < new < 1.15, (lo, raw, new)
        if lo == 9:
            assert raw > 2.0


def test_scale_factor_needs_quoted_errors_and_is_never_below_one(rng):
    """Without quoted scale errors the factor is 1; with quoted errors larger than the
    offsets show, it is clamped at 1 (quoted errors are not shrunk)."""
    m_true, ra, dec = _field(rng, 200)
    offsets = rng.normal(0, 0.001, 6)
    cal = {s: _scan(rng, m_true, ra, dec, scan_offset=offsets[s - 2], floor=0.0) for s in range(2, 8)}
    assert solve_error_calibration(cal).bands["J"].scale_factor == 1.0
    big = {s: dict.fromkeys("JHK", 0.01) for s in cal}
    e = solve_error_calibration(cal, scale_errors=big).bands["J"]
    assert e.scale_factor == 1.0 and all(r["quoted_scale_err_mag"] > 0.01 for r in e.scans)
    # apply: the scan's quoted scale error enters cmsig times the factor.
    t = _scan(rng, m_true, ra, dec, scan_offset=0.0, floor=0.0)
    out = apply_error_calibration(t, solve_error_calibration(cal, scale_errors=big), systematic_mag=SYSTEMATIC,
                                  scale_err={"J": 0.004})
    c = np.asarray(out["j_cmsig"])
    assert np.allclose(c, np.sqrt(np.asarray(t["j_cmsig"]) ** 2 + e.floor_mag**2 + (1.0857 * 0.004) ** 2), rtol=1e-3)


def test_factor_fitted_when_allowed(rng):
    """Errors 1.5x the quoted ones and no floor: with the factor free the fit finds it."""
    m_true, ra, dec = _field(rng)
    cal = {s: _scan(rng, m_true, ra, dec, scan_offset=0.0, floor=0.0, factor=1.5) for s in range(2, 8)}
    errors = solve_error_calibration(cal, config=ErrcalConfig(factor_range=(0.5, 3.0)))
    e = errors.bands["J"]
    assert e.factor == pytest.approx(1.5, abs=0.1)
    assert e.floor_mag < 0.0015
    assert all(0.85 < b["spread"] < 1.15 for b in e.bins)


def test_repeat_residuals_weighted_mean_and_confused_groups(rng):
    m_true, ra, dec = _field(rng, 50)
    cal = {s: _scan(rng, m_true, ra, dec, scan_offset=0.0, floor=0.0) for s in (2, 3, 4)}
    # A second detection of star 0 in scan 2, 0.5" away: star 0's group is confused.
    extra = cal[2][:1].copy()
    extra["dec"] = extra["dec"] + 0.5 / 3600
    cal[2] = Table(np.concatenate([cal[2].as_array(), extra.as_array()]))
    rr = repeat_residuals(cal, "J", ErrcalConfig(min_snr=0.0))
    assert rr["star"].max() + 1 == 49
    w = 1 / rr["sigma"] ** 2
    for k in range(3):
        s = rr["star"] == k
        assert np.sum(w[s] * rr["resid"][s]) == pytest.approx(0.0, abs=1e-12 * w[s].sum())
        assert s.sum() == 3


def test_too_few_repeats_leave_errors_alone(rng):
    m_true, ra, dec = _field(rng, 100)
    cal = {s: _scan(rng, m_true, ra, dec, scan_offset=0.01 * s, floor=0.0) for s in (2, 3)}
    errors = solve_error_calibration(cal)
    assert errors.status == "uncorrected"
    assert all(e.factor == 1.0 and e.floor_mag == 0.0 and "repeats" in e.note for e in errors.bands.values())
    t = _scan(rng, m_true, ra, dec, scan_offset=0.0, floor=0.0)
    out = apply_error_calibration(t, errors, systematic_mag=SYSTEMATIC)
    assert np.array_equal(np.asarray(out["j_cmsig"]), np.asarray(t["j_cmsig"]))
    assert np.array_equal(np.asarray(out["k_msigcom"]), np.asarray(t["k_msigcom"]))
    none = solve_error_calibration({})
    assert none.status == "uncorrected" and json.dumps(none.to_dict())


def test_apply_rewrites_rd2_only_and_keeps_ph_qual_consistent():
    t = Table()
    t["ra"], t["dec"] = [10.0, 10.001, 10.002, 10.003], [0.0, 0.0, 0.0, 0.0]
    t["rd_flg"] = ["222", "122", "222", "022"]
    t["ph_qual"] = ["AAA", "AAA", "EAA", "UAA"]
    for p in "jhk":
        t[f"{p}_m"] = [12.0, 8.0, 12.0, 16.0]
        t[f"{p}_cmsig"] = [0.105, 0.004, 0.105, np.nan]
        t[f"{p}_msigcom"] = [0.106, 0.006, 0.106, np.nan]
        t[f"{p}_snr"] = [12.0, 300.0, 12.0, np.nan]
    band = BandErrors("J", "corrected", floor_mag=0.03, n_stars=50, n_measurements=300)
    errors = ErrorCalibration("partial", {"J": band, "H": BandErrors("H", "uncorrected"),
                                          "K": BandErrors("K", "uncorrected")})
    out = apply_error_calibration(t, errors, systematic_mag=SYSTEMATIC)
    new = np.hypot(0.105, 0.03)
    assert new > flags.CMSIG_A
    assert np.asarray(out["j_cmsig"])[0] == pytest.approx(new)
    assert np.asarray(out["j_msigcom"])[0] == pytest.approx(np.hypot(new, SYSTEMATIC))
    # rd_flg 1 (R1) and upper limits are not touched; H and K uncorrected.
    assert np.asarray(out["j_cmsig"])[1] == 0.004 and np.asarray(out["j_msigcom"])[1] == 0.006
    assert np.ma.is_masked(out["j_cmsig"][3])
    assert np.array_equal(np.asarray(out["h_cmsig"]), np.asarray(t["h_cmsig"]), equal_nan=True)
    # The letters follow the new cmsig: A → B at SNR 12 and cmsig above 0.10857; E and U stay.
    assert list(out["ph_qual"]) == ["BAA", "AAA", "EAA", "UAA"]
    assert out.meta["errcal_status"] == "partial"


def test_config_registered_and_checked():
    assert STEP_CONFIGS["errcal"] == ("gpu2mass.errcal", "ErrcalConfig")
    cfg = RunConfig({}).with_overrides(["errcal.factor_range=[0.5, 3.0]", "errcal.min_repeats=4"])
    assert cfg.errcal.factor_range == (0.5, 3.0) and cfg.errcal.min_repeats == 4
    with pytest.raises(ConfigError):
        ErrcalConfig(factor_range=(1.2, 3.0))
    with pytest.raises(ConfigError):
        ErrcalConfig(min_repeats=1)


def test_tiny_night_errors_product(processed_tiny):
    """The tiny night has one calibration scan: no repeats, the errors are left as
    measured and night/errors.json says why; rd_flg 2 msigcom = cmsig ⊕ the systematic
    term ⊕ the night's zero-point error, never below cmsig."""
    from gpu2mass.io import products

    e = json.loads((processed_tiny / "night" / "errors.json").read_text())
    assert e["status"] == "uncorrected"
    assert all(b["factor"] == 1.0 and b["floor_mag"] == 0.0 and b["note"] for b in e["bands"].values())
    for path in sorted((processed_tiny / "scans").glob("*/pts.parquet")):
        t = products.read_table(path)
        for k, p in enumerate("jhk"):
            rd = np.array([int(s[k]) for s in np.asarray(t["rd_flg"]).astype(str)])
            c = np.asarray(t[f"{p}_cmsig"].filled(np.nan), float)[rd == 2]
            ms = np.asarray(t[f"{p}_msigcom"].filled(np.nan), float)[rd == 2]
            assert np.all(ms >= np.hypot(c, SYSTEMATIC) - 1e-9)
