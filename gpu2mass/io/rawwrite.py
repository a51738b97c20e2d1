"""Writing nights in the raw night format (``shared/spec/raw-night.md``).

The simulator writes through these functions, and so can anyone converting their own
camera data. Every file is written atomically. The writer checks shapes and types it is
given but leaves the full rule set to the reader (:mod:`gpu2mass.io.rawnight`), which the
tests run over everything written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from gpu2mass.io._atomic import atomic_path
from gpu2mass.io.rawformat import FRAMES_COLUMNS, FRAMES_EXTNAME, calib_file

__all__ = [
    "encode_cube",
    "write_calib_image",
    "write_json",
    "write_manifest",
    "write_parquet",
    "write_scan_band",
]


def encode_cube(cube: np.ndarray, *, signed: bool) -> np.ndarray:
    """Round a DN cube to the smallest integer type that holds it.

    R1 values are non-negative and usually fit ``uint16`` (stored by FITS as int16 with
    BZERO = 32768, which is the case the spec warns readers about); R2−R1 values can be
    negative and usually fit ``int16``. Anything wider goes to ``int32``.
    """
    rounded = np.rint(cube)
    lo, hi = float(rounded.min(initial=0)), float(rounded.max(initial=0))
    if not signed and lo >= 0 and hi <= np.iinfo(np.uint16).max:
        return rounded.astype(np.uint16)
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return rounded.astype(np.int16)
    return rounded.astype(np.int32)


def write_scan_band(
    path: str | Path,
    *,
    scan: int,
    band: str,
    scan_type: str,
    scandir: str,
    observatory: str,
    r1: np.ndarray,
    r2r1: np.ndarray,
    frames: dict[str, np.ndarray],
) -> None:
    """Write one scan band file: primary header, ``R1``, ``R2R1`` and ``FRAMES`` HDUs.

    Parameters
    ----------
    r1, r2r1
        Integer DN cubes ``(nframes, ny, nx)``; see :func:`encode_cube`.
    frames
        Column name → array of length ``nframes`` for every column of
        :data:`~gpu2mass.io.rawformat.FRAMES_COLUMNS`.
    """
    if r1.shape != r2r1.shape or r1.ndim != 3:
        raise ValueError(f"R1 {r1.shape} and R2R1 {r2r1.shape} must be equal 3-d cubes")
    nframes = r1.shape[0]
    primary = fits.PrimaryHDU()
    h = primary.header
    h["SCANNO"] = (int(scan), "scan number in the night")
    h["BAND"] = (band, "J, H or K (Ks)")
    h["TYPE"] = (scan_type, "scan type: sci, cal, dark, flat")
    h["SCANDIR"] = (scandir, "n, s, or empty for dark scans")
    h["NFRAMES"] = (int(nframes), "frames in this file")
    h["OBSERVAT"] = (observatory, "hemisphere code n or s")
    hdus = [primary]
    for name, cube in (("R1", r1), ("R2R1", r2r1)):
        if np.issubdtype(cube.dtype, np.floating):
            cube = encode_cube(cube, signed=(name == "R2R1"))
        hdus.append(fits.ImageHDU(data=cube, name=name))
    cols = []
    formats = {"FRAME": "J", "MJD": "D", "RA_CMD": "D", "DEC_CMD": "D", "AIRMASS": "E"}
    units = {"MJD": "d", "RA_CMD": "deg", "DEC_CMD": "deg"}
    for col in FRAMES_COLUMNS:
        values = np.asarray(frames[col])
        if values.shape != (nframes,):
            raise ValueError(f"FRAMES column {col} has shape {values.shape}, want ({nframes},)")
        cols.append(fits.Column(name=col, format=formats[col], unit=units.get(col), array=values))
    hdus.append(fits.BinTableHDU.from_columns(cols, name=FRAMES_EXTNAME))
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)


def write_calib_image(calib_dir: str | Path, kind: str, band: str, image: np.ndarray) -> Path:
    """Write ``calib/<kind>_<band>.fits`` with the image in the primary HDU."""
    path = Path(calib_dir) / calib_file(kind, band)
    hdu = fits.PrimaryHDU(data=image)
    hdu.header["BAND"] = band
    hdu.header["CALTYPE"] = kind
    with atomic_path(path) as tmp:
        hdu.writeto(tmp, overwrite=True)
    return path


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_manifest(night_dir: str | Path, manifest: dict) -> Path:
    """Write ``night.json``."""
    path = Path(night_dir) / "night.json"
    write_json(path, manifest)
    return path


def write_parquet(path: str | Path, columns: dict[str, np.ndarray | list]) -> None:
    """Write a Parquet table from column name → values (``None`` entries become nulls)."""
    table = pa.table({k: (pa.array(v) if isinstance(v, list) else v) for k, v in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
