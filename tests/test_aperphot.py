"""aperphot against truth: COG-corrected 4" fluxes, R1 photometry and ndet on a tiny night.

The night (``tiny`` preset, seed 5) gets injected stars: 22 between Ks 5.5 and 7.6 (R1
regime: saturated in R2−R1, not in R1; about half land on the science scan's frames) and 16
between Ks 8.6 and 10.6 (bright unsaturated curve-of-growth stars). Frames are calibrated the
simple way (``tests/_frames.py``; R1 likewise with the dark scan's R1 and the flat), with
saturation from the raw reads (read 2 = R1 + R2R1 at the full-well map, as the spec says).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _frames import simple_scan
from astropy.io import fits
from gpu2mass.kernels.aperture import aperture_photometry

from gpu2mass.aperphot import (
    FLAG_NONE_MEASURED,
    AperPhotConfig,
    CurveOfGrowth,
    apply_curve_of_growth,
    fit_curve_of_growth,
    moffat_aperture_fraction,
    run_aperture_photometry,
    run_r1_photometry,
    trimmed_mean_variance_factor,
)
from gpu2mass.errors import ConfigError, InputError, StepError
from gpu2mass.geometry import tan_project
from gpu2mass.io import rawformat as rf

R1_INJECT = tuple(np.round(np.linspace(5.5, 7.6, 22), 2))
COG_INJECT = tuple(np.round(np.linspace(8.6, 10.6, 16), 2))
MAG = {"J": "j_m", "H": "h_m", "K": "k_m"}
#: R2−R1 saturation, mag (facts sheet 11); stars brighter (+0.3) are R1-regime stars.
R2_SATURATION = {"J": 9.0, "H": 8.5, "K": 8.0}
#: Simulator: stars brighter than this draw diffraction spikes (gpu2mass.sim.artifacts).
SPIKE_LIMIT = {"J": 10.0, "H": 9.5, "K": 9.0}
SAT_MARGIN_DN = 50.0


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from gpu2mass.sim import SimulationRequest, simulate_night

    out = tmp_path_factory.mktemp("aperphot") / "night"
    simulate_night(out, SimulationRequest(preset="tiny", seed=5, inject_k=R1_INJECT + COG_INJECT))
    return out


def _r1_and_saturation(night_dir: Path, band: str):
    """R1 frames calibrated like simple_scan's R2−R1 ones; R2 and R1 saturation maps."""
    manifest = json.loads((night_dir / "night.json").read_text())
    scan = next(s for s in manifest["scans"] if s["type"] == "sci")
    dark_scan = next(s for s in manifest["scans"] if s["type"] == "dark")
    dark1 = fits.getdata(night_dir / dark_scan["files"][band], "R1").astype(np.float64).mean(0)
    flat = fits.getdata(night_dir / "calib" / rf.calib_file("flat", band)).astype(np.float64)
    sat = fits.getdata(night_dir / "calib" / rf.calib_file("satmap", band)).astype(np.float64)
    bad = fits.getdata(night_dir / "calib" / rf.calib_file("badpix", band)) > 0
    r1 = fits.getdata(night_dir / scan["files"][band], "R1").astype(np.float64)
    r21 = fits.getdata(night_dir / scan["files"][band], "R2R1").astype(np.float64)
    sat2 = r1 + r21 >= sat - SAT_MARGIN_DN
    sat1 = r1 >= sat - SAT_MARGIN_DN
    cal = (r1 - dark1) / np.where(bad, 1.0, flat)
    sky = np.array([np.median(c[~bad]) for c in cal])
    q = np.array([np.percentile(c[~bad], [15.87, 84.13]) for c in cal])
    data = (cal - sky[:, None, None]).astype(np.float32)
    data[:, bad] = 0.0
    inst = manifest["instrument"]
    return data, (q[:, 1] - q[:, 0]) / 2, sat2, sat1, inst


_CACHE: dict = {}


