"""The aperture kernel on a real GPU with CuPy arrays, against the CPU path.

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
from gpu2mass.kernels.aperture import aperture_photometry

# Same float64 code on both; FMA contraction and libdevice asin/sqrt differ in the last
# bits, amplified near tangencies of circle and pixel: 1e-9 relative.
RTOL = 1e-9


def test_cupy_matches_cpu():
    rng = np.random.default_rng(7)
    n, ny, nx, m = 6, 256, 256, 20000
    frames = rng.normal(1500.0, 20.0, (n, ny, nx)).astype(np.float32)
    mask = (rng.uniform(size=(ny, nx)) < 0.01).astype(np.uint8)
    fi = rng.integers(0, n, m)
    x, y = rng.uniform(-2, nx + 1, (2, m))
    radii = np.arange(3.0, 14.01, 1.0) / 2.0
    cpu = aperture_photometry(frames, mask, fi, x, y, radii, 7.0, 10.0)
    gpu = aperture_photometry(cp.asarray(frames), cp.asarray(mask), cp.asarray(fi),
                              cp.asarray(x), cp.asarray(y), radii, 7.0, 10.0)
    assert isinstance(gpu.flux, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(gpu.flags), cpu.flags)
    np.testing.assert_array_equal(cp.asnumpy(gpu.n_sky), cpu.n_sky)
    np.testing.assert_allclose(cp.asnumpy(gpu.flux), cpu.flux, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(cp.asnumpy(gpu.npix), cpu.npix, rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(cp.asnumpy(gpu.sky), cpu.sky, rtol=1e-12)
