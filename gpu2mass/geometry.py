"""The frame-to-sky model that frame position reconstruction (PosFrm) solves and that the
Atlas resampling, the frame stack photometry and the simulator's truth all speak.

For one band of one night (constant through the night):

1. ``(u, v) = (x − (nx−1)/2, y − (ny−1)/2)``: pixel offsets from the array centre;
2. focal-plane distortion ``(u', v') = (u, v) + D(s, t)·R`` with ``s = u/R``, ``t = v/R``,
   ``R = 128`` px, and ``D`` a polynomial of total degree 2–3 in ``(s, t)`` (7 terms per
   axis, :data:`DISTORTION_TERMS`), coefficients in pixels;
3. rotation by the position angle θ of the array's +y axis (east of north) and the pixel
   scale s: ``ξ = s (−u' cos θ + v' sin θ)``, ``η = s (u' sin θ + v' cos θ)`` (arcsec,
   ξ east, η north);
4. gnomonic (TAN) projection about the frame's array centre on the sky ``(ra_c, dec_c)``,
   which differs frame to frame (the pointing track).

The simulator's own distortion (``gpu2mass.sim.camera.BandOptics``) is a special case, so
:func:`frame_geometry_from_truth` converts a simulated night's truth exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DISTORTION_RADIUS_PX",
    "DISTORTION_TERMS",
    "BandGeometry",
    "FrameGeometry",
    "frame_geometry_from_truth",
    "tan_deproject",
    "tan_project",
]

#: Exponents (i, j) of the distortion terms s^i t^j, the same list for du and dv.
DISTORTION_TERMS = ((2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3))
#: Normalisation radius of the distortion polynomial, pixels.
DISTORTION_RADIUS_PX = 128.0
_ARCSEC = np.pi / 180 / 3600


def tan_project(ra, dec, ra0, dec0):
    """(ra, dec) deg → gnomonic (ξ east, η north) arcsec about (ra0, dec0); broadcasts."""
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return xi / _ARCSEC, eta / _ARCSEC


def tan_deproject(xi, eta, ra0, dec0):
    """Gnomonic (ξ, η) arcsec about (ra0, dec0) → (ra, dec) deg; broadcasts."""
    x, y = np.asarray(xi, float) * _ARCSEC, np.asarray(eta, float) * _ARCSEC
    d0 = np.deg2rad(dec0)
    denom = np.cos(d0) - y * np.sin(d0)
    ra = np.deg2rad(ra0) + np.arctan2(x, denom)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom))
    return np.mod(np.rad2deg(ra), 360.0), np.rad2deg(dec)


@dataclass(frozen=True)
class BandGeometry:
    """Pixel ↔ tangent-plane mapping of one band's array (see the module docstring).

    Attributes
    ----------
    nx, ny
        Array size, pixels.
    scale_arcsec
        Pixel scale, arcsec/px.
    rotation_deg
        Position angle of the array +y axis, degrees east of north.
    distortion
        float array (2, 7): coefficients (px) of :data:`DISTORTION_TERMS` for du and dv.
    """

    nx: int
    ny: int
    scale_arcsec: float
    rotation_deg: float
    distortion: np.ndarray

    def _d(self, u, v):
        # The polynomial describes the array and its surroundings; far outside (beyond twice
        # the array half-width) it is held at its value on that boundary so that mapping far
        # away points stays finite and invertible.
        s = np.clip(u / DISTORTION_RADIUS_PX, -2.0, 2.0)
        t = np.clip(v / DISTORTION_RADIUS_PX, -2.0, 2.0)
        # The terms of DISTORTION_TERMS by products, not powers: this runs for every
        # position mapped in a scan (fixed-point inversion included), and np.power and a
        # stacked basis cost 5x more.
        s2, t2 = s * s, t * t
        basis = (s2, s * t, t2, s2 * s, s2 * t, s * t2, t2 * t)
        c = np.asarray(self.distortion, float)
        du = c[0, 0] * basis[0]
        dv = c[1, 0] * basis[0]
        for k in range(1, len(basis)):
            du += c[0, k] * basis[k]
            dv += c[1, k] * basis[k]
        return du, dv

    def distort(self, u, v):
        """Pixel offsets from the array centre → undistorted offsets (px)."""
        u, v = np.asarray(u, float), np.asarray(v, float)
        du, dv = self._d(u, v)
        return u + du, v + dv

    def undistort(self, up, vp):
        """Inverse of :meth:`distort` (fixed point; distortion ≲ a few px converges fast)."""
        up, vp = np.asarray(up, float), np.asarray(vp, float)
        u, v = up.copy(), vp.copy()
        for _ in range(20):
            du, dv = self._d(u, v)
            u_new, v_new = up - du, vp - dv
            # Contraction by ~|∂d/∂u| ≈ 1e-3 per step: 3-4 steps reach 1e-10 px.
            done = np.all(np.abs(u_new - u) < 1e-10) and np.all(np.abs(v_new - v) < 1e-10)
            u, v = u_new, v_new
            if done:
                break
        return u, v

    def pixel_to_tangent(self, x, y):
        """Pixel coordinates (0-based) → (ξ, η) arcsec about the array centre."""
        up, vp = self.distort(np.asarray(x, float) - (self.nx - 1) / 2,
                              np.asarray(y, float) - (self.ny - 1) / 2)
        th = np.deg2rad(self.rotation_deg)
        s = self.scale_arcsec
        return s * (-up * np.cos(th) + vp * np.sin(th)), s * (up * np.sin(th) + vp * np.cos(th))

    def tangent_to_pixel(self, xi, eta):
        """(ξ, η) arcsec about the array centre → pixel coordinates (0-based)."""
        th = np.deg2rad(self.rotation_deg)
        xi, eta = np.asarray(xi, float) / self.scale_arcsec, np.asarray(eta, float) / self.scale_arcsec
        u, v = self.undistort(-xi * np.cos(th) + eta * np.sin(th), xi * np.sin(th) + eta * np.cos(th))
        return u + (self.nx - 1) / 2, v + (self.ny - 1) / 2


@dataclass(frozen=True)
class FrameGeometry:
    """Sky positions of every frame of one band of one scan.

    Attributes
    ----------
    band
        The band's :class:`BandGeometry`.
    ra, dec
        float arrays (nframes,): sky position (deg) of each frame's array centre.
    """

    band: BandGeometry
    ra: np.ndarray
    dec: np.ndarray

    @property
    def nframes(self) -> int:
        return int(np.size(self.ra))

    def pixel_to_sky(self, frame, x, y):
        """Pixel (x, y) of frame index/indices ``frame`` → (ra, dec) deg; broadcasts."""
        xi, eta = self.band.pixel_to_tangent(x, y)
        return tan_deproject(xi, eta, self.ra[frame], self.dec[frame])

    def sky_to_pixel(self, frame, ra, dec):
        """(ra, dec) deg → pixel (x, y) of frame index/indices ``frame``; broadcasts."""
        xi, eta = tan_project(ra, dec, self.ra[frame], self.dec[frame])
        return self.band.tangent_to_pixel(xi, eta)

    def frames_holding(self, ra, dec, *, edge_px: float = 0.0):
        """Every (source, frame) pair whose array holds the source.

        ``ra``, ``dec`` (m,) deg. A frame holds a source when its pixel position lies at
        least ``edge_px`` inside the array's outer pixel edges (0: anywhere on the pixel
        grid, ``[−0.5, n − 0.5]``). Returns ``(source, frame, x, y)``, arrays of the pairs
        (int, int, float px, float px), frame by frame.
        """
        ra, dec = np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float))
        b = self.band
        # Only sources within the frame's half-diagonal (plus distortion) are mapped exactly.
        half = 0.5 * np.hypot(b.nx, b.ny) * b.scale_arcsec * 1.05 + 10.0
        src, frm = [], []
        for f in range(self.nframes):
            xi, eta = tan_project(ra, dec, self.ra[f], self.dec[f])
            near = np.flatnonzero((np.abs(xi) < half) & (np.abs(eta) < half))
            src.append(near)
            frm.append(np.full(near.size, f))
        src = np.concatenate(src) if src else np.zeros(0, int)
        frm = np.concatenate(frm) if frm else np.zeros(0, int)
        x, y = self.sky_to_pixel(frm, ra[src], dec[src])
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        lo = -0.5 + edge_px
        inside = (x >= lo) & (x <= b.nx - 0.5 - edge_px) & (y >= lo) & (y <= b.ny - 0.5 - edge_px)
        return src[inside], frm[inside], x[inside], y[inside]


def _truth_band(optics: dict, nx: int, ny: int) -> BandGeometry:
    """The simulator's BandOptics (radial k and two second-order q terms) as a BandGeometry."""
    k = optics["k_radial"]
    q1, q2 = optics["q_xy"]
    r = DISTORTION_RADIUS_PX
    # du = R (k s (s² + t²) + q1 (s² − t²)),  dv = R (k t (s² + t²) + 2 q2 s t)
    du = [q1, 0.0, -q1, k * r, 0.0, k * r, 0.0]
    dv = [0.0, 2 * q2, 0.0, 0.0, k * r, 0.0, k * r]
    return BandGeometry(nx, ny, optics["scale_arcsec"], optics["rotation_deg"], np.array([du, dv]))


def frame_geometry_from_truth(night_dir: str | Path, scan: int, band: str) -> FrameGeometry:
    """The true :class:`FrameGeometry` of a simulated scan (reads ``truth/``; tests only)."""
    import pyarrow.parquet as pq

    night_dir = Path(night_dir)
    truth = json.loads((night_dir / "truth" / "night.json").read_text())
    manifest = json.loads((night_dir / "night.json").read_text())
    inst = manifest["instrument"]
    bg = _truth_band(truth["camera"]["optics"][band], inst["nx"], inst["ny"])
    t = pq.read_table(night_dir / "truth" / "frames.parquet").to_pydict()
    sel = [i for i, (s, b) in enumerate(zip(t["scan"], t["band"], strict=True)) if s == scan and b == band]
    sel.sort(key=lambda i: t["frame"][i])
    return FrameGeometry(bg, np.array([t["ra"][i] for i in sel]), np.array([t["dec"][i] for i in sel]))
