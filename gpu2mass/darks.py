"""Nightly darks (2MAPPS IV.2, facts sheet 1.2): the night's dark frames combined per band.

A dark scan (cold shutter closed) records, per pixel, what a raw value holds besides
light (raw-night spec section 3.2): in R1 the reset pedestal plus the dark signal of the
first 51 ms, in R2−R1 the dark signal of the R2−R1 interval. Its frames differ only by
noise, so all frames of all the night's dark scans are combined per band and per read
type into one image, by a per-pixel sigma-clipped mean:

1. per pixel, the median ``m`` and the robust scatter ``s = 1.4826 MAD`` over the frames;
2. frames with ``|x − m| > clip_sigma · max(s, MIN_CLIP_SCATTER_DN)`` are rejected
   (cosmic rays, a glitch); the scatter used is never below the typical pixel's noise;
3. the dark is the mean of the kept values, the noise map their standard deviation
   (``ddof = 1``: the per-frame noise of the pixel), the error map ``noise / sqrt(kept)``
   (the uncertainty of the dark itself).

A mean of the kept values, rather than the median, because the dark's error then is
``σ/√n`` (the median's is ``1.25 σ/√n``) and this error adds to every calibrated frame.

Defects found in the darks (bits as ``calib/badpix``: 2 hot, 4 noisy) are returned in
``defects``: hot where the R2−R1 dark exceeds the median dark by more than
``hot_sigma`` times the robust spatial scatter of the dark image; noisy where the R2−R1
noise exceeds ``noisy_factor`` times the median noise.

``run_darks`` takes scans one after the other, in any form that yields per-band R1 and
R2−R1 cubes (the reader's :class:`~gpu2mass.io.rawnight.Scan`, or a mapping band →
``(r1, r2r1)``), so ``night.py`` can stream them from :meth:`Night.iter_scans`. Scans are
read whole (a dark scan is 8–30 frames of 256 × 256: at most 8 MB per read type).
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import scipy.stats

from gpu2mass.backend import get_namespace
from gpu2mass.errors import ConfigError, InputError

__all__ = [
    "DEFECT_HOT",
    "DEFECT_NOISY",
    "MIN_CLIP_SCATTER_DN",
    "BandDark",
    "DarkConfig",
    "Darks",
    "run_darks",
]

#: Defect bit of a hot pixel (same value as bit 2 of ``calib/badpix``).
DEFECT_HOT = 2
#: Defect bit of a noisy pixel (same value as bit 4 of ``calib/badpix``).
DEFECT_NOISY = 4
#: Floor of the per-pixel robust scatter used for clipping, DN: integer raw data can give
#: a MAD of 0 for a quiet pixel, which would reject every value off the median.
MIN_CLIP_SCATTER_DN = 0.5
_MAD_TO_SIGMA = 1.482602218505602


@dataclass(frozen=True)
class DarkConfig:
    """Configuration of :func:`run_darks`.

    Attributes
    ----------
    clip_sigma
        Per-pixel rejection threshold in robust sigmas about the median over frames
        (dimensionless, > 0). 3 rejects cosmic rays and keeps 99.7 % of Gaussian noise.
        2MASS did not publish its combination rule ("all dark frames of a night
        combined").
    min_frames
        Fewest dark frames per band (over all scans) accepted, >= 2: the noise map needs
        at least two, and fewer than ~5 give a clipped mean no better than a plain one.
        Default 5.
    hot_sigma
        A pixel is hot when its R2−R1 dark exceeds the image median by more than this
        many robust spatial sigmas of the dark image (> 0). Default 10.
    noisy_factor
        A pixel is noisy when its R2−R1 per-frame noise exceeds this multiple of the
        median noise (> 1). Default 3 (NICMOS3 noisy pixels are 4–10×; the noise map of
        a normal pixel from 8 frames scatters by ~27 %, so 3× is a > 7σ excursion).
    """

    clip_sigma: float = 3.0
    min_frames: int = 5
    hot_sigma: float = 10.0
    noisy_factor: float = 3.0

    def __post_init__(self):
        if not (np.isfinite(self.clip_sigma) and self.clip_sigma > 0):
            raise ConfigError(f"darks.clip_sigma must be finite and > 0, not {self.clip_sigma!r}")
        if isinstance(self.min_frames, bool) or not isinstance(self.min_frames, (int, np.integer)) \
                or self.min_frames < 2:
            raise ConfigError(f"darks.min_frames must be an integer >= 2, not {self.min_frames!r}")
        if not (np.isfinite(self.hot_sigma) and self.hot_sigma > 0):
            raise ConfigError(f"darks.hot_sigma must be finite and > 0, not {self.hot_sigma!r}")
        if not (np.isfinite(self.noisy_factor) and self.noisy_factor > 1):
            raise ConfigError(
                f"darks.noisy_factor must be finite and > 1, not {self.noisy_factor!r}"
            )


@dataclass(frozen=True, eq=False)
class BandDark:
    """The dark of one band. Images are (ny, nx) arrays in the namespace the darks were
    computed in (NumPy or CuPy).

    Attributes
    ----------
    band
        ``"J"``, ``"H"`` or ``"K"``.
    r1, r2r1
        float32 darks, DN: pedestal + R1 dark signal; R2−R1 dark signal.
    noise_r1, noise_r2r1
        float32 per-pixel noise of one dark frame (std of the kept frames), DN.
    error_r1, error_r2r1
        float32 uncertainty of the dark itself, ``noise / sqrt(kept frames)``, DN.
    defects
        uint8 bits found in the darks: :data:`DEFECT_HOT`, :data:`DEFECT_NOISY`.
    nframes
        Dark frames combined (all scans).
    """

    band: str
    r1: Any
    r2r1: Any
    noise_r1: Any
    noise_r2r1: Any
    error_r1: Any
    error_r2r1: Any
    defects: Any
    nframes: int


@dataclass(frozen=True, eq=False)
class Darks:
    """Result of :func:`run_darks`: one :class:`BandDark` per band (``darks["K"]``),
    ``nscans`` dark scans combined (0 when taken from a library), ``source`` ``"scans"``
    or ``"library"``."""

    bands: Mapping[str, BandDark]
    nscans: int
    source: str

    def __getitem__(self, band: str) -> BandDark:
        try:
            return self.bands[band]
        except KeyError:
            raise InputError(None, f"the darks have no band {band!r} (they have "
                                   f"{tuple(self.bands)})") from None


def _band_pairs(scan) -> dict[str, tuple[Any, Any]]:
    """band → (r1, r2r1) of one scan: a reader Scan (``.bands[b].r1``) or a mapping."""
    bands = getattr(scan, "bands", scan)
    if not isinstance(bands, Mapping):
        raise InputError(None, f"a dark scan must be a Scan or a mapping band -> (r1, r2r1), "
                               f"got {type(scan).__name__}")
    out = {}
    for band, value in bands.items():
        if hasattr(value, "r1") and hasattr(value, "r2r1"):
            out[band] = (value.r1, value.r2r1)
        else:
            try:
                r1, r2r1 = value
            except (TypeError, ValueError):
                raise InputError(None, f"dark scan band {band!r}: expected a pair (r1, r2r1) "
                                       f"of cubes, got {type(value).__name__}") from None
            out[band] = (r1, r2r1)
    return out


def _read(cube) -> Any:
    """The whole cube as an array (a RawCube decodes on slicing; arrays pass through)."""
    return cube[0:len(cube)]


def _combine(xp: types.ModuleType, stack, clip_sigma: float):
    """Sigma-clipped mean, per-frame noise and error of the mean over axis 0 (float32)."""
    n = stack.shape[0]
    stack = stack.astype(xp.float64, copy=False)
    med = xp.median(stack, axis=0)
    dev = xp.abs(stack - med)
    # Clipping scale: the pixel's own robust scatter, but never below the typical pixel's
    # noise. The MAD of 8-30 frames scatters by 20-40 %, so clipping at 3 of a pixel's own
    # MAD would cut into its Gaussian core; the image-wide typical noise is known to < 1 %:
    # the median over pixels of the per-pixel variance, unbiased by the median of a
    # chi-square with n - 1 degrees of freedom (cosmic rays and hot pixels are too few to
    # move that median).
    scatter = _MAD_TO_SIGMA * xp.median(dev, axis=0)
    typical = math.sqrt(float(xp.median(stack.var(axis=0, ddof=1)))
                        / (scipy.stats.chi2.median(n - 1) / (n - 1)))
    scale = xp.maximum(scatter, max(typical, MIN_CLIP_SCATTER_DN))
    keep = dev <= clip_sigma * scale
    kept = keep.sum(axis=0)  # >= half the frames: the median's neighbours are always kept
    mean = xp.where(keep, stack, 0.0).sum(axis=0) / kept
    var = xp.where(keep, (stack - mean) ** 2, 0.0).sum(axis=0) / xp.maximum(kept - 1, 1)
    # The kept values are a Gaussian truncated at about ±clip_sigma σ, whose variance is
    # smaller than σ² by the factor below (0.973 at 3σ); undo it so the map estimates σ.
    noise = xp.sqrt(var / _truncated_variance(clip_sigma))
    return (mean.astype(xp.float32), noise.astype(xp.float32),
            (noise / xp.sqrt(kept)).astype(xp.float32))


def _truncated_variance(c: float) -> float:
    """Variance of a unit Gaussian truncated to [−c, c]."""
    phi = math.exp(-0.5 * c * c) / math.sqrt(2 * math.pi)
    return 1.0 - 2.0 * c * phi / math.erf(c / math.sqrt(2))


def _robust_sigma(xp, image) -> tuple[float, float]:
    """(robust sigma 1.4826 MAD, median) of an image."""
    med = xp.median(image)
    return float(_MAD_TO_SIGMA * xp.median(xp.abs(image - med))), float(med)


def run_darks(dark_scans: Iterable, *, config: DarkConfig = DarkConfig(),
              library: Darks | None = None) -> Darks:
    """Combine the night's dark scans into per-band R1 and R2−R1 darks.

    Parameters
    ----------
    dark_scans
        The night's dark scans, in any order, each a reader
        :class:`~gpu2mass.io.rawnight.Scan` or a mapping band → ``(r1, r2r1)`` of
        (n, ny, nx) DN cubes (:class:`~gpu2mass.io.rawnight.RawCube`, NumPy or CuPy
        arrays). Every scan must have the same bands and frame shape. Consumed once, one
        scan at a time (a generator is fine).
    config
        :class:`DarkConfig`.
    library
        Darks to use when the night has no dark scan (e.g. the "grand canonical" darks of
        the night's time block, facts sheet 1.2). Ignored when there are dark scans.

    Returns
    -------
    Darks
        Per band (ny, nx) float32 darks, noise and error maps and uint8 defects, in the
        namespace of the cubes' data (NumPy for reader cubes).

    Raises
    ------
    InputError
        No dark scan and no library; scans with different bands or frame shapes; a band
        with fewer than ``config.min_frames`` frames.
    """
    stacks: dict[str, list[tuple[Any, Any]]] = {}
    nscans = 0
    for scan in dark_scans:
        pairs = _band_pairs(scan)
        if stacks and set(pairs) != set(stacks):
            raise InputError(None, f"dark scan {nscans + 1} has bands {sorted(pairs)} but the "
                                   f"earlier dark scans have {sorted(stacks)}")
        for band, (r1, r2r1) in pairs.items():
            a, b = _read(r1), _read(r2r1)
            if a.ndim != 3 or a.shape != b.shape:
                raise InputError(None, f"dark scan {nscans + 1} band {band}: R1 {a.shape} and "
                                       f"R2R1 {b.shape} must be (n, ny, nx) cubes of one shape")
            seen = stacks.setdefault(band, [])
            if seen and seen[0][0].shape[1:] != a.shape[1:]:
                raise InputError(None, f"dark scan {nscans + 1} band {band}: frame shape "
                                       f"{a.shape[1:]} differs from {seen[0][0].shape[1:]}")
            seen.append((a, b))
        nscans += 1
    if nscans == 0:
        if library is not None:
            return library
        raise InputError(None, "the night has no dark scan (type 'dark') and no dark "
                               "library was given: darks are needed to calibrate frames")
    out = {}
    for band, pairs in stacks.items():
        xp = get_namespace(*(a for pair in pairs for a in pair))
        r1 = xp.concatenate([xp.asarray(a) for a, _ in pairs])
        r2r1 = xp.concatenate([xp.asarray(b) for _, b in pairs])
        n = r1.shape[0]
        if n < config.min_frames:
            raise InputError(None, f"band {band}: {n} dark frame(s) over {nscans} dark "
                                   f"scan(s), fewer than darks.min_frames = {config.min_frames}")
        d1, s1, e1 = _combine(xp, r1, config.clip_sigma)
        d21, s21, e21 = _combine(xp, r2r1, config.clip_sigma)
        sig, med = _robust_sigma(xp, d21)
        hot = d21 > med + config.hot_sigma * max(sig, MIN_CLIP_SCATTER_DN)
        noisy = s21 > config.noisy_factor * float(xp.median(s21))
        defects = (xp.where(hot, DEFECT_HOT, 0) | xp.where(noisy, DEFECT_NOISY, 0)).astype(xp.uint8)
        out[band] = BandDark(band, d1, d21, s1, s21, e1, e21, defects, int(n))
    return Darks(MappingProxyType(out), nscans, "scans")
