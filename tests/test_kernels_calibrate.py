"""The fused frame-calibration kernel: CPU driver vs NumPy reference, and on a real GPU.

The GPU tests (``-m gpu``) need a usable device and CuPy; they are skipped with the reason
otherwise (and under the CUDA simulator, which cannot take CuPy arrays).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from gpu2mass.kernels import calibrate_frames
from gpu2mass.kernels.scalar.calibrate import (
    MASK_BAD,
    MASK_NONFINITE,
    MASK_R1_SATURATED,
    MASK_SATURATED,
    calibrated_value,
    pixel_flags,
)

from gpu2mass.backend import gpu_status

# Values are computed in float64 and rounded once to float32 on every path.
RTOL = 1e-6


def make_inputs(rng, n=5, ny=40, nx=48, *, r1_dtype=np.uint16, r2r1_dtype=np.int16):
    """Raw stacks and calibration images hitting every mask bit and edge case."""
    sat = rng.uniform(18000, 20000, (ny, nx)).astype(np.float32)
    r1 = rng.normal(3000, 6, (n, ny, nx))
    r2r1 = rng.normal(1500, 20, (n, ny, nx))
    r2r1[0, 3:6, 3:6] = sat[3:6, 3:6] - r1[0, 3:6, 3:6]  # read 2 exactly at SAT
    r1[2, 10:12, 10:12] = sat[10:12, 10:12]  # R1 saturated, R2R1 = 0
    r2r1[2, 10:12, 10:12] = 0
    r1 = np.rint(r1).astype(r1_dtype)
    r2r1 = np.rint(r2r1)
    # After rounding R1: read 2 within the 5 DN margin (saturated), and 7 DN below SAT.
    r2r1[1, 7, 7] = np.floor(sat[7, 7] - r1[1, 7, 7] - 4.0)
    r2r1[1, 7, 8] = np.floor(sat[7, 8] - r1[1, 7, 8] - 7.0)
    r2r1 = r2r1.astype(r2r1_dtype)
    dark = rng.normal(4, 1, (ny, nx)).astype(np.float32)
    flat = rng.uniform(0.8, 1.2, (ny, nx)).astype(np.float32)
    flat[0, 0] = 0.0
    flat[0, 1] = -0.5
    flat[0, 2] = np.nan
    badpix = np.zeros((ny, nx), np.uint8)
    badpix[rng.random((ny, nx)) < 0.02] = 2
    badpix[1, 1] = 9
    return r1, r2r1, dark, flat, sat, badpix


@pytest.mark.parametrize("read", ["r2r1", "r1"])
@pytest.mark.parametrize("dtypes", [(np.uint16, np.int16), (np.float32, np.float32),
                                    (np.int32, np.float64)])
def test_cpu_matches_reference(rng, read, dtypes):
    r1, r2r1, dark, flat, sat, badpix = make_inputs(rng, r1_dtype=dtypes[0], r2r1_dtype=dtypes[1])
    if dtypes[1] == np.float32:
        r2r1[3, 20, 20] = np.nan
        r2r1[3, 20, 21] = np.inf
    args = (r1, r2r1, dark, flat, sat, badpix)
    got, got_mask = calibrate_frames(*args, read=read, margin=5.0)
    want, want_mask = calibrate_frames(*args, read=read, margin=5.0, target="reference")
    assert got.dtype == np.float32 and got_mask.dtype == np.uint8 and got.shape == r1.shape
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
    # Every bit is exercised.
    for bit in (MASK_BAD, MASK_SATURATED, MASK_R1_SATURATED, MASK_NONFINITE):
        assert np.any(got_mask & bit), bit


def test_mask_semantics(rng):
    r1, r2r1, dark, flat, sat, badpix = make_inputs(rng)
    values, mask = calibrate_frames(r1, r2r1, dark, flat, sat, badpix, margin=5.0)
    assert np.all(mask[0, 3:6, 3:6] & MASK_SATURATED)
    assert mask[1, 7, 7] & MASK_SATURATED and not mask[1, 7, 8] & MASK_SATURATED
    assert np.all(mask[2, 10:12, 10:12] & MASK_R1_SATURATED)
    assert np.all(mask[2, 10:12, 10:12] & MASK_SATURATED)
    assert np.all(mask[:, 0, :3] & MASK_NONFINITE) and np.all(values[:, 0, :3] == 0)
    assert np.all(mask[:, badpix != 0] & MASK_BAD)
    ok = (mask == 0)
    safe = np.where(np.isfinite(flat) & (flat > 0), flat, 1.0)
    expect = (r2r1.astype(np.float64) - dark) / safe
    np.testing.assert_allclose(values[ok], expect[ok], rtol=RTOL)
    r1_values, _ = calibrate_frames(r1, r2r1, dark, flat, sat, badpix, read="r1")
    expect1 = (r1.astype(np.float64) - dark) / safe
    np.testing.assert_allclose(r1_values[ok], expect1[ok], rtol=RTOL)


def test_scalars_run_as_python():
    assert calibrated_value(110, 10.0, 2.0) == 50.0
    assert np.isnan(calibrated_value(110, 10.0, 0.0))
    assert pixel_flags(100, 50, 200.0, 5.0, 0, 1.0) == 0
    assert pixel_flags(100, 95, 200.0, 5.0, 0, 1.0) == MASK_SATURATED
    assert pixel_flags(196, 0, 200.0, 5.0, 4, float("nan")) == 15


def test_input_errors(rng):
    r1, r2r1, dark, flat, sat, badpix = make_inputs(rng)
    with pytest.raises(ValueError, match="one shape"):
        calibrate_frames(r1, r2r1[:2], dark, flat, sat, badpix)
    with pytest.raises(ValueError, match="flat must have the frame shape"):
        calibrate_frames(r1, r2r1, dark, flat[:3], sat, badpix)
    with pytest.raises(ValueError, match="read must be"):
        calibrate_frames(r1, r2r1, dark, flat, sat, badpix, read="r2")
    with pytest.raises(ValueError, match="badpix must be an integer"):
        calibrate_frames(r1, r2r1, dark, flat, sat, badpix.astype(np.float32))
    # A boolean bad-pixel map is accepted and means the same.
    _, m_bool = calibrate_frames(r1, r2r1, dark, flat, sat, badpix != 0)
    _, m_int = calibrate_frames(r1, r2r1, dark, flat, sat, badpix)
    np.testing.assert_array_equal(m_bool, m_int)
    with pytest.raises(ValueError, match="target"):
        calibrate_frames(r1, r2r1, dark, flat, sat, badpix, target="gpu")


_SKIP_GPU = None
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _SKIP_GPU = "NUMBA_ENABLE_CUDASIM=1: the simulator cannot run CuPy arrays"
else:
    _usable, _detail = gpu_status()
    if not _usable:
        _SKIP_GPU = f"no usable GPU: {_detail}"


@pytest.mark.gpu
@pytest.mark.skipif(_SKIP_GPU is not None, reason=_SKIP_GPU or "")
@pytest.mark.parametrize("read", ["r2r1", "r1"])
def test_gpu_matches_cpu(rng, read):
    import cupy as cp

    host = make_inputs(rng, n=40, ny=256, nx=256)
    want, want_mask = calibrate_frames(*host, read=read)
    got, got_mask = calibrate_frames(*(cp.asarray(a) for a in host), read=read)
    assert isinstance(got, cp.ndarray) and got.dtype == cp.float32
    np.testing.assert_array_equal(cp.asnumpy(got_mask), want_mask)
    # Same float64 math on both; only FMA contraction can differ: float32 rounding.
    np.testing.assert_allclose(cp.asnumpy(got), want, rtol=RTOL, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(_SKIP_GPU is not None, reason=_SKIP_GPU or "")
def test_gpu_frames_step_matches_cpu(rng):
    """run_calibrate_frames on CuPy arrays stays on the device and matches the CPU."""
    import cupy as cp

    from gpu2mass.frames import run_calibrate_frames

    r1, r2r1, dark, flat, sat, badpix = make_inputs(rng, n=50, ny=64, nx=64)
    flat = np.where(np.isfinite(flat) & (flat > 0), flat, 1.0).astype(np.float32)

    class Dark:
        def __init__(self, xp):
            self.r1 = xp.full(dark.shape, 3000.0, xp.float32)
            self.r2r1 = xp.asarray(dark)

    cpu = run_calibrate_frames(r1, r2r1, dark=Dark(np), flat=flat, satmap=sat, badpix=badpix)
    gpu = run_calibrate_frames(*(cp.asarray(a) for a in (r1, r2r1)), dark=Dark(cp),
                               flat=cp.asarray(flat), satmap=cp.asarray(sat),
                               badpix=cp.asarray(badpix))
    assert isinstance(gpu.r2r1, cp.ndarray) and isinstance(gpu.sky_r2r1, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(gpu.mask_r2r1), cpu.mask_r2r1)
    for name in ("r2r1", "r1", "illumination_r2r1"):
        np.testing.assert_allclose(cp.asnumpy(getattr(gpu, name)), getattr(cpu, name),
                                   rtol=1e-5, atol=1e-3)
    for name in ("sky_r2r1", "noise_r2r1", "sky_r1", "noise_r1"):
        np.testing.assert_allclose(cp.asnumpy(getattr(gpu, name)), getattr(cpu, name),
                                   rtol=1e-6)
