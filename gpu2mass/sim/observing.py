"""When and where the simulated telescope looks, and what the atmosphere does meanwhile.

Low-precision astronomy is enough here and keeps the simulator free of IERS downloads:
GMST from the IAU 1982 expression, the Sun from the Astronomical Almanac low-precision
formulae (≈ 0.01°), airmass from Kasten & Young (1989). The atmosphere is a set of smooth
random processes over the night, one draw per night and seed:

- seeing: sampled J-band FWHM in 2.45–3.5" (log-space Ornstein–Uhlenbeck, 25 min
  correlation time, median 2.8"); other bands scale the optical FWHM as λ^−0.2;
- sky: each band wanders between its low and high frame-sky levels (OH airglow in J and
  H on 20–40 min scales; Ks follows temperature, slower);
- airglow structure: plane waves across the array, amplitude 0.6 % (H), 0.3 % (J),
  0.15 % (Ks) of the sky (H: ~17 DN on a ~20 DN pixel noise, visible in coadds as 2MASS's
  H-band ripples were), wavelength 6–15', drifting at ~1'/s;
- transparency: zero point = zp(airmass 1) − c2 (X − 1) + a slow drift of ≤ 0.03 mag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SITES",
    "Atmosphere",
    "Site",
    "SmoothProcess",
    "airmass",
    "altaz",
    "galactic_to_radec",
    "gmst_deg",
    "night_window",
    "radec_to_galactic",
    "sun_radec",
]

MJD_J2000 = 51544.5


@dataclass(frozen=True)
class Site:
    """An observatory: longitude east-positive, latitude (deg), height (m)."""

    code: str
    lon_deg: float
    lat_deg: float
    height_m: float


#: 2MASS sites (facts sheet 11): Mt. Hopkins and CTIO.
SITES = {
    "n": Site("n", -(110 + 52 / 60 + 41.3 / 3600), 31 + 40 / 60 + 50.8 / 3600, 2306.0),
    "s": Site("s", -(70 + 48 / 60 + 18.3 / 3600), -(30 + 10 / 60 + 3.7 / 3600), 2171.0),
}


def gmst_deg(mjd) -> np.ndarray:
    """Greenwich mean sidereal time (deg) at UTC MJD (UT1 ≈ UTC; < 1 s error)."""
    d = np.asarray(mjd, float) - MJD_J2000
    t = d / 36525.0
    return np.mod(280.46061837 + 360.98564736629 * d + 0.000387933 * t * t, 360.0)


def sun_radec(mjd) -> tuple[np.ndarray, np.ndarray]:
    """Apparent RA, Dec of the Sun (deg), Astronomical Almanac low-precision formulae."""
    n = np.asarray(mjd, float) - MJD_J2000
    L = np.deg2rad(np.mod(280.460 + 0.9856474 * n, 360))
    g = np.deg2rad(np.mod(357.528 + 0.9856003 * n, 360))
    lam = L + np.deg2rad(1.915) * np.sin(g) + np.deg2rad(0.020) * np.sin(2 * g)
    eps = np.deg2rad(23.439 - 0.0000004 * n)
    ra = np.rad2deg(np.arctan2(np.cos(eps) * np.sin(lam), np.cos(lam))) % 360
    dec = np.rad2deg(np.arcsin(np.sin(eps) * np.sin(lam)))
    return ra, dec


def altaz(ra, dec, mjd, site: Site) -> tuple[np.ndarray, np.ndarray]:
    """Altitude and hour angle (deg) of (ra, dec) seen from ``site`` at ``mjd``."""
    lst = gmst_deg(mjd) + site.lon_deg
    ha = np.deg2rad(np.mod(lst - np.asarray(ra, float) + 180, 360) - 180)
    d, phi = np.deg2rad(dec), np.deg2rad(site.lat_deg)
    alt = np.arcsin(np.sin(d) * np.sin(phi) + np.cos(d) * np.cos(phi) * np.cos(ha))
    return np.rad2deg(alt), np.rad2deg(ha)


def airmass(ra, dec, mjd, site: Site) -> np.ndarray:
    """Airmass (Kasten & Young 1989) of (ra, dec) at ``mjd``; ``inf`` below the horizon."""
    alt, _ = altaz(ra, dec, mjd, site)
    alt = np.asarray(alt, float)
    z = 90.0 - alt
    with np.errstate(invalid="ignore", divide="ignore"):
        x = 1.0 / (np.cos(np.deg2rad(z)) + 0.50572 * (96.07995 - z) ** -1.6364)
    # The fit dips to 0.99999 at the zenith; airmass is ≥ 1 by definition.
    return np.where(alt > 0, np.maximum(x, 1.0), np.inf)


def night_window(night_date_mjd: float, site: Site, *, sun_alt_deg: float = -12.0
                 ) -> tuple[float, float]:
    """UTC MJDs between which the Sun is below ``sun_alt_deg`` in the night that begins
    at sunset of the UT date whose 00:00 is ``night_date_mjd`` (local evening)."""
    # Local noon of that date, then scan 1-minute steps through the following 24 h.
    noon = night_date_mjd + 0.5 - site.lon_deg / 360.0
    t = noon + np.arange(0, 1.0, 1 / 1440)
    ra, dec = sun_radec(t)
    alt, _ = altaz(ra, dec, t, site)
    dark = np.flatnonzero(alt < sun_alt_deg)
    if dark.size == 0:
        raise ValueError("the Sun never sets below the twilight limit on that night")
    return float(t[dark[0]]), float(t[dark[-1]])


_GAL_NP = (192.85948, 27.12825, 122.93192)  # RA, Dec of the north Galactic pole; l of NCP


def radec_to_galactic(ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """ICRS (deg) → Galactic (l, b) (deg), IAU 1958 pole with ICRS values (≈ 0.1")."""
    a0, d0, l0 = np.deg2rad(_GAL_NP)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    sb = np.sin(d) * np.sin(d0) + np.cos(d) * np.cos(d0) * np.cos(a - a0)
    b = np.arcsin(np.clip(sb, -1, 1))
    y = np.cos(d) * np.sin(a - a0)
    x = np.sin(d) * np.cos(d0) - np.cos(d) * np.sin(d0) * np.cos(a - a0)
    l = np.mod(l0 - np.arctan2(y, x), 2 * np.pi)
    return np.rad2deg(l), np.rad2deg(b)


def galactic_to_radec(l, b) -> tuple[np.ndarray, np.ndarray]:
    """Galactic (l, b) (deg) → ICRS (ra, dec) (deg)."""
    a0, d0, l0 = np.deg2rad(_GAL_NP)
    lr, br = np.deg2rad(l), np.deg2rad(b)
    sd = np.sin(br) * np.sin(d0) + np.cos(br) * np.cos(d0) * np.cos(l0 - lr)
    d = np.arcsin(np.clip(sd, -1, 1))
    y = np.cos(br) * np.sin(l0 - lr)
    x = np.sin(br) * np.cos(d0) - np.cos(br) * np.sin(d0) * np.cos(l0 - lr)
    return np.rad2deg(np.mod(a0 + np.arctan2(y, x), 2 * np.pi)), np.rad2deg(d)


class SmoothProcess:
    """A stationary Gaussian random function of time with correlation time ``tau`` (days).

    Sum of ``n`` random Fourier modes (random-phase cosines with frequencies drawn from a
    Gaussian spectrum), unit variance. Cheap to evaluate at any time, reproducible.
    """

    def __init__(self, rng: np.random.Generator, tau_days: float, n: int = 24):
        self.freq = np.abs(rng.normal(0.0, 1.0 / (2 * np.pi * tau_days), n))
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.amp = np.sqrt(2.0 / n)

    def __call__(self, t) -> np.ndarray:
        t = np.asarray(t, float)
        return self.amp * np.cos(2 * np.pi * np.multiply.outer(t, self.freq) + self.phase).sum(-1)


class Atmosphere:
    """Seeing, sky, airglow and transparency through one night (see module docstring).

    Parameters
    ----------
    detectors
        Band → :class:`~gpu2mass.sim.camera.BandDetector` (sky ranges, zero points,
        extinction).
    rng
        Seeded generator; one draw per night.
    seeing_range
        ``(low, median, high)`` sampled J FWHM, arcsec.
    """

    LAMBDA_UM = {"J": 1.25, "H": 1.65, "K": 2.16}
    AIRGLOW_AMP = {"J": 0.003, "H": 0.006, "K": 0.0015}

    def __init__(self, detectors: dict, rng: np.random.Generator, *, t0_mjd: float,
                 seeing_range=(2.45, 2.8, 3.5), pixel_scale: float = 2.0, psf_beta: float = 2.5):
        self.detectors = detectors
        self.t0 = t0_mjd
        self.seeing_range = seeing_range
        self.scale = pixel_scale
        self.beta = psf_beta
        self._seeing = SmoothProcess(rng, 25 / 1440)
        self._seeing_fast = SmoothProcess(rng, 2 / 1440)
        self._sky = {b: SmoothProcess(rng, (60 if b == "K" else 30) / 1440) for b in detectors}
        self._zp = {b: (rng.uniform(-0.015, 0.015), SmoothProcess(rng, 120 / 1440)) for b in detectors}
        self._glow = {b: (rng.uniform(6, 15) * 60, rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi),
                          rng.uniform(0.6, 1.2) * 60 * 86400) for b in detectors}

    def seeing(self, band: str, mjd) -> np.ndarray:
        """Sampled FWHM (arcsec) of the PSF in ``band`` at ``mjd`` (array)."""
        from gpu2mass.sim.psf import optical_fwhm, sampled_fwhm_table

        lo, med, hi = self.seeing_range
        s = self._seeing(np.asarray(mjd) - self.t0) + 0.15 * self._seeing_fast(np.asarray(mjd) - self.t0)
        # Log-normal around the median, spread so ±2σ spans the range, then clipped.
        fj = np.clip(med * np.exp(0.5 * s * np.log(hi / lo) / 2), lo, hi)
        if band == "J":
            return fj
        opt_j = optical_fwhm(fj, scale=self.scale, beta=self.beta)
        opt = np.maximum(opt_j * (self.LAMBDA_UM["J"] / self.LAMBDA_UM[band]) ** 0.2, 1.55)
        return sampled_fwhm_table(opt, scale=self.scale, beta=self.beta)

    def sky(self, band: str, mjd) -> np.ndarray:
        """Mean R2−R1 sky (DN at flat = 1) in ``band``."""
        lo, med, hi = self.detectors[band].sky_dn
        s = np.clip(self._sky[band](np.asarray(mjd) - self.t0), -2, 2)
        return np.where(s < 0, med * (lo / med) ** (-s / 2), med * (hi / med) ** (s / 2))

    def zero_point(self, band: str, mjd, airmass_) -> np.ndarray:
        """True zero point (mag giving 1 DN in R2−R1 at flat = 1) at ``mjd`` and airmass."""
        det = self.detectors[band]
        off, proc = self._zp[band]
        drift = off + 0.012 * proc(np.asarray(mjd) - self.t0)
        return det.zp_mag - det.extinction * (np.asarray(airmass_) - 1.0) + drift

    def airglow(self, band: str, mjd: float, xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        """Relative airglow structure (dimensionless, zero mean over large areas) at
        tangent-plane offsets (arcsec) from the array centre at time ``mjd``."""
        wl, ang, ph, speed = self._glow[band]
        k = 2 * np.pi / wl
        s = (mjd - self.t0) * speed
        u = xi * np.cos(ang) + eta * np.sin(ang)
        return self.AIRGLOW_AMP[band] * np.sin(k * (u - s) + ph)
