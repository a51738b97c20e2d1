"""Slow, straightforward NumPy versions of the Moffat stamp renderer and scatter-add.

The fast paths (:mod:`gpu2mass.kernels.cpu.psf`, :mod:`gpu2mass.kernels.cuda.psf`) are
pinned to these by the tests. They share nothing with the fast paths but the rule's
definition (orders and radii from :mod:`gpu2mass.kernels.scalar.moffat`): the Gauss-Legendre
nodes come from :func:`numpy.polynomial.legendre.leggauss` here, powers from NumPy. Also
here: a brute-force pixel integral to measure the quadrature's accuracy against.

Host only (NumPy arrays in, NumPy arrays out).
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels.scalar.moffat import (
    GL_ORDER_FAR,
    GL_ORDER_MID,
    GL_ORDER_NEAR,
    GL_RADIUS_MID,
    GL_RADIUS_NEAR,
)

__all__ = [
    "add_stamps",
    "moffat_density",
    "moffat_pixel_integral",
    "moffat_pixel_integral_bruteforce",
    "render_psf_stamps",
]


def moffat_density(dx, dy, alpha, beta) -> np.ndarray:
    """Unit-flux Moffat surface density (px^-2) at offsets (dx, dy) px; broadcasts."""
    dx, dy, alpha, beta = (np.asarray(v, dtype=np.float64) for v in (dx, dy, alpha, beta))
    return (beta - 1.0) / (np.pi * alpha**2) * (1.0 + (dx**2 + dy**2) / alpha**2) ** (-beta)


def _gl_square(cx, cy, alpha, beta, n: int, half_width: float) -> np.ndarray:
    """n x n Gauss-Legendre integral of the density over squares of side 2*half_width."""
    t, w = np.polynomial.legendre.leggauss(n)
    x = cx[..., None, None] + half_width * t[None, :]
    y = cy[..., None, None] + half_width * t[:, None]
    f = moffat_density(x, y, alpha[..., None, None], beta[..., None, None])
    return half_width**2 * np.einsum("...ji,j,i->...", f, w, w)


def moffat_pixel_integral(cx, cy, alpha, beta) -> np.ndarray:
    """Fraction of a unit-flux Moffat's light in the pixel centred at (cx, cy) px from it.

    The same rule as :func:`gpu2mass.kernels.scalar.moffat.moffat_pixel_integral` (order by
    distance, n x n Gauss-Legendre), vectorized over broadcast array arguments.
    """
    cx, cy, alpha, beta = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (cx, cy, alpha, beta))
    )
    d2 = cx * cx + cy * cy
    order = np.where(
        d2 < GL_RADIUS_NEAR**2,
        GL_ORDER_NEAR,
        np.where(d2 < GL_RADIUS_MID**2, GL_ORDER_MID, GL_ORDER_FAR),
    )
    out = np.empty(cx.shape)
    for n in (GL_ORDER_NEAR, GL_ORDER_MID, GL_ORDER_FAR):
        sel = order == n
        out[sel] = _gl_square(cx[sel], cy[sel], alpha[sel], beta[sel], n, 0.5)
    return out


def moffat_pixel_integral_bruteforce(cx, cy, alpha, beta, *, subsamples: int = 64) -> np.ndarray:
    """The same pixel integral by brute force: the pixel cut into subsamples x subsamples.

    Each sub-square is integrated with a 2 x 2 Gauss rule (plain midpoint sampling at 64 x 64
    is itself only good to 1e-4 of the flux for alpha = 0.5 px, no better than the rule it
    should check; with 2 x 2 nodes per sub-square the error is below 1e-8 of the flux, which
    64 -> 128 refinement confirms). Broadcasts; costs 4 * subsamples**2 evaluations per pixel.
    """
    cx, cy, alpha, beta = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (cx, cy, alpha, beta))
    )
    s = int(subsamples)
    sub = (np.arange(s) + 0.5) / s - 0.5  # sub-square centres along an axis, in pixels
    cx_sub = cx[..., None] + sub
    total = np.zeros(cx.shape)
    for oy in sub:  # one row of sub-squares at a time bounds the memory
        cy_sub = np.broadcast_to((cy + oy)[..., None], cx_sub.shape)
        rows = _gl_square(cx_sub, cy_sub, alpha[..., None], beta[..., None], 2, 0.5 / s)
        total += rows.sum(axis=-1)
    return total


def render_psf_stamps(fx, fy, flux, alpha, beta, *, half_size: int) -> np.ndarray:
    """Reference of :func:`gpu2mass.kernels.render_psf_stamps`; float32 (N, 2h+1, 2h+1).

    ``fx, fy, flux, alpha, beta`` are (N,) arrays (or scalars for the last three);
    ``stamps[k, a, b] = flux[k] * integral over the pixel (y = a - h, x = b - h)``.
    Computed in float64, rounded once to float32.
    """
    h = int(half_size)
    fx = np.asarray(fx, dtype=np.float64)
    fy = np.asarray(fy, dtype=np.float64)
    n_src = fx.shape[0]
    flux, alpha, beta = (
        np.broadcast_to(np.asarray(v, dtype=np.float64), (n_src,)) for v in (flux, alpha, beta)
    )
    offsets = np.arange(-h, h + 1, dtype=np.float64)
    cx = offsets[None, None, :] - fx[:, None, None]
    cy = offsets[None, :, None] - fy[:, None, None]
    shape = (n_src, 2 * h + 1, 2 * h + 1)
    frac = moffat_pixel_integral(
        np.broadcast_to(cx, shape),
        np.broadcast_to(cy, shape),
        np.broadcast_to(alpha[:, None, None], shape),
        np.broadcast_to(beta[:, None, None], shape),
    )
    return (flux[:, None, None] * frac).astype(np.float32)


def add_stamps(image: np.ndarray, stamps: np.ndarray, x0, y0) -> None:
    """Reference of :func:`gpu2mass.kernels.add_stamps`: in place, stamp by stamp, clipped.

    Adds in float32, one stamp after the other in order, like the CPU driver.
    """
    ny, nx = image.shape
    _, sy, sx = stamps.shape
    for k in range(stamps.shape[0]):
        xa, ya = int(x0[k]), int(y0[k])
        ix0, ix1 = max(xa, 0), min(xa + sx, nx)
        iy0, iy1 = max(ya, 0), min(ya + sy, ny)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        image[iy0:iy1, ix0:ix1] += stamps[k, iy0 - ya : iy1 - ya, ix0 - xa : ix1 - xa]
