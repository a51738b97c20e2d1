"""Point-source detection on Atlas Images (2MAPPS IV.4, facts sheet 3.3: "detection on the
coadded Atlas Image; fitting on the stack of frames").

:func:`run_detect` finds the point sources of one band's Atlas Image and hands them, with
their blend groups, to the PSF fitter. The steps, and what this implementation decided
where 2MASS is not explicit:

1. **Holes and edges.** Pixels with no coverage, a non-finite value or SIGMA are unusable.
   Unusable regions that do not touch the image border and have at most
   :attr:`DetectConfig.hole_max_pixels` pixels are *holes* (masked or saturated star cores,
   bad-pixel clusters): they are filled with the value (and SIGMA) of the nearest usable
   pixel, so that a star with a masked core stays one peak (a zero-filled hole would make
   the matched filter respond with a ring of peaks). Larger regions and the coverage edge
   are left out (weight 0) and sources near them flagged.
2. **Background.** A smooth background map is subtracted first: clipped medians
   (:attr:`~DetectConfig.mesh_clip_sigma`, three passes) in meshes of
   :attr:`~DetectConfig.mesh_px` pixels, meshes with too few usable pixels filled from the
   nearest good one, a 3 × 3 median filter over the meshes, and a cubic spline through the
   mesh centres (SExtractor's scheme; 64" meshes keep a bright star's halo out of it).
3. **Matched filter.** The Atlas PSF is the frames' PSF seen through the Atlas resampling:
   a Moffat (index :attr:`~DetectConfig.psf_beta`, 2.5 in the simulator) whose optical
   FWHM makes the 2"-pixel-sampled FWHM equal to ``seeing_fwhm_arcsec`` (the Atlas header's
   ``SEEING``, the 2MASS convention), convolved with the 2" frame pixel (a box) and with
   the bilinear interpolation kernel of :mod:`gpu2mass.atlas` (a tent of half-width one
   frame pixel per axis, which averaged over the sub-pixel phases of the ~6 frames is a
   convolution), sampled at the 1" Atlas pixel centres. Measured on the tiny night's
   Atlas Images: the median residual of bright isolated stars, the model placed at their
   true positions, is 1.4-1.9 % of the peak (``tests/test_detect.py``). The kernel ``K`` (unit sum, radius
   :attr:`~DetectConfig.kernel_radius_arcsec`) is applied by FFT; missing pixels count 0.
4. **Noise and SNR.** The filtered image ``F = K ⊛ d`` has the propagated variance
   ``K² ⊛ SIGMA²`` for independent pixels; the resampling correlates neighbours, so the
   real noise is a scale ``c`` times that. ``c`` is measured on each image (v3.0: an
   estimator that ignores low-frequency structure): the robust width of the lower half of
   ``F / sqrt(K² ⊛ SIGMA²)`` over pixels where the kernel lies wholly on usable data
   (the lower half is not widened by sources; the background map took out the
   low frequencies). Measured: 2.7-3.1 on the tiny night's Atlas Images (the
   resampling's correlation, as ``NCORFAC``). The SNR map ``F / (c sqrt(K² ⊛ SIGMA²))``
   then has unit noise on source-free sky (measured robust std 0.92-0.97 by band and
   image, test ``test_snr_map_has_unit_noise``), and the coverage variations of SIGMA
   carry over to it.
5. **Peaks.** Local maxima (3 × 3) of the SNR map at or above
   :attr:`~DetectConfig.threshold_snr` (5, decided here: the 10σ limits need ≥ 99 %
   completeness; stars at those magnitudes have matched-filter SNR ~8-9 on the tiny
   night's images, scattering by ±1, so 5 keeps them (measured completeness J 263/264,
   H 221/222, Ks 142/142) while the SNR >= 10 detections stay reliable (697/697 real)). Positions are refined by a
   quadratic fit to the 3 × 3 filtered values (the matched-filter maximum is the
   maximum-likelihood position of an isolated star).
6. **Wings.** A peak near a brighter one must stand out from what the brighter peak's
   own filtered profile (the autocorrelation of the PSF model) predicts there:
   ``S − S_q a(d) >= threshold + wing_tolerance · S_q a(d)``; noise bumps, PSF mismatch
   and diffraction-spike structure in bright stars' wings do not (a brighter peak counts
   where it predicts at least 1σ).
7. **Close pairs.** Pairs closer than ~5" merge into one matched-filter peak. A second,
   sharper filter (a Gaussian of FWHM :attr:`~DetectConfig.sharp_fwhm_arcsec`, with its
   own calibrated SNR map) separates them: its local maxima within
   :attr:`~DetectConfig.blend_radius_arcsec` of a detection and farther than
   :attr:`~DetectConfig.merge_radius_arcsec` from every detection are added when they
   exceed, by :attr:`~DetectConfig.secondary_snr`, what the brighter sharp peaks predict
   there (step 6 with the sharp filter's response). A detection that gains a companion
   takes the position of its own sharp peak (the merged peak lies between the two); one
   with no sharp peak of its own within the merge radius takes over its nearest
   companion instead (a pair ~5" apart, the merged peak midway). Beyond
   :attr:`~DetectConfig.dip_radius_arcsec` from every detection, a sharp peak where the
   matched SNR still reaches the threshold (a star on a bright neighbour's wing, with no
   matched-filter peak of its own) is added when it stands ``secondary_snr`` above the
   highest sharp value on a :attr:`~DetectConfig.hidden_ring_arcsec` ring around it.
   7b. Closer in, 5–16" from a detection of SNR ≥ :attr:`~DetectConfig.wing_parent_snr`
   (6–16" around a core some frames left out), even the sharp map can be a slope without
   a peak: there the sharp map less the bright star's azimuthal median profile is
   searched (:func:`_wing_residual_peaks`). Such detections are flagged
   :data:`FLAG_WING`; PSF photometry fits each together with its bright neighbour, whose
   wing a flat local background would leave in the fit.
8. **Saturated stars.** A detection whose core contains filled hole pixels, or whose
   peak pixel is below :attr:`~DetectConfig.flat_top_ratio` of what its flux predicts
   (a flat top), is flagged :data:`FLAG_SATURATED` and absorbs every other peak within
   :attr:`~DetectConfig.saturated_radius_arcsec` plus the hole's radius (one detection,
   not a ring of them; a hole of at least :attr:`~DetectConfig.hole_centre_min_pixels`
   absorbs from its centroid too, as the peak can lie on its rim, up to 4" off).
9. **Groups.** Detections within ``blend_radius_arcsec`` of each other (friends of
   friends) share a ``group`` id: the PSF fitter fits them together (2MASS: blends
   closer than ~5" are fitted simultaneously).

Devices: NumPy/SciPy or CuPy/cupyx arrays (not mixed); the image work (FFT convolutions,
mesh statistics, maxima) runs in the inputs' namespace. The per-candidate values are then
gathered on the device and copied to the host, where the few-thousand-row logic (steps
6–9) runs on the small table.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
from astropy.table import Table

from gpu2mass.backend import get_namespace, get_ndimage, to_host
from gpu2mass.errors import ConfigError, InputError

__all__ = [
    "COLUMNS",
    "FLAG_BITS",
    "FLAG_BLENDED",
    "FLAG_EDGE",
    "FLAG_HOLE",
    "FLAG_LOW_COVERAGE",
    "FLAG_SATURATED",
    "FLAG_SECONDARY",
    "FLAG_WING",
    "DetectConfig",
    "DetectWarning",
    "DetectionMaps",
    "atlas_psf",
    "detection_maps",
    "matched_kernel",
    "run_detect",
]

#: Kernel truncated: part of the matched filter lies outside the image or on unusable
#: pixels (coverage edge, large masked region).
FLAG_EDGE = 1
#: Fewer than ``DetectConfig.min_coverage`` frames at the peak.
FLAG_LOW_COVERAGE = 2
#: Filled hole pixels (masked core) within 2" of the peak.
FLAG_HOLE = 4
#: Saturated: a filled core or a flat top; nearby peaks were absorbed (module step 8).
FLAG_SATURATED = 8
#: Another detection within ``blend_radius_arcsec``.
FLAG_BLENDED = 16
#: Found by the sharp deblending filter (module step 7), not a matched-filter peak.
FLAG_SECONDARY = 32
#: Found on a bright neighbour's wing, 5–16" out (module step 7b); PSF photometry fits it
#: together with that neighbour.
FLAG_WING = 64

FLAG_BITS = {
    FLAG_EDGE: "edge: the matched filter is truncated by the image edge or unusable pixels",
    FLAG_LOW_COVERAGE: "low coverage: fewer than min_coverage frames at the peak",
    FLAG_HOLE: "hole: filled (masked or saturated) pixels within 2 arcsec of the peak",
    FLAG_SATURATED: "saturated: filled or flat-topped core; peaks around it absorbed",
    FLAG_BLENDED: "blended: another detection within blend_radius_arcsec",
    FLAG_SECONDARY: "secondary: separated from a brighter neighbour by the sharp filter",
    FLAG_WING: "wing: found on a bright neighbour's wing, 5-16 arcsec out (fitted with it)",
}

#: Output columns, in order, with their dtypes.
COLUMNS = {
    "x": np.float64, "y": np.float64, "ra": np.float64, "dec": np.float64,
    "snr": np.float64, "flux": np.float64, "peak": np.float64, "npix": np.int32,
    "flags": np.int32, "group": np.int32, "group_size": np.int32,
}
_UNITS = {"x": "pix", "y": "pix", "ra": "deg", "dec": "deg", "flux": "DN", "peak": "DN"}


class DetectWarning(UserWarning):
    """Something a caller should know that does not stop the step (e.g. no detections)."""


@dataclass(frozen=True)
class DetectConfig:
    """Configuration of detection on Atlas Images (2MASS values where published).

    Attributes
    ----------
    threshold_snr
        Detection threshold on the matched-filter SNR map (5; decided, see the module
        docstring step 5; the 2MASS coadd threshold is not published).
    psf_beta
        Moffat index of the frames' PSF (2.5, the simulator's).
    frame_pixel_arcsec
        Camera pixel, arcsec (2MASS 2.0"): the box of the pixel response and the width of
        the bilinear resampling tent.
    atlas_pixel_arcsec
        Atlas pixel, arcsec (2MASS 1.0").
    kernel_radius_arcsec
        Half-size of the matched-filter kernel, arcsec (8: beyond it the Atlas PSF holds
        < 1.5 % of the flux and adds nothing to the SNR).
    mesh_px
        Background mesh size, Atlas pixels (64).
    mesh_clip_sigma
        Clip at median ± this many robust σ in each mesh, three passes (3).
    mesh_min_fraction
        A mesh needs this fraction of usable pixels, else it is filled from the nearest
        good mesh (0.5).
    mesh_filter
        Median filter over the mesh grid, meshes (3).
    hole_max_pixels
        Unusable regions not touching the border and at most this large are filled
        (masked star cores, bad-pixel clusters), pixels (2000: a 25" radius core).
    hole_centre_min_pixels
        A saturated detection on a hole of at least this many pixels also absorbs the
        peaks around the hole's centroid (module step 8), pixels (9, decided: a
        saturated core 3" across; smaller gaps are bad pixels no frame covered).
    sharp_fwhm_arcsec
        FWHM of the Gaussian deblending filter, arcsec (1.0: on synthetic pairs 4.5"-6"
        apart, 85 % come out as two against 72 % at 1.5").
    secondary_snr
        A deblended companion must exceed the brighter peaks' prediction by this many σ
        of the sharp SNR map (5).
    merge_radius_arcsec
        Sharp peaks this close to a detection are that detection (2").
    blend_radius_arcsec
        Blend radius: companions are searched within it, detections within it share a
        group (5"; 2MASS fits candidates closer than ~5" together).
    wing_tolerance
        Fraction of a brighter peak's predicted profile allowed as PSF mismatch in the
        wing test (0.15).
    hidden_ring_arcsec
        Beyond ``dip_radius_arcsec`` from every detection, a sharp peak where the
        matched-filter SNR is at least ``threshold_snr`` is a detection when it exceeds by
        ``secondary_snr`` the highest sharp value on a ring of this radius around it (3":
        a star's own peak can drown in a bright neighbour's wing, as a J 15.0 star 11.8"
        from a J 9.85 one did on ci seed 9, yet its sharp peak stands 6.7σ above that ring).
        0 turns the search off.
    wing_parent_snr, wing_inner_arcsec, wing_outer_arcsec, wing_profile_tolerance
        Around unsaturated detections of at least this SNR (100), the sharp map less the
        detection's azimuthal median profile is searched for peaks 5"–16" away (step 7b:
        closer to a much brighter star, even the sharp map can be a slope without a peak;
        the misses of ci seed 9 sat 5–13" from stars 1.6–6.8 mag brighter; within 5" the
        sharp companions of step 7 take over). A peak must exceed ``secondary_snr`` plus
        0.3 of the profile there: the Atlas profile of a bright star is not round within
        ~6" (its frames' 2" pixels sample it at different phases), and 4–6" from 40 lone
        SNR 1000–3000 stars it left 7 residual peaks of 9–55σ without that margin. 0 (``wing_parent_snr``) turns the search off.
    wing_inner_masked_arcsec
        Inner radius of the search (6") around a detection whose core some frames left
        out (COVERAGE within 2" of its peak below the most there: saturated in those
        frames, their pixels masked and not filled). Its core is the mean of fewer frames,
        less round still: 5.3" from an H 8.1 star saturated in 3 of 6 frames the search
        found a false source (ci seed 9) that it does not from 6".
    wing_clear_arcsec
        A wing peak this close to a detection is that detection (3"). A sharp companion
        of step 7 on the same wing can sit 2.1-2.2" from its star (the wing peak on it):
        at 2" (``merge_radius_arcsec``) 2 of 40 synthetic pairs 5-6" apart came out as
        three sources.
    dip_radius_arcsec, dip_snr, dip_fraction
        Peaks closer than ``dip_radius_arcsec`` (10") are one source unless the SNR map
        dips between them, below the fainter, by at least ``max(dip_snr, dip_fraction · S)``
        (3σ, 10 %); the group's position is the SNR-weighted mean of its peaks within
        ``dip_fraction`` of its top.
    sharp_dip_fraction, sharp_dip_snr
        ``dip_fraction`` and ``dip_snr`` for the peaks of the sharp map (0.03: the sharp
        filter exists to show the shallow saddle between close companions, measured on
        synthetic pairs; and 3σ, as the matched-filter map). Measured trade-off of the
        floor: without it, pairs 5.0-5.6" apart at 3.1" seeing come out as two 55 % of
        the time instead of 33 %, and ci seeds 1-3 gain up to 0.2 % completeness, but
        bright stars' sharp profiles then give companions that are noise or spike
        structure in their wings: six false SNR ≥ 10 detections on seeds 2 and 3, where
        the floor has none.
    saturated_min_snr
        A group with three or more peaks on its top (a flat or cratered core) at or above
        this SNR, within ``plateau_max_arcsec`` (8") of its centre, is saturated (100).
    saturated_radius_arcsec
        A saturated detection absorbs peaks within this radius plus its hole's radius
        (5").
    min_coverage
        Fewer frames at the peak set :data:`FLAG_LOW_COVERAGE` (3).
    noise_min_pixels
        Least number of pixels with a whole kernel on usable data for measuring the noise
        scale; fewer: ``InputError`` (1000).
    """

    threshold_snr: float = 5.0
    psf_beta: float = 2.5
    frame_pixel_arcsec: float = 2.0
    atlas_pixel_arcsec: float = 1.0
    kernel_radius_arcsec: float = 8.0
    mesh_px: int = 64
    mesh_clip_sigma: float = 3.0
    mesh_min_fraction: float = 0.5
    mesh_filter: int = 3
    hole_max_pixels: int = 2000
    hole_centre_min_pixels: int = 9
    sharp_fwhm_arcsec: float = 1.0
    secondary_snr: float = 5.0
    merge_radius_arcsec: float = 2.0
    blend_radius_arcsec: float = 5.0
    wing_tolerance: float = 0.15
    hidden_ring_arcsec: float = 3.0
    wing_parent_snr: float = 100.0
    wing_inner_arcsec: float = 5.0
    wing_inner_masked_arcsec: float = 6.0
    wing_clear_arcsec: float = 3.0
    wing_outer_arcsec: float = 16.0
    wing_profile_tolerance: float = 0.3
    dip_radius_arcsec: float = 10.0
    dip_snr: float = 3.0
    dip_fraction: float = 0.1
    sharp_dip_fraction: float = 0.03
    sharp_dip_snr: float = 3.0
    saturated_min_snr: float = 100.0
    plateau_max_arcsec: float = 8.0
    saturated_radius_arcsec: float = 5.0
    min_coverage: int = 3
    noise_min_pixels: int = 1000

    def __post_init__(self):
        ints = {"mesh_px", "mesh_filter", "hole_max_pixels", "hole_centre_min_pixels",
                "min_coverage", "noise_min_pixels"}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ints:
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= (
                    0 if f.name == "hole_max_pixels" else 1)
            elif f.name in ("wing_tolerance", "sharp_dip_snr", "hidden_ring_arcsec", "wing_parent_snr",
                            "wing_profile_tolerance"):
                ok = math.isfinite(v) and v >= 0
            elif f.name in ("mesh_min_fraction", "dip_fraction", "sharp_dip_fraction"):
                ok = 0 < v <= 1
            else:
                ok = math.isfinite(v) and v > 0
            if not ok:
                raise ConfigError(f"detect.{f.name} = {v!r} is not valid")
        if self.psf_beta <= 1:
            raise ConfigError(f"detect.psf_beta must be > 1, not {self.psf_beta!r}")
        if self.mesh_filter % 2 != 1:
            raise ConfigError(f"detect.mesh_filter must be odd, not {self.mesh_filter!r}")
        if not self.merge_radius_arcsec < self.blend_radius_arcsec:
            raise ConfigError("detect.merge_radius_arcsec must be < blend_radius_arcsec")


# -- the PSF model ---------------------------------------------------------------------------


def _fine_profile(fwhm_opt, beta, boxes, step, half):
    """Moffat of optical FWHM ``fwhm_opt`` (arcsec) convolved with boxes of the given widths
    (arcsec, per axis), on a fine grid of ``step`` arcsec, ``±half`` arcsec; unit sum."""
    from scipy.ndimage import convolve1d

    alpha = fwhm_opt / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    n = round(half / step)
    c = np.arange(-n, n + 1) * step
    img = (1.0 + (c[:, None] ** 2 + c[None, :] ** 2) / alpha**2) ** (-beta)
    for w in boxes:
        m = round(w / step)
        # A box of m fine samples; an even m is centred by averaging two shifted boxes.
        k = np.ones(m + 1)
        k[0] = k[-1] = 0.5
        k /= k.sum()
        img = convolve1d(convolve1d(img, k, axis=0, mode="constant"), k, axis=1, mode="constant")
    return c, img / img.sum()


@functools.lru_cache(maxsize=64)
def _optical_fwhm(sampled_fwhm: float, beta: float, pixel: float) -> float:
    """Optical Moffat FWHM whose profile, integrated over ``pixel``-wide pixels, has the
    FWHM ``sampled_fwhm`` (arcsec) along a line through its centre (bisection)."""
    step = pixel / 16.0
    half = 8.0 * pixel

    def sampled(fo):
        c, img = _fine_profile(fo, beta, (pixel,), step, half)
        row = img[len(c) // 2]
        top = row.max()
        i = np.flatnonzero(row >= top / 2)
        lo, hi = i[0], i[-1]
        xl = np.interp(top / 2, [row[lo - 1], row[lo]], [c[lo - 1], c[lo]])
        xr = np.interp(top / 2, [row[hi + 1], row[hi]], [c[hi + 1], c[hi]])
        return xr - xl

    floor = sampled(0.05 * pixel)
    if sampled_fwhm <= floor:
        raise InputError(None, f"seeing FWHM {sampled_fwhm:.3g}\" is below the {floor:.3g}\" "
                               f"that {pixel:g}\" pixels alone give")
    lo, hi = 0.05 * pixel, sampled_fwhm
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if sampled(mid) < sampled_fwhm:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=64)
def _atlas_psf_cached(seeing: float, beta: float, frame_px: float, atlas_px: float,
                      half: int, ox: int = 0, oy: int = 0) -> np.ndarray:
    fo = _optical_fwhm(seeing, beta, frame_px)
    sub = 8
    step = atlas_px / sub
    # Pixel box, then the bilinear tent = box ⊗ box / width (per axis).
    c, img = _fine_profile(fo, beta, (frame_px, frame_px, frame_px), step,
                           (half + 6) * atlas_px)
    mid = len(c) // 2
    idx = mid + np.arange(-half, half + 1) * sub
    k = img[np.ix_(idx - oy, idx - ox)]
    return k / k.sum()


def atlas_psf(seeing_fwhm_arcsec: float, *, config: DetectConfig = DetectConfig(),
              half_size: int | None = None, offset=(0.0, 0.0)) -> np.ndarray:
    """The Atlas Image PSF model (module docstring, step 3), on the host.

    Parameters
    ----------
    seeing_fwhm_arcsec
        FWHM of the frames' PSF as sampled by their pixels (the Atlas ``SEEING``), arcsec.
    config
        Pixel sizes, Moffat index, kernel radius.
    half_size
        Half-size of the stamp, Atlas pixels (default: the kernel radius).
    offset
        (dx, dy) of the source from the stamp's central pixel, pixels in [-0.5, 0.5]
        (rounded to 1/8 px).

    Returns
    -------
    numpy.ndarray
        float64 (2h+1, 2h+1), [y, x], centred on the middle pixel (plus ``offset``),
        summing to 1: the fraction of a point source's flux in each 1" pixel.
    """
    s = float(seeing_fwhm_arcsec)
    if not (math.isfinite(s) and s > 0):
        raise InputError(None, f"seeing_fwhm_arcsec must be finite and > 0, not {s!r}")
    h = (math.ceil(config.kernel_radius_arcsec / config.atlas_pixel_arcsec)
         if half_size is None else int(half_size))
    ox, oy = (round(float(o) * 8) for o in offset)
    if abs(ox) > 4 or abs(oy) > 4:
        raise InputError(None, f"offset must lie within ±0.5 px, not {offset!r}")
    return _atlas_psf_cached(round(s, 4), config.psf_beta, config.frame_pixel_arcsec,
                             config.atlas_pixel_arcsec, h, ox, oy).copy()


def matched_kernel(psf: np.ndarray, config: DetectConfig = DetectConfig()) -> np.ndarray:
    """The matched filter: the PSF within a circle of ``kernel_radius_arcsec`` (module
    docstring step 3), on the host."""
    h = psf.shape[0] // 2
    c = np.arange(-h, h + 1)
    r = config.kernel_radius_arcsec / config.atlas_pixel_arcsec
    foot = (c[:, None] ** 2 + c[None, :] ** 2) <= r * r + 1e-9
    return np.where(foot, psf, 0.0)


def _gaussian_kernel(fwhm_px: float, half: int) -> np.ndarray:
    s = fwhm_px / 2.354820045
    c = np.arange(-half, half + 1)
    g = np.exp(-0.5 * (c[:, None] ** 2 + c[None, :] ** 2) / s**2)
    return g / g.sum()


# -- image operations (namespace of the inputs) -----------------------------------------------


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (an FFT-friendly size)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class _Convolver:
    """'Same'-size linear convolutions of (ny, nx) images with small kernels, by FFT.

    The spectra of the kernels are kept across calls and across images of the same shape
    (every Atlas Image of a band has the same size and PSF), and an image's own spectrum
    can be taken once (:meth:`transform`) for every kernel it is convolved with."""

    #: Kernel spectra by (namespace, FFT shape, kernel bytes): those of the band at hand.
    _spectra: ClassVar[dict] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, xp, shape, half):
        self.xp, self.shape, self.half = xp, shape, half
        self.fshape = (_fast_len(shape[0] + 2 * half), _fast_len(shape[1] + 2 * half))
        # NumPy arrays: SciPy's FFT (the same transform, ~1.5x faster than numpy.fft).
        if xp.__name__ == "numpy":
            import scipy.fft

            self.fft = scipy.fft
        else:
            self.fft = xp.fft

    def spectrum(self, name, kernel):
        kernel = np.asarray(kernel, np.float64)
        key = (self.xp.__name__, self.fshape, kernel.shape, kernel.tobytes())
        cache = _Convolver._spectra
        with _Convolver._lock:  # images of a scan are detected on several threads
            spec = cache.get(key)
        if spec is None:
            k = np.zeros(self.fshape)
            h = kernel.shape[0] // 2
            # Kernel centred at the origin (wrapped), so the output needs no shift.
            for dy in range(-h, h + 1):
                k[dy % self.fshape[0], np.arange(-h, h + 1) % self.fshape[1]] = kernel[dy + h]
            # Single precision, like the images' spectra (:meth:`transform`).
            spec = self.fft.rfft2(self.xp.asarray(k)).astype(self.xp.complex64)
            with _Convolver._lock:
                if len(cache) >= 16:  # 7 per band and image size (~5 MB each): keep the newest
                    cache.pop(next(iter(cache)), None)
                cache[key] = spec
        return spec

    def transform(self, image):
        """The zero-padded spectrum of an (ny, nx) image, for :meth:`__call__`.

        Single precision: the images are float32, and the transforms' rounding (~1e-7 of
        the image's rms times log2 of its size) stays 1e-4 of the noise even next to a
        saturated star, while halving the step's FFT time (most of the Atlas detection).
        """
        return self.fft.rfft2(image.astype(self.xp.float32), s=self.fshape)

    def __call__(self, image, name, kernel):
        """``image`` (ny, nx), or its :meth:`transform`, convolved with ``kernel``;
        float64 (ny, nx)."""
        ny, nx = self.shape
        spec = image if image.shape != self.shape else self.transform(image)
        out = self.fft.irfft2(spec * self.spectrum(name, kernel), s=self.fshape)
        return out[:ny, :nx].astype(self.xp.float64)


def _row_quantiles(xp, a, qs):
    """Quantiles ``qs`` of each row of ``a`` ignoring NaN (sort based, both namespaces);
    rows with no finite value give NaN. Returns (len(qs), rows) and the finite counts."""
    s = xp.sort(a, axis=1)  # NaN sort last in NumPy and CuPy
    n = xp.sum(xp.isfinite(a), axis=1)
    out = []
    for q in qs:
        pos = q * xp.maximum(n - 1, 0)
        lo = xp.floor(pos).astype(xp.int64)
        hi = xp.minimum(lo + 1, xp.maximum(n - 1, 0))
        f = pos - lo
        vlo = xp.take_along_axis(s, lo[:, None], axis=1)[:, 0]
        vhi = xp.take_along_axis(s, hi[:, None], axis=1)[:, 0]
        out.append(xp.where(n > 0, vlo + f * (vhi - vlo), xp.nan))
    return out, n


def _background(xp, nd, data, usable, cfg: DetectConfig):
    """Smooth background map (module step 2), float64 (ny, nx)."""
    ny, nx = data.shape
    m = cfg.mesh_px
    gy, gx = -(-ny // m), -(-nx // m)
    pad = xp.full((gy * m, gx * m), xp.nan)
    pad[:ny, :nx] = xp.where(usable, data, xp.nan)
    blocks = pad.reshape(gy, m, gx, m).transpose(0, 2, 1, 3).reshape(gy * gx, m * m)
    for _ in range(3):
        (lo, med, hi), _ = _row_quantiles(xp, blocks, (0.1587, 0.5, 0.8413))
        sig = 0.5 * (hi - lo)
        keep = xp.abs(blocks - med[:, None]) <= cfg.mesh_clip_sigma * sig[:, None]
        blocks = xp.where(keep, blocks, xp.nan)
    (med,), _n = _row_quantiles(xp, blocks, (0.5,))
    # Meshes cut by the image edge have fewer pixels: their fraction counts what exists.
    rows = xp.minimum(m, ny - xp.arange(gy) * m)
    cols = xp.minimum(m, nx - xp.arange(gx) * m)
    area = (rows[:, None] * cols[None, :]).reshape(-1)
    n0 = xp.sum(xp.isfinite(pad.reshape(gy, m, gx, m)), axis=(1, 3)).reshape(-1)
    good = (n0 >= cfg.mesh_min_fraction * area) & xp.isfinite(med)
    grid = med.reshape(gy, gx)
    good = good.reshape(gy, gx)
    if not bool(good.any()):
        good = xp.isfinite(grid)
        if not bool(good.any()):
            return xp.zeros((ny, nx))
    if not bool(good.all()):
        idx = nd.distance_transform_edt(~good, return_distances=False, return_indices=True)
        grid = grid[idx[0], idx[1]]
    if cfg.mesh_filter > 1:
        grid = nd.median_filter(grid, size=cfg.mesh_filter, mode="nearest")
    yy = (xp.arange(ny, dtype=xp.float64) + 0.5) / m - 0.5
    xx = (xp.arange(nx, dtype=xp.float64) + 0.5) / m - 0.5
    order = 3 if min(gy, gx) >= 4 else 1
    # The spline through the mesh centres is a tensor product (prefilter, boundary rule and
    # weights act axis by axis), so the map is Wy · grid · Wxᵀ with W the 1-D interpolation
    # matrices, built by interpolating unit vectors: the same numbers as map_coordinates
    # over every pixel (to 1e-15) for 1/10 of its time.
    wy = xp.stack([nd.map_coordinates(e, yy[None], order=order, mode="nearest")
                   for e in xp.eye(gy)], axis=1)
    wx = xp.stack([nd.map_coordinates(e, xx[None], order=order, mode="nearest")
                   for e in xp.eye(gx)], axis=1)
    return wy @ xp.asarray(grid, xp.float64) @ wx.T


def _holes(xp, nd, usable, max_pixels):
    """Unusable pixels in regions that do not touch the border and have <= max_pixels."""
    bad = ~usable
    if max_pixels == 0 or not bool(bad.any()):
        return xp.zeros_like(bad)
    lab, n = nd.label(bad)
    n = int(n)
    sizes = xp.bincount(lab.ravel(), minlength=n + 1)
    border = xp.zeros(n + 1, bool)
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        border[edge] = True
    ok = (sizes <= max_pixels) & ~border
    ok[0] = False
    return ok[lab]


def _robust_scale(xp, z):
    """Robust σ of ``z`` from its lower half: median − 15.87 % quantile."""
    q = xp.percentile(z, xp.asarray([15.87, 50.0]))
    return float(q[1] - q[0])


def _snr_map(conv, xp, spectra, usable, kernel, name, cfg, interior_min):
    """Filtered image, its calibrated noise and SNR, the noise scale (module step 4) and
    the fraction of the kernel's footprint on usable pixels. ``spectra``: the
    :meth:`_Convolver.transform` of the data, its variance and the usable mask."""
    f = conv(spectra[0], name, kernel)
    v = conv(spectra[1], name + "2", kernel**2)
    foot = (kernel != 0).astype(float)
    cover = conv(spectra[2], name + "foot", foot / foot.sum())
    n0 = xp.sqrt(xp.maximum(v, 0.0))
    ok = usable & (n0 > 0)
    z = xp.where(ok, f / xp.where(ok, n0, 1.0), 0.0)
    interior = ok & (cover > interior_min)
    count = int(xp.count_nonzero(interior))
    if count < cfg.noise_min_pixels:
        raise InputError(None, f"only {count} pixels have the whole {name} kernel on usable "
                               f"data (need {cfg.noise_min_pixels}) to measure the noise")
    scale = _robust_scale(xp, z[interior])
    return f, z / scale, scale, cover


def _local_max(xp, nd, s, usable, threshold):
    """Usable pixels at or above ``threshold`` that are the maximum of their 3 × 3
    neighbourhood (pixels off the image do not count)."""
    cand = usable & (s >= threshold)
    if not bool(xp.isfinite(s).all()):  # NaN neighbours: the filter's own rules
        peak = (s == nd.maximum_filter(s, size=3, mode="constant", cval=-np.inf))
        return peak & cand
    # Only the candidates (a few per cent of the image) are compared with their neighbours;
    # an edge-repeated neighbour is the pixel itself or one already compared.
    yi, xi = xp.nonzero(cand)
    top = _gather(xp, s, yi, xi).max(axis=(1, 2))
    keep = s[yi, xi] >= top
    peak = xp.zeros(s.shape, bool)
    peak[yi[keep], xi[keep]] = True
    return peak


# -- host-side logic on candidates ----------------------------------------------------------------


def _quad_peak(vals):
    """Sub-pixel maximum of 3 × 3 patches (k, 3, 3) [y, x] by a least-squares quadratic;
    returns dx, dy (clipped to ±1) and the fitted maximum value."""
    f = vals
    c0 = (5 * f[:, 1, 1] + 2 * (f[:, 0, 1] + f[:, 2, 1] + f[:, 1, 0] + f[:, 1, 2])
          - (f[:, 0, 0] + f[:, 0, 2] + f[:, 2, 0] + f[:, 2, 2])) / 9.0
    cx = (f[:, :, 2] - f[:, :, 0]).sum(1) / 6.0
    cy = (f[:, 2, :] - f[:, 0, :]).sum(1) / 6.0
    cxx = (f[:, :, 0].sum(1) + f[:, :, 2].sum(1) - 2 * f[:, :, 1].sum(1)) / 6.0
    cyy = (f[:, 0, :].sum(1) + f[:, 2, :].sum(1) - 2 * f[:, 1, :].sum(1)) / 6.0
    cxy = (f[:, 2, 2] - f[:, 2, 0] - f[:, 0, 2] + f[:, 0, 0]) / 4.0
    det = 4 * cxx * cyy - cxy**2
    good = (det > 0) & (cxx < 0) & (cyy < 0)
    sdet = np.where(good, det, 1.0)
    dx = np.where(good, (-2 * cyy * cx + cxy * cy) / sdet, 0.0)
    dy = np.where(good, (-2 * cxx * cy + cxy * cx) / sdet, 0.0)
    dx, dy = np.clip(dx, -1, 1), np.clip(dy, -1, 1)
    top = c0 + cx * dx + cy * dy + cxx * dx**2 + cyy * dy**2 + cxy * dx * dy
    return dx, dy, np.maximum(top, f[:, 1, 1])


class _Profile:
    """Normalised response a(dx, dy) of a filter to a point source at offset (dx, dy), from
    a table on integer offsets (bilinear in between; 0 beyond the table)."""

    def __init__(self, psf, kernel, half):
        from scipy.signal import fftconvolve

        resp = fftconvolve(np.pad(psf, half), kernel, mode="same")
        c = resp.shape[0] // 2
        self.table = resp / resp[c, c]
        self.c = c

    def __call__(self, dx, dy):
        from scipy.ndimage import map_coordinates

        return map_coordinates(self.table, [np.asarray(dy) + self.c, np.asarray(dx) + self.c],
                               order=1, mode="constant", cval=0.0)


def _wing_test(x, y, s, profile, threshold, tol, radius):
    """Keep-mask: candidates (any order) that exceed the brighter kept ones' predicted
    profile by ``threshold`` (module step 6). Brightest first, so absorbed peaks do not
    predict."""
    from scipy.spatial import cKDTree

    order = np.argsort(-s, kind="stable")
    keep = np.zeros(s.size, bool)
    if s.size == 0:
        return keep
    tree = cKDTree(np.stack([x, y], 1))
    rank = np.empty(s.size, np.int64)
    rank[order] = np.arange(s.size)
    for i in order:
        near = [j for j in tree.query_ball_point([x[i], y[i]], radius) if keep[j] and rank[j] < rank[i]]
        if near:
            near = np.array(near)
            pred = float(np.sum(s[near] * profile(x[i] - x[near], y[i] - y[near])))
        else:
            pred = 0.0
        keep[i] = s[i] - pred >= threshold + tol * pred
    return keep


def _groups(x, y, radius):
    """Friends-of-friends group ids (0..k-1, by first member) within ``radius`` pixels."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = x.size
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    pairs = cKDTree(np.stack([x, y], 1)).query_pairs(radius, output_type="ndarray")
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(
        pairs) else coo_matrix((n, n))
    _, lab = connected_components(g, directed=False)
    # Renumber by first appearance (rows are sorted by SNR, so group 0 holds the brightest).
    _, first = np.unique(lab, return_index=True)
    remap = np.empty(lab.max() + 1, np.int64)
    order = np.argsort(first)
    remap[np.unique(lab)[order]] = np.arange(order.size)
    ids = remap[lab].astype(np.int32)
    counts = np.bincount(ids, minlength=ids.max() + 1)
    return ids, counts[ids].astype(np.int32)


def _empty_table() -> Table:
    t = Table({k: np.zeros(0, dtype=v) for k, v in COLUMNS.items()})
    for k, u in _UNITS.items():
        t[k].unit = u
    return t


# -- the step -------------------------------------------------------------------------------------


def _gather(xp, a, yi, xi, r=1):
    """(k, 2r+1, 2r+1) patches of ``a`` around (yi, xi), edge pixels repeated."""
    ny, nx = a.shape
    o = xp.arange(-r, r + 1)
    yy = xp.clip(yi[:, None, None] + o[None, :, None], 0, ny - 1)
    xx = xp.clip(xi[:, None, None] + o[None, None, :], 0, nx - 1)
    return a[yy, xx]


@dataclass(frozen=True)
class DetectionMaps:
    """The images detection works on (module docstring steps 1–4), in the input's namespace.

    Attributes
    ----------
    background
        float64 (ny, nx): the smooth background map subtracted, DN per pixel.
    signal
        float64 (ny, nx): the matched-filtered background-subtracted image ``K ⊛ d``, DN.
    snr
        float64 (ny, nx): ``signal`` over its calibrated noise; 0 on unusable pixels.
    sharp_signal, sharp_snr
        The same for the sharp (deblending) Gaussian filter.
    usable
        bool (ny, nx): pixels with data, after filling holes.
    hole
        bool (ny, nx): filled hole pixels (masked cores).
    kernel_cover
        float64 (ny, nx): fraction of the matched kernel's weight on usable pixels.
    flux_norm
        float64 (ny, nx): ``K² ⊛ usable``: the matched-filter flux is ``signal / flux_norm``.
    noise_scale, sharp_noise_scale
        The measured scales ``c`` of step 4 (real noise / propagated SIGMA noise).
    psf, sharp_kernel
        The host kernels (unit sum) used.
    """

    background: object
    signal: object
    snr: object
    sharp_signal: object
    sharp_snr: object
    usable: object
    hole: object
    kernel_cover: object
    flux_norm: object
    noise_scale: float
    sharp_noise_scale: float
    psf: np.ndarray
    sharp_kernel: np.ndarray


def _unpack(image, sigma, coverage, seeing_fwhm_arcsec, grid):
    from gpu2mass.atlas import AtlasImage

    if isinstance(image, AtlasImage):
        sigma = image.sigma if sigma is None else sigma
        coverage = image.coverage if coverage is None else coverage
        grid = image.grid if grid is None else grid
        if seeing_fwhm_arcsec is None:
            seeing_fwhm_arcsec = image.header.get("SEEING")
        image = image.data
    if sigma is None or coverage is None or seeing_fwhm_arcsec is None:
        raise InputError(None, "detection needs sigma, coverage and seeing_fwhm_arcsec "
                               "(or an AtlasImage that carries them)")
    xp = get_namespace(image, sigma, coverage)
    data, sigma, coverage = xp.asarray(image), xp.asarray(sigma), xp.asarray(coverage)
    if data.ndim != 2 or sigma.shape != data.shape or coverage.shape != data.shape:
        raise InputError(None, f"image, sigma and coverage must be one (ny, nx) shape, got "
                               f"{data.shape}, {sigma.shape}, {coverage.shape}")
    return xp, data, sigma, coverage, seeing_fwhm_arcsec, grid


def detection_maps(image, *, sigma=None, coverage=None, seeing_fwhm_arcsec=None,
                   config: DetectConfig = DetectConfig()) -> DetectionMaps:
    """Background, matched-filter and sharp-filter SNR maps of an Atlas Image (steps 1–4).

    Arguments as :func:`run_detect`. Returns :class:`DetectionMaps` on the input's device.
    """
    xp, data, sigma, coverage, seeing, _ = _unpack(image, sigma, coverage, seeing_fwhm_arcsec,
                                                   None)
    return _maps(xp, data, sigma, coverage, seeing, config)


def _maps(xp, data, sigma, coverage, seeing, cfg: DetectConfig) -> DetectionMaps:
    nd = get_ndimage(xp)
    psf = atlas_psf(seeing, config=cfg)
    data = data.astype(xp.float64)
    sigma = sigma.astype(xp.float64)
    usable = xp.isfinite(data) & xp.isfinite(sigma) & (sigma > 0) & (coverage > 0)
    if not bool(usable.any()):
        raise InputError(None, "no usable pixel in the Atlas Image (coverage 0 or NaN "
                               "everywhere)")
    # Step 1: fill holes from the nearest usable pixel.
    hole = _holes(xp, nd, usable, cfg.hole_max_pixels)
    if bool(hole.any()):
        idx = nd.distance_transform_edt(~usable, return_distances=False, return_indices=True)
        data = xp.where(hole, data[idx[0], idx[1]], data)
        sigma = xp.where(hole, sigma[idx[0], idx[1]], sigma)
    use = usable | hole
    # Step 2: background.
    bg = _background(xp, nd, data, usable, cfg)
    d = xp.where(use, data - bg, 0.0)
    var = xp.where(use, sigma**2, 0.0)
    # Steps 3-4: matched filter and SNR; the sharp filter likewise.
    sharp_px = cfg.sharp_fwhm_arcsec / cfg.atlas_pixel_arcsec
    sharp = _gaussian_kernel(sharp_px, max(2, math.ceil(2.5 * sharp_px)))
    conv = _Convolver(xp, data.shape, psf.shape[0] // 2)
    kern = matched_kernel(psf, cfg)
    spectra = (conv.transform(d), conv.transform(var), conv.transform(use))
    f, snr, scale, cover = _snr_map(conv, xp, spectra, use, kern, "psf", cfg, 1.0 - 1e-6)
    fs, snr_s, scale_s, _ = _snr_map(conv, xp, spectra, use, sharp, "sharp", cfg, 1.0 - 1e-6)
    w2 = conv(spectra[2], "psfnorm", kern * psf)
    return DetectionMaps(bg, f, snr, fs, snr_s, use, hole, cover, w2, scale, scale_s, psf,
                         sharp)


def run_detect(image, *, sigma=None, coverage=None, seeing_fwhm_arcsec=None, grid=None,
               config: DetectConfig = DetectConfig()) -> Table:
    """Detect point sources on one band's Atlas Image.

    Parameters
    ----------
    image
        float (ny, nx) Atlas Image, DN per 1" pixel (NaN where nothing contributed), NumPy
        or CuPy; or a :class:`gpu2mass.atlas.AtlasImage`, whose ``sigma``, ``coverage``,
        ``grid`` and header ``SEEING`` are then used where the arguments are not given.
    sigma
        float (ny, nx): per-pixel noise, DN (the Atlas ``SIGMA``); same namespace.
    coverage
        integer (ny, nx): frames per pixel (the Atlas ``COVERAGE``); 0 = unusable.
    seeing_fwhm_arcsec
        FWHM of the frames' PSF as their 2" pixels sample it (the Atlas ``SEEING``), arcsec.
    grid
        Optional :class:`gpu2mass.atlas.AtlasGrid` (anything with ``pixel_to_sky``): fills
        ``ra``/``dec`` (else NaN).
    config
        :class:`DetectConfig`.

    Returns
    -------
    astropy.table.Table
        On the host, one row per detection, sorted by ``snr`` descending: ``x``, ``y``
        (0-based Atlas pixel, centres at integers), ``ra``, ``dec`` (deg), ``snr`` (peak of
        the matched-filter SNR map; for secondaries, of the sharp filter's), ``flux`` (DN,
        matched-filter estimate: the PSF-weighted sum of the background-subtracted image
        over the PSF's sum of squares), ``peak`` (DN per pixel, brightest pixel within 1"
        above the background), ``npix`` (pixels of the SNR map at or above the threshold
        in the connected region holding the peak), ``flags`` (:data:`FLAG_BITS`),
        ``group`` (blend group id, 0 for the brightest's), ``group_size``.
        ``meta``: ``noise_scale`` (c of step 4), ``sharp_noise_scale``, ``psf_fwhm_px``,
        ``threshold_snr``. No detection: an empty table and a :class:`DetectWarning`.

    Raises
    ------
    InputError
        Shapes that differ, no usable pixel, no seeing, too few pixels for the noise scale.
    """
    xp, data, sigma, coverage, seeing, grid = _unpack(image, sigma, coverage,
                                                      seeing_fwhm_arcsec, grid)
    cfg = config
    m = _maps(xp, data, sigma, coverage, seeing, cfg)
    nd = get_ndimage(xp)
    # Step 5: peaks.
    thr = cfg.threshold_snr
    pk = _local_max(xp, nd, m.snr, m.usable, thr)
    pk_s = _local_max(xp, nd, m.sharp_snr, m.usable, cfg.secondary_snr)
    lab, _ = nd.label(m.snr >= thr)
    sizes = xp.bincount(lab.ravel())
    # Each hole's centroid and size (step 8: a saturated core absorbs from its centroid).
    hlab, nh = nd.label(m.hole)
    hy_i, hx_i = xp.nonzero(hlab)
    hsize = xp.bincount(hlab[hy_i, hx_i], minlength=int(nh) + 1).astype(xp.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        hcx = xp.bincount(hlab[hy_i, hx_i], hx_i.astype(xp.float64), int(nh) + 1) / hsize
        hcy = xp.bincount(hlab[hy_i, hx_i], hy_i.astype(xp.float64), int(nh) + 1) / hsize
    d = xp.where(m.usable, xp.asarray(data, xp.float64) - m.background, 0.0)
    d = xp.where(xp.isfinite(d), d, 0.0)

    def gather(mask):
        yi, xi = xp.nonzero(mask)
        vals = {
            "y": yi, "x": xi,
            "f3": _gather(xp, m.signal, yi, xi), "s": m.snr[yi, xi], "ss": m.sharp_snr[yi, xi],
            "w2": m.flux_norm[yi, xi], "cover": m.kernel_cover[yi, xi],
            "peak": _gather(xp, d, yi, xi).max(axis=(1, 2)),
            "hole": _gather(xp, m.hole, yi, xi, 2).any(axis=(1, 2)),
            "nhole": _gather(xp, m.hole, yi, xi, 12).sum(axis=(1, 2)),
            "cov": coverage[yi, xi],
            "cov_min2": _gather(xp, coverage, yi, xi, 2).min(axis=(1, 2)),
            "cov_max2": _gather(xp, coverage, yi, xi, 2).max(axis=(1, 2)),
            "npix": xp.where(lab[yi, xi] > 0, sizes[lab[yi, xi]], 0),
            "fs3": _gather(xp, m.sharp_signal, yi, xi),
        }
        hl = _gather(xp, hlab, yi, xi, 2).max(axis=(1, 2))
        vals.update(hsize=hsize[hl], hx=hcx[hl], hy=hcy[hl])
        return {k: np.asarray(to_host(v)) for k, v in vals.items()}

    prim = gather(pk)
    sec = gather(pk_s)

    def sample(which, u, v):
        a = {"snr": m.snr, "sharp": m.sharp_snr, "sharp_signal": m.sharp_signal}[which]
        ny, nx = a.shape
        xi = xp.asarray(np.clip(np.rint(u), 0, nx - 1).astype(np.int64))
        yi = xp.asarray(np.clip(np.rint(v), 0, ny - 1).astype(np.int64))
        return np.asarray(to_host(a[yi, xi]))

    meta = {"noise_scale": m.noise_scale, "sharp_noise_scale": m.sharp_noise_scale,
            "psf_fwhm_px": _fwhm_px(m.psf), "threshold_snr": thr}
    if prim["x"].size == 0:
        warnings.warn("no sources detected on the Atlas Image", DetectWarning, stacklevel=2)
        t = _empty_table()
        t.meta.update(meta)
        return t
    return _assemble(prim, sec, m.psf, m.sharp_kernel, cfg, grid, meta, sample)


def _fwhm_px(psf):
    c = psf.shape[0] // 2
    row = psf[c]
    top = row[c]
    i = np.flatnonzero(row >= top / 2)
    lo, hi = i[0], i[-1]
    xl = np.interp(top / 2, [row[lo - 1], row[lo]], [lo - 1, lo])
    xr = np.interp(top / 2, [row[hi + 1], row[hi]], [hi + 1, hi])
    return float(xr - xl)


def _dip_groups(x, y, s, radius, sample, dip_snr, dip_frac):
    """Group peaks that no significant dip separates (module step 6).

    A peak joins a brighter one closer than ``radius`` px when both lie in one connected
    region (8-connected, within a window of that radius around the fainter) of the map at
    or above ``S − max(dip_snr, dip_frac · S)`` of the fainter: no path between them dips
    by more (its prominence is below that). Groups grow from the brightest ungrouped peak
    through joined pairs, but only over peaks within ``radius`` of it (a ridge or a trail
    does not chain into one group). Returns group labels 0..k-1.
    """
    from scipy.ndimage import label
    from scipy.spatial import cKDTree

    n = x.size
    labels = np.full(n, -1, np.int64)
    if n == 0:
        return labels
    pairs = cKDTree(np.stack([x, y], 1)).query_pairs(radius, output_type="ndarray")
    adj = [[] for _ in range(n)]
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        swap = s[i] > s[j]
        faint, bright = np.where(swap, j, i), np.where(swap, i, j)
        fs = np.unique(faint)
        r = math.ceil(radius) + 1
        gy, gx = np.mgrid[-r:r + 1, -r:r + 1]
        cx, cy = np.rint(x[fs]), np.rint(y[fs])
        win = sample((cx[:, None] + gx.ravel()).ravel(), (cy[:, None] + gy.ravel()).ravel())
        win = win.reshape(fs.size, 2 * r + 1, 2 * r + 1)
        where = {f: k for k, f in enumerate(fs)}
        eight = np.ones((3, 3), bool)
        for f in fs:
            k = where[f]
            level = s[f] - max(dip_snr, dip_frac * s[f])
            lab, _ = label(win[k] >= level, structure=eight)
            own = lab[r, r]
            for bb in bright[faint == f]:
                u = int(np.rint(x[bb]) - cx[k]) + r
                v = int(np.rint(y[bb]) - cy[k]) + r
                if own and 0 <= u <= 2 * r and 0 <= v <= 2 * r and lab[v, u] == own:
                    adj[f].append(bb)
                    adj[bb].append(f)
    r2 = radius * radius
    k = 0
    for root in np.argsort(-s, kind="stable"):
        if labels[root] >= 0:
            continue
        labels[root] = k
        stack = [root]
        while stack:
            a = stack.pop()
            for b in adj[a]:
                if labels[b] < 0 and (x[b] - x[root]) ** 2 + (y[b] - y[root]) ** 2 <= r2:
                    labels[b] = k
                    stack.append(b)
        k += 1
    return labels


def _merge(x, y, s, labels, dip_frac):
    """One peak per group: the brightest; its position is the S-weighted mean of the
    group's peaks within ``dip_frac`` of the top (a flat or cratered top averages to its
    centre). Returns representative indices, positions, plateau counts, group extents."""
    order = np.lexsort((-s, labels))
    lab = labels[order]
    first = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    rep = order[first]
    top_s = s[rep][np.searchsorted(lab[first], labels)]
    on_top = s >= (1.0 - dip_frac) * top_s
    w = np.where(on_top, s, 0.0)
    ng = labels.max() + 1
    sw = np.bincount(labels, w, ng)
    gx = np.bincount(labels, w * x, ng) / sw
    gy = np.bincount(labels, w * y, ng) / sw
    n_top = np.bincount(labels, on_top.astype(float), ng).astype(int)
    ext = np.zeros(ng)
    np.maximum.at(ext, labels, np.hypot(x - gx[labels], y - gy[labels]))
    g = labels[rep]
    return rep, gx[g], gy[g], n_top[g], ext[g]


def _assemble(prim, sec, psf, sharp, cfg: DetectConfig, grid, meta, sample) -> Table:
    """Steps 5–9 on the host: refine, merge, wing test, saturation, companions, groups.

    ``sample(which, x, y)`` returns the ``"snr"`` or ``"sharp"`` map at the nearest pixels.
    """
    from scipy.spatial import cKDTree

    px = cfg.atlas_pixel_arcsec
    dip_r = cfg.dip_radius_arcsec / px
    blend_r = cfg.blend_radius_arcsec / px
    merge_r = cfg.merge_radius_arcsec / px
    reach = max(psf.shape[0] // 2 * 2, math.ceil(4 * blend_r))
    kern = matched_kernel(psf, cfg)
    # Step 5: sub-pixel peaks of the matched filter.
    dx, dy, ftop = _quad_peak(prim["f3"])
    x, y, s = prim["x"] + dx, prim["y"] + dy, prim["s"]
    flux = ftop / np.maximum(prim["w2"], 1e-300)
    # Step 6: peaks that no dip separates are one source; then the wing test.
    lab = _dip_groups(x, y, s, dip_r, lambda u, v: sample("snr", u, v), cfg.dip_snr,
                      cfg.dip_fraction)
    rep, x, y, n_top, ext = _merge(x, y, s, lab, cfg.dip_fraction)
    p = {k: v[rep] for k, v in prim.items()}
    s, flux = s[rep], flux[rep]
    keep = _wing_test(x, y, s, _Profile(psf, kern[::-1, ::-1], reach), cfg.threshold_snr,
                      cfg.wing_tolerance, reach)
    # Step 8: saturated cores (filled holes, or flat/cratered tops: three or more peaks on
    # a compact top) are one detection, at the centroid of the top's pixels; filled ones
    # absorb the peaks around them.
    plateau = (n_top >= 3) & (s >= cfg.saturated_min_snr) & (ext <= cfg.plateau_max_arcsec / px)
    for i in np.flatnonzero(plateau):
        r = math.ceil(ext[i] + 3)
        gy, gx = np.mgrid[-r:r + 1, -r:r + 1]
        u, v = np.rint(x[i]) + gx.ravel(), np.rint(y[i]) + gy.ravel()
        val = sample("snr", u, v)
        w = np.where((val >= 0.5 * s[i]) & (gx.ravel() ** 2 + gy.ravel() ** 2 <= r * r), val, 0)
        x[i], y[i] = (w * u).sum() / w.sum(), (w * v).sum() / w.sum()
    sat = p["hole"] | plateau
    absorb = cfg.saturated_radius_arcsec / px + np.maximum(np.sqrt(p["nhole"] / math.pi),
                                                           np.where(plateau, ext, 0.0))
    # A star whose masked core the coadd left as a hole can peak on the hole's rim, up to
    # 4" from its centre (16 synthetic saturated stars); measured from the peak alone, the
    # absorb radius leaves the far rim a second detection. So a hole of at least
    # ``hole_centre_min_pixels`` absorbs from its centroid too. The position stays the
    # peak's: a hole beside a star, not under it (bad pixels no frame covered), would
    # take it 3-4" off (the tiny night).
    big = p["hole"] & (p["hsize"] >= cfg.hole_centre_min_pixels)
    ax, ay = np.where(big, p["hx"], x), np.where(big, p["hy"], y)
    if p["hole"].any():
        tree = cKDTree(np.stack([x, y], 1))
        for i in np.flatnonzero(p["hole"] & keep)[np.argsort(-s[p["hole"] & keep])]:
            if keep[i]:
                near = set(tree.query_ball_point([x[i], y[i]], absorb[i]))
                near |= set(tree.query_ball_point([ax[i], ay[i]], absorb[i]))
                for j in near:
                    if j != i and s[j] <= s[i]:
                        keep[j] = False
    flags = np.where(p["cover"] < 1.0 - 1e-3, FLAG_EDGE, 0)
    flags |= np.where(p["cov"] < cfg.min_coverage, FLAG_LOW_COVERAGE, 0)
    flags |= np.where(p["hole"], FLAG_HOLE, 0)
    flags |= np.where(sat, FLAG_SATURATED, 0)
    x, y, s, flux, flags, sat, absorb, ax, ay = (a[keep] for a in (x, y, s, flux, flags, sat,
                                                                 absorb, ax, ay))
    p = {k: v[keep] for k, v in p.items()}
    # Step 7: companions from the sharp filter.
    add = np.zeros(sec["x"].size, bool)
    sdx, sdy, _ = _quad_peak(sec["fs3"])
    sx, sy, ss = sec["x"] + sdx, sec["y"] + sdy, sec["ss"]
    if sx.size and x.size:
        lab = _dip_groups(sx, sy, ss, dip_r, lambda u, v: sample("sharp", u, v), cfg.sharp_dip_snr,
                          cfg.sharp_dip_fraction)
        srep, gx, gy, _, _ = _merge(sx, sy, ss, lab, cfg.sharp_dip_fraction)
        dist, _near = cKDTree(np.stack([x, y], 1)).query(np.stack([gx, gy], 1))
        inside_sat = _near_saturated(gx, gy, x, y, ax, ay, sat, absorb)
        # Farther out, a star on a bright neighbour's wing can show no matched-filter peak
        # of its own (the wing's slope exceeds its own) but a sharp one. The PSF model
        # holds too little of the real wings to predict them there, so such a peak must
        # stand, by ``secondary_snr``, above the highest sharp value on a ring around it
        # (a wing's gradient and a spike running through it do not), where the
        # matched-filter SNR shows that something is there.
        hidden = np.zeros(srep.size, bool)
        far = np.flatnonzero((dist > dip_r) & ~inside_sat & (sample("snr", gx, gy) >= cfg.threshold_snr))
        if far.size and cfg.hidden_ring_arcsec > 0:
            ring_r = cfg.hidden_ring_arcsec / px
            ang = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
            ring = np.max([sample("sharp", gx[far] + ring_r * np.cos(a), gy[far] + ring_r * np.sin(a))
                           for a in ang], axis=0)
            hidden[far] = ss[srep][far] - ring >= cfg.secondary_snr
        cand = (dist > merge_r) & ((dist <= dip_r) | hidden) & ~inside_sat
        k = _wing_test(gx, gy, ss[srep], _Profile(psf, sharp[::-1, ::-1], reach),
                       cfg.secondary_snr, cfg.wing_tolerance, reach)
        add[srep[cand & k]] = True
        sx[srep], sy[srep] = gx, gy
        # A detection that gains a companion moves to its own sharp peak (the merged
        # matched-filter peak lies between the two). When the merged peak lies farther
        # than merge_r from every sharp peak (a pair ~5" apart: the matched filter's peak
        # sits midway, and the stars' sharp peaks were taken as companions), it takes
        # over its nearest companion instead of staying a third source between the two.
        if add.any():
            comp = cKDTree(np.stack([sx[add], sy[add]], 1))
            has = np.array([len(v) > 0 for v in comp.query_ball_point(np.stack([x, y], 1),
                                                                      blend_r)])
            own = cKDTree(np.stack([gx, gy], 1))
            d0, j0 = own.query(np.stack([x, y], 1))
            move = has & (d0 <= merge_r) & ~sat
            x[move], y[move] = gx[j0[move]], gy[j0[move]]
            merged = np.flatnonzero(has & ~move & ~sat)
            for i in merged[np.argsort(-s[merged])]:
                taken = np.flatnonzero(add)
                d = np.hypot(sx[taken] - x[i], sy[taken] - y[i])
                if d.size and d.min() <= blend_r:
                    r = taken[np.argmin(d)]
                    add[r] = False
                    x[i], y[i] = sx[r], sy[r]
    n_add = int(add.sum())
    # Step 7b: stars on a bright neighbour's wing with no peak of their own in either map.
    bright = ~sat & (s >= cfg.wing_parent_snr) if cfg.wing_parent_snr > 0 else np.zeros(s.size, bool)
    masked_core = p["cov_min2"] < p["cov_max2"]
    inner = np.where(masked_core, cfg.wing_inner_masked_arcsec, cfg.wing_inner_arcsec)
    wx, wy, ws = _wing_residual_peaks(x[bright], y[bright], inner[bright],
                                      np.concatenate([x, sx[add]]),
                                      np.concatenate([y, sy[add]]), sample, cfg)
    # A saturated star absorbs the peaks around it (step 8), those of another star's wing
    # search too: its spikes and non-round core made two false sources 4.3-4.7" from J 6.3
    # and H 5.0 stars (scan preset, ci seed 2).
    on_sat = _near_saturated(wx, wy, x, y, ax, ay, sat, absorb)
    wx, wy, ws = wx[~on_sat], wy[~on_sat], ws[~on_sat]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_snr = sample("sharp_signal", wx, wy) / sample("sharp", wx, wy) if wx.size else np.zeros(0)
    h, hs = psf.shape[0] // 2, sharp.shape[0] // 2
    w_flux = ws * per_snr / float((sharp * psf[h - hs:h + hs + 1, h - hs:h + hs + 1]).sum())
    xs = np.concatenate([x, sx[add], wx])
    ys = np.concatenate([y, sy[add], wy])
    snr_out = np.concatenate([s, ss[add], ws])
    flux_out = np.concatenate([flux, _sharp_flux(sec, add, sharp, psf), w_flux])
    peak_out = np.concatenate([p["peak"], sec["peak"][add], np.full(wx.size, np.nan)])
    npix_out = np.concatenate([p["npix"], sec["npix"][add], np.zeros(wx.size, int)])
    fl = np.concatenate([flags, np.full(n_add, FLAG_SECONDARY)
                         | np.where(sec["cover"][add] < 1 - 1e-3, FLAG_EDGE, 0)
                         | np.where(sec["cov"][add] < cfg.min_coverage, FLAG_LOW_COVERAGE, 0)
                         | np.where(sec["hole"][add], FLAG_HOLE, 0),
                         np.full(wx.size, FLAG_SECONDARY | FLAG_WING)])
    order = np.lexsort((xs, ys, -snr_out))
    xs, ys, snr_out, flux_out = xs[order], ys[order], snr_out[order], flux_out[order]
    peak_out, npix_out, fl = peak_out[order], npix_out[order], fl[order]
    group, gsize = _groups(xs, ys, blend_r)
    fl = fl | np.where(gsize > 1, FLAG_BLENDED, 0)
    if grid is not None:
        ra, dec = grid.pixel_to_sky(xs, ys)
    else:
        ra = dec = np.full(xs.size, np.nan)
    t = Table({
        "x": xs, "y": ys, "ra": np.asarray(ra, float), "dec": np.asarray(dec, float),
        "snr": snr_out, "flux": flux_out, "peak": peak_out, "npix": npix_out.astype(np.int32),
        "flags": fl.astype(np.int32), "group": group, "group_size": gsize,
    })
    for k, u in _UNITS.items():
        t[k].unit = u
    t.meta.update(meta)
    return t


def _near_saturated(u, v, x, y, ax, ay, sat, absorb):
    """(k,) bool: which of the positions (u, v) lie within ``absorb`` of a saturated
    detection (``sat``) at (x, y) or of its hole's centre (ax, ay) (step 8: a saturated
    star absorbs the peaks around it)."""
    near = np.zeros(np.shape(u), bool)
    for i in np.flatnonzero(sat):
        near |= (np.hypot(u - x[i], v - y[i]) <= absorb[i]) | (
            np.hypot(u - ax[i], v - ay[i]) <= absorb[i])
    return near


def _wing_residual_peaks(bx, by, inner_arcsec, det_x, det_y, sample, cfg: DetectConfig):
    """Step 7b: peaks of the sharp SNR map less each bright detection's azimuthal median
    profile (its wing, which a faint neighbour's own peak can drown in), at
    ``inner_arcsec`` (per detection)–``wing_outer_arcsec`` from it, that stand ``secondary_snr`` (plus
    ``wing_profile_tolerance`` of the profile) above the median and ``secondary_snr``
    above the highest residual on a ``hidden_ring_arcsec`` ring (a spike
    running through is a ridge, not a peak), farther than ``wing_clear_arcsec`` from
    every detection. Returns Atlas pixel x, y and the residual sharp SNR (integer
    positions: the PSF fit refines them)."""
    from scipy.ndimage import maximum_filter
    from scipy.spatial import cKDTree

    px = cfg.atlas_pixel_arcsec
    outer = math.ceil(cfg.wing_outer_arcsec / px) + math.ceil(cfg.hidden_ring_arcsec / px) + 1
    g = np.arange(-outer, outer + 1)
    gy, gx = np.meshgrid(g, g, indexing="ij")
    ring_r = cfg.hidden_ring_arcsec / px
    ang = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
    ox, oy = np.rint(ring_r * np.cos(ang)).astype(int), np.rint(ring_r * np.sin(ang)).astype(int)
    found = []
    for bxi, byi, inner in zip(bx, by, inner_arcsec, strict=True):
        cx, cy = np.rint(bxi), np.rint(byi)
        # Radii from the detection's own centre: on a steep wing, half a pixel off centre
        # leaves a dipole of several sigma.
        r = np.hypot(gx + cx - bxi, gy + cy - byi)
        shell = np.rint(2 * r).astype(int)  # half-pixel shells
        zone = (r >= inner / px) & (r <= cfg.wing_outer_arcsec / px)
        vals = sample("sharp", (cx + gx).ravel(), (cy + gy).ravel()).reshape(gx.shape)
        idx, inv = np.unique(shell, return_inverse=True)
        # Median per shell: one sort by (shell, value), then each shell's middle element(s).
        inv = inv.ravel()
        order = np.lexsort((vals.ravel(), inv))
        sv = vals.ravel()[order]
        count = np.bincount(inv, minlength=idx.size)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        prof = 0.5 * (sv[start + (count - 1) // 2] + sv[start + count // 2])
        inv = inv.reshape(shell.shape)
        res = vals - prof[inv]
        # The Atlas profile of a bright star is not round close in (its frames' 2" pixels
        # sample it at different phases): the residual must also clear a fraction of the
        # profile there.
        floor = cfg.secondary_snr + cfg.wing_profile_tolerance * np.maximum(prof[inv], 0.0)
        peak = (res == maximum_filter(res, size=3)) & (res >= floor) & zone
        for iy, ix in zip(*np.nonzero(peak), strict=True):
            ring = res[np.clip(iy + oy, 0, res.shape[0] - 1), np.clip(ix + ox, 0, res.shape[1] - 1)]
            if res[iy, ix] - ring.max() >= cfg.secondary_snr:
                found.append((cx + gx[iy, ix], cy + gy[iy, ix], res[iy, ix]))
    if not found:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    f = np.array(found, float)
    f = f[np.argsort(-f[:, 2], kind="stable")]
    clear_r = cfg.wing_clear_arcsec / px
    taken = cKDTree(np.stack([det_x, det_y], 1)) if det_x.size else None
    keep = []
    for i in range(len(f)):
        if taken is not None and taken.query_ball_point(f[i, :2], clear_r):
            continue
        if any(np.hypot(*(f[i, :2] - f[j, :2])) <= clear_r for j in keep):
            continue  # seen from two bright neighbours
        keep.append(i)
    f = f[keep]
    return f[:, 0], f[:, 1], f[:, 2]


def _sharp_flux(sec, add, sharp, psf):
    """Flux of a companion from the sharp filter's peak: F_s / Σ(K_s · P) (DN)."""
    h, hs = psf.shape[0] // 2, sharp.shape[0] // 2
    core = psf[h - hs:h + hs + 1, h - hs:h + hs + 1]
    return sec["fs3"][add][:, 1, 1] / float((sharp * core).sum())
