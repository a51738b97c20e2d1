"""The CUDA aperture kernel, run in Numba's CUDA simulator, against the reference and CPU.

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

from gpu2mass.kernels.aperture import aperture_photometry
from gpu2mass.kernels.scalar.aperture import MASK_SATURATED, measure_position

# The simulator runs the scalar Python in float64 without fused multiply-adds; the
# reference uses photutils' overlaps: 1e-9 relative in the areas, so in the sums.
RTOL = 1e-8
RADII = np.array([1.5, 2.0, 3.0, 5.0])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


def _inputs(rng, n=2, ny=24, nx=28, m=10):
    frames = rng.normal(20.0, 3.0, (n, ny, nx)).astype(np.float32)
    mask = (rng.uniform(size=(n, ny, nx)) < 0.04).astype(np.uint8)
    mask[0, 12, 13] = 1 | MASK_SATURATED
    frames[1, 3, 3] = np.nan
    fi = rng.integers(0, n, m)
    x = rng.uniform(-1, nx, m)
    y = rng.uniform(-1, ny, m)
    x[0], y[0] = 13.2, 12.4  # saturated pixel at the centre
    x[1] = np.nan
    return frames, mask, fi, x, y


def test_simulator_is_what_runs():
    from numba import config

    assert config.ENABLE_CUDASIM
    assert type(measure_position.compile("cuda")).__name__ == "FakeCUDAKernel"


def test_cuda_matches_reference_and_cpu(rng):
    frames, mask, fi, x, y = _inputs(rng)
    got = aperture_photometry(frames, mask, fi, x, y, RADII, 5.0, 8.0, min_sky=40, target="cuda")
    want = aperture_photometry(frames, mask, fi, x, y, RADII, 5.0, 8.0, min_sky=40,
                               target="reference")
    cpu = aperture_photometry(frames, mask, fi, x, y, RADII, 5.0, 8.0, min_sky=40, target="cpu")
    assert got.flux.shape == (10, RADII.size) and got.flags.dtype == np.int32
    assert np.isfinite(got.flux).sum() > 20 and np.any(got.flags)
    for ref in (want, cpu):
        np.testing.assert_array_equal(got.flags, ref.flags)
        np.testing.assert_array_equal(got.n_sky, ref.n_sky)
        np.testing.assert_array_equal(np.isnan(got.flux), np.isnan(ref.flux))
        np.testing.assert_allclose(got.flux, ref.flux, rtol=RTOL, atol=1e-7)
        np.testing.assert_allclose(got.npix, ref.npix, rtol=RTOL, atol=1e-9)
        np.testing.assert_allclose(got.sky, ref.sky, rtol=1e-12)
        np.testing.assert_allclose(got.sky_sigma, ref.sky_sigma, rtol=1e-12)


def test_cuda_shared_mask(rng):
    frames, mask, fi, x, y = _inputs(rng, m=6)
    got = aperture_photometry(frames, mask[0], fi, x, y, RADII, 5.0, 8.0, target="cuda")
    want = aperture_photometry(frames, mask[0], fi, x, y, RADII, 5.0, 8.0, target="cpu")
    np.testing.assert_array_equal(got.flags, want.flags)
    np.testing.assert_allclose(got.flux, want.flux, rtol=RTOL, atol=1e-7)
