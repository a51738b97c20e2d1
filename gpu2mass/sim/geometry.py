"""Gnomonic (TAN) projection helpers for the simulator (arcsec tangent-plane offsets).

ξ points east, η north, both in arcsec, about a tangent point (ra0, dec0) in degrees.
"""

from __future__ import annotations

import numpy as np

__all__ = ["offset_radec", "tan_deproject", "tan_project"]

_ARCSEC = np.pi / 180 / 3600


def tan_project(ra, dec, ra0, dec0) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) deg → (ξ, η) arcsec about (ra0, dec0). Points ≥ 90° away give NaN."""
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    with np.errstate(invalid="ignore", divide="ignore"):
        xi = np.cos(d) * np.sin(a - a0) / cosc
        eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    bad = cosc <= 0
    return np.where(bad, np.nan, xi / _ARCSEC), np.where(bad, np.nan, eta / _ARCSEC)


def tan_deproject(xi, eta, ra0, dec0) -> tuple[np.ndarray, np.ndarray]:
    """(ξ, η) arcsec about (ra0, dec0) → (ra, dec) deg."""
    x, y = np.asarray(xi, float) * _ARCSEC, np.asarray(eta, float) * _ARCSEC
    d0 = np.deg2rad(dec0)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        dec = np.arcsin(np.cos(c) * np.sin(d0) + np.where(rho > 0, y * np.sin(c) * np.cos(d0) / rho, 0))
    ra = np.deg2rad(ra0) + np.arctan2(x * np.sin(c), rho * np.cos(d0) * np.cos(c) - y * np.sin(d0) * np.sin(c))
    return np.mod(np.rad2deg(ra), 360.0), np.rad2deg(dec)


def offset_radec(ra0, dec0, dxi_arcsec, deta_arcsec) -> tuple[np.ndarray, np.ndarray]:
    """The point at tangent-plane offset (ξ, η) arcsec from (ra0, dec0)."""
    return tan_deproject(dxi_arcsec, deta_arcsec, ra0, dec0)
