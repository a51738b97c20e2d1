"""CPU loop (Numba, one thread) of the PSF model's pixel-integrated Moffat and its gradient.

The PSF model (:mod:`gpu2mass.psfmodel`) fits Moffat profiles to bright stars on the host
with either device; its inner loop evaluates, for every (star, pixel) pair, the pixel
integral of a unit Moffat by a Gauss-Legendre rule and the integral's derivatives with
respect to the centre, ``alpha`` and ``beta``. Written in NumPy that loop makes six
temporaries per (pair, node); here each pair is one loop over its nodes with the five sums
in registers (the same formulas, summed in the same node order).

One thread on purpose: the PSF fit calls this ~450 times per scan on a few thousand pairs
each, and a ``prange`` region per call cost more than it saved on a busy 2-core machine
(measured: 9 s against NumPy's 5 s with other processes running).
"""

from __future__ import annotations

import math

from gpu2mass.kernels._targets import cpu_kernel

__all__ = ["moffat_pixel_sums"]


@cpu_kernel
def _pixel_sums_kernel(k, p, cx, cy, xc, yc, alpha, beta, rdx, rdy, rw, derivs, out):
    norm = (beta - 1.0) / math.pi
    m = rw.shape[0]
    for i in range(k.shape[0]):
        s = k[i]
        q = p[i]
        a = alpha[s]
        inv_a2 = 1.0 / (a * a)
        bx = cx[i] - xc[s]
        by = cy[i] - yc[s]
        f_sum = 0.0
        gx_sum = 0.0
        gy_sum = 0.0
        ga_sum = 0.0
        gb_sum = 0.0
        for j in range(m):
            x = bx + rdx[j]
            y = by + rdy[j]
            r2 = x * x + y * y
            u = 1.0 + r2 * inv_a2
            lnu = math.log(u)
            f = norm * inv_a2 * math.exp(-beta * lnu) * rw[j]
            f_sum += f
            if derivs:
                g = f * (2.0 * beta * inv_a2 / u)
                gx_sum += g * x
                gy_sum += g * y
                ga_sum += f * (-2.0 / a) + g * r2 / a
                gb_sum += f * (1.0 / (beta - 1.0) - lnu)
        out[0, s, q] = f_sum
        if derivs:
            out[1, s, q] = gx_sum
            out[2, s, q] = gy_sum
            out[3, s, q] = ga_sum
            out[4, s, q] = gb_sum


def moffat_pixel_sums(k, p, cx, cy, xc, yc, alpha, beta, rdx, rdy, rw, derivs, out):
    """Fill ``out[:, k[i], p[i]]`` for every pair ``i`` of one quadrature order.

    Parameters
    ----------
    k, p
        int64 (n,): star index and pixel index of each (star, pixel) pair.
    cx, cy
        float64 (n,): pixel centre of each pair, camera pixels.
    xc, yc, alpha
        float64 (N,): each star's centre (camera pixels) and Moffat core width.
    beta
        Moffat index (> 1), scalar.
    rdx, rdy, rw
        float64 (m,): the rule's node offsets from the pixel centre and weights.
    derivs
        Also fill the derivatives.
    out
        float64 (5, N, S): unit-flux pixel integral, then d/dxc, d/dyc, d/dalpha, d/dbeta
        (rows 1-4 only written when ``derivs``).
    """
    if k.shape[0]:
        _pixel_sums_kernel(k, p, cx, cy, xc, yc, alpha, float(beta), rdx, rdy, rw, bool(derivs), out)
