"""The simulator's noise budget: why the camera numbers are what they are.

2MASS's Level-1 requirement was a 10σ point-source limit of J 15.8, H 15.1, Ks 14.3 in
the six-frame coadd, with R2−R1 saturation near J 9, H 8.5, Ks 8 (facts sheet 11, 15).
The simulator fixes the sky backgrounds to the middle of 2MASS's measured frame-sky
ranges, the gains just above 2MASS's published lower limits and NICMOS3-typical read
noise, and then *solves* for the zero point that puts SNR = 10 at the limit, and for the
full well that saturates at the stated magnitude. ``docs/simulator.md`` shows the numbers.

The SNR is that of an optimal (PSF-weighted) flux measurement over ``nframes`` R2−R1
frames, which is what PSF fitting on the frame stack achieves:

    SNR² = Σ_frames Σ_pixels F² p_i² / σ_i²,   σ_i² = (F p_i + B)/g + RN²/g²   [DN²]

with ``p_i`` the pixel flux fractions of the Moffat PSF at the median sampled seeing
(2.8"), averaged over sub-pixel phases (the six frames sample different phases), ``B``
the sky per pixel (DN), ``g`` the gain and ``RN`` the read noise of a read pair.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.optimize import brentq

from gpu2mass.sim.camera import BandDetector
from gpu2mass.sim.psf import pixel_fractions

__all__ = [
    "LIMIT_10SIGMA",
    "MEDIAN_SEEING_ARCSEC",
    "NOMINAL_DETECTORS",
    "SATURATION_R2R1",
    "budget_table",
    "full_well_dn",
    "point_source_snr",
    "solve_zero_point",
]

#: 2MASS Level-1 10σ limits of the six-frame coadd (facts sheet 15.1).
LIMIT_10SIGMA = {"J": 15.8, "H": 15.1, "K": 14.3}
#: R2−R1 saturation magnitudes (facts sheet 3.1: J > 9, H > 8.5, Ks > 8 unsaturated).
SATURATION_R2R1 = {"J": 9.0, "H": 8.5, "K": 8.0}
#: Median sampled seeing of the simulated nights (range 2.4–3.5").
MEDIAN_SEEING_ARCSEC = 2.8
_R1, _R2R1 = 0.051, 1.25
_PHASES = np.linspace(-0.375, 0.375, 4)  # 4×4 sub-pixel phases, pixel-centred cells

# Zero points are the values solve_zero_point() returns for these detectors (rounded to
# 0.001 mag); tests/test_sim_sensitivity.py fails if they drift apart.
NOMINAL_DETECTORS = {
    "J": BandDetector(gain_e_per_dn=7.7, read_noise_e=40.0, sky_dn=(450.0, 700.0, 1050.0),
                      zp_mag=20.948, extinction=0.109, saturation_mag=9.0),
    "H": BandDetector(gain_e_per_dn=7.4, read_noise_e=42.0, sky_dn=(2100.0, 2800.0, 3800.0),
                      zp_mag=20.918, extinction=0.031, saturation_mag=8.5),
    "K": BandDetector(gain_e_per_dn=6.6, read_noise_e=38.0, sky_dn=(1150.0, 1500.0, 1850.0),
                      zp_mag=19.875, extinction=0.061, saturation_mag=8.0),
}


@functools.lru_cache(maxsize=64)
def _phase_fractions(fwhm: float) -> tuple[np.ndarray, ...]:
    return tuple(pixel_fractions(fwhm, phase=(px, py)) for px in _PHASES for py in _PHASES)


def point_source_snr(mag: float, det: BandDetector, *, zp_mag: float | None = None,
                     fwhm_arcsec: float = MEDIAN_SEEING_ARCSEC, sky_dn: float | None = None,
                     nframes: int = 6, airmass: float = 1.0) -> float:
    """SNR of an optimal flux measurement of a point source on ``nframes`` R2−R1 frames.

    ``zp_mag`` and ``sky_dn`` default to the detector's zero point and median sky; the
    zero point is dimmed by ``extinction × (airmass − 1)``.
    """
    zp = det.zp_mag if zp_mag is None else zp_mag
    zp -= det.extinction * (airmass - 1.0)
    sky = det.sky_dn[1] if sky_dn is None else sky_dn
    flux = 10.0 ** (-0.4 * (mag - zp))
    g, rn = det.gain_e_per_dn, det.read_noise_e
    info = 0.0
    fr = _phase_fractions(round(fwhm_arcsec, 4))
    for p in fr:
        var = (flux * p + sky) / g + (rn / g) ** 2
        info += np.sum((flux * p) ** 2 / var)
    return float(np.sqrt(nframes * info / len(fr)))


def solve_zero_point(band: str, det: BandDetector) -> float:
    """The zero point that gives SNR = 10 at the band's 10σ limit (median sky, seeing)."""
    m = LIMIT_10SIGMA[band]
    return brentq(lambda zp: point_source_snr(m, det, zp_mag=zp) - 10.0, 15.0, 26.0, xtol=1e-6)


def full_well_dn(band: str, det: BandDetector) -> float:
    """Read-2 signal (DN above the pedestal) at which a centred star of the band's
    saturation magnitude fills its peak pixel, at median seeing and sky.

    Read 2 integrates R1 + R2−R1 = 1.301 s of signal; dark is small and ignored here.
    """
    peak = pixel_fractions(MEDIAN_SEEING_ARCSEC).max()
    flux = 10.0 ** (-0.4 * (det.saturation_mag - det.zp_mag))
    return float((peak * flux + det.sky_dn[1]) * (_R1 + _R2R1) / _R2R1)


def budget_table() -> list[dict]:
    """Rows of the noise budget (one per band) for documentation and the CLI."""
    rows = []
    for band, det in NOMINAL_DETECTORS.items():
        m10 = LIMIT_10SIGMA[band]
        flux = 10 ** (-0.4 * (m10 - det.zp_mag))
        well = full_well_dn(band, det)
        r1_sat = det.saturation_mag - 2.5 * np.log10((_R1 + _R2R1) / _R1)
        rows.append({
            "band": band, "gain_e_per_dn": det.gain_e_per_dn, "read_noise_e": det.read_noise_e,
            "sky_dn": det.sky_dn[1], "sky_e": det.sky_dn[1] * det.gain_e_per_dn,
            "zp_mag": det.zp_mag, "m10": m10, "flux_at_m10_dn_per_frame": flux,
            "snr_at_m10": point_source_snr(m10, det), "full_well_dn": well,
            "full_well_e": well * det.gain_e_per_dn, "r2r1_saturation_mag": det.saturation_mag,
            "r1_saturation_mag": r1_sat,
        })
    return rows
