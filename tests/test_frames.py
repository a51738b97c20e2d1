"""Frame calibration (gpu2mass.frames) against the simulated truth of the tiny night.

The tiny night (tests/conftest.py) has one dark scan of 8 frames and one cal and one sci
scan of 30 frames in J, H, K; everything is read through the raw-night reader.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from gpu2mass.darks import run_darks
from gpu2mass.errors import ConfigError, InputError, StepError
from gpu2mass.frames import (
    MASK_BAD,
    MASK_NONFINITE,
    MASK_R1_SATURATED,
    MASK_SATURATED,
    UNUSABLE_R2R1,
    FrameConfig,
    illumination_blocks,
    run_calibrate_frames,
)
from gpu2mass.geometry import frame_geometry_from_truth
from gpu2mass.io.rawnight import open_night
from gpu2mass.sim import psf
from gpu2mass.sim.camera import default_camera
from gpu2mass.sim.observing import Atmosphere

BANDS = ("J", "H", "K")
MAGCOL = {"J": "j_m", "H": "h_m", "K": "k_m"}


def _table(path):
    return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}


class _Setup:
    """The night, its darks, and every sky scan's calibrated frames (computed once)."""

    def __init__(self, root):
        self.root = root
        self.night = open_night(root)
        self.darks = run_darks(self.night.iter_scans(("dark",)))
        self.frames_truth = _table(root / "truth" / "frames.parquet")
        self.sources = _table(root / "truth" / "sources.parquet")
        self.sci = next(s.number for s in self.night.scans if s.type == "sci")
        self.scans = {s.number: self.night.load_scan(s.number)
                      for s in self.night.scans if s.type != "dark"}
        self.cal = {(n, b): self.calibrate(n, b) for n in self.scans for b in BANDS}

    def calib(self, kind, band):
        return self.night.calib_image(kind, band)

    def calibrate(self, number, band, *, dark=None):
        sb = self.scans[number][band]
        return run_calibrate_frames(
            sb.r1, sb.r2r1, dark=self.darks[band] if dark is None else dark,
            flat=self.calib("flat", band), satmap=self.calib("satmap", band),
            badpix=self.calib("badpix", band))

    def truth(self, number, band, column):
        t = self.frames_truth
        sel = np.flatnonzero((t["scan"] == number) & (t["band"] == band))
        return t[column][sel[np.argsort(t["frame"][sel])]]


@pytest.fixture(scope="module")
def setup(tiny_night):
    return _Setup(tiny_night)


def test_sky_level_matches_truth_within_1_percent(setup):
    for (number, band), cf in setup.cal.items():
        ratio = np.asarray(cf.sky_r2r1) / setup.truth(number, band, "sky_dn")
        # Measured: 0.9993-1.0017 (the median of a frame sits a little above the mean sky
        # because of the sources in it).
        assert np.all(np.abs(ratio - 1) < 0.01), (number, band, ratio.min(), ratio.max())
        # R1 collects t_R1 / t_R2R1 of the sky (dark and pedestal removed).
        r1_ratio = np.asarray(cf.sky_r1) / (setup.truth(number, band, "sky_dn") * 0.051 / 1.25)
        assert np.all(np.abs(r1_ratio - 1) < 0.03), (number, band, r1_ratio)


def test_noise_matches_model_within_10_percent(setup):
    inst = setup.night.instrument
    for (number, band), cf in setup.cal.items():
        g, rn = inst.gain_e_per_dn[band], inst.read_noise_e[band]
        sky = setup.truth(number, band, "sky_dn")
        # The histogram width also holds the simulated airglow waves (amplitude A = 0.3/0.6/
        # 0.15 % of the sky in J/H/Ks, sim.observing): real sky structure, moving between
        # frames, that no block pattern removes; a sine adds (A sky)²/2 of variance.
        model = np.sqrt(sky / g + (rn / g) ** 2 + (Atmosphere.AIRGLOW_AMP[band] * sky) ** 2 / 2)
        ratio = np.asarray(cf.noise_r2r1) / model
        assert np.all(np.abs(ratio - 1) < 0.12), (number, band, ratio.min(), ratio.max())
        assert abs(np.median(ratio) - 1) < 0.10, (number, band, np.median(ratio))
        # R1: read noise plus the sky's shot noise over 51 ms.
        r1_model = np.sqrt(sky * 0.051 / 1.25 / g + (rn / g) ** 2)
        r1_ratio = np.asarray(cf.noise_r1) / r1_model
        assert np.all(np.abs(r1_ratio - 1) < 0.10), (number, band, r1_ratio.min(), r1_ratio.max())


