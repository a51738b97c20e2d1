"""Nightly darks (gpu2mass.darks) against simulated truth.

Two sources of truth: the tiny night's dark scan read through the raw-night reader (its
frames differ only by noise, whose model is in the manifest: sqrt(dark/g + (RN/g)²)), and
dark scans simulated here with the simulator's camera, whose true pedestal and dark maps
(:func:`gpu2mass.sim.camera.make_calibration_library`) the combined darks are held to.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu2mass.darks import DEFECT_HOT, DEFECT_NOISY, BandDark, DarkConfig, Darks, run_darks
from gpu2mass.errors import ConfigError, InputError
from gpu2mass.io.rawnight import open_night


@pytest.fixture(scope="module")
def night(tiny_night):
    return open_night(tiny_night)


@pytest.fixture(scope="module")
def tiny_darks(night):
    return run_darks(night.iter_scans(("dark",)))


def test_tiny_night_darks_shapes_and_levels(night, tiny_darks):
    assert tiny_darks.nscans == 1 and tiny_darks.source == "scans"
    assert set(tiny_darks.bands) == set(night.instrument.bands)
    for band in night.instrument.bands:
        d = tiny_darks[band]
        assert isinstance(d, BandDark) and d.nframes == 8
        for a in (d.r1, d.r2r1, d.noise_r1, d.noise_r2r1, d.error_r1, d.error_r2r1):
            assert a.shape == (256, 256) and a.dtype == np.float32 and np.all(np.isfinite(a))
        assert d.defects.dtype == np.uint8
        good = night.calib_image("badpix", band) == 0
        # The simulator's pedestal is 3000 DN, its median R2-R1 dark 4 DN (camera.py).
        assert abs(np.median(d.r1[good]) / 3000.0 - 1) < 0.01
        assert abs(np.median(d.r2r1[good]) - 4.0) < 0.5


def test_tiny_night_noise_map_matches_noise_model(night, tiny_darks):
    """Per-frame noise map vs sqrt(dark/g + (RN/g)²); error map = noise/sqrt(n)."""
    inst = night.instrument
    for band in inst.bands:
        d = tiny_darks[band]
        g, rn = inst.gain_e_per_dn[band], inst.read_noise_e[band]
        good = night.calib_image("badpix", band) == 0
        model21 = np.sqrt(np.maximum(d.r2r1[good], 0) / g + (rn / g) ** 2)
        # R1 dark signal: t_R1 / t_R2R1 of the R2-R1 one (the pedestal is not signal).
        model1 = np.sqrt(np.maximum(d.r2r1[good] * 0.051 / 1.25, 0) / g + (rn / g) ** 2)
        # rms over ~65,000 pixels of 8-frame estimates: measured within 0.4 % of the model.
        for noise, model in ((d.noise_r2r1[good], model21), (d.noise_r1[good], model1)):
            ratio = np.sqrt(np.mean(noise.astype(np.float64) ** 2) / np.mean(model**2))
            assert abs(ratio - 1) < 0.03, (band, ratio)
        # error = noise / sqrt(kept), never fewer than half kept; all 8 kept in ~98 % of
        # pixels (a 3σ clip rejects 0.27 % of Gaussian values: 2.1 % of 8-frame pixels).
        k = (d.noise_r2r1 / np.maximum(d.error_r2r1, 1e-12)) ** 2
        assert np.all((k > 3.99) & (k < 8.01)) and np.mean(np.abs(k - 8) < 0.01) > 0.97


def test_tiny_night_hot_and_noisy_pixels_found(night, tiny_darks):
    for band in night.instrument.bands:
        d = tiny_darks[band]
        bad = night.calib_image("badpix", band)
        hot = (d.defects & DEFECT_HOT) != 0
        noisy = (d.defects & DEFECT_NOISY) != 0
        assert hot[(bad & 2) != 0].all()  # every hot pixel (50-2000 DN) found
        assert not hot[bad == 0].any()  # and no good pixel called hot
        assert noisy[(bad & 4) != 0].mean() > 0.8  # 4-10x noise; measured 85-93 %
        assert noisy[bad == 0].mean() < 1e-3


@pytest.fixture(scope="module")
def simulated():
    """Two dark scans of 10 frames (K) from the simulator, with the true maps."""
    from gpu2mass.sim.camera import default_camera, make_calibration_library
    from gpu2mass.sim.night import SITES
    from gpu2mass.sim.observing import Atmosphere
    from gpu2mass.sim.plan import ScanPlan
    from gpu2mass.sim.scan import Pointing, simulate_scan

    rng = np.random.default_rng(5)
    cam = default_camera(("K",))
    lib = make_calibration_library(cam, rng)
    t0 = 51619.1
    atm = Atmosphere(cam.detectors, rng, t0_mjd=t0, pixel_scale=cam.pixel_scale_arcsec,
                     psf_beta=cam.psf_beta)
    scans = []
    for i in range(2):
        sim = simulate_scan(ScanPlan(number=i + 1, type="dark", nframes=10, start_mjd=t0 + 0.01 * i),
                            camera=cam, calib=lib, atm=atm, site=SITES["n"],
                            pointing=Pointing(rng, t0), sky=None, rng=rng)
        # As the raw files store them: R1 uint16, R2R1 int16 (rounded DN).
        scans.append({"K": (np.rint(sim.r1["K"]).astype(np.uint16),
                            np.rint(sim.r2r1["K"]).astype(np.int16))})
    return cam, lib, scans


def test_darks_match_true_maps_within_their_error(simulated):
    cam, lib, scans = simulated
    d = run_darks(iter(scans))["K"]  # a generator is fine: scans are streamed
    assert d.nframes == 20
    good = lib.badpix["K"] == 0
    truths = {"r1": lib.pedestal["K"] + lib.dark_r1["K"], "r2r1": lib.dark_r2r1["K"]}
    for read, truth in truths.items():
        resid = (getattr(d, read) - truth)[good]
        err = getattr(d, f"error_{read}")[good]
        expected = np.sqrt(np.mean(err.astype(np.float64) ** 2))
        # The dark's error is noise/sqrt(n): measured 1.302 vs 1.295 DN (R1), 1.318 vs
        # 1.305 DN (R2-R1); the mean residual is 0 to < 0.01 DN (rounding adds 1/12 DN²).
        assert abs(resid.std() / expected - 1) < 0.05, (read, resid.std(), expected)
        assert abs(resid.mean()) < 0.05
        rn = cam.detectors["K"].read_noise_e / cam.detectors["K"].gain_e_per_dn
        assert abs(expected / (rn / np.sqrt(20)) - 1) < 0.1
    hot = (lib.badpix["K"] & 2) != 0
    assert ((d.defects & DEFECT_HOT) != 0)[hot].all()
    np.testing.assert_allclose(d.r2r1[hot], lib.dark_r2r1["K"][hot], rtol=0.05)


def test_cosmic_rays_are_clipped(simulated):
    _, lib, scans = simulated
    r1, r2r1 = (a.copy() for a in scans[0]["K"])
    r2r1[3, 100:103, 50:53] += 3000  # a cosmic ray hit in one frame
    d = run_darks([{"K": (r1, r2r1)}, scans[1]])["K"]
    resid = d.r2r1[100:103, 50:53] - lib.dark_r2r1["K"][100:103, 50:53]
    assert np.all(np.abs(resid) < 6 * d.error_r2r1[100:103, 50:53])


def test_no_dark_scan_is_an_input_error_unless_a_library_is_given(simulated):
    with pytest.raises(InputError, match="no dark scan .* no dark library"):
        run_darks([])
    library = run_darks(simulated[2])
    assert run_darks(iter(()), library=library) is library
    assert isinstance(library, Darks)


def test_input_errors(simulated):
    scans = simulated[2]
    r1, r2r1 = scans[0]["K"]
    with pytest.raises(InputError, match="fewer than darks.min_frames"):
        run_darks([{"K": (r1[:3], r2r1[:3])}])
    with pytest.raises(InputError, match="one shape"):
        run_darks([{"K": (r1, r2r1[:5])}])
    with pytest.raises(InputError, match="bands"):
        run_darks([scans[0], {"J": scans[1]["K"]}])
    with pytest.raises(InputError, match="frame shape"):
        run_darks([scans[0], {"K": (r1[:, :128], r2r1[:, :128])}])
    with pytest.raises(InputError, match="expected a pair"):
        run_darks([{"K": r1}])
    with pytest.raises(InputError, match="no band"):
        run_darks(scans)["J"]
    for bad in ({"clip_sigma": 0.0}, {"min_frames": 1}, {"hot_sigma": -1.0},
                {"noisy_factor": 1.0}):
        with pytest.raises(ConfigError):
            DarkConfig(**bad)
