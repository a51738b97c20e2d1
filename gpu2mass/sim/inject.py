"""Stars drawn into existing frames, as the simulator draws them (artificial-star tests).

Measurement tools and tests add stars of known flux and position to a scan's calibrated
frames and run the pipeline's steps on the frames with and without them
(``profiling/measure_atlas_injection.py``). The stars are what
:mod:`gpu2mass.sim.scan` draws: a pixel-integrated Moffat of index ``beta`` whose width
follows each frame's seeing (the truth FWHM, through :func:`gpu2mass.sim.psf.optical_fwhm`),
scaled by each frame's zero point, placed through a frame geometry in every frame its
stamp touches (a star just off a frame still throws its wings into it), with photon noise
when a gain is given.
"""

from __future__ import annotations

import numpy as np

from gpu2mass.geometry import FrameGeometry
from gpu2mass.kernels import render_psf_stamps
from gpu2mass.sim.psf import moffat_alpha, optical_fwhm

__all__ = ["inject_stars", "stamp_frames"]


def stamp_frames(geometry: FrameGeometry, ra: float, dec: float, half_size: int):
    """The frames whose array a star's ``(2 half_size + 1)²`` stamp touches.

    Returns ``(frames, x, y)``: frame indices (int) and the star's pixel position in each
    (float px, 0-based; may lie off the array by up to ``half_size``)."""
    b = geometry.band
    fx, fy = geometry.sky_to_pixel(np.arange(geometry.nframes), ra, dec)
    f = np.flatnonzero((fx > -half_size - 1) & (fx < b.nx + half_size)
                       & (fy > -half_size - 1) & (fy < b.ny + half_size))
    return f, fx[f], fy[f]


def inject_stars(shape, geometry: FrameGeometry, ra, dec, mag, *, zp_mag, fwhm_arcsec,
                 beta: float = 2.5, gain: float | None = None, rng=None, half_size: int = 24):
    """The light of stars at ``(ra, dec)`` with magnitudes ``mag`` in one band's frames.

    Parameters
    ----------
    shape
        ``(n, ny, nx)`` of the frames.
    geometry
        Frame geometry placing the stars (the truth's, to draw as the simulator did).
    ra, dec, mag
        Arrays (m,): positions (deg) and magnitudes.
    zp_mag, fwhm_arcsec
        Arrays (n,): each frame's zero point (magnitude giving 1 DN) and seeing (FWHM,
        arcsec, as the simulator's truth frames give it).
    beta
        Moffat index (the simulator's 2.5).
    gain
        e⁻/DN: given, each pixel gets Gaussian photon noise of variance ``light / gain``
        (``rng`` then required); None: noiseless light.
    half_size
        Stamp half-size, frame pixels (24: < 0.02 % of a β = 2.5 star's flux beyond).

    Returns
    -------
    light
        float32 ``(n, ny, nx)``, DN.
    """
    _, ny, nx = shape
    scale = geometry.band.scale_arcsec
    light = np.zeros(shape, np.float32)
    h = int(half_size)
    for r, d, m in zip(np.atleast_1d(ra), np.atleast_1d(dec), np.atleast_1d(mag), strict=True):
        frames, xs, ys = stamp_frames(geometry, float(r), float(d), h)
        for f, x, y in zip(frames, xs, ys, strict=True):
            alpha = moffat_alpha(optical_fwhm(fwhm_arcsec[f], scale=scale, beta=beta) / scale, beta)
            cx, cy = int(np.rint(x)), int(np.rint(y))
            stamp = render_psf_stamps(np.array([x - cx]), np.array([y - cy]),
                                      np.array([10.0 ** (-0.4 * (m - zp_mag[f]))]),
                                      np.array([alpha]), np.array([beta]), half_size=h)[0]
            y0, x0 = cy - h, cx - h
            ya, yb = max(y0, 0), min(y0 + 2 * h + 1, ny)
            xa, xb = max(x0, 0), min(x0 + 2 * h + 1, nx)
            if ya < yb and xa < xb:
                light[f, ya:yb, xa:xb] += stamp[ya - y0:yb - y0, xa - x0:xb - x0]
    if gain is not None:
        if rng is None:
            raise ValueError("inject_stars: photon noise (gain given) needs an rng")
        light += (np.sqrt(np.maximum(light, 0.0) / gain)
                  * rng.standard_normal(light.shape, dtype=np.float32))
    return light
