"""CPU drivers (Numba ``prange``) for the Moffat stamp renderer and the stamp scatter-add.

These take plain, already validated NumPy arrays; :mod:`gpu2mass.kernels.psf` is the
public entry point. Both drivers are compiled on their first call (a few seconds, see
:mod:`gpu2mass.kernels`), then run at full speed for the life of the process.

Rendering. Per source, the stamp's pixels are sorted by the quadrature order that
:func:`~gpu2mass.kernels.scalar.moffat.moffat_quadrature_order` gives them, and each group
is integrated node by node across all of its pixels: the innermost loop then runs over
tens to hundreds of pixels with one node offset, calls the scalar
:func:`~gpu2mass.kernels.scalar.moffat.moffat_profile` (built on the vectorizable
:func:`~gpu2mass.kernels.scalar.elementary.pow_positive`), and LLVM vectorizes it. The
straightforward per-pixel loop (what the CUDA kernel does, one thread per pixel) has inner
trip counts of 4, 16 and 64 and ran 1.6x slower here. The sum is the same Gauss-Legendre
rule as :func:`~gpu2mass.kernels.scalar.moffat.moffat_pixel_integral`, node for node.

Scatter-add. The image is cut into bands of rows, one ``prange`` iteration per band; each
band walks all stamps in order and adds the rows that fall in it. No two iterations write
the same pixel, and every pixel receives its stamps in stamp order whatever the number of
threads or bands, so the result is deterministic, bit for bit.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel, scalar
from gpu2mass.kernels.scalar.moffat import (
    GL_ORDER_FAR,
    GL_ORDER_MID,
    GL_ORDER_NEAR,
    PIXEL_RULE_DX,
    PIXEL_RULE_DY,
    PIXEL_RULE_W,
    moffat_normalization,
    moffat_profile,
    moffat_quadrature_order,
)
from numba import get_num_threads, prange

__all__ = ["add_stamps", "render_moffat_stamps"]

# Sources per prange iteration: enough to amortize the per-iteration scratch buffers, few
# enough (a 10,000-source call has ~600 iterations) to balance the threads.
_SOURCES_PER_TASK = 16
# Scatter-add bands per thread: more than one so that uneven bands (stamps clustered in
# part of the image) still spread over the threads.
_BANDS_PER_THREAD = 4


# A CPU-only helper, declared @scalar so that the mechanism compiles it, and its scalar
# callees, for the CPU target when the driver below is compiled.
@scalar
def _integrate_group(n, count, xs, ys, acc, inv_alpha2, neg_beta, rule_dx, rule_dy, rule_w):
    """acc[p] = sum over the n x n nodes of pixel p (centre xs[p], ys[p]) of w * profile."""
    for p in range(count):
        acc[p] = 0.0
    for m in range(n * n):
        dx = rule_dx[n, m]
        dy = rule_dy[n, m]
        w = rule_w[n, m]
        for p in range(count):  # the vectorized loop
            x = xs[p] + dx
            y = ys[p] + dy
            acc[p] += w * moffat_profile(x * x + y * y, inv_alpha2, neg_beta)


@cpu_kernel(parallel=True)
def _render_kernel(fx, fy, flux, alpha, beta, half_size, rule_dx, rule_dy, rule_w, out):
    n_src = fx.shape[0]
    size = 2 * half_size + 1
    n_pix = size * size
    flat = out.reshape((n_src, n_pix))
    n_tasks = (n_src + _SOURCES_PER_TASK - 1) // _SOURCES_PER_TASK
    for task in prange(n_tasks):
        # Scratch per task, reused for its sources: pixel-centre offsets and flat pixel
        # index of each quadrature group (0: near, 1: mid, 2: far), and the group sums.
        xs = np.empty((3, n_pix))
        ys = np.empty((3, n_pix))
        index = np.empty((3, n_pix), np.int64)
        acc = np.empty(n_pix)
        counts = np.zeros(3, np.int64)
        orders = (GL_ORDER_NEAR, GL_ORDER_MID, GL_ORDER_FAR)
        stop = min(n_src, (task + 1) * _SOURCES_PER_TASK)
        for k in range(task * _SOURCES_PER_TASK, stop):
            a_k = alpha[k]
            b_k = beta[k]
            inv_alpha2 = 1.0 / (a_k * a_k)
            scale = flux[k] * moffat_normalization(a_k, b_k)
            counts[:] = 0
            for a in range(size):
                cy = (a - half_size) - fy[k]
                for b in range(size):
                    cx = (b - half_size) - fx[k]
                    n = moffat_quadrature_order(cx, cy)
                    g = 0 if n == GL_ORDER_NEAR else (1 if n == GL_ORDER_MID else 2)
                    c = counts[g]
                    xs[g, c] = cx
                    ys[g, c] = cy
                    index[g, c] = a * size + b
                    counts[g] = c + 1
            for g in range(3):
                count = counts[g]
                _integrate_group(
                    orders[g], count, xs[g], ys[g], acc, inv_alpha2, -b_k, rule_dx, rule_dy, rule_w
                )
                for p in range(count):
                    flat[k, index[g, p]] = np.float32(scale * acc[p])


@cpu_kernel(parallel=True)
def _add_kernel(image, stamps, x0, y0, band_rows):
    ny, nx = image.shape
    n_src, sy, sx = stamps.shape
    n_bands = (ny + band_rows - 1) // band_rows
    for band in prange(n_bands):
        row0 = band * band_rows
        row1 = min(ny, row0 + band_rows)
        for k in range(n_src):
            ya = max(y0[k], row0)
            yb = min(y0[k] + sy, row1)
            xa = max(x0[k], 0)
            xb = min(x0[k] + sx, nx)
            for yy in range(ya, yb):  # empty ranges when the stamp misses the band
                for xx in range(xa, xb):
                    image[yy, xx] += stamps[k, yy - y0[k], xx - x0[k]]


def render_moffat_stamps(
    fx: np.ndarray,
    fy: np.ndarray,
    flux: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    half_size: int,
) -> np.ndarray:
    """Render pixel-integrated Moffat stamps on the CPU.

    Parameters
    ----------
    fx, fy, flux, alpha, beta
        C-contiguous float64 arrays of shape (N,), validated by the caller: sub-pixel
        offsets of the source centres from the stamp centre pixel (px), fluxes, Moffat
        alpha (px, > 0) and beta (> 1).
    half_size
        h >= 0; stamps are (2h+1) x (2h+1).

    Returns
    -------
    numpy.ndarray
        float32, shape (N, 2h+1, 2h+1), indexed [source, y, x].
    """
    size = 2 * half_size + 1
    out = np.empty((fx.shape[0], size, size), dtype=np.float32)
    if fx.shape[0]:
        _render_kernel(
            fx, fy, flux, alpha, beta, half_size, PIXEL_RULE_DX, PIXEL_RULE_DY, PIXEL_RULE_W, out
        )
    return out


def add_stamps(image: np.ndarray, stamps: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> None:
    """Add stamps into ``image`` in place on the CPU, clipping at the image edges.

    Parameters
    ----------
    image
        C-contiguous float32 (ny, nx), modified in place.
    stamps
        C-contiguous float32 (N, sy, sx).
    x0, y0
        C-contiguous int64 (N,): image column and row of each stamp's element [0, 0].
    """
    if stamps.shape[0] == 0 or image.size == 0:
        return
    ny = image.shape[0]
    band_rows = max(1, -(-ny // (_BANDS_PER_THREAD * get_num_threads())))
    _add_kernel(image, stamps, x0, y0, band_rows)