def _band(night_dir: Path, band: str):
    """Everything measured for one band (cached per module run)."""
    key = (str(night_dir), band)
    if key in _CACHE:
        return _CACHE[key]
    sc = simple_scan(night_dir, band)
    r1, r1_noise, sat2, sat1, inst = _r1_and_saturation(night_dir, band)
    src = sc.sources
    mag = src[MAG[band]]
    dec_lo, dec_hi = sc.geometry.dec.min() - 0.1, sc.geometry.dec.max() + 0.1
    sel = np.flatnonzero((mag < 16.5) & (src["kind"] != "asteroid")
                         & (src["dec"] > dec_lo) & (src["dec"] < dec_hi))
    zp = float(np.median(sc.frames["zp_mag"]))
    cfg = AperPhotConfig(
        gain_e_per_dn=inst["gain_e_per_dn"][band],
        r1_flux_scale=inst["r2r1_exptime_s"] / inst["r1_exptime_s"],
        # The simulator draws spikes only above SPIKE_LIMIT (see AperPhotConfig).
        cog_max_flux_dn=0.85 * 10 ** (-0.4 * (SPIKE_LIMIT[band] - zp)))
    phot = run_aperture_photometry(sc.data, mask=sc.bad, saturated=sat2, noise=sc.noise,
                                   geometry=sc.geometry, ra=src["ra"][sel], dec=src["dec"][sel],
                                   config=cfg)
    cog = fit_curve_of_growth(phot, config=cfg, nframes=sc.data.shape[0])
    std = apply_curve_of_growth(phot, cog, config=cfg)
    r1p = run_r1_photometry(r1, mask=sc.bad, saturated=sat1, noise=r1_noise,
                            geometry=sc.geometry, phot=phot, cog=cog, config=cfg)
    out = {"sc": sc, "sel": sel, "mag": mag[sel], "cfg": cfg, "phot": phot, "cog": cog,
           "std": std, "r1": r1p, "sat2": sat2}
    _CACHE[key] = out
    return out


def _truth_flux(frames_col, mag, zp):
    """Mean over each source's measured frames of 10^(−0.4 (m − zp_frame))."""
    fr = np.asarray(frames_col)
    out = np.full(len(fr), np.nan)
    for i, row in enumerate(fr):
        row = row[row >= 0]
        if row.size:
            out[i] = np.mean(10 ** (-0.4 * (mag[i] - zp[row])))
    return out


def _isolated(sources, band, idx, radius_arcsec=24.0, dmag=4.0):
    """Which truth sources ``idx`` have no other source within the radius brighter than
    their magnitude + dmag (truth-based, independent of the step's own selection)."""
    ra, dec, mag = sources["ra"], sources["dec"], sources[MAG[band]]
    ok = np.ones(idx.size, bool)
    for n, i in enumerate(idx):
        near = np.flatnonzero(np.abs(dec - dec[i]) < radius_arcsec / 3600)
        near = near[near != i]
        xi, eta = tan_project(ra[near], dec[near], ra[i], dec[i])
        close = np.hypot(xi, eta) < radius_arcsec
        ok[n] = not np.any(np.nan_to_num(mag[near][close], nan=99.0) < mag[i] + dmag)
    return ok


def _mad(z):
    z = z[np.isfinite(z)]
    return 1.4826 * float(np.median(np.abs(z - np.median(z))))


