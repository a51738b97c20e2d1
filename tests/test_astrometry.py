"""Final astrometry (PosPts): a night-wide cross-scan distortion per band and each scan's
pointing track, injected into synthetic point sources, are recovered; positions end up at
the truth and the quoted error ellipses match the scatter; the tiny night's processed
sources meet the acceptance figures against the simulator's truth."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from astropy.table import Table
from numpy.polynomial import legendre

from gpu2mass.astrometry import AstrometryConfig, solve_night_astrometry
from gpu2mass.config import STEP_CONFIGS
from gpu2mass.errors import ConfigError, StepError
from gpu2mass.geometry import tan_deproject, tan_project
from gpu2mass.refcat import ReferenceStars

BANDS = "jhk"
#: Injected night-wide cross-scan corrections (reference − source), arcsec, per band and
#: coordinate: Legendre coefficients of P1, P2, P3 of the normalised cross-scan position.
CROSS = {"j": ((0.00, 0.06, 0.03), (0.05, -0.02, 0.0)),
         "h": ((0.03, 0.05, 0.00), (0.00, 0.04, -0.03)),
         "k": ((-0.02, 0.07, 0.02), (0.04, 0.0, 0.02))}


def _track(scan, t):
    """Injected along-scan pointing error of a scan (arcsec): a slow wave of ~60 mas."""
    return (0.06 * np.sin(t / 2500.0 + scan), 0.05 * np.cos(t / 3000.0 - 0.5 * scan))


def _synthetic_night(rng, n_scans=3, n_per_scan=900, length_deg=2.0, with_blends=False):
    """Scans going north along meridians 0.13° apart; every source in J, H and K with
    band positions on the arrays; measured = truth − injected correction + noise."""
    scans, frames, truth, injected = {}, {}, {}, {}
    all_ra, all_dec = [], []
    for s in range(1, n_scans + 1):
        ra_c, dec_start = 150.0 + 0.13 * s, 10.0
        nf = int(length_deg * 3600 / 82.8)
        f_dec = dec_start + np.arange(nf) * 82.8 / 3600
        mid = (f_dec[0] + f_dec[-1]) / 2
        frames[s] = {"band": np.repeat(["J", "H", "K"], nf), "frame": np.tile(np.arange(nf), 3),
                     "mjd": np.full(3 * nf, 51619.2 + 0.01 * s), "ra": np.full(3 * nf, ra_c),
                     "dec": np.tile(f_dec, 3)}
        xi = rng.uniform(-250, 250, n_per_scan)  # cross-scan, arcsec east of the scan line
        eta = rng.uniform((f_dec[0] - mid) * 3600 - 200, (f_dec[-1] - mid) * 3600 + 200, n_per_scan)
        ra_t, dec_t = tan_deproject(xi, eta, ra_c, mid)
        snr = np.exp(rng.uniform(np.log(12), np.log(600), (n_per_scan, 3)))
        snr[rng.random((n_per_scan, 3)) < 0.15] = np.nan  # some sources miss a band
        snr[np.all(~np.isfinite(snr), 1), 0] = 50.0
        sig_b = np.hypot(0.9 / snr, 0.004)  # per-band position error, arcsec
        w = np.nan_to_num(snr) / np.nansum(snr, 1, keepdims=True)
        sig = np.sqrt(np.nansum(w**2 * sig_b**2, 1))
        pts = Table()
        d = np.zeros((n_per_scan, 2))
        for k, b in enumerate(BANDS):
            have = np.isfinite(snr[:, k])
            x = 127.5 - xi / 2.0 + rng.normal(0, 0.7)  # x is west on the array; bands ~1 px apart
            pts[f"{b}_snr"] = np.where(have, snr[:, k], np.nan)
            pts[f"{b}_x"] = np.where(have, x, np.nan)
            pts[f"{b}_psfchi"] = np.where(have, rng.uniform(0.95, 1.25, n_per_scan), np.nan)
            u = np.clip((x - 127.5) / 128.0, -1, 1)
            V = legendre.legvander(u, 3)[:, 1:]
            for c in (0, 1):
                d[:, c] += np.where(have, w[:, k], 0.0) * (V @ np.asarray(CROSS[b][c]))
        tr = _track(s, eta)
        d[:, 0] += tr[0]
        d[:, 1] += tr[1]
        noise = rng.normal(0, 1, (n_per_scan, 2)) * sig[:, None]
        if with_blends:
            # Poorly fitted sources (blends): 5 % with a PSF χ² of 4-12 and position errors
            # larger than the fit's by √(χ²/χ²_typical), as least squares says they are.
            bl = rng.random(n_per_scan) < 0.05
            chi = rng.uniform(4, 12, n_per_scan)
            noise[bl] *= np.sqrt(chi[bl] / 1.1)[:, None]
            for b in BANDS:
                pts[f"{b}_psfchi"] = np.where(bl & np.isfinite(pts[f"{b}_psfchi"]), chi, pts[f"{b}_psfchi"])
        ra_m, dec_m = tan_deproject(-d[:, 0] + noise[:, 0], -d[:, 1] + noise[:, 1], ra_t, dec_t)
        pts["ra"], pts["dec"] = ra_m, dec_m
        pts["err_maj"], pts["err_min"], pts["err_ang"] = sig, sig, np.zeros(n_per_scan)
        pts["scan"] = np.full(n_per_scan, s, np.int32)
        scans[s], truth[s], injected[s] = pts, (ra_t, dec_t), d
        all_ra.append(ra_t)
        all_dec.append(dec_t)
    # The reference catalog: 60 % of the sources, 0.3 mas errors.
    ra_r, dec_r = np.concatenate(all_ra), np.concatenate(all_dec)
    pick = rng.random(ra_r.size) < 0.6

    def reference(ra_range, dec_range, epoch_jyear):
        assert 1999.0 < epoch_jyear < 2001.0
        sel = pick & (dec_r >= dec_range[0]) & (dec_r <= dec_range[1]) & (ra_r >= ra_range[0]) & (ra_r <= ra_range[1])
        return ReferenceStars(ra_r[sel], dec_r[sel], np.full(sel.sum(), 12.0), np.full(sel.sum(), 3e-4), "synthetic")

    return scans, frames, truth, injected, reference


def _residuals(pts, truth):
    """Source − truth (east, north), arcsec, and the normalised residuals on the ellipse axes."""
    ex, ey = tan_project(np.asarray(pts["ra"]), np.asarray(pts["dec"]), *truth)
    th = np.deg2rad(np.asarray(pts["err_ang"]))
    za = (ex * np.sin(th) + ey * np.cos(th)) / np.asarray(pts["err_maj"])
    zb = (ex * np.cos(th) - ey * np.sin(th)) / np.asarray(pts["err_min"])
    return ex, ey, np.concatenate([za, zb])


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(5)
    scans, frames, truth, injected, reference = _synthetic_night(rng)
    sol = solve_night_astrometry(scans, frames, reference, config=AstrometryConfig())
    return scans, frames, truth, injected, reference, sol


def test_injected_distortion_and_track_are_recovered(synthetic):
    scans, _frames, truth, injected, _ref, sol = synthetic
    for s, pts in scans.items():
        ex0, ey0, _ = _residuals(pts, truth[s])
        # Before: the injected systematics dominate the noise.
        assert np.sqrt(np.mean(ex0**2 + ey0**2) / 2) > 0.04
        out = sol.apply(s, pts)
        ex, ey, z = _residuals(out, truth[s])
        snr = np.nanmax(np.column_stack([pts[f"{b}_snr"] for b in BANDS]), 1)
        bright = snr > 20
        # The recovered correction at each source is the injected one to ~1 noise σ / √n.
        corr_e, corr_n = tan_project(np.asarray(out["ra"]), np.asarray(out["dec"]),
                                     np.asarray(pts["ra"]), np.asarray(pts["dec"]))
        miss = np.hypot(corr_e - injected[s][:, 0], corr_n - injected[s][:, 1])
        assert np.sqrt(np.mean(miss**2)) < 0.008, s
        # After: positions at truth within the noise; no mean offset.
        assert abs(ex[bright].mean()) < 0.004 and abs(ey[bright].mean()) < 0.004
        noise = np.asarray(pts["err_maj"])[bright]
        assert np.sqrt(np.mean(ex[bright] ** 2)) < 1.2 * np.sqrt(np.mean(noise**2))
        assert 0.9 < np.std(z) < 1.12
        # The solution's own error is in the quoted ellipse.
        assert np.all(np.asarray(out["err_min"]) >= np.asarray(pts["err_maj"]) * 0.999)


def test_figures_and_summary(synthetic):
    scans, _frames, _truth, _inj, _ref, sol = synthetic
    for s in scans:
        fig = sol.figures(s)
        assert set(fig) == {"J", "H", "K"}
        for b, f in fig.items():
            assert f["n_ref"] > 200
            assert abs(f["offset_ra_mas"]) < 4 and abs(f["offset_dec_mas"]) < 4
            assert f["astrometric_rms_arcsec"] < 0.03, (s, b)
        before = sol.stats[s]["before"]["J"]["astrometric_rms_arcsec"]
        assert before > 2 * fig["J"]["astrometric_rms_arcsec"]
    d = json.loads(json.dumps(sol.to_dict()))
    assert d["reference_catalog"] == "synthetic" and set(d["tracks"]) == {"1", "2", "3"}
    # 2° scans plus an array: 5 segments of 0.5°.
    assert len(d["tracks"]["1"]["knots_arcsec"]) == 6
    # The injected J cross-scan P2 term (east, 60 mas) is recovered.
    assert abs(d["cross_scan"]["J"]["east"]["coeff_mas"][1] - 60.0) < 10.0


def test_blends_get_larger_errors_and_do_not_bias_the_solution():
    rng = np.random.default_rng(11)
    scans, frames, truth, injected, reference = _synthetic_night(rng, n_scans=2, n_per_scan=700, with_blends=True)
    sol = solve_night_astrometry(scans, frames, reference)
    plain = solve_night_astrometry(scans, frames, reference, config=AstrometryConfig(psfchi_power=0.0))
    for s, pts in scans.items():
        _, _, z = _residuals(sol.apply(s, pts), truth[s])
        _, _, z0 = _residuals(plain.apply(s, pts), truth[s])
        # Blends: the χ²-scaled errors bring the spread in; without, the tail dominates.
        assert 0.9 < np.std(z) < 1.12
        bl = np.tile(np.nanmax(np.column_stack([pts[f"{b}_psfchi"] for b in BANDS]), 1) > 3, 2)
        assert 0.75 < np.std(z[bl]) < 1.3 and np.std(z0[bl]) > 2.0
        corr_e, corr_n = tan_project(*(np.asarray(sol.apply(s, pts)[c]) for c in ("ra", "dec")),
                                     np.asarray(pts["ra"]), np.asarray(pts["dec"]))
        miss = np.hypot(corr_e - injected[s][:, 0], corr_n - injected[s][:, 1])
        assert np.sqrt(np.mean(miss**2)) < 0.01


def test_band_disagreement_enlarges_the_errors():
    """Sources whose J, H and Ks positions disagree (blends of stars of different colours)
    are off by more than their fit errors say; the band separations reveal them."""
    rng = np.random.default_rng(17)
    scans, frames, truth, _inj, reference = _synthetic_night(rng, n_scans=1, n_per_scan=1500)
    pts = scans[1]
    snr = np.column_stack([np.asarray(pts[f"{b}_snr"]) for b in BANDS])
    sig_b = np.hypot(0.9 / snr, 0.004)
    bad = rng.random(len(pts)) < 0.05
    boost = np.where(bad, 4.0, 1.0)
    for k, name in ((1, "sep_j_h"), (2, "sep_j_k")):
        sep = np.hypot(*rng.normal(0, 1, (2, len(pts)))) * np.hypot(sig_b[:, 0], sig_b[:, k]) * boost
        pts[name] = np.where(np.isfinite(sep), sep, np.nan)
    ra_t, dec_t = truth[1]
    # The bad sources' merged positions scatter 4× their quoted errors.
    ex, ey = tan_project(np.asarray(pts["ra"]), np.asarray(pts["dec"]), ra_t, dec_t)
    extra = rng.normal(0, 1, (2, len(pts))) * np.asarray(pts["err_maj"]) * np.sqrt(15.0)
    pts["ra"], pts["dec"] = tan_deproject(ex + np.where(bad, extra[0], 0), ey + np.where(bad, extra[1], 0), ra_t, dec_t)
    spreads = {}
    for on in (True, False):
        cfg = AstrometryConfig(psfchi_power=0.0, band_consistency=on)
        sol = solve_night_astrometry(scans, frames, reference, config=cfg)
        _, _, z = _residuals(sol.apply(1, pts), truth[1])
        spreads[on] = np.std(z[np.tile(bad, 2)]), np.std(z[np.tile(~bad, 2)])
    # Most are caught (a χ² of one separation still misses some below the threshold).
    assert spreads[False][0] > 3.0 and spreads[True][0] < min(2.5, 0.75 * spreads[False][0])
    assert 0.85 < spreads[True][1] < 1.1  # the rest keep their errors


def test_errors_and_config():
    rng = np.random.default_rng(3)
    scans, frames, _truth, _inj, _ref = _synthetic_night(rng, n_scans=1, n_per_scan=50)

    def nothing(ra_range, dec_range, epoch):
        return ReferenceStars(*(np.zeros(0) for _ in range(4)), "empty")

    # Elongated ellipses at assorted angles survive the trip through the covariance.
    pts = scans[1]
    pts["err_min"] = pts["err_maj"] * rng.uniform(0.3, 1.0, len(pts))
    pts["err_ang"] = rng.uniform(0, 180, len(pts))
    # No reference stars: nothing is solved, positions and errors stay as they were.
    sol = solve_night_astrometry(scans, frames, nothing, config=AstrometryConfig(psfchi_power=0.0))
    assert sol.status.startswith("not solved: only 0 point sources")
    out = sol.apply(1, pts)
    assert np.array_equal(out["ra"], pts["ra"]) and np.array_equal(out["dec"], pts["dec"])
    assert np.allclose(out["err_maj"], pts["err_maj"]) and np.allclose(out["err_min"], pts["err_min"])
    elongated = np.asarray(pts["err_min"] < 0.95 * pts["err_maj"])
    dang = np.mod(np.asarray(out["err_ang"] - pts["err_ang"]) + 90, 180) - 90
    assert np.all(np.abs(dang[elongated]) < 1e-6)
    assert sol.figures(1) == {} and json.dumps(sol.to_dict())
    with pytest.raises(StepError, match="scan 7 is not part"):
        sol.apply(7, scans[1])
    with pytest.raises(StepError, match="scan 1: no frames table"):
        solve_night_astrometry(scans, {}, nothing)
    with pytest.raises(ConfigError):
        AstrometryConfig(track_knot_arcsec=0)
    module, name = STEP_CONFIGS["astrometry"]
    assert getattr(importlib.import_module(module), name) is AstrometryConfig
