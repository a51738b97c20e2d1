"""The CUDA PSF-fit kernel, run in Numba's CUDA simulator, against the CPU and the reference.

Only in the simulator lane: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim`` (set before Numba
is imported). Tiny inputs: the simulator runs every thread of a block (64) as a Python
thread, so a handful of groups of 2 frames of 9 x 9 pixels.
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

from gpu2mass.kernels.psffit import PARITY_ATOL_POS, PARITY_RTOL, fit_psf_groups
from gpu2mass.kernels.scalar.psffit import STATUS_NO_DATA, accumulate_group

from gpu2mass.sim.psfgroups import make_psf_groups


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)


def _inputs(rng):
    # Small stamps: the simulator runs every one of a block's 64 threads in Python.
    inputs, truth = make_psf_groups(rng, 4, nsrc=np.array([1, 2, 1, 2]), n_frames=2,
                                    size=7, snr=(50.0, 300.0), mask_fraction=0.1)
    inputs["weights"][2, 1] = 0  # a missing frame
    inputs["stamps"][2, 1] = np.nan
    inputs["nsrc"][3] = 0  # an empty group
    return inputs, truth


def test_simulator_is_what_runs():
    from numba import config

    assert config.ENABLE_CUDASIM
    assert type(accumulate_group.compile("cuda")).__name__ == "FakeCUDAKernel"


def test_cuda_matches_cpu_and_reference(rng):
    inputs, truth = _inputs(rng)
    # A short iteration budget, the same for every target: the schedule is what is compared.
    got = fit_psf_groups(**inputs, max_iter=6, target="cuda")
    for want in (fit_psf_groups(**inputs, max_iter=6, target="cpu"),
                 fit_psf_groups(**inputs, max_iter=6, target="reference")):
        np.testing.assert_array_equal(np.isnan(got.params), np.isnan(want.params))
        np.testing.assert_allclose(got.params[..., 0], want.params[..., 0], rtol=PARITY_RTOL)
        np.testing.assert_allclose(got.params[..., 1:], want.params[..., 1:], rtol=0,
                                   atol=PARITY_ATOL_POS)
        np.testing.assert_allclose(got.errors, want.errors, rtol=PARITY_RTOL)
        np.testing.assert_allclose(got.chi2, want.chi2, rtol=PARITY_RTOL)
        for a, b in ((got.npix, want.npix), (got.niter, want.niter), (got.status, want.status)):
            np.testing.assert_array_equal(a, b)
    # and it is a fit: every used source within 5 sigma of the truth
    used = np.isfinite(truth["params"][:3, :, 0])
    pull = (got.params[:3] - truth["params"][:3]) / got.errors[:3]
    assert np.all(np.abs(pull[used]) < 5)
    assert got.niter[3] == 0 and np.all(np.isnan(got.params[3]))


def test_cuda_flags_a_source_without_data(rng):
    inputs, _ = _inputs(rng)
    # One group is enough (the simulator runs every thread in Python: keep the lane short).
    inputs = {k: v[:1] for k, v in inputs.items()}
    inputs["weights"][0] = 0
    got = fit_psf_groups(**inputs, target="cuda")
    assert got.status[0, 0] & STATUS_NO_DATA
    assert np.all(np.isnan(got.errors[0, 0])) and got.npix[0, 0] == 0
