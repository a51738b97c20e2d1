"""CPU driver (Numba ``prange``) of the fused per-pixel frame calibration.

Takes plain, validated NumPy arrays; :mod:`gpu2mass.kernels.calibrate` is the public entry
point. One ``prange`` iteration per (frame, row); the inner loop over a row calls the
scalars of :mod:`gpu2mass.kernels.scalar.calibrate`. Compiled on first call for each
combination of input dtypes (about 1–2 s each), then memoized for the process.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import cpu_kernel
from gpu2mass.kernels.scalar.calibrate import MASK_NONFINITE, calibrated_value, pixel_flags
from numba import prange

__all__ = ["calibrate_frames"]


@cpu_kernel(parallel=True)
def _calibrate_kernel(r1, r2r1, dark, flat, sat, badpix, margin, use_r1, out, mask):
    n, ny, nx = r1.shape
    for fy in prange(n * ny):
        f = fy // ny
        y = fy - f * ny
        for x in range(nx):
            a = r1[f, y, x]
            b = r2r1[f, y, x]
            raw = a if use_r1 else b
            v = calibrated_value(raw, dark[y, x], flat[y, x])
            m = pixel_flags(a, b, sat[y, x], margin, badpix[y, x], v)
            if m & MASK_NONFINITE:
                v = 0.0
            out[f, y, x] = v
            mask[f, y, x] = m


def calibrate_frames(r1, r2r1, dark, flat, sat, badpix, margin: float, use_r1: bool):
    """Calibrate one read type of a stack on the CPU.

    Parameters
    ----------
    r1, r2r1
        C-contiguous (n, ny, nx) raw DN arrays (any real dtype).
    dark, flat, sat, badpix
        C-contiguous (ny, nx): dark of the read type (DN), flat (relative), read-2 full
        well (DN), bad-pixel map (non-zero bad).
    margin
        Saturation margin, DN.
    use_r1
        True to calibrate R1 (``raw = r1``), False for R2−R1 (``raw = r2r1``).

    Returns
    -------
    values, mask
        float32 and uint8 arrays (n, ny, nx).
    """
    out = np.empty(r1.shape, dtype=np.float32)
    mask = np.empty(r1.shape, dtype=np.uint8)
    if r1.size:
        _calibrate_kernel(r1, r2r1, dark, flat, sat, badpix, float(margin), bool(use_r1), out, mask)
    return out, mask
