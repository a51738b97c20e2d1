"""The Atlas resampling kernel: CPU (Numba) against the NumPy reference, and its contract.

Inputs hit every branch: bad pixels, output pixels off the frame, boxes clipped by the
grid, a frame that misses the grid, per-frame masks. Both paths compute in float64 and store
float32; they differ by FMA contraction and summation order only: float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu2mass.kernels.resample import resample_frames
from gpu2mass.kernels.scalar.resample import POLY_TERMS

RTOL = 1e-5


def _mapping_inputs(rng, n, ny, nx, shape):
    """n frames (ny, nx) mapped onto an output grid `shape` at 2× finer sampling, rotated."""
    frames = rng.normal(0.0, 10.0, (n, ny, nx)).astype(np.float32)
    frames += 100.0
    coef = np.zeros((n, 2, len(POLY_TERMS)))
    norm = np.zeros((n, 3))
    boxes = np.zeros((n, 4), np.int64)
    h, w = shape
    for k in range(n):
        th = np.deg2rad(rng.uniform(-5, 5))
        q = 1.0 / 32.0
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        # x = (nx-1)/2 + 0.5 (cos th dX - sin th dY) + small curvature, with dX = s / q
        coef[k, 0, 0] = (nx - 1) / 2 + rng.normal(0, 0.3)
        coef[k, 0, 1] = 0.5 * np.cos(th) / q
        coef[k, 0, 2] = -0.5 * np.sin(th) / q
        coef[k, 1, 0] = (ny - 1) / 2 + rng.normal(0, 0.3)
        coef[k, 1, 1] = 0.5 * np.sin(th) / q
        coef[k, 1, 2] = 0.5 * np.cos(th) / q
        coef[k, :, 3:] = rng.normal(0.0, 0.05, (2, len(POLY_TERMS) - 3))
        norm[k] = (x0, y0, q)
        boxes[k] = (int(y0) - ny, int(y0) + ny, int(x0) - nx, int(x0) + nx)
    boxes[-1] = (0, 0, 5, 9)  # a frame that misses the grid
    return frames, coef, norm, np.clip(boxes, 0, None)


@pytest.mark.parametrize("per_frame_mask", [False, True])
def test_cpu_matches_reference(rng, per_frame_mask):
    n, ny, nx, shape = 4, 20, 24, (50, 60)
    frames, coef, norm, boxes = _mapping_inputs(rng, n, ny, nx, shape)
    mshape = (n, ny, nx) if per_frame_mask else (ny, nx)
    mask = rng.uniform(size=mshape) < 0.05
    got, gvar = resample_frames(frames, mask, coef, norm, boxes, shape=shape, target="cpu")
    want, wvar = resample_frames(frames, mask, coef, norm, boxes, shape=shape, target="reference")
    assert got.shape == (n, *shape) and got.dtype == np.float32 and gvar.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6 * np.nanmax(np.abs(want)))
    np.testing.assert_allclose(gvar, wvar, rtol=RTOL, atol=1e-7)
    assert np.all(np.isnan(got[-1]))  # the frame that misses the grid
    assert np.isfinite(got[:-1]).sum() > 1000  # and the others land


def test_flux_is_preserved_for_a_smooth_source(rng):
    # A wide Gaussian on one frame, mapped 2x finer: the output sums to the frame's sum.
    ny = nx = 40
    yy, xx = np.mgrid[:ny, :nx]
    frame = (1e4 * np.exp(-((xx - 19.3) ** 2 + (yy - 20.6) ** 2) / (2 * 3.0**2)))[None]
    frame = frame.astype(np.float32)
    _, coef, norm, boxes = _mapping_inputs(rng, 1, ny, nx, (100, 100))
    coef[0, :, 3:] = 0.0
    norm[0, :2] = (50.0, 50.0)
    boxes[0] = (0, 100, 0, 100)
    out, _ = resample_frames(frame, np.zeros((ny, nx), bool), coef, norm, boxes, shape=(100, 100))
    np.testing.assert_allclose(np.nansum(out), frame.sum(), rtol=1e-4)


def test_masked_pixel_is_never_used(rng):
    n, ny, nx, shape = 2, 20, 24, (50, 60)  # frame 0 lands, frame 1 misses
    frames, coef, norm, boxes = _mapping_inputs(rng, n, ny, nx, shape)
    mask = np.zeros((ny, nx), bool)
    mask[10, 12] = True
    a, _ = resample_frames(frames, mask, coef, norm, boxes, shape=shape)
    frames[0, 10, 12] = 1e30
    b, _ = resample_frames(frames, mask, coef, norm, boxes, shape=shape)
    np.testing.assert_array_equal(a, b)
    c, _ = resample_frames(frames, np.zeros_like(mask), coef, norm, boxes, shape=shape)
    assert np.isfinite(c[0]).sum() > np.isfinite(a[0]).sum() > 0  # coverage dropped there


def test_variance_factor_of_the_bilinear_kernel(rng):
    # Unmasked and unit Jacobian terms aside, J² Σw² lies between J²/4 and J².
    n, ny, nx, shape = 2, 20, 24, (50, 60)
    frames, coef, norm, boxes = _mapping_inputs(rng, n, ny, nx, shape)
    coef[:, :, 3:] = 0.0
    _, var = resample_frames(frames, np.zeros((ny, nx), bool), coef, norm, boxes, shape=shape)
    v = var[np.isfinite(var)] / 0.25**2
    assert v.min() >= 0.25 - 1e-6 and v.max() <= 1.0 + 1e-6


def test_bad_inputs_raise():
    frames = np.zeros((2, 4, 4), np.float32)
    good = {"coef": np.zeros((2, 2, 10)), "norm": np.ones((2, 3)),
            "boxes": np.zeros((2, 4), np.int64)}
    with pytest.raises(ValueError, match="mask"):
        resample_frames(frames, np.zeros((3, 3), bool), *good.values(), shape=(4, 4))
    with pytest.raises(ValueError, match="coef"):
        resample_frames(frames, np.zeros((4, 4), bool), np.zeros((2, 2, 9)), good["norm"],
                        good["boxes"], shape=(4, 4))
    with pytest.raises(ValueError, match="min_weight"):
        resample_frames(frames, np.zeros((4, 4), bool), *good.values(), shape=(4, 4), min_weight=0)
    with pytest.raises(ValueError, match="target"):
        resample_frames(frames, np.zeros((4, 4), bool), *good.values(), shape=(4, 4), target="x")


@pytest.mark.gpu
def test_cuda_with_cupy_matches_cpu(rng):
    """On a real GPU with CuPy arrays (skipped without one, and under the simulator)."""
    import os

    from gpu2mass.backend import gpu_status

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("NUMBA_ENABLE_CUDASIM=1: the simulator cannot run CuPy arrays")
    usable, detail = gpu_status()
    if not usable:
        pytest.skip(f"no usable GPU: {detail}")
    import cupy as cp

    n, ny, nx, shape = 6, 256, 256, (1024, 512)
    frames, coef, norm, boxes = _mapping_inputs(rng, n, ny, nx, shape)
    mask = rng.uniform(size=(ny, nx)) < 0.01
    want, wvar = resample_frames(frames, mask, coef, norm, boxes, shape=shape)
    got, gvar = resample_frames(*(cp.asarray(a) for a in (frames, mask, coef, norm, boxes)),
                                shape=shape)
    assert isinstance(got, cp.ndarray) and got.dtype == cp.float32
    got, gvar = cp.asnumpy(got), cp.asnumpy(gvar)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    # FMA contraction differs (NVVM vs LLVM): float32 rounding.
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6 * np.nanmax(np.abs(want)))
    np.testing.assert_allclose(gvar, wvar, rtol=RTOL, atol=1e-7)


def test_unfilled_output_matches_inside_the_boxes(rng):
    n, ny, nx, shape = 3, 16, 18, (40, 44)
    frames, coef, norm, boxes = _mapping_inputs(rng, n, ny, nx, shape)
    mask = rng.uniform(size=(ny, nx)) < 0.05
    full, fvar = resample_frames(frames, mask, coef, norm, boxes, shape=shape)
    part, pvar = resample_frames(frames, mask, coef, norm, boxes, shape=shape, fill_outside=False)
    for k, (r0, r1, c0, c1) in enumerate(boxes):
        np.testing.assert_array_equal(part[k, r0:r1, c0:c1], full[k, r0:r1, c0:c1])
        np.testing.assert_array_equal(pvar[k, r0:r1, c0:c1], fvar[k, r0:r1, c0:c1])
