"""The PSF model with CuPy frames on a real GPU gives exactly the NumPy result.

The stamps are cut on the device and copied to the host, where the same fits run, so the
two paths must agree to the last bit. Skipped, with the reason, when no GPU is usable or
the CUDA simulator is switched on. Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpu2mass.backend import gpu_status

pytestmark = pytest.mark.gpu

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("NUMBA_ENABLE_CUDASIM=1: the simulator cannot run CuPy arrays",
                allow_module_level=True)
_USABLE, _DETAIL = gpu_status()
if not _USABLE:
    pytest.skip(f"no usable GPU: {_DETAIL}", allow_module_level=True)

import cupy as cp
from test_psfmodel import _synthetic_scan

from gpu2mass.framedet import run_frame_detection
from gpu2mass.psfmodel import run_psf_model


def test_cupy_frames_match_numpy():
    rng = np.random.default_rng(7)
    alpha = np.full(24, 1.05)
    frames, mask, noise = _synthetic_scan(rng, alpha, 2.7, stars_per_frame=15)
    mask = mask.copy()
    mask[40:44, 10:90] = True  # a masked band of pixels under some stars
    det = run_frame_detection(frames, mask=mask, noise=noise)
    host = run_psf_model(frames, mask=mask, noise=noise, detections=det)
    dev = run_psf_model(cp.asarray(frames), mask=cp.asarray(mask), noise=noise, detections=det)
    for name in ("alpha_px", "beta", "fwhm_arcsec", "block_alpha", "block_nstars", "chi2",
                 "flags"):
        np.testing.assert_array_equal(getattr(dev, name), getattr(host, name), err_msg=name)
    np.testing.assert_allclose(host.block_alpha, 1.05, rtol=0.02)
