"""Pixel-integrated stamps of Sérsic galaxies seen through a Moffat PSF.

The simulator draws every galaxy of the truth list (:func:`gpu2mass.sim.sky.galaxies`)
into every frame that sees it, about 5,000 stamps per scan, so one stamp must cost about
a millisecond. :func:`render_galaxy` computes

    stamp[y, x] = ∫_pixel (Sérsic ⊗ Moffat)(x', y') dx' dy'

on a grid ``oversample`` times finer than the pixels, with an FFT convolution, and bins it
down. The model is never renormalised to the stamp: the stamp holds the galaxy's flux
times the fraction of the convolved light that falls inside it (see *Truncation* below).

Pixel and sky conventions (``shared/spec/raw-night.md`` 3.1)
------------------------------------------------------------
Stamps are indexed ``[y, x]``, shape ``(2 h + 1, 2 h + 1)``; the central pixel
``[h, h]`` is the stamp centre and pixel centres sit at integer offsets. With
``rotation_deg = 0`` +y points north and +x points west (north up, east left).
``rotation_deg`` is the position angle of the array's +y axis, east of north (the
``rot_deg`` of ``truth/frames.parquet``); the array's +x axis is then at position angle
``rotation_deg - 90`` (still "west" of +y). A galaxy's ``pa_deg`` is the position angle of
its major axis, east of north, so in array coordinates its major axis points along
``(x, y) = (-sin(pa - rot), cos(pa - rot))``.

Profiles
--------
Sérsic: ``I(R) = I0 exp(-b_n (R / r_e)^(1/n))`` with the elliptical radius
``R = sqrt(u² + (v / q)²)`` (``u`` along the major axis), so ``r_eff_px`` is the
half-light **semi-major axis**; ``b_n = gammaincinv(2n, 1/2)``; total flux
``2 π q n r_e² I0 Γ(2n) / b_n^(2n)``.
Moffat: ``M(r) = (β - 1) / (π α²) (1 + r²/α²)^(-β)`` (unit integral), α in pixels,
``FWHM = 2 α sqrt(2^(1/β) - 1)``.

Numerics
--------
* The fine grid (spacing d = 1/oversample px) is centred on the galaxy: the galaxy
  centre is a fine sample, so the Sérsic cusp is sampled symmetrically (centroid exact).
  The offset between that grid and the pixel-aligned one is applied as a Fourier phase
  in the FFT that convolves with the PSF (accurate: the convolved image is well sampled
  at d).
* Cusp split. ``S = S·w + S·(1 − w)`` with the smooth window
  ``w = exp(−(ρ/ρ_w)⁴)``, ρ_w = 2 d. The smooth part ``S·(1 − w)`` is point-sampled,
  ``S(u_j) d²``: a lattice sum of a smooth function against the smooth PSF kernel is
  accurate to high order (much better than cell-integrated values, whose extra box
  smoothing of width d costs ≈ 0.3 % at the peak for o = 3). The compact, cuspy part
  ``S·w`` gets lattice weights on the 11 × 11 fine cells around the centre with its
  exact total light and second moments (xx, yy, xy), integrated on 9 × 9 sub-samples per
  cell with the central sub-cell (the cusp) given the analytic light inside the ellipse
  of equal area. In the point-like limit (``r_eff`` → 0) all the light is in that
  central weight, so the stamp becomes the pixel-integrated Moffat PSF at (fx, fy).
* The sampled light is rescaled so that its total equals the analytic Sérsic light
  inside the grid (rings of elliptical radius carry their ``gammainc`` light; the part of
  each ring inside the box is counted on 256 angles). The factor is 1 ± 10⁻³ for
  resolved galaxies and fixes the flux of galaxies thinner than a fine cell.
* The PSF kernel is the Moffat integrated over fine cells (5 × 5 sub-samples each),
  truncated at the radius holding all but ``_PSF_WING_TOL`` = 0.2 % of its light (at most
  64 pixels; ≈ 6.3 px for α = 1.37 px, β = 3).
* Caches (per process, LRU): the kernel and its FFT per (α, β, oversample, size); the
  FFT of each galaxy's light per (r_eff, n, q, pa − rotation, oversample, size), so the
  same galaxy drawn in further frames at other sub-pixel positions costs only the
  inverse FFT. FFTs run in single precision.
* Accuracy at oversample = 3 (tests, and against oversample = 21 and photon shooting):
  pixel values within ≈ 0.1 % of the peak for resolved or round galaxies, ≈ 0.5 % for
  galaxies thinner than a fine cell; flux in the stamp within 0.1 %.

Truncation
----------
Light is lost from the stamp only where it really falls outside it, with two small
exceptions: Sérsic light more than ``P`` pixels outside the stamp (``P`` the PSF kernel
radius) is not followed, and PSF wings beyond ``P`` are dropped (≤ 0.2 % of the light of a
source, and only the part of it that would have landed inside the stamp). Use
:func:`galaxy_half_size` for a stamp holding ≥ 99 % of the light.

Everything runs on the CPU with NumPy/SciPy (the simulator is host code).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
from scipy.special import gammainc, gammaincinv

from gpu2mass.errors import ConfigError

__all__ = [
    "galaxy_half_size",
    "moffat_alpha_from_fwhm",
    "moffat_enclosed_fraction",
    "moffat_fwhm",
    "render_galaxy",
    "sersic_b",
    "sersic_enclosed_fraction",
]

#: Fraction of the PSF light allowed beyond the convolution kernel's radius.
_PSF_WING_TOL = 2e-3
#: Half-width (in fine cells) of the sub-sampled block around the galaxy centre.
_CORE_CELLS = 5
#: Scale of the cusp window exp(-(ρ/ρw)^4), in fine cells.
_WINDOW_CELLS = 2.0
#: Sub-samples per axis of each fine cell of that block (odd: one sits on the centre).
_CORE_SUB = 9
#: Sub-samples per axis when integrating the Moffat over a fine cell.
_KERNEL_SUB = 5
#: Largest PSF kernel radius (pixels), reached only for β close to 1.
_MAX_PSF_RADIUS = 64
#: Largest stamp half size accepted (pixels).
MAX_HALF_SIZE = 256


def sersic_b(n: float) -> float:
    """The Sérsic ``b_n`` for which ``r_e`` encloses half the light: ``gammaincinv(2n, 0.5)``."""
    return float(gammaincinv(2.0 * n, 0.5))


def sersic_enclosed_fraction(x, n: float):
    """Fraction of a Sérsic profile's light inside elliptical radius ``x = R / r_e``."""
    b = sersic_b(n)
    return gammainc(2.0 * n, b * np.power(np.asarray(x, dtype=float), 1.0 / n))


