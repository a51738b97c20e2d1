"""The CUDA Atlas resampling kernel, run in Numba's CUDA simulator, against the reference.

Only in the simulator lane: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim`` (set before Numba
is imported). Tiny inputs: the simulator runs every CUDA thread as a Python thread.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.cudasim

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip(
        "needs NUMBA_ENABLE_CUDASIM=1 set before Numba is imported", allow_module_level=True
    )

from gpu2mass.kernels.resample import resample_frames
from gpu2mass.kernels.scalar.resample import POLY_TERMS, resample_pixel

# The simulator runs the kernel's Python in float64 without FMA: float32 rounding apart.
RTOL = 1e-5


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


def _inputs(rng, n=3, ny=10, nx=12, shape=(24, 28)):
    frames = (100.0 + rng.normal(0.0, 10.0, (n, ny, nx))).astype(np.float32)
    coef = np.zeros((n, 2, len(POLY_TERMS)))
    norm = np.zeros((n, 3))
    for k in range(n):
        th = np.deg2rad(rng.uniform(-5, 5))
        q = 1.0 / 16.0
        coef[k, 0, :3] = ((nx - 1) / 2, 0.5 * np.cos(th) / q, -0.5 * np.sin(th) / q)
        coef[k, 1, :3] = ((ny - 1) / 2, 0.5 * np.sin(th) / q, 0.5 * np.cos(th) / q)
        coef[k, :, 3:] = rng.normal(0.0, 0.03, (2, len(POLY_TERMS) - 3))
        norm[k] = (rng.uniform(8, 20), rng.uniform(8, 16), q)
    boxes = np.array([[0, shape[0], 0, shape[1]], [3, 20, 2, 25], [0, 0, 0, 0]], np.int64)[:n]
    mask = rng.uniform(size=(ny, nx)) < 0.08
    return frames, mask, coef, norm, boxes, shape


def test_simulator_is_what_runs():
    from numba import config

    assert config.ENABLE_CUDASIM
    assert type(resample_pixel.compile("cuda")).__name__ == "FakeCUDAKernel"


def test_cuda_matches_reference(rng):
    frames, mask, coef, norm, boxes, shape = _inputs(rng)
    got, gvar = resample_frames(frames, mask, coef, norm, boxes, shape=shape, target="cuda")
    want, wvar = resample_frames(frames, mask, coef, norm, boxes, shape=shape, target="reference")
    assert got.shape == (3, *shape) and got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isfinite(got).sum() > 200
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6 * np.nanmax(np.abs(want)))
    np.testing.assert_allclose(gvar, wvar, rtol=RTOL, atol=1e-7)


def test_cuda_matches_cpu_with_per_frame_masks(rng):
    frames, _, coef, norm, boxes, shape = _inputs(rng, n=2)
    mask = rng.uniform(size=frames.shape) < 0.1
    got, _ = resample_frames(frames, mask, coef, norm, boxes, shape=shape, target="cuda")
    want, _ = resample_frames(frames, mask, coef, norm, boxes, shape=shape, target="cpu")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6 * np.nanmax(np.abs(want)))
