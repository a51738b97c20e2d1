"""The CUDA kernel of the fused frame calibration, run in Numba's CUDA simulator.

Only in the simulator lane: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim`` (the variable
must be set before Numba is imported). Arrays are at most 64 x 64 pixels and a few frames
(the simulator runs every CUDA thread as a Python thread). The results must match the
NumPy reference and the CPU driver.
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

from gpu2mass.kernels import calibrate_frames
from gpu2mass.kernels.scalar.calibrate import (
    MASK_BAD,
    MASK_NONFINITE,
    MASK_R1_SATURATED,
    MASK_SATURATED,
    calibrated_value,
)

RTOL = 1e-6


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


def _inputs(rng, n=2, ny=24, nx=32):
    sat = rng.uniform(18000, 20000, (ny, nx)).astype(np.float32)
    r1 = np.rint(rng.normal(3000, 6, (n, ny, nx))).astype(np.uint16)
    r2r1 = rng.normal(1500, 20, (n, ny, nx)).astype(np.float32)
    r2r1[0, 2:4, 2:4] = sat[2:4, 2:4] - r1[0, 2:4, 2:4]
    r1[-1, 5, 5] = np.uint16(sat[5, 5] + 1)
    r2r1[-1, 5, 5] = 0
    r2r1[-1, 9, 9] = np.nan
    dark = rng.normal(4, 1, (ny, nx)).astype(np.float32)
    flat = rng.uniform(0.8, 1.2, (ny, nx)).astype(np.float32)
    flat[0, 0] = 0.0
    badpix = np.zeros((ny, nx), np.uint8)
    badpix[3, 7] = 2
    return r1, r2r1, dark, flat, sat, badpix


def test_simulator_is_what_runs():
    from numba import config, cuda

    assert config.ENABLE_CUDASIM
    assert type(calibrated_value.compile("cuda")).__name__ == "FakeCUDAKernel"
    assert cuda.is_available()


@pytest.mark.parametrize("read", ["r2r1", "r1"])
def test_cuda_kernel_matches_reference_and_cpu(rng, read):
    args = _inputs(rng)
    got, got_mask = calibrate_frames(*args, read=read, target="cuda")
    want, want_mask = calibrate_frames(*args, read=read, target="reference")
    cpu, cpu_mask = calibrate_frames(*args, read=read, target="cpu")
    assert got.dtype == np.float32 and got_mask.dtype == np.uint8 and got.shape == (2, 24, 32)
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_array_equal(got_mask, cpu_mask)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
    np.testing.assert_allclose(got, cpu, rtol=RTOL, atol=0)
    for bit in (MASK_BAD, MASK_SATURATED, MASK_R1_SATURATED, MASK_NONFINITE):
        assert np.any(got_mask & bit), bit
    assert "cuda" in calibrated_value.compiled_targets


def test_cuda_kernel_largest_simulated_frame(rng):
    args = _inputs(rng, n=1, ny=64, nx=64)
    got, got_mask = calibrate_frames(*args, target="cuda")
    want, want_mask = calibrate_frames(*args, target="reference")
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