def test_bad_pixels_are_masked_and_zero(setup):
    for (_, band), cf in setup.cal.items():
        bad = setup.calib("badpix", band) != 0
        for mask, data in ((cf.mask_r2r1, cf.r2r1), (cf.mask_r1, cf.r1)):
            assert np.all(mask[:, bad] & MASK_BAD)
            assert not np.any(mask[:, ~bad] & MASK_BAD)
            assert np.all(data[:, bad] == 0)
            assert data.dtype == np.float32 and mask.dtype == np.uint8
        assert not np.any(cf.mask_r2r1 & MASK_NONFINITE)


def test_bright_star_core_is_saturated(setup):
    """Every core pixel of the Ks = 3 star is saturated; R1-saturated where R1 hits SAT."""
    number = setup.sci
    i = int(np.flatnonzero(np.isclose(setup.sources["k_m"], 3.0))[0])
    ra, dec = setup.sources["ra"][i], setup.sources["dec"][i]
    margin = FrameConfig().saturation_margin_dn
    seen = r1_seen = 0
    for band in BANDS:
        cf = setup.cal[(number, band)]
        geom = frame_geometry_from_truth(setup.root, number, band)
        sat = setup.calib("satmap", band)
        sb = setup.scans[number][band]
        r1 = sb.r1[0:len(sb.r1)].astype(np.float64)
        read2 = r1 + sb.r2r1[0:len(sb.r2r1)]
        for f in range(len(sb.r1)):
            x, y = geom.sky_to_pixel(f, ra, dec)
            if not (3 <= x <= 252 and 3 <= y <= 252):
                continue
            yy, xx = np.mgrid[0:256, 0:256]
            # Bad pixels (dead ones have flat ~ 0) carry no signal and are masked as bad.
            core = (np.hypot(xx - x, yy - y) <= 2.0) & (setup.calib("badpix", band) == 0)
            assert np.all(cf.mask_r2r1[f][core] & MASK_SATURATED), (band, f)
            assert np.all(read2[f][core] >= sat[core] - margin)
            seen += 1
            r1sat = r1[f] >= sat - margin
            r1_seen += int(r1sat[core].sum())
            np.testing.assert_array_equal((cf.mask_r1[f] & MASK_R1_SATURATED) != 0, r1sat)
            np.testing.assert_array_equal((cf.mask_r2r1[f] & MASK_R1_SATURATED) != 0, r1sat)
        # Away from bright stars nothing is saturated: no false saturation on the sky.
        assert (cf.mask_r2r1 & MASK_SATURATED).mean() < 1e-3
    assert seen >= 3
    assert r1_seen > 0  # Ks = 3 saturates R1 at its peak (2MASS: R1 saturates near Ks 4-5)


def test_bright_isolated_star_flux_matches_truth(setup):
    """Aperture flux of the injected Ks 9-10 stars vs 10^(-0.4 (m - zp_truth)), within 1 %."""
    number = setup.sci
    k = np.round(setup.sources["k_m"], 6)
    ladder = np.flatnonzero(np.isin(k, [9.0, 9.2, 9.4, 9.6, 9.8, 10.0])
                            & (setup.sources["kind"] == "star"))
    yy, xx = np.mgrid[-12:13, -12:13]
    ratios = []
    for band in BANDS:
        cf = setup.cal[(number, band)]
        geom = frame_geometry_from_truth(setup.root, number, band)
        scale = default_camera().optics[band].scale_arcsec  # the true scale (truth PSF)
        fwhm = setup.truth(number, band, "fwhm_arcsec")
        zp = setup.truth(number, band, "zp_mag")
        for i in ladder:
            for f in range(cf.r2r1.shape[0]):
                x, y = geom.sky_to_pixel(f, setup.sources["ra"][i], setup.sources["dec"][i])
                if not (16 <= x <= 239 and 16 <= y <= 239):
                    continue
                cx, cy = round(float(x)), round(float(y))
                fx, fy = float(x) - cx, float(y) - cy
                cut = cf.r2r1[f, cy - 12:cy + 13, cx - 12:cx + 13]
                unusable = (cf.mask_r2r1[f, cy - 12:cy + 13, cx - 12:cx + 13] & UNUSABLE_R2R1) != 0
                r = np.hypot(xx - fx, yy - fy)
                ap, ann = r <= 6, (r >= 8) & (r <= 12) & ~unusable
                if unusable[ap].any():
                    continue
                frac = psf.pixel_fractions(float(fwhm[f]), scale=scale, phase=(fx, fy), half=12)
                expect = 10 ** (-0.4 * (setup.sources[MAGCOL[band]][i] - zp[f])) * (
                    frac[ap].sum() - ap.sum() * np.median(frac[ann]))
                got = cut[ap].sum() - ap.sum() * np.median(cut[ann])
                ratios.append(got / expect)
    ratios = np.array(ratios)
    assert len(ratios) >= 15
    assert abs(np.mean(ratios) - 1) < 0.01, (np.mean(ratios), ratios.std(), len(ratios))


