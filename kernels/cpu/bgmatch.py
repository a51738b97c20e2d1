"""CPU loop (Numba) of the Atlas background matching: each frame's offset from the image so far.

:func:`gpu2mass.atlas._background_offsets` states the rule: frames in scan order, each
offset by the median of (incoming − running weighted mean) over the subsampled pixels both
cover, then added to the running mean. In NumPy each frame made half a dozen temporaries of
its box (26 ms per Atlas Image, 2 s per full scan on one thread); this loop computes the same
sums, pixel by pixel in the same order, and the same median.
"""

from __future__ import annotations

import math

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel

__all__ = ["background_offsets"]


@cpu_kernel
def _offsets_kernel(vals, boxes, weights, step, min_overlap, num, den, offsets):
    n = vals.shape[0]
    buf = np.empty(num.shape[0] * num.shape[1])
    for j in range(n):
        r0 = -(-boxes[j, 0] // step)
        r1 = -(-boxes[j, 1] // step)
        c0 = -(-boxes[j, 2] // step)
        c1 = -(-boxes[j, 3] // step)
        m = 0
        for r in range(r0, r1):
            for c in range(c0, c1):
                v = np.float64(vals[j, r * step, c * step])
                if math.isfinite(v) and den[r, c] > 0:
                    buf[m] = v - num[r, c] / den[r, c]
                    m += 1
        off = 0.0
        if m * step * step >= min_overlap:
            off = np.median(buf[:m])
        w = weights[j]
        for r in range(r0, r1):
            for c in range(c0, c1):
                v = np.float64(vals[j, r * step, c * step])
                if math.isfinite(v):
                    num[r, c] += w * (v - off)
                    den[r, c] += w
        offsets[j] = off


def background_offsets(vals, boxes, weights, step: int, min_overlap: int):
    """(n,) float64 offsets of the resampled frames ``vals`` (float32 (n, H, W), read only
    inside ``boxes`` (int (n, 4): row0, row1, col0, col1)) with weights (n,), on every
    ``step``-th row and column; see :func:`gpu2mass.atlas._background_offsets`."""
    n, h, w = vals.shape
    rows, cols = -(-h // step), -(-w // step)
    num = np.zeros((rows, cols))
    den = np.zeros((rows, cols))
    offsets = np.zeros(n)
    if n:
        _offsets_kernel(vals, np.ascontiguousarray(boxes, np.int64),
                        np.ascontiguousarray(weights, np.float64), int(step), int(min_overlap),
                        num, den, offsets)
    return offsets
