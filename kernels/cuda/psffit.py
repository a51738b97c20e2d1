"""CUDA kernel (Numba) of the batched PSF fit: one group per thread block.

Takes validated device arrays; :mod:`gpu2mass.kernels.psffit` is the public entry. The
block's :data:`THREADS_PER_BLOCK` threads split each pass over the group's pixels (thread t
takes pixels t, t + T, ... of the flattened (F, S, S) stack) and each accumulates its part
of chi2, the right-hand side and the packed normal matrix in a local array with the scalar
:func:`~gpu2mass.kernels.scalar.psffit.accumulate_group`; the parts are summed in shared
memory, :data:`REDUCE_CHUNK` entries at a time, in a fixed order (so results do not depend
on scheduling); then thread 0 alone runs
:func:`~gpu2mass.kernels.scalar.psffit.lm_update` (the Cholesky solve and the LM decision)
on shared-memory state and the block goes on or stops. The same scalars as the CPU driver;
results agree with it to rounding (the sums are taken in another order).

The quadrature tables are module-level NumPy arrays, which Numba places in constant memory.
"""

from __future__ import annotations

import contextlib
import warnings

from gpu2mass.kernels._targets import cuda_kernel
from gpu2mass.kernels.scalar.moffat import PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W
from gpu2mass.kernels.scalar.psffit import (
    MAX_ACC,
    MAX_PARAMS,
    N_STATE,
    acc_size,
    accumulate_group,
    lm_begin,
    lm_finish,
    lm_update,
)
from numba import cuda, float64, int32

__all__ = ["REDUCE_CHUNK", "THREADS_PER_BLOCK", "fit_psf_groups"]

#: Threads per block (one block per group).
THREADS_PER_BLOCK = 64
#: Accumulator entries reduced per round through shared memory (<= THREADS_PER_BLOCK).
REDUCE_CHUNK = 32


@cuda_kernel
def _fit_kernel(stamps, weights, maps, psf, fscale, init, nsrc, max_iter, tol, chi_r2,
                max_shift, params, errors, chi2, npix, niter, status):
    g = cuda.blockIdx.x
    t = cuda.threadIdx.x
    red = cuda.shared.array((THREADS_PER_BLOCK, REDUCE_CHUNK), float64)
    tot = cuda.shared.array(MAX_ACC, float64)
    best = cuda.shared.array(MAX_ACC, float64)
    par = cuda.shared.array(MAX_PARAMS, float64)
    trial = cuda.shared.array(MAX_PARAMS, float64)
    delta = cuda.shared.array(MAX_PARAMS, float64)
    chol = cuda.shared.array((MAX_PARAMS, MAX_PARAMS), float64)
    state = cuda.shared.array(N_STATE, float64)
    done = cuda.shared.array(1, int32)
    acc = cuda.local.array(MAX_ACC, float64)
    jac = cuda.local.array(MAX_PARAMS, float64)
    n = nsrc[g]
    n_acc = acc_size(n)
    if t == 0:
        lm_begin(g, init, n, state, trial)
        done[0] = 0
    cuda.syncthreads()
    while done[0] == 0:
        accumulate_group(g, t, THREADS_PER_BLOCK, stamps, weights, maps, psf, fscale, init,
                         trial, n, chi_r2, PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W, jac, acc)
        for c0 in range(0, n_acc, REDUCE_CHUNK):
            for j in range(REDUCE_CHUNK):
                if c0 + j < n_acc:
                    red[t, j] = acc[c0 + j]
            cuda.syncthreads()
            if t < REDUCE_CHUNK and c0 + t < n_acc:
                s = 0.0
                for r in range(THREADS_PER_BLOCK):
                    s += red[r, t]
                tot[c0 + t] = s
            cuda.syncthreads()
        if t == 0:
            over = lm_update(g, init, tot, best, par, trial, n, state, max_iter, tol,
                             max_shift, chol, delta)
            done[0] = 1 if over else 0
        cuda.syncthreads()
    if t == 0:
        lm_finish(g, best, par, init, n, state, max_shift, chol, delta,
                  params, errors, chi2, npix, niter, status)


@contextlib.contextmanager
def _small_grids_allowed():
    # Small batches legitimately give grids under 128 blocks; Numba's performance warning
    # must not fail a correct call under warnings-as-errors.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU")
        yield


def fit_psf_groups(stamps, weights, maps, psf, fscale, init, nsrc, max_iter, tol, chi_radius,
                   max_shift, params, errors, chi2, npix, niter, status, *, stream=0) -> None:
    """Fit every group on the GPU into the output device arrays (see the public function).

    Inputs are contiguous device arrays as described in
    :func:`gpu2mass.kernels.psffit.fit_psf_groups`; outputs ``params``, ``errors`` float64
    (G, K, 3), ``chi2`` float64 (G, K), ``npix`` int32 (G, K), ``niter`` int32 (G,),
    ``status`` int32 (G, K).
    """
    n_groups = stamps.shape[0]
    if n_groups == 0:
        return
    with _small_grids_allowed():
        _fit_kernel[n_groups, THREADS_PER_BLOCK, stream](
            stamps, weights, maps, psf, fscale, init, nsrc, int(max_iter), float(tol),
            float(chi_radius) ** 2, float(max_shift), params, errors, chi2, npix, niter, status)
