"""Frame calibration (2MAPPS IV.2, facts sheet 1.4): one band of one scan, R1 and R2−R1.

For every frame ``f`` and read type (R2−R1, R1)::

    cal_f  = (raw_f − dark) / flat                       fused kernel, with the mask
    level_f = median of cal_f over usable pixels
    P_b    = per-pixel trimmed mean over the frames of block b of (cal_f − level_f)
    sky_f  = median of (cal_f − P_b(f)) over usable pixels
    out_f  = cal_f − P_b(f) − sky_f

1. **Fused calibration** (:func:`gpu2mass.kernels.calibrate_frames`): dark subtraction,
   flat-fielding and the mask bits in one pass per read type. Mask bits
   (:mod:`gpu2mass.kernels.scalar.calibrate`, registry :data:`MASK_BITS`): 1 bad pixel
   (``badpix`` non-zero), 2 read 2 saturated (``R1 + R2R1 >= SAT − margin``, the spec's
   rule), 4 R1 saturated (``R1 >= SAT − margin``; sets 2 too), 8 non-finite value.
   Usable pixels: none of :data:`UNUSABLE_R2R1` (1, 2, 4, 8) in R2−R1 frames, none of
   :data:`UNUSABLE_R1` (1, 4, 8) in R1 frames (R1 is what rescues read-2-saturated stars).
2. **Sky-illumination offset**: the additive pattern common to a block of frames (the
   second-release text: a trimmed average of blocks of >= 42 dark-subtracted, flat-fielded
   frames). Stars move ~41 px between frames (82.8" steps), so a pixel sees a given star
   in one frame or two of a block; trimming removes them, and what is left is the fixed
   structure (residual dark and flat errors, any sky structure that stays put in camera
   coordinates over the block). Blocks of ``illumination_block_frames`` consecutive frames are placed
   every ``illumination_stride_frames`` frames (running blocks sampled at a stride); each
   frame uses the block whose centre is nearest. A scan shorter than a block uses one
   block: the whole scan. Pixels with no usable value in a block get pattern 0.
3. **Per-frame background offset**: each frame's sky level ``sky_f`` (median) is
   subtracted ("short-term frame biases"); ``noise_f`` is half the distance between the
   15.87 % and 84.13 % quantiles of the usable pixels (facts sheet 3.2).

Outputs are DN at flat = 1, sky-subtracted; pixels with bit 1 or 8 hold 0; saturated
pixels keep their (clipped) calibrated value.

Trim fraction. 2MASS's is unknown (facts sheet 1.4, "trim fraction unconfirmed"); the
default here is 0.2 of the values from each end. Measured on the tiny test night's sci
scan (30 frames, one block; J and Ks, trim 0 / 0.05 / 0.1 / 0.2 / 0.3 / 0.4): the largest
pattern value on a good pixel (a star left in) falls 754 / 125 / 40 / 16 / 15 / 15 DN (J),
the mean pattern (positive bias from sources) +4.65 / +0.17 / +0.07 / +0.03 / +0.01 /
+0.01 DN, while the pattern's pixel scatter is 30.0 / 3.11 / 2.90 / 2.89 / 2.97 / 3.07 DN:
0.2 is where the star residue stops falling and the noise has not yet risen. A ±8 DN
residual gradient is recovered to 0.10 DN rms (J), 0.20 (Ks) at every trim. The pattern's
scatter is 1.05–1.08× its ideal (frame noise/sqrt(30) plus the dark's own error, which
the pattern rightly picks up; ``tests/test_frames.py`` holds it below 1.3×).

Works on NumPy (CPU) and CuPy (GPU) arrays alike: the namespace comes from the inputs
(:func:`gpu2mass.backend.get_namespace`), and nothing is copied between host and device.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu2mass.backend import get_namespace
from gpu2mass.errors import ConfigError, InputError, StepError
from gpu2mass.kernels.calibrate import (
    MASK_BAD,
    MASK_BITS,
    MASK_NONFINITE,
    MASK_R1_SATURATED,
    MASK_SATURATED,
    UNUSABLE_R1,
    UNUSABLE_R2R1,
    calibrate_frames,
)

__all__ = [
    "MASK_BAD",
    "MASK_BITS",
    "MASK_NONFINITE",
    "MASK_R1_SATURATED",
    "MASK_SATURATED",
    "NOISE_QUANTILES",
    "UNUSABLE_R1",
    "UNUSABLE_R2R1",
    "CalibratedFrames",
    "FrameConfig",
    "illumination_blocks",
    "pixel_noise",
    "run_calibrate_frames",
]

#: Quantiles whose half distance is the frame noise (±1σ of a Gaussian; facts sheet 3.2).
NOISE_QUANTILES = (0.1587, 0.8413)


@dataclass(frozen=True)
class FrameConfig:
    """Configuration of :func:`run_calibrate_frames`.

    Attributes
    ----------
    saturation_margin_dn
        DN below the full well ``SAT`` at which read 2 (and R1) count as saturated
        (spec 3.2: ``R1 + R2R1 >= SAT − margin``), >= 0. Default 5 DN: read 2 of a
        saturated pixel is ``SAT`` up to the integer rounding of R1 and R2R1 stored
        separately (up to 1 DN), and float32 storage of SAT; 5 DN covers that with room
        while costing unsaturated pixels nothing (a full well is ~10^4 DN above the
        pedestal). 2MASS's R2 threshold is unconfirmed (facts sheet 1.5).
    illumination_block_frames
        Frames per block of the sky-illumination offset (>= 2). 2MASS: blocks of >= 42.
    illumination_stride_frames
        Frames between the starts of successive blocks (>= 1, <= the block): 21, half a
        block, so that a frame is never more than ~11 frames from its block's centre at
        a fraction of the cost of a block per frame.
    illumination_trim
        Fraction of the values (per pixel and block) trimmed from each end before the
        mean, in [0, 0.5). Default 0.2 (see the module docstring).
    """

    saturation_margin_dn: float = 5.0
    illumination_block_frames: int = 42
    illumination_stride_frames: int = 21
    illumination_trim: float = 0.2

    def __post_init__(self):
        m = self.saturation_margin_dn
        if not (np.isfinite(m) and m >= 0):
            raise ConfigError(f"frames.saturation_margin_dn must be finite and >= 0, not {m!r}")
        for name in ("illumination_block_frames", "illumination_stride_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"frames.{name} must be a positive integer, not {v!r}")
        if self.illumination_block_frames < 2:
            raise ConfigError("frames.illumination_block_frames must be >= 2, not "
                              f"{self.illumination_block_frames}")
        if self.illumination_stride_frames > self.illumination_block_frames:
            raise ConfigError("frames.illumination_stride_frames must not exceed "
                              "frames.illumination_block_frames")
        t = self.illumination_trim
        if not (np.isfinite(t) and 0 <= t < 0.5):
            raise ConfigError(f"frames.illumination_trim must be in [0, 0.5), not {t!r}")


@dataclass(frozen=True, eq=False)
class CalibratedFrames:
    """Result of :func:`run_calibrate_frames` for one band of one scan.

    Arrays live in the inputs' namespace (NumPy or CuPy). ``n`` frames of (ny, nx).

    Attributes
    ----------
    r2r1, r1
        float32 (n, ny, nx): calibrated, illumination-corrected, sky-subtracted frames,
        DN at flat = 1; 0 where the mask has bit 1 (bad) or 8 (non-finite).
    mask_r2r1, mask_r1
        uint8 (n, ny, nx) mask bits (module docstring; :data:`MASK_BITS`).
    sky_r2r1, sky_r1
        float64 (n,): each frame's sky level before subtraction (median of the usable
        pixels after the illumination correction), DN at flat = 1, dark excluded.
    noise_r2r1, noise_r1
        float64 (n,): half the 15.87–84.13 % quantile span of the usable pixels, DN.
    illumination_r2r1, illumination_r1
        float32 (nblocks, ny, nx): the additive pattern of each block, DN (subtracted), with
        median 0 (a shape: the level is the sky).
    block
        int64 (n,): the block (index into the illumination stacks) each frame used.
    block_frames
        int64 (nblocks, 2): first and one-past-last frame of each block.
    """

    r2r1: Any
    r1: Any
    mask_r2r1: Any
    mask_r1: Any
    sky_r2r1: Any
    sky_r1: Any
    noise_r2r1: Any
    noise_r1: Any
    illumination_r2r1: Any
    illumination_r1: Any
    block: Any
    block_frames: Any


def illumination_blocks(nframes: int, block_frames: int, stride_frames: int):
    """The running blocks of a scan: ``(starts, block)``.

    ``starts`` (nblocks,) first frame of each block of ``min(block_frames, nframes)``
    frames, spread evenly from 0 to ``nframes − block`` at most ``stride_frames`` apart;
    ``block`` (nframes,) the block whose centre is nearest each frame. NumPy int64.
    """
    length = min(block_frames, nframes)
    span = nframes - length
    nblocks = 1 if span == 0 else -(-span // stride_frames) + 1
    starts = np.rint(np.linspace(0, span, nblocks)).astype(np.int64)
    centres = starts + (length - 1) / 2.0
    frames = np.arange(nframes)
    block = np.abs(frames[:, None] - centres[None, :]).argmin(axis=1).astype(np.int64)
    return starts, block


def _frame_quantiles(xp: types.ModuleType, values, usable, qs, what: str):
    """Quantiles ``qs`` of each frame's usable pixels, linear interpolation (float64), as a
    list of (n,) arrays; like ``numpy.quantile`` (:func:`gpu2mass.kernels.robust.frame_quantiles`)."""
    from gpu2mass.kernels.robust import frame_quantiles

    out = frame_quantiles(values, usable, qs)
    empty = xp.isnan(out[0])
    if bool(xp.any(empty)):
        raise StepError(f"{what} frame {int(xp.nonzero(empty)[0][0])} has no usable pixel "
                        "(all masked): cannot measure its sky level")
    return list(out)


def _trimmed_mean(xp: types.ModuleType, stack, usable, trim: float):
    """Per-pixel mean over axis 0 of the usable values after trimming ``trim`` of them
    from each end (``floor(trim · count)``); 0 where a pixel has no usable value
    (:func:`gpu2mass.kernels.robust.trimmed_mean`)."""
    from gpu2mass.kernels.robust import trimmed_mean

    return trimmed_mean(stack, usable, trim)


def _process_read(xp, values, mask, unusable: int, config: FrameConfig, starts, block, what):
    usable = (mask & unusable) == 0
    # The level taken out before the illumination pattern only has to be close: whatever
    # it misses, the pattern's trimmed mean and then each frame's own sky (from every pixel,
    # below) take up. Every 4th pixel of every 4th row gives it at a 16th of the sort.
    (level,) = _frame_quantiles(xp, values[:, ::4, ::4], usable[:, ::4, ::4], (0.5,), what)
    resid = values - level.astype(xp.float32)[:, None, None]
    length = min(config.illumination_block_frames, values.shape[0])
    pattern = xp.stack([
        _trimmed_mean(xp, resid[s:s + length], usable[s:s + length], config.illumination_trim)
        for s in starts.tolist()
    ])
    del resid
    # The pattern is a shape: its own level (what the subsampled ``level`` missed) goes,
    # so that the sky measured next is the frames' whole level.
    pattern -= xp.median(pattern.reshape(pattern.shape[0], -1), axis=1).astype(xp.float32)[:, None, None]
    corrected = values - pattern[xp.asarray(block)]
    sky, q_lo, q_hi = _frame_quantiles(xp, corrected, usable, (0.5,) + NOISE_QUANTILES, what)
    corrected -= sky.astype(xp.float32)[:, None, None]
    corrected[(mask & (MASK_BAD | MASK_NONFINITE)) != 0] = 0.0
    return corrected, sky, 0.5 * (q_hi - q_lo), pattern


def run_calibrate_frames(r1, r2r1, *, dark, flat, satmap, badpix,
                         config: FrameConfig = FrameConfig()) -> CalibratedFrames:
    """Calibrate the R1 and R2−R1 frames of one band of one scan.

    Parameters
    ----------
    r1, r2r1
        Raw (n, ny, nx) stacks, DN (integer or float), NumPy or CuPy (a reader
        :class:`~gpu2mass.io.rawnight.RawCube` is read whole).
    dark
        The band's dark: a :class:`gpu2mass.darks.BandDark` (or anything with (ny, nx)
        ``r1`` and ``r2r1`` arrays, DN), in the same namespace as the frames.
    flat
        (ny, nx) relative responsivity, median 1.
    satmap
        (ny, nx) full-well level of read 2, DN.
    badpix
        (ny, nx) integer bad-pixel map, non-zero bad (``night.py`` may OR in the darks'
        ``defects``).
    config
        :class:`FrameConfig`.

    Returns
    -------
    CalibratedFrames

    Raises
    ------
    InputError
        Mismatched shapes, or arrays on different devices.
    StepError
        A frame with no usable pixel (all masked).
    """
    if hasattr(r1, "read") and not hasattr(r1, "__array_namespace__"):
        r1 = r1[0:len(r1)]
    if hasattr(r2r1, "read") and not hasattr(r2r1, "__array_namespace__"):
        r2r1 = r2r1[0:len(r2r1)]
    try:
        xp = get_namespace(r1, r2r1, dark.r1, dark.r2r1, flat, satmap, badpix)
    except TypeError as exc:
        raise InputError(None, f"frame calibration inputs: {exc}") from None
    if r1.ndim != 3 or r1.shape != r2r1.shape:
        raise InputError(None, f"R1 {tuple(r1.shape)} and R2R1 {tuple(r2r1.shape)} must be "
                               "(n, ny, nx) stacks of one shape")
    if r1.shape[0] == 0:
        raise InputError(None, "no frames to calibrate (an empty stack)")
    for name, a in (("dark.r1", dark.r1), ("dark.r2r1", dark.r2r1), ("flat", flat),
                    ("satmap", satmap), ("badpix", badpix)):
        if tuple(a.shape) != tuple(r1.shape[1:]):
            raise InputError(None, f"{name} has shape {tuple(a.shape)}, but the frames are "
                                   f"{tuple(r1.shape[1:])}")
    margin = config.saturation_margin_dn
    starts, block = illumination_blocks(r1.shape[0], config.illumination_block_frames,
                                        config.illumination_stride_frames)
    out = {}
    for read, dk, unusable in (("r2r1", dark.r2r1, UNUSABLE_R2R1), ("r1", dark.r1, UNUSABLE_R1)):
        values, mask = calibrate_frames(r1, r2r1, dk, flat, satmap, badpix, read=read,
                                        margin=margin)
        what = "R2R1" if read == "r2r1" else "R1"
        out[read] = (*_process_read(xp, values, mask, unusable, config, starts, block, what), mask)
    bounds = np.stack([starts, starts + min(config.illumination_block_frames, r1.shape[0])], 1)
    return CalibratedFrames(
        r2r1=out["r2r1"][0], r1=out["r1"][0],
        mask_r2r1=out["r2r1"][4], mask_r1=out["r1"][4],
        sky_r2r1=out["r2r1"][1], sky_r1=out["r1"][1],
        noise_r2r1=out["r2r1"][2], noise_r1=out["r1"][2],
        illumination_r2r1=out["r2r1"][3], illumination_r1=out["r1"][3],
        block=xp.asarray(block), block_frames=xp.asarray(bounds),
    )


def pixel_noise(frames, mask):
    """Pixel-to-pixel noise of each frame (n,), DN: the robust spread (half the
    15.87–84.13 % span) of differences between horizontal neighbours, divided by √2.

    Unlike the histogram width of :class:`CalibratedFrames` (2MASS's frame noise, which
    also holds sky structure such as H-band airglow waves), this is blind to structure
    larger than a pixel: the noise that propagates into resampled images and apertures.
    ``mask`` (n, ny, nx): non-zero pixels are left out. Every second row is used: its
    ~32,000 pairs per 256 × 256 frame give the noise to ~0.6 % (rms), and the sort is the
    step's cost (0.29 s per band of a 273-frame scan with every row, 0.09 s with half).
    """
    xp = get_namespace(frames, mask)
    frames, mask = frames[:, ::2], mask[:, ::2]
    good = mask == 0
    pair = good[:, :, 1:] & good[:, :, :-1]
    diff = frames[:, :, 1:] - frames[:, :, :-1]
    few = pair.reshape(pair.shape[0], -1).sum(axis=1) < 100
    if bool(xp.any(few)):
        f = int(xp.nonzero(few)[0][0])
        raise StepError(f"frame {f}: fewer than 100 usable neighbour pairs to measure its noise")
    from gpu2mass.kernels.robust import frame_quantiles

    lo, hi = frame_quantiles(diff, pair, NOISE_QUANTILES)
    return (hi - lo) / 2 / np.sqrt(2.0)
