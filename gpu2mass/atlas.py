"""Atlas Images (2MAPPS IV.3): resample a scan's frames onto 1" grids, match backgrounds, coadd.

Two public steps and a writer:

- :func:`plan_atlas_grids`: from the :class:`~gpu2mass.geometry.FrameGeometry` of every band
  of a scan, the Atlas grids along the scan (one per image position, common to the bands);
- :func:`run_atlas`: one band onto one grid, giving an :class:`AtlasImage` (image, coverage,
  noise, header keywords of ``spec/products.md`` section 2);
- :func:`write_atlas`: the FITS file (primary image, ``COVERAGE`` and ``SIGMA`` extensions),
  written atomically.

Grids (spec/products.md section 2; facts sheet section 2.1). 512 × 1024 pixels of
2.777777845e-4 deg (1.0"), ``RA---SIN``/``DEC--SIN``, north up and east left, no rotation,
``CRPIX`` = (256.5, 512.5). The images tile the scan's Dec coverage from its south end
northwards in steps of 1024 − 54 rows (54" overlap); the northernmost image is cut short
where the coverage ends (2MASS: one 512 × 698 image per tile). A short image keeps
``CRPIX2 = 512.5``: it is the southern part of the full grid it would have been, so all
grids share one convention (its reference point may then lie beyond its last row). Each
image is centred cross-scan on the union of the three bands' coverage within its Dec range.

Resampling kernel (2MASS's own, credited to M. Weinberg, is unconfirmed). Each output
pixel centre is mapped into every overlapping frame through a bivariate cubic fitted per
frame to the frame → sky → grid mapping (largest residual 0.004 px on the tiny night's true
geometry, whose distortion reaches ~0.4 px; checked against
:attr:`AtlasConfig.max_fit_residual_px`), the frame is interpolated bilinearly (a frame
contributes to an output pixel only where nearly all of its kernel lies on good pixels of
the array, :attr:`AtlasConfig.min_kernel_weight`; the other frames fill in) and multiplied
by the Jacobian of the mapping (≈ 0.25: a 1" pixel is a quarter of a 2" pixel). Bilinear
"tent" weights of one input pixel sampled on a grid twice as fine sum exactly to the area
ratio, so the resampling preserves flux (1e-4 on a smooth source, 5e-5 on a flat field with
noise). The math is :mod:`gpu2mass.kernels.resample` (CPU Numba,
CUDA, NumPy reference). Chosen over a drizzle-like area-overlap kernel because it needs no
polygon clipping (one mapping and four reads per output pixel, the same code on CPU and
GPU) and, at 2× oversampling, conserves flux as well; its price is smoothing (per-pixel
noise 2/3 of the unsmoothed value, correlated over ~2 pixels: see Noise).

Frames are selected per grid by their centres, so a 273-frame scan costs ~20 frames per
grid; each selected frame's cubic is fitted on ``fit_samples²`` points mapped exactly
through :class:`~gpu2mass.geometry.FrameGeometry` and the grid's SIN projection.

Combination. Frames are taken in scan order; before a frame is added, the median of
(incoming − image so far) over the pixels both cover is subtracted from it (facts sheet
section 2.2, step 4; needs :attr:`AtlasConfig.min_overlap_pixels`, else no offset). With
those offsets the frames are combined per pixel into a weighted mean with weights 1/σ_f²
(σ_f: each frame's per-pixel noise), the highest contribution dropped where it is an
outlier (cosmic rays and hot pixels that the transient masks missed; see
:attr:`AtlasConfig.reject_sigma`); the kernel is :mod:`gpu2mass.kernels.coadd` (CPU Numba,
CUDA, NumPy reference); ``NREJECT`` counts the pixels where it fired. On pure-noise frames
the match itself wanders by ~0.1 DN per frame at σ_f = 15 DN (no bias: the mean of the
offsets over 8 noise realisations is 0 within its error); the level of an image is that
of its first frame.

Noise. ``SIGMA`` is the propagated per-pixel noise: for each frame, the bilinear weights w
of the pixel give the variance ``σ_f² J² Σw²/(Σw)²``; the frames combine as
``Σ ω_f² var_f / (Σ ω_f)²``. This is exact for the pixel's own noise (the kernel smooths:
on average Σw² = 4/9, so σ is 2/3 of the unsmoothed σ_f J/√N; measured on pure-noise
frames through the tiny night's true geometry: 0.665, and empirical std / SIGMA = 1.000,
see ``tests/test_atlas.py``). Neighbouring pixels are correlated, so the noise of a sum over
an area much larger than the kernel is :attr:`AtlasConfig.noise_correlation_factor` times
the quadrature sum of SIGMA over it. Measured on pure-noise frames: 2.46, 2.73, 2.84, 2.97
for 5×5, 9×9, 15×15 and 25×25-pixel boxes. The analytic limit for this kernel is 3: a sum
over A output pixels carries the noise of A/4 frame pixels, variance A σ_f²/(4N), while the
quadrature sum of SIGMA is A J² (4/9) σ_f²/N = A σ_f²/(36N) at J = 1/4, 9 times less in
variance. The default, 2.97, is the value for a
14"-radius aperture (615 pixels ≈ 25×25); the header carries it as ``NCORFAC``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpu2mass.backend import get_namespace, get_ndimage, to_host
from gpu2mass.errors import ConfigError, StepError
from gpu2mass.geometry import FrameGeometry

__all__ = [
    "AtlasConfig",
    "AtlasGrid",
    "AtlasImage",
    "flatten_frame_backgrounds",
    "plan_atlas_grids",
    "point_source_m10",
    "remove_frame_gradients",
    "run_atlas",
    "write_atlas",
]

_ARCSEC_DEG = 1.0 / 3600.0


@dataclass(frozen=True)
class AtlasConfig:
    """Configuration of the Atlas Image step (2MASS values as defaults).

    Attributes
    ----------
    nx, ny
        Full image size, pixels (512 × 1024).
    pixel_deg
        Pixel size, degrees (2.777777845e-4, the 2MASS ``CDELT``; 1.0").
    crpix1, crpix2
        FITS reference pixel (1-based), 256.5 and 512.5.
    overlap_arcsec
        In-scan overlap of successive images, arcsec (54).
    min_kernel_weight
        Least fraction of the bilinear kernel's weight that must fall on good pixels of a
        frame (on the array, unmasked) for it to contribute to an output pixel; the
        remaining weights are renormalised. 0.9: renormalised only where a masked pixel
        carries < 10 % of the kernel (the outer corners of its footprint). Renormalising
        over a masked pixel interpolates across it, which on a star's undersampled core is
        not flux-conserving: with 0.5 a bad pixel near the core in one of a star's ~6
        frames took up to 3 % of its 14" Atlas flux, and the robust scatter of the 14"
        fluxes of SNR > 100 stars was 1.0–2.3× their noise (``ci`` and ``scan`` nights,
        ``profiling/measure_atlas_flux.py``); with 0.9 0.8–1.3×, with 0.99 0.8–1.6× (leaving
        a frame out over part of a star's footprint has its own, smaller error: frames
        sample the core at different sub-pixel phases). The price: a bad pixel removes 12
        output pixels of its frame instead of 4 (median ``SIGMA`` +0.7 % on the ``scan``
        night, +1.3 % on ``ci``) and a frame ends 0.1 px beyond its outermost pixel
        centres instead of 0.5 px.
    frame_background
        What of each frame's own background is taken out before the coadd (not in 2MASS,
        whose Atlas Images were "seamless except under rapid variation: clouds, OH
        airglow", facts sheet 2.2: OH airglow changes between frames over the frame
        itself, which the background match's constant cannot follow, and every frame edge
        leaves a step). ``"plane"``: a plane fitted to the frame's unmasked pixels (every
        ``gradient_subsample``-th row and column, least squares, passes rejecting pixels
        beyond ``gradient_clip_sigma`` times the rms of those kept: sources), less its
        constant (:func:`remove_frame_gradients`); ``"mesh"``: sigma-clipped means of
        ``mesh_cell_px`` cells with the sources masked, bicubic between them, less their
        median (:func:`flatten_frame_backgrounds`); ``"none"``: 2MASS. The level stays the
        frame calibration's sky median in both. Median |background step| at frame edges /
        SIGMA, H, with the same at rows away from edges in brackets
        (``profiling/measure_atlas_noise.py``, science scans of the ``ci`` and ``scan``
        nights): none 0.216 (0.048) and 0.198 (0.059); plane 0.219 and 0.064 (0.055); a
        quadratic 0.132 and 0.055; mesh of 128" cells 0.081 and 0.055, of 64" cells 0.051
        (0.047) and 0.046 (0.046). On the four-scan night (``/tmp/night4``, H waves shorter
        still), plane and mesh: steps 0.314 (0.132) and 0.056 (0.054); the 14" Atlas flux
        scatter of 65–87 SNR > 100 stars (``profiling/measure_atlas_flux.py``), J/H/Ks,
        0.44/0.56/0.59 % and 0.40/0.47/0.60 %, 1.13/1.40/1.11 and 1.07/1.26/1.18 times the
        SIGMA-based noise: the mesh is the default. On the tiny night it moves 14" fluxes
        by 0.45 σ rms against no correction (``tests/test_atlas.py``), which is what the
        airglow it removes did. A mesh also takes out sky structure on its cells' scale
        (nebulae, the outskirts of galaxies larger than ~30").
    gradient_subsample, gradient_clip_sigma, gradient_passes
        Sampling step (4), rejection threshold (2.5 × rms) and passes (4) of the plane fit.
    mesh_cell_px, mesh_clip_sigma, mesh_passes
        Mesh cell size in frame pixels (32: 64", 8 × 8 cells a frame), clipping threshold
        (2.5 × the rms of the samples kept, after a first pass about the median) and passes
        (3) of the cell means.
    background_match
        Subtract, before adding each frame, the median difference to the image so far
        (2MASS procedure, facts sheet section 2.2).
    min_overlap_pixels
        Least number of overlapping output pixels for the background match; fewer: the
        frame is added as it is.
    match_subsample
        The median of the background match is taken over every n-th row and column of the
        overlap (2: 4x cheaper; adjacent pixels are correlated by the kernel anyway; the
        match's own noise on pure-noise frames is ~0.1 DN at σ_f = 15 DN either way).
    fit_samples
        Samples per frame axis for fitting the per-frame cubic (17 × 17).
    max_fit_residual_px
        Largest allowed residual of that fit, frame pixels; above it ``StepError`` (the
        geometry is too far from smooth for a cubic).
    reject_sigma, reject_fraction
        Outlier rejection in the coadd (not in 2MASS, whose solo masking let "a few hot
        pixels" through, facts sheet 2.3; the issue asks that no cosmic ray survive): at
        each pixel the highest frame contribution is dropped if it exceeds the weighted mean
        of the others by more than ``reject_sigma`` times their combined noise plus
        ``reject_fraction`` times that mean (5, 1.0: a 5σ test on blank sky; on stars a
        contribution must also exceed twice the others' mean, far beyond the ±30 % that
        sub-pixel phase and seeing make between frames). ``reject_sigma = 0``: off.
    reject_min_frames
        Least number of contributing frames for the test (2).
    reject_grow
        A frame found to be the outlier at a pixel is left out within this many pixels of
        it (1): the resampling spreads a one-pixel hit over ~3×3 output pixels, whose
        fainter edges pass the test on their own (measured on the ``ci`` night: without
        growing, 5 of 932 cosmic rays away from sources still reached 5σ).
    noise_correlation_factor
        Ratio of the true noise of a sum over a large area to the quadrature sum of
        ``SIGMA`` over it (2.97: measured on pure-noise frames for 25×25-pixel boxes, about
        a 14" aperture; smaller areas have less, see the module docstring; written as
        ``NCORFAC``).
    """

    nx: int = 512
    ny: int = 1024
    pixel_deg: float = 2.777777845e-4
    crpix1: float = 256.5
    crpix2: float = 512.5
    overlap_arcsec: float = 54.0
    min_kernel_weight: float = 0.9
    frame_background: str = "mesh"
    gradient_subsample: int = 4
    gradient_clip_sigma: float = 2.5
    gradient_passes: int = 4
    mesh_cell_px: int = 32
    mesh_clip_sigma: float = 2.5
    mesh_passes: int = 3
    background_match: bool = True
    min_overlap_pixels: int = 500
    match_subsample: int = 2
    fit_samples: int = 17
    max_fit_residual_px: float = 0.01
    reject_sigma: float = 5.0
    reject_fraction: float = 1.0
    reject_min_frames: int = 2
    reject_grow: int = 1
    noise_correlation_factor: float = 2.97

    def __post_init__(self):
        checks = (
            ("nx", self.nx >= 1, "a positive integer"),
            ("ny", self.ny >= 1, "a positive integer"),
            ("pixel_deg", self.pixel_deg > 0, "> 0"),
            ("overlap_arcsec", 0 <= self.overlap_arcsec < self.ny * self.pixel_deg * 3600,
             "in [0, image height)"),
            ("min_kernel_weight", 0 < self.min_kernel_weight <= 1, "in (0, 1]"),
            ("min_overlap_pixels", self.min_overlap_pixels >= 1, ">= 1"),
            ("match_subsample", self.match_subsample >= 1, ">= 1"),
            ("frame_background", self.frame_background in ("none", "plane", "mesh"),
             "none, plane or mesh"),
            ("mesh_cell_px", self.mesh_cell_px >= 8, ">= 8"),
            ("mesh_clip_sigma", self.mesh_clip_sigma > 0, "> 0"),
            ("mesh_passes", self.mesh_passes >= 1, ">= 1"),
            ("gradient_subsample", self.gradient_subsample >= 1, ">= 1"),
            ("gradient_clip_sigma", self.gradient_clip_sigma > 0, "> 0"),
            ("gradient_passes", self.gradient_passes >= 1, ">= 1"),
            ("fit_samples", self.fit_samples >= 5, ">= 5"),
            ("max_fit_residual_px", self.max_fit_residual_px > 0, "> 0"),
            ("reject_sigma", self.reject_sigma >= 0, ">= 0"),
            ("reject_fraction", self.reject_fraction >= 0, ">= 0"),
            ("reject_min_frames", self.reject_min_frames >= 2, ">= 2"),
            ("reject_grow", self.reject_grow >= 0, ">= 0"),
            ("noise_correlation_factor", self.noise_correlation_factor >= 1, ">= 1"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"atlas.{name} must be {rule}, not {getattr(self, name)!r}")

    @property
    def pixel_arcsec(self) -> float:
        return self.pixel_deg * 3600.0


# -- grids -----------------------------------------------------------------------------------


def _sin_project(ra, dec, ra0, dec0):
    """(ra, dec) deg → SIN (orthographic) native (x east, y north) in degrees."""
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    x = np.cos(d) * np.sin(a - a0)
    y = np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)
    return np.rad2deg(x), np.rad2deg(y)


def _sin_deproject(x, y, ra0, dec0):
    """SIN native (x, y) deg → (ra, dec) deg."""
    x, y = np.deg2rad(np.asarray(x, float)), np.deg2rad(np.asarray(y, float))
    d0 = np.deg2rad(dec0)
    z = np.sqrt(np.clip(1.0 - x * x - y * y, 0.0, None))
    dec = np.arcsin(y * np.cos(d0) + z * np.sin(d0))
    ra = np.deg2rad(ra0) + np.arctan2(x, z * np.cos(d0) - y * np.sin(d0))
    return np.mod(np.rad2deg(ra), 360.0), np.rad2deg(dec)


@dataclass(frozen=True)
class AtlasGrid:
    """One Atlas Image pixel grid: an undistorted SIN projection, north up, east left.

    Attributes
    ----------
    index
        Position of the image along the scan, 0 at the south end.
    ra, dec
        ``CRVAL1/2``, degrees (ICRS).
    nx, ny
        Image size, pixels (ny < the full height for a short image).
    crpix1, crpix2
        FITS reference pixel, 1-based.
    pixel_deg
        Pixel size, degrees (``CDELT2``; ``CDELT1`` is its negative).
    """

    index: int
    ra: float
    dec: float
    nx: int
    ny: int
    crpix1: float
    crpix2: float
    pixel_deg: float

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx): the image array's shape."""
        return (self.ny, self.nx)

    def sky_to_pixel(self, ra, dec):
        """(ra, dec) deg → 0-based pixel (x, y) of this grid; broadcasts."""
        x, y = _sin_project(ra, dec, self.ra, self.dec)
        return self.crpix1 - 1.0 - x / self.pixel_deg, self.crpix2 - 1.0 + y / self.pixel_deg

    def pixel_to_sky(self, x, y):
        """0-based pixel (x, y) → (ra, dec) deg; broadcasts."""
        px = -(np.asarray(x, float) - (self.crpix1 - 1.0)) * self.pixel_deg
        py = (np.asarray(y, float) - (self.crpix2 - 1.0)) * self.pixel_deg
        return _sin_deproject(px, py, self.ra, self.dec)

    def header(self) -> dict:
        """The WCS keywords of this grid (FITS names → values)."""
        return {
            "CTYPE1": "RA---SIN",
            "CTYPE2": "DEC--SIN",
            "CRPIX1": self.crpix1,
            "CRPIX2": self.crpix2,
            "CRVAL1": self.ra,
            "CRVAL2": self.dec,
            "CDELT1": -self.pixel_deg,
            "CDELT2": self.pixel_deg,
            "CROTA2": 0.0,
            "RADESYS": "ICRS",
            "EQUINOX": 2000.0,
        }

    @property
    def wcs(self):
        """The grid as an ``astropy.wcs.WCS`` (same mapping as :meth:`sky_to_pixel`)."""
        from astropy.wcs import WCS

        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
        w.wcs.crpix = [self.crpix1, self.crpix2]
        w.wcs.crval = [self.ra, self.dec]
        w.wcs.cdelt = [-self.pixel_deg, self.pixel_deg]
        w.wcs.radesys = "ICRS"
        w.pixel_shape = (self.nx, self.ny)
        return w


def _footprints(geometry: FrameGeometry, frames=None, samples: int = 9):
    """Sky positions (ra, dec), deg, of points along the edges of frames; (nf, 4·samples)."""
    band = geometry.band
    frames = np.arange(geometry.nframes) if frames is None else np.asarray(frames)
    ex = np.linspace(-0.5, band.nx - 0.5, samples)
    ey = np.linspace(-0.5, band.ny - 0.5, samples)
    x = np.concatenate([ex, ex, np.full(samples, -0.5), np.full(samples, band.nx - 0.5)])
    y = np.concatenate([np.full(samples, -0.5), np.full(samples, band.ny - 0.5), ey, ey])
    return geometry.pixel_to_sky(frames[:, None], x[None, :], y[None, :])


def plan_atlas_grids(geometries, *, config: AtlasConfig = AtlasConfig()) -> list[AtlasGrid]:
    """The Atlas grids of one scan, common to its bands, south to north.

    Parameters
    ----------
    geometries
        The :class:`FrameGeometry` of each band of the scan (a mapping band → geometry, or
        a sequence); their union defines the scan's coverage.
    config
        Grid sizes, pixel, overlap.

    Returns
    -------
    list of AtlasGrid
        Images stepping ``ny − overlap`` rows in Dec from the southern edge of the coverage;
        the last one has only the rows needed to reach the northern edge (it is dropped if
        it would lie wholly inside the previous image's overlap).
    """
    geoms = list(geometries.values()) if isinstance(geometries, Mapping) else list(geometries)
    if not geoms or any(g.nframes == 0 for g in geoms):
        raise ValueError("plan_atlas_grids needs at least one band, each with frames")
    pts = [_footprints(g) for g in geoms]
    ra = np.concatenate([p[0].ravel() for p in pts])
    dec = np.concatenate([p[1].ravel() for p in pts])
    # Reference RA: circular mean of the coverage (safe across RA = 0).
    rad = np.deg2rad(ra)
    ra_mid = float(np.rad2deg(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())))
    ra_mid %= 360.0
    p = config.pixel_deg
    dmin, dmax = float(dec.min()), float(dec.max())
    step_rows = config.ny - config.overlap_arcsec / config.pixel_arcsec
    grids = []
    k = 0
    while True:
        start = dmin + k * step_rows * p
        if k and dmax <= start + config.overlap_arcsec * _ARCSEC_DEG:
            break
        # One spare row: lines of constant Dec curve north away from the central column.
        rows = min(config.ny, math.ceil((dmax - start) / p + 1.0))
        dec_c = start + (config.crpix2 - 0.5) * p
        top = start + rows * p
        sel = (dec >= start) & (dec <= top)
        # Cross-scan centre of the coverage within this image's Dec range.
        x, _ = _sin_project(ra[sel], dec[sel], ra_mid, dec_c)
        ra_c, _ = _sin_deproject(0.5 * (x.min() + x.max()), 0.0, ra_mid, dec_c)
        grids.append(AtlasGrid(k, float(ra_c), float(dec_c), config.nx, int(rows),
                               config.crpix1, config.crpix2, p))
        k += 1
        if rows < config.ny:
            break
    return grids


# -- per-frame mapping --------------------------------------------------------------------


def _frames_near(geometry: FrameGeometry, grid: AtlasGrid) -> np.ndarray:
    """Indices of the frames whose centre is close enough to the grid to overlap it."""
    gx, gy = grid.sky_to_pixel(geometry.ra, geometry.dec)
    b = geometry.band
    # Half-diagonal of a frame in grid pixels, with room for distortion and rotation.
    reach = 0.75 * np.hypot(b.nx, b.ny) * b.scale_arcsec / (grid.pixel_deg * 3600.0) + 2.0
    near = ((gx > -reach) & (gx < grid.nx + reach) & (gy > -reach) & (gy < grid.ny + reach))
    return np.flatnonzero(near)


def _frame_mappings(geometry: FrameGeometry, grid: AtlasGrid, config: AtlasConfig, frames):
    """Per frame of ``frames``: cubic (grid → frame pixel) coefficients, normalisation, box.

    Returns coef (n, 2, 10), norm (n, 3), boxes (n, 4) int64 (row0, row1, col0, col1, clipped
    to the grid; empty where the frame misses it), resid (n,) max fit residual in px.
    """
    from gpu2mass.kernels.scalar.resample import POLY_TERMS

    band = geometry.band
    n = len(frames)
    m = config.fit_samples
    # One pixel beyond the array on each side: the bilinear kernel reaches there.
    fx, fy = np.meshgrid(np.linspace(-1.0, band.nx, m), np.linspace(-1.0, band.ny, m))
    fx, fy = fx.ravel(), fy.ravel()
    ra, dec = geometry.pixel_to_sky(np.asarray(frames)[:, None], fx[None, :], fy[None, :])
    gx, gy = grid.sky_to_pixel(ra, dec)  # (n, m²)
    x0 = gx.mean(axis=1)
    y0 = gy.mean(axis=1)
    q = 1.0 / (0.5 * max(band.nx, band.ny) * band.scale_arcsec / (grid.pixel_deg * 3600.0))
    s = (gx - x0[:, None]) * q
    t = (gy - y0[:, None]) * q
    coef = np.empty((n, 2, len(POLY_TERMS)))
    resid = np.empty(n)
    for k in range(n):
        a = np.stack([s[k] ** i * t[k] ** j for i, j in POLY_TERMS], axis=1)
        sol, *_ = np.linalg.lstsq(a, np.stack([fx, fy], axis=1), rcond=None)
        coef[k] = sol.T
        resid[k] = np.abs(a @ sol - np.stack([fx, fy], axis=1)).max()
    boxes = np.stack([
        np.clip(np.floor(gy.min(axis=1)) - 1, 0, grid.ny),
        np.clip(np.ceil(gy.max(axis=1)) + 2, 0, grid.ny),
        np.clip(np.floor(gx.min(axis=1)) - 1, 0, grid.nx),
        np.clip(np.ceil(gx.max(axis=1)) + 2, 0, grid.nx),
    ], axis=1).astype(np.int64)
    return coef, np.stack([x0, y0, np.full(n, q)], axis=1), boxes, resid


# -- the image --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AtlasImage:
    """One band's Atlas Image on one grid.

    Attributes
    ----------
    data
        float32 (ny, nx): surface brightness, DN per 1" pixel, background-matched, on the
        frames' sky-subtracted scale; the sum over a source's pixels is its frame flux (DN in
        R2−R1). NaN where no frame contributes. Same namespace as the input frames.
    coverage
        uint8 (ny, nx): number of frames that contributed to each pixel.
    sigma
        float32 (ny, nx): per-pixel noise, DN (see the module docstring); NaN where
        coverage is 0.
    header
        FITS keywords (spec/products.md section 2) with plain Python values.
    grid
        The grid.
    frames
        int64 (k,): indices of the frames that contributed, in the order they were added.
    offsets
        float64 (k,): background offset subtracted from each of them, DN per 1" pixel.
    rejected
        uint8 (ny, nx): number of frames whose contribution was left out as an outlier
        (cosmic rays, unmasked hot pixels; see :attr:`AtlasConfig.reject_sigma`).
    """

    data: object
    coverage: object
    sigma: object
    header: dict
    grid: AtlasGrid
    frames: np.ndarray = field(repr=False)
    offsets: np.ndarray = field(repr=False)
    rejected: object = field(default=None, repr=False)


def _finite_mask(xp, frames, mask):
    """Bad-pixel mask (n or 1, ny, nx) with non-finite pixels added (one warning)."""
    bad = ~xp.isfinite(frames)
    if bool(xp.any(bad & ~mask)):
        warnings.warn(
            f"{int(xp.count_nonzero(bad & ~mask))} non-finite frame pixels were masked",
            RuntimeWarning,
            stacklevel=3,
        )
        mask = mask | bad
    return mask


def remove_frame_gradients(frames, mask, *, config: AtlasConfig = AtlasConfig()):
    """Each frame less the gradient of its own background (:attr:`AtlasConfig.frame_background` "plane").

    Parameters
    ----------
    frames
        float32 (n, ny, nx), NumPy or CuPy: calibrated, sky-subtracted R2−R1 frames, DN.
    mask
        bool (n, ny, nx), same namespace: pixels never used (bad, saturated, transients).

    Returns
    -------
    frames, gradients
        New frames (float32, same namespace) and each frame's fitted gradient, float64
        (n, 2) on the host: DN from the frame's centre to its edge along y and along x.
        Frames with fewer than 100 usable sampled pixels are left as they are (gradient 0).
    """
    xp = get_namespace(frames)
    n, ny, nx = frames.shape
    s = config.gradient_subsample
    d = frames[:, ::s, ::s].astype(xp.float64).reshape(n, -1)
    ok = ~(xp.asarray(mask)[:, ::s, ::s].reshape(n, -1) != 0) & xp.isfinite(d)
    d = xp.where(ok, d, 0.0)
    u = (xp.arange(0, ny, s, dtype=xp.float64) - (ny - 1) / 2) / (ny / 2)
    v = (xp.arange(0, nx, s, dtype=xp.float64) - (nx - 1) / 2) / (nx / 2)
    uu = xp.broadcast_to(u[:, None], (u.size, v.size)).reshape(-1)
    vv = xp.broadcast_to(v[None, :], (u.size, v.size)).reshape(-1)
    terms = xp.stack([xp.ones_like(uu), uu, vv])  # (3, m)
    keep = ok
    coef = xp.zeros((n, 3))
    for _ in range(config.gradient_passes):
        w = keep.astype(xp.float64)
        normal = xp.einsum("nm,im,jm->nij", w, terms, terms) + 1e-9 * xp.eye(3)
        rhs = xp.einsum("nm,im,nm->ni", w, terms, d)
        coef = xp.linalg.solve(normal, rhs[..., None])[..., 0]
        # Classic sigma clipping (the rms of the pixels kept so far): sums only, no
        # per-frame medians, which cost 4x the whole fit.
        res = d - coef @ terms
        nk = xp.maximum(w.sum(axis=1), 1.0)
        rms = xp.sqrt((w * res * res).sum(axis=1) / nk)[:, None]
        keep = ok & (xp.abs(res) < config.gradient_clip_sigma * rms)
    usable = xp.count_nonzero(ok, axis=1) >= 100
    grad = xp.where(usable[:, None], coef[:, 1:], 0.0)
    fu = ((xp.arange(ny) - (ny - 1) / 2) / (ny / 2)).astype(xp.float32)
    fv = ((xp.arange(nx) - (nx - 1) / 2) / (nx / 2)).astype(xp.float32)
    g = grad.astype(xp.float32)
    out = frames - (g[:, 0, None] * fu[None, :])[:, :, None]  # new array, one pass
    out -= (g[:, 1, None] * fv[None, :])[:, None, :]
    return out, np.asarray(to_host(grad), float)


def _cubic_weights(n_out: int, n_cells: int, cell: float) -> np.ndarray:
    """(n_out, n_cells) bicubic (Keys, a = −0.5) interpolation weights from cell centres
    (cell i at (i + 0.5) cell − 0.5) to pixel centres, the edge cells repeated beyond the
    ends (extrapolating a gradient linearly there instead left larger steps at the frame
    edges of the ``ci`` night: 0.057 against 0.051 SIGMA)."""
    t = (np.arange(n_out) + 0.5) / cell - 0.5
    i0 = np.floor(t).astype(int)
    f = t - i0
    w = np.zeros((n_out, n_cells))
    for k, x in zip(range(-1, 3), (1 + f, f, 1 - f, 2 - f), strict=True):
        ax = np.abs(x)
        wk = np.where(ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1,
                      np.where(ax < 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0))
        np.add.at(w, (np.arange(n_out), np.clip(i0 + k, 0, n_cells - 1)), wk)
    return w


def flatten_frame_backgrounds(frames, mask, *, noise=None, config: AtlasConfig = AtlasConfig()):
    """Each frame less the structure of its own background (:attr:`AtlasConfig.frame_background` "mesh").

    Parameters
    ----------
    frames
        float32 (n, ny, nx), NumPy or CuPy: calibrated, sky-subtracted R2−R1 frames, DN.
    mask
        bool (n, ny, nx), same namespace: pixels never used (bad, saturated, transients).
    noise
        float (n,), optional: each frame's pixel noise, DN (host). Given, the pixels of
        sources and their wings are left out of the cells (the 3 × 3 mean of the sampled
        pixels above it, grown by 2 samples).

    Returns
    -------
    frames, mesh
        New frames (float32, same namespace) and each frame's cell means less their
        median, float64 (n, rows, columns) on the host, DN. A cell with fewer than 50
        usable sampled pixels takes the frame's median cell value (no correction there).
    """
    xp = get_namespace(frames)
    _, ny, nx = frames.shape
    cell = config.mesh_cell_px
    a, b = max(1, -(-ny // cell)), max(1, -(-nx // cell))
    # Every second row and column; cells padded with masked samples to whole cells.
    sub = frames[:, ::2, ::2].astype(xp.float32)
    good = ~(xp.asarray(mask)[:, ::2, ::2] != 0) & xp.isfinite(sub)
    sub = xp.where(good, sub, 0.0)
    mesh = _cell_means(xp, sub, good, a, b, cell // 2, config)
    if noise is not None:
        # Sources out, with their wings: where the 3 × 3 mean of the samples less the first
        # mesh exceeds the pixel noise, grown by 2 samples (4 frame pixels). Clipping alone
        # left a bright star's wings below 2.5 σ in its cell's mean, a bump under the star
        # that moved 14" Atlas fluxes by 0.45 σ rms (tests/test_atlas.py).
        ndi = get_ndimage(xp)
        hy = xp.asarray(_cubic_weights(sub.shape[1], a, cell / 2).astype(np.float32))
        hx = xp.asarray(_cubic_weights(sub.shape[2], b, cell / 2).astype(np.float32))
        first = hy[None] @ (mesh.astype(xp.float32) @ hx.T)
        sig = xp.asarray(np.asarray(noise, float))[:, None, None]
        smooth = ndi.uniform_filter(xp.where(good, sub - first, 0.0), size=(1, 3, 3), mode="nearest")
        src = ndi.maximum_filter((smooth > sig).astype(xp.uint8), size=(1, 5, 5), mode="nearest") > 0
        mesh = _cell_means(xp, sub, good & ~src, a, b, cell // 2, config)
    wy = xp.asarray(_cubic_weights(ny, a, cell).astype(np.float32))
    wx = xp.asarray(_cubic_weights(nx, b, cell).astype(np.float32))
    background = wy[None] @ (mesh.astype(xp.float32) @ wx.T)  # (n, ny, nx)
    return frames - background, np.asarray(to_host(mesh), float)


def _cell_means(xp, sub, good, a: int, b: int, h: int, config: AtlasConfig):
    """Sigma-clipped mean of each a × b cell of h × h samples, less the frame's median
    cell, (n, a, b); cells with fewer than 50 usable samples take that median (0)."""
    n = sub.shape[0]
    pad = ((0, 0), (0, a * h - sub.shape[1]), (0, b * h - sub.shape[2]))
    d = xp.pad(sub, pad).reshape(n, a, h, b, h).transpose(0, 1, 3, 2, 4).reshape(n, a, b, h * h)
    ok = xp.pad(good, pad).reshape(n, a, h, b, h).transpose(0, 1, 3, 2, 4).reshape(n, a, b, h * h)
    # First pass about the median (a bright star's halo must not set the first rms), on a
    # quarter of the samples: the medians are the step's main cost.
    q = xp.where(ok[..., ::4], d[..., ::4], xp.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-masked cells: handled below
        med = xp.nanmedian(q, axis=-1)
        mad = xp.nanmedian(xp.abs(q - med[..., None]), axis=-1)
    med = xp.where(xp.isfinite(med), med, 0.0)
    mad = xp.where(xp.isfinite(mad), mad, 0.0)
    keep = ok & (xp.abs(d - med[..., None]) < config.mesh_clip_sigma * 1.4826 * mad[..., None])
    mu = med
    for _ in range(config.mesh_passes):
        nk = xp.maximum(xp.count_nonzero(keep, axis=-1), 1)
        dk = xp.where(keep, d, 0.0)
        mu = dk.sum(axis=-1, dtype=xp.float64) / nk
        var = (dk * dk).sum(axis=-1, dtype=xp.float64) / nk - mu * mu
        rms = xp.sqrt(xp.maximum(var, 0.0))
        # The cut in the samples' float32: float64 cell values would upcast the whole
        # (n, a, b, h²) stack (4x the time of the step's other operations together).
        centre = mu.astype(d.dtype)[..., None]
        limit = (config.mesh_clip_sigma * rms).astype(d.dtype)[..., None]
        keep = ok & (xp.abs(d - centre) < limit)
    usable = xp.count_nonzero(ok, axis=-1) >= 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = xp.nanmedian(xp.where(usable, mu, xp.nan).reshape(n, -1), axis=1)
    level = xp.where(xp.isfinite(level), level, 0.0)[:, None, None]
    return xp.where(usable, mu, level) - level


def run_atlas(
    frames,
    *,
    mask,
    geometry: FrameGeometry,
    noise,
    grid: AtlasGrid,
    config: AtlasConfig = AtlasConfig(),
    band: str | None = None,
    scan: int | None = None,
    scan_type: str | None = None,
    scan_dir: str | None = None,
    sky=None,
    zp_mag=None,
    seeing_arcsec: float | None = None,
) -> AtlasImage:
    """Resample one band's frames onto one Atlas grid, match backgrounds and coadd.

    Parameters
    ----------
    frames
        float (n, ny, nx), NumPy or CuPy: calibrated R2−R1 frames, DN per frame pixel, sky
        subtracted (the background match removes what remains), [frame, y, x].
    mask
        bool (ny, nx) or (n, ny, nx): True = bad pixel (poor responsivity, noise,
        transients), never used. Non-finite frame pixels are added with one warning.
    geometry
        The band's :class:`FrameGeometry` for these n frames.
    noise
        float (n,): per-pixel noise of each frame, DN (host array).
    grid
        The Atlas grid (from :func:`plan_atlas_grids`).
    config
        :class:`AtlasConfig`.
    band, scan, scan_type, scan_dir
        Header values ``FILTER`` (j/h/k), ``SCANNO``, ``TYPE``, ``SCANDIR`` (n/s); optional.
    sky
        float (n,), optional: each frame's subtracted sky, DN per frame pixel; ``SKYVAL`` is
        its median over the contributing frames scaled to a 1" pixel (else the image median).
    zp_mag
        float (n,), optional: instrumental zero point of each frame (magnitude of 1 DN);
        ``MAGZP`` is its mean over the contributing frames (0.0 if not given).
    seeing_arcsec
        ``SEEING`` (FWHM, arcsec), written when given.

    Returns
    -------
    AtlasImage
        On the device of ``frames``.

    Raises
    ------
    ValueError
        Inconsistent shapes or non-positive noise.
    gpu2mass.errors.StepError
        No frame overlapping the grid, no unmasked pixel reaching it, or a frame mapping
        that a cubic does not fit to ``max_fit_residual_px``.
    """
    from gpu2mass.kernels.coadd import combine_frames
    from gpu2mass.kernels.resample import resample_frames

    xp = get_namespace(frames)
    frames = xp.asarray(frames, dtype=xp.float32)
    if frames.ndim != 3 or frames.shape[0] != geometry.nframes:
        raise ValueError(
            f"frames must be (n, ny, nx) with n = geometry.nframes = {geometry.nframes}, "
            f"got {frames.shape}"
        )
    if frames.shape[1:] != (geometry.band.ny, geometry.band.nx):
        raise ValueError(f"frames are {frames.shape[1:]} pixels but the geometry says "
                         f"{(geometry.band.ny, geometry.band.nx)}")
    noise = np.asarray(noise, float)
    if noise.shape != (frames.shape[0],) or not np.all(np.isfinite(noise) & (noise > 0)):
        raise ValueError(f"noise must be (n,) finite and > 0, got {noise!r}")
    mask = xp.asarray(mask, dtype=bool)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.shape[1:] != frames.shape[1:] or mask.shape[0] not in (1, frames.shape[0]):
        raise ValueError(f"mask must be (ny, nx) or (n, ny, nx) like frames, got {mask.shape}")

    # Only frames near the grid are fitted and resampled (a 273-frame scan has ~20 per grid).
    near = _frames_near(geometry, grid)
    if near.size == 0:
        raise StepError(f"no frame overlaps Atlas grid {grid.index}")
    coef, norm, boxes, resid = _frame_mappings(geometry, grid, config, near)
    keep = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
    hit, coef, norm, boxes, resid = near[keep], coef[keep], norm[keep], boxes[keep], resid[keep]
    if hit.size == 0:
        raise StepError(f"no frame overlaps Atlas grid {grid.index}")
    worst = float(resid.max())
    if worst > config.max_fit_residual_px:
        raise StepError(
            f"frame mapping not fitted by a cubic to {config.max_fit_residual_px} px "
            f"(worst residual {worst:.3g} px)"
        )
    sub = frames[xp.asarray(hit)]
    sub_mask = _finite_mask(xp, sub, mask if mask.shape[0] == 1 else mask[xp.asarray(hit)])
    vals, vfac = resample_frames(
        sub, sub_mask, xp.asarray(coef), xp.asarray(norm), xp.asarray(boxes),
        shape=grid.shape, min_weight=config.min_kernel_weight, fill_outside=False,
    )
    # Only each frame's box holds values (the rest is not written: not read either).
    contributes = np.array([bool(xp.any(xp.isfinite(vals[j, b[0]:b[1], b[2]:b[3]])))
                            for j, b in enumerate(boxes.tolist())], bool)
    if not contributes.any():
        raise StepError(f"no unmasked frame pixel reaches Atlas grid {grid.index}")
    weights = 1.0 / noise[hit] ** 2
    offsets = _background_offsets(xp, vals, boxes, weights, config)
    data, sigma, cov, rejected = combine_frames(
        vals, vfac, xp.asarray(offsets), xp.asarray(weights), xp.asarray(boxes),
        reject_sigma=config.reject_sigma,
        reject_fraction=config.reject_fraction, min_frames=config.reject_min_frames,
        grow=config.reject_grow)
    coverage = xp.minimum(cov, 255).astype(xp.uint8)
    used = hit[contributes]
    header = _header(xp, data, grid, geometry, config, used, band=band, scan=scan,
                     scan_type=scan_type, scan_dir=scan_dir, sky=sky, zp_mag=zp_mag,
                     seeing_arcsec=seeing_arcsec)
    header["NREJECT"] = int(xp.count_nonzero(rejected))
    return AtlasImage(data, coverage, sigma, header, grid, used, offsets[contributes], rejected)


def _background_offsets(xp, vals, boxes, weights, config: AtlasConfig) -> np.ndarray:
    """Background offset of each resampled frame (n,), DN per output pixel: frames in scan
    order, each matched to the running weighted mean of those before it by the median of
    (incoming − image so far) over the pixels both cover (2MASS, facts sheet 2.2).

    The running mean is kept on every ``match_subsample``-th row and column only:
    neighbouring output pixels are correlated by the kernel, so the subsample loses little,
    and it costs ``match_subsample²`` less than the full grid.
    """
    n = vals.shape[0]
    offsets = np.zeros(n)
    if not config.background_match:
        return offsets
    step = config.match_subsample
    if xp is np:  # the same loop compiled (kernels/cpu/bgmatch.py)
        from gpu2mass.kernels.cpu.bgmatch import background_offsets

        return background_offsets(vals, np.asarray(boxes), np.asarray(weights, float), step,
                                  config.min_overlap_pixels)
    sv = vals[:, ::step, ::step]
    num = xp.zeros(sv.shape[1:], xp.float64)
    den = xp.zeros(sv.shape[1:], xp.float64)
    for j in range(n):
        r0, r1, c0, c1 = (-(-int(b) // step) for b in boxes[j])
        v = sv[j, r0:r1, c0:c1].astype(xp.float64)
        ok = xp.isfinite(v)
        n_, d = num[r0:r1, c0:c1], den[r0:r1, c0:c1]
        both = ok & (d > 0)
        off = 0.0
        if int(xp.count_nonzero(both)) * step * step >= config.min_overlap_pixels:
            off = float(xp.median(v[both] - n_[both] / d[both]))
        n_ += xp.where(ok, weights[j] * (v - off), 0.0)
        d += xp.where(ok, weights[j], 0.0)
        offsets[j] = off
    return offsets


def _header(xp, data, grid, geometry, config, used, *, band, scan, scan_type, scan_dir, sky,
            zp_mag, seeing_arcsec) -> dict:
    h = {"ORIGIN": "gpu2mass"}
    if scan_type is not None:
        h["TYPE"] = str(scan_type)
    if scan is not None:
        h["SCANNO"] = int(scan)
    if scan_dir is not None:
        h["SCANDIR"] = str(scan_dir)
    if band is not None:
        h["FILTER"] = {"J": "j", "H": "h", "K": "k", "KS": "k"}.get(str(band).upper(), str(band))
    h.update(grid.header())
    have = used.size > 0
    # Instrumental for now: photometric calibration (photcal) replaces it.
    zp = float(np.mean(np.asarray(zp_mag, float)[used])) if zp_mag is not None and have else 0.0
    h["MAGZP"] = zp
    # Every 4th row and column: the median and MAD of ~30,000 pixels are as good as of all
    # 500,000 for a header value, at a 16th of the cost.
    sample = data[::4, ::4]
    finite = sample[xp.isfinite(sample)]
    if finite.size:
        med = float(xp.median(finite))
        # Robust noise of the image: 1.4826 × MAD; stars barely move it.
        h["SKYSIG"] = 1.4826 * float(xp.median(xp.abs(finite - med)))
    else:
        med, h["SKYSIG"] = 0.0, 0.0
    area = (config.pixel_arcsec / geometry.band.scale_arcsec) ** 2
    sky_px = float(np.median(np.asarray(sky, float)[used])) if sky is not None and have else None
    h["SKYVAL"] = med if sky_px is None else sky_px * area
    h["NFRAMES"] = int(used.size)
    if seeing_arcsec is not None:
        h["SEEING"] = float(seeing_arcsec)
    h["IMAGENO"] = int(grid.index)
    h["KERNEL"] = "bilinear"
    h["NCORFAC"] = float(config.noise_correlation_factor)
    return h


def point_source_m10(magzp: float, *, skysig: float, ncorfac: float, seeing_arcsec: float,
                     pixel_arcsec: float = 1.0, beta: float = 2.5) -> float:
    """Magnitude of a point source at SNR 10 on an Atlas Image (the ``M10`` keyword).

    ``skysig`` is the image's per-pixel noise as its ``SIGMA`` map gives it (median, DN):
    ``NCORFAC`` scales that quadrature noise to the noise of a sum. The background-limited
    SNR of PSF-weighted photometry: the noise of the weighted sum is
    ``skysig × NCORFAC × sqrt(n_eff)`` with ``n_eff = (Σp)² / Σp²`` the PSF's noise-
    equivalent area on the 1" grid, for a Moffat profile (``beta``, 2MASS-like) of FWHM
    ``seeing_arcsec``. Sources brighter than M10 add their own photon noise; the sky
    dominates at SNR 10 in all three bands. Returns NaN without a seeing or noise.
    """
    if not (np.isfinite(seeing_arcsec) and seeing_arcsec > 0 and skysig > 0):
        return float("nan")
    alpha = seeing_arcsec / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0)) / pixel_arcsec
    r = np.arange(-40, 41, dtype=float)
    r2 = r[:, None] ** 2 + r[None, :] ** 2
    p = (1.0 + r2 / alpha**2) ** (-beta)
    n_eff = p.sum() ** 2 / np.square(p).sum()
    return float(magzp - 2.5 * np.log10(10.0 * skysig * ncorfac * np.sqrt(n_eff)))


_COMMENTS = {
    "TYPE": "scan type", "SCANNO": "nightly scan number", "SCANDIR": "scan direction n/s",
    "FILTER": "band j/h/k", "MAGZP": "mag of 1 DN (instrumental)", "SKYVAL": "background, DN/pix",
    "SKYSIG": "background noise, DN/pix", "NFRAMES": "frames contributing",
    "SEEING": "seeing FWHM, arcsec", "IMAGENO": "image position along the scan (S to N)",
    "KERNEL": "resampling kernel", "NREJECT": "pixels with a frame left out (outlier)",
    "NCORFAC": "noise of large sums / quadrature SIGMA",
}


def write_atlas(path: str | Path, image: AtlasImage) -> Path:
    """Write an Atlas Image as FITS, atomically: primary image + ``COVERAGE`` + ``SIGMA``.

    Device arrays are copied to the host here (file I/O). Returns the path written.
    """
    from astropy.io import fits

    from gpu2mass.io._atomic import atomic_path

    def host(a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    hdr = fits.Header()
    for key, value in image.header.items():
        hdr[key] = (value, _COMMENTS.get(key, ""))
    hdus = fits.HDUList([
        fits.PrimaryHDU(host(image.data).astype(np.float32), header=hdr),
        fits.ImageHDU(host(image.coverage).astype(np.uint8), name="COVERAGE"),
        fits.ImageHDU(host(image.sigma).astype(np.float32), name="SIGMA"),
    ])
    # The WCS belongs on the extensions too: they share the image's pixel grid.
    for ext in hdus[1:]:
        for key, value in image.grid.header().items():
            ext.header[key] = value
    path = Path(path)
    with atomic_path(path) as tmp:
        hdus.writeto(tmp, overwrite=True)
    return path
