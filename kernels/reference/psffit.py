"""NumPy reference of the batched PSF fit (slow: a Python loop over groups; host only).

Written independently of the scalar code: Gauss-Legendre nodes from
:func:`numpy.polynomial.legendre.leggauss`, the model and its analytic Jacobian vectorized
over a group's used pixels with NumPy, the normal equations as ``J.T @ (w J)``, Cholesky
and inverse from :mod:`numpy.linalg`. It follows the schedule of
:mod:`gpu2mass.kernels.scalar.psffit` decision for decision (start, damping factors,
convergence test, position bound, rule orders fixed at the initial positions, frozen
parameters, pivot threshold), so the fast paths can be held to it
at rounding level.
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
from gpu2mass.kernels.scalar.psffit import (
    LAMBDA_MAX,
    LAMBDA_MIN,
    LAMBDA_START,
    MIN_CHI_PIXELS,
    MOVED_FRACTION2,
    PIVOT_RTOL,
    STATUS_MOVED,
    STATUS_NO_DATA,
    STATUS_NONPOSITIVE_FLUX,
    STATUS_NOT_CONVERGED,
    STATUS_SINGULAR,
)

__all__ = ["fit_psf_groups", "moffat_pixel_gradient", "quadrature_order", "render_group_model"]


def _rule(n: int):
    t, w = np.polynomial.legendre.leggauss(n)
    return np.tile(0.5 * t, n), np.repeat(0.5 * t, n), np.outer(0.25 * w, w).ravel()


_RULES = {n: _rule(n) for n in (GL_ORDER_NEAR, GL_ORDER_MID, GL_ORDER_FAR)}


def quadrature_order(cx, cy):
    """Gauss-Legendre order per axis for pixels at (cx, cy) px from a source; (N,) ints."""
    d2 = np.asarray(cx) ** 2 + np.asarray(cy) ** 2
    return np.where(d2 < GL_RADIUS_NEAR**2, GL_ORDER_NEAR,
                    np.where(d2 < GL_RADIUS_MID**2, GL_ORDER_MID, GL_ORDER_FAR))


def moffat_pixel_gradient(cx, cy, alpha, beta, order=None):
    """Pixel-integrated unit Moffat and its derivatives with respect to the source x, y.

    ``cx, cy`` (N,) pixel centre minus source centre (px); ``alpha, beta`` (N,) or scalars;
    ``order`` (N,) the rule's order per pixel (default: by the distance, as the renderer).
    Returns three (N,) arrays: value, d/dX_source, d/dY_source.
    """
    cx, cy, alpha, beta = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (cx, cy, alpha, beta)))
    if order is None:
        order = quadrature_order(cx, cy)
    val, gx, gy = (np.zeros(cx.shape) for _ in range(3))
    for n, (rx, ry, rw) in _RULES.items():
        sel = order == n
        if not sel.any():
            continue
        a = alpha[sel][:, None]
        b = beta[sel][:, None]
        x = cx[sel][:, None] + rx
        y = cy[sel][:, None] + ry
        q = 1.0 + (x * x + y * y) / (a * a)
        p = q ** (-b)
        norm = (b[:, 0] - 1.0) / (np.pi * a[:, 0] ** 2)
        val[sel] = norm * (p @ rw)
        dens = 2.0 * b * p / (q * a * a)  # -d p / d(x_pixel) / x
        gx[sel] = norm * ((dens * x) @ rw)
        gy[sel] = norm * ((dens * y) @ rw)
    return val, gx, gy


def _positions(maps, u, v):
    """Stamp x, y (F, n) of sources at (u, v) (n,) through maps (F, 2, 3)."""
    x = maps[:, 0, 0, None] + maps[:, 0, 1, None] * u + maps[:, 0, 2, None] * v
    y = maps[:, 1, 0, None] + maps[:, 1, 1, None] * u + maps[:, 1, 2, None] * v
    return x, y


def render_group_model(maps, psf, fscale, par, shape, init=None):
    """Noise-free model stamps (F, S_y, S_x) of sources ``par`` (n, 3: flux, u, v) of one
    group: the sum of their pixel-integrated Moffats, as the fit models them when it
    started from ``init`` (n, 3; default ``par``: then exactly what the renderer makes)."""
    nf = maps.shape[0]
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros((nf, *shape))
    x, y = _positions(maps, par[:, 1], par[:, 2])
    x0, y0 = _positions(maps, *(par if init is None else init)[:, 1:].T)
    for f in range(nf):
        for k in range(par.shape[0]):
            order = quadrature_order(xx.ravel() - x0[f, k], yy.ravel() - y0[f, k])
            val, _, _ = moffat_pixel_gradient(xx.ravel() - x[f, k], yy.ravel() - y[f, k],
                                              psf[f, 0], psf[f, 1], order)
            out[f] += fscale[f] * par[k, 0] * val.reshape(shape)
    return out


def _pass(d, w, fi, px, py, maps, psf, fscale, par, orders, chi_r2):
    """chi2, per-source chi2 and pixel counts, b and A at parameters par (n, 3); orders
    (npix, n) the rule of each (pixel, source)."""
    n = par.shape[0]
    npix = d.shape[0]
    jac = np.zeros((npix, 3 * n))
    model = np.zeros(npix)
    near = np.zeros((npix, n), bool)
    x, y = _positions(maps, par[:, 1], par[:, 2])
    m = maps[fi]
    s = fscale[fi]
    for k in range(n):
        cx = px - x[fi, k]
        cy = py - y[fi, k]
        val, gx, gy = moffat_pixel_gradient(cx, cy, psf[fi, 0], psf[fi, 1], orders[:, k])
        model += s * par[k, 0] * val
        jac[:, 3 * k] = s * val
        jac[:, 3 * k + 1] = s * par[k, 0] * (gx * m[:, 0, 1] + gy * m[:, 1, 1])
        jac[:, 3 * k + 2] = s * par[k, 0] * (gx * m[:, 0, 2] + gy * m[:, 1, 2])
        near[:, k] = cx * cx + cy * cy <= chi_r2
    r = d - model
    wr2 = w * r * r
    return (wr2.sum(), (wr2[:, None] * near).sum(0), near.sum(0).astype(np.float64),
            jac.T @ (w * r), jac.T @ (w[:, None] * jac))


def _cholesky(a, lam, held=None):
    """Lower Cholesky factor of the damped, frozen matrix, or None if not positive definite.

    ``held`` (n,) bool: sources whose positions are frozen (held at the bound)."""
    diag = np.diag(a).copy()
    free = _free(a, held)
    m = np.where(free[:, None] & free[None, :], a, 0.0)
    np.fill_diagonal(m, np.where(free, diag * (1.0 + lam), 1.0))
    try:
        chol = np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.diag(chol) ** 2 > PIVOT_RTOL * np.diag(m)):
        return None
    return chol


def _free(a, held):
    free = np.diag(a) > 0
    if held is not None:
        free = free & ~np.repeat(held, 3) | (np.arange(free.size) % 3 == 0) & free
    return free


def _step(a, b, lam, held=None):
    chol = _cholesky(a, lam, held)
    if chol is None:
        return None
    rhs = np.where(_free(a, held), b, 0.0)
    return np.linalg.solve(chol.T, np.linalg.solve(chol, rhs))


def _held(par, init, a, b, max_shift):
    """(n,) bool: sources at the bound whose unconstrained Gauss-Newton step points out."""
    d = par[:, 1:] - init[:, 1:]
    at = (d**2).sum(1) >= max_shift**2 * MOVED_FRACTION2
    if not at.any():
        return at
    step = _step(a, b, 0.0)
    if step is None:
        return at
    return at & ((step.reshape(-1, 3)[:, 1:] * d).sum(1) > 0)


def _bound(par, init, max_shift):
    """par (n, 3) with each (u, v) projected onto the disc of radius max_shift about init."""
    d = par[:, 1:] - init[:, 1:]
    r = np.hypot(d[:, 0], d[:, 1])
    scale = np.where(r > max_shift, max_shift / np.where(r > 0, r, 1.0), 1.0)
    out = par.copy()
    out[:, 1:] = init[:, 1:] + d * scale[:, None]
    return out


def _fit_one(d, w, fi, px, py, maps, psf, fscale, init, max_iter, tol, chi_r2, max_shift):
    """The LM schedule for one group; returns (par (n, 3), best pass, passes, status)."""
    n = init.shape[0]
    x0, y0 = _positions(maps, init[:, 1], init[:, 2])
    orders = quadrature_order(px[:, None] - x0[fi], py[:, None] - y0[fi])  # fixed for the fit
    trial = init.copy()
    lam = LAMBDA_START
    passes = 0
    status = 0
    best = None
    par = trial
    while True:
        cur = _pass(d, w, fi, px, py, maps, psf, fscale, trial, orders, chi_r2)
        if passes == 0 or cur[0] < best[0]:
            best, par = cur, trial
            if passes > 0:
                lam = max(lam * 0.1, LAMBDA_MIN)
        else:
            lam *= 10.0
        passes += 1
        if n == 0:
            return par, best, passes, status
        a, b = best[4], best[3]
        diag = np.diag(a)
        held = _held(par, init, a, b, max_shift)
        delta = _step(a, b, 0.0, held)
        if delta is not None:
            delta = (_bound(par + delta.reshape(n, 3), init, max_shift) - par).ravel()
            cond = np.where(diag > 0, np.abs(delta) * np.sqrt(np.where(diag > 0, diag, 1.0)),
                            0.0)
            if np.all(cond <= tol):
                return par + delta.reshape(n, 3), best, passes, status
        if passes - 1 >= max_iter:
            return par, best, passes, status | STATUS_NOT_CONVERGED
        while (delta := _step(a, b, lam, held)) is None:
            lam *= 10.0
            if lam > LAMBDA_MAX:
                return par, best, passes, status | STATUS_SINGULAR
        trial = _bound(par + delta.reshape(n, 3), init, max_shift)


def fit_psf_groups(stamps, weights, maps, psf, fscale, init, nsrc, max_iter, tol, chi_radius,
                   max_shift):
    """Reference of :func:`gpu2mass.kernels.psffit.fit_psf_groups` (validated NumPy arrays).

    Returns ``(params, errors, chi2, npix, niter, status)``.
    """
    g_count, k_slots = init.shape[:2]
    params = np.full((g_count, k_slots, 3), np.nan)
    errors = np.full((g_count, k_slots, 3), np.nan)
    chi2 = np.full((g_count, k_slots), np.nan)
    npix = np.zeros((g_count, k_slots), np.int32)
    niter = np.zeros(g_count, np.int32)
    status = np.zeros((g_count, k_slots), np.int32)
    chi_r2 = float(chi_radius) ** 2
    for g in range(g_count):
        w_all = weights[g].astype(np.float64)
        d_all = stamps[g].astype(np.float64)
        use = (w_all > 0) & np.isfinite(w_all) & np.isfinite(d_all)
        fi, py, px = np.nonzero(use)
        n = int(nsrc[g])
        par, best, passes, group = _fit_one(
            d_all[use], w_all[use], fi, px.astype(np.float64), py.astype(np.float64),
            maps[g], psf[g], fscale[g], init[g, :n].copy(), max_iter, tol, chi_r2, max_shift)
        niter[g] = max(passes - 1, 0)
        if n == 0:
            continue
        a = best[4]
        diag = np.diag(a)
        chol = _cholesky(a, 0.0)
        if chol is None:
            group |= STATUS_SINGULAR
            err = np.full(3 * n, np.nan)
        else:
            inv = np.linalg.inv(chol)
            var = (inv * inv).sum(0)  # diag of (L L^T)^-1 = L^-T L^-1
            err = np.where((diag > 0) & (var > 0), np.sqrt(np.abs(var)), np.nan)
        params[g, :n] = par
        errors[g, :n] = err.reshape(n, 3)
        npx = best[2]
        npix[g, :n] = npx.astype(np.int32)
        enough = npx >= MIN_CHI_PIXELS
        chi2[g, :n] = np.where(enough, best[1] / np.where(enough, npx - 3.0, 1.0), np.nan)
        flags = np.full(n, group)
        flags |= np.where(enough, 0, STATUS_NO_DATA)
        flags |= np.where((diag.reshape(n, 3) > 0).all(1), 0, STATUS_NO_DATA)
        flags |= np.where(par[:, 0] > 0, 0, STATUS_NONPOSITIVE_FLUX)
        shift2 = (par[:, 1] - init[g, :n, 1]) ** 2 + (par[:, 2] - init[g, :n, 2]) ** 2
        flags |= np.where(shift2 < max_shift**2 * MOVED_FRACTION2, 0, STATUS_MOVED)
        status[g, :n] = flags
    return params, errors, chi2, npix, niter, status
