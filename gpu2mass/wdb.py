"""The working database: a processed night's products in one DuckDB file (products spec §6).

2MAPPS kept its outputs in an Informix working database (the "WDB") from which the
catalogs were later extracted; ours is one embedded DuckDB file, ``<out>/wdb.duckdb`` by
default, holding five tables:

``pts``
    the point-source rows of every scan whose QA status is not ``failed``
    (``scans/<scan>/pts.parquet``: the §3.1 PSC columns and the §3.2 added ones);
``xsc``
    the extended-source rows of the same scans (``scans/<scan>/xsc.parquet`` when present;
    otherwise the table exists with the §3.3 columns and no rows);
``scans``
    one row per scan of the night, failed ones included: type, run status, QA status,
    score, reasons, the QA figures of ``qa.json`` flattened into columns (per band
    ``j_seeing_fwhm``, ``j_m10``, ...), the scan's time, airmass and centre from its
    frames table, and the median Atlas Image zero point per band;
``atlas``
    one row per Atlas Image: path, band, image number, header figures (MAGZP, MAGZPERR,
    SEEING, M10, ...), WCS centre and the four corners;
``nights``
    one row per night: provenance (manifest checksum, device, versions, configuration),
    calibration status, ``night/calibration.json`` as JSON text and its per-band scalars.

Every table is keyed by ``night`` (the UT date ``YYYY-MM-DD`` at sunset, as in the raw
night's manifest) and ``hemis`` (the observatory, ``n`` or ``s``: 2MASS observed the same UT
date from both hemispheres), so that many nights share one database. Loading a night deletes
that night's rows from every table and inserts the new ones in ONE transaction: a load that
fails half-way leaves the database as it was, and loading the same products twice leaves
the same rows.

Schema: a table is created on its first load from the Arrow schema of what is loaded (the
Parquet files' types are kept: nulls stay nulls, strings stay strings); later loads add the
columns they bring (earlier rows read null there) and leave null the columns they lack.
Columns that are null in every row of their file have no type of their own; they take the
type the 2MASS catalogs give the column (:data:`PTS_COLUMN_TYPES`, :data:`XSC_COLUMN_TYPES`),
``DOUBLE`` for a column the catalogs do not define.

:func:`run_query` runs read-only SQL on a database and formats the result as an aligned text
table, CSV text, or a Parquet file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gpu2mass.errors import InputError, StepError

__all__ = ["DB_NAME", "PTS_COLUMN_TYPES", "TABLES", "XSC_COLUMN_TYPES", "database_path",
           "load_night", "run_query"]

#: File name of the working database inside an output directory.
DB_NAME = "wdb.duckdb"

#: The tables of products spec §6, in load order.
TABLES = ("nights", "scans", "atlas", "pts", "xsc")

_BANDS = ("j", "h", "k")


def _band_types(pattern: Mapping[str, str]) -> dict[str, str]:
    return {name.format(b=b): t for b in _BANDS for name, t in pattern.items()}


#: DuckDB types of the §3.1/§3.2 point-source columns, from the 2MASS PSC column definitions
#: (Explanatory Supplement §2.2a), used for a column that is null in every row of its file and
#: for the table a night without any point-source file creates. Integers where the PSC has
#: integers (keys, counts, 0/1 flags, edge distances in whole arcsec), text for flag strings
#: and for ``date`` (``YYYY-MM-DD``, as :mod:`gpu2mass.psc` writes it).
PTS_COLUMN_TYPES: dict[str, str] = {
    "ra": "DOUBLE", "dec": "DOUBLE", "err_maj": "DOUBLE", "err_min": "DOUBLE",
    "err_ang": "DOUBLE", "designation": "VARCHAR",
    **_band_types({"{b}_m": "DOUBLE", "{b}_cmsig": "DOUBLE", "{b}_msigcom": "DOUBLE",
                   "{b}_snr": "DOUBLE"}),
    "ph_qual": "VARCHAR", "rd_flg": "VARCHAR", "bl_flg": "VARCHAR", "cc_flg": "VARCHAR",
    "ndet": "VARCHAR", "prox": "DOUBLE", "pxpa": "INTEGER", "pxcntr": "BIGINT",
    "gal_contam": "INTEGER", "mp_flg": "INTEGER", "pts_key": "BIGINT", "hemis": "VARCHAR",
    "date": "VARCHAR", "scan": "INTEGER", "glon": "DOUBLE", "glat": "DOUBLE", "x_scan": "DOUBLE",
    "jdate": "DOUBLE",
    **_band_types({"{b}_psfchi": "DOUBLE", "{b}_m_stdap": "DOUBLE",
                   "{b}_msig_stdap": "DOUBLE"}),
    "dist_edge_ns": "INTEGER", "dist_edge_ew": "INTEGER", "dist_edge_flg": "VARCHAR",
    "dup_src": "INTEGER", "use_src": "INTEGER", "ext_key": "BIGINT", "scan_key": "BIGINT",
    "coadd_key": "BIGINT", "coadd": "INTEGER",
    "healpix_29": "BIGINT",
    **_band_types({"{b}_x": "DOUBLE", "{b}_y": "DOUBLE", "{b}_flux": "DOUBLE",
                   "{b}_flux_err": "DOUBLE"}),
    "sep_j_h": "DOUBLE", "sep_j_k": "DOUBLE",
}

#: DuckDB types of the §3.3 extended-source columns (2MASS XSC definitions: magnitudes,
#: radii, axis ratios and angles as numbers, the k20fe flags as integers, ``cc_flg`` text).
XSC_COLUMN_TYPES: dict[str, str] = {
    "ra": "DOUBLE", "dec": "DOUBLE", "sup_ra": "DOUBLE", "sup_dec": "DOUBLE",
    "r_k20fe": "DOUBLE",
    **_band_types({"{b}_m_k20fe": "DOUBLE", "{b}_msig_k20fe": "DOUBLE",
                   "{b}_flg_k20fe": "INTEGER"}),
    "r_3sig": "DOUBLE",
    **_band_types({"{b}_ba": "DOUBLE", "{b}_phi": "DOUBLE"}),
    "r_ext": "DOUBLE",
    **_band_types({"{b}_m_ext": "DOUBLE", "{b}_r_eff": "DOUBLE"}),
    **{f"{b}_{kind}_{n}": "DOUBLE" for b in _BANDS for n in (5, 7, 10, 15, 20, 25)
       for kind in ("m", "msig")},
    "e_score": "DOUBLE", "g_score": "DOUBLE", "cc_flg": "VARCHAR", "density": "DOUBLE",
    "scan": "INTEGER", "jdate": "DOUBLE", "healpix_29": "BIGINT",
}

_KEY_TYPES = {"night": "VARCHAR", "hemis": "VARCHAR"}

#: ``scans`` columns the loader sets itself. A QA figure of the same name (``mjd_start``,
#: ``mjd_end``) fills the column only where the loader has no value of its own (a failed
#: scan has no frames table); the whole ``qa.json`` stays in the ``qa`` column as JSON text.
_SCAN_COLUMN_TYPES = {
    "night": "VARCHAR", "hemis": "VARCHAR", "scan": "INTEGER", "type": "VARCHAR",
    "status": "VARCHAR", "run_status": "VARCHAR", "reason": "VARCHAR", "score": "DOUBLE",
    "reasons": "VARCHAR[]", "loaded": "BOOLEAN", "n_pts": "BIGINT", "n_xsc": "BIGINT",
    "n_frames": "INTEGER", "mjd_start": "DOUBLE", "mjd_end": "DOUBLE", "airmass": "DOUBLE",
    "ra": "DOUBLE", "dec": "DOUBLE",
    **_band_types({"{b}_magzp": "DOUBLE", "{b}_magzperr": "DOUBLE", "{b}_n_atlas": "INTEGER"}),
    "qa": "VARCHAR",
}

#: ``atlas`` columns: header keywords of products spec §2 (null where absent) and the WCS
#: centre and corners (degrees, ICRS).
_ATLAS_COLUMN_TYPES = {
    "night": "VARCHAR", "hemis": "VARCHAR", "scan": "INTEGER", "band": "VARCHAR",
    "image": "INTEGER", "path": "VARCHAR", "naxis1": "INTEGER", "naxis2": "INTEGER",
    "ordate": "VARCHAR", "type": "VARCHAR", "scanno": "INTEGER", "scandir": "VARCHAR",
    "strip_id": "INTEGER", "magzp": "DOUBLE", "magzperr": "DOUBLE", "skyval": "DOUBLE",
    "skysig": "DOUBLE", "seesh": "DOUBLE", "seeing": "DOUBLE", "nframes": "INTEGER",
    "m10": "DOUBLE", "ra": "DOUBLE", "dec": "DOUBLE",
    **{f"{c}{i}": "DOUBLE" for i in range(1, 5) for c in ("ra", "dec")},
}
_ATLAS_KEYWORDS = ("ORDATE", "TYPE", "SCANNO", "SCANDIR", "STRIP_ID", "MAGZP", "MAGZPERR",
                   "SKYVAL", "SKYSIG", "SEESH", "SEEING", "NFRAMES", "M10")

_NIGHT_COLUMN_TYPES = {
    "night": "VARCHAR", "hemis": "VARCHAR", "raw_night": "VARCHAR", "out_dir": "VARCHAR",
    "manifest_sha256": "VARCHAR", "device": "VARCHAR", "gpu2mass_version": "VARCHAR",
    "calibration_status": "VARCHAR", "exit_status": "INTEGER", "n_scans": "INTEGER",
    "n_scans_loaded": "INTEGER", "n_scans_failed": "INTEGER", "n_pts": "BIGINT",
    "n_xsc": "BIGINT", "n_atlas": "BIGINT", "seconds_total": "DOUBLE",
    "peak_host_memory_mb": "DOUBLE", "peak_device_memory_mb": "DOUBLE",
    "versions": "VARCHAR", "config": "VARCHAR", "calibration": "VARCHAR",
    "calibration_reasons": "VARCHAR[]",
}

_TABLE_TYPES = {"nights": _NIGHT_COLUMN_TYPES, "scans": _SCAN_COLUMN_TYPES,
                "atlas": _ATLAS_COLUMN_TYPES, "pts": PTS_COLUMN_TYPES, "xsc": XSC_COLUMN_TYPES}


def database_path(out_dir_or_db: str | Path) -> Path:
    """The database file: ``out_dir_or_db`` itself, or ``<dir>/wdb.duckdb`` for a directory."""
    p = Path(out_dir_or_db)
    return p / DB_NAME if p.is_dir() else p


# ---------------------------------------------------------------------------------------
# loading


def load_night(out_dir: str | Path, db_path: str | Path | None = None) -> dict[str, int]:
    """Load a processed night into the working database, replacing that night's rows.

    Parameters
    ----------
    out_dir
        The output directory of ``gpu2mass night`` (``run.json``, ``scans/``, ``atlas/``,
        ``night/``).
    db_path
        The DuckDB file; default ``out_dir/wdb.duckdb``. Created when absent; other nights'
        rows in it are left alone.

    Returns
    -------
    dict
        Rows loaded for this night per table: ``{"nights": 1, "scans": .., "atlas": ..,
        "pts": .., "xsc": ..}``.

    Raises
    ------
    InputError
        ``run.json`` is missing or unreadable, or the night's date cannot be found.
    StepError
        The database cannot be opened (another process holds it) or refused the load (e.g.
        a column whose type conflicts with an earlier night's); the database is left as it
        was. Any other exception during the load (an unreadable product) also leaves it as
        it was.
    """
    import duckdb

    out_dir = Path(out_dir).resolve()
    db = Path(db_path) if db_path is not None else out_dir / DB_NAME
    run = _read_json(out_dir / "run.json", what="run.json of a processed night")
    night, hemis = _night_identity(out_dir, run)
    key = {"night": night, "hemis": hemis}

    scans = _scan_entries(out_dir, run)
    loaded = [s for s in scans if s["status"] != "failed"]
    atlas = _atlas_table(out_dir, key)
    calibration_text = _optional_text(out_dir / "night" / "calibration.json")

    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(db))
    except duckdb.Error as exc:  # e.g. another process holds the file's lock
        raise StepError(f"{db}: cannot open the working database to load night {night} "
                        f"({out_dir}): {exc}") from exc
    counts = dict.fromkeys(TABLES, 0)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            existing = _existing_tables(con)
            for table in TABLES:
                if table in existing:
                    con.execute(f'DELETE FROM "{table}" WHERE night = ? AND hemis = ?',
                                [night, hemis])
            for kind in ("pts", "xsc"):
                for s in loaded:
                    t = _read_scan_table(out_dir, s["scan"], kind)
                    if t is None:
                        continue
                    t = _with_keys(t, key)
                    _insert(con, kind, t, existing)
                    s[f"n_{kind}"] = t.num_rows
                    counts[kind] += t.num_rows
                if kind not in existing:  # no scan had a file: the spec's columns, no rows
                    _create_empty(con, kind, existing)
            _insert(con, "atlas", atlas, existing)
            counts["atlas"] = atlas.num_rows
            scans_table = _scans_table(out_dir, scans, atlas, key)
            _insert(con, "scans", scans_table, existing)
            counts["scans"] = scans_table.num_rows
            _insert(con, "nights", _nights_table(out_dir, run, key, scans, counts,
                                                 calibration_text), existing)
            counts["nights"] = 1
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # keep the original error in view
                con.execute("ROLLBACK")
            raise
    except duckdb.Error as exc:
        raise StepError(f"{db}: loading night {night} ({out_dir}) failed, the database is "
                        f"unchanged: {exc}") from exc
    finally:
        con.close()
    return counts


def _read_json(path: Path, *, what: str):
    if not path.is_file():
        raise InputError(path, f"does not exist; expected the {what}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot be read as JSON ({exc})") from None


def _optional_text(path: Path) -> str | None:
    """A JSON product's text, re-serialised compactly (``None`` when absent)."""
    if not path.is_file():
        return None
    return json.dumps(_read_json(path, what="night product"), sort_keys=True)


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _night_identity(out_dir: Path, run: dict) -> tuple[str, str]:
    """``(night, hemis)``: from ``run.json`` (``night_date``, ``observatory``), else from the
    raw night's manifest that ``run.json`` names."""
    date, obs = run.get("night_date"), run.get("observatory")
    if date is None or obs is None:
        raw = run.get("night")
        manifest = Path(raw) / "night.json" if raw else None
        if manifest is None or not manifest.is_file():
            raise InputError(out_dir / "run.json", "has no night_date/observatory and the raw "
                             f"night it names ({raw!r}) has no night.json to read them from")
        m = _read_json(manifest, what="raw night manifest")
        date = date if date is not None else m.get("night")
        obs = obs if obs is not None else m.get("observatory")
    if not isinstance(date, str) or not _DATE.match(date):
        raise InputError(out_dir / "run.json", f"night date {date!r} is not a YYYY-MM-DD string")
    if obs not in ("n", "s"):
        raise InputError(out_dir / "run.json", f"observatory {obs!r} is not 'n' or 's'")
    return date, obs


def _scan_entries(out_dir: Path, run: dict) -> list[dict]:
    """One dict per scan of ``run.json``, with its QA (``qa.json`` when present) and the
    effective status: the QA status, else ``run.json``'s ``qa_status``, else its run status."""
    entries = []
    for item in run.get("scans", []):
        scan = int(item["scan"])
        qa_path = out_dir / "scans" / f"{scan:03d}" / "qa.json"
        qa = _read_json(qa_path, what="scan QA") if qa_path.is_file() else None
        run_status = item.get("status")
        status = (qa or {}).get("status") or item.get("qa_status") or run_status
        entries.append({"scan": scan, "type": item.get("type"), "run_status": run_status,
                        "reason": item.get("reason"), "status": status, "qa": qa,
                        "n_pts": 0, "n_xsc": 0})
    return entries


def _read_scan_table(out_dir: Path, scan: int, kind: str):
    """``scans/<scan>/<kind>.parquet`` as an Arrow table (``None`` when the scan has none)."""
    import pyarrow.parquet as pq

    path = out_dir / "scans" / f"{scan:03d}" / f"{kind}.parquet"
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise InputError(path, f"cannot be read as Parquet ({exc})") from None


def _with_keys(table, key: Mapping[str, str]):
    """``table`` with the ``night`` and ``hemis`` columns first (an existing ``hemis``, the
    PSC column of the same meaning, is replaced by the night's)."""
    import pyarrow as pa

    for name in key:
        if name in table.column_names:
            table = table.drop_columns([name])
    n = table.num_rows
    for i, (name, value) in enumerate(key.items()):
        table = table.add_column(i, name, pa.array([value] * n, pa.string()))
    return table


def _existing_tables(con) -> set[str]:
    rows = con.execute("SELECT table_name FROM information_schema.tables "
                       "WHERE table_schema = 'main'").fetchall()
    return {r[0] for r in rows}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _arrow_type(duck: str):
    import pyarrow as pa

    return {"DOUBLE": pa.float64(), "VARCHAR": pa.string(), "INTEGER": pa.int32(),
            "BIGINT": pa.int64(), "BOOLEAN": pa.bool_(), "DATE": pa.date32(),
            "VARCHAR[]": pa.list_(pa.string())}[duck]


def _typed_nulls(table, name: str):
    """Give columns of Arrow type ``null`` (null in every row) the catalog's type."""
    import pyarrow as pa

    types = {**_KEY_TYPES, **_TABLE_TYPES[name]}
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type):
            t = _arrow_type(types.get(field.name, "DOUBLE"))
            table = table.set_column(i, pa.field(field.name, t, metadata=field.metadata),
                                     pa.nulls(table.num_rows, t))
    return table