@pytest.mark.parametrize("band", ["K", "J", "H"])
def test_standard_aperture_flux_matches_truth(night, band):
    b = _band(night, band)
    std, sc, mag = b["std"], b["sc"], b["mag"]
    kind = sc.sources["kind"][b["sel"]]
    good = ((np.asarray(std["n_meas"]) >= 3) & (np.asarray(std["n_sat"]) == 0)
            & ((np.asarray(std["flags"]) & ~(8 | 64)) == 0) & (kind == "star")
            & (mag >= R2_SATURATION[band]) & (mag < R2_SATURATION[band] + 6))
    good &= _isolated(sc.sources, band, b["sel"]) if good.any() else good
    assert good.sum() >= 30
    truth = _truth_flux(std["frames"][good], mag[good], sc.frames["zp_mag"])
    f = np.asarray(std["flux_stdap"])[good]
    dm = -2.5 * np.log10(f / truth)
    bright = mag[good] < R2_SATURATION[band] + 4
    assert bright.sum() >= 15
    # Bias: COG-corrected 4" fluxes of bright isolated stars (noise < 2 %) vs truth.
    assert abs(np.median(dm[bright])) <= 0.01, np.median(dm[bright])
    # Bias within the COG's own error (which is common to the block's stars).
    cog_rel = np.asarray(std["cog_correction_err"]) / np.asarray(std["cog_correction"])
    assert abs(np.median(dm[bright])) <= max(3 * 1.0857 * np.median(cog_rel[good]), 0.005)
    # The frame-to-frame scatter agrees with the noise model (median ratio; with 4-7
    # frames the scatter-based error's median is ~0.9 of the true error).
    s = np.asarray(std["flux_err_scatter"])[good, 1] / np.asarray(std["flux_err"])[good, 1]
    assert 0.7 <= np.nanmedian(s) <= 1.15, np.nanmedian(s)


def test_scatter_consistent_with_reported_errors(night):
    """Normalized residuals (F − truth) / flux_stdap_err of isolated, unsaturated stars
    whose own noise dominates the (common) COG error, pooled over the three bands
    (about 200 stars: the spread's own uncertainty is ~0.07). Measured with seed 5: K 1.03,
    J 1.02, H 0.81, pooled ~0.95 (H errors are ~20 % large; see the report)."""
    z_all = []
    for band in ("K", "J", "H"):
        b = _band(night, band)
        std, sc, mag = b["std"], b["sc"], b["mag"]
        kind = sc.sources["kind"][b["sel"]]
        f = np.asarray(std["flux_stdap"])
        noise = np.asarray(std["flux_err"])[:, b["cfg"].standard_index] * np.asarray(
            std["cog_correction"])
        cog_part = f * np.asarray(std["cog_correction_err"]) / np.asarray(std["cog_correction"])
        g = ((np.asarray(std["n_meas"]) >= 3) & (np.asarray(std["n_sat"]) == 0)
             & ((np.asarray(std["flags"]) & ~(8 | 64)) == 0) & (kind == "star")
             & (mag >= R2_SATURATION[band]) & (mag < R2_SATURATION[band] + 8)
             & (noise > 2 * cog_part))
        g &= _isolated(sc.sources, band, b["sel"])
        truth = _truth_flux(std["frames"][g], mag[g], sc.frames["zp_mag"])
        z_all.append((f[g] - truth) / np.asarray(std["flux_stdap_err"])[g])
    z = np.concatenate(z_all)
    assert z.size >= 150
    assert abs(np.median(z)) < 0.2
    assert 0.85 <= _mad(z) <= 1.2, [_mad(v) for v in z_all]


