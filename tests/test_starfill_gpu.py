"""The bad-pixel fill under stars with CuPy frames on a real GPU gives the NumPy result.

The stamps are cut on the device and fitted on the host, so the filled frames and the
coadd mask must agree exactly. Skipped, with the reason, when no GPU is usable or the
CUDA simulator is switched on. Run with ``pytest -m gpu``.
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
from _frames import simple_scan
from test_starfill import ALPHA_PX, _fwhm_arcsec, _star

from gpu2mass.frames import MASK_BAD
from gpu2mass.starfill import fill_bad_pixels_under_stars


def test_cupy_frames_match_numpy(tiny_night):
    scan = simple_scan(tiny_night, "K")
    frames, fx, fy, inside, _, det = _star(scan, 250.9, 700.4)
    bits = np.zeros(frames.shape, np.uint8)
    for k in inside:
        bits[k, round(fy[k]), round(fx[k]) + (k % 3) - 1] = MASK_BAD
    transient = np.zeros(frames.shape, bool)
    seeing = np.full(scan.geometry.nframes, _fwhm_arcsec(ALPHA_PX, scan.geometry.band.scale_arcsec))
    host = fill_bad_pixels_under_stars(frames, bits, transient_mask=transient, detections=det,
                                       geometry=scan.geometry, seeing_fwhm=seeing, noise=np.ones(scan.geometry.nframes))
    dev = fill_bad_pixels_under_stars(cp.asarray(frames), cp.asarray(bits), transient_mask=transient,
                                      detections=det, geometry=scan.geometry, seeing_fwhm=seeing, noise=np.ones(scan.geometry.nframes))
    assert host[2] == dev[2] == inside.size
    np.testing.assert_array_equal(cp.asnumpy(dev[0]), host[0])
    np.testing.assert_array_equal(cp.asnumpy(dev[1]), host[1])