def _insert(con, name: str, table, existing: set[str]) -> None:
    """Insert ``table`` into ``name``: create it from the table's schema on first use, add
    the columns it brings, leave null those it lacks."""
    table = _typed_nulls(table, name)
    con.register("_wdb_rows", table)
    try:
        if name not in existing:
            con.execute(f"CREATE TABLE {_quote(name)} AS SELECT * FROM _wdb_rows")
            existing.add(name)
            return
        have = {r[0]: r[1] for r in con.execute(f"DESCRIBE {_quote(name)}").fetchall()}
        for col, duck_type, *_ in con.execute("DESCRIBE SELECT * FROM _wdb_rows").fetchall():
            if col not in have:
                con.execute(f"ALTER TABLE {_quote(name)} ADD COLUMN {_quote(col)} {duck_type}")
            elif have[col] in _INTEGER_TYPES and duck_type in ("DOUBLE", "FLOAT"):
                # An integer column meeting fractional values is widened: an implicit cast
                # on insert would round them silently.
                con.execute(f"ALTER TABLE {_quote(name)} ALTER COLUMN {_quote(col)} "
                            "SET DATA TYPE DOUBLE")
        con.execute(f"INSERT INTO {_quote(name)} BY NAME SELECT * FROM _wdb_rows")
    finally:
        con.unregister("_wdb_rows")


_INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT",
                  "UINTEGER", "UBIGINT", "HUGEINT"}


def _create_empty(con, name: str, existing: set[str]) -> None:
    """The table with the key columns and the spec's columns, no rows."""
    types = {**_KEY_TYPES, **_TABLE_TYPES[name]}
    cols = ", ".join(f"{_quote(c)} {t}" for c, t in types.items())
    con.execute(f"CREATE TABLE {_quote(name)} ({cols})")
    existing.add(name)


def _from_rows(rows: list[dict], types: Mapping[str, str]):
    """An Arrow table from row dicts: the known columns in ``types`` order with their types,
    then every other key in order of first appearance with the type Arrow infers (a column
    whose values Arrow cannot unify, e.g. numbers and text, is stored as JSON text)."""
    import pyarrow as pa

    names = [c for c in types if any(c in r for r in rows)]
    for r in rows:
        names.extend(k for k in r if k not in types and k not in names)
    arrays, fields = [], []
    for col in names:
        values = [r.get(col) for r in rows]
        if col in types:
            arr = pa.array(values, _arrow_type(types[col]))
        else:
            try:
                arr = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                arr = pa.array([None if v is None else json.dumps(v) for v in values],
                               pa.string())
            if pa.types.is_list(arr.type) and pa.types.is_null(arr.type.value_type):
                arr = arr.cast(pa.list_(pa.string()))  # only empty lists: lists of text
        arrays.append(arr)
        fields.append(pa.field(col, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --- atlas -------------------------------------------------------------------------------


def _atlas_table(out_dir: Path, key: Mapping[str, str]):
    """One row per ``atlas/<band>_<scan>_<img>.fits``: header figures, WCS centre and corners.

    Corners are the outer edges of the corner pixels, in the order (1, 1), (NAXIS1, 1),
    (NAXIS1, NAXIS2), (1, NAXIS2) in FITS pixel numbering (south-east first for a north-up,
    east-left image); the centre is the middle of the grid, ((NAXIS1 + 1) / 2,
    (NAXIS2 + 1) / 2).
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    rows = []
    pattern = re.compile(r"^([a-z]+)_(\d+)_(\d+)\.fits$")
    for path in sorted((out_dir / "atlas").glob("*.fits")):
        m = pattern.match(path.name)
        if m is None:
            continue
        try:
            header = fits.getheader(path)
        except OSError as exc:
            raise InputError(path, f"cannot be read as an Atlas Image FITS file ({exc})") from None
        nx, ny = int(header.get("NAXIS1", 0)), int(header.get("NAXIS2", 0))
        wcs = WCS(header, naxis=2)
        # 0-based pixel coordinates: centre (n - 1) / 2, outer edges -0.5 and n - 0.5.
        px = np.array([(nx - 1) / 2, -0.5, nx - 0.5, nx - 0.5, -0.5])
        py = np.array([(ny - 1) / 2, -0.5, -0.5, ny - 0.5, ny - 0.5])
        ra, dec = wcs.all_pix2world(px, py, 0)
        row = {**key, "scan": int(m.group(2)), "band": m.group(1).upper(),
               "image": int(m.group(3)), "path": str(path), "naxis1": nx, "naxis2": ny}
        for kw in _ATLAS_KEYWORDS:
            value = header.get(kw)
            if isinstance(value, str):
                value = value.strip()
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if _ATLAS_COLUMN_TYPES[kw.lower()] == "VARCHAR" and value is not None:
                value = str(value)
            row[kw.lower()] = value
        row["ra"], row["dec"] = float(ra[0]) % 360.0, float(dec[0])
        for i in range(1, 5):
            row[f"ra{i}"], row[f"dec{i}"] = float(ra[i]) % 360.0, float(dec[i])
        rows.append(row)
    table = _from_rows(rows, _ATLAS_COLUMN_TYPES)
    if not rows:  # keep the full schema for a night without Atlas Images
        import pyarrow as pa

        table = pa.schema([pa.field(c, _arrow_type(t))
                           for c, t in _ATLAS_COLUMN_TYPES.items()]).empty_table()
    return table


# --- scans -------------------------------------------------------------------------------


def _flatten_qa(qa: Mapping) -> dict:
    """``qa.json`` as flat columns: per-band objects (keys J/H/K, also under ``bands``) become
    ``<band>_<figure>`` (``j_seeing_fwhm``), other objects ``<key>_<member>``; lists of
    strings stay lists, other lists become JSON text."""
    out: dict = {}

    def name(*parts: str) -> str:
        return re.sub(r"[^0-9a-z_]+", "_", "_".join(parts).lower()).strip("_")

    def put(prefix: tuple[str, ...], value) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                put((*prefix, str(k)), v)
        elif isinstance(value, list):
            if all(isinstance(v, str) for v in value):
                out[name(*prefix)] = list(value)
            else:
                out[name(*prefix)] = json.dumps(value)
        elif isinstance(value, float) and not math.isfinite(value):
            out[name(*prefix)] = None
        else:
            out[name(*prefix)] = value

    for k, v in qa.items():
        if k == "bands" and isinstance(v, Mapping):
            put((), v)  # {"bands": {"J": {...}}} reads as {"J": {...}}
        else:
            put((str(k),), v)
    return out


def _frames_summary(out_dir: Path, scan: int) -> dict:
    """Time span, median airmass, mean pointing and frames per band of a scan."""
    import pyarrow.parquet as pq

    path = out_dir / "scans" / f"{scan:03d}" / "frames.parquet"
    if not path.is_file():
        return {}
    cols = pq.read_table(path, columns=["band", "mjd", "ra", "dec", "airmass"]).to_pydict()
    mjd = np.asarray(cols["mjd"], float)
    if mjd.size == 0:
        return {}
    ra, dec = np.radians(cols["ra"]), np.radians(cols["dec"])
    # Mean of unit vectors: right across RA 0/360.
    v = np.array([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)]).mean(axis=1)
    nbands = max(len(set(cols["band"])), 1)
    return {"n_frames": int(mjd.size // nbands), "mjd_start": float(mjd.min()),
            "mjd_end": float(mjd.max()),
            "airmass": float(np.median(np.asarray(cols["airmass"], float))),
            "ra": float(np.degrees(np.arctan2(v[1], v[0])) % 360.0),
            "dec": float(np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1]))))}


def _scans_table(out_dir: Path, scans: list[dict], atlas, key: Mapping[str, str]):
    atlas_cols = atlas.select(["scan", "band", "magzp", "magzperr"]).to_pydict()
    rows = []
    for s in scans:
        qa = s["qa"] or {}
        row = {**key, "scan": s["scan"], "type": s["type"], "status": s["status"],
               "run_status": s["run_status"], "reason": s["reason"],
               "score": qa.get("score"), "reasons": qa.get("reasons"),
               "loaded": s["status"] != "failed", "n_pts": s["n_pts"], "n_xsc": s["n_xsc"]}
        row.update(_frames_summary(out_dir, s["scan"]))
        for b in _BANDS:
            sel = [i for i, (sc, bd) in enumerate(zip(atlas_cols["scan"], atlas_cols["band"]))
                   if sc == s["scan"] and bd.lower() == b]
            zp = [atlas_cols["magzp"][i] for i in sel if atlas_cols["magzp"][i] is not None]
            err = [atlas_cols["magzperr"][i] for i in sel if atlas_cols["magzperr"][i] is not None]
            row[f"{b}_n_atlas"] = len(sel)
            row[f"{b}_magzp"] = float(np.median(zp)) if zp else None
            row[f"{b}_magzperr"] = float(np.median(err)) if err else None
        if s["qa"] is not None:
            row["qa"] = json.dumps(s["qa"], sort_keys=True)
            for k, v in _flatten_qa(s["qa"]).items():
                if k not in _SCAN_COLUMN_TYPES or row.get(k) is None:
                    row[k] = v
        rows.append(row)
    # An object null in some scans (a failed scan's "factors": null) and flattened in others
    # ("factors_seeing", ...) would leave an empty "factors" column: drop it.
    names = {k for r in rows for k in r}
    for col in {k for k in names if k not in _SCAN_COLUMN_TYPES
                and all(r.get(k) is None for r in rows)
                and any(n.startswith(k + "_") for n in names)}:
        for r in rows:
            r.pop(col, None)
    return _from_rows(rows, _SCAN_COLUMN_TYPES)


# --- nights ------------------------------------------------------------------------------


def _nights_table(out_dir: Path, run: dict, key: Mapping[str, str], scans: list[dict],
                  counts: Mapping[str, int], calibration_text: str | None):
    versions = run.get("gpu2mass") if isinstance(run.get("gpu2mass"), Mapping) else {}
    seconds = run.get("seconds") if isinstance(run.get("seconds"), Mapping) else {}
    calibration = json.loads(calibration_text) if calibration_text is not None else None
    status = run.get("calibration")
    if status is None and isinstance(calibration, Mapping):
        status = calibration.get("status")
    row = {**key, "raw_night": run.get("night"), "out_dir": str(out_dir),
           "manifest_sha256": run.get("manifest_sha256"), "device": run.get("device"),
           "gpu2mass_version": versions.get("gpu2mass"),
           "calibration_status": status if isinstance(status, str) else None,
           "exit_status": run.get("exit_status"), "n_scans": len(scans),
           "n_scans_loaded": sum(s["status"] != "failed" for s in scans),
           "n_scans_failed": sum(s["status"] == "failed" for s in scans),
           "n_pts": counts["pts"], "n_xsc": counts["xsc"], "n_atlas": counts["atlas"],
           "seconds_total": seconds.get("total"),
           "peak_host_memory_mb": run.get("peak_host_memory_mb"),
           "peak_device_memory_mb": run.get("peak_device_memory_mb"),
           "versions": json.dumps(versions, sort_keys=True) if versions else None,
           "config": json.dumps(run["config"], sort_keys=True) if "config" in run else None,
           "calibration": calibration_text,
           "calibration_reasons": (calibration or {}).get("reasons") or None}
    row.update(_calibration_scalars(calibration))
    return _from_rows([row], _NIGHT_COLUMN_TYPES)


def _calibration_scalars(calibration) -> dict:
    """The per-band scalar members of ``calibration.json`` (its ``bands`` object, or band
    keys at the top level) as ``<band>_cal_<member>`` columns; lists and nested objects (the
    standards' residual rows, leave-one-out tables) stay in the JSON text only."""
    out: dict = {}
    if not isinstance(calibration, Mapping):
        return out
    per_band = calibration.get("bands") if isinstance(calibration.get("bands"), Mapping) \
        else calibration
    order = {b: i for i, b in enumerate(_BANDS)}
    for band, figures in sorted(per_band.items(), key=lambda kv: order.get(str(kv[0]).lower(), 9)):
        if str(band).lower() not in _BANDS or not isinstance(figures, Mapping):
            continue
        for k, v in figures.items():
            if k == "band":
                continue
            if isinstance(v, bool | int | float | str) or v is None:
                if isinstance(v, float) and not math.isfinite(v):
                    v = None
                col = re.sub(r"[^0-9a-z_]+", "_", f"{band}_cal_{k}".lower())
                out[col] = v
    return out


# ---------------------------------------------------------------------------------------
# querying


def run_query(db_path_or_out_dir: str | Path, sql: str, *, fmt: str = "table",
              output: str | Path | None = None, max_rows: int = 50,
              max_width: int = 40) -> str | Path:
    """Run SQL on a working database, read-only, and format the result.

    Parameters
    ----------
    db_path_or_out_dir
        The DuckDB file, or an output directory holding ``wdb.duckdb``.
    sql
        One SQL statement; the database is opened read-only, so statements that would
        change it are refused.
    fmt
        ``"table"``: an aligned text table (numbers right-aligned, floats to 12
        significant digits, nulls shown as ``NULL``), at most ``max_rows`` rows (the first
        and last halves, with a line saying how many were left out) and cells cut to
        ``max_width`` characters; its last line gives the number of rows. ``"csv"``: every row as
        CSV text with a header line, nulls as empty fields. ``"parquet"``: every row written
        atomically to ``output`` (required), types kept.

    Returns
    -------
    str or Path
        The text (``table``, ``csv``) or the Parquet file's path.

    Raises
    ------
    InputError
        No database there, an unknown format, ``parquet`` without ``output``, or SQL that
        the database rejects (the message is DuckDB's).
    """
    import duckdb

    if fmt not in ("table", "csv", "parquet"):
        raise InputError(None, f"unknown query format {fmt!r}: use table, csv or parquet")
    if fmt == "parquet" and output is None:
        raise InputError(None, "the parquet format writes a file: give an output path")
    db = database_path(db_path_or_out_dir)
    if not db.is_file():
        raise InputError(db, "no working database here; run `gpu2mass night` (which loads "
                             "it) or name the database file")
    con = duckdb.connect(str(db), read_only=True)
    try:
        rel = con.sql(sql)
        result = _relation_arrow(rel) if rel is not None else None
    except duckdb.Error as exc:
        raise InputError(db, f"query failed: {exc}") from None
    finally:
        con.close()
    if result is None:
        import pyarrow as pa

        result = pa.table({})
    if fmt == "parquet":
        import pyarrow.parquet as pq

        from gpu2mass.io._atomic import atomic_path

        output = Path(output)
        with atomic_path(output) as tmp:
            pq.write_table(result, tmp)
        return output
    if fmt == "csv":
        return _csv_text(result)
    return _text_table(result, max_rows=max_rows, max_width=max_width)


def _relation_arrow(rel):
    # DuckDB >= 1.4 names it to_arrow_table; earlier versions arrow().
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()


def _cell(value, *, digits: int | None = None) -> str:
    """One value as text: floats as their shortest round-trip repr (or to ``digits``
    significant digits), dates ISO, lists as ``[a, b]``."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if digits is None else f"{value:.{digits}g}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v, digits=digits) for v in value) + "]"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _csv_text(table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.column_names)
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    for row in zip(*columns):
        writer.writerow([_cell(v) for v in row])
    return buf.getvalue()


#: Significant digits of floats in the text table (1e-7 of an MJD is 9 ms, of a degree
#: 0.4 mas); CSV and Parquet keep every digit.
_TABLE_DIGITS = 12


def _text_table(table, *, max_rows: int, max_width: int) -> str:
    import pyarrow as pa

    n = table.num_rows
    if n > max_rows:
        head = max_rows - max_rows // 2
        shown = list(range(head)) + list(range(n - max_rows // 2, n))
    else:
        shown = list(range(n))
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
               or pa.types.is_decimal(f.type) for f in table.schema]

    def clip(text: str) -> str:
        return text if len(text) <= max_width else text[:max_width - 3] + "..."

    cells = []
    for i in range(table.num_columns):
        values = table.column(i).take(pa.array(shown, pa.int64())).to_pylist() if shown else []
        cells.append([clip("NULL" if v is None else _cell(v, digits=_TABLE_DIGITS))
                      for v in values])
    names = [clip(c) for c in table.column_names]
    widths = [max([len(h), *(len(c) for c in col)]) for h, col in zip(names, cells)]

    def line(parts: list[str]) -> str:
        return "  ".join(p.rjust(w) if num else p.ljust(w)
                         for p, w, num in zip(parts, widths, numeric)).rstrip()

    lines = [line(names), "  ".join("-" * w for w in widths)]
    for r in range(len(shown)):
        if n > max_rows and r == max_rows - max_rows // 2:
            lines.append(f"... {n - max_rows} more rows ...")
        lines.append(line([col[r] for col in cells]))
    lines.append(f"({n} row{'s' if n != 1 else ''})")
    return "\n".join(lines) + "\n"
