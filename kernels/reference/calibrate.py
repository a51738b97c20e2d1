"""Slow, straightforward NumPy version of the fused frame calibration (host only).

Shares only the definitions (mask bits) with the fast paths in
:mod:`gpu2mass.kernels.cpu.calibrate` and :mod:`gpu2mass.kernels.cuda.calibrate`.
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels.scalar.calibrate import (
    MASK_BAD,
    MASK_NONFINITE,
    MASK_R1_SATURATED,
    MASK_SATURATED,
)

__all__ = ["calibrate_frames"]


def calibrate_frames(r1, r2r1, dark, flat, sat, badpix, margin: float, use_r1: bool):
    """Reference of :func:`gpu2mass.kernels.calibrate_frames`: float32 values, uint8 mask."""
    a = np.asarray(r1, dtype=np.float64)
    b = np.asarray(r2r1, dtype=np.float64)
    flat = np.asarray(flat, dtype=np.float64)
    raw = a if use_r1 else b
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(flat > 0, (raw - np.asarray(dark, np.float64)) / np.where(flat > 0, flat, 1.0), np.nan)
    limit = np.asarray(sat, dtype=np.float64) - margin
    mask = np.zeros(a.shape, dtype=np.uint8)
    mask |= np.where(np.asarray(badpix) != 0, MASK_BAD, 0).astype(np.uint8)
    mask |= np.where(a + b >= limit, MASK_SATURATED, 0).astype(np.uint8)
    mask |= np.where(a >= limit, MASK_R1_SATURATED | MASK_SATURATED, 0).astype(np.uint8)
    nonfinite = ~np.isfinite(value)
    mask |= np.where(nonfinite, MASK_NONFINITE, 0).astype(np.uint8)
    return np.where(nonfinite, 0.0, value).astype(np.float32), mask
