"""The batched PSF fit: truth recovery on synthetic frame stacks, CPU against reference.

Groups come from :func:`gpu2mass.sim.psfgroups.make_psf_groups`: Moffat point sources
rendered with :func:`gpu2mass.kernels.render_psf_stamps` (not with the fitting code) on 6
dithered, rotated frames with their own seeing and throughput, Gaussian noise, the 2MASS
data region (2 px around each source). Every accuracy claim of the kernel is measured here
against that truth.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from gpu2mass.kernels.psffit import (
    PARITY_ATOL_POS,
    PARITY_RTOL,
    STATUS_BITS,
    PsfFitResult,
    fit_psf_groups,
)
from gpu2mass.kernels.reference.psffit import moffat_pixel_gradient as ref_gradient
from gpu2mass.kernels.reference.psffit import render_group_model
from gpu2mass.kernels.scalar.moffat import (
    PIXEL_RULE_DX,
    PIXEL_RULE_DY,
    PIXEL_RULE_W,
    moffat_pixel_integral,
    moffat_quadrature_order,
)
from gpu2mass.kernels.scalar.psffit import (
    STATUS_MOVED,
    STATUS_NO_DATA,
    STATUS_NONPOSITIVE_FLUX,
    STATUS_NOT_CONVERGED,
    moffat_pixel_gradient,
)

from gpu2mass.sim.psfgroups import make_psf_groups


def _pulls(res: PsfFitResult, truth, slot=slice(None)):
    """(fit - truth) / error of the used slots, (N, 3)."""
    p = res.params[:, slot].reshape(-1, 3)
    e = res.errors[:, slot].reshape(-1, 3)
    t = truth["params"][:, slot].reshape(-1, 3)
    ok = np.isfinite(t[:, 0])
    return ((p - t) / e)[ok]


def _assert_parity(got: PsfFitResult, want: PsfFitResult):
    np.testing.assert_array_equal(np.isnan(got.params), np.isnan(want.params))
    np.testing.assert_allclose(got.params[..., 0], want.params[..., 0], rtol=PARITY_RTOL)
    np.testing.assert_allclose(got.params[..., 1:], want.params[..., 1:], rtol=0,
                               atol=PARITY_ATOL_POS)
    np.testing.assert_allclose(got.errors, want.errors, rtol=PARITY_RTOL)
    np.testing.assert_allclose(got.chi2, want.chi2, rtol=PARITY_RTOL)
    np.testing.assert_array_equal(got.npix, want.npix)
    np.testing.assert_array_equal(got.niter, want.niter)
    np.testing.assert_array_equal(got.status, want.status)


# -- the model -----------------------------------------------------------------------------


def test_pixel_gradient_is_the_integral_and_its_derivative(rng):
    fn = moffat_pixel_gradient.compile("cpu")
    integral = moffat_pixel_integral.compile("cpu")
    rules = (PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W)
    h = 1e-6
    worst = 0.0
    checked = 0
    for _ in range(400):
        cx, cy = rng.uniform(-6, 6, 2)
        a, b = rng.uniform(0.8, 2.0), rng.uniform(2.0, 4.0)
        d = math.hypot(cx, cy)
        val, gx, gy = fn(cx, cy, moffat_quadrature_order(cx, cy), a, b, *rules)
        # the same rule, node for node (the normalization is applied in another order)
        assert val == pytest.approx(integral(cx, cy, a, b, *rules), rel=1e-14)
        rv, rgx, rgy = ref_gradient(np.array([cx]), np.array([cy]), a, b)
        np.testing.assert_allclose((val, gx, gy), (rv[0], rgx[0], rgy[0]), rtol=1e-12,
                                   atol=1e-16)
        if min(abs(d - 2.5), abs(d - 5.0)) < 1e-3:
            continue  # a finite difference across a change of quadrature order
        # The source derivative is minus the pixel-offset derivative.
        nx = -(integral(cx + h, cy, a, b, *rules) - integral(cx - h, cy, a, b, *rules)) / (2 * h)
        ny = -(integral(cx, cy + h, a, b, *rules) - integral(cx, cy - h, a, b, *rules)) / (2 * h)
        scale = max(abs(gx), abs(gy), 1e-6)
        worst = max(worst, abs(nx - gx) / scale, abs(ny - gy) / scale)
        checked += 1
    assert checked > 350
    assert worst < 1e-7


def test_fit_model_is_what_render_psf_stamps_renders(rng):
    inputs, truth = make_psf_groups(rng, 6, nsrc=np.array([1, 2, 3, 4, 5, 7]), snr=(50, 500))
    for g in range(6):
        n = inputs["nsrc"][g]
        model = render_group_model(inputs["frame_maps"][g], inputs["psf_params"][g],
                                   inputs["flux_scale"][g], truth["params"][g, :n],
                                   inputs["stamps"].shape[2:])
        total = np.nansum(truth["params"][g, :n, 0])
        np.testing.assert_allclose(model, truth["model"][g], rtol=1e-5, atol=1e-7 * total)
        # As the fit models it, the rule orders fixed at the initial positions (0.2 px
        # away): the rules' own accuracy (moffat.py: 2.3e-4 of pixels above 1e-3 of the
        # flux, 4e-4 of the flux at worst).
        fitted = render_group_model(inputs["frame_maps"][g], inputs["psf_params"][g],
                                    inputs["flux_scale"][g], truth["params"][g, :n],
                                    inputs["stamps"].shape[2:], init=inputs["init"][g, :n])
        assert np.abs(fitted - truth["model"][g]).max() < 4e-4 * total
        big = truth["model"][g] > 1e-3 * total
        np.testing.assert_allclose(fitted[big], truth["model"][g][big], rtol=2.5e-4)


# -- truth recovery ---------------------------------------------------------------------------


def test_isolated_sources_are_unbiased_with_honest_errors(rng):
    # 600 single sources, SNR 10..1000 (log-uniform), 6 frames each.
    inputs, truth = make_psf_groups(rng, 600, nsrc=1, snr=(10.0, 1000.0))
    res = fit_psf_groups(**inputs)
    assert np.all(res.status[:, 0] == 0)
    assert np.all(res.niter <= 12) and np.quantile(res.niter, 0.95) <= 6
    pulls = _pulls(res, truth, 0)
    assert pulls.shape == (600, 3)
    std = pulls.std(0)
    assert np.all((std > 0.9) & (std < 1.1)), std
    assert np.all(np.abs(pulls.mean(0)) < 4 / math.sqrt(600)), pulls.mean(0)
    # The errors are the Cramer-Rao ones of the ideal single-source fit.
    ratio = res.errors[:, 0, 0] / truth["sigma_flux"][:, 0]
    assert 0.98 < np.median(ratio) < 1.03
    # psfchi of a correct model is ~1 (npix - 3 degrees of freedom).
    assert 0.95 < np.mean(res.chi2[:, 0]) < 1.05
    assert np.all(res.npix[:, 0] >= 40)  # ~13 px within 2 px, 6 frames, around the init


def test_high_snr_flux_bias_below_two_permille(rng):
    inputs, truth = make_psf_groups(rng, 300, nsrc=1, snr=(1000.0, 1000.0))
    res = fit_psf_groups(**inputs)
    rel = res.params[:, 0, 0] / truth["params"][:, 0, 0] - 1.0
    bias = rel.mean()
    assert abs(bias) < 2e-3
    assert abs(bias) < 4 * rel.std() / math.sqrt(rel.size)  # consistent with zero
    dpos = res.params[:, 0, 1:] - truth["params"][:, 0, 1:]
    assert np.all(np.abs(dpos.mean(0)) < 4 * dpos.std(0) / math.sqrt(300))
    assert np.all(dpos.std(0) < 0.01)  # px, at SNR 1000


def _one_at_a_time(inputs, radius=2.0):
    """Each source of each group fitted alone on its own 2 px data region."""
    g_count = inputs["init"].shape[0]
    s = inputs["stamps"].shape[-1]
    yy, xx = np.mgrid[:s, :s]
    rows = [(g, j) for g in range(g_count) for j in range(inputs["nsrc"][g])]
    m = inputs["frame_maps"][[g for g, _ in rows]]
    init = np.zeros((len(rows), 1, 3))
    init[:, 0] = [inputs["init"][g, j] for g, j in rows]
    x = m[..., 0, 0] + m[..., 0, 1] * init[:, None, 0, 1] + m[..., 0, 2] * init[:, None, 0, 2]
    y = m[..., 1, 0] + m[..., 1, 1] * init[:, None, 0, 1] + m[..., 1, 2] * init[:, None, 0, 2]
    own = (xx - x[..., None, None]) ** 2 + (yy - y[..., None, None]) ** 2 <= radius**2
    idx = [g for g, _ in rows]
    weights = np.where(own, inputs["weights"][idx], 0.0).astype(np.float32)
    single = {**inputs, "stamps": inputs["stamps"][idx], "weights": weights,
              "frame_maps": m, "psf_params": inputs["psf_params"][idx],
              "flux_scale": inputs["flux_scale"][idx], "init": init,
              "nsrc": np.ones(len(rows), np.int32)}
    return fit_psf_groups(**single), rows


@pytest.mark.parametrize("n", [2, 3])
def test_blends_fitted_jointly_beat_one_at_a_time(rng, n):
    # Separations 1.25-2.5 px (2.5"-5"), SNR 30-300 per source.
    inputs, truth = make_psf_groups(rng, 200, nsrc=n, snr=(30.0, 300.0))
    joint = fit_psf_groups(**inputs)
    assert np.mean(joint.status[:, :n] == 0) > 0.97
    good = np.all(joint.status[:, :n] == 0, axis=1)
    pulls = _pulls(PsfFitResult(joint.params[good], joint.errors[good], *([None] * 4)),
                   {"params": truth["params"][good]}, slice(0, n))
    joint_rms = np.sqrt(np.mean(pulls**2, axis=0))
    assert np.all((joint_rms > 0.85) & (joint_rms < 1.2)), joint_rms
    # Blending inflates the errors against the isolated ideal, as it should.
    assert np.median(joint.errors[:, :n, 0] / truth["sigma_flux"][:, :n]) > 1.05

    single, rows = _one_at_a_time(inputs)
    true_flux = np.array([truth["params"][g, j, 0] for g, j in rows])
    s_pull = (single.params[:, 0, 0] - true_flux) / single.errors[:, 0, 0]
    s_rms = np.sqrt(np.mean(s_pull**2))
    assert s_rms > 3 * joint_rms[0], (s_rms, joint_rms)
    # ...and they are biased high by the neighbours' light.
    assert np.median(single.params[:, 0, 0] / true_flux - 1) > 0.05
    j_rel = joint.params[:, :n, 0] / truth["params"][:, :n, 0] - 1
    assert abs(np.median(j_rel)) < 0.01


def test_masked_pixels_are_never_used(rng):
    inputs, _ = make_psf_groups(rng, 40, nsrc=np.arange(40) % 3 + 1, snr=(20, 500),
                                mask_fraction=0.15)
    clean = fit_psf_groups(**inputs)
    dirty = dict(inputs)
    stamps = inputs["stamps"].copy()
    masked = inputs["weights"] == 0
    stamps[masked] = np.where(np.random.default_rng(3).uniform(size=masked.sum()) < 0.5,
                              np.float32(1e30), np.nan)
    dirty["stamps"] = stamps
    bad = fit_psf_groups(**dirty)
    for a, b in zip((clean.params, clean.errors, clean.chi2, clean.npix, clean.niter,
                     clean.status), (bad.params, bad.errors, bad.chi2, bad.npix, bad.niter,
                                     bad.status), strict=True):
        np.testing.assert_array_equal(a, b)
    # Non-finite data with a positive weight are skipped as well.
    nanw = dict(inputs)
    st = inputs["stamps"].copy()
    g0 = np.argwhere(inputs["weights"][0] > 0)[0]
    st[(0, *g0)] = np.nan
    nanw["stamps"] = st
    r = fit_psf_groups(**nanw)
    assert r.npix[0, 0] <= clean.npix[0, 0] and np.isfinite(r.params[0, 0]).all()


def test_masked_pixels_keep_the_errors_honest(rng):
    inputs, truth = make_psf_groups(rng, 500, nsrc=1, snr=(10.0, 300.0), mask_fraction=0.2)
    res = fit_psf_groups(**inputs)
    pulls = _pulls(res, truth, 0)
    std = pulls.std(0)
    assert np.all((std > 0.9) & (std < 1.1)), std
    assert 0.98 < np.median(res.errors[:, 0, 0] / truth["sigma_flux"][:, 0]) < 1.03


def test_missing_frames(rng):
    # Three of the six frames absent (weights 0, stamps NaN) in every group.
    inputs, truth = make_psf_groups(rng, 500, nsrc=1, snr=(10.0, 300.0), missing_frames=3)
    res = fit_psf_groups(**inputs)
    assert np.all(res.status[:, 0] == 0)
    pulls = _pulls(res, truth, 0)
    std = pulls.std(0)
    assert np.all((std > 0.9) & (std < 1.1)), std
    assert 0.98 < np.median(res.errors[:, 0, 0] / truth["sigma_flux"][:, 0]) < 1.03
    assert np.all(res.npix[:, 0] <= 3 * 14)  # the used frames' pixels within 2 px only
    # A group whose every frame is absent: flagged, NaN errors, no exception.
    inputs["weights"][0] = 0
    res = fit_psf_groups(**inputs)
    assert res.status[0, 0] & STATUS_NO_DATA
    assert np.all(np.isnan(res.errors[0, 0])) and np.isnan(res.chi2[0, 0])
    assert res.npix[0, 0] == 0
    np.testing.assert_array_equal(res.params[0, 0], inputs["init"][0, 0])


# -- flags and contract -----------------------------------------------------------------------


def test_status_flags(rng):
    inputs, truth = make_psf_groups(rng, 60, nsrc=1, snr=(100, 100))
    # out of budget
    res = fit_psf_groups(**inputs, max_iter=1)
    assert np.all(res.niter <= 1)
    assert np.any(res.status[:, 0] & STATUS_NOT_CONVERGED)
    assert np.all((res.status[:, 0] & STATUS_NOT_CONVERGED == 0) | (res.niter == 1))
    # moved: the fit goes back to the truth, 0.2 px rms per axis from the init
    res = fit_psf_groups(**inputs, max_shift=0.3)
    shift = np.hypot(*(res.params[:, 0, 1:] - inputs["init"][:, 0, 1:]).T)
    held = res.status[:, 0] & STATUS_MOVED != 0
    np.testing.assert_allclose(shift[held], 0.3, rtol=1e-9)  # held at the bound
    assert np.all(shift[~held] < 0.3)
    assert 3 < held.sum() < 40
    true_shift = np.hypot(*(truth["params"][:, 0, 1:] - inputs["init"][:, 0, 1:]).T)
    assert np.all(true_shift[held] > 0.25)  # those whose truth lies beyond it
    # no source at all (flux 0 in the data): about half the fits go negative, flagged
    blank = dict(inputs)
    st = inputs["stamps"] - truth["model"].astype(np.float32)
    blank["stamps"] = st
    res = fit_psf_groups(**blank, max_iter=50)
    neg = res.params[:, 0, 0] <= 0
    np.testing.assert_array_equal(res.status[:, 0] & STATUS_NONPOSITIVE_FLUX != 0, neg)
    assert 10 < neg.sum() < 50
    # unused slots
    assert np.all(np.isnan(res.params[:, 1:])) and np.all(res.status[:, 1:] == 0)
    assert np.all(res.npix[:, 1:] == 0) and set(STATUS_BITS.values()) == {1, 2, 4, 8, 16}


def test_empty_groups_and_batches(rng):
    inputs, _ = make_psf_groups(rng, 3, nsrc=2, snr=(100, 300))
    inputs["nsrc"] = np.array([0, 2, 0], np.int32)
    res = fit_psf_groups(**inputs)
    assert np.all(np.isnan(res.params[[0, 2]])) and np.all(res.niter[[0, 2]] == 0)
    assert np.all(res.status[1, :2] == 0) and np.isfinite(res.params[1, :2]).all()
    empty = {k: v[:0] for k, v in inputs.items()}
    res = fit_psf_groups(**empty)
    assert res.params.shape == (0, 7, 3) and res.niter.shape == (0,)


def test_groups_are_fitted_independently(rng):
    inputs, _ = make_psf_groups(rng, 12, nsrc=np.arange(12) % 4 + 1, snr=(20, 200))
    whole = fit_psf_groups(**inputs)
    part = fit_psf_groups(**{k: v[5:9] for k, v in inputs.items()})
    np.testing.assert_array_equal(whole.params[5:9], part.params)
    np.testing.assert_array_equal(whole.errors[5:9], part.errors)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(stamps=d["stamps"][0]), "stamps must be"),
        (lambda d: d.update(weights=d["weights"][:, :2]), "weights must have shape"),
        (lambda d: d.update(init=np.zeros((2, 8, 3))), "1 to 7 source slots"),
        (lambda d: d.update(nsrc=np.array([1, 8])), "nsrc must be in"),
        (lambda d: d.update(nsrc=np.array([1.0, 1.0])), "integer array"),
        (lambda d: d["psf_params"].__setitem__((0, 0, 1), 1.0), "beta > 1"),
        (lambda d: d["init"].__setitem__((1, 0, 1), np.nan), "init must be finite"),
        (lambda d: d["frame_maps"].__setitem__((1, 0, 1, 1), np.inf), "frame_maps"),
    ],
)
def test_bad_inputs_are_rejected(rng, change, message):
    inputs, _ = make_psf_groups(rng, 2, nsrc=1)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        fit_psf_groups(**inputs)


@pytest.mark.parametrize(("kw", "value"), [("max_iter", -1), ("tol", 0.0),
                                            ("chi_radius", np.nan), ("max_shift", -1.0)])
def test_bad_keywords_are_rejected(rng, kw, value):
    inputs, _ = make_psf_groups(rng, 1, nsrc=1)
    with pytest.raises(ValueError, match=kw):
        fit_psf_groups(**inputs, **{kw: value})


def test_unknown_target(rng):
    inputs, _ = make_psf_groups(rng, 1, nsrc=1)
    with pytest.raises(ValueError, match="target"):
        fit_psf_groups(**inputs, target="tpu")


# -- parity ----------------------------------------------------------------------------------


def test_cpu_matches_reference(rng):
    nsrc = np.array([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 1, 2, 3, 7, 1, 2, 3, 4, 5, 6])
    inputs, _ = make_psf_groups(rng, nsrc.size, nsrc=nsrc, snr=(8, 2000), mask_fraction=0.1)
    inputs["weights"][:6, 4:] = 0  # some groups with missing frames
    inputs["weights"][7, :, 7:, :] = 0  # half a stamp masked
    inputs["init"][8, 0, 1] += 1.5  # a poor start
    inputs["nsrc"][9] = 0
    got = fit_psf_groups(**inputs, target="cpu")
    want = fit_psf_groups(**inputs, target="reference")
    assert isinstance(got, PsfFitResult) and got.params.dtype == np.float64
    assert got.status.dtype == np.int32 and got.npix.dtype == np.int32
    _assert_parity(got, want)
    assert np.isfinite(got.params[nsrc > 0]).sum() > 150
