"""The simulated 2MASS camera: per-band optics, detector, and the calibration library.

Numbers follow ``shared/reference/2mass-facts.md`` (section 11 and 17) where 2MASS
published them; where it did not, the choice and its reason are written beside the field.
The noise budget that ties gain, read noise, sky and zero point to the 10σ limits of
2MASS (J 15.8, H 15.1, Ks 14.3 in the six-frame coadd) is :mod:`gpu2mass.sim.sensitivity`;
the zero points below are the ones it solves for (a test holds them together).

Geometry conventions (``shared/spec/raw-night.md`` section 3.1): arrays ``[frame, y, x]``,
0-based pixel centres; +y north, +x west at zero rotation. A band's true pixel → sky map:

1. ``(u, v) = (x − (nx−1)/2, y − (ny−1)/2)`` in pixels from the array centre;
2. focal-plane distortion ``(u', v') = D(u, v)`` (:meth:`BandOptics.distort`), up to
   about one pixel at the array corners, constant through the night;
3. rotation by the band's true position angle θ of +y (east of north) and scale s:
   ``ξ_east = s (−u' cos θ + v' sin θ)``, ``η_north = s (u' sin θ + v' cos θ)``;
4. gnomonic (TAN) projection about the band's true array centre on the sky.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BandDetector",
    "BandOptics",
    "CalibrationLibrary",
    "Camera",
    "default_camera",
    "make_calibration_library",
]


@dataclass(frozen=True)
class BandOptics:
    """True geometry of one band's array on the sky.

    Attributes
    ----------
    scale_arcsec
        True pixel scale, arcsec/px (2MASS 1997: J 1.9966, H 2.0060, Ks 1.9839).
    rotation_deg
        True position angle of the array +y axis, degrees east of north (< 1°).
    offset_arcsec
        True offset ``(ξ_east, η_north)`` of this band's array centre from the telescope
        boresight, arcsec (bands co-aligned to within ~2 px).
    k_radial
        Radial distortion coefficient: ``u' = u (1 + k (r/128)²)`` (r in px).
    q_xy
        Two second-order terms ``(q1, q2)`` in px: ``u' += q1 (u² − v²)/128²``,
        ``v' += q2 (2 u v)/128²``, i.e. up to ``q`` px at the array edge.
    """

    scale_arcsec: float
    rotation_deg: float
    offset_arcsec: tuple[float, float]
    k_radial: float
    q_xy: tuple[float, float]

    def distort(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel offsets from the array centre → undistorted focal-plane offsets (px)."""
        rho2 = (u * u + v * v) / 128.0**2
        q1, q2 = self.q_xy
        up = u * (1.0 + self.k_radial * rho2) + q1 * (u * u - v * v) / 128.0**2
        vp = v * (1.0 + self.k_radial * rho2) + q2 * (2.0 * u * v) / 128.0**2
        return up, vp

    def undistort(self, up: np.ndarray, vp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`distort` by fixed-point iteration (converges to < 1e-6 px)."""
        u, v = np.array(up, dtype=float), np.array(vp, dtype=float)
        for _ in range(12):  # contraction ≈ 0.02 per step: 12 steps reach < 1e-9 px
            du, dv = self.distort(u, v)
            u = u - (du - up)
            v = v - (dv - vp)
        return u, v

    def pixel_to_tangent(self, u, v) -> tuple[np.ndarray, np.ndarray]:
        """Pixel offsets from the array centre → tangent-plane (ξ_east, η_north), arcsec."""
        up, vp = self.distort(np.asarray(u, float), np.asarray(v, float))
        t = np.deg2rad(self.rotation_deg)
        s = self.scale_arcsec
        return s * (-up * np.cos(t) + vp * np.sin(t)), s * (up * np.sin(t) + vp * np.cos(t))

    def tangent_to_pixel(self, xi, eta) -> tuple[np.ndarray, np.ndarray]:
        """Tangent-plane (ξ_east, η_north) arcsec → pixel offsets from the array centre."""
        t = np.deg2rad(self.rotation_deg)
        s = self.scale_arcsec
        xi, eta = np.asarray(xi, float) / s, np.asarray(eta, float) / s
        up = -xi * np.cos(t) + eta * np.sin(t)
        vp = xi * np.sin(t) + eta * np.cos(t)
        return self.undistort(up, vp)


@dataclass(frozen=True)
class BandDetector:
    """Detector and photometric numbers of one band (NICMOS3 HgCdTe, 256×256).

    Attributes
    ----------
    gain_e_per_dn
        e⁻/DN. 2MASS gave only lower limits for one night (J > 7.0, H > 7.0, Ks > 6.2).
    read_noise_e
        Noise of one correlated read pair, e⁻ (unconfirmed for 2MASS; NICMOS3-typical).
    sky_dn
        ``(low, median, high)`` R2−R1 frame sky in DN at flat = 1 (facts sheet 11: one
        night's ranges J 400–1130, H 2000–4000, Ks 1120–1920).
    zp_mag
        Zero point at airmass 1: magnitude of a source giving 1 DN in R2−R1 at flat = 1.
        Solved by :mod:`gpu2mass.sim.sensitivity` so that the 10σ limit is 2MASS's.
    extinction
        c2, mag per airmass (2MASS first release: J 0.109, H 0.031, Ks 0.061).
    saturation_mag
        Magnitude that brings the peak pixel of a centred star, median seeing and sky, to
        full well in read 2 (2MASS R2−R1 saturation: J 9, H 8.5, Ks 8). The full well is
        derived from it; see :func:`gpu2mass.sim.sensitivity.full_well_dn`.
    pedestal_dn
        Median reset pedestal in R1 and read 2, DN.
    dark_r2r1_dn
        Median dark signal in an R2−R1 frame (dark current plus reset-anomaly), DN.
    """

    gain_e_per_dn: float
    read_noise_e: float
    sky_dn: tuple[float, float, float]
    zp_mag: float
    extinction: float
    saturation_mag: float
    pedestal_dn: float = 3000.0
    dark_r2r1_dn: float = 4.0


@dataclass(frozen=True)
class Camera:
    """The whole camera: nominal instrument, per-band truth, timing and PSF family.

    Attributes
    ----------
    frame_period_s
        Time between successive frames; 82.8" steps at the ~57"/s scan rate.
    psf_beta
        Moffat index of the PSF (β = 2.5 gives power-law wings of r⁻⁵ surface brightness,
        about 8 % of the light beyond 2×FWHM: seeing plus telescope scatter).
    """

    nx: int = 256
    ny: int = 256
    pixel_scale_arcsec: float = 2.0
    r1_exptime_s: float = 0.051
    r2r1_exptime_s: float = 1.25
    frame_step_arcsec: float = 82.8
    frame_period_s: float = 1.453
    psf_beta: float = 2.5
    optics: dict[str, BandOptics] = field(default_factory=dict)
    detectors: dict[str, BandDetector] = field(default_factory=dict)

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(b for b in ("J", "H", "K") if b in self.detectors)

    @property
    def read2_exptime_s(self) -> float:
        """Signal collection time from reset to read 2 (R1 + R2−R1), s."""
        return self.r1_exptime_s + self.r2r1_exptime_s


def default_camera(bands: tuple[str, ...] = ("J", "H", "K")) -> Camera:
    """The 2MASS northern camera as the simulator models it (see field docs for sources)."""
    optics = {
        "J": BandOptics(1.9966, 0.377 - 0.11, (0.0, 0.0), 2.7e-3, (0.15, -0.10)),
        "H": BandOptics(2.0060, 0.441 - 0.11, (2.6, -1.8), 2.4e-3, (-0.10, 0.12)),
        "K": BandOptics(1.9839, 0.335 - 0.11, (-1.9, 2.9), 2.9e-3, (0.08, 0.14)),
    }
    from gpu2mass.sim import sensitivity

    detectors = {b: sensitivity.NOMINAL_DETECTORS[b] for b in bands}
    return Camera(optics={b: optics[b] for b in bands}, detectors=detectors)


@dataclass(frozen=True)
class CalibrationLibrary:
    """Per-band calibration truth and the files the pipeline gets (``calib/``).

    All images ``(ny, nx)``. ``flat`` float32 median 1; ``satmap`` float32, full-well
    level of read 2 in DN (pedestal + well); ``badpix`` uint8 bits (1 dead, 2 hot,
    4 noisy, 8 low responsivity). The remaining maps are truth the files do not carry:
    ``pedestal`` (DN in R1 and read 2), ``dark_r2r1`` (DN per R2−R1 frame), ``dark_r1``
    (DN of dark signal in R1 above the pedestal), ``noise_factor`` (read-noise multiplier).
    """

    flat: dict[str, np.ndarray]
    satmap: dict[str, np.ndarray]
    badpix: dict[str, np.ndarray]
    pedestal: dict[str, np.ndarray]
    dark_r2r1: dict[str, np.ndarray]
    dark_r1: dict[str, np.ndarray]
    noise_factor: dict[str, np.ndarray]


def _smooth_field(rng: np.random.Generator, ny: int, nx: int, scale_px: float) -> np.ndarray:
    """A zero-mean, unit-rms random field smooth on ``scale_px`` (Fourier-filtered noise)."""
    noise = rng.standard_normal((ny, nx))
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    filt = np.exp(-0.5 * (kx * kx + ky * ky) * (2 * np.pi * scale_px) ** 2)
    f = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=(ny, nx))
    f -= f.mean()
    return f / f.std()


def make_calibration_library(camera: Camera, rng: np.random.Generator) -> CalibrationLibrary:
    """Draw flats, full-well maps, bad pixels, pedestals and darks for every band.

    - Flat: a large-scale vignetting-like bowl (±4 %) and a smooth random field (2 %
      rms on ~40 px scales) times pixel-to-pixel responsivity (1.5 % rms), median 1;
      low-responsivity pixels (bit 8) at 0.2–0.6. Dead pixels have flat ≈ 0.
    - Bad pixels: ~0.3 % dead (with a few dead column segments), ~0.3 % hot, ~0.2 %
      noisy, ~0.2 % low responsivity — NICMOS3-like fractions (2MASS did not publish them).
    - Full well: band well (from the saturation magnitude) × (1 ± 3 % pixel scatter),
      plus the pixel's pedestal.
    - Pedestal: median ``pedestal_dn`` with column structure and a gradient (±10 %).
    - Dark R2−R1: median ``dark_r2r1_dn`` with a quadrant pattern and hot pixels at
      50–2000 DN; dark R1: 4 % of that (the first 51 ms).
    """
    from gpu2mass.sim.sensitivity import full_well_dn

    ny, nx = camera.ny, camera.nx
    yy, xx = np.mgrid[0:ny, 0:nx]
    rr2 = ((xx - (nx - 1) / 2) ** 2 + (yy - (ny - 1) / 2) ** 2) / (nx / 2) ** 2
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in (
        "flat", "satmap", "badpix", "pedestal", "dark_r2r1", "dark_r1", "noise_factor")}
    for band in camera.bands:
        det = camera.detectors[band]
        flat = (1.0 - 0.04 * rr2 + 0.01 * (xx - nx / 2) / nx) * (1 + 0.02 * _smooth_field(rng, ny, nx, 40))
        flat *= 1 + 0.015 * rng.standard_normal((ny, nx))
        badpix = np.zeros((ny, nx), np.uint8)
        npix = nx * ny

        def pick(frac):
            return np.unravel_index(rng.choice(npix, int(frac * npix), replace=False), (ny, nx))

        dead = pick(0.003)
        badpix[dead] |= 1
        for _ in range(3):  # dead column segments
            x0, y0 = rng.integers(0, nx), rng.integers(0, ny - 40)
            badpix[y0 : y0 + rng.integers(10, 40), x0] |= 1
        hot = pick(0.003)
        badpix[hot] |= 2
        noisy = pick(0.002)
        badpix[noisy] |= 4
        low = pick(0.002)
        badpix[low] |= 8
        flat[badpix & 8 > 0] *= rng.uniform(0.2, 0.6, int((badpix & 8 > 0).sum()))
        flat[badpix & 1 > 0] = rng.uniform(0.0, 0.02, int((badpix & 1 > 0).sum()))
        flat /= np.median(flat)

        pedestal = det.pedestal_dn * (1 + 0.05 * (yy - ny / 2) / ny) * (
            1 + 0.03 * _smooth_field(rng, 1, nx, 3)[0][None, :])
        pedestal += 20 * rng.standard_normal((ny, nx))
        well = full_well_dn(band, det) * (1 + 0.03 * rng.standard_normal((ny, nx)))
        satmap = pedestal + well

        quad = np.where(xx < nx // 2, 1.0, 1.15) * np.where(yy < ny // 2, 1.0, 0.9)
        dark = det.dark_r2r1_dn * quad * (1 + 0.2 * rng.standard_normal((ny, nx)))
        dark[badpix & 2 > 0] = rng.uniform(50, 2000, int((badpix & 2 > 0).sum()))
        noise_factor = np.ones((ny, nx))
        noise_factor[badpix & 4 > 0] = rng.uniform(4, 10, int((badpix & 4 > 0).sum()))

        out["flat"][band] = flat.astype(np.float32)
        out["satmap"][band] = satmap.astype(np.float32)
        out["badpix"][band] = badpix
        out["pedestal"][band] = pedestal.astype(np.float32)
        out["dark_r2r1"][band] = dark.astype(np.float32)
        out["dark_r1"][band] = (dark * camera.r1_exptime_s / camera.r2r1_exptime_s).astype(np.float32)
        out["noise_factor"][band] = noise_factor.astype(np.float32)
    return CalibrationLibrary(**out)