def moffat_alpha_from_fwhm(fwhm, beta: float):
    """Moffat α (same unit as ``fwhm``) for a given FWHM and β."""
    return np.asarray(fwhm) / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat_fwhm(alpha, beta: float):
    """FWHM of a Moffat profile of width α (same unit)."""
    return 2.0 * np.asarray(alpha) * np.sqrt(2.0 ** (1.0 / beta) - 1.0)


def moffat_enclosed_fraction(r, alpha: float, beta: float):
    """Fraction of a Moffat profile's light inside radius ``r``: ``1 - (1 + r²/α²)^(1-β)``."""
    r = np.asarray(r, dtype=float)
    return 1.0 - np.power(1.0 + (r / alpha) ** 2, 1.0 - beta)


def _moffat_radius(fraction_outside: float, alpha: float, beta: float) -> float:
    """Radius outside which a Moffat holds ``fraction_outside`` of its light."""
    return alpha * math.sqrt(fraction_outside ** (1.0 / (1.0 - beta)) - 1.0)


def galaxy_half_size(
    r_eff_px,
    sersic_n,
    *,
    psf_alpha_px: float = 1.4,
    psf_beta: float = 3.0,
    fraction: float = 0.99,
    minimum: int = 4,
    cap: int = 64,
):
    """Stamp half size (pixels) that holds at least ``fraction`` of a galaxy's light.

    Combines in quadrature the radius enclosing ``fraction`` of the Sérsic light (along the
    major axis, so also valid for flattened galaxies) and of the Moffat PSF; the square
    stamp of that half size holds more than the circle, and a test checks ≥ 99 % with
    :func:`render_galaxy` for ``0.5 ≤ n ≤ 4``. The result is clipped to
    ``[minimum, cap]``: a de Vaucouleurs (n = 4) profile needs ≈ 19 r_e for 99 %, so large
    spheroids hit the cap (64 px by default) and lose a little more light.

    Parameters
    ----------
    r_eff_px, sersic_n
        Half-light semi-major axis (pixels) and Sérsic index; scalars or arrays
        (broadcast).
    psf_alpha_px, psf_beta
        Moffat PSF (defaults: FWHM ≈ 1.43 px ≈ 2.9", a typical 2MASS PSF as sampled).
    fraction
        Fraction of the light to hold, in (0, 1).

    Returns
    -------
    int or numpy.ndarray of int
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction}")
    r_eff = np.asarray(r_eff_px, dtype=float)
    n = np.asarray(sersic_n, dtype=float)
    b = gammaincinv(2.0 * n, 0.5)
    r_gal = r_eff * np.power(gammaincinv(2.0 * n, fraction) / b, n)
    r_psf = _moffat_radius(1.0 - fraction, psf_alpha_px, psf_beta)
    h = np.ceil(np.hypot(r_gal, r_psf) + 0.5)
    h = np.clip(h, minimum, cap).astype(np.int64)
    return int(h) if h.ndim == 0 else h


# The PSF changes every frame and a frame holds ~20 galaxies of different stamp sizes:
# the caches hold a few frames' worth so that every galaxy of a frame reuses them.
@functools.lru_cache(maxsize=256)
def _kernel(alpha: float, beta: float, oversample: int, pk: int) -> np.ndarray:
    """Moffat integrated over fine cells at offsets ``-pk … pk`` (``_KERNEL_SUB``² samples)."""
    d = 1.0 / oversample
    sub = (np.arange(_KERNEL_SUB) + 0.5) / _KERNEL_SUB - 0.5
    pos = (np.arange(-pk, pk + 1)[:, None] * d + sub[None, :] * d).ravel()
    r2 = pos[:, None] ** 2 + pos[None, :] ** 2
    vals = (beta - 1.0) / (math.pi * alpha**2) * np.power(1.0 + r2 / alpha**2, -beta)
    m = 2 * pk + 1
    kern = vals.reshape(m, _KERNEL_SUB, m, _KERNEL_SUB).mean(axis=(1, 3)) * d * d
    kern.flags.writeable = False
    return kern


@functools.lru_cache(maxsize=256)
def _kernel_fft(alpha: float, beta: float, oversample: int, pk: int, length: int):
    """rfft2 (complex64) of :func:`_kernel`, centre at index 0, padded to ``length``²."""
    padded = np.zeros((length, length), dtype=np.float32)
    idx = np.arange(-pk, pk + 1) % length
    padded[np.ix_(idx, idx)] = _kernel(alpha, beta, oversample, pk)
    spec = scipy.fft.rfft2(padded)
    spec.flags.writeable = False
    return spec


def _fraction_in_box(lo_x, hi_x, lo_y, hi_y, r_e, n, q, ex, ey):
    """Fraction of an elliptical Sérsic's light inside a box (galaxy-centred coordinates).

    Rings of the elliptical radius carry their analytic light; the fraction of each ring
    inside the box is its share of 256 equally spaced eccentric-anomaly samples (the
    light of a thin elliptical ring is uniform in that angle). Rings fully inside the box
    (radius below the inscribed ellipse) are counted exactly.
    """
    b = sersic_b(n)
    # Largest R for which the ellipse is inside the box: half-extents of the ellipse.
    ext_x = np.hypot(ex, q * ey)  # |x| extent per unit R: major along (ex, ey)
    ext_y = np.hypot(ey, q * ex)
    r_in = min(-lo_x / ext_x, hi_x / ext_x, -lo_y / ext_y, hi_y / ext_y)
    f_in = float(gammainc(2 * n, b * (r_in / r_e) ** (1.0 / n)))
    if f_in > 1.0 - 1e-9:
        return f_in
    # Beyond r_in: geometric rings up to where the remaining light is negligible or the
    # whole ellipse is outside the box.
    r_out_light = r_e * (gammaincinv(2 * n, 1.0 - 1e-7) / b) ** n
    r_far = math.hypot(max(-lo_x, hi_x), max(-lo_y, hi_y)) / q * 1.01
    r_max = min(r_out_light, r_far)
    if r_max <= r_in:
        return f_in
    edges = np.geomspace(r_in, r_max, 97)
    cum = gammainc(2 * n, b * (edges / r_e) ** (1.0 / n))
    ring_light = np.diff(cum)
    rmid = np.sqrt(edges[:-1] * edges[1:])
    phi = (np.arange(256) + 0.5) * (2 * np.pi / 256)
    cu, sv = np.cos(phi), q * np.sin(phi)
    px = rmid[:, None] * (cu * ex - sv * ey)[None, :]
    py = rmid[:, None] * (cu * ey + sv * ex)[None, :]
    inside = (px >= lo_x) & (px <= hi_x) & (py >= lo_y) & (py <= hi_y)
    return f_in + float(np.sum(ring_light * inside.mean(axis=1)))


def _sersic_profile(px, py, r_e, n, q, ex, ey, b):
    """Unnormalised Sérsic ``exp(-b (R/r_e)^(1/n))`` at array offsets (broadcast)."""
    u = px * ex + py * ey
    v = (py * ex - px * ey) * (1.0 / q)
    z = (u * u + v * v) * (1.0 / (r_e * r_e))
    if n == 1.0:
        t = np.sqrt(z)
    elif n == 0.5:
        t = z
    elif n == 2.0:
        t = np.sqrt(np.sqrt(z))
    elif n == 4.0:
        t = np.sqrt(np.sqrt(np.sqrt(z)))
    else:
        t = np.power(z, 0.5 / n)
    t *= -b
    return np.exp(t, out=t)


def _cusp_weights(r_e, n, q, ex, ey, b, d):
    """Lattice weights (2c+1, 2c+1) for the windowed cusp ``S·w`` (unit total flux).

    The weights are the point samples of ``S·w`` corrected on the central 3 × 3 so that
    their total light and second moments (xx, yy, xy) equal those of ``S·w``, which
    are integrated on cells sub-sampled ``_CORE_SUB``² times, the central sub-cell
    (holding the cusp) taking the analytic light inside the ellipse of equal area.
    Odd moments vanish by symmetry (the grid is centred on the galaxy).
    """
    c = _CORE_CELLS
    s = _CORE_SUB
    rho_w = _WINDOW_CELLS * d
    norm = 1.0 / (2.0 * math.pi * q * n * r_e**2 * math.gamma(2.0 * n) / b ** (2.0 * n))
    cells = np.arange(-c, c + 1) * d
    sub = ((np.arange(s) + 0.5) / s - 0.5) * d
    pos = (cells[:, None] + sub[None, :]).ravel()
    r2 = (pos * pos)[None, :] + (pos * pos)[:, None]
    fine = _sersic_profile(pos[None, :], pos[:, None], r_e, n, q, ex, ey, b)
    fine *= np.exp(-((r2 / rho_w**2) ** 2))
    centre = s * c + s // 2
    fine[centre, centre] = 0.0
    fine *= norm * (d / s) ** 2
    r_in = (d / s) / math.sqrt(math.pi * q)
    core = float(gammainc(2.0 * n, b * (r_in / r_e) ** (1.0 / n)))
    total = float(fine.sum()) + core
    qxx = float(np.sum(fine * (pos * pos)[None, :]))
    qyy = float(np.sum(fine * (pos * pos)[:, None]))
    qxy = float(np.sum(fine * pos[None, :] * pos[:, None]))

    c2 = (cells * cells)[None, :] + (cells * cells)[:, None]
    w = _sersic_profile(cells[None, :], cells[:, None], r_e, n, q, ex, ey, b)
    w *= np.exp(-((c2 / rho_w**2) ** 2)) * (norm * d * d)
    w[c, c] = 0.0  # the cusp sample itself becomes the remainder below
    pxx = float(np.sum(w * (cells * cells)[None, :]))
    pyy = float(np.sum(w * (cells * cells)[:, None]))
    pxy = float(np.sum(w * cells[None, :] * cells[:, None]))
    a = (qxx - pxx) / (2 * d * d)
    e = (qyy - pyy) / (2 * d * d)
    g = (qxy - pxy) / (4 * d * d)
    w[c, c - 1] += a
    w[c, c + 1] += a
    w[c - 1, c] += e
    w[c + 1, c] += e
    w[c + 1, c + 1] += g
    w[c - 1, c - 1] += g
    w[c + 1, c - 1] -= g
    w[c - 1, c + 1] -= g
    w[c, c] += total - float(w.sum())
    return w


@functools.lru_cache(maxsize=128)
def _galaxy_spectrum(
    r_e: float, n: float, q: float, phi: float, oversample: int, kh: int, length: int
):
    """rfft2 (complex64, ``length``²) of the unit-flux Sérsic light on a galaxy-centred grid.

    The grid has ``2 kh + 1`` fine samples per axis, the galaxy centre at index ``kh``
    (placed at index 0 of the FFT array, so that a phase shift moves it anywhere).
    Light of cell ``j`` is ``S·(1 - w)`` point-sampled plus the cusp weights, rescaled to
    the analytic light inside the grid. Cached: the same galaxy is drawn in several
    frames at different sub-pixel positions.
    """
    d = 1.0 / oversample
    ex, ey = -math.sin(phi), math.cos(phi)
    b = sersic_b(n)
    norm = 1.0 / (2.0 * math.pi * q * n * r_e**2 * math.gamma(2.0 * n) / b ** (2.0 * n))
    off = (np.arange(-kh, kh + 1) * d).astype(np.float32)
    light = _sersic_profile(
        off[None, :],
        off[:, None],
        np.float32(r_e),
        n,
        np.float32(q),
        np.float32(ex),
        np.float32(ey),
        np.float32(b),
    )
    rho_w = _WINDOW_CELLS * d
    o2 = off * off / np.float32(rho_w * rho_w)
    light *= -np.expm1(-np.square(o2[None, :] + o2[:, None]))
    light *= np.float32(norm * d * d)
    c = _CORE_CELLS
    light[kh - c : kh + c + 1, kh - c : kh + c + 1] += _cusp_weights(r_e, n, q, ex, ey, b, d)
    half = (kh + 0.5) * d
    expected = _fraction_in_box(-half, half, -half, half, r_e, n, q, ex, ey)
    sampled = float(light.sum(dtype=np.float64))
    if sampled > 0.0 and expected > 0.0:
        light *= np.float32(expected / sampled)
    padded = np.zeros((length, length), dtype=np.float32)
    idx = np.arange(-kh, kh + 1) % length
    padded[np.ix_(idx, idx)] = light
    spec = scipy.fft.rfft2(padded)
    spec.flags.writeable = False
    return spec


def render_galaxy(
    flux: float,
    r_eff_px: float,
    sersic_n: float,
    axis_ratio: float,
    pa_deg: float,
    fx: float,
    fy: float,
    psf_alpha_px: float,
    psf_beta: float,
    *,
    half_size: int,
    rotation_deg: float = 0.0,
    oversample: int = 3,
) -> np.ndarray:
    """Pixel-integrated stamp of a Sérsic galaxy convolved with a Moffat PSF.

    Parameters
    ----------
    flux
        Total flux of the galaxy (any unit; the stamp is in the same unit per pixel).
    r_eff_px
        Half-light semi-major axis in pixels (> 0; tiny values give the PSF).
    sersic_n
        Sérsic index, 0.3 ≤ n ≤ 8.
    axis_ratio
        Minor/major axis ratio q, 0.05 ≤ q ≤ 1.
    pa_deg
        Position angle of the major axis on the sky, degrees east of north.
    fx, fy
        Galaxy centre minus the centre of the stamp's central pixel, pixels, in
        [-0.5, 0.5] (other values work as long as the galaxy stays inside the stamp).
    psf_alpha_px, psf_beta
        Moffat PSF width α (pixels) and β (> 1).
    half_size
        Stamp half size ``h``: the stamp is ``(2h + 1, 2h + 1)``.
    rotation_deg
        Position angle of the array's +y axis, degrees east of north (0: +y north,
        +x west).
    oversample
        Fine cells per pixel and axis (≥ 1; 3 is accurate to a few 0.1 % per pixel for
        the 2MASS PSF of ≈ 1.4 px FWHM).

    Returns
    -------
    numpy.ndarray
        float32, shape ``(2h + 1, 2h + 1)``, indexed ``[y, x]``; sums to ``flux`` times
        the fraction of the convolved light inside the stamp (not renormalised).
    """
    h = int(half_size)
    o = int(oversample)
    if not 0 <= h <= MAX_HALF_SIZE:
        raise ConfigError(f"half_size must be in [0, {MAX_HALF_SIZE}], got {half_size}")
    if o < 1:
        raise ConfigError(f"oversample must be ≥ 1, got {oversample}")
    if not r_eff_px > 0.0:
        raise ConfigError(f"r_eff_px must be > 0, got {r_eff_px}")
    if not 0.3 <= sersic_n <= 8.0:
        raise ConfigError(f"sersic_n must be in [0.3, 8], got {sersic_n}")
    if not 0.05 <= axis_ratio <= 1.0:
        raise ConfigError(f"axis_ratio must be in [0.05, 1], got {axis_ratio}")
    if not (psf_alpha_px > 0.0 and psf_beta > 1.0):
        raise ConfigError(f"need psf_alpha_px > 0 and psf_beta > 1, got {psf_alpha_px}, {psf_beta}")
    if not (np.isfinite(fx) and np.isfinite(fy) and np.isfinite(flux)):
        raise ConfigError("flux, fx and fy must be finite")

    n = float(sersic_n)
    q = float(axis_ratio)
    r_e = float(r_eff_px)
    alpha = float(psf_alpha_px)
    beta = float(psf_beta)
    d = 1.0 / o

    # PSF kernel radius P (pixels); the galaxy grid must reach P pixels beyond the stamp.
    p_px = math.ceil(min(_moffat_radius(_PSF_WING_TOL, alpha, beta), _MAX_PSF_RADIUS))
    pk = p_px * o
    n_stamp = o * (2 * h + 1)
    reach = max(0.5, abs(fx), abs(fy))
    kh = o * (h + p_px + math.ceil(reach)) + o
    length = scipy.fft.next_fast_len(2 * kh + 1 + 2 * pk + 2 * o, real=True)
    phi = math.radians((pa_deg - rotation_deg) % 360.0)

    spec = _galaxy_spectrum(r_e, n, q, phi, o, kh, length) * _kernel_fft(alpha, beta, o, pk, length)
    # The galaxy sits at index 0 of the periodic array; the stamp's first fine centre is
    # at galaxy-relative offset -(h + 0.5) + d/2 - f, i.e. at index a = that / d. Shift
    # left by a (a phase), then read indices 0 … n_stamp - 1.
    ax = (-(h + 0.5) + 0.5 * d - fx) / d
    ay = (-(h + 0.5) + 0.5 * d - fy) / d
    spec *= np.exp((2j * np.pi * ay) * scipy.fft.fftfreq(length)).astype(np.complex64)[:, None]
    spec *= np.exp((2j * np.pi * ax) * scipy.fft.rfftfreq(length)).astype(np.complex64)[None, :]
    conv = scipy.fft.irfft2(spec, s=(length, length))
    fine = conv[:n_stamp, :n_stamp]
    stamp = fine.reshape(2 * h + 1, o, 2 * h + 1, o).sum(axis=(1, 3), dtype=np.float64)
    return (stamp * flux).astype(np.float32)
