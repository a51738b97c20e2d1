"""Scalar math of the batched PSF fit (PROPHOT, facts sheet 3.3), written once for CPU and CUDA.

One *group* of 1 to :data:`MAX_SOURCES` blended point sources is fitted on all the frames
that cover it at once: per source a flux ``F`` and a position ``(u, v)`` in the group's
common coordinates; frame ``f`` sees source ``k`` at stamp pixel

    X_fk = M_f[0,0] + M_f[0,1] u_k + M_f[0,2] v_k,   Y_fk = M_f[1,0] + M_f[1,1] u_k + M_f[1,2] v_k

(the affine maps ``M_f`` come from registration and are held fixed) with flux
``s_f F_k`` (``s_f`` the frame's relative throughput). The model of pixel (x, y) of frame f
is ``sum_k s_f F_k P_f(x - X_fk, y - Y_fk)`` with ``P_f`` the pixel-INTEGRATED unit Moffat of
the frame (:func:`moffat_pixel_gradient`: the Gauss-Legendre rules, node for node, of
:func:`gpu2mass.kernels.scalar.moffat.moffat_pixel_integral`, so the model is what
:func:`gpu2mass.kernels.render_psf_stamps` renders, but for the choice of rule below).

One departure from that renderer, on purpose: the order of the rule of each (pixel,
source) pair (8, 4 or 2 nodes per axis by the distance, 2.5 and 5 px) is chosen from the
source's INITIAL position and kept for the whole fit, so that the model is a smooth
function of the parameters. Chosen from the current position, as the renderer does, the
model would jump (by up to 2.3e-4 of a bright pixel's value) whenever a source crossed a
switching distance of a pixel, and Levenberg-Marquardt stalls on those kinks (measured:
blends of bright stars never met the convergence test). Where a source ends up no farther
than its detection jitter from its initial position (tenths of a pixel), only pixels in
thin rings about 2.5 and 5 px use the other rule, whose value differs by at most the
rules' own errors (2.3e-4 of the pixel's value for pixels holding more than 1e-3 of the
flux, :mod:`gpu2mass.kernels.scalar.moffat`).

Derivatives with respect to the source centre are ANALYTIC: the same quadrature rule applied
to the analytic derivative of the Moffat density, i.e. the exact derivative of the model.

The fit is Levenberg-Marquardt on ``chi2 = sum w (d - model)^2`` with Marquardt scaling,
``(A + lambda diag A) delta = b`` where ``A = J^T W J`` and ``b = J^T W r`` are accumulated
in float64 over all used pixels (weight > 0 and finite data). The schedule, shared by every
implementation (the NumPy reference follows it step for step):

1. evaluate ``A, b, chi2`` at the initial parameters (pass 0); ``lambda = LAMBDA_START``;
2. solve the undamped system (Cholesky); if every component of the Gauss-Newton step is
   below ``tol`` times its conditional error ``1/sqrt(A_ii)``, apply it and stop (converged);
3. otherwise, if ``max_iter`` trial passes have been spent, stop (:data:`STATUS_NOT_CONVERGED`);
4. solve the damped system (raising lambda x10 until Cholesky succeeds; beyond
   ``LAMBDA_MAX`` stop with :data:`STATUS_SINGULAR`), evaluate the trial point (one pass);
   accept it if its chi2 is lower (lambda / 10, floored at ``LAMBDA_MIN``), else keep the
   old point (lambda x 10); go to 2.

Positions are bounded (as photutils' ``xy_bounds``): every new point, the converged one
included, has each source's (u, v) projected onto the disc of radius ``max_shift`` around its
initial (u, v) (:func:`bound_positions`), and the convergence test of step 2 is made on the
projected step. Without the bound a faint member of a bright blend, whose position the data
hardly constrain, can wander off the stamp (its flux then runs away); with it, it stays and
is flagged :data:`STATUS_MOVED`. A source at the bound whose unconstrained Gauss-Newton
step points outwards has its position frozen for the step (an active set: projecting the
joint step instead would leave the other sources' steps computed for a move that cannot
happen, and the fit would never converge).

Parameters whose diagonal ``A_ii`` is zero (no used pixel constrains them: a source with no
data, or a position when its flux is exactly 0) are frozen (identity row, zero step) and
flagged.

One pass accumulates into one float64 vector ``acc`` (:func:`acc_size` entries for n
sources, ``npar = 3n``): ``acc[0]`` chi2 of all used pixels; ``acc[1 + k]`` chi2 of the used
pixels within ``chi_radius`` of source k (in its frame's stamp, 2MASS psfchi), ``acc[1 + n +
k]`` their count; ``acc[1 + 2n + i]`` = b_i; then the upper triangle of A row by row
(:func:`tri_index`). Passes split the pixels by ``(start, step)`` so that CUDA threads can
each accumulate a part and reduce; the CPU uses (0, 1).

Status bits (per source; the group-level ones are set on every used source of the group):

===============================  ====  ======================================================
:data:`STATUS_NOT_CONVERGED`        1  the iteration budget ran out before convergence
                                       (group)
:data:`STATUS_SINGULAR`             2  the normal matrix is not positive definite at the
                                       solution (or no damping made it so): errors are NaN
                                       (group)
:data:`STATUS_NONPOSITIVE_FLUX`     4  fitted flux <= 0
:data:`STATUS_MOVED`                8  the fitted (u, v) is held at ``max_shift`` from the
                                       initial (u, v), the bound of the fit
:data:`STATUS_NO_DATA`             16  fewer than 4 used pixels within ``chi_radius`` of the
                                       source (psfchi undefined: NaN), or a parameter of the
                                       source is constrained by no pixel at all (frozen,
                                       error NaN)
===============================  ====  ======================================================
"""

