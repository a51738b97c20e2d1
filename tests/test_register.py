"""Frame position reconstruction (PosFrm) against the simulator's true frame geometry.

Detections here are the true pixel positions of truth stars plus measurement noise, so
these tests isolate the solution from single-frame detection (tested on its own)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.time import Time

from gpu2mass.errors import StepError
from gpu2mass.geometry import frame_geometry_from_truth, tan_project
from gpu2mass.io.rawnight import open_night
from gpu2mass.refcat import ReferenceStars, load_reference_stars
from gpu2mass.register import run_register

MAG = {"J": "j_m", "H": "h_m", "K": "k_m"}


def _setup(tiny_night, band, rng, *, noise_px=0.03):
    import pyarrow.parquet as pq

    night = open_night(tiny_night, check_data=False)
    info = next(s for s in night.scans if s.type == "sci")
    frames = night.load_scan(info.number)[band].frames
    truth = frame_geometry_from_truth(tiny_night, info.number, band)
    src = {k: np.asarray(v) for k, v in pq.read_table(tiny_night / "truth" / "sources.parquet").to_pydict().items()}
    star = (src["kind"] == "star") & (src[MAG[band]] < 14.5) & (src[MAG[band]] > 8.0)
    det = {"frame": [], "x": [], "y": [], "snr": [], "x_err": [], "y_err": []}
    for f in range(info.nframes):
        close = star & (np.abs(src["dec"] - truth.dec[f]) < 0.15)
        x, y = truth.sky_to_pixel(f, src["ra"][close], src["dec"][close])
        ok = (x > 3) & (x < 252) & (y > 3) & (y < 252)
        k = int(ok.sum())
        det["frame"].append(np.full(k, f))
        det["x"].append(x[ok] + rng.normal(0, noise_px, k))
        det["y"].append(y[ok] + rng.normal(0, noise_px, k))
        det["snr"].append(np.full(k, 50.0))
        det["x_err"].append(np.full(k, noise_px))
        det["y_err"].append(np.full(k, noise_px))
    det = {k: np.concatenate(v) for k, v in det.items()}
    epoch = Time(info.start_mjd, format="mjd").jyear
    ra0, dec0 = np.median(frames["RA_CMD"]), frames["DEC_CMD"]
    pad = 0.2
    ref = load_reference_stars(night.reference_catalog, epoch_jyear=epoch,
                               ra_range=(ra0 - pad / np.cos(np.deg2rad(dec0.mean())), ra0 + pad / np.cos(np.deg2rad(dec0.mean()))),
                               dec_range=(dec0.min() - pad, dec0.max() + pad))
    return det, frames, truth, ref


def _errors(reg, truth):
    dxi, deta = tan_project(reg.geometry.ra, reg.geometry.dec, truth.ra, truth.dec)
    return np.column_stack([dxi, deta])


@pytest.mark.parametrize("band", ["J", "K"])
def test_frame_positions_match_truth(tiny_night, band, rng):
    det, frames, truth, ref = _setup(tiny_night, band, rng)
    reg = run_register(det, commanded_ra=frames["RA_CMD"], commanded_dec=frames["DEC_CMD"], reference=ref)
    err = _errors(reg, truth)
    rms = np.sqrt(np.mean(err**2, axis=0))
    assert np.all(rms <= 0.10), rms
    assert np.max(np.abs(err)) <= 0.3
    assert abs(reg.geometry.band.rotation_deg - truth.band.rotation_deg) < 0.01
    assert reg.geometry.band.scale_arcsec == pytest.approx(truth.band.scale_arcsec, rel=2e-4)
    # The solved distortion reproduces the true one to a small fraction of a pixel.
    x, y = np.meshgrid(np.linspace(0, 255, 9), np.linspace(0, 255, 9))
    xi1, eta1 = reg.geometry.band.pixel_to_tangent(x, y)
    xi2, eta2 = truth.band.pixel_to_tangent(x, y)
    assert np.max(np.hypot(xi1 - xi2, eta1 - eta2)) < 0.15  # arcsec, over the whole array
    # Honest formal errors: the actual errors are not many times the stated ones.
    z = err / np.maximum(reg.frame_errors_arcsec, 1e-6)
    assert np.sqrt(np.mean(z**2)) < 3.0


def test_commanded_pointing_off_by_30_arcsec(tiny_night, rng):
    det, frames, truth, ref = _setup(tiny_night, "H", rng)
    dec = frames["DEC_CMD"] + 21.0 / 3600
    ra = frames["RA_CMD"] - 21.0 / 3600 / np.cos(np.deg2rad(dec))  # ~30" off in total
    reg = run_register(det, commanded_ra=ra, commanded_dec=dec, reference=ref)
    err = _errors(reg, truth)
    assert np.all(np.sqrt(np.mean(err**2, axis=0)) <= 0.10)
    assert np.hypot(*reg.coarse_offset_arcsec) > 25


def test_frames_with_few_stars_follow_the_track(tiny_night, rng):
    det, frames, truth, ref = _setup(tiny_night, "K", rng)
    empty = np.isin(det["frame"], [12, 13, 14])
    thin = {k: v[~empty] for k, v in det.items()}
    reg = run_register(thin, commanded_ra=frames["RA_CMD"], commanded_dec=frames["DEC_CMD"], reference=ref)
    err = _errors(reg, truth)
    assert np.max(np.abs(err)) <= 0.5  # the three empty frames: interpolated along the track
    assert np.max(np.abs(np.delete(err, [12, 13, 14], axis=0))) <= 0.3


def test_outlier_detections_are_rejected(tiny_night, rng):
    det, frames, truth, ref = _setup(tiny_night, "J", rng)
    k = rng.choice(det["x"].size, det["x"].size // 20, replace=False)
    det["x"][k] += rng.uniform(-3, 3, k.size)  # 5 % of detections badly placed
    reg = run_register(det, commanded_ra=frames["RA_CMD"], commanded_dec=frames["DEC_CMD"], reference=ref)
    assert np.all(np.sqrt(np.mean(_errors(reg, truth) ** 2, axis=0)) <= 0.10)


def test_no_reference_stars_is_a_clear_error(tiny_night, rng):
    det, frames, _truth, _ref = _setup(tiny_night, "K", rng)
    empty = ReferenceStars(np.array([]), np.array([]), np.array([]), np.array([]), "none")
    with pytest.raises(StepError, match="cannot be tied to the sky"):
        run_register(det, commanded_ra=frames["RA_CMD"], commanded_dec=frames["DEC_CMD"], reference=empty)
