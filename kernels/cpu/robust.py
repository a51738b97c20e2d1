"""CPU driver (Numba ``prange``) of :func:`gpu2mass.kernels.robust.trimmed_mean`.

Per row, each pixel's usable values (≤ n, 42 for the illumination blocks) are
insertion-sorted in a small buffer and the middle ones summed in float64: as fast as
NumPy's sort along the strided frame axis on one thread, and parallel over rows.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from numba import prange

__all__ = ["trimmed_mean"]


@cpu_kernel(parallel=True)
def _trimmed_mean_kernel(stack, usable, trim, out):
    n, ny, nx = stack.shape
    for y in prange(ny):
        buf = np.empty(n, np.float32)
        for x in range(nx):
            count = 0
            for k in range(n):
                if usable[k, y, x]:
                    v = stack[k, y, x]
                    # insertion sort as the values arrive
                    i = count
                    while i > 0 and buf[i - 1] > v:
                        buf[i] = buf[i - 1]
                        i -= 1
                    buf[i] = v
                    count += 1
            cut = int(trim * count)  # floor: trim * count >= 0
            kept = count - 2 * cut
            if kept <= 0:
                out[y, x] = 0.0
                continue
            total = 0.0
            for i in range(cut, count - cut):
                total += buf[i]
            out[y, x] = total / kept


def trimmed_mean(stack, usable, trim):
    """(ny, nx) float32 trimmed mean over axis 0 (see the module)."""
    out = np.empty(stack.shape[1:], np.float32)
    if out.size:
        _trimmed_mean_kernel(stack, usable, trim, out)
    return out
