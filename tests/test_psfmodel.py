"""The per-scan PSF model against truth: the tiny night, and synthetic scans with known seeing.

Tiny night (``simple_scan``, 30 frames of 256 x 256 per band): the simulator renders a
pixel-integrated Moffat of beta 2.5 whose optical FWHM is
``optical_fwhm(truth fwhm_arcsec, scale, 2.5)`` (the truth column is the *sampled* FWHM), at
the band's true pixel scale (J 1.9966, H 2.0060, Ks 1.9839"/px), which the model is given.
Stars brighter than the simulator's spike limit are kept out of the PSF sample
(``max_flux_dn``; see :class:`PsfModelConfig`).

Synthetic scans: stars rendered with :func:`gpu2mass.kernels.psf.render_point_sources`
(pixel-integrated Moffat) plus Gaussian noise, with the seeing changing abruptly halfway.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _frames import simple_scan
from astropy.table import Table
from gpu2mass.kernels.psf import render_point_sources
from gpu2mass.kernels.reference.detect import aperture_weights

from gpu2mass.errors import ConfigError, InputError, StepError
from gpu2mass.framedet import FrameDetConfig, run_frame_detection
from gpu2mass.psfmodel import (
    FLAG_BETA_FIXED,
    FLAG_BORROWED,
    FLAG_NOT_CONVERGED,
    PsfModelConfig,
    moffat_encircled_energy,
    moffat_fwhm_px,
    psf_stamp,
    run_psf_model,
)
from gpu2mass.sim.artifacts import SPIKE_LIMIT
from gpu2mass.sim.psf import moffat_alpha, optical_fwhm, pixel_fractions

BANDS = ("J", "H", "K")
TRUE_BETA = 2.5


def _gain(night, band):
    return json.loads((night / "night.json").read_text())["instrument"]["gain_e_per_dn"][band]


@pytest.fixture(scope="module")
def fitted(tiny_night):
    """band -> (simple scan, PsfModel, true optical FWHM per frame, arcsec, pixel scale)."""
    out = {}
    for b in BANDS:
        s = simple_scan(tiny_night, b)
        gain = _gain(tiny_night, b)
        det = run_frame_detection(s.data, mask=s.bad, noise=s.noise,
                                  config=FrameDetConfig(gain_e_per_dn=gain))
        scale = s.geometry.band.scale_arcsec
        # 4" flux of the faintest spike-drawing star (>= 0.85 of its total) at the lowest
        # zero point, with a 0.8 margin: every spike star is above, stars 0.1 mag fainter below.
        spike_flux = 0.8 * 10 ** (-0.4 * (SPIKE_LIMIT[b] - s.frames["zp_mag"].min()))
        cfg = PsfModelConfig(pixel_scale_arcsec=scale, gain_e_per_dn=gain, max_flux_dn=spike_flux)
        model = run_psf_model(s.data, mask=s.bad, noise=s.noise, detections=det, config=cfg)
        truth = optical_fwhm(s.frames["fwhm_arcsec"], scale=scale, beta=TRUE_BETA)
        out[b] = (s, model, truth, scale)
    return out


@pytest.mark.parametrize("band", BANDS)
def test_beta_recovered(fitted, band):
    _, model, _, _ = fitted[band]
    assert np.all(model.beta == model.beta[0])
    # measured: J 2.511, H 2.517, Ks 2.513
    assert abs(model.beta[0] - TRUE_BETA) < 0.1
    assert not np.any(model.flags & (FLAG_NOT_CONVERGED | FLAG_BETA_FIXED))
    assert np.all(model.block_nstars >= PsfModelConfig().min_stars)


@pytest.mark.parametrize("band", BANDS)
def test_fwhm_per_frame_and_block(fitted, band):
    s, model, truth, _ = fitted[band]
    err = model.fwhm_arcsec / truth - 1
    # measured median |error|: J 0.25 %, H 0.31 %, Ks 0.28 % (max 0.7 %)
    assert np.median(np.abs(err)) < 0.02
    # measured block errors: at most 0.6 %
    for a, z in zip(model.block_start, model.block_stop, strict=True):
        assert abs(model.fwhm_arcsec[a:z].mean() / truth[a:z].mean() - 1) < 0.03
    # The truth drifts by 1.5 % through the scan; the model follows it (measured
    # correlation: J 0.83, H 0.92, Ks 0.99).
    assert np.corrcoef(model.fwhm_arcsec, truth)[0, 1] > 0.5
    # The sampled FWHM is the truth table's own quantity.
    assert np.median(np.abs(model.sampled_fwhm_arcsec / s.frames["fwhm_arcsec"] - 1)) < 0.02
    # Widths in pixels agree with the optical FWHM and the scale.
    np.testing.assert_allclose(moffat_fwhm_px(model.alpha_px, model.beta) * model.pixel_scale_arcsec,
                               model.fwhm_arcsec, rtol=1e-12)


@pytest.mark.parametrize("band", BANDS)
def test_encircled_energy_4arcsec(fitted, band):
    """The 4" light fraction, what photometry needs: optical and as the pixels sample it."""
    s, model, truth, scale = fitted[band]
    true_alpha = moffat_alpha(truth / scale, TRUE_BETA)
    ee_true = moffat_encircled_energy(4.0 / scale, true_alpha, TRUE_BETA)
    # measured max |error| over frames: J 0.21 %, H 0.22 %, Ks 0.21 %
    assert np.max(np.abs(model.encircled_energy(4.0) / ee_true - 1)) < 0.005
    # Pixelated 4" aperture on the model's stamp vs the simulator's own pixel fractions
    # (independent 8 x 8 sub-sampling), at several sub-pixel phases.
    h = 12
    off = np.arange(-h, h + 1)
    for f in (0, len(truth) // 2, len(truth) - 1):
        for fx, fy in ((0.0, 0.0), (0.3, -0.2), (-0.5, 0.45)):
            w = aperture_weights(off[None, :] - fx, off[:, None] - fy, 4.0 / scale)
            stamp = psf_stamp(model, f, fx, fy, h)
            ref = pixel_fractions(s.frames["fwhm_arcsec"][f], scale=scale, beta=TRUE_BETA,
                                  phase=(fx, fy), half=h)
            assert abs((w * stamp).sum() / (w * ref).sum() - 1) < 0.005
            # per pixel: the reference's 8 x 8 sub-sampling alone is off by up to 0.35 % of
            # the peak at the true width; measured worst 1.1 % (Ks, centred phase)
            assert np.max(np.abs(stamp - ref)) < 0.02 * ref.max()


@pytest.mark.parametrize("band", BANDS)
def test_fit_quality_numbers(fitted, band):
    _, model, _, _ = fitted[band]
    # The simulator's PSF is exactly the model: residuals are noise. measured ratio 0.84-0.97,
    # chi2 0.74-0.99 (H lowest: its frame noise includes airglow structure that the local
    # background removes).
    assert np.all(model.residual_rms <= 1.1 * model.noise_rms)
    assert np.all(model.residual_rms >= 0.7 * model.noise_rms)
    assert np.all((model.chi2 > 0.6) & (model.chi2 < 1.3))


# -- synthetic scans --------------------------------------------------------------------


def _synthetic_scan(rng, alpha, beta, *, stars_per_frame, empty=(), size=112, sigma=10.0):
    """Frames (n, size, size) float32 of Moffat stars plus Gaussian noise; no mask."""
    n = alpha.size
    frames = np.empty((n, size, size), np.float32)
    for f in range(n):
        k = 0 if f in empty else stars_per_frame
        x = rng.uniform(6, size - 7, k)
        y = rng.uniform(6, size - 7, k)
        flux = 10 ** rng.uniform(3.3, 4.6, k)  # 4" SNR ~ 60-1200 at sigma 10
        img = render_point_sources((size, size), x, y, flux, alpha[f], beta, half_size=12)
        frames[f] = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return frames, np.zeros((size, size), bool), np.full(n, sigma)


def test_seeing_step_followed_within_a_block(rng):
    n, step = 60, 30
    alpha = np.where(np.arange(n) < step, 0.95, 1.25)  # FWHM 1.7" -> 2.3" optical at beta 3
    beta = 3.0  # not beta_init: the index is fitted
    empty = range(48, 60)  # the last block has no stars: it must borrow
    frames, mask, noise = _synthetic_scan(rng, alpha, beta, stars_per_frame=20, empty=empty)
    det = run_frame_detection(frames, mask=mask, noise=noise)
    model = run_psf_model(frames, mask=mask, noise=noise, detections=det)
    assert abs(model.beta[0] - beta) < 0.1
    np.testing.assert_array_equal(model.block_start, [0, 12, 24, 36, 48])
    np.testing.assert_array_equal(model.flags & FLAG_BORROWED, [0, 0, 0, 0, FLAG_BORROWED])
    block_truth = np.array([0.95, 0.95, np.nan, 1.25, 1.25])
    clean = np.isfinite(block_truth)
    np.testing.assert_allclose(model.block_alpha[clean], block_truth[clean], rtol=0.02)
    # The block that holds the step takes the width of most of its stars (the others fail
    # the chi^2 clip): measured 0.951, 50 of its 100 stars kept.
    assert 0.95 * 0.98 < model.block_alpha[2] < 1.25 * 1.02
    # Every frame at least one block from the step is within 2 % of its true width
    # (measured: 0.1 %; beta 3.004).
    far = np.abs(np.arange(n) - step) >= 12
    np.testing.assert_allclose(model.alpha_px[far], alpha[far], rtol=0.02)
    fwhm_true = moffat_fwhm_px(alpha, beta) * 2.0
    np.testing.assert_allclose(model.fwhm_arcsec[far], fwhm_true[far], rtol=0.02)


def test_few_stars_hold_beta_and_no_stars_raise(rng):
    n = 12
    alpha = np.full(n, 1.1)
    frames, mask, noise = _synthetic_scan(rng, alpha, 2.5, stars_per_frame=1, size=64)
    det = run_frame_detection(frames, mask=mask, noise=noise)
    cfg = PsfModelConfig(beta_init=2.5, min_stars=5)
    model = run_psf_model(frames, mask=mask, noise=noise, detections=det, config=cfg)
    assert np.all(model.flags & FLAG_BETA_FIXED)
    assert model.beta[0] == 2.5
    np.testing.assert_allclose(model.block_alpha, 1.1, rtol=0.03)
    flagged = Table(det, copy=True)
    flagged["flags"] = 1
    with pytest.raises(StepError, match="no usable PSF star"):
        run_psf_model(frames, mask=mask, noise=noise, detections=flagged)


def test_input_and_config_errors(rng):
    frames = np.zeros((2, 16, 16), np.float32)
    det = Table({"frame": [0], "x": [8.0], "y": [8.0], "flux": [1.0], "snr": [100.0],
                 "peak": [1.0], "flags": [0]})
    ok = {"mask": np.zeros((16, 16), bool), "noise": np.ones(2), "detections": det}
    with pytest.raises(InputError, match="mask"):
        run_psf_model(frames, **{**ok, "mask": np.zeros((3, 3), bool)})
    with pytest.raises(InputError, match="noise"):
        run_psf_model(frames, **{**ok, "noise": np.array([1.0, -1.0])})
    with pytest.raises(InputError, match="columns"):
        run_psf_model(frames, **{**ok, "detections": Table({"frame": [0]})})
    det2 = Table(det, copy=True)
    det2["frame"] = [5]
    with pytest.raises(InputError, match="frames outside"):
        run_psf_model(frames, **{**ok, "detections": det2})
    for bad in ({"block_frames": 0}, {"beta_min": 0.9}, {"alpha_min_px": 7.0},
                {"stamp_half_size": 1}, {"beta_init": 20.0}, {"min_snr": float("nan")}):
        with pytest.raises(ConfigError):
            PsfModelConfig(**bad)


def test_host_model_matches_renderer_and_its_derivatives(rng):
    """The fit's NumPy pixel integrals equal the stamp renderer's; derivatives equal
    central differences (same fixed quadrature orders)."""
    from gpu2mass.kernels.psf import render_psf_stamps

    from gpu2mass.psfmodel import _moffat_pixels, _pixel_groups

    k, h = 6, 5
    xc, yc = rng.uniform(-0.5, 0.5, k), rng.uniform(-0.5, 0.5, k)
    alpha, beta = rng.uniform(0.8, 2.0, k), 2.7
    geom = _pixel_groups(h, xc, yc)
    p, dx, dy, da, db = _moffat_pixels(geom, k, xc, yc, alpha, beta)
    ref = render_psf_stamps(xc, yc, 1.0, alpha, beta, half_size=h).reshape(k, -1)
    np.testing.assert_allclose(p, ref, rtol=1e-6, atol=1e-9)
    eps = 1e-6
    for name, d, args in (
        ("xc", dx, lambda e: (xc + e, yc, alpha, beta)),
        ("yc", dy, lambda e: (xc, yc + e, alpha, beta)),
        ("alpha", da, lambda e: (xc, yc, alpha + e, beta)),
        ("beta", db, lambda e: (xc, yc, alpha, beta + e)),
    ):
        hi = _moffat_pixels(geom, k, *args(eps), derivs=False)[0]
        lo = _moffat_pixels(geom, k, *args(-eps), derivs=False)[0]
        np.testing.assert_allclose(d, (hi - lo) / (2 * eps), rtol=1e-5, atol=1e-9, err_msg=name)


def test_compiled_pixel_integrals_equal_the_numpy_statement(rng):
    """The compiled loop (:mod:`gpu2mass.kernels.cpu.moffat_pixels`) and the NumPy statement
    of the same sums agree to float64 rounding, for a subset of stars too (``_rows_of``)."""
    from gpu2mass.psfmodel import _moffat_pixels, _moffat_pixels_reference, _pixel_groups, _rows_of

    k, h = 40, 6
    xc0, yc0 = rng.uniform(-0.5, 0.5, k), rng.uniform(-0.5, 0.5, k)
    geom = _pixel_groups(h, xc0, yc0)
    xc, yc = xc0 + rng.normal(0, 0.1, k), yc0 + rng.normal(0, 0.1, k)
    alpha = rng.uniform(0.8, 2.0, k)
    for g in (geom, _rows_of(geom, rng.random(k) < 0.5)):
        for derivs in (True, False):
            got = _moffat_pixels(g, k, xc, yc, alpha, 2.6, derivs)
            want = _moffat_pixels_reference(g, k, xc, yc, alpha, 2.6, derivs)
            assert len(got) == len(want) == (5 if derivs else 1)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