from __future__ import annotations

import math

from gpu2mass.kernels._targets import scalar
from gpu2mass.kernels.scalar.elementary import pow_positive
from gpu2mass.kernels.scalar.moffat import moffat_quadrature_order

__all__ = [
    "LAMBDA_MAX",
    "LAMBDA_MIN",
    "LAMBDA_START",
    "MAX_ACC",
    "MAX_PARAMS",
    "MAX_SOURCES",
    "MIN_CHI_PIXELS",
    "MOVED_FRACTION2",
    "N_STATE",
    "PIVOT_RTOL",
    "STATUS_BITS",
    "STATUS_MOVED",
    "STATUS_NONPOSITIVE_FLUX",
    "STATUS_NOT_CONVERGED",
    "STATUS_NO_DATA",
    "STATUS_SINGULAR",
    "acc_size",
    "accumulate_group",
    "bound_positions",
    "cholesky_factor",
    "cholesky_solve",
    "is_frozen",
    "lm_begin",
    "lm_finish",
    "lm_update",
    "moffat_pixel_gradient",
    "tri_index",
]

#: Most sources fitted together (2MASS bl_flg <= 7).
MAX_SOURCES = 7
#: Most free parameters of a group (flux, u, v per source).
MAX_PARAMS = 3 * MAX_SOURCES
#: Length of the largest accumulator vector (7 sources): 1 + 14 + 21 + 231.
MAX_ACC = 1 + 2 * MAX_SOURCES + MAX_PARAMS + MAX_PARAMS * (MAX_PARAMS + 1) // 2
#: Length of the LM state vector: lambda, passes, group status bits.
N_STATE = 3
#: Levenberg-Marquardt damping: start, floor and ceiling.
LAMBDA_START = 1e-3
LAMBDA_MIN = 1e-7
LAMBDA_MAX = 1e12
#: A Cholesky pivot below PIVOT_RTOL times its diagonal entry counts as singular.
PIVOT_RTOL = 1e-13
#: A position counts as held at the max_shift bound (STATUS_MOVED) from this fraction of
#: max_shift (squared), so that rounding in the projection cannot hide it.
MOVED_FRACTION2 = (1.0 - 1e-9) ** 2
#: psfchi needs more used pixels within chi_radius than the 3 parameters of one source.
MIN_CHI_PIXELS = 4