@pytest.mark.parametrize("band", ["K", "J", "H"])
def test_curve_of_growth_matches_the_true_psf(night, band):
    """The correction agrees with the simulator's PSF: a Moffat (beta 2.5) of the frames'
    true FWHM, measured noiselessly with the same apertures and annulus."""
    from gpu2mass.kernels import add_stamps, render_psf_stamps

    from gpu2mass.sim.psf import moffat_alpha, optical_fwhm

    b = _band(night, band)
    cog, sc = b["cog"], b["sc"]
    scale = sc.geometry.band.scale_arcsec
    assert np.all(cog.n_stars >= b["cfg"].cog_min_stars)
    for blk in range(cog.correction.size):
        frames = slice(blk * cog.block_frames, (blk + 1) * cog.block_frames)
        fwhm = float(np.median(sc.frames["fwhm_arcsec"][frames]))
        alpha = moffat_alpha(float(optical_fwhm(fwhm, scale=scale, beta=2.5)) / scale, 2.5)
        rng = np.random.default_rng(blk)
        n = 64
        fx, fy = rng.uniform(-0.5, 0.5, (2, n))
        stamps = render_psf_stamps(fx, fy, np.full(n, 1e4), np.full(n, alpha), np.full(n, 2.5),
                                   half_size=30)
        img = np.zeros((n, 64, 64), np.float32)
        for i in range(n):
            add_stamps(img[i], stamps[i : i + 1], np.array([2]), np.array([2]))
        radii = np.asarray(cog.radii_arcsec) / scale
        res = aperture_photometry(img, np.zeros((64, 64), bool), np.arange(n), 32 + fx, 32 + fy,
                                  radii, 14 / scale, 20 / scale)
        f = res.flux.mean(0) / 1e4
        true_c = 1.0 / f[b["cfg"].standard_index]
        # The stamps hold 99.9 % of the flux inside 30 px: the rest is the true extrapolation.
        assert abs(cog.correction[blk] / true_c - 1) <= max(3 * cog.correction_err[blk] / true_c,
                                                            0.01)
        assert abs(cog.curve[blk, -1] - f[-1] / f[b["cfg"].standard_index]) <= max(
            3 * cog.curve_err[blk, -1], 0.01)
        assert 1.0 < cog.extrapolation[blk] < 1.02


def test_curve_of_growth_scale_error_follows_shared_stars():
    """The scan's scale error from the blocks' corrections: independent blocks average
    down, blocks with the same stars do not, the extrapolation part is common."""
    nb, nr = 4, 12
    corr = np.full(nb, 1.05)
    stat = 0.004  # fractional, the 14" point's
    curve_err = np.zeros((nb, nr))
    curve_err[:, -1] = stat * corr  # extrapolation 1: curve_err × extra / corr = stat
    common = 0.001

    def cog(shared):
        return CurveOfGrowth(np.arange(3.0, 15.0), 12, np.ones((nb, nr)), curve_err, corr,
                             corr * np.hypot(stat, common), np.ones(nb), np.ones(nb), np.full(nb, 2.5),
                             np.full(nb, 6), shared)

    w = np.ones(nb)
    assert cog(np.eye(nb)).scale_error(w) == pytest.approx(np.hypot(stat / 2, common))
    assert cog(np.ones((nb, nb))).scale_error(w) == pytest.approx(np.hypot(stat, common))
    assert cog(None).scale_error(w) == pytest.approx(np.hypot(stat, common))
    # All the weight on one block: its own error.
    assert cog(np.eye(nb)).scale_error([0, 0, 3, 0]) == pytest.approx(np.hypot(stat, common))
    with pytest.raises(ValueError):
        cog(None).scale_error(np.zeros(nb))


def _cog_scan_table(rng, cfg, *, n_stars, nframes, scatter_14):
    """A synthetic aperture table of one scan's bright isolated stars (SNR 100-3000 in
    4"): fluxes on a Moffat curve of growth (alpha 1.4", beta 2.5), frame noise growing
    with the aperture's radius, and a star-to-star scatter of the ratios beyond it that
    grows to ``scatter_14`` at 14" (what neighbours inside the aperture or the annulus
    do). Returns the table and the true F(14")/F(4")."""
    from astropy.table import Table

    radii = np.asarray(cfg.radii_arcsec)
    frac = moffat_aperture_fraction(radii, 1.4, 2.5, cfg.sky_inner_arcsec, cfg.sky_outer_arcsec)
    true = frac / frac[cfg.standard_index]
    f4 = 10 ** rng.uniform(4.0, 6.0, n_stars)
    snr = 10 ** rng.uniform(2.0, np.log10(3000.0), n_stars)
    err = (f4 / snr)[:, None] * (radii / 4.0)[None, :]
    star = 1.0 + scatter_14 * rng.normal(size=n_stars)[:, None] * (
        np.clip(radii - 4.0, 0, None) / 10.0)[None, :]
    flux = f4[:, None] * true[None, :] * star + err * rng.normal(size=err.shape)
    t = Table({"flux": flux, "flux_err": err, "n_meas": np.full(n_stars, 6),
               "flags": np.zeros(n_stars, int), "n_sat": np.zeros(n_stars, int),
               "ra": np.full(n_stars, 10.0), "dec": 0.01 * np.arange(n_stars),
               "frame_mean": rng.uniform(0, nframes, n_stars)})
    t.meta["radii_arcsec"] = tuple(radii)
    return t, true[-1]


