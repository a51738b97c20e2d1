"""When, and through how much air, each source of a scan was observed.

A scan sweeps north or south at a constant rate, so a source is seen by the frames whose
centres pass it: its epoch is the time at which the array centre crossed its along-scan
position, and its airmass the airmass then. Both come from the scan's frames table
(``scans/<scan>/frames.parquet``: ``band``, ``mjd``, ``ra``, ``dec``, ``airmass`` per frame),
interpolated in the along-scan coordinate. Used for the calibration (``c2 (X − 1)`` and the
zero point's time dependence at each source) and for the catalog's ``jdate``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from gpu2mass.geometry import tan_project

__all__ = ["source_epochs"]


def source_epochs(ra, dec, frames: Mapping[str, np.ndarray], band: str) -> tuple[np.ndarray, np.ndarray]:
    """Epoch (MJD) and airmass of sources at ``ra``, ``dec`` (deg, arrays of shape (n,)).

    Parameters
    ----------
    frames
        Columns of a scan's frames table (all bands; rows of ``band`` are used).
    band
        Band whose frames time the sources (the bands of one FRAME are simultaneous, so any
        band gives the same answer to within a frame period).

    Returns
    -------
    mjd, airmass
        Float arrays (n,). Sources beyond the first or last frame centre get that frame's
        values (no extrapolation).
    """
    sel = np.asarray(frames["band"]).astype(str) == band
    if not sel.any():
        raise ValueError(f"the frames table has no rows of band {band}")
    fra, fdec = np.asarray(frames["ra"], float)[sel], np.asarray(frames["dec"], float)[sel]
    mjd, x = np.asarray(frames["mjd"], float)[sel], np.asarray(frames["airmass"], float)[sel]
    ra0, dec0 = float(np.median(fra)), float(np.median(fdec))
    # Along-scan coordinate: the tangent-plane axis along which the frame centres spread.
    fxi, feta = tan_project(fra, fdec, ra0, dec0)
    axis = np.array([np.ptp(fxi), np.ptp(feta)], float)
    axis = axis / max(np.hypot(*axis), 1e-12)
    f_along = fxi * axis[0] + feta * axis[1]
    sxi, seta = tan_project(np.asarray(ra, float), np.asarray(dec, float), ra0, dec0)
    s_along = sxi * axis[0] + seta * axis[1]
    order = np.argsort(f_along, kind="stable")
    return (np.interp(s_along, f_along[order], mjd[order]),
            np.interp(s_along, f_along[order], x[order]))
