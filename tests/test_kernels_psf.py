"""The Moffat PSF stamp kernels on the CPU: accuracy, parity with the reference, scatter-add,
flux conservation, input checks, and the lazy compile-per-target mechanism.

Accuracy is measured against independent integrals: a brute-force 64 x 64 sub-sampled pixel
integral (``reference.psf.moffat_pixel_integral_bruteforce``) and, for whole stamps, a
semi-analytic integral over the stamp square (closed form along x through the
hypergeometric function, Gauss-Legendre along y).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gpu2mass.kernels import add_stamps, render_point_sources, render_psf_stamps
from gpu2mass.kernels._targets import Kernel, ScalarFunction, cpu_kernel, cuda_kernel, scalar
from gpu2mass.kernels.reference import psf as ref
from gpu2mass.kernels.scalar.elementary import pow_positive
from gpu2mass.kernels.scalar.moffat import (
    GL_ORDER_FAR,
    GL_ORDER_MID,
    GL_ORDER_NEAR,
    GL_RADIUS_MID,
    GL_RADIUS_NEAR,
    PIXEL_RULE_DX,
    PIXEL_RULE_DY,
    PIXEL_RULE_W,
    moffat_density,
    moffat_pixel_integral,
    moffat_quadrature_order,
)
from scipy.special import hyp2f1

# The CPU and reference renderers both compute in float64 and round once to float32; they
# differ only in summation order and in pow (NumPy's vs pow_positive, both ~1e-15), so they
# agree to float32 rounding. (Observed: bit-identical on 1.8 million pixels.)
PARITY_RTOL = 1e-5
PARITY_ATOL_PER_FLUX = 1e-7

# Largest error of one pixel, as a fraction of the source's flux, measured against the
# brute-force integral over alpha in [0.5, 3] px, beta in [2, 5] (worst at beta = 5, source
# centred on a pixel); keyed by the smallest alpha of the range it holds for. The 8 x 8
# rule cannot resolve the core of a Moffat narrower than about half a pixel.
MAX_PIXEL_ERROR = {0.5: 4.5e-4, 0.6: 6e-5, 0.75: 4e-6, 1.0: 5e-7}
# For pixels holding more than 1e-3 of the flux, the largest relative error of any pixel:
# the central pixel for alpha = 0.5 px, else the 2 x 2 rule just beyond 5 px (broad profiles).
MAX_RELATIVE_ERROR_BRIGHT = {0.5: 5e-4, 0.6: 3e-4}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def _bound(table: dict[float, float], alpha: float) -> float:
    return min(v for a, v in table.items() if alpha >= a)


def _square_integral(half_width: float, fx: float, fy: float, alpha: float, beta: float) -> float:
    """Integral of the unit-flux Moffat over [-w - fx, w - fx] x [-w - fy, w - fy].

    In units of alpha, with B = 1 + v^2: the integral of (B + u^2)^-beta over u from 0 to U is
    U B^-beta 2F1(1/2, beta; 3/2; -U^2/B) (exact), and the remaining integral over v is
    smooth and done by composite 16-point Gauss-Legendre on 200 panels.
    """

    def inner(u, b):
        return u * b ** (-beta) * hyp2f1(0.5, beta, 1.5, -(u * u) / b)

    u0, u1 = (-half_width - fx) / alpha, (half_width - fx) / alpha
    v0, v1 = (-half_width - fy) / alpha, (half_width - fy) / alpha
    t, w = np.polynomial.legendre.leggauss(16)
    edges = np.linspace(v0, v1, 201)
    mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * np.diff(edges)
    v = (mid[:, None] + half[:, None] * t).ravel()
    wv = (half[:, None] * w).ravel()
    b = 1.0 + v * v
    return float((beta - 1.0) / np.pi * np.sum(wv * (inner(u1, b) - inner(u0, b))))


# -- the compile-per-target mechanism ----------------------------------------------------


@scalar
def _square(x):
    return x * x


@scalar
def _sum_of_squares(x, y):
    return _square(x) + _square(y)


def _driver_body(xs, out):
    for i in range(xs.shape[0]):
        out[i] = _sum_of_squares(xs[i], 1.0)


def test_scalar_callees_compile_for_the_cpu_target():
    assert isinstance(_sum_of_squares, ScalarFunction)
    assert _sum_of_squares(3.0, 4.0) == 25.0  # plain Python
    compiled = _sum_of_squares.compile("cpu")
    assert compiled(3.0, 4.0) == 25.0
    assert compiled is _sum_of_squares.compile("cpu")  # memoized
    assert "cpu" in _square.compiled_targets  # the callee came along
    # The defining module's globals still hold the ScalarFunction, not a compiled object.
    assert _sum_of_squares.py_func.__globals__["_square"] is _square


def test_cpu_kernel_driver_compiles_on_first_call():
    driver = cpu_kernel(_driver_body)
    assert isinstance(driver, Kernel) and not driver.is_compiled
    out = np.empty(3)
    driver(np.array([0.0, 1.0, 2.0]), out)
    assert driver.is_compiled
    np.testing.assert_array_equal(out, [1.0, 2.0, 5.0])


def test_kernel_call_style_is_checked():
    with pytest.raises(TypeError, match="launch it"):
        cuda_kernel(_driver_body)(np.zeros(1), np.zeros(1))
    with pytest.raises(TypeError, match="call it directly"):
        cpu_kernel(_driver_body)[1, 1]
    with pytest.raises(ValueError, match="unknown kernel target"):
        _square.compile("opencl")


def test_import_compiles_nothing_and_cpu_use_never_imports_numba_cuda():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import gpu2mass.kernels as k
        from gpu2mass.kernels.scalar import moffat, elementary
        assert "numba" not in sys.modules, "importing gpu2mass.kernels imported numba"
        # Through the dispatcher to a CPU driver (the scatter-add: the quickest to compile).
        image = np.zeros((3, 3), np.float32)
        k.add_stamps(image, np.ones((1, 2, 2), np.float32), [1], [1])
        assert image.sum() == 4.0
        assert elementary.pow_positive.compiled_targets == ()
        moffat.moffat_profile.compile("cpu")
        assert moffat.moffat_profile.compiled_targets == ("cpu",)
        assert elementary.pow_positive.compiled_targets == ("cpu",)  # a callee
        assert moffat.moffat_pixel_integral.compiled_targets == ()
        assert "numba.cuda" not in sys.modules, "the CPU path imported numba.cuda"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- scalar math -------------------------------------------------------------------------


def test_pow_positive_matches_numpy(rng):
    u = 10.0 ** rng.uniform(0.0, 6.0, 50_000)
    p = rng.uniform(-10.0, -1.0, u.size)
    f = pow_positive.compile("cpu")
    got = np.array([f(a, b) for a, b in zip(u[:20_000], p[:20_000], strict=True)])
    want = u[:20_000] ** p[:20_000]
    # The documented bound: the rounding of y = p ln u alone costs |y| * 1.1e-16.
    y = np.abs(p[:20_000] * np.log(u[:20_000]))
    assert np.all(np.abs(got / want - 1.0) <= 1e-15 * (1.0 + y))
    # The plain Python body (what the CUDA simulator runs) agrees too.
    py = np.array([pow_positive(a, b) for a, b in zip(u[:200], p[:200], strict=True)])
    np.testing.assert_allclose(py, want[:200], rtol=2e-13)


def test_pow_positive_saturates_instead_of_overflowing():
    f = pow_positive.compile("cpu")
    assert f(1e300, -10.0) == pytest.approx(np.exp(-700.0), rel=1e-12)
    assert f(1e300, 10.0) == pytest.approx(np.exp(700.0), rel=1e-12)
    assert f(1.0, -3.0) == 1.0


def test_pixel_rules_integrate_polynomials_exactly():
    for n in (GL_ORDER_NEAR, GL_ORDER_MID, GL_ORDER_FAR):
        dx, dy, w = PIXEL_RULE_DX[n, : n * n], PIXEL_RULE_DY[n, : n * n], PIXEL_RULE_W[n, : n * n]
        assert np.all(np.abs(dx) < 0.5) and np.all(np.abs(dy) < 0.5)
        assert np.sum(w) == pytest.approx(1.0, abs=1e-15)
        # The n-point rule is exact for degree 2n-1 per axis: x^2 y^2 over the unit square.
        assert np.sum(w * dx**2 * dy**2) == pytest.approx(1.0 / 144.0, rel=1e-13)
        assert not np.any(PIXEL_RULE_W[n, n * n :])
    assert not PIXEL_RULE_W.flags.writeable


def test_quadrature_order_thresholds():
    f = moffat_quadrature_order.compile("cpu")
    eps = 1e-9
    assert f(0.0, 0.0) == GL_ORDER_NEAR
    assert f(GL_RADIUS_NEAR - eps, 0.0) == GL_ORDER_NEAR
    assert f(0.0, GL_RADIUS_NEAR) == GL_ORDER_MID  # d < radius, strictly
    assert f(GL_RADIUS_MID - eps, 0.0) == GL_ORDER_MID
    assert f(3.0, 4.0) == GL_ORDER_FAR  # d = 5 exactly
    assert moffat_quadrature_order(3.0, 4.0) == GL_ORDER_FAR  # the Python body agrees


@pytest.mark.parametrize("alpha", [0.5, 0.6, 0.75, 1.0, 2.0, 3.0])
def test_pixel_integral_accuracy_vs_bruteforce(alpha):
    # Offsets: centred on a pixel (the worst case for the core) and two generic ones;
    # pixels: a 7 x 7 core and a ring just inside and outside the 2.5 and 5 px radii.
    offsets = [(0.0, 0.0), (0.31, -0.17), (-0.5, 0.44)]
    core = [(x, y) for y in range(-3, 4) for x in range(-3, 4)]
    rim = [(2, 1), (3, 0), (2, 2), (4, 3), (5, 0), (5, 1), (7, 2)]
    worst_abs, worst_rel = 0.0, 0.0
    for beta in (2.0, 3.5, 5.0):
        for fx, fy in offsets:
            px = np.array([p[0] for p in core + rim], dtype=float)
            py = np.array([p[1] for p in core + rim], dtype=float)
            stamp = render_psf_stamps(
                np.array([fx]), np.array([fy]), 1.0, alpha, beta, half_size=7
            )[0]
            got = stamp[(py + 7).astype(int), (px + 7).astype(int)].astype(np.float64)
            truth = ref.moffat_pixel_integral_bruteforce(px - fx, py - fy, alpha, beta)
            err = np.abs(got - truth)
            worst_abs = max(worst_abs, float(err.max()))
            bright = truth > 1e-3
            worst_rel = max(worst_rel, float((err[bright] / truth[bright]).max()))
    assert worst_abs < _bound(MAX_PIXEL_ERROR, alpha)
    assert worst_rel < _bound(MAX_RELATIVE_ERROR_BRIGHT, alpha)


@pytest.mark.parametrize("half_size", [3, 8])
def test_stamp_sums_match_the_integral_over_the_stamp_square(rng, half_size):
    n = 10
    fx, fy = rng.uniform(-0.5, 0.5, (2, n))
    alpha = rng.uniform(0.6, 3.0, n)
    beta = rng.uniform(2.0, 5.0, n)
    flux = 10.0 ** rng.uniform(1.0, 4.0, n)
    sums = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=half_size).sum(
        axis=(1, 2), dtype=np.float64
    )
    w = half_size + 0.5
    for k in range(n):
        square = _square_integral(w, fx[k], fy[k], alpha[k], beta[k])
        # Sanity of the semi-analytic integral: between the enclosed fluxes of the inscribed
        # and circumscribed circles, 1 - (1 + R^2/alpha^2)^(1-beta).
        inner = 1.0 - (1.0 + ((w - 0.5) / alpha[k]) ** 2) ** (1.0 - beta[k])
        outer = 1.0 - (1.0 + 2.0 * ((w + 0.5) / alpha[k]) ** 2) ** (1.0 - beta[k])
        assert inner < square < outer
        assert sums[k] / flux[k] == pytest.approx(square, rel=1e-4)


def test_stamp_sum_for_the_sharpest_profile_within_documented_bound():
    # alpha = 0.5 px, beta = 5, centred: the 8 x 8 rule's worst case (MAX_PIXEL_ERROR).
    stamp = render_psf_stamps(np.zeros(1), np.zeros(1), 1.0, 0.5, 5.0, half_size=4)[0]
    square = _square_integral(4.5, 0.0, 0.0, 0.5, 5.0)
    assert abs(stamp.sum(dtype=np.float64) / square - 1.0) < MAX_PIXEL_ERROR[0.5]


# -- parity with the reference -----------------------------------------------------------


@pytest.mark.parametrize("half_size", [0, 1, 6, 10])
def test_cpu_stamps_match_reference(rng, half_size):
    n = 200
    fx, fy = rng.uniform(-0.5, 0.5, (2, n))
    fx[:4] = [-0.5, 0.5, 0.0, 0.25]  # the edges of the allowed range and exact centres
    fy[:4] = [0.5, -0.5, 0.0, 0.0]
    flux = 10.0 ** rng.uniform(0.0, 5.0, n)
    alpha = rng.uniform(0.5, 3.0, n)
    beta = rng.uniform(1.2, 6.0, n)
    cpu = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=half_size)
    want = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=half_size, target="reference")
    assert cpu.dtype == np.float32 and cpu.shape == (n, 2 * half_size + 1, 2 * half_size + 1)
    np.testing.assert_allclose(cpu, want, rtol=PARITY_RTOL, atol=PARITY_ATOL_PER_FLUX * flux.max())
    scale = PARITY_ATOL_PER_FLUX * flux[:, None, None]
    assert np.all(np.abs(cpu - want.astype(np.float64)) <= scale + PARITY_RTOL * np.abs(want))


def test_scalar_pixel_integral_matches_reference(rng):
    # The per-pixel scalar (what the CUDA kernel calls) against the reference, on the CPU.
    cpu = moffat_pixel_integral.compile("cpu")
    cx, cy = rng.uniform(-8.0, 8.0, (2, 300))
    alpha, beta = rng.uniform(0.5, 3.0, 300), rng.uniform(1.5, 5.0, 300)
    got = np.array(
        [
            cpu(*v, PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W)
            for v in zip(cx, cy, alpha, beta, strict=True)
        ]
    )
    np.testing.assert_allclose(got, ref.moffat_pixel_integral(cx, cy, alpha, beta), rtol=1e-13)


def test_scalar_density_matches_reference_and_normalization(rng):
    dx, dy = rng.uniform(-10.0, 10.0, (2, 200))
    alpha, beta = rng.uniform(0.5, 3.0, 200), rng.uniform(1.5, 5.0, 200)
    cpu = moffat_density.compile("cpu")
    got = np.array([cpu(*v) for v in zip(dx, dy, alpha, beta, strict=True)])
    np.testing.assert_allclose(got, ref.moffat_density(dx, dy, alpha, beta), rtol=1e-13)
    assert cpu(0.0, 0.0, 2.0, 3.0) == pytest.approx(2.0 / (np.pi * 4.0), rel=1e-15)


def test_scalar_arguments_broadcast(rng):
    fx, fy = rng.uniform(-0.5, 0.5, (2, 5))
    a = render_psf_stamps(fx, fy, 7.0, 1.5, 3.0, half_size=2)
    b = render_psf_stamps(fx, fy, np.full(5, 7.0), np.full(5, 1.5), np.full(5, 3.0), half_size=2)
    np.testing.assert_array_equal(a, b)


# -- scatter-add -------------------------------------------------------------------------


def test_add_stamps_clips_partly_and_fully_outside(rng):
    ny, nx, s = 20, 30, 5
    # Inside; across each edge and corner; wholly outside on each side and at each corner.
    origins = [
        (10, 7),
        (-2, 8),
        (27, 8),
        (12, -3),
        (12, 17),
        (-4, -4),
        (28, 18),
        (-5, 5),
        (30, 5),
        (10, -5),
        (10, 20),
        (-6, -9),
        (31, 21),
        (-5, 20),
        (30, -5),
    ]
    x0 = np.array([o[0] for o in origins])
    y0 = np.array([o[1] for o in origins])
    stamps = rng.uniform(0.0, 1.0, (len(origins), s, s)).astype(np.float32)
    image = rng.uniform(0.0, 1.0, (ny, nx)).astype(np.float32)
    want = image.copy()
    ref.add_stamps(want, stamps, x0, y0)
    got = image.copy()
    add_stamps(got, stamps, x0, y0)
    np.testing.assert_array_equal(got, want)  # same float32 additions in the same order
    # By hand for the corner stamp at (-4, -4): only its element [4, 4] lands, on [0, 0].
    one = np.zeros((ny, nx), np.float32)
    add_stamps(one, np.ones((1, s, s), np.float32), np.array([-4]), np.array([-4]))
    assert one[0, 0] == 1.0 and one.sum() == 1.0
    # Wholly outside: nothing changes.
    untouched = image.copy()
    add_stamps(untouched, stamps[7:], x0[7:], y0[7:])
    np.testing.assert_array_equal(untouched, image)


def test_add_stamps_overlapping_is_deterministic_and_in_order(rng):
    n, s = 500, 9
    stamps = rng.uniform(-1.0, 1.0, (n, s, s)).astype(np.float32)
    x0 = rng.integers(-10, 40, n)
    y0 = rng.integers(-10, 25, n)
    want = np.zeros((24, 40), np.float32)
    ref.add_stamps(want, stamps, x0, y0)
    got = np.zeros((24, 40), np.float32)
    add_stamps(got, stamps, x0, y0)
    np.testing.assert_array_equal(got, want)


def test_add_stamps_reference_target_and_dtypes(rng):
    stamps = rng.uniform(0.0, 1.0, (3, 4, 6))  # float64 stamps are converted; sy != sx
    x0 = np.array([0, 5, -2], dtype=np.int32)
    y0 = np.array([1, -1, 3], dtype=np.int16)
    a = np.zeros((8, 9), np.float32)
    b = np.zeros((8, 9), np.float32)
    add_stamps(a, stamps, x0, y0)
    add_stamps(b, stamps, x0, y0, target="reference")
    np.testing.assert_array_equal(a, b)


# -- render_point_sources and flux conservation -------------------------------------------


def test_render_point_sources_conserves_flux_inside_the_image(rng):
    n, h = 40, 6
    x = rng.uniform(h + 1, 100 - h - 2, n)
    y = rng.uniform(h + 1, 80 - h - 2, n)
    flux = 10.0 ** rng.uniform(1.0, 4.0, n)
    alpha, beta = rng.uniform(0.8, 2.5, n), rng.uniform(2.0, 5.0, n)
    image = render_point_sources((80, 100), x, y, flux, alpha, beta, half_size=h)
    assert image.dtype == np.float32 and image.shape == (80, 100)
    fx, fy = x - np.rint(x), y - np.rint(y)
    stamps = render_psf_stamps(fx, fy, flux, alpha, beta, half_size=h)
    total = image.sum(dtype=np.float64)
    assert total == pytest.approx(stamps.sum(dtype=np.float64), rel=1e-6)
    # Each stamp holds its source's flux but for the light beyond the stamp square.
    expected = sum(
        flux[k] * _square_integral(h + 0.5, fx[k], fy[k], alpha[k], beta[k]) for k in range(n)
    )
    assert total == pytest.approx(expected, rel=1e-4)
    # The peak of a source sits on the pixel nearest to its centre.
    k = int(np.argmax(flux))
    iy, ix = int(np.rint(y[k])), int(np.rint(x[k]))
    assert image[iy, ix] == image[iy - 1 : iy + 2, ix - 1 : ix + 2].max()


def test_render_point_sources_matches_stamps_added_by_hand(rng):
    n, h, shape = 60, 4, (30, 50)
    # Many near or beyond the edges; some exactly on half pixels (rint rounds to even).
    x = rng.uniform(-12.0, 62.0, n)
    y = rng.uniform(-12.0, 42.0, n)
    x[:3] = [10.5, 11.5, -0.5]
    y[:3] = [3.5, 4.5, 29.5]
    flux = 10.0 ** rng.uniform(1.0, 3.0, n)
    alpha, beta = 1.3, 3.0
    got = render_point_sources(shape, x, y, flux, alpha, beta, half_size=h)
    ix, iy = np.rint(x), np.rint(y)
    stamps = ref.render_psf_stamps(x - ix, y - iy, flux, alpha, beta, half_size=h)
    want = np.zeros(shape, np.float32)
    ref.add_stamps(want, stamps, ix.astype(np.int64) - h, iy.astype(np.int64) - h)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=PARITY_ATOL_PER_FLUX * flux.max())
    got_ref = render_point_sources(shape, x, y, flux, alpha, beta, half_size=h, target="reference")
    np.testing.assert_array_equal(got_ref, want)


# -- edge cases and input checks ---------------------------------------------------------


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_no_sources(target):
    empty = np.zeros(0)
    stamps = render_psf_stamps(empty, empty, empty, empty, empty, half_size=3, target=target)
    assert stamps.shape == (0, 7, 7) and stamps.dtype == np.float32
    image = np.ones((4, 5), np.float32)
    add_stamps(image, stamps, np.zeros(0, np.int64), np.zeros(0, np.int64), target=target)
    assert np.all(image == 1.0)
    blank = render_point_sources((4, 5), empty, empty, 1.0, 1.0, 3.0, half_size=2, target=target)
    assert blank.shape == (4, 5) and not blank.any()


def test_render_point_sources_all_outside_and_empty_image():
    image = render_point_sources((10, 10), [-50.0, 70.0], [5.0, 5.0], 1.0, 1.0, 3.0, half_size=3)
    assert not image.any()
    assert render_point_sources((0, 7), [1.0], [1.0], 1.0, 1.0, 3.0, half_size=2).shape == (0, 7)


@pytest.mark.parametrize("half_size", [-1, 1.5, True, "3", None])
def test_invalid_half_size(half_size):
    with pytest.raises(ValueError, match="half_size must be a non-negative integer"):
        render_psf_stamps([0.0], [0.0], 1.0, 1.0, 3.0, half_size=half_size)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.0}, r"beta must be finite and > 1; beta\[0\] = 1.0"),
        ({"beta": [3.0, 0.5]}, r"beta\[1\] = 0.5"),
        ({"beta": np.nan}, "beta must be finite and > 1"),
        ({"alpha": 0.0}, "alpha must be finite and > 0"),
        ({"alpha": -1.0}, "alpha must be finite and > 0"),
        ({"flux": np.inf}, "flux must be finite"),
        ({"fx": [0.1, 0.6]}, r"fx must be in \[-0.5, 0.5\]"),
        ({"fy": [np.nan, 0.0]}, "fy must be in"),
        ({"flux": [1.0, 2.0, 3.0]}, "flux has 3 values but there are 2 sources"),
        ({"fx": [[0.0, 0.0]]}, "fx must be a 1-D array"),
    ],
)
def test_invalid_source_parameters(kwargs, message):
    args = {"fx": [0.0, 0.1], "fy": [0.0, -0.1], "flux": 1.0, "alpha": 1.0, "beta": 3.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        render_psf_stamps(**args, half_size=2)


def test_invalid_target_and_images():
    with pytest.raises(ValueError, match="target must be one of"):
        render_psf_stamps([0.0], [0.0], 1.0, 1.0, 3.0, half_size=1, target="gpu")
    stamps = np.ones((1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="C-contiguous float32 2-D"):
        add_stamps(np.zeros((4, 4)), stamps, [0], [0])
    with pytest.raises(ValueError, match="C-contiguous float32 2-D"):
        add_stamps(np.zeros((4, 8), np.float32)[:, ::2], stamps, [0], [0])
    with pytest.raises(ValueError, match="x0 must hold integers"):
        add_stamps(np.zeros((4, 4), np.float32), stamps, [0.5], [0])
    with pytest.raises(ValueError, match="y0 must be 1-D with one entry per stamp"):
        add_stamps(np.zeros((4, 4), np.float32), stamps, [0], [0, 1])
    with pytest.raises(ValueError, match="stamps must be a 3-D array"):
        add_stamps(np.zeros((4, 4), np.float32), np.ones((3, 3), np.float32), [0], [0])
    with pytest.raises(ValueError, match="shape must be two non-negative integers"):
        render_point_sources((4,), [1.0], [1.0], 1.0, 1.0, 3.0, half_size=1)
    with pytest.raises(ValueError, match=r"x must be finite"):
        render_point_sources((4, 4), [np.inf], [1.0], 1.0, 1.0, 3.0, half_size=1)