def _block_median_std(image, usable, block=16):
    n = image.shape[0] // block
    a = np.where(usable, image, np.nan).reshape(n, block, n, block)
    return float(np.nanstd(np.nanmedian(a, axis=(1, 3))))


def test_illumination_correction_removes_fixed_structure(setup):
    """The common additive pattern of a block is removed: large-scale residuals shrink."""
    from gpu2mass.kernels import calibrate_frames

    number, band = setup.sci, "K"
    sb = setup.scans[number][band]
    dark = setup.darks[band]
    # A residual fixed structure (a dark gradient of ±8 DN the dark did not capture),
    # which is what the illumination correction is for.
    grad = np.linspace(-8.0, 8.0, 256, dtype=np.float32)[None, :]
    wrong = type("Dark", (), {"r1": dark.r1, "r2r1": dark.r2r1 + grad})()
    args = (setup.calib("flat", band), setup.calib("satmap", band), setup.calib("badpix", band))
    for d, shrink in ((dark, 1.0), (wrong, 0.75)):
        cf = setup.calibrate(number, band, dark=d)
        raw, mask = calibrate_frames(sb.r1[0:30], sb.r2r1[0:30], d.r2r1, *args)
        before, after = [], []
        for f in range(raw.shape[0]):
            use = (mask[f] & UNUSABLE_R2R1) == 0
            before.append(_block_median_std(raw[f] - np.median(raw[f][use]), use))
            after.append(_block_median_std(cf.r2r1[f], use))
        # Measured (K): true dark 3.96 -> 3.83 DN (what is left is moving airglow);
        # with the gradient 6.17 -> 3.83 DN.
        assert np.mean(after) < shrink * np.mean(before), (np.mean(before), np.mean(after))
        if d is wrong:
            # The pattern found is the gradient (with the sign it had in the frames).
            good = setup.calib("badpix", band) == 0
            pattern = np.where(good, np.asarray(cf.illumination_r2r1[0]), np.nan)
            residual = np.nanmean(pattern, axis=0) + grad[0]
            assert residual.std() < 0.5, residual.std()
    # The pattern's noise: 30 frames, one block, trimmed 0.2 each side; per-pixel scatter
    # near the ideal noise/sqrt(n) of a plain mean (plus the dark's own error, which the
    # pattern rightly picks up).
    cf = setup.cal[(number, band)]
    good = setup.calib("badpix", band) == 0
    ideal = np.sqrt(np.median(np.asarray(cf.noise_r2r1)) ** 2 / 30
                    + np.median(dark.error_r2r1[good]) ** 2)
    measured = float(np.std(np.asarray(cf.illumination_r2r1[0])[good]))
    assert measured < 1.3 * ideal, (measured, ideal)


def test_sky_subtracted_output(setup):
    for cf in setup.cal.values():
        for data, mask, unusable in ((cf.r2r1, cf.mask_r2r1, UNUSABLE_R2R1),
                                     (cf.r1, cf.mask_r1, MASK_BAD | MASK_NONFINITE)):
            med = [np.median(data[f][(mask[f] & unusable) == 0]) for f in range(0, 30, 7)]
            assert np.all(np.abs(med) < 0.05 * np.asarray(cf.noise_r2r1).min())


def test_illumination_blocks():
    starts, block = illumination_blocks(30, 42, 21)
    assert starts.tolist() == [0] and np.all(block == 0)
    starts, block = illumination_blocks(273, 42, 21)
    assert starts[0] == 0 and starts[-1] == 273 - 42 and np.all(np.diff(starts) <= 21)
    centres = starts + 20.5
    for f in range(273):
        assert starts[block[f]] <= f < starts[block[f]] + 42
        assert abs(f - centres[block[f]]) == np.abs(f - centres).min()  # the nearest block