def test_curve_of_growth_errors_hold_the_star_to_star_scatter(monkeypatch):
    """Bright stars' F(14")/F(4") scatter beyond their noise (neighbours up to 5 mag
    fainter inside 14" or in the annulus; ci seed 11's block curves were off by 2.3 times
    their errors in J against the simulator's PSF). With that scatter measured on the
    scan and added to each star's error, the blocks' curves at 14" deviate from the truth
    by their quoted errors: z rms 0.8-1.25 over 200 blocks (measured 1.07; 2.34 with the
    noise-model errors alone). Without such scatter the errors stay near the noise
    model's (0.84; 0.84-0.99 over five seeds: slightly pessimistic, as each block's
    chi² scaling adds to the scan's scatter estimate)."""
    import gpu2mass.aperphot as ap

    cfg = AperPhotConfig()

    def z_rms(scatter, seed):
        rng = np.random.default_rng(seed)
        z = []
        for _ in range(40):
            t, true14 = _cog_scan_table(rng, cfg, n_stars=40, nframes=60, scatter_14=scatter)
            cog = fit_curve_of_growth(t, config=cfg, nframes=60)
            z.extend((cog.curve[:, -1] - true14) / cog.curve_err[:, -1])
        return float(np.sqrt(np.mean(np.square(z))))

    assert 0.8 <= z_rms(0.006, 1) <= 1.25
    assert 0.75 <= z_rms(0.0, 2) <= 1.25
    monkeypatch.setattr(ap, "_intrinsic_scatter", lambda *a, **k: 0.0)
    assert z_rms(0.006, 1) > 1.5


@pytest.mark.parametrize("band", ["K"])
def test_curve_of_growth_shared_stars_matrix(night, band):
    shared = _band(night, band)["cog"].shared
    assert shared.shape == (_band(night, band)["cog"].correction.size,) * 2
    assert np.allclose(np.diag(shared), 1.0) and np.allclose(shared, shared.T)
    assert np.all((shared >= 0) & (shared <= 1 + 1e-12))


@pytest.mark.parametrize("band", ["K", "J", "H"])
def test_r1_photometry_of_r2_saturated_stars(night, band):
    b = _band(night, band)
    r1, sc = b["r1"], b["sc"]
    idx = np.asarray(r1["index"])
    mag = b["mag"][idx]
    # Every R1-regime star on the frames was picked (saturated in some R2−R1 frame) ...
    regime = (b["mag"] < R2_SATURATION[band] - 0.3) & (np.asarray(b["phot"]["n_cover"]) > 0)
    assert set(np.flatnonzero(regime)) <= set(idx.tolist())
    ok = (np.asarray(r1["r1_status"]) == 1) & (mag < R2_SATURATION[band] + 0.3)
    ok &= _isolated(sc.sources, band, b["sel"][idx], dmag=6.0)
    assert ok.sum() >= 5
    truth = _truth_flux(r1["r1_frames"][ok], mag[ok], sc.frames["zp_mag"])
    dm = -2.5 * np.log10(np.asarray(r1["flux_stdap"])[ok] / truth)
    assert abs(np.median(dm)) <= 0.02, dm
    assert np.std(dm) <= 0.05, dm
    # Level-1 spec: 5 % at Ks 8; the reported errors say so too.
    rel = np.asarray(r1["flux_stdap_err"])[ok] / np.asarray(r1["flux_stdap"])[ok]
    assert np.all(rel < 0.05)
    # Errors consistent with the residuals (chi2 per star about 1; few stars: wide bound).
    chi2 = np.mean((dm / (1.0857 * rel)) ** 2)
    assert 0.1 < chi2 < 3.0, chi2
    # R1 frames with saturated pixels within 4" were not averaged in.
    assert np.all(np.asarray(r1["r1_n_meas"]) <= np.asarray(r1["r1_n_cover"]))


