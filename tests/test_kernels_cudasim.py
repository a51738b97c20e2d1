"""The CUDA kernels of the Moffat PSF stamps, run in Numba's CUDA simulator.

Only in the simulator lane: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim`` (the variable must
be set before Numba is imported, so the lane runs in its own process). Inputs are tiny (the
simulator runs every CUDA thread as a Python thread): at most 64 x 64 images and a handful
of stamps of half size <= 4. The results must match the reference and the CPU path.
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

from gpu2mass.kernels import add_stamps, render_point_sources, render_psf_stamps
from gpu2mass.kernels.scalar.elementary import pow_positive
from gpu2mass.kernels.scalar.moffat import moffat_pixel_integral

# The simulator runs the kernels' Python with NumPy float64 (no FMA contraction), so
# against the reference only summation order and pow differ: float32 rounding.
RTOL = 1e-5
ATOL_PER_FLUX = 1e-7


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240613)


def _stamp_inputs(rng, n):
    fx, fy = rng.uniform(-0.5, 0.5, (2, n))
    fx[0], fy[0] = 0.5, -0.5  # the ends of the allowed range
    flux = 10.0 ** rng.uniform(0.0, 4.0, n)
    alpha = np.linspace(0.5, 3.0, n)
    beta = np.linspace(1.5, 5.0, n)
    return fx, fy, flux, alpha, beta


def test_simulator_is_what_runs():
    from numba import config, cuda

    assert config.ENABLE_CUDASIM
    assert type(pow_positive.compile("cuda")).__name__ == "FakeCUDAKernel"
    assert cuda.is_available()  # the simulator's stand-in device


def test_render_stamps_match_reference(rng):
    fx, fy, flux, alpha, beta = _stamp_inputs(rng, 5)
    got = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=3, target="cuda")
    want = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=3, target="reference")
    assert got.dtype == np.float32 and got.shape == (5, 7, 7)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL_PER_FLUX * flux.max())
    assert "cuda" in moffat_pixel_integral.compiled_targets


def test_render_stamps_match_cpu_and_reach_the_far_rule(rng):
    # half_size 4 puts the stamp corners beyond 5 px: all three quadrature orders are used.
    fx, fy, flux, alpha, beta = _stamp_inputs(rng, 3)
    got = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=4, target="cuda")
    want = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=4, target="cpu")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL_PER_FLUX * flux.max())


def test_add_stamps_clip_like_reference(rng):
    s = 5
    # Inside, across each edge and a corner, wholly outside; two overlapping.
    x0 = np.array([3, -2, 28, 10, 10, -4, 40, 12])
    y0 = np.array([4, 8, 9, -3, 18, -4, 5, 5])
    stamps = rng.uniform(0.0, 1.0, (x0.size, s, s)).astype(np.float32)
    base = rng.uniform(0.0, 1.0, (20, 32)).astype(np.float32)
    want = base.copy()
    add_stamps(want, stamps, x0, y0, target="reference")
    got = base.copy()
    add_stamps(got, stamps, x0, y0, target="cuda")
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_render_point_sources_match_reference(rng):
    x = np.array([10.2, 30.5, 55.7, -1.5, 63.4, 20.0])
    y = np.array([12.8, 40.5, 5.1, 30.0, 63.6, -6.0])  # partly outside, one wholly
    flux = 10.0 ** rng.uniform(1.0, 3.0, x.size)
    got = render_point_sources((64, 64), x, y, flux, 1.2, 3.0, half_size=4, target="cuda")
    want = render_point_sources((64, 64), x, y, flux, 1.2, 3.0, half_size=4, target="reference")
    assert got.shape == (64, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL_PER_FLUX * flux.max())


def test_no_sources_on_cuda():
    empty = np.zeros(0)
    stamps = render_psf_stamps(empty, empty, empty, empty, empty, half_size=2, target="cuda")
    assert stamps.shape == (0, 5, 5) and stamps.dtype == np.float32
    image = np.ones((3, 3), np.float32)
    add_stamps(image, stamps, np.zeros(0, np.int64), np.zeros(0, np.int64), target="cuda")
    assert np.all(image == 1.0)
