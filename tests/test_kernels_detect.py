"""Detection kernels: the CPU (Numba) path pinned to the NumPy reference; GPU parity.

Inputs hit every edge: sources on and across the frame borders, masked pixels in and near
the 3 x 3 boxes, a flat-topped (clipped) source, NaN pixels, blends, a frame without sky
pixels for the annulus.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from gpu2mass.kernels import find_peaks, measure_sources, render_point_sources
from gpu2mass.kernels.scalar.detect import (
    FLAG_BLENDED,
    FLAG_EDGE,
    FLAG_MASKED_NEAR,
    FLAG_SATURATED,
    MEASURE_COLUMNS,
    N_PARAMS,
    P_BLEND_RADIUS,
    P_FIT_RADIUS,
    P_GAIN,
    P_R_AP,
    P_R_IN,
    P_R_OUT,
    P_SATURATION,
    P_TSNR,
    REJECT_LOW_SNR,
    REJECT_MASKED,
    aperture_weight,
    select_kth,
)

from gpu2mass.backend import gpu_status

# Fit results: the CPU path stops when a step is below 1e-5 px, the reference below 1e-7
# px with numerical derivatives: positions agree to 1e-4 px, fluxes to 1e-5 relative.
POS_ATOL = 1e-4
REL = 1e-5


def make_params(*, saturation=np.inf, gain=7.0):
    p = np.zeros(N_PARAMS)
    p[P_R_AP], p[P_R_IN], p[P_R_OUT] = 2.0, 7.0, 10.0
    p[P_FIT_RADIUS], p[P_BLEND_RADIUS] = 2.0, 2.5
    p[P_SATURATION], p[P_GAIN], p[P_TSNR] = saturation, gain, 10.0
    return p


def make_frames(rng, n=2, ny=48, nx=64, nsrc=14):
    """Noisy frames with Moffat sources, a clipped one, masked pixels and a NaN."""
    frames = []
    for _ in range(n):
        x = rng.uniform(-1.0, nx, nsrc)
        y = rng.uniform(-1.0, ny, nsrc)
        x[:2] = (20.0, 22.4)  # a blend
        y[:2] = (20.1, 20.3)
        flux = 10 ** rng.uniform(2.7, 4.0, nsrc)
        flux[:2] = 8000.0
        img = render_point_sources((ny, nx), x, y, flux, 1.1, 2.5, half_size=8)
        frames.append(img + rng.normal(0.0, 5.0, (ny, nx)).astype(np.float32))
    data = np.stack(frames).astype(np.float32)
    data[0, 30:32, 40:42] = 900.0  # a flat top: exactly one peak
    mask = np.zeros(data.shape, np.uint8)
    mask[:, 10, 5:60:7] = 1
    mask[1, 25:28, 30:33] = 1
    data[1, 5, 5] = np.nan
    mask[1, 5, 5] = 1
    return data, mask


@pytest.fixture
def frames(rng):
    return make_frames(rng)


def test_peaks_cpu_equal_reference(frames):
    data, mask = frames
    thr = np.array([20.0, 25.0])
    cpu = find_peaks(data, mask, thr)
    ref = find_peaks(data, mask, thr, target="reference")
    assert cpu.dtype == np.uint8 and cpu.shape == data.shape
    np.testing.assert_array_equal(cpu, ref)
    assert cpu[0, 30:32, 40:42].sum() == 1  # the plateau
    assert cpu[mask != 0].sum() == 0


def _measure_both(data, mask, params):
    peaks = find_peaks(data, mask, np.array([20.0, 20.0]))
    f, y, x = np.nonzero(peaks)
    kw = {"noise": np.array([5.0, 5.2]), "alpha": 1.1, "beta": 2.5, "params": params}
    cpu = measure_sources(data, mask, peaks, f, y, x, **kw)
    ref = measure_sources(data, mask, peaks, f, y, x, target="reference", **kw)
    return cpu, ref


def _assert_same(cpu, ref):
    (v, fl), (rv, rfl) = cpu, ref
    assert v.shape == (fl.size, len(MEASURE_COLUMNS)) and fl.dtype == np.int32
    np.testing.assert_array_equal(fl, rfl)
    keep = (fl & (REJECT_MASKED | REJECT_LOW_SNR)) == 0
    assert keep.sum() >= 5
    col = {c: i for i, c in enumerate(MEASURE_COLUMNS)}
    for c in ("x", "y"):
        np.testing.assert_allclose(v[keep, col[c]], rv[keep, col[c]], atol=POS_ATOL)
    for c in ("x_err", "y_err", "flux", "flux_err", "snr", "fpeak", "fit_flux"):
        np.testing.assert_allclose(v[keep, col[c]], rv[keep, col[c]], rtol=1e-4, atol=1e-3,
                                   err_msg=c)
    for c in ("peak", "sky", "sky_sigma"):
        np.testing.assert_allclose(v[:, col[c]], rv[:, col[c]], rtol=REL, err_msg=c)


def test_measure_cpu_matches_reference(frames):
    data, mask = frames
    cpu, ref = _measure_both(data, mask, make_params(saturation=800.0))
    _assert_same(cpu, ref)
    flags = cpu[1]
    for bit in (FLAG_BLENDED, FLAG_EDGE, FLAG_SATURATED, REJECT_MASKED):
        assert (flags & bit).any(), bit


def test_measure_without_gain_and_with_masked_apertures(rng):
    data, mask = make_frames(rng, nsrc=20)
    mask[:, ::9, :] = 1  # rows of bad pixels cross many apertures and annuli
    cpu, ref = _measure_both(data, mask, make_params(gain=0.0))
    _assert_same(cpu, ref)
    assert (cpu[1] & FLAG_MASKED_NEAR).any()


def test_recovers_a_clean_source():
    img = render_point_sources((40, 40), np.array([20.3]), np.array([18.7]), 5000.0, 1.1, 2.5,
                               half_size=15)[None]
    mask = np.zeros(img.shape, np.uint8)
    peaks = find_peaks(img, mask, 1.0)
    f, y, x = np.nonzero(peaks)
    assert f.size == 1
    v, fl = measure_sources(img, mask, peaks, f, y, x, noise=1.0, alpha=1.1, beta=2.5,
                            params=make_params())
    col = {c: i for i, c in enumerate(MEASURE_COLUMNS)}
    assert fl[0] == 0
    assert v[0, col["x"]] == pytest.approx(20.3, abs=1e-4)
    assert v[0, col["y"]] == pytest.approx(18.7, abs=1e-4)
    assert v[0, col["fit_flux"]] == pytest.approx(5000.0, rel=1e-3)  # stamp truncation


def test_scalar_helpers():
    buf = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 3.0])
    for k in range(6):
        assert select_kth(buf.copy(), 6, k) == np.sort(buf)[k]
    # the 4" aperture's area: pi r^2 to the sub-sampling accuracy
    area = sum(aperture_weight(i - 0.3, j + 0.2, 2.0) for i in range(-4, 5) for j in range(-4, 5))
    assert area == pytest.approx(np.pi * 4.0, rel=2e-3)


def test_bad_inputs():
    data = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="mask"):
        find_peaks(data, np.zeros((2, 8, 8)), 1.0)
    with pytest.raises(ValueError, match="target"):
        find_peaks(data, np.zeros((1, 8, 8)), 1.0, target="fpga")
    with pytest.raises(ValueError, match="params"):
        measure_sources(data, data, data, [0], [1], [1], noise=1, alpha=1, beta=2.5,
                        params=np.zeros(3))
    with pytest.raises(ValueError, match="outside"):
        measure_sources(data, data, data, [0], [9], [1], noise=1, alpha=1, beta=2.5,
                        params=make_params())
    v, fl = measure_sources(data, data, data, np.zeros(0, int), np.zeros(0, int),
                            np.zeros(0, int), noise=1, alpha=1, beta=2.5, params=make_params())
    assert v.shape == (0, len(MEASURE_COLUMNS)) and fl.shape == (0,)


_GPU_OK, _GPU_DETAIL = (False, "NUMBA_ENABLE_CUDASIM=1") if os.environ.get(
    "NUMBA_ENABLE_CUDASIM") == "1" else gpu_status()


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU_OK, reason=f"no usable GPU: {_GPU_DETAIL}")
def test_gpu_matches_cpu(rng):
    import cupy as cp

    data, mask = make_frames(rng, n=4, ny=128, nx=128, nsrc=60)
    thr = np.full(4, 20.0)
    cpu_peaks = find_peaks(data, mask, thr)
    gpu_peaks = find_peaks(cp.asarray(data), cp.asarray(mask), cp.asarray(thr))
    assert isinstance(gpu_peaks, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(gpu_peaks), cpu_peaks)
    f, y, x = np.nonzero(cpu_peaks)
    kw = {"noise": np.full(4, 5.0), "alpha": 1.1, "beta": 2.5, "params": make_params()}
    cpu = measure_sources(data, mask, cpu_peaks, f, y, x, **kw)
    gpu = measure_sources(*(cp.asarray(a) for a in (data, mask, gpu_peaks, f, y, x)),
                          **{**kw, "noise": cp.asarray(kw["noise"])})
    np.testing.assert_array_equal(cp.asnumpy(gpu[1]), cpu[1])
    # Same float64 math; FMA contraction differs: agreement far inside the fit tolerance.
    np.testing.assert_allclose(cp.asnumpy(gpu[0]), cpu[0], rtol=1e-7, atol=1e-7)
