"""The frame geometry model: inverses, and exact agreement with the simulator's optics."""

from __future__ import annotations

import numpy as np

from gpu2mass.geometry import (
    BandGeometry,
    FrameGeometry,
    frame_geometry_from_truth,
    tan_deproject,
    tan_project,
)
from gpu2mass.sim.camera import default_camera


def test_tan_round_trip_against_astropy(rng):
    from astropy.coordinates import SkyCoord

    for ra0, dec0 in ((359.9, -62.0), (10.0, 85.0)):
        xi, eta = rng.uniform(-1800, 1800, (2, 100))
        ra, dec = tan_deproject(xi, eta, ra0, dec0)
        xi2, eta2 = tan_project(ra, dec, ra0, dec0)
        assert np.allclose(xi, xi2, atol=1e-7) and np.allclose(eta, eta2, atol=1e-7)
        # Independent check: the gnomonic radius is tan of astropy's angular separation.
        sep = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(ra0, dec0, unit="deg")).rad
        assert np.allclose(np.hypot(xi, eta) / 206264.806, np.tan(sep), rtol=1e-9)


def test_truth_conversion_is_exact():
    from gpu2mass.geometry import _truth_band

    cam = default_camera()
    x, y = np.meshgrid(np.linspace(0, 255, 7), np.linspace(0, 255, 7))
    for band, opt in cam.optics.items():
        from dataclasses import asdict

        bg = _truth_band(asdict(opt), 256, 256)
        xi, eta = bg.pixel_to_tangent(x, y)
        xi2, eta2 = opt.pixel_to_tangent(x - 127.5, y - 127.5)
        assert np.allclose(xi, xi2, atol=1e-9) and np.allclose(eta, eta2, atol=1e-9), band
        x3, y3 = bg.tangent_to_pixel(xi, eta)
        assert np.allclose(x3, x, atol=1e-7) and np.allclose(y3, y, atol=1e-7)


def test_frame_geometry_round_trip():
    bg = BandGeometry(256, 256, 2.0, 0.3, np.zeros((2, 7)))
    fg = FrameGeometry(bg, np.array([150.0, 150.0]), np.array([20.0, 20.023]))
    ra, dec = fg.pixel_to_sky(1, 127.5, 127.5)
    assert np.isclose(ra, 150.0) and np.isclose(dec, 20.023)
    x, y = fg.sky_to_pixel(0, *fg.pixel_to_sky(0, 10.0, 200.0))
    assert np.isclose(x, 10.0) and np.isclose(y, 200.0)


def test_truth_geometry_of_a_simulated_night(tiny_night):
    fg = frame_geometry_from_truth(tiny_night, 3, "K")
    assert fg.nframes == 30
    # Successive frames step ~82.8" north (the tiny science scan goes north).
    step = np.diff(fg.dec) * 3600
    assert np.allclose(np.median(step), 82.8, atol=1.0)