STATUS_NOT_CONVERGED = 1
STATUS_SINGULAR = 2
STATUS_NONPOSITIVE_FLUX = 4
STATUS_MOVED = 8
STATUS_NO_DATA = 16
#: Name -> bit of every status flag.
STATUS_BITS = {
    "not_converged": STATUS_NOT_CONVERGED,
    "singular": STATUS_SINGULAR,
    "nonpositive_flux": STATUS_NONPOSITIVE_FLUX,
    "moved": STATUS_MOVED,
    "no_data": STATUS_NO_DATA,
}

# state vector indices
_S_LAMBDA = 0
_S_PASSES = 1
_S_STATUS = 2


@scalar
def acc_size(n):
    """Entries of the accumulator vector for ``n`` sources (see the module docstring)."""
    npar = 3 * n
    return 1 + 2 * n + npar + npar * (npar + 1) // 2


@scalar
def tri_index(i, j, npar):
    """Offset of A[i, j] (i <= j) within the packed upper triangle of an npar x npar matrix."""
    return i * npar - (i * (i - 1)) // 2 + (j - i)


@scalar
def moffat_pixel_gradient(cx, cy, n, alpha, beta, rule_dx, rule_dy, rule_w):
    """Unit-flux pixel-integrated Moffat and its derivatives with respect to the source centre.

    ``(cx, cy)``: pixel centre minus source centre (px); ``n`` the Gauss-Legendre order per
    axis (one of the orders of :mod:`gpu2mass.kernels.scalar.moffat`); alpha (px) > 0,
    beta > 1; the rule tables of that module. Returns ``(value, dX, dY)``: the fraction of
    the flux in the pixel and its derivatives with respect to the source's x and y (px^-1).
    With ``n = moffat_quadrature_order(cx, cy)`` the value is
    :func:`~gpu2mass.kernels.scalar.moffat.moffat_pixel_integral`.
    """
    inv_a2 = 1.0 / (alpha * alpha)
    neg_beta = -beta
    total = 0.0
    gx = 0.0
    gy = 0.0
    for m in range(n * n):
        x = cx + rule_dx[n, m]
        y = cy + rule_dy[n, m]
        q = 1.0 + (x * x + y * y) * inv_a2
        p = pow_positive(q, neg_beta)
        w = rule_w[n, m]
        total += w * p
        # d p / d x_pixel = -2 beta x p / (alpha^2 q); the source derivative is its negative.
        d = w * p / q
        gx += d * x
        gy += d * y
    norm = (beta - 1.0) / (math.pi * alpha * alpha)
    dnorm = 2.0 * beta * inv_a2 * norm
    return norm * total, dnorm * gx, dnorm * gy


