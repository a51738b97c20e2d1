"""Scalar math of the Atlas resampling kernel: inverse mapping and bilinear interpolation.

One output (Atlas grid) pixel of one frame. The mapping from Atlas grid pixel ``(X, Y)``
(0-based, pixel centres at integers) to frame pixel ``(x, y)`` is a bivariate cubic in the
normalised coordinates ``s = (X − X0)·q``, ``t = (Y − Y0)·q`` fitted per frame (by
:mod:`gpu2mass.atlas`); its coefficients are ``coef[k, axis, term]`` with the terms in the
order of :data:`POLY_TERMS`. ``norm[k] = (X0, Y0, q)``.

The kernel is bilinear interpolation of the frame's surface brightness times the Jacobian of
the mapping (the area of one output pixel in frame pixels), which makes the result
flux-preserving: the bilinear "tent" weights of each input pixel sum to the ratio of the
pixel areas over the output grid, so the output pixels of a source sum to its frame flux.
Masked input pixels are dropped and the remaining weights renormalised; if less than
``min_weight`` of the kernel's weight is left (or the position falls off the array), the
frame does not contribute to that output pixel.
"""

from __future__ import annotations

import math

from gpu2mass.kernels._targets import scalar

__all__ = [
    "POLY_TERMS", "interpolate_bilinear", "poly3", "poly3_ds", "poly3_dt", "resample_pixel"
]

#: Exponents (i, j) of s^i t^j of the cubic, in coefficient order.
POLY_TERMS = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3))


@scalar
def poly3(c, k, a, s, t):
    """Cubic ``coef[k, a, :]`` at (s, t)."""
    s2 = s * s
    t2 = t * t
    return (c[k, a, 0] + c[k, a, 1] * s + c[k, a, 2] * t + c[k, a, 3] * s2 + c[k, a, 4] * s * t
            + c[k, a, 5] * t2 + c[k, a, 6] * s2 * s + c[k, a, 7] * s2 * t + c[k, a, 8] * s * t2
            + c[k, a, 9] * t2 * t)


@scalar
def poly3_ds(c, k, a, s, t):
    """∂/∂s of :func:`poly3`."""
    return (c[k, a, 1] + 2.0 * c[k, a, 3] * s + c[k, a, 4] * t + 3.0 * c[k, a, 6] * s * s
            + 2.0 * c[k, a, 7] * s * t + c[k, a, 8] * t * t)


@scalar
def poly3_dt(c, k, a, s, t):
    """∂/∂t of :func:`poly3`."""
    return (c[k, a, 2] + c[k, a, 4] * s + 2.0 * c[k, a, 5] * t + c[k, a, 7] * s * s
            + 2.0 * c[k, a, 8] * s * t + 3.0 * c[k, a, 9] * t * t)


@scalar
def resample_pixel(gx, gy, k, frames, mask, coef, norm, min_weight):
    """Value and variance factor of frame ``k`` at Atlas grid pixel ``(gx, gy)``.

    Parameters
    ----------
    gx, gy
        Grid pixel coordinates (0-based, float).
    k
        Frame index into ``frames`` (n, ny, nx), ``coef`` (n, 2, 10), ``norm`` (n, 3).
    mask
        uint8 (m, ny, nx), nonzero = bad; ``m`` is 1 (one mask for all frames) or n.
    min_weight
        Least fraction of the bilinear kernel's weight on good pixels for a contribution.

    Returns
    -------
    (value, var_factor)
        ``value``: surface brightness in DN per output pixel (frame DN per frame pixel times
        the Jacobian); ``var_factor``: the output variance in units of the frame's per-pixel
        variance, ``J² Σw²/(Σw)²``. Both NaN when the frame does not contribute.
    """
    q = norm[k, 2]
    s = (gx - norm[k, 0]) * q
    t = (gy - norm[k, 1]) * q
    x = poly3(coef, k, 0, s, t)
    y = poly3(coef, k, 1, s, t)
    jac = abs(poly3_ds(coef, k, 0, s, t) * poly3_dt(coef, k, 1, s, t)
              - poly3_dt(coef, k, 0, s, t) * poly3_ds(coef, k, 1, s, t)) * q * q
    return interpolate_bilinear(x, y, jac, k, frames, mask, min_weight)


@scalar
def interpolate_bilinear(x, y, jac, k, frames, mask, min_weight):
    """The kernel at frame position (x, y) with Jacobian ``jac``: see :func:`resample_pixel`."""
    ny = frames.shape[1]
    nx = frames.shape[2]
    # Written so that NaN coordinates also fail the test.
    if not (x > -1.0 and x < nx and y > -1.0 and y < ny):
        return math.nan, math.nan
    x0 = math.floor(x)
    y0 = math.floor(y)
    fx = x - x0
    fy = y - y0
    ix = int(x0)
    iy = int(y0)
    m = k if mask.shape[0] > 1 else 0
    # Nearly every pixel has its four neighbours on the array and unmasked: the same sums,
    # term by term in the same order as the general loop below, without its branches
    # (1.4x faster resampling, identical values).
    if (ix >= 0 and ix + 1 < nx and iy >= 0 and iy + 1 < ny
            and (mask[m, iy, ix] | mask[m, iy, ix + 1] | mask[m, iy + 1, ix]
                 | mask[m, iy + 1, ix + 1]) == 0):
        gy = 1.0 - fy
        gx = 1.0 - fx
        w00 = gy * gx
        w01 = gy * fx
        w10 = fy * gx
        w11 = fy * fx
        wsum = w00 + w01 + w10 + w11
        w2sum = w00 * w00 + w01 * w01 + w10 * w10 + w11 * w11
        vsum = (w00 * frames[k, iy, ix] + w01 * frames[k, iy, ix + 1]
                + w10 * frames[k, iy + 1, ix] + w11 * frames[k, iy + 1, ix + 1])
        if wsum < min_weight or wsum <= 0.0:
            return math.nan, math.nan
        return jac * vsum / wsum, jac * jac * w2sum / (wsum * wsum)
    wsum = 0.0
    w2sum = 0.0
    vsum = 0.0
    for dy in range(2):
        yy = iy + dy
        if yy < 0 or yy >= ny:
            continue
        wy = fy if dy == 1 else 1.0 - fy
        for dx in range(2):
            xx = ix + dx
            if xx < 0 or xx >= nx or mask[m, yy, xx] != 0:
                continue
            w = wy * (fx if dx == 1 else 1.0 - fx)
            wsum += w
            w2sum += w * w
            vsum += w * frames[k, yy, xx]
    if wsum < min_weight or wsum <= 0.0:
        return math.nan, math.nan
    return jac * vsum / wsum, jac * jac * w2sum / (wsum * wsum)
