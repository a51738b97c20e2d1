"""Camera, noise budget, PSF, observing model and schedule of the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.time import Time

from gpu2mass.sim import psf, sensitivity
from gpu2mass.sim.camera import default_camera, make_calibration_library
from gpu2mass.sim.observing import (
    SITES,
    Atmosphere,
    airmass,
    galactic_to_radec,
    night_window,
    radec_to_galactic,
    sun_radec,
)
from gpu2mass.sim.plan import PRESETS, field_for_glat, schedule


@pytest.fixture
def rng():
    return np.random.default_rng(20261124)


def test_distortion_inverse_and_size():
    cam = default_camera()
    u, v = np.meshgrid(np.linspace(-127.5, 127.5, 9), np.linspace(-127.5, 127.5, 9))
    for band, opt in cam.optics.items():
        up, vp = opt.distort(u, v)
        u2, v2 = opt.undistort(up, vp)
        assert np.max(np.hypot(u2 - u, v2 - v)) < 1e-6
        corner = np.hypot(up - u, vp - v).max()
        assert 0.5 < corner < 1.5, f"{band}: distortion at the corners {corner:.2f} px, want ~1"
        # pixel → tangent → pixel
        xi, eta = opt.pixel_to_tangent(u, v)
        u3, v3 = opt.tangent_to_pixel(xi, eta)
        assert np.max(np.hypot(u3 - u, v3 - v)) < 1e-6
        # Orientation: +y is north-ish, +x is west-ish.
        xi_y, eta_y = opt.pixel_to_tangent(0.0, 10.0)
        xi_x, eta_x = opt.pixel_to_tangent(10.0, 0.0)
        assert eta_y > 19 and abs(xi_y) < 0.5 and xi_x < -19 and abs(eta_x) < 0.5


def test_calibration_library_properties(rng):
    cam = default_camera()
    lib = make_calibration_library(cam, rng)
    for b in cam.bands:
        assert abs(np.median(lib.flat[b]) - 1) < 1e-6
        good = lib.badpix[b] == 0
        assert 0.003 < 1 - good.mean() < 0.02
        assert set(np.unique(lib.badpix[b])) <= set(range(16))
        assert np.all(lib.satmap[b] > lib.pedestal[b] + 10000)
        assert lib.flat[b].shape == (cam.ny, cam.nx) and lib.flat[b].dtype == np.float32


def test_zero_points_solve_the_10_sigma_limits():
    for band, det in sensitivity.NOMINAL_DETECTORS.items():
        assert sensitivity.solve_zero_point(band, det) == pytest.approx(det.zp_mag, abs=0.001)
        snr = sensitivity.point_source_snr(sensitivity.LIMIT_10SIGMA[band], det)
        assert snr == pytest.approx(10.0, rel=0.002)
        # Gains above 2MASS's published lower limits, skies inside its measured ranges.
        assert det.gain_e_per_dn > {"J": 7.0, "H": 7.0, "K": 6.2}[band]
        lo, hi = {"J": (400, 1130), "H": (2000, 4000), "K": (1120, 1920)}[band]
        assert lo <= det.sky_dn[0] < det.sky_dn[1] < det.sky_dn[2] <= hi


def test_snr_scales_like_a_background_limited_source():
    det = sensitivity.NOMINAL_DETECTORS["K"]
    s1 = sensitivity.point_source_snr(16.0, det)
    s2 = sensitivity.point_source_snr(17.0, det)
    assert s1 / s2 == pytest.approx(10**0.4, rel=0.05)
    assert sensitivity.point_source_snr(14.3, det, nframes=1) == pytest.approx(10 / np.sqrt(6), rel=0.01)


def test_sampled_fwhm_mapping():
    assert psf.sampled_fwhm(2.1408) == pytest.approx(2.8, abs=0.01)
    for f in (2.4, 2.8, 3.5):
        assert psf.sampled_fwhm(float(psf.optical_fwhm(f))) == pytest.approx(f, abs=0.005)
    with pytest.raises(ValueError, match="reachable"):
        psf.optical_fwhm(1.0)
    p = psf.pixel_fractions(2.8)
    assert p.sum() == pytest.approx(1.0, abs=0.002)


def test_sun_and_galactic_against_astropy():
    from astropy.coordinates import get_sun

    t = Time("2000-03-15T06:00:00", scale="utc")
    ra, dec = sun_radec(t.mjd)
    s = get_sun(t)  # geocentric (GCRS); .icrs would move the observer to the barycentre
    assert abs(ra - s.ra.deg) < 0.05 and abs(dec - s.dec.deg) < 0.05
    c = SkyCoord([10.0, 250.0], [20.0, -40.0], unit="deg")
    l, b = radec_to_galactic(c.ra.deg, c.dec.deg)
    assert np.allclose(l, c.galactic.l.deg, atol=1e-4) and np.allclose(b, c.galactic.b.deg, atol=1e-4)
    ra2, dec2 = galactic_to_radec(l, b)
    assert np.allclose(ra2, c.ra.deg, atol=1e-8) and np.allclose(dec2, c.dec.deg, atol=1e-8)


def test_night_window_and_airmass():
    site = SITES["n"]
    t0, t1 = night_window(Time("2000-03-15").mjd, site)
    assert 9 < (t1 - t0) * 24 < 11.5  # March, 31.7° N, astronomical twilight
    lst_mid = None
    assert airmass(0.0, site.lat_deg, t0, site) >= 1.0
    ra, dec = field_for_glat(40.0, (t0 + t1) / 2, site)
    assert abs(radec_to_galactic(ra, dec)[1] - 40.0) < 1e-6
    assert airmass(ra, dec, (t0 + t1) / 2, site) < 1.3
    del lst_mid


def test_atmosphere_ranges(rng):
    atm = Atmosphere(sensitivity.NOMINAL_DETECTORS, rng, t0_mjd=51619.1)
    t = 51619.1 + np.linspace(0, 0.4, 400)
    fj = atm.seeing("J", t)
    assert fj.min() >= 2.45 - 1e-9 and fj.max() <= 3.5 + 1e-9 and np.ptp(fj) > 0.2
    assert np.all(atm.seeing("K", t) < fj + 1e-9)  # Ks sees better than J
    for b, det in sensitivity.NOMINAL_DETECTORS.items():
        s = atm.sky(b, t)
        assert det.sky_dn[0] - 1e-6 <= s.min() and s.max() <= det.sky_dn[2] + 1e-6
        zp = atm.zero_point(b, t, 1.0)
        assert np.max(np.abs(zp - det.zp_mag)) < 0.06
        assert atm.zero_point(b, t[0], 1.5) == pytest.approx(
            atm.zero_point(b, t[0], 1.0) - 0.5 * det.extinction)


@pytest.mark.parametrize("name", ["tiny", "ci", "scan"])
def test_presets_schedule(name, rng):
    site = SITES["n"]
    t0, t1 = night_window(Time("2000-03-15").mjd, site)
    plans = schedule(PRESETS[name], night_start_mjd=t0, night_end_mjd=t1, site=site,
                     frame_period_s=1.453, frame_step_arcsec=82.8, field=None, glat=None,
                     sci_scans=None, sci_frames=None, rng=rng)
    p = PRESETS[name]
    types = [s.type for s in plans]
    assert types.count("dark") == p.dark_scans
    assert types.count("cal") == p.cal_observations * p.cal_scans_per_observation
    assert types.count("sci") == p.sci_scans
    starts = [s.start_mjd for s in plans]
    assert all(b > a for a, b in zip(starts, starts[1:], strict=False))
    assert [s.number for s in plans] == list(range(1, len(plans) + 1))
    for s in plans:
        if s.type == "sci":
            assert s.nframes == p.sci_frames and s.direction in "ns"
            mid = s.start_mjd + s.nframes * 1.453 / 2 / 86400
            ra, dec = s.ra0, s.dec_start
            assert airmass(ra, dec, mid, site) < 2.0
    if name == "ci":
        glats = sorted(abs(s.glat) for s in plans if s.type == "sci")
        assert glats == pytest.approx([22.0, 45.0], abs=0.5)


def test_night_preset_fills_the_night(rng):
    site = SITES["n"]
    t0, t1 = night_window(Time("2000-03-15").mjd, site)
    plans = schedule(PRESETS["night"], night_start_mjd=t0, night_end_mjd=t1, site=site,
                     frame_period_s=1.453, frame_step_arcsec=82.8, field=None, glat=None,
                     sci_scans=None, sci_frames=None, rng=rng)
    sci = [s for s in plans if s.type == "sci"]
    cal = [s for s in plans if s.type == "cal"]
    span_h = (plans[-1].start_mjd - plans[0].start_mjd) * 24
    assert 7.5 < span_h < 8.5 and len(sci) > 50
    # A calibration observation (six scans) about every hour.
    assert len(cal) % 6 == 0 and 7 <= len(cal) // 6 <= 9
    assert [s.type for s in plans][0] == "dark" and [s.type for s in plans][-1] == "dark"


def test_airmass_is_at_least_one_at_the_zenith():
    site = SITES["n"]
    mjd = 51619.3
    from gpu2mass.sim.observing import gmst_deg

    lst = float(np.mod(gmst_deg(mjd) + site.lon_deg, 360))
    assert airmass(lst, site.lat_deg, mjd, site) == 1.0
