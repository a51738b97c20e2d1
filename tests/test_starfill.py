"""Bad pixels under stars filled with the frame's PSF model before the Atlas coadd.

Noiseless Moffat stars on the tiny night's true geometry, a bad pixel at a star's core in
one frame: with the fill the 14" Atlas flux is the star's to 0.1 % (without it, up to
0.5 % off: ``test_atlas.test_masked_pixel_at_a_star_core_keeps_its_flux``), also when the
frames' seeing is known only to 5 %; saturated and transient-masked pixels, and bad pixels
away from stars, are left alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from _frames import simple_scan
from test_atlas import APERTURE_ARCSEC, PSF_BETA, _noiseless_star_frames

from gpu2mass.atlas import AtlasConfig, AtlasGrid, plan_atlas_grids, run_atlas
from gpu2mass.errors import ConfigError
from gpu2mass.frames import MASK_BAD, MASK_SATURATED
from gpu2mass.sim.galaxy import moffat_enclosed_fraction
from gpu2mass.starfill import StarFillConfig, fill_bad_pixels_under_stars

ALPHA_PX, FLUX = 1.1, 1000.0  # FWHM 2.3": the sharpest of the simulator's Ks, where it matters most


@pytest.fixture(scope="module")
def scan(tiny_night):
    return simple_scan(tiny_night, "K")


def _fwhm_arcsec(alpha_px, scale):
    return alpha_px * scale * 2.0 * np.sqrt(2.0 ** (1.0 / PSF_BETA) - 1.0)


def _star(scan, px, py):
    """A noiseless star at pixel (px, py) of the second Atlas grid: its frames, the frames
    that hold it well inside, a 100 × 100 grid around it and its detections (one per
    frame, at the true position)."""
    g0 = plan_atlas_grids({"K": scan.geometry})[1]
    ra, dec = g0.pixel_to_sky(px, py)
    grid = AtlasGrid(0, ra, dec, 100, 100, 50.5, 50.5, g0.pixel_deg)
    frames, fx, fy = _noiseless_star_frames(scan.geometry, ra, dec, ALPHA_PX, FLUX)
    inside = np.flatnonzero((fx > 10) & (fx < 245) & (fy > 10) & (fy < 245))
    det = {"frame": inside, "x": fx[inside], "y": fy[inside], "snr": np.full(inside.size, 100.0)}
    return frames, fx, fy, inside, grid, det


def _atlas_ratio(scan, frames, mask, grid):
    cfg = AtlasConfig(background_match=False, reject_sigma=0.0)
    img = run_atlas(frames, mask=mask, geometry=scan.geometry, noise=np.ones(scan.geometry.nframes),
                    grid=grid, config=cfg)
    yy, xx = np.mgrid[0:100, 0:100]
    ap = np.hypot(xx - 49.5, yy - 49.5) < APERTURE_ARCSEC
    truth = FLUX * moffat_enclosed_fraction(APERTURE_ARCSEC / scan.geometry.band.scale_arcsec,
                                            ALPHA_PX, PSF_BETA)
    return np.nansum(img.data[ap]) / truth, img


@pytest.mark.parametrize("seeing_error", [1.0, 0.95, 1.05])
def test_fill_restores_the_flux_of_a_star_with_a_bad_core_pixel(scan, seeing_error):
    scale = scan.geometry.band.scale_arcsec
    n = scan.geometry.nframes
    seeing = np.full(n, _fwhm_arcsec(ALPHA_PX, scale) * seeing_error)
    for px, py in ((230.3, 420.8), (281.6, 555.2), (250.9, 700.4)):
        frames, fx, fy, inside, grid, det = _star(scan, px, py)
        k0 = inside[len(inside) // 2]
        bits = np.zeros(frames.shape, np.uint8)
        # The peak pixel and its right-hand neighbour: the worst place for a bad pixel.
        yc, xc = round(fy[k0]), round(fx[k0])
        bits[k0, yc, xc:xc + 2] = MASK_BAD
        frames[k0, yc, xc:xc + 2] = 0.0  # calibration zeroes bad pixels
        none = np.zeros(frames.shape, bool)
        filled, mask, n_filled = fill_bad_pixels_under_stars(
            frames, bits, transient_mask=none, detections=det, geometry=scan.geometry,
            seeing_fwhm=seeing, noise=np.ones(scan.geometry.nframes))
        assert n_filled == 2 and not mask.any()
        left_out, _ = _atlas_ratio(scan, frames, bits != 0, grid)
        ratio, img = _atlas_ratio(scan, filled, mask, grid)
        assert abs(ratio - 1.0) < 0.001, (px, py, ratio, left_out)
        assert abs(ratio - 1.0) < abs(left_out - 1.0)
        assert img.coverage.min() >= 1


def test_fill_leaves_saturated_transient_and_starless_pixels_alone(scan):
    n = scan.geometry.nframes
    seeing = np.full(n, _fwhm_arcsec(ALPHA_PX, scan.geometry.band.scale_arcsec))
    frames, fx, fy, inside, _grid, det = _star(scan, 250.9, 700.4)
    k0, k1 = inside[0], inside[1]
    bits = np.zeros(frames.shape, np.uint8)
    transient = np.zeros(frames.shape, bool)
    y0, x0 = round(fy[k0]), round(fx[k0])
    bits[k0, y0, x0] = MASK_BAD | MASK_SATURATED  # bad and saturated: never filled
    bits[k1, round(fy[k1]), round(fx[k1])] = MASK_BAD
    transient[k1, round(fy[k1]), round(fx[k1])] = True  # a transient mask wins
    bits[k0, 5, 5] = MASK_BAD  # far from any star
    filled, mask, n_filled = fill_bad_pixels_under_stars(
        frames, bits, transient_mask=transient, detections=det, geometry=scan.geometry,
        seeing_fwhm=seeing, noise=np.ones(scan.geometry.nframes))
    assert n_filled == 0 and filled is frames
    np.testing.assert_array_equal(mask, (bits != 0) | transient)
    # Disabled: the frames and the plain mask.
    bits[k0, y0, x0] = MASK_BAD
    out, mask, n_filled = fill_bad_pixels_under_stars(
        frames, bits, transient_mask=transient, detections=det, geometry=scan.geometry,
        seeing_fwhm=seeing, noise=np.ones(n), config=StarFillConfig(enabled=False))
    assert n_filled == 0 and out is frames and mask[k0, y0, x0]
    # Enabled, the same pixel is filled with the star's light; the input is not changed.
    out, mask, n_filled = fill_bad_pixels_under_stars(
        frames, bits, transient_mask=transient, detections=det, geometry=scan.geometry,
        seeing_fwhm=seeing, noise=np.ones(scan.geometry.nframes))
    assert n_filled == 1 and not mask[k0, y0, x0] and out is not frames
    assert out[k0, y0, x0] == pytest.approx(frames[k0, y0, x0], rel=1e-2)


def test_faint_detections_are_not_modelled(scan):
    n = scan.geometry.nframes
    seeing = np.full(n, _fwhm_arcsec(ALPHA_PX, scan.geometry.band.scale_arcsec))
    frames, fx, fy, inside, _grid, det = _star(scan, 250.9, 700.4)
    det["snr"][:] = 9.0
    k0 = inside[0]
    bits = np.zeros(frames.shape, np.uint8)
    bits[k0, round(fy[k0]), round(fx[k0])] = MASK_BAD
    _, _, n_filled = fill_bad_pixels_under_stars(
        frames, bits, transient_mask=np.zeros(frames.shape, bool), detections=det,
        geometry=scan.geometry, seeing_fwhm=seeing, noise=np.ones(scan.geometry.nframes))
    assert n_filled == 0


def test_config_checks():
    with pytest.raises(ConfigError):
        StarFillConfig(half_size=0)
    with pytest.raises(ConfigError):
        StarFillConfig(min_good_fraction=0.0)
    with pytest.raises(ConfigError):
        StarFillConfig(width_scales=(0.9, 1.0, 1.2))
    StarFillConfig(width_scales=(1.0,))