@scalar
def accumulate_group(g, start, step, stamps, weights, maps, psf, fscale, init, par, n, chi_r2,
                     rule_dx, rule_dy, rule_w, jac, acc):
    """One pass over the pixels ``start, start + step, ...`` of group ``g`` into ``acc``.

    ``par`` (>= 3n): flux, u, v of each source; ``init[g]`` the initial ones, which fix the
    quadrature order of each (pixel, source) pair; ``jac`` float64 scratch of >= 3n; ``acc``
    float64 of >= :func:`acc_size` (n), overwritten. Arrays as in
    :func:`gpu2mass.kernels.psffit.fit_psf_groups`. Pixels with a weight that is not > 0
    (zero, negative, NaN) or non-finite data are skipped.
    """
    nf = stamps.shape[1]
    ny = stamps.shape[2]
    nx = stamps.shape[3]
    npar = 3 * n
    n_acc = acc_size(n)
    for i in range(n_acc):
        acc[i] = 0.0
    ob = 1 + 2 * n
    oa = ob + npar
    plane = ny * nx
    for p in range(start, nf * plane, step):
        f = p // plane
        rem = p - f * plane
        y = rem // nx
        x = rem - y * nx
        w = float(weights[g, f, y, x])
        d = float(stamps[g, f, y, x])
        if not (w > 0.0) or not math.isfinite(w) or not math.isfinite(d):
            continue
        alpha = psf[g, f, 0]
        beta = psf[g, f, 1]
        s = fscale[g, f]
        m00 = maps[g, f, 0, 0]
        m01 = maps[g, f, 0, 1]
        m02 = maps[g, f, 0, 2]
        m10 = maps[g, f, 1, 0]
        m11 = maps[g, f, 1, 1]
        m12 = maps[g, f, 1, 2]
        model = 0.0
        near = 0
        for k in range(n):
            fk = par[3 * k]
            u = par[3 * k + 1]
            v = par[3 * k + 2]
            cx = x - (m00 + m01 * u + m02 * v)
            cy = y - (m10 + m11 * u + m12 * v)
            u0 = init[g, k, 1]
            v0 = init[g, k, 2]
            order = moffat_quadrature_order(x - (m00 + m01 * u0 + m02 * v0),
                                            y - (m10 + m11 * u0 + m12 * v0))
            val, dxs, dys = moffat_pixel_gradient(cx, cy, order, alpha, beta,
                                                  rule_dx, rule_dy, rule_w)
            sf = s * fk
            model += sf * val
            jac[3 * k] = s * val
            jac[3 * k + 1] = sf * (dxs * m01 + dys * m11)
            jac[3 * k + 2] = sf * (dxs * m02 + dys * m12)
            if cx * cx + cy * cy <= chi_r2:
                near |= 1 << k
        r = d - model
        wr = w * r
        wr2 = wr * r
        acc[0] += wr2
        for k in range(n):
            if (near >> k) & 1:
                acc[1 + k] += wr2
                acc[1 + n + k] += 1.0
        idx = oa
        for i in range(npar):
            wj = w * jac[i]
            acc[ob + i] += wr * jac[i]
            for j in range(i, npar):
                acc[idx] += wj * jac[j]
                idx += 1


@scalar
def is_frozen(acc, n, held, i):
    """Whether parameter i is frozen: its A_ii is not > 0, or it is a position coordinate
    of a source whose bit is set in ``held`` (held at the max_shift bound)."""
    npar = 3 * n
    if not (acc[1 + 2 * n + npar + tri_index(i, i, npar)] > 0.0):
        return True
    k = i // 3
    return i != 3 * k and ((held >> k) & 1) == 1


@scalar
def cholesky_factor(acc, n, lam, held, chol):
    """Cholesky factor (lower, in ``chol[:npar, :npar]``) of the damped normal matrix.

    The matrix is A from ``acc`` with its diagonal times (1 + lam); rows and columns of
    frozen parameters (:func:`is_frozen`) are replaced by the identity. Returns True when
    every pivot exceeds :data:`PIVOT_RTOL` times its diagonal entry.
    """
    npar = 3 * n
    oa = 1 + 2 * n + npar
    for i in range(npar):
        fi = is_frozen(acc, n, held, i)
        for j in range(i, npar):
            aij = acc[oa + tri_index(i, j, npar)]
            if i == j:
                aij = 1.0 if fi else aij * (1.0 + lam)
            elif fi or is_frozen(acc, n, held, j):
                aij = 0.0
            chol[j, i] = aij  # lower triangle holds the matrix before factoring
    for j in range(npar):
        diag = chol[j, j]
        s = diag
        for k in range(j):
            s -= chol[j, k] * chol[j, k]
        if not (s > PIVOT_RTOL * diag):
            return False
        ljj = math.sqrt(s)
        chol[j, j] = ljj
        for i in range(j + 1, npar):
            t = chol[i, j]
            for k in range(j):
                t -= chol[i, k] * chol[j, k]
            chol[i, j] = t / ljj
    return True


