"""``gpu2mass.validate``: known answers on a synthetic night (a fake pts table made from
the truth with known noise, offsets, losses and artifact detections) and the figures that
must hold on the tiny night's processed output."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu2mass.config import RunConfig
from gpu2mass.errors import ConfigError, InputError
from gpu2mass.geometry import tan_deproject
from gpu2mass.validate import ValidateConfig, format_validation, validate_night

BANDS = ("J", "H", "K")
SCAN = 3
NFRAMES = 24
STEP = 82.8  # arcsec between frames, along Dec
RA0, DEC0 = 150.0, 10.0
MJD0 = 51604.2
ZP_INST = RunConfig.defaults().transients.zero_point
#: Known answers of the synthetic night.
DM, DM_SIG = 0.02, 0.01  # magnitude offset and noise (msigcom = DM_SIG)
DXI, DETA, DPOS = 30.0, -20.0, 50.0  # position offset and noise per coordinate, mas
ZP_ERR = 0.02  # fitted − true zero point


def _write(path, cols):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)


def _frame_centres():
    f = np.arange(NFRAMES)
    eta = (f - (NFRAMES - 1) / 2) * STEP
    ra, dec = tan_deproject(np.zeros(NFRAMES), eta, RA0, DEC0)
    return f, ra, dec, MJD0 + f * 1.3 / 86400, 1.2 + 0.001 * f


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A one-scan night whose point sources are the truth with known errors.

    Stars on a 20" grid (isolated) inside the scan, magnitudes cycling 10–16 in all bands;
    stars of 15–16 mag: every other one lost; a few stars beyond the scan's footprint;
    spurious detections on a spike (unflagged and flagged 'D'), on a persistence ghost
    (flagged 'p') and two on nothing."""
    root = tmp_path_factory.mktemp("validate")
    night, out = root / "night", root / "out"
    truth = night / "truth"
    truth.mkdir(parents=True)
    (night / "night.json").write_text(json.dumps({"instrument": {"nx": 256, "ny": 256}}))
    optics = {"scale_arcsec": 2.0, "rotation_deg": 0.0, "offset_arcsec": [0.0, 0.0], "k_radial": 0.0,
              "q_xy": [0.0, 0.0]}
    (truth / "night.json").write_text(json.dumps({"camera": {"optics": dict.fromkeys(BANDS, optics)}}))
    f, fra, fdec, fmjd, fx = _frame_centres()
    true_zp = {b: ZP_INST[b] + 0.03 - 0.1 * (fx - 1.0) - ZP_ERR for b in BANDS}
    cols = {"scan": [], "band": [], "frame": [], "mjd": [], "ra": [], "dec": [], "zp_mag": [], "airmass": []}
    for b in BANDS:
        cols["scan"] += [SCAN] * NFRAMES
        cols["band"] += [b] * NFRAMES
        cols["frame"] += list(f)
        cols["mjd"] += list(fmjd)
        cols["ra"] += list(fra)
        cols["dec"] += list(fdec)
        cols["zp_mag"] += list(true_zp[b])
        cols["airmass"] += list(fx)
    _write(truth / "frames.parquet", cols)
    _write(out / "scans" / f"{SCAN:03d}" / "frames.parquet",
           {k: cols[k] for k in ("band", "frame", "mjd", "ra", "dec", "airmass")}
           | {"seeing_arcsec": [2.5] * (3 * NFRAMES)})
    # Stars: a 20" grid across the usable area (|xi| < 200", 6 frames from either end).
    gx, gy = np.meshgrid(np.arange(-200, 201, 20.0), np.arange(-700, 701, 20.0))
    xi, eta = gx.ravel(), gy.ravel()
    n = xi.size
    mag = np.round(10.0 + (np.arange(n) % 120) * 0.05, 2)  # 10.00 … 15.95
    # Beyond the footprint (east of the array): truth stars that must not count.
    xi = np.concatenate([xi, np.full(10, 320.0)])
    eta = np.concatenate([eta, np.linspace(-500, 500, 10)])
    mag = np.concatenate([mag, np.full(10, 12.0)])
    ra, dec = tan_deproject(xi, eta, RA0, DEC0)
    nsrc = ra.size
    _write(truth / "sources.parquet", {
        "id": np.arange(nsrc), "kind": ["star"] * nsrc, "ra": ra, "dec": dec,
        "epoch_mjd": np.full(nsrc, MJD0), "pmra": np.zeros(nsrc), "pmdec": np.zeros(nsrc),
        "j_m": mag, "h_m": mag, "k_m": mag, "ra_rate": np.full(nsrc, np.nan), "dec_rate": np.full(nsrc, np.nan)})
    # Artifacts: a spike segment and a persistence ghost (frame 12 pixels), well away from stars.
    _write(truth / "artifacts.parquet", {
        "scan": [SCAN, SCAN], "band": ["J", "J"], "frame": [12, 12], "kind": ["spike", "persistence"],
        "x0": [40.0, 200.0], "y0": [135.0, 85.0], "x1": [40.0, 200.0], "y1": [155.0, 85.0], "parent_id": [1, 1]})

    rng = np.random.default_rng(5)
    lost = np.zeros(n, bool)
    faint = np.flatnonzero(mag >= 15.0)
    lost[rng.choice(faint, faint.size // 2, replace=False)] = True
    keep = np.flatnonzero(~lost)
    k = keep.size
    dxi = DXI + rng.normal(0, DPOS, k)
    deta = DETA + rng.normal(0, DPOS, k)
    pra, pdec = tan_deproject(xi[keep] + dxi / 1000, eta[keep] + deta / 1000, RA0, DEC0)
    m = {b: mag[keep] + DM + rng.normal(0, DM_SIG, k) for b in BANDS}
    # Spurious detections: (xi, eta) of the spike's middle, the ghost, and two on nothing.
    # Frame 12's centre is at eta = 0.5 STEP; pixel (x, y) → (xi, eta) = (-(x-127.5), y-127.5) * 2".
    spike_xy = (-(40.0 - 127.5) * 2, (145.0 - 127.5) * 2 + 0.5 * STEP)
    ghost_xy = (-(200.0 - 127.5) * 2, (85.0 - 127.5) * 2 + 0.5 * STEP)
    sp = np.array([spike_xy, (spike_xy[0], spike_xy[1] + 10.0), ghost_xy, (-190.0, 610.0), (190.0, -610.0)])
    sra, sdec = tan_deproject(sp[:, 0], sp[:, 1], RA0, DEC0)
    s_cc = ["000", "D00", "p00", "000", "000"]
    ns = len(sp)
    rows = {
        "ra": np.concatenate([pra, sra]), "dec": np.concatenate([pdec, sdec]),
        "err_maj": np.full(k + ns, DPOS / 1000), "err_min": np.full(k + ns, DPOS / 1000),
        "err_ang": np.full(k + ns, 0.0),
        "rd_flg": ["222"] * (k + ns), "cc_flg": ["000"] * k + s_cc, "use_src": np.ones(k + ns, np.int16),
    }
    for b in BANDS:
        p = b.lower()
        rows[f"{p}_m"] = np.concatenate([m[b], np.full(ns, 15.0)])
        rows[f"{p}_msigcom"] = np.full(k + ns, DM_SIG)
        rows[f"{p}_snr"] = np.concatenate([np.full(k, 50.0), np.full(ns, 20.0)])
    _write(out / "scans" / f"{SCAN:03d}" / "pts.parquet", rows)
    (out / "run.json").write_text(json.dumps({"scans": [{"scan": SCAN, "type": "sci", "status": "ok"}]}))
    return {"night": night, "out": out, "n": n, "mag": mag[:n], "lost": lost, "k": k}


def test_synthetic_known_answers(synthetic):
    res = validate_night(synthetic["out"], synthetic["night"] / "truth")
    json.dumps(res, allow_nan=False)  # strict JSON
    assert res["scans"] == [SCAN] and res["magnitudes"] == "instrumental"
    mag, lost = synthetic["mag"], synthetic["lost"]
    for b in BANDS:
        r = res["bands"][b]
        assert r["match_radius_arcsec"] == pytest.approx(2.0)
        c = r["completeness"]
        # Every grid star counts (inside, isolated), none of those beyond the footprint.
        assert c["n_stars"] == synthetic["n"]
        assert c["to_m10"] == pytest.approx(1 - lost[mag <= c["m10"]].mean())
        curve = {(p["lo"], p["hi"]): p["completeness"] for p in c["curve"]}
        assert curve[(14.75, 15.0)] == 1.0 and curve[(15.0, 15.25)] == pytest.approx(0.5, abs=0.15)
        assert c["levels"] == {"m99": 15.0, "m90": 15.0}
        ph = r["photometry"]["PSF"]
        assert ph["n"] == int(((mag >= 9.0) & (mag <= c["m10"] - 2) & ~lost).sum())
        assert ph["bias"] == pytest.approx(DM, abs=0.002)
        assert ph["scatter"] == pytest.approx(DM_SIG, rel=0.15)
        assert ph["norm_spread"] == pytest.approx(1.0, rel=0.15)
        a = r["astrometry"]
        assert a["n"] == synthetic["k"]
        assert a["offset_ra_mas"] == pytest.approx(DXI, abs=5) and a["offset_dec_mas"] == pytest.approx(DETA, abs=5)
        assert a["rms_ra_mas"] == pytest.approx(np.hypot(DXI, DPOS), rel=0.1)
        assert a["rms_dec_mas"] == pytest.approx(np.hypot(DETA, DPOS), rel=0.1)
        # err_ang 0: the major axis is north (η), the minor east (ξ); robust spreads about the
        # median in units of the 50 mas errors.
        assert a["norm_spread_major"] == pytest.approx(1.0, rel=0.1)
        assert a["norm_spread_minor"] == pytest.approx(1.0, rel=0.1)
    # Reliability: the SNR-20 sample holds every kept star and the spurious detections
    # without an upper-case flag (one on the spike, the ghost, two on nothing).
    j = res["bands"]["J"]
    rel = j["reliability"]["snr>10"]
    assert (rel["n"], rel["n_real"]) == (synthetic["k"] + 4, synthetic["k"])
    assert res["bands"]["H"]["reliability"]["snr>10"]["n"] == synthetic["k"] + 5  # no 'D' in H
    assert j["contamination"] == {
        "none": {"n": 2, "unflagged": 2, "flagged_lower": 0, "flagged_upper": 0},
        "persistence": {"n": 1, "unflagged": 0, "flagged_lower": 1, "flagged_upper": 0},
        "spike": {"n": 2, "unflagged": 1, "flagged_lower": 0, "flagged_upper": 1}}
    # No artifacts in H and K: all five spurious detections are on nothing.
    assert res["bands"]["K"]["contamination"] == {"none": {"n": 5, "unflagged": 5, "flagged_lower": 0,
                                                           "flagged_upper": 0}}
    assert res["overall"]["contamination"]["spike"]["n"] == 2
    tot = res["overall"]["astrometry"]
    assert tot["n"] == synthetic["k"] and tot["rms_ra_mas"] == res["bands"]["J"]["astrometry"]["rms_ra_mas"]
    assert tot["norm_spread_major"] == pytest.approx(1.0, rel=0.1)
    assert res["zero_point"]["status"] == "absent" and res["zero_point"]["bands"]["J"]["rms"] is None
    text = format_validation(res)
    for block in ("completeness", "reliability", "photometry", "astrometry", "zero point", "artifact"):
        assert block in text
    assert "15–16 mag" in text and "no night/calibration.json" in text


def test_zero_point_error_against_truth(synthetic, tmp_path):
    import shutil

    from gpu2mass.photcal import BandCalibration, NightCalibration

    out = tmp_path / "out"
    shutil.copytree(synthetic["out"], out)
    # c1 = +0.03 constant, c2 = 0.1: the truth's zero point is ZP_ERR fainter than that.
    bands = {b: BandCalibration(band=b, status="calibrated", zp_inst=ZP_INST[b], c2=0.1, c2_err=0.0,
                                c2_fitted=False, form="constant", coefficients=(0.03,), covariance=((1e-6,),),
                                t_ref_mjd=MJD0, t_span_hours=(0.0, 1.0)) for b in BANDS}
    (out / "night").mkdir()
    (out / "night" / "calibration.json").write_text(json.dumps(NightCalibration("calibrated", bands).to_dict()))
    res = validate_night(out, synthetic["night"] / "truth")
    assert res["magnitudes"] == "calibrated"
    for b in BANDS:
        z = res["zero_point"]["bands"][b]
        assert z["n"] == NFRAMES
        assert z["mean"] == pytest.approx(ZP_ERR, abs=1e-9) and z["rms"] == pytest.approx(ZP_ERR, abs=1e-9)
    assert "zero point fitted − true" in format_validation(res)


def test_bad_inputs(synthetic, tmp_path):
    truth = synthetic["night"] / "truth"
    with pytest.raises(InputError, match="does not exist"):
        validate_night(tmp_path / "nothing", truth)
    with pytest.raises(InputError, match="run.json"):
        validate_night(tmp_path, truth)
    with pytest.raises(InputError, match="truth/ folder"):
        validate_night(synthetic["out"], synthetic["night"])
    with pytest.raises(InputError, match="no processed scan of type cal"):
        validate_night(synthetic["out"], truth, config=ValidateConfig(scan_types=("cal",)))
    with pytest.raises(ConfigError):
        ValidateConfig(match_min_arcsec=3.0, match_max_arcsec=2.0)


def test_tiny_night_figures(processed_tiny, tiny_night):
    """The tiny night processed end to end (the session's ``processed_tiny``, conftest)."""
    res = validate_night(processed_tiny, tiny_night / "truth")
    for b in BANDS:
        r = res["bands"][b]
        c = r["completeness"]
        bright = [p for p in c["curve"] if p["hi"] <= c["m10"] - 1.0]
        n = sum(p["n"] for p in bright)
        assert n >= 30
        assert sum(p["n"] * p["completeness"] for p in bright) / n >= 0.95
        assert r["reliability"]["snr>10"]["reliability"] > 0.98
        a = r["astrometry"]
        assert a["n"] >= 20 and max(a["rms_ra_mas"], a["rms_dec_mas"]) < 150.0
        ph = r["photometry"]["PSF"]
        # Calibrated magnitudes agree with the truth; instrumental ones within the zero
        # point's airmass and drift terms.
        assert ph["n"] >= 20 and abs(ph["bias"]) < (0.03 if res["magnitudes"] == "calibrated" else 0.15)
        assert ph["scatter"] < 0.03
    assert res["overall"]["astrometry"]["n"] >= 20
    # The night run always writes its calibration; a calibrated one is the truth's to 0.03 mag.
    zp = res["zero_point"]
    assert zp["status"] in ("calibrated", "partial", "instrumental")
    for b in BANDS:
        z = zp["bands"][b]
        assert z["n"] > 0 and (z["rms"] < 0.03 or res["magnitudes"] == "instrumental")


@pytest.mark.parametrize("rotation_deg", [0.27, 30.0])
def test_usable_area_matches_frames_holding(rng, rotation_deg):
    """The fast usable-area test (k-d tree pairing, linear mapping, exact mapping near the
    edges) agrees with FrameGeometry.frames_holding on a distorted, rotated array, with
    positions crowded at the frames' edges."""
    from gpu2mass.geometry import BandGeometry, FrameGeometry, tan_project
    from gpu2mass.validate import _usable

    k, q1, q2, r = 0.0027, 0.15, -0.1, 128.0
    band = BandGeometry(256, 256, 2.0, rotation_deg, np.array([[q1, 0, -q1, k * r, 0, k * r, 0],
                                                               [0, 2 * q2, 0, 0, k * r, 0, k * r]]))
    _fn, fra, fdec, _m, _x = _frame_centres()
    geo = FrameGeometry(band, fra, fdec)
    # Random positions, and positions on each frame's edge limits (10 px in) ± 1.5 px.
    ra, dec = tan_deproject(rng.uniform(-400, 400, 3000), rng.uniform(-1400, 1400, 3000), RA0, DEC0)
    fr = rng.integers(0, NFRAMES, 3000)
    edge = rng.choice([9.5, 245.5], 3000) + rng.uniform(-1.5, 1.5, 3000)
    along = rng.uniform(0, 255, 3000)
    side = rng.random(3000) < 0.5
    er, ed = geo.pixel_to_sky(fr, np.where(side, edge, along), np.where(side, along, edge))
    ra, dec = np.concatenate([ra, er]), np.concatenate([dec, ed])
    cfg = ValidateConfig()
    src, _f, _x, _y = geo.frames_holding(ra, dec, edge_px=cfg.edge_px)
    expected = np.bincount(src, minlength=ra.size) >= cfg.min_frames
    xy = np.column_stack(tan_project(ra, dec, RA0, DEC0))
    got = _usable(geo, ra, dec, xy, np.column_stack(tan_project(fra, fdec, RA0, DEC0)), cfg)
    assert 0.2 < expected.mean() < 0.8
    np.testing.assert_array_equal(got, expected)
