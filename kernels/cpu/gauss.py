"""CPU driver (Numba ``prange``) of the single-frame detection's Gaussian smoothing.

``scipy.ndimage.gaussian_filter(stack, sigma=(0, s, s), mode="constant", cval=0)`` on a
float32 (n, ny, nx) stack, computed the way SciPy computes it, so that the numbers are the
same bit for bit: one pass along y then one along x, each in float64 from float32 values
(``tmp = v[0] w[0]``, then ``tmp += (v[-j] + v[+j]) w[j]`` for j from the kernel's radius
down to 1: SciPy's loop for symmetric kernels), each pass's result rounded to float32, zeros
beyond the edges. SciPy's filter runs on one thread and was ~0.2 s per stack of a full scan
(twelve stacks per scan); this one is parallel over frames and vectorised along rows.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from numba import prange

__all__ = ["gaussian_smooth_frames"]


@cpu_kernel(parallel=True)
def _smooth_kernel(frames, w, out):
    n, ny, nx = frames.shape
    r = w.shape[0] - 1
    for f in prange(n):
        tmp = np.empty((ny, nx), np.float32)
        acc = np.empty(nx)
        # Along y.
        for y in range(ny):
            for x in range(nx):
                acc[x] = np.float64(frames[f, y, x]) * w[0]
            for j in range(r, 0, -1):
                lo = y - j
                hi = y + j
                for x in range(nx):
                    a = np.float64(frames[f, lo, x]) if lo >= 0 else 0.0
                    b = np.float64(frames[f, hi, x]) if hi < ny else 0.0
                    acc[x] += (a + b) * w[j]
            for x in range(nx):
                tmp[y, x] = acc[x]
        # Along x.
        for y in range(ny):
            for x in range(nx):
                s = np.float64(tmp[y, x]) * w[0]
                for j in range(r, 0, -1):
                    a = np.float64(tmp[y, x - j]) if x - j >= 0 else 0.0
                    b = np.float64(tmp[y, x + j]) if x + j < nx else 0.0
                    s += (a + b) * w[j]
                out[f, y, x] = s


def gaussian_smooth_frames(frames, sigma: float, truncate: float = 4.0):
    """float32 (n, ny, nx): each frame of ``frames`` (float32) smoothed by a Gaussian of
    ``sigma`` pixels, exactly as ``scipy.ndimage.gaussian_filter(frames, (0, sigma, sigma),
    mode="constant", cval=0.0, truncate=truncate)``."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    # SciPy's _gaussian_kernel1d: exp(-x²/2σ²), normalised; symmetric, so its half.
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x.astype(np.float64) ** 2)
    phi /= phi.sum()
    w = np.ascontiguousarray(phi[radius:])
    out = np.empty(frames.shape, np.float32)
    if frames.size:
        _smooth_kernel(np.ascontiguousarray(frames, dtype=np.float32), w, out)
    return out
