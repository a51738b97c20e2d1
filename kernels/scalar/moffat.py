"""The Moffat point-spread function and its pixel integral, as scalar functions.

Surface density, normalized to unit integral over the plane (alpha in pixels, beta > 1)::

    I(r) = (beta - 1) / (pi alpha^2) * (1 + r^2 / alpha^2) ** (-beta)

A pixel's value is the integral of I over the unit square centred on the pixel centre,
evaluated with an n x n Gauss-Legendre product rule whose order n depends on the distance
d from the source centre to the pixel centre (the integrand is steep near the core and
smooth in the wings)::

    n = GL_ORDER_NEAR (8)  if d < GL_RADIUS_NEAR (2.5 px)
    n = GL_ORDER_MID  (4)  if d < GL_RADIUS_MID  (5 px)
    n = GL_ORDER_FAR  (2)  otherwise

(the comparisons are made on d^2 against the squared radii, in float64, identically in
every implementation, so all of them pick the same rule for the same pixel).

Accuracy of the rule, measured against a brute-force 64 x 64 sub-sampled integral (each
sub-square by a 2 x 2 Gauss rule, ``reference.psf.moffat_pixel_integral_bruteforce``) for
alpha in [0.5, 3] px and beta in [2, 5] (``tests/test_kernels_psf.py`` holds the first two
bullets and the stamp sums to these bounds):

- largest error of one pixel, as a fraction of the source flux: 4.0e-4 at alpha = 0.5 px,
  5.3e-5 at 0.6, 3.2e-6 at 0.75, 3e-7 for alpha >= 1. The worst pixel is the central one,
  for beta = 5 and the source centred on it: 8 x 8 nodes cannot resolve a core narrower
  than about half a pixel (FWHM 0.38 px at alpha = 0.5, beta = 5). For alpha >= 1 the
  worst pixels are the 4 x 4 and 2 x 2 ones just beyond 2.5 and 5 px.
- relative error of pixels holding more than 1e-3 of the flux: below 4.3e-4 at alpha = 0.5,
  below 2.3e-4 for alpha >= 0.6 (broad profiles, 2 x 2 rule just beyond 5 px); of pixels
  holding more than 1e-6 of the flux: below 3.2e-3 (far wings, 2 x 2 rule).
- sum of a 17 x 17 stamp against the integral over its square: 4.0e-4 at alpha = 0.5,
  5.3e-5 at 0.6, below 7e-6 for alpha >= 0.75.

The rules are tabulated once, at import, in :data:`PIXEL_RULE_DX`, :data:`PIXEL_RULE_DY`
and :data:`PIXEL_RULE_W` (read-only float64 arrays of shape (9, 64), row ``n`` holding the
n*n nodes of the n-point rule, flattened row-major, the rest zero); kernels receive them as
arguments (CPU) or as constant memory (CUDA), never rebuild them.
"""

from __future__ import annotations

import math

import numpy as np
from gpu2mass.kernels._targets import scalar
from gpu2mass.kernels.scalar.elementary import pow_positive

__all__ = [
    "GL_ORDER_FAR",
    "GL_ORDER_MID",
    "GL_ORDER_NEAR",
    "GL_RADIUS_MID",
    "GL_RADIUS_NEAR",
    "PIXEL_RULE_DX",
    "PIXEL_RULE_DY",
    "PIXEL_RULE_W",
    "moffat_density",
    "moffat_normalization",
    "moffat_pixel_integral",
    "moffat_profile",
    "moffat_quadrature_order",
    "pixel_rules",
]

#: Gauss-Legendre order per axis for pixels whose centre is nearer than GL_RADIUS_NEAR.
GL_ORDER_NEAR = 8
#: Order for pixels at GL_RADIUS_NEAR <= d < GL_RADIUS_MID.
GL_ORDER_MID = 4
#: Order for pixels at d >= GL_RADIUS_MID.
GL_ORDER_FAR = 2
#: Distance (pixels) from the source centre to a pixel centre below which GL_ORDER_NEAR is used.
GL_RADIUS_NEAR = 2.5
#: Distance (pixels) below which GL_ORDER_MID is used (beyond it, GL_ORDER_FAR).
GL_RADIUS_MID = 5.0

