"""The Atlas coadd kernel: CPU (Numba) against the NumPy reference, and its rejection rule.

Inputs hit every branch: pixels no frame reaches, pixels with one contribution (no test),
cosmic-ray-like spikes in one frame, bright sources that differ between frames.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu2mass.kernels.coadd import combine_frames

RTOL = 1e-5


def _stack(rng, n=6, shape=(40, 50), sigma=10.0, coverage=0.8):
    """n noise frames (σ per value) with NaN holes, their variance factors and weights."""
    noise = rng.uniform(0.8, 1.2, n) * sigma
    vfac = rng.uniform(0.3, 0.6, (n, *shape)).astype(np.float32)
    vals = (rng.normal(0.0, 1.0, (n, *shape)) * noise[:, None, None] * np.sqrt(vfac))
    vals = vals.astype(np.float32)
    vals[rng.uniform(size=vals.shape) > coverage] = np.nan
    vals[:, :3, :4] = np.nan  # nothing reaches here
    vals[1:, 5, 5] = np.nan  # one contribution only
    offsets = rng.normal(0.0, 2.0, n)
    vals += offsets[:, None, None].astype(np.float32)
    return vals, vfac, offsets, 1.0 / noise**2


@pytest.mark.parametrize("reject_sigma", [0.0, 5.0])
def test_cpu_matches_reference(rng, reject_sigma):
    vals, vfac, offsets, weights = _stack(rng)
    vals[2, 10:14, 20:23] += 500.0  # a spike: rejected when rejection is on
    got = combine_frames(vals, vfac, offsets, weights, reject_sigma=reject_sigma, target="cpu")
    want = combine_frames(vals, vfac, offsets, weights, reject_sigma=reject_sigma,
                          target="reference")
    for grow in (0, 2):
        g = combine_frames(vals, vfac, offsets, weights, reject_sigma=reject_sigma, grow=grow)
        r = combine_frames(vals, vfac, offsets, weights, reject_sigma=reject_sigma, grow=grow,
                           target="reference")
        np.testing.assert_allclose(g[0], r[0], rtol=RTOL, atol=1e-5)
        np.testing.assert_array_equal(g[3], r[3])
    assert got[0].dtype == np.float32 and got[2].dtype == np.int32 and got[3].dtype == np.uint8
    np.testing.assert_array_equal(np.isnan(got[0]), np.isnan(want[0]))
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(got[3], want[3])
    assert np.all(np.isnan(got[0][:3, :4])) and np.all(got[2][:3, :4] == 0)
    assert got[2][5, 5] == 1 and got[3][5, 5] == 0
    spiked = np.isfinite(vals[2, 10:14, 20:23]) & (np.isfinite(vals[:, 10:14, 20:23]).sum(0) >= 2)
    assert spiked.sum() >= 6
    assert bool(got[3][10:14, 20:23][spiked].all()) == (reject_sigma > 0)


def test_without_rejection_it_is_the_weighted_mean_and_its_noise(rng):
    vals, vfac, offsets, weights = _stack(rng)
    data, sigma, count, rej = combine_frames(vals, vfac, offsets, weights, reject_sigma=0.0)
    ok = np.isfinite(vals)
    w = np.where(ok, weights[:, None, None], 0.0)
    x = np.where(ok, vals - offsets[:, None, None], 0.0)
    with np.errstate(invalid="ignore"):
        mean = (w * x).sum(0) / w.sum(0)
        sig = np.sqrt((w**2 / weights[:, None, None] * np.where(ok, vfac, 0.0)).sum(0)) / w.sum(0)
    np.testing.assert_allclose(data, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma, sig, rtol=1e-5)
    np.testing.assert_array_equal(count, ok.sum(0))
    assert not rej.any()


def test_spikes_are_rejected_and_noise_is_not(rng):
    """Truth: 400 single-frame spikes of 6-100 σ on pure noise, 6 frames."""
    vals, vfac, offsets, weights = _stack(rng, shape=(200, 200), coverage=1.0)
    vals[:, :3, :4] = 0.0
    vals[1:, 5, 5] = 0.0
    clean = vals.copy()
    sig_frame = np.sqrt(vfac / weights[:, None, None])  # noise of each contribution
    k = rng.integers(0, 6, 400)
    idx = rng.choice(200 * 200, 400, replace=False)
    r, c = np.unravel_index(idx, (200, 200))
    amp = rng.uniform(6.0, 100.0, 400) * np.sqrt(1 + 1 / 5)
    vals[k, r, c] += (amp * sig_frame[k, r, c]).astype(np.float32)
    data, _, _, rej = combine_frames(vals, vfac, offsets, weights, grow=0)
    ref, ref_sigma, *_ = combine_frames(clean, vfac, offsets, weights, reject_sigma=0.0)
    # Every spike above 6σ of (contribution vs the others' mean) is rejected, and the image
    # at those pixels is the mean of the others: within the noise of the clean mean.
    assert rej[r, c].mean() >= 0.97
    z = (data[r, c] - ref[r, c]) / ref_sigma[r, c]
    assert np.all(np.abs(z) < 5)
    # On pure noise the rule hardly ever fires (5σ: a few 1e-6 per pixel per frame).
    spare = np.ones((200, 200), bool)
    spare[r, c] = False
    assert rej[spare].mean() < 1e-4


def test_outliers_are_left_out_around_where_they_were_found(rng):
    """A one-pixel hit in a frame, spread over 3×3 output pixels by the kernel (centre 1,
    edges 1/3, corners 1/9 of its amplitude): the centre fails the test, the faint edges
    alone would not; with grow = 1 the whole footprint leaves that frame out."""
    vals, vfac, offsets, weights = _stack(rng, shape=(20, 20), coverage=1.0)
    vals[:, :3, :4] = 0.0
    vals[1:, 5, 5] = 0.0
    sig = float(np.sqrt(vfac[3, 10, 10] / weights[3]))
    spread = np.outer([1 / 3, 1, 1 / 3], [1 / 3, 1, 1 / 3])
    vals[3, 9:12, 9:12] += (12.0 * sig * spread).astype(np.float32)
    _, _, _, drop0 = combine_frames(vals, vfac, offsets, weights, grow=0)
    _, _, count1, drop1 = combine_frames(vals, vfac, offsets, weights, grow=1)
    assert drop0[10, 10] == 1 and drop0[9:12, 9:12].sum() < 9
    assert np.all(drop1[9:12, 9:12] == 1) and np.all(count1[9:12, 9:12] == 5)
    # Only around the hit.
    assert drop1.sum() == 9 and drop1[8:13, 8:13].sum() == 9


def test_bright_sources_that_vary_between_frames_are_kept(rng):
    """A source whose value differs by ±40 % between frames (sub-pixel phase, seeing) keeps
    every contribution: the fractional term of the threshold protects it."""
    vals, vfac, offsets, weights = _stack(rng, shape=(30, 30), coverage=1.0)
    level = rng.uniform(50, 5000, (30, 30))
    vals[:, :3, :4] = 0.0
    vals[1:, 5, 5] = 0.0
    scale = rng.uniform(0.6, 1.4, (6, 30, 30))
    vals += (level * scale).astype(np.float32)
    _, _, count, rej = combine_frames(vals, vfac, offsets, weights)
    assert not rej.any() and np.all(count == 6)


def test_bad_inputs(rng):
    vals, vfac, offsets, weights = _stack(rng, n=3, shape=(8, 8))
    with pytest.raises(ValueError, match="one shape"):
        combine_frames(vals, vfac[:2], offsets, weights)
    with pytest.raises(ValueError, match="weights"):
        combine_frames(vals, vfac, offsets, -weights)
    with pytest.raises(ValueError, match="offsets"):
        combine_frames(vals, vfac, offsets[:2], weights)
    with pytest.raises(ValueError, match="min_frames"):
        combine_frames(vals, vfac, offsets, weights, min_frames=1)
    with pytest.raises(ValueError, match="grow"):
        combine_frames(vals, vfac, offsets, weights, grow=-1)


def test_values_outside_the_boxes_are_never_read(rng):
    """With boxes, what lies outside a frame's box (left unwritten by the resampling when
    ``fill_outside=False``) does not matter: CPU and reference alike."""
    vals, vfac, offsets, weights = _stack(rng, shape=(30, 40), coverage=1.0)
    boxes = np.array([[0, 30, 0, 40], [5, 25, 0, 20], [0, 10, 10, 40], [12, 30, 3, 37],
                      [0, 0, 0, 0], [0, 30, 20, 40]], np.int64)
    clean = vals.copy()
    rr, cc = np.mgrid[0:30, 0:40]
    for k, b in enumerate(boxes):
        outside = ~((rr >= b[0]) & (rr < b[1]) & (cc >= b[2]) & (cc < b[3]))
        clean[k][outside] = np.nan
        vals[k][outside] = rng.choice([1e30, -1e30, 7.0], outside.sum())  # garbage
    for target in ("cpu", "reference"):
        got = combine_frames(vals, vfac, offsets, weights, boxes, target=target)
        want = combine_frames(clean, vfac, offsets, weights, target="reference")
        np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=1e-5)
        np.testing.assert_array_equal(got[2], want[2])
