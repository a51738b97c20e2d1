"""Per-pixel frame calibration (2MAPPS IV.2) as scalar functions, and the mask bits.

For one pixel of one frame with raw reads ``r1`` (R1) and ``r2r1`` (R2 − R1), in DN::

    value = (raw − dark) / flat          raw = r2r1 or r1, dark of the same read type

computed in float64 (stored as float32 by the drivers). The mask bits (uint8):

=====================  ===  ==============================================================
:data:`MASK_BAD`        1   ``badpix`` non-zero (dead, hot, noisy, low responsivity):
                            no usable signal (raw-night spec section 4).
:data:`MASK_SATURATED`  2   read 2 saturated: ``r1 + r2r1 >= SAT − margin`` (spec 3.2).
                            The R2−R1 value is clipped; the R1 value is still good.
:data:`MASK_R1_SATURATED`
                        4   R1 saturated: ``r1 >= SAT − margin``; both values clipped
                            (read 2 = R1 + R2R1 is then also >= SAT, so bit 2 is set too).
:data:`MASK_NONFINITE`  8   the calibrated value is not finite (non-finite raw, dark or
                            flat, or ``flat <= 0``); the drivers store 0 there.
=====================  ===  ==============================================================

The saturation bits are the same in the R1 and the R2−R1 masks (they describe the pixel's
reads); only :data:`MASK_NONFINITE` depends on the read type. A pixel is usable in R2−R1
frames when its mask has none of :data:`UNUSABLE_R2R1`, in R1 frames when it has none of
:data:`UNUSABLE_R1`.
"""

from __future__ import annotations

import math

from gpu2mass.kernels._targets import scalar

__all__ = [
    "MASK_BAD",
    "MASK_BITS",
    "MASK_NONFINITE",
    "MASK_R1_SATURATED",
    "MASK_SATURATED",
    "UNUSABLE_R1",
    "UNUSABLE_R2R1",
    "calibrated_value",
    "pixel_flags",
]

#: Bad pixel (``calib/badpix_<band>.fits`` non-zero).
MASK_BAD = 1
#: Read 2 (R1 + R2R1) at or above SAT − margin: the R2−R1 value is clipped.
MASK_SATURATED = 2
#: R1 at or above SAT − margin: the R1 value is clipped too.
MASK_R1_SATURATED = 4
#: Calibrated value not finite (or flat <= 0); stored as 0.
MASK_NONFINITE = 8
#: Bit → short description (the registry of this module's bits).
MASK_BITS = {
    MASK_BAD: "bad pixel (calibration bad-pixel map)",
    MASK_SATURATED: "read 2 saturated (R1 + R2R1 >= SAT - margin)",
    MASK_R1_SATURATED: "R1 saturated (R1 >= SAT - margin)",
    MASK_NONFINITE: "calibrated value not finite (or flat <= 0); stored as 0",
}
#: Bits that make an R2−R1 value unusable.
UNUSABLE_R2R1 = MASK_BAD | MASK_SATURATED | MASK_R1_SATURATED | MASK_NONFINITE
#: Bits that make an R1 value unusable (read-2 saturation alone does not).
UNUSABLE_R1 = MASK_BAD | MASK_R1_SATURATED | MASK_NONFINITE


@scalar
def calibrated_value(raw, dark, flat):
    """(raw − dark) / flat in DN at flat = 1 (float64); NaN when flat <= 0 or is NaN."""
    f = float(flat)
    if not f > 0.0:
        return math.nan
    return (float(raw) - float(dark)) / f


@scalar
def pixel_flags(r1, r2r1, sat, margin, bad, value):
    """The mask bits of one pixel (see the module docstring) as an int in [0, 15].

    ``r1``, ``r2r1`` raw DN; ``sat`` the full-well level of read 2 (DN); ``margin`` DN;
    ``bad`` the bad-pixel map value; ``value`` the calibrated value of the read type.
    """
    bits = 0
    if bad != 0:
        bits |= MASK_BAD
    limit = float(sat) - margin
    a = float(r1)
    if a + float(r2r1) >= limit:
        bits |= MASK_SATURATED
    if a >= limit:
        bits |= MASK_R1_SATURATED | MASK_SATURATED
    if not math.isfinite(value):
        bits |= MASK_NONFINITE
    return bits