_R2_NEAR = GL_RADIUS_NEAR * GL_RADIUS_NEAR
_R2_MID = GL_RADIUS_MID * GL_RADIUS_MID
_MAX_ORDER = max(GL_ORDER_NEAR, GL_ORDER_MID, GL_ORDER_FAR)


def pixel_rules() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tabulate the product Gauss-Legendre rules over a unit pixel.

    Returns
    -------
    dx, dy, w
        float64 arrays of shape (_MAX_ORDER + 1, _MAX_ORDER**2). For each order n used by
        the Moffat pixel integral, ``dx[n, m]``, ``dy[n, m]`` (pixels, relative to the pixel
        centre, in [-0.5, 0.5]) and ``w[n, m]`` (summing to 1, the pixel area) for
        m < n*n, node m = j*n + i at (x_i, y_j). Other entries are zero.
    """
    size = _MAX_ORDER + 1
    dx = np.zeros((size, _MAX_ORDER**2))
    dy = np.zeros_like(dx)
    w = np.zeros_like(dx)
    for n in (GL_ORDER_NEAR, GL_ORDER_MID, GL_ORDER_FAR):
        t, wt = np.polynomial.legendre.leggauss(n)  # nodes and weights on [-1, 1]
        dx[n, : n * n] = np.tile(0.5 * t, n)
        dy[n, : n * n] = np.repeat(0.5 * t, n)
        w[n, : n * n] = np.outer(0.25 * wt, wt).ravel()  # [-1,1]^2 -> unit square: 1/4
    for a in (dx, dy, w):
        a.flags.writeable = False
    return dx, dy, w


PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W = pixel_rules()


@scalar
def moffat_normalization(alpha, beta):
    """(beta - 1) / (pi alpha^2): the central surface density of a unit-flux Moffat (px^-2)."""
    return (beta - 1.0) / (math.pi * alpha * alpha)


@scalar
def moffat_profile(r2, inv_alpha2, neg_beta):
    """The unnormalized Moffat profile (1 + r2 / alpha^2) ** (-beta).

    Takes ``r2`` (px^2), ``inv_alpha2 = 1 / alpha^2`` (px^-2) and ``neg_beta = -beta`` so that
    callers evaluating many nodes of one source compute them once.
    """
    return pow_positive(1.0 + r2 * inv_alpha2, neg_beta)


@scalar
def moffat_density(dx, dy, alpha, beta):
    """Surface density (px^-2) of a unit-flux Moffat at offset (dx, dy) px from its centre."""
    return moffat_normalization(alpha, beta) * moffat_profile(
        dx * dx + dy * dy, 1.0 / (alpha * alpha), -beta
    )


@scalar
def moffat_quadrature_order(cx, cy):
    """Gauss-Legendre order per axis for a pixel centred at (cx, cy) px from the source."""
    d2 = cx * cx + cy * cy
    if d2 < _R2_NEAR:
        return GL_ORDER_NEAR
    if d2 < _R2_MID:
        return GL_ORDER_MID
    return GL_ORDER_FAR


@scalar
def moffat_pixel_integral(cx, cy, alpha, beta, rule_dx, rule_dy, rule_w):
    """Fraction of a unit-flux Moffat's light that falls in one pixel.

    Parameters
    ----------
    cx, cy
        The pixel centre minus the source centre, in pixels (x along a row, y down columns).
    alpha, beta
        Moffat width (px, > 0) and index (> 1).
    rule_dx, rule_dy, rule_w
        :data:`PIXEL_RULE_DX`, :data:`PIXEL_RULE_DY`, :data:`PIXEL_RULE_W`.

    Returns
    -------
    float
        The integral of the unit-flux density over [cx-0.5, cx+0.5] x [cy-0.5, cy+0.5]
        (dimensionless), by the n x n rule that :func:`moffat_quadrature_order` picks.
    """
    n = moffat_quadrature_order(cx, cy)
    inv_alpha2 = 1.0 / (alpha * alpha)
    neg_beta = -beta
    total = 0.0
    for m in range(n * n):
        x = cx + rule_dx[n, m]
        y = cy + rule_dy[n, m]
        total += rule_w[n, m] * moffat_profile(x * x + y * y, inv_alpha2, neg_beta)
    return moffat_normalization(alpha, beta) * total