def test_ndet_counts_frames(night):
    b = _band(night, "K")
    phot, mag = b["phot"], b["mag"]
    n_meas = np.asarray(phot["n_meas"])
    n_det = np.asarray(phot["n_det"])
    nd = np.asarray(phot["ndet"])
    assert all(len(s) == 2 for s in nd)
    assert np.array_equal([int(s[0]) for s in nd], np.minimum(n_det, 9))
    assert np.array_equal([int(s[1]) for s in nd], np.minimum(n_meas, 9))
    assert np.all(n_det <= n_meas) and np.all(n_meas <= np.asarray(phot["n_cover"]))
    # Bright unsaturated stars: detected on every measured frame; 2MASS coverage is 6-7
    # frames, fewer at the scan ends and the frame edges.
    bright = (mag > 8.5) & (mag < 12) & (n_meas > 0)
    assert bright.sum() > 20
    assert np.array_equal(n_det[bright], n_meas[bright])
    assert np.median(np.asarray(phot["n_cover"])[bright]) >= 6
    # Saturated stars: no R2−R1 frame measured.
    sat = (mag < 7.5) & (np.asarray(phot["n_cover"]) > 0)
    assert sat.any() and np.all(n_meas[sat] == 0)
    assert np.all(np.asarray(phot["flags"])[sat] & FLAG_NONE_MEASURED)


def test_ndet_of_empty_sky_and_frame_exclusion(night):
    """Blank positions: M from the frame geometry and mask exactly, N at the 3-sigma rate."""
    b = _band(night, "K")
    sc, cfg = b["sc"], b["cfg"]
    rng = np.random.default_rng(3)
    g = sc.geometry
    # Positions along the scan, away from every truth source brighter than Ks 17 by 16".
    f = rng.integers(0, g.nframes, 4000)
    ra, dec = g.pixel_to_sky(f, rng.uniform(0, 255, f.size), rng.uniform(0, 255, f.size))
    src = sc.sources
    bright = np.nan_to_num(src["k_m"], nan=99) < 17
    keep = np.ones(ra.size, bool)
    for i in range(ra.size):
        near = np.flatnonzero(bright & (np.abs(src["dec"] - dec[i]) < 16 / 3600))
        xi, eta = tan_project(src["ra"][near], src["dec"][near], ra[i], dec[i])
        keep[i] = not np.any(np.hypot(xi, eta) < 16)
    ra, dec = ra[keep][:800], dec[keep][:800]
    phot = run_aperture_photometry(sc.data, mask=sc.bad, saturated=b["sat2"], noise=sc.noise,
                                   geometry=g, ra=ra, dec=dec, config=cfg)
    # Expected M from the geometry: centre >= 4" from the edges, no masked pixel within 4".
    guard = cfg.guard_radius_arcsec / g.band.scale_arcsec
    bad = sc.bad | b["sat2"]
    m_expected = np.zeros(ra.size, int)
    for k in range(g.nframes):
        x, y = g.sky_to_pixel(np.full(ra.size, k), ra, dec)
        inside = (x >= guard - 0.5) & (x <= g.band.nx - 0.5 - guard) & (y >= guard - 0.5) & (
            y <= g.band.ny - 0.5 - guard)
        for i in np.flatnonzero(inside):
            yy, xx = np.mgrid[int(y[i]) - 3 : int(y[i]) + 4, int(x[i]) - 3 : int(x[i]) + 4]
            ex = np.maximum(np.abs(xx - x[i]) - 0.5, 0)
            ey = np.maximum(np.abs(yy - y[i]) - 0.5, 0)
            near = ex**2 + ey**2 < guard**2
            if not bad[k][yy[near], xx[near]].any():
                m_expected[i] += 1
    assert np.array_equal(np.asarray(phot["n_meas"]), m_expected)
    rate = np.asarray(phot["n_det"]).sum() / max(int(m_expected.sum()), 1)
    # One-sided 3 sigma: 0.13 %; the night's bright-star spikes, stripes and persistence
    # and the sources fainter than Ks 17 allow a few times that.
    assert rate < 0.02, rate
    # Unweighted average including non-detections: blank sky averages to ~0 (robust
    # statistics: the artifacts of the injected bright stars make a heavy positive tail).
    f4 = np.asarray(phot["flux"])[:, cfg.standard_index]
    e4 = np.asarray(phot["flux_err"])[:, cfg.standard_index]
    z = (f4 / e4)[np.isfinite(f4)]
    assert z.size > 500
    assert abs(np.median(z)) < 0.15 and 0.8 < _mad(z) < 1.25, (np.median(z), _mad(z))


