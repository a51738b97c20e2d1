"""CPU driver (Numba ``prange``) of the batched PSF fit: one ``prange`` iteration per group.

Takes plain, validated NumPy arrays; :mod:`gpu2mass.kernels.psffit` is the public entry.
Each group runs the Levenberg-Marquardt schedule of :mod:`gpu2mass.kernels.scalar.psffit`
alone: :func:`~gpu2mass.kernels.scalar.psffit.accumulate_group` over all its pixels (start
0, step 1), then :func:`~gpu2mass.kernels.scalar.psffit.lm_update`, until it says the fit
is over, then :func:`~gpu2mass.kernels.scalar.psffit.lm_finish`. The CUDA kernel calls the
same scalars, splitting each pass over a block's threads.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from gpu2mass.kernels.scalar.psffit import (
    MAX_ACC,
    MAX_PARAMS,
    N_STATE,
    accumulate_group,
    lm_begin,
    lm_finish,
    lm_update,
)
from numba import prange

__all__ = ["fit_psf_groups"]


@cpu_kernel(parallel=True)
def _fit_kernel(stamps, weights, maps, psf, fscale, init, nsrc, max_iter, tol, chi_r2,
                max_shift, rule_dx, rule_dy, rule_w, params, errors, chi2, npix, niter, status):
    for g in prange(stamps.shape[0]):
        # Per-group scratch: the scalar code may not allocate, the driver may.
        tot = np.empty(MAX_ACC)
        best = np.empty(MAX_ACC)
        jac = np.empty(MAX_PARAMS)
        par = np.empty(MAX_PARAMS)
        trial = np.empty(MAX_PARAMS)
        delta = np.empty(MAX_PARAMS)
        chol = np.empty((MAX_PARAMS, MAX_PARAMS))
        state = np.empty(N_STATE)
        n = nsrc[g]
        lm_begin(g, init, n, state, trial)
        done = False
        while not done:
            accumulate_group(g, 0, 1, stamps, weights, maps, psf, fscale, init, trial, n,
                             chi_r2, rule_dx, rule_dy, rule_w, jac, tot)
            done = lm_update(g, init, tot, best, par, trial, n, state, max_iter, tol,
                             max_shift, chol, delta)
        lm_finish(g, best, par, init, n, state, max_shift, chol, delta,
                  params, errors, chi2, npix, niter, status)


def fit_psf_groups(stamps, weights, maps, psf, fscale, init, nsrc, max_iter, tol, chi_radius,
                   max_shift, rule_dx, rule_dy, rule_w):
    """Fit every group on the CPU; see :func:`gpu2mass.kernels.psffit.fit_psf_groups`.

    Returns ``(params, errors, chi2, npix, niter, status)`` as NumPy arrays.
    """
    g, k = init.shape[:2]
    params = np.empty((g, k, 3))
    errors = np.empty((g, k, 3))
    chi2 = np.empty((g, k))
    npix = np.empty((g, k), np.int32)
    niter = np.empty(g, np.int32)
    status = np.empty((g, k), np.int32)
    if g:
        _fit_kernel(stamps, weights, maps, psf, fscale, init, nsrc, int(max_iter), float(tol),
                    float(chi_radius) ** 2, float(max_shift), rule_dx, rule_dy, rule_w,
                    params, errors, chi2, npix, niter, status)
    return params, errors, chi2, npix, niter, status
