"""The Moffat PSF stamp kernels on a real GPU with CuPy arrays, against the CPU path.

Skipped, with the reason, when no GPU is usable (``gpu2mass.backend.gpu_status``) or when
the CUDA simulator is switched on (it cannot take CuPy arrays). Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpu2mass.backend import gpu_status

pytestmark = pytest.mark.gpu

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip(
        "NUMBA_ENABLE_CUDASIM=1: the simulator cannot run CuPy arrays", allow_module_level=True
    )
_USABLE, _DETAIL = gpu_status()
if not _USABLE:
    pytest.skip(f"no usable GPU: {_DETAIL}", allow_module_level=True)

import cupy as cp
from gpu2mass.kernels import add_stamps, render_point_sources, render_psf_stamps

# GPU and CPU compute the same float64 math (FMA contraction and libdevice aside) and round
# once to float32: stamps agree to float32 rounding.
STAMP_RTOL = 1e-5
STAMP_ATOL_PER_FLUX = 1e-7
# Images also differ by the order of float32 atomic additions where stamps overlap: with
# ~15 overlapping stamps per pixel, a few float32 ulps of the pixel value.
IMAGE_RTOL = 1e-5


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240612)


def _sources(rng, n, *, lo=0.0, hi=256.0):
    x, y = rng.uniform(lo, hi, (2, n))
    flux = 10.0 ** rng.uniform(1.0, 5.0, n)
    alpha = rng.uniform(0.5, 3.0, n)
    beta = rng.uniform(2.0, 5.0, n)
    return x, y, flux, alpha, beta


def test_render_stamps_cupy_matches_cpu(rng):
    n, h = 2000, 10
    _, _, flux, alpha, beta = _sources(rng, n)
    fx, fy = rng.uniform(-0.5, 0.5, (2, n))
    cpu = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=h)
    gpu = render_psf_stamps(*(cp.asarray(a) for a in (fx, fy, flux, alpha, beta)), half_size=h)
    assert isinstance(gpu, cp.ndarray) and gpu.dtype == cp.float32 and gpu.shape == cpu.shape
    np.testing.assert_allclose(
        cp.asnumpy(gpu), cpu, rtol=STAMP_RTOL, atol=STAMP_ATOL_PER_FLUX * flux.max()
    )


def test_render_point_sources_cupy_matches_cpu(rng):
    n, h, shape = 2000, 10, (256, 256)
    x, y, flux, alpha, beta = _sources(rng, n, lo=-15.0, hi=270.0)  # some across the edges
    cpu = render_point_sources(shape, x, y, flux, alpha, beta, half_size=h)
    gpu = render_point_sources(
        shape, *(cp.asarray(a) for a in (x, y, flux, alpha, beta)), half_size=h
    )
    assert isinstance(gpu, cp.ndarray) and gpu.dtype == cp.float32
    np.testing.assert_allclose(
        cp.asnumpy(gpu), cpu, rtol=IMAGE_RTOL, atol=STAMP_ATOL_PER_FLUX * flux.max()
    )
    assert float(gpu.sum()) == pytest.approx(float(cpu.sum(dtype=np.float64)), rel=1e-5)


def test_add_stamps_cupy_clips_like_cpu(rng):
    n, s = 300, 7
    stamps = rng.uniform(0.0, 1.0, (n, s, s)).astype(np.float32)
    x0 = rng.integers(-12, 70, n)
    y0 = rng.integers(-12, 50, n)
    cpu = np.zeros((40, 64), np.float32)
    add_stamps(cpu, stamps, x0, y0)
    gpu = cp.zeros((40, 64), cp.float32)
    add_stamps(gpu, cp.asarray(stamps), cp.asarray(x0), cp.asarray(y0))
    np.testing.assert_allclose(cp.asnumpy(gpu), cpu, rtol=1e-6, atol=1e-6)


def test_empty_and_mixed_inputs():
    empty = cp.zeros(0)
    stamps = render_psf_stamps(empty, empty, empty, empty, empty, half_size=2)
    assert isinstance(stamps, cp.ndarray) and stamps.shape == (0, 5, 5)
    with pytest.raises(TypeError, match="different devices"):
        render_psf_stamps(cp.zeros(1), np.zeros(1), 1.0, 1.0, 3.0, half_size=1)
    with pytest.raises(TypeError, match="never copy device arrays to the host"):
        render_psf_stamps(cp.zeros(1), cp.zeros(1), 1.0, 1.0, 3.0, half_size=1, target="cpu")