@scalar
def cholesky_solve(chol, npar, rhs, out):
    """Solve L L^T out = rhs with the factor from :func:`cholesky_factor` (out may be rhs)."""
    for i in range(npar):
        t = rhs[i]
        for k in range(i):
            t -= chol[i, k] * out[k]
        out[i] = t / chol[i, i]
    for i in range(npar - 1, -1, -1):
        t = out[i]
        for k in range(i + 1, npar):
            t -= chol[k, i] * out[k]
        out[i] = t / chol[i, i]


@scalar
def _step(acc, n, lam, held, chol, delta):
    """The damped step into ``delta`` (0 for frozen parameters); False if the damped matrix
    is not positive definite."""
    npar = 3 * n
    if not cholesky_factor(acc, n, lam, held, chol):
        return False
    ob = 1 + 2 * n
    for i in range(npar):
        delta[i] = 0.0 if is_frozen(acc, n, held, i) else acc[ob + i]
    cholesky_solve(chol, npar, delta, delta)
    return True


@scalar
def _held_sources(g, init, par, n, max_shift, best, chol, delta):
    """Bits of the sources held at the position bound: at it, with the unconstrained
    Gauss-Newton step pointing outwards (or no step to tell, the matrix being singular)."""
    r2 = max_shift * max_shift * MOVED_FRACTION2
    at_bound = 0
    for k in range(n):
        du = par[3 * k + 1] - init[g, k, 1]
        dv = par[3 * k + 2] - init[g, k, 2]
        if du * du + dv * dv >= r2:
            at_bound |= 1 << k
    if at_bound == 0 or not _step(best, n, 0.0, 0, chol, delta):
        return at_bound
    held = 0
    for k in range(n):
        if (at_bound >> k) & 1:
            du = par[3 * k + 1] - init[g, k, 1]
            dv = par[3 * k + 2] - init[g, k, 2]
            if delta[3 * k + 1] * du + delta[3 * k + 2] * dv > 0.0:
                held |= 1 << k
    return held


@scalar
def bound_positions(g, init, n, max_shift, par):
    """Project each source's (u, v) in ``par`` onto the disc of radius ``max_shift`` around
    its initial (u, v) ``init[g, k, 1:]`` (in place)."""
    r2 = max_shift * max_shift
    for k in range(n):
        du = par[3 * k + 1] - init[g, k, 1]
        dv = par[3 * k + 2] - init[g, k, 2]
        d2 = du * du + dv * dv
        if d2 > r2:
            scale = max_shift / math.sqrt(d2)
            par[3 * k + 1] = init[g, k, 1] + du * scale
            par[3 * k + 2] = init[g, k, 2] + dv * scale


@scalar
def lm_begin(g, init, n, state, trial):
    """Set up the fit of group ``g``: trial = the initial parameters, lambda, counters."""
    for k in range(n):
        for c in range(3):
            trial[3 * k + c] = init[g, k, c]
    state[_S_LAMBDA] = LAMBDA_START
    state[_S_PASSES] = 0.0
    state[_S_STATUS] = 0.0