def test_long_scan_uses_running_blocks(rng):
    n, ny, nx = 100, 32, 32
    base = np.linspace(-5, 5, nx, dtype=np.float32)[None, None, :]
    drift = np.linspace(0, 1, n, dtype=np.float32)[:, None, None] * 10 * base / 5
    r2r1 = (500 + base + drift + rng.normal(0, 3, (n, ny, nx))).astype(np.float32)
    r1 = np.full((n, ny, nx), 3000.0, np.float32)
    dark = type("Dark", (), {"r1": np.full((ny, nx), 3000.0, np.float32),
                             "r2r1": np.zeros((ny, nx), np.float32)})()
    ones = np.ones((ny, nx), np.float32)
    cf = run_calibrate_frames(r1, r2r1, dark=dark, flat=ones, satmap=ones * 1e5,
                              badpix=np.zeros((ny, nx), np.uint8))
    assert cf.illumination_r2r1.shape[0] == 4
    np.testing.assert_array_equal(cf.block_frames[:, 1] - cf.block_frames[:, 0], 42)
    # A slowly changing pattern is followed block by block: the residual is well below
    # what one whole-scan block leaves (the ±10 DN drift at the ends, half of it).
    one = run_calibrate_frames(r1, r2r1, dark=dark, flat=ones, satmap=ones * 1e5,
                               badpix=np.zeros((ny, nx), np.uint8),
                               config=FrameConfig(illumination_block_frames=100))
    running = np.abs(cf.r2r1.mean(axis=1)).max()
    whole = np.abs(one.r2r1.mean(axis=1)).max()
    assert running < 0.7 * whole and running < 3.5, (running, whole)
    assert np.allclose(cf.sky_r2r1, 500, atol=1.0)


def _small(rng, n=4, ny=16, nx=16):
    r1 = rng.normal(3000, 5, (n, ny, nx)).astype(np.float32)
    r2r1 = rng.normal(800, 10, (n, ny, nx)).astype(np.float32)
    dark = type("Dark", (), {"r1": np.full((ny, nx), 3000.0, np.float32),
                             "r2r1": np.full((ny, nx), 4.0, np.float32)})()
    kw = {"dark": dark, "flat": np.ones((ny, nx), np.float32),
          "satmap": np.full((ny, nx), 2e4, np.float32), "badpix": np.zeros((ny, nx), np.uint8)}
    return r1, r2r1, kw


def test_errors(rng):
    r1, r2r1, kw = _small(rng)
    with pytest.raises(InputError, match="R1 .* and R2R1"):
        run_calibrate_frames(r1, r2r1[:3], **kw)
    with pytest.raises(InputError, match="flat has shape"):
        run_calibrate_frames(r1, r2r1, **{**kw, "flat": np.ones((8, 8), np.float32)})
    with pytest.raises(StepError, match="R2R1 frame 0 has no usable pixel"):
        run_calibrate_frames(r1, r2r1, **{**kw, "badpix": np.ones((16, 16), np.uint8)})
    r1b = r1.copy()
    r1b[2] = 2e4  # every pixel of frame 2 saturated
    with pytest.raises(StepError, match="R2R1 frame 2"):
        run_calibrate_frames(r1b, r2r1, **kw)
    with pytest.raises(InputError, match="empty"):
        run_calibrate_frames(r1[:0], r2r1[:0], **kw)
    with pytest.raises(ConfigError):
        FrameConfig(illumination_trim=0.5)
    with pytest.raises(ConfigError):
        FrameConfig(illumination_block_frames=10, illumination_stride_frames=11)
    with pytest.raises(ConfigError):
        FrameConfig(saturation_margin_dn=-1.0)


def test_nonfinite_pixels_are_masked(rng):
    r1, r2r1, kw = _small(rng)
    r2r1[1, 3, 4] = np.nan
    flat = kw["flat"].copy()
    flat[5, 5] = 0.0
    cf = run_calibrate_frames(r1, r2r1, **{**kw, "flat": flat})
    assert cf.mask_r2r1[1, 3, 4] & MASK_NONFINITE and cf.r2r1[1, 3, 4] == 0
    assert not cf.mask_r1[1, 3, 4] & MASK_NONFINITE  # R1 of that pixel is fine
    assert np.all(cf.mask_r2r1[:, 5, 5] & MASK_NONFINITE) and np.all(cf.r1[:, 5, 5] == 0)
    assert np.all(np.isfinite(cf.r2r1)) and np.all(np.isfinite(cf.sky_r2r1))
