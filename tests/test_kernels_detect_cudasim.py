"""The CUDA detection kernels, run in Numba's CUDA simulator, against the CPU path.

Only in the simulator lane: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim`` (the variable must
be set before Numba is imported). Inputs are tiny (every CUDA thread runs as a Python
thread): at most 64 x 64 frames and a few dozen candidates.
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

from gpu2mass.kernels import find_peaks, measure_sources
from gpu2mass.kernels.scalar.detect import is_local_peak
from test_kernels_detect import make_frames, make_params


@pytest.fixture
def frames(rng):
    return make_frames(rng, n=2, ny=32, nx=48, nsrc=8)


def test_simulator_is_what_runs():
    from numba import config

    assert config.ENABLE_CUDASIM
    assert type(is_local_peak.compile("cuda")).__name__ == "FakeCUDAKernel"


def test_peaks_match_cpu(frames):
    data, mask = frames
    thr = np.array([20.0, 25.0])
    got = find_peaks(data, mask, thr, target="cuda")
    np.testing.assert_array_equal(got, find_peaks(data, mask, thr))
    assert got.sum() > 0


def test_measure_matches_cpu(frames):
    data, mask = frames
    peaks = find_peaks(data, mask, np.array([20.0, 20.0]))
    f, y, x = np.nonzero(peaks)
    # Three sources: each is a full Gauss-Newton fit, slow in the simulator's Python threads.
    f, y, x = f[:3], y[:3], x[:3]
    kw = {"noise": np.array([5.0, 5.2]), "alpha": 1.1, "beta": 2.5, "params": make_params(saturation=800)}
    v, fl = measure_sources(data, mask, peaks, f, y, x, target="cuda", **kw)
    cv, cfl = measure_sources(data, mask, peaks, f, y, x, **kw)
    np.testing.assert_array_equal(fl, cfl)
    # The simulator runs the same float64 math as Python (no FMA): rounding-level agreement.
    np.testing.assert_allclose(v, cv, rtol=1e-9, atol=1e-9)