@scalar
def lm_update(g, init, tot, best, par, trial, n, state, max_iter, tol, max_shift, chol, delta):
    """Digest the pass just made at ``trial`` (accumulator ``tot``); prepare the next.

    Keeps in ``best`` the accumulator of the current point ``par``. Returns True when the
    fit is over (converged, out of budget, or singular; see the module docstring), with
    ``par`` the solution; otherwise False with ``trial`` the next point to evaluate. Every
    new point has its positions projected onto the discs of radius ``max_shift`` around
    the initial positions (``init[g]``) by :func:`bound_positions`.
    """
    npar = 3 * n
    n_acc = acc_size(n)
    passes = int(state[_S_PASSES])
    lam = state[_S_LAMBDA]
    if passes == 0 or tot[0] < best[0]:
        for i in range(n_acc):
            best[i] = tot[i]
        for i in range(npar):
            par[i] = trial[i]
        if passes > 0:
            lam = max(lam * 0.1, LAMBDA_MIN)
    else:
        lam = lam * 10.0
    passes += 1
    state[_S_PASSES] = passes
    state[_S_LAMBDA] = lam
    if npar == 0:
        return True
    oa = 1 + 2 * n + npar
    held = _held_sources(g, init, par, n, max_shift, best, chol, delta)
    # Convergence: the Gauss-Newton step (as bounded) is small against the conditional
    # errors.
    if _step(best, n, 0.0, held, chol, delta):
        for i in range(npar):
            delta[i] += par[i]
        bound_positions(g, init, n, max_shift, delta)
        for i in range(npar):
            delta[i] -= par[i]
        small = True
        for i in range(npar):
            aii = best[oa + tri_index(i, i, npar)]
            if aii > 0.0 and not (abs(delta[i]) * math.sqrt(aii) <= tol):
                small = False
        if small:
            for i in range(npar):
                par[i] += delta[i]
            bound_positions(g, init, n, max_shift, par)
            return True
    if passes - 1 >= max_iter:
        state[_S_STATUS] = float(int(state[_S_STATUS]) | STATUS_NOT_CONVERGED)
        return True
    while not _step(best, n, lam, held, chol, delta):
        lam = lam * 10.0
        if lam > LAMBDA_MAX:
            state[_S_STATUS] = float(int(state[_S_STATUS]) | STATUS_SINGULAR)
            return True
    state[_S_LAMBDA] = lam
    for i in range(npar):
        trial[i] = par[i] + delta[i]
    bound_positions(g, init, n, max_shift, trial)
    return False


@scalar
def lm_finish(g, best, par, init, n, state, max_shift, chol, col,
              params, errors, chi2, npix, niter, status):
    """Write group ``g``'s results: parameters, errors, psfchi, pixel counts, flags.

    Errors are the square roots of the diagonal of the inverse of the undamped normal
    matrix at the solution (``best``); ``col`` is float64 scratch of >= 3n. Slots
    ``k >= n`` get NaN parameters, errors and chi2, npix 0 and status 0.
    """
    npar = 3 * n
    kmax = params.shape[1]
    group = int(state[_S_STATUS])
    oa = 1 + 2 * n + npar
    ok = npar > 0 and cholesky_factor(best, n, 0.0, 0, chol)
    if npar > 0 and not ok:
        group |= STATUS_SINGULAR
    for i in range(npar):
        err = math.nan
        if ok and best[oa + tri_index(i, i, npar)] > 0.0:
            for j in range(npar):
                col[j] = 1.0 if j == i else 0.0
            cholesky_solve(chol, npar, col, col)
            if col[i] > 0.0:
                err = math.sqrt(col[i])
        k = i // 3
        errors[g, k, i - 3 * k] = err
        params[g, k, i - 3 * k] = par[i]
    r2 = max_shift * max_shift
    for k in range(n):
        flags = group
        npx = best[1 + n + k]
        npix[g, k] = int(npx)
        if npx >= MIN_CHI_PIXELS:
            chi2[g, k] = best[1 + k] / (npx - 3.0)
        else:
            chi2[g, k] = math.nan
            flags |= STATUS_NO_DATA
        for c in range(3):
            if not (best[oa + tri_index(3 * k + c, 3 * k + c, npar)] > 0.0):
                flags |= STATUS_NO_DATA
        if not (par[3 * k] > 0.0):
            flags |= STATUS_NONPOSITIVE_FLUX
        du = par[3 * k + 1] - init[g, k, 1]
        dv = par[3 * k + 2] - init[g, k, 2]
        if not (du * du + dv * dv < r2 * MOVED_FRACTION2):
            flags |= STATUS_MOVED
        status[g, k] = flags
    for k in range(n, kmax):
        for c in range(3):
            params[g, k, c] = math.nan
            errors[g, k, c] = math.nan
        chi2[g, k] = math.nan
        npix[g, k] = 0
        status[g, k] = 0
    niter[g] = max(int(state[_S_PASSES]) - 1, 0)