def test_average_is_the_plain_mean_of_frame_fluxes(night):
    b = _band(night, "K")
    sc, cfg, phot = b["sc"], b["cfg"], b["phot"]
    i = int(np.flatnonzero((b["mag"] > 11) & (b["mag"] < 12) & (np.asarray(phot["n_meas"]) >= 4)
                           & ((np.asarray(phot["flags"]) & 8) == 0))[0])
    frames = np.asarray(phot["frames"][i])
    frames = frames[frames >= 0]
    x, y = sc.geometry.sky_to_pixel(frames, np.full(frames.size, phot["ra"][i]),
                                    np.full(frames.size, phot["dec"][i]))
    scale = sc.geometry.band.scale_arcsec
    res = aperture_photometry(sc.data, sc.bad, frames, x, y,
                              np.asarray(cfg.radii_arcsec) / scale, 14 / scale, 20 / scale)
    np.testing.assert_allclose(phot["flux"][i], res.flux.mean(0), rtol=1e-12)
    assert phot["frame_mean"][i] == pytest.approx(frames.mean())


def test_trimmed_mean_variance_factor():
    rng = np.random.default_rng(1)
    v = np.sort(rng.standard_normal((20000, 101)), axis=1)
    for trim in (0.0, 0.1, 0.2, 0.3):
        lo = math.floor(trim * 101)
        est = v[:, lo : 101 - lo].mean(1)
        assert np.var(est) * 101 == pytest.approx(trimmed_mean_variance_factor(trim), rel=0.05)


def test_moffat_aperture_fraction_limits():
    r = np.array([1e-3, 1.0, 5.0, 1e4])
    f = moffat_aperture_fraction(r, 1.0, 2.5, 7.0, 10.0)
    assert f[0] < 1e-5 and f[-1] < 0  # the annulus subtracts the wing: huge apertures lose
    ee7 = 1 - (1 + 49.0) ** -1.5
    assert moffat_aperture_fraction(7.0, 1.0, 2.5, 7.0, 10.0) < ee7


def test_config_and_input_errors(night):
    with pytest.raises(ConfigError):
        AperPhotConfig(radii_arcsec=(3.0, 5.0))  # no 4" standard aperture
    with pytest.raises(ConfigError):
        AperPhotConfig(radii_arcsec=(4.0, 3.0))
    with pytest.raises(ConfigError):
        AperPhotConfig(sky_trim=0.5)
    with pytest.raises(ConfigError):
        AperPhotConfig(sky_inner_arcsec=20.0, sky_outer_arcsec=14.0)
    with pytest.raises(ConfigError):
        AperPhotConfig(cog_block_frames=0)
    b = _band(night, "K")
    sc = b["sc"]
    with pytest.raises(InputError):
        run_aperture_photometry(sc.data, mask=sc.bad, noise=sc.noise[:-1], geometry=sc.geometry,
                                ra=[0.0], dec=[0.0])
    with pytest.raises(InputError):
        run_aperture_photometry(sc.data, mask=np.ones_like(sc.bad), noise=sc.noise,
                                geometry=sc.geometry, ra=[0.0], dec=[0.0])
    with pytest.raises(StepError):
        fit_curve_of_growth(b["phot"][:3], config=b["cfg"])
