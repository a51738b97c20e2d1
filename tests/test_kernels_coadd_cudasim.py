"""The CUDA Atlas coadd kernel in Numba's CUDA simulator, against the reference.

Only in the simulator lane: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim``. Tiny inputs.
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

from gpu2mass.kernels.coadd import combine_frames


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


def test_cuda_matches_reference(rng):
    n, shape = 4, (12, 16)
    vals = rng.normal(0.0, 5.0, (n, *shape)).astype(np.float32)
    vals[rng.uniform(size=vals.shape) < 0.2] = np.nan
    vals[:, 0, 0] = np.nan
    vals[2, 6, 7] = 400.0
    vfac = rng.uniform(0.3, 0.6, vals.shape).astype(np.float32)
    offsets = rng.normal(0.0, 1.0, n)
    weights = 1.0 / rng.uniform(4.0, 6.0, n) ** 2
    got = combine_frames(vals, vfac, offsets, weights, target="cuda")
    want = combine_frames(vals, vfac, offsets, weights, target="reference")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(got[3], want[3])
    assert got[3][6, 7] == 1 and got[2][0, 0] == 0
    assert got[3][5:8, 6:9].sum() >= 6  # grown around the hit where frame 2 contributes
