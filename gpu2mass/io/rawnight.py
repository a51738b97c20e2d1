"""Reading a raw night (``shared/spec/raw-night.md``, format version 1).

:func:`open_night` checks every rule of the spec before it returns, so that bad input is
rejected at the door (DESIGN.md section 6): the manifest, the scan band files (headers,
HDU layout, cube shapes, the ``FRAMES`` table), the calibration library, the standards
table, the reference catalog and, with ``check_data=True``, the pixel data of every scan,
read a few frames at a time. The first violation found raises
:class:`~gpu2mass.errors.InputError` naming the offending file and the rule. The checks run
in a fixed order (manifest; scan files in manifest order, with the time overlap of each
scan and the next; calibration library; standards; reference catalog; pixel data), so the
same input always gives the same message.

What comes back is a :class:`Night`: typed manifest fields and scan descriptions, no pixel
data. Scans are loaded lazily, one at a time, with :meth:`Night.load_scan` or
:meth:`Night.iter_scans`; their cubes are :class:`RawCube` objects over read-only memory
maps of the FITS files. Nothing the user gave is ever opened for writing.

Reader choices where the spec leaves a number open (module constants, documented below):
:data:`MJD_TOLERANCE_S`, :data:`CMD_TOLERANCE_DEG`, :data:`SAT_TOLERANCE_DN`,
:data:`FLAT_MEDIAN_TOLERANCE`, :data:`AIRMASS_MIN`, :data:`SITE_HEIGHT_RANGE_M`.

Strictness choices: keys the spec does not define are rejected (a misspelt optional key
such as ``reference_catalog`` would otherwise change the run silently); ``field`` is
allowed on ``cal`` scans only; FITS column names of ``FRAMES`` and of a FITS reference
catalog are matched case-insensitively (FITS convention), Parquet column names exactly;
extra columns in tables are allowed and ignored.

Threads: FITS files are opened under :func:`warnings.catch_warnings` (astropy only *warns*
about truncated files), which before Python 3.14 is process-global; a scan prefetched in a
second thread is safe, but warnings raised by other threads meanwhile may be re-labelled.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Column, MaskedColumn, Table

from gpu2mass.errors import ConfigError, InputError
from gpu2mass.io import rawformat as rf

__all__ = [
    "AIRMASS_MIN",
    "CMD_TOLERANCE_DEG",
    "FLAT_MEDIAN_TOLERANCE",
    "MJD_TOLERANCE_S",
    "SAT_TOLERANCE_DN",
    "SITE_HEIGHT_RANGE_M",
    "CalibLibrary",
    "Instrument",
    "Night",
    "RawCube",
    "Scan",
    "ScanBand",
    "ScanInfo",
    "Site",
    "open_night",
]

#: Largest accepted difference, in seconds, between a scan's manifest ``start_mjd`` and the
#: first ``MJD`` of its ``FRAMES`` tables, and between the ``MJD`` columns of the band
#: files of one scan (the bands are exposed simultaneously). Both should agree exactly;
#: 1 s allows for clock rounding in foreign writers while being under a frame time (~1.3 s).
MJD_TOLERANCE_S = 1.0
#: Largest accepted difference of ``RA_CMD``/``DEC_CMD`` between the band files of one scan,
#: in degrees (the spec says they hold the same estimate; 1e-6 deg = 3.6 mas allows for
#: float32 storage).
CMD_TOLERANCE_DEG = 1e-6
#: Read 2 (``R1 + R2R1``) and R1 may exceed ``SAT`` of ``calib/satmap_<band>.fits`` by at
#: most this many DN on good pixels (R1 and R2R1 are rounded to integers separately and
#: SAT need not be an integer, so read 2 can exceed SAT by up to 1 DN from rounding alone).
SAT_TOLERANCE_DN = 3.0
#: The median of a flat over good pixels must lie within 1 ± this value (the spec says
#: median 1; removing flagged pixels shifts the median slightly).
FLAT_MEDIAN_TOLERANCE = 0.05
#: Smallest accepted ``AIRMASS`` (1 minus float32 rounding).
AIRMASS_MIN = 1.0 - 1e-6
#: Accepted ``site.height_m`` range, metres.
SITE_HEIGHT_RANGE_M = (-1000.0, 10000.0)

_FITS_BLOCK = 2880
#: Pixels per chunk when the pixel data are checked (frames per chunk: this / (ny*nx)).
_CHUNK_PIXELS = 1 << 21
_MJD_EPOCH = _dt.date(1858, 11, 17)
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BITPIX_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Site:
    """Observatory site (manifest ``site``): longitude east positive (deg), latitude (deg),
    height above sea level (m)."""

    lon_deg: float
    lat_deg: float
    height_m: float


@dataclass(frozen=True)
class Instrument:
    """Nominal instrument description (manifest ``instrument``, spec section 2.1).

    ``bands`` is in the canonical order J, H, K (whatever the manifest order), ``nx``/``ny``
    in pixels, ``pixel_scale_arcsec`` in arcsec/pixel, exposure times in seconds,
    ``frame_step_arcsec`` in arcsec, ``gain_e_per_dn`` (e⁻/DN) and ``read_noise_e`` (e⁻)
    map band → value.
    """

    bands: tuple[str, ...]
    nx: int
    ny: int
    pixel_scale_arcsec: float
    r1_exptime_s: float
    r2r1_exptime_s: float
    frame_step_arcsec: float
    gain_e_per_dn: Mapping[str, float]
    read_noise_e: Mapping[str, float]


@dataclass(frozen=True)
class ScanInfo:
    """One scan of the manifest (spec section 2.2), validated.

    ``tile`` and ``direction`` are ``None`` for dark scans, ``field`` is ``None`` except for
    ``cal`` scans. ``start_mjd`` is the manifest value (UTC MJD, days); ``end_mjd`` is the
    latest last-frame ``MJD`` over the band files' ``FRAMES`` tables. ``files`` maps band →
    absolute path of the band file (the night directory joined with the manifest path).
    """

    number: int
    type: str
    tile: int | None
    field: str | None
    direction: str | None
    nframes: int
    start_mjd: float
    end_mjd: float
    files: Mapping[str, Path]


@dataclass(frozen=True, eq=False)
class CalibLibrary:
    """The calibration library directory (spec section 4).

    Images are read on first use and cached (the validation of :func:`open_night` reads
    them, so they are usually cached already): :meth:`image` returns read-only arrays of
    shape ``(ny, nx)``, float32 for ``flat`` (relative responsivity) and ``satmap`` (DN of
    read 2), uint8 for ``badpix`` (bits of :data:`gpu2mass.io.rawformat.BADPIX_BITS`).
    """

    root: Path
    bands: tuple[str, ...]
    shape: tuple[int, int]
    standards_path: Path | None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def path(self, kind: str, band: str) -> Path:
        """Path of ``<kind>_<band>.fits``; ``kind`` is ``flat``, ``satmap`` or ``badpix``."""
        if kind not in rf.CALIB_KINDS:
            raise ConfigError(f"calibration kind {kind!r} is not one of {rf.CALIB_KINDS}")
        if band not in self.bands:
            raise ConfigError(f"band {band!r} is not one of the night's bands {self.bands}")
        return self.root / rf.calib_file(kind, band)

    def image(self, kind: str, band: str) -> np.ndarray:
        """The calibration image ``(ny, nx)`` of ``kind`` and ``band`` (cached, read-only)."""
        path = self.path(kind, band)
        with self._lock:
            cached = self._cache.get((kind, band))
        if cached is not None:
            return cached
        image = _read_calib_image(path, kind, self.shape)
        image.setflags(write=False)
        with self._lock:
            return self._cache.setdefault((kind, band), image)


class RawCube:
    """A read-only DN cube ``(nframes, ny, nx)`` over a memory map of one FITS image HDU.

    The file's data are memory-mapped as stored (big-endian, unscaled) in :attr:`raw`, a
    read-only :class:`numpy.memmap`; this works for every uncompressed image, scaled or
    not. Indexing (``cube[f0:f1]``, ``cube[f]``), :meth:`read` and ``numpy.asarray(cube)``
    return ordinary native-endian arrays (copies) in DN, with ``BZERO``/``BSCALE`` applied:

    * unscaled data keep their type (uint8, int16, int32, int64, float32, float64);
    * the standard unsigned/signed offsets (BITPIX 16/32/64 with BZERO = 2^15/2^31/2^63,
      BITPIX 8 with BZERO = −128, BSCALE = 1) decode exactly to uint16/uint32/uint64/int8
      by flipping the sign bit — this is how uint16 R1 cubes are usually stored;
    * any other scaling decodes to float32 (BITPIX 8, 16, −32) or float64 (32, 64, −64).

    Reading a slice costs only that slice, so a scan can be walked a few frames at a time.
    """

    def __init__(self, path: Path, extname: str, raw: np.ndarray, bzero: float, bscale: float):
        self.path = Path(path)
        self.extname = extname
        self.raw = raw
        self.bzero = bzero
        self.bscale = bscale
        stored = raw.dtype
        native = stored.newbyteorder("=")
        bits = stored.itemsize * 8
        if bscale == 1 and bzero == 0:
            self._mode, self.dtype = "plain", native
        elif stored.kind == "u" and bits == 8 and bscale == 1 and bzero == -128:
            self._mode, self.dtype = "flip", np.dtype(np.int8)
        elif stored.kind == "i" and bscale == 1 and bzero == 2 ** (bits - 1):
            self._mode, self.dtype = "flip", np.dtype(f"u{stored.itemsize}")
        else:
            big = bits > 16 and not (stored.kind == "f" and bits == 32)
            self._mode, self.dtype = "scale", np.dtype(np.float64 if big else np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def size(self) -> int:
        return self.raw.size

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded cube (what ``numpy.asarray(cube)`` allocates)."""
        return self.raw.size * self.dtype.itemsize

    @property
    def scaled(self) -> bool:
        """Whether the file stores the cube with a BZERO/BSCALE other than 0/1."""
        return self._mode != "plain"

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return self._decode(np.asarray(self.raw[key]))

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start:stop`` as a ``(n, ny, nx)`` array in DN."""
        return self[start:stop]

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a RawCube is decoded on access; it cannot be viewed without a copy")
        out = self._decode(np.asarray(self.raw))
        return out if dtype is None else out.astype(dtype, copy=False)

    def _decode(self, a: np.ndarray) -> np.ndarray:
        if self._mode == "plain":
            return a.astype(self.dtype)
        if self._mode == "flip":
            if self.dtype == np.int8:
                return (a ^ np.uint8(0x80)).view(np.int8)
            signed = a.astype(a.dtype.newbyteorder("="))
            return signed.view(self.dtype) ^ self.dtype.type(1 << (8 * self.dtype.itemsize - 1))
        out = a.astype(self.dtype)
        if self.bscale != 1:
            out *= self.dtype.type(self.bscale)
        if self.bzero != 0:
            out += self.dtype.type(self.bzero)
        return out

    def __repr__(self) -> str:
        return (f"RawCube({self.path.name}[{self.extname}], shape={self.shape}, "
                f"dtype={self.dtype}, stored={self.raw.dtype}, bzero={self.bzero}, "
                f"bscale={self.bscale})")


@dataclass(frozen=True, eq=False)
class ScanBand:
    """One band file of a loaded scan.

    ``r1`` and ``r2r1`` are :class:`RawCube` objects ``(nframes, ny, nx)`` in DN;
    ``frames`` maps each ``FRAMES`` column to a 1-d array of length ``nframes``: ``FRAME``
    int64, ``MJD`` (UTC MJD, days), ``RA_CMD``/``DEC_CMD`` (deg), ``AIRMASS`` float64.
    ``header`` is a copy of the primary header.
    """

    band: str
    path: Path
    header: fits.Header
    r1: RawCube
    r2r1: RawCube
    frames: Mapping[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class Scan:
    """A loaded scan: its :class:`ScanInfo` and one :class:`ScanBand` per band."""

    info: ScanInfo
    bands: Mapping[str, ScanBand]

    @property
    def number(self) -> int:
        return self.info.number

    @property
    def type(self) -> str:
        return self.info.type

    def __getitem__(self, band: str) -> ScanBand:
        return self.bands[band]


@dataclass(frozen=True, eq=False)
class Night:
    """A validated raw night. Holds no pixel data; scans load lazily.

    ``root`` is the night directory (absolute), ``manifest_sha256`` the SHA-256 hex digest
    of the ``night.json`` bytes (provenance), ``night`` the UT date at sunset, ``scans`` in
    manifest (time) order, ``standards`` the calibration-field standards (an astropy
    :class:`~astropy.table.Table` with the spec's columns, masked where null; ``None`` when
    the library has no ``standards.parquet``), ``reference_catalog`` the validated path or
    ``None`` for the pipeline's default catalog.
    """

    root: Path
    manifest_path: Path
    manifest_sha256: str
    format_version: int
    night: _dt.date
    observatory: str
    site: Site
    instrument: Instrument
    calib: CalibLibrary
    scans: tuple[ScanInfo, ...]
    standards: Table | None
    reference_catalog: Path | None

    @property
    def night_mjd(self) -> float:
        """UTC MJD of 00:00 UT of :attr:`night`."""
        return float((self.night - _MJD_EPOCH).days)

    def scan(self, number: int) -> ScanInfo:
        """The :class:`ScanInfo` of scan ``number`` (``KeyError`` if the night has none)."""
        for info in self.scans:
            if info.number == number:
                return info
        raise KeyError(f"night {self.root} has no scan {number}")

    def load_scan(self, number: int) -> Scan:
        """Open scan ``number``: memory-mapped cubes and ``FRAMES`` of every band.

        The band files' headers and ``FRAMES`` tables are checked again (cheap); the cube
        data are not read until used.
        """
        info = self.scan(number)
        bands = {}
        for band, path in info.files.items():
            layout = _read_band_file(path, info, band, self.instrument, self.observatory)
            cubes = {name: _memmap_cube(path, name, layout.cubes[name])
                     for name in rf.CUBE_EXTNAMES}
            bands[band] = ScanBand(band=band, path=path, header=layout.header,
                                   r1=cubes["R1"], r2r1=cubes["R2R1"],
                                   frames=MappingProxyType(layout.frames))
        return Scan(info=info, bands=MappingProxyType(bands))

    def iter_scans(self, types: tuple[str, ...] = ("sci", "cal")) -> Iterator[Scan]:
        """Yield the scans of the given types in manifest order, loading each when reached."""
        types = (types,) if isinstance(types, str) else tuple(types)
        unknown = [t for t in types if t not in rf.SCAN_TYPES]
        if unknown:
            raise ConfigError(f"unknown scan type(s) {unknown}; known: {rf.SCAN_TYPES}")
        return (self.load_scan(info.number) for info in self.scans if info.type in types)

    def calib_image(self, kind: str, band: str) -> np.ndarray:
        """Shortcut for :meth:`CalibLibrary.image`."""
        return self.calib.image(kind, band)


# --------------------------------------------------------------------------- entry point


def open_night(path: str | os.PathLike, *, check_data: bool = True) -> Night:
    """Validate a raw night against ``shared/spec/raw-night.md`` and return it.

    Parameters
    ----------
    path
        The night directory, or its ``night.json``.
    check_data
        Also read the pixel data of every scan (a few frames at a time) to check that float
        cubes are finite and that R1 and read 2 never exceed the saturation map by more
        than :data:`SAT_TOLERANCE_DN` on good pixels. Costs one pass over the data.

    Raises
    ------
    InputError
        At the first violation of the spec, naming the file and the rule.
    """
    given = Path(path).absolute()
    if given.is_dir():
        root, manifest_path = given, given / rf.MANIFEST_NAME
    elif given.is_file():
        root, manifest_path = given.parent, given
    else:
        raise InputError(given, "does not exist; expected a night directory or its night.json")
    if not manifest_path.is_file():
        raise InputError(manifest_path, "does not exist; every night directory has a manifest "
                                        "night.json (spec section 1)")

    obj, sha = _load_manifest(manifest_path)
    m = _Manifest(manifest_path, root)
    m.check(obj)
    assert m.instrument is not None and m.site is not None

    scans: list[ScanInfo] = []
    all_layouts: list[dict[str, _BandLayout]] = []
    for i, pre in enumerate(m.scans):
        layouts = {band: _read_band_file(p, pre, band, m.instrument, m.observatory)
                   for band, p in pre.files.items()}
        info = _check_across_bands(pre, layouts)
        scans.append(info)
        all_layouts.append(layouts)
        if i + 1 < len(m.scans):
            nxt = m.scans[i + 1]
            if nxt.start_mjd <= info.end_mjd:
                last = max(layouts, key=lambda b: layouts[b].frames["MJD"][-1])
                raise InputError(manifest_path, (
                    f"scans[{i + 1}] (scan {nxt.number}) starts at MJD {nxt.start_mjd!r}, "
                    f"before scans[{i}] (scan {info.number}) ends at MJD {info.end_mjd!r} "
                    f"(its last frame in {info.files[last]}); the spec requires that no two "
                    "scans overlap in time"))

    calib = _check_calib(m)
    standards = _check_standards(calib, scans, manifest_path)
    refcat = _check_refcat(m.reference_catalog)

    if check_data:
        for info, layouts in zip(scans, all_layouts, strict=True):
            for band, file in info.files.items():
                _check_pixels(file, info, band, layouts[band], m.instrument, calib)

    return Night(root=root, manifest_path=manifest_path, manifest_sha256=sha,
                 format_version=rf.FORMAT_VERSION, night=m.night, observatory=m.observatory,
                 site=m.site, instrument=m.instrument, calib=calib, scans=tuple(scans),
                 standards=standards, reference_catalog=refcat)


# --------------------------------------------------------------------------- manifest


class _JsonRule(ValueError):
    """A JSON construct the manifest may not use (duplicate keys, NaN/Infinity)."""


def _object_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _JsonRule(f"key {key!r} appears twice in one JSON object; keys must be unique")
        out[key] = value
    return out


def _no_constants(name):
    raise _JsonRule(f"{name} is not a JSON number; the manifest must be standard JSON")


def _load_manifest(path: Path) -> tuple[object, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror})") from exc
    sha = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"is not valid UTF-8 (bad byte at offset {exc.start}); "
                               "the manifest must be UTF-8 JSON") from exc
    try:
        obj = json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column "
                               f"{exc.colno}") from exc
    except _JsonRule as exc:
        raise InputError(path, f"is not valid for the manifest: {exc}") from exc
    return obj, sha


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wanted(types: tuple[type, ...]) -> str:
    if float in types:
        word = "a finite number"
    elif int in types:
        word = "an integer"
    elif str in types:
        word = "a string"
    elif list in types:
        word = "an array"
    else:
        word = "an object"
    return word + (" or null" if type(None) in types else "")


def _has_type(value, types: tuple[type, ...]) -> bool:
    if value is None:
        return type(None) in types
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types
    if isinstance(value, float):
        return float in types and math.isfinite(value)
    return any(t in (str, list, dict) and isinstance(value, t) for t in types)


def _is_number(value) -> bool:
    return _has_type(value, (int, float))


class _Manifest:
    """Validates the manifest object; fills typed fields. Raises at the first violation."""

    def __init__(self, path: Path, root: Path):
        self.path, self.root = path, root
        self.night: _dt.date | None = None
        self.observatory = ""
        self.site: Site | None = None
        self.instrument: Instrument | None = None
        self.calib = ""
        self.reference_catalog: Path | None = None
        self.scans: list[ScanInfo] = []

    def fail(self, rule: str):
        raise InputError(self.path, rule)

    def keys(self, obj: dict, where: str, required: dict, optional: dict | None = None,
             forbidden: tuple[str, ...] = (), forbidden_why: str = ""):
        """Required keys present with their types; optional keys typed; no other keys."""
        optional = optional or {}
        for key, types in required.items():
            if key not in obj:
                self.fail(f"{where}: required key {key!r} is missing")
            if not _has_type(obj[key], types):
                self.fail(f"{where}: {key!r} must be {_wanted(types)}, found "
                          f"{_json_type(obj[key])}")
        for key, types in optional.items():
            if key in obj and not _has_type(obj[key], types):
                self.fail(f"{where}: {key!r} must be {_wanted(types)}, found "
                          f"{_json_type(obj[key])}")
        for key in forbidden:
            if key in obj:
                self.fail(f"{where}: has key {key!r}; {forbidden_why}")
        unknown = [k for k in obj if k not in required and k not in optional]
        if unknown:
            self.fail(f"{where}: unknown key {unknown[0]!r}; format version {rf.FORMAT_VERSION} "
                      f"defines only {sorted(list(required) + list(optional))}")

    def check(self, obj) -> None:
        if not isinstance(obj, dict):
            self.fail(f"the manifest must be a JSON object, found {_json_type(obj)}")
        self.keys(obj, "manifest", rf.MANIFEST_KEYS, rf.MANIFEST_OPTIONAL_KEYS)
        if obj["format"] != rf.FORMAT:
            self.fail(f"format is {obj['format']!r}; the spec requires exactly {rf.FORMAT!r}")
        if obj["format_version"] != rf.FORMAT_VERSION:
            self.fail(f"format_version {obj['format_version']} is not supported; this reader "
                      f"implements format_version {rf.FORMAT_VERSION}")
        self.night = self._date(obj["night"])
        if obj["observatory"] not in rf.OBSERVATORIES:
            self.fail(f"observatory is {obj['observatory']!r}; the spec requires one of "
                      f"{list(rf.OBSERVATORIES)}")
        self.observatory = obj["observatory"]
        self.site = self._site(obj["site"])
        self.instrument = self._instrument(obj["instrument"])
        self.calib = obj["calib"]
        if not self.calib:
            self.fail("calib is an empty string; it must name the calibration library directory")
        ref = obj.get("reference_catalog")
        if ref is not None:
            if not ref:
                self.fail("reference_catalog is an empty string; give a path or null")
            self.reference_catalog = self._outside_ok(ref)
        self._scans(obj["scans"])

    def _date(self, text: str) -> _dt.date:
        try:
            if not _DATE_RE.match(text):
                raise ValueError
            return _dt.date.fromisoformat(text)
        except ValueError:
            self.fail(f"night is {text!r}; the spec requires a real UT date written YYYY-MM-DD")

    def _site(self, site: dict) -> Site:
        self.keys(site, "site", {k: (int, float) for k in rf.SITE_KEYS})
        lon, lat, height = (float(site[k]) for k in rf.SITE_KEYS)
        if not -180.0 <= lon <= 360.0:
            self.fail(f"site: lon_deg {lon} is outside [-180, 360] degrees")
        if not -90.0 <= lat <= 90.0:
            self.fail(f"site: lat_deg {lat} is outside [-90, 90] degrees")
        lo, hi = SITE_HEIGHT_RANGE_M
        if not lo <= height <= hi:
            self.fail(f"site: height_m {height} is outside [{lo:g}, {hi:g}] m")
        return Site(lon, lat, height)

    def _instrument(self, ins: dict) -> Instrument:
        self.keys(ins, "instrument", rf.INSTRUMENT_KEYS)
        bands = ins["bands"]
        if not bands:
            self.fail("instrument: bands is empty; the spec requires a non-empty subset of "
                      f"{list(rf.BANDS)}")
        for b in bands:
            if not isinstance(b, str) or b not in rf.BANDS:
                self.fail(f"instrument: bands contains {json.dumps(b)}; the spec requires a "
                          f"subset of {list(rf.BANDS)}")
        if len(set(bands)) != len(bands):
            self.fail(f"instrument: bands {bands} lists a band twice")
        ordered = tuple(b for b in rf.BANDS if b in bands)
        for key in ("nx", "ny"):
            if ins[key] < 1:
                self.fail(f"instrument: {key} is {ins[key]}; array sizes must be >= 1")
        for key in ("pixel_scale_arcsec", "r1_exptime_s", "r2r1_exptime_s", "frame_step_arcsec"):
            if not ins[key] > 0:
                self.fail(f"instrument: {key} is {ins[key]}; it must be positive")
        per_band = {}
        for key in ("gain_e_per_dn", "read_noise_e"):
            obj = ins[key]
            for b in ordered:
                if b not in obj:
                    self.fail(f"instrument: {key} has no value for band {b!r}; it must have "
                              f"exactly the bands {list(ordered)}")
            for b, v in obj.items():
                if b not in ordered:
                    self.fail(f"instrument: {key} has key {b!r}, which is not one of the "
                              f"bands {list(ordered)}")
                if not _is_number(v) or not v > 0:
                    self.fail(f"instrument: {key}[{b!r}] must be a positive number, found "
                              f"{_json_type(v)}")
            per_band[key] = MappingProxyType({b: float(obj[b]) for b in ordered})
        return Instrument(
            bands=ordered, nx=ins["nx"], ny=ins["ny"],
            pixel_scale_arcsec=float(ins["pixel_scale_arcsec"]),
            r1_exptime_s=float(ins["r1_exptime_s"]), r2r1_exptime_s=float(ins["r2r1_exptime_s"]),
            frame_step_arcsec=float(ins["frame_step_arcsec"]),
            gain_e_per_dn=per_band["gain_e_per_dn"], read_noise_e=per_band["read_noise_e"])

    def _outside_ok(self, text: str) -> Path:
        """A manifest path that may leave the night directory (calib, reference_catalog)."""
        p = Path(text)
        return p if p.is_absolute() else self.root / p

    def _inside(self, where: str, text: str) -> Path:
        """A scan file path: relative, and inside the night directory after resolution."""
        if not text:
            self.fail(f"{where}: the path is an empty string")
        if Path(text).is_absolute() or text.startswith(("/", "\\")):
            self.fail(f"{where}: {text!r} is an absolute path; scan file paths must be "
                      "relative to the night directory")
        joined = self.root / text
        if not joined.resolve().is_relative_to(self.root.resolve()):
            self.fail(f"{where}: {text!r} escapes the night directory (resolves to "
                      f"{joined.resolve()}); scan files must lie inside it")
        return joined

    def _scans(self, scans: list) -> None:
        if not scans:
            self.fail("scans is empty; a night has at least one scan")
        assert self.instrument is not None and self.night is not None
        bands = self.instrument.bands
        night_mjd = float((self.night - _MJD_EPOCH).days)
        seen: dict[int, int] = {}
        field_tiles: dict[str, tuple[int, int]] = {}
        prev: ScanInfo | None = None
        for i, s in enumerate(scans):
            where = f"scans[{i}]"
            if not isinstance(s, dict):
                self.fail(f"{where} must be an object, found {_json_type(s)}")
            if _has_type(s.get("scan"), (int,)):
                where = f"scans[{i}] (scan {s['scan']})"
            if not _has_type(s.get("type"), (str,)):
                self.keys(s, where, {"type": (str,)})
            kind = s["type"]
            if kind not in rf.SCAN_TYPES:
                self.fail(f"{where}: type {kind!r} is not one of {list(rf.SCAN_TYPES)}")
            if kind == "dark":
                self.keys(s, where, rf.SCAN_KEYS,
                          forbidden=tuple(rf.SKY_SCAN_KEYS) + tuple(rf.CAL_SCAN_KEYS),
                          forbidden_why="dark scans have no tile, field or direction")
            elif kind == "cal":
                self.keys(s, where, {**rf.SCAN_KEYS, **rf.SKY_SCAN_KEYS, **rf.CAL_SCAN_KEYS})
            else:
                self.keys(s, where, {**rf.SCAN_KEYS, **rf.SKY_SCAN_KEYS},
                          forbidden=tuple(rf.CAL_SCAN_KEYS),
                          forbidden_why="only cal scans have a field")
            number = s["scan"]
            if number < 1:
                self.fail(f"{where}: scan number {number} must be >= 1")
            if number in seen:
                self.fail(f"{where}: scan number {number} is not unique (scans[{seen[number]}] "
                          "has it too); scan numbers must be unique in the night")
            seen[number] = i
            direction = s.get("direction")
            if direction is not None and direction not in rf.DIRECTIONS:
                self.fail(f"{where}: direction {direction!r} is not one of {list(rf.DIRECTIONS)}")
            fld = s.get("field")
            if kind == "cal":
                if not fld:
                    self.fail(f"{where}: cal scan field is an empty string")
                tile0 = field_tiles.setdefault(fld, (s["tile"], number))
                if tile0[0] != s["tile"]:
                    self.fail(f"{where}: cal field {fld!r} has tile {s['tile']} but scan "
                              f"{tile0[1]} has tile {tile0[0]}; repeated calibration scans "
                              "share one tile")
            if s["nframes"] < 1:
                self.fail(f"{where}: nframes is {s['nframes']}; a scan has at least one frame")
            start = float(s["start_mjd"])
            if prev is not None and not start > prev.start_mjd:
                self.fail(f"{where}: start_mjd {start!r} is not after the previous scan's "
                          f"{prev.start_mjd!r} (scan {prev.number}); the spec requires strictly "
                          "increasing start_mjd")
            if not night_mjd <= start <= night_mjd + rf.NIGHT_WINDOW_DAYS:
                self.fail(f"{where}: start_mjd {start!r} is not within {rf.NIGHT_WINDOW_DAYS} "
                          f"days after 00:00 UT of night {self.night.isoformat()} "
                          f"(MJD {night_mjd:g}); every scan starts within "
                          f"{rf.NIGHT_WINDOW_DAYS} days after it")
            files = s["files"]
            for b in bands:
                if b not in files:
                    self.fail(f"{where}: files has no band {b!r}; it must have exactly the "
                              f"instrument bands {list(bands)}")
            for b in files:
                if b not in bands:
                    self.fail(f"{where}: files has band {b!r}, which is not one of the "
                              f"instrument bands {list(bands)}")
            paths = {}
            for b in bands:
                value = files[b]
                if not isinstance(value, str):
                    self.fail(f"{where}: files[{b!r}] must be a string, found {_json_type(value)}")
                paths[b] = self._inside(f"{where}: files[{b!r}]", value)
            for b in bands:
                p = paths[b]
                if not p.exists():
                    raise InputError(p, f"does not exist ({where}, band {b} in {self.path.name})")
                if not p.is_file():
                    raise InputError(p, f"is not a regular file ({where}, band {b})")
                if not os.access(p, os.R_OK):
                    raise InputError(p, f"is not readable ({where}, band {b})")
            info = ScanInfo(number=number, type=kind, tile=s.get("tile"), field=fld,
                            direction=direction, nframes=s["nframes"], start_mjd=start,
                            end_mjd=start, files=MappingProxyType(paths))
            self.scans.append(info)
            prev = info


# --------------------------------------------------------------------------- FITS helpers


def _with_fits(path: Path, fn: Callable, *, scale: bool):
    """Open ``path`` read-only, check it is whole, run ``fn(hdul)``, close.

    Truncated or corrupt files raise :class:`InputError` (astropy only warns on
    truncation, so the file size is checked against every HDU's extent). Other astropy
    warnings are re-issued naming the file once the file has passed.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror})") from exc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=False,
                             do_not_scale_image_data=not scale)
        except Exception as exc:  # astropy raises many types on corrupt input
            raise InputError(path, f"is not a readable FITS file ({type(exc).__name__}: "
                                   f"{exc})") from exc
        try:
            if size % _FITS_BLOCK:
                raise InputError(path, f"is truncated or corrupt: its size {size} bytes is not "
                                       f"a multiple of the {_FITS_BLOCK}-byte FITS block")
            for i in range(len(hdul)):
                info = hdul.fileinfo(i)
                if info["datLoc"] + info["datSpan"] > size:
                    raise InputError(path, (
                        f"is truncated: HDU {i} needs bytes up to "
                        f"{info['datLoc'] + info['datSpan']} but the file has {size}"))
            result = fn(hdul)
        finally:
            hdul.close()
    for w in caught:
        warnings.warn(f"{path}: {w.message}", w.category, stacklevel=3)
    return result


def _hdu_data(path: Path, hdu, what: str):
    try:
        return hdu.data
    except Exception as exc:  # corrupt data sections raise various astropy errors
        raise InputError(path, f"{what} data cannot be read ({type(exc).__name__}: "
                               f"{exc})") from exc


@dataclass(frozen=True)
class _CubeLayout:
    offset: int
    shape: tuple[int, int, int]
    bitpix: int
    bzero: float
    bscale: float


@dataclass(frozen=True)
class _BandLayout:
    header: fits.Header
    cubes: dict[str, _CubeLayout]
    frames: dict[str, np.ndarray]


def _read_band_file(path: Path, info: ScanInfo, band: str, ins: Instrument,
                    observatory: str) -> _BandLayout:
    """Check one scan band file (headers, HDUs, cube layout, FRAMES); return its layout."""

    def check(hdul) -> _BandLayout:
        def fail(rule):
            raise InputError(path, rule)

        by_name: dict[str, int] = {}
        for i, hdu in enumerate(hdul[1:], start=1):
            name = str(hdu.header.get("EXTNAME", "")).strip().upper()
            if name in by_name and name in (*rf.CUBE_EXTNAMES, rf.FRAMES_EXTNAME):
                fail(f"has two HDUs with EXTNAME {name} (HDUs {by_name[name]} and {i})")
            by_name.setdefault(name, i)
        for name in (*rf.CUBE_EXTNAMES, rf.FRAMES_EXTNAME):
            if name not in by_name:
                fail(f"has no HDU with EXTNAME {name}; the spec requires HDUs R1, R2R1 and "
                     "FRAMES")

        primary = hdul[0]
        h = primary.header
        if h.get("NAXIS", 0) != 0:
            fail("the primary HDU holds data; the spec requires a header-only primary HDU")
        for key in rf.PRIMARY_KEYS:
            if key not in h:
                fail(f"primary header has no keyword {key}; the spec requires "
                     f"{', '.join(rf.PRIMARY_KEYS)}")
        want = {"SCANNO": info.number, "BAND": band, "TYPE": info.type,
                "SCANDIR": info.direction or "", "NFRAMES": info.nframes,
                "OBSERVAT": observatory}
        for key, expected in want.items():
            value = h[key]
            if isinstance(expected, int):
                ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
                    and value == expected
            else:
                ok = isinstance(value, str) and value.strip() == expected
            if not ok:
                fail(f"primary header {key} = {value!r} does not match the manifest "
                     f"({expected!r} for scan {info.number}, band {band})")

        want_shape = (info.nframes, ins.ny, ins.nx)
        cubes = {}
        for name in rf.CUBE_EXTNAMES:
            i = by_name[name]
            hdu = hdul[i]
            if type(hdu) is not fits.ImageHDU:
                fail(f"HDU {name} is a {type(hdu).__name__}; the spec requires an uncompressed "
                     "image extension")
            hh = hdu.header
            bitpix = hh["BITPIX"]
            if bitpix not in _BITPIX_DTYPES:
                fail(f"HDU {name} has BITPIX {bitpix}")
            naxis = hh.get("NAXIS", 0)
            shape = tuple(hh.get(f"NAXIS{k}", 0) for k in range(naxis, 0, -1))
            if naxis != 3:
                fail(f"HDU {name} is {naxis}-d with shape {shape}; the spec requires a 3-d "
                     f"cube (nframes, ny, nx) = {want_shape}")
            if shape != want_shape:
                fail(f"HDU {name} has shape {shape} (nframes, ny, nx); the manifest and "
                     f"instrument require {want_shape}")
            bzero, bscale = hh.get("BZERO", 0), hh.get("BSCALE", 1)
            for key, v in (("BZERO", bzero), ("BSCALE", bscale)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) \
                        or not math.isfinite(v):
                    fail(f"HDU {name} has {key} = {v!r}; it must be a finite number")
            if bscale == 0:
                fail(f"HDU {name} has BSCALE = 0")
            cubes[name] = _CubeLayout(offset=hdul.fileinfo(i)["datLoc"], shape=shape,
                                      bitpix=bitpix, bzero=bzero, bscale=bscale)

        hdu = hdul[by_name[rf.FRAMES_EXTNAME]]
        if type(hdu) is not fits.BinTableHDU:
            fail(f"HDU FRAMES is a {type(hdu).__name__}; the spec requires a binary table")
        data = _hdu_data(path, hdu, "FRAMES")
        names = {n.upper(): n for n in hdu.columns.names}
        frames = {}
        for col in rf.FRAMES_COLUMNS:
            if col not in names:
                fail(f"FRAMES has no column {col}; the spec requires columns "
                     f"{', '.join(rf.FRAMES_COLUMNS)}")
            arr = np.asarray(data[names[col]])
            if arr.ndim != 1 or arr.dtype.kind not in "iuf":
                fail(f"FRAMES column {col} must be a numeric scalar column, found "
                     f"{hdu.columns[names[col]].format}")
            frames[col] = arr
        nrows = len(frames["FRAME"])
        if nrows != info.nframes:
            fail(f"FRAMES has {nrows} rows; the manifest says nframes = {info.nframes}")
        frame = frames["FRAME"]
        if not np.array_equal(frame, np.arange(nrows)):
            bad = int(np.flatnonzero(frame != np.arange(nrows))[0])
            fail(f"FRAMES column FRAME must be 0 … {nrows - 1} in order; row {bad} holds "
                 f"{frame[bad].item()!r}")
        out = {"FRAME": np.arange(nrows, dtype=np.int64)}
        for col in rf.FRAMES_COLUMNS[1:]:
            out[col] = frames[col].astype(np.float64)
        mjd = out["MJD"]
        if not np.all(np.isfinite(mjd)):
            fail(f"FRAMES column MJD has a non-finite value at row "
                 f"{int(np.flatnonzero(~np.isfinite(mjd))[0])}")
        steps = np.diff(mjd)
        if np.any(steps <= 0):
            bad = int(np.flatnonzero(steps <= 0)[0]) + 1
            fail(f"FRAMES column MJD is not strictly increasing: row {bad} has {mjd[bad].item()!r} "
                 f"after {mjd[bad - 1].item()!r}")
        if abs(mjd[0] - info.start_mjd) * 86400.0 > MJD_TOLERANCE_S:
            fail(f"FRAMES MJD of frame 0 is {mjd[0].item()!r} but the manifest start_mjd is "
                 f"{info.start_mjd!r} ({(mjd[0] - info.start_mjd) * 86400:.3g} s apart; at "
                 f"most {MJD_TOLERANCE_S:g} s allowed)")
        ra, dec, am = out["RA_CMD"], out["DEC_CMD"], out["AIRMASS"]
        for col, arr, ok, rule in (
            ("RA_CMD", ra, (ra >= 0) & (ra < 360), "in [0, 360) deg"),
            ("DEC_CMD", dec, (dec >= -90) & (dec <= 90), "in [-90, 90] deg"),
            ("AIRMASS", am, np.isfinite(am) & (am >= AIRMASS_MIN), "finite and >= 1"),
        ):
            if not np.all(ok):
                bad = int(np.flatnonzero(~ok)[0])
                fail(f"FRAMES column {col} must be {rule}; row {bad} holds {arr[bad].item()!r}")
        for arr in out.values():
            arr.setflags(write=False)
        return _BandLayout(header=h.copy(), cubes=cubes, frames=out)

    return _with_fits(path, check, scale=False)


def _check_across_bands(info: ScanInfo, layouts: dict[str, _BandLayout]) -> ScanInfo:
    """Band files of one scan agree in MJD and RA/DEC_CMD; DEC_CMD follows the direction."""
    bands = list(layouts)
    first = layouts[bands[0]].frames
    for band in bands[1:]:
        fr = layouts[band].frames
        path = info.files[band]
        dt = np.abs(fr["MJD"] - first["MJD"]) * 86400.0
        if np.any(dt > MJD_TOLERANCE_S):
            row = int(np.argmax(dt))
            raise InputError(path, (
                f"FRAMES MJD of frame {row} differs from band {bands[0]}'s by {dt[row]:.3g} s; "
                f"the bands are exposed together (at most {MJD_TOLERANCE_S:g} s allowed)"))
        for col in ("RA_CMD", "DEC_CMD"):
            diff = np.abs(fr[col] - first[col])
            if col == "RA_CMD":
                diff = np.minimum(diff, 360.0 - diff)
            if np.any(diff > CMD_TOLERANCE_DEG):
                row = int(np.argmax(diff))
                raise InputError(path, (
                    f"FRAMES {col} of frame {row} is {fr[col][row].item()!r} but band "
                    f"{bands[0]} has {first[col][row].item()!r}; the spec requires the same "
                    "estimate in all band files"))
    if info.type in ("sci", "cal") and info.nframes >= 2:
        dec = first["DEC_CMD"]
        moved = dec[-1] - dec[0]
        if (info.direction == "n" and moved <= 0) or (info.direction == "s" and moved >= 0):
            raise InputError(info.files[bands[0]], (
                f"scan direction is {info.direction!r} but DEC_CMD goes from {dec[0].item()!r} to "
                f"{dec[-1].item()!r}; 'n' means Dec increases with frame index, 's' decreases"))
    end = max(float(layouts[b].frames["MJD"][-1]) for b in bands)
    return ScanInfo(number=info.number, type=info.type, tile=info.tile, field=info.field,
                    direction=info.direction, nframes=info.nframes, start_mjd=info.start_mjd,
                    end_mjd=end, files=info.files)


def _memmap_cube(path: Path, name: str, layout: _CubeLayout) -> RawCube:
    raw = np.memmap(path, dtype=np.dtype(_BITPIX_DTYPES[layout.bitpix]), mode="r",
                    offset=layout.offset, shape=layout.shape)
    return RawCube(path, name, raw, layout.bzero, layout.bscale)


# --------------------------------------------------------------------------- calibration


def _read_calib_image(path: Path, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """Read and check the first image HDU of a calibration file; float32 or uint8."""
    if not path.is_file():
        raise InputError(path, f"does not exist; the calibration library needs "
                               f"{path.name} for every band (spec section 4)")

    def first_image(hdul):
        for i, hdu in enumerate(hdul):
            if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)) and hdu.header.get("NAXIS", 0):
                data = _hdu_data(path, hdu, f"HDU {i}")
                return np.array(data)  # a copy in memory; the file is closed after this
        raise InputError(path, "has no image HDU; the image must be in the first image HDU")

    data = _with_fits(path, first_image, scale=True)
    if data.shape != shape:
        raise InputError(path, f"image has shape {data.shape}; the instrument requires "
                               f"(ny, nx) = {shape}")
    if kind == "badpix":
        if data.dtype.kind not in "iu":
            raise InputError(path, f"bad-pixel mask has type {data.dtype}; the spec requires an "
                                   "integer (uint8) image")
        bad = (data < 0) | ((data & ~np.int64(15)) != 0) if data.dtype.kind == "i" \
            else (data & ~data.dtype.type(15)) != 0
        if np.any(bad):
            y, x = np.argwhere(bad)[0]
            raise InputError(path, f"pixel (x={x}, y={y}) has value {data[y, x]}; only bits "
                                   "1 (dead), 2 (hot), 4 (noisy) and 8 (low responsivity) are "
                                   "defined")
        return data.astype(np.uint8)
    if data.dtype.kind not in "iuf":
        raise InputError(path, f"image has type {data.dtype}; a numeric image is required")
    return data.astype(np.float32)


def _check_calib(m: _Manifest) -> CalibLibrary:
    assert m.instrument is not None
    ins = m.instrument
    cdir = m._outside_ok(m.calib)
    if not cdir.is_dir():
        raise InputError(cdir, f"is not a directory; the manifest's calib ({m.calib!r}) must "
                               "name the calibration library directory")
    std = cdir / rf.STANDARDS_FILE
    calib = CalibLibrary(root=cdir, bands=ins.bands, shape=(ins.ny, ins.nx),
                         standards_path=std if std.exists() else None)
    for band in ins.bands:
        for kind in rf.CALIB_KINDS:
            p = calib.path(kind, band)
            if not p.is_file():
                raise InputError(p, f"does not exist; the calibration library needs "
                                    f"{kind}_<band>.fits for every band (spec section 4)")
    for band in ins.bands:
        badpix = calib.image("badpix", band)
        satmap = calib.image("satmap", band)
        if not np.all(np.isfinite(satmap) & (satmap > 0)):
            y, x = np.argwhere(~(np.isfinite(satmap) & (satmap > 0)))[0]
            raise InputError(calib.path("satmap", band), (
                f"pixel (x={x}, y={y}) has full-well level {satmap[y, x]}; the saturation map "
                "must be finite and positive"))
        flat = calib.image("flat", band)
        good = badpix == 0
        bad = good & ~(np.isfinite(flat) & (flat > 0))
        if np.any(bad):
            y, x = np.argwhere(bad)[0]
            raise InputError(calib.path("flat", band), (
                f"good pixel (x={x}, y={y}) has flat value {flat[y, x]}; the flat must be finite "
                "and positive where the bad-pixel mask is 0"))
        if np.any(good):
            med = float(np.median(flat[good]))
            if abs(med - 1.0) > FLAT_MEDIAN_TOLERANCE:
                raise InputError(calib.path("flat", band), (
                    f"median over good pixels is {med:.4g}; the spec requires a relative "
                    f"responsivity with median 1 (within {FLAT_MEDIAN_TOLERANCE:g})"))
    return calib


def _arrow_kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_floating(t) or pa.types.is_integer(t):
        return "number"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def _read_parquet(path: Path, required: list[str], optional: list[str] = ()) -> pa.Table:
    """The required columns (all must exist) and those optional columns that exist."""
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        missing = [c for c in required if c not in names]
        if missing:
            raise InputError(path, f"has no column {missing[0]!r}; the spec requires columns "
                                   f"{', '.join(required)}")
        return pf.read(columns=list(required) + [c for c in optional if c in names])
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises several types on corrupt files
        raise InputError(path, f"is not a readable Parquet file ({type(exc).__name__}: "
                                   f"{exc})") from exc


def _check_ra_dec(path: Path, ra: np.ndarray, dec: np.ndarray) -> None:
    for name, arr, ok, rule in (
        ("ra", ra, np.isfinite(ra) & (ra >= 0) & (ra < 360), "finite and in [0, 360) deg"),
        ("dec", dec, np.isfinite(dec) & (dec >= -90) & (dec <= 90), "finite and in [-90, 90] deg"),
    ):
        if not np.all(ok):
            row = int(np.flatnonzero(~ok)[0])
            raise InputError(path, f"column {name} must be {rule}; row {row} holds "
                                   f"{arr[row].item()!r}")


def _arrow_float(col: pa.ChunkedArray) -> np.ndarray:
    """float64 values with NaN where null."""
    return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _check_standards(calib: CalibLibrary, scans: list[ScanInfo],
                     manifest_path: Path) -> Table | None:
    cal = [s for s in scans if s.type == "cal"]
    path = calib.root / rf.STANDARDS_FILE
    if calib.standards_path is None:
        if cal:
            raise InputError(path, f"does not exist; the night has cal scans (scan "
                                   f"{cal[0].number}, field {cal[0].field!r}) and the calibration "
                                   "library must provide the standards")
        return None
    cols = list(rf.STANDARDS_COLUMNS)
    table = _read_parquet(path, cols)
    out = Table()
    for name in cols:
        col = table.column(name)
        kind = _arrow_kind(col.type)
        want = "string" if name == "field" else "number"
        nullable = name not in ("field", "ra", "dec")
        if kind != want and not (nullable and kind == "null"):
            raise InputError(path, f"column {name!r} has type {col.type}; the spec requires "
                                   f"{'a string' if want == 'string' else 'a numeric'} column")
        if not nullable and col.null_count:
            raise InputError(path, f"column {name!r} has {col.null_count} null value(s); "
                                   "only magnitudes and their errors may be null")
        if name == "field":
            out[name] = Column(col.to_pylist(), dtype=str)
            continue
        values = _arrow_float(col)
        if col.null_count:
            out[name] = MaskedColumn(values, mask=_null_mask(col))
        else:
            out[name] = Column(values)
    _check_ra_dec(path, np.asarray(out["ra"]), np.asarray(out["dec"]))
    fields = set(out["field"])
    for s in cal:
        if s.field not in fields:
            raise InputError(path, f"has no star of field {s.field!r}, the field of cal scan "
                                   f"{s.number} in {manifest_path.name}; every cal scan's field "
                                   "must appear in the standards")
    return out


def _null_mask(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _check_refcat(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.is_file():
        raise InputError(path, "does not exist; the manifest's reference_catalog must name a "
                               "Parquet or FITS table (or be null for the default catalog)")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(9)
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror})") from exc
    required, optional = list(rf.REFCAT_COLUMNS), list(rf.REFCAT_OPTIONAL_COLUMNS)
    if magic[:4] == b"PAR1":
        table = _read_parquet(path, required, optional)
        for name in table.column_names:
            kind = _arrow_kind(table.column(name).type)
            nullable = name not in ("ra", "dec")
            if kind != "number" and not (nullable and kind == "null"):
                raise InputError(path, f"column {name!r} has type {table.column(name).type}; "
                                       "the spec requires a numeric column")
        ra, dec = _arrow_float(table.column("ra")), _arrow_float(table.column("dec"))
    elif magic == b"SIMPLE  =":
        def columns(hdul):
            for hdu in hdul:
                if isinstance(hdu, fits.BinTableHDU):
                    names = {n.lower(): n for n in hdu.columns.names}
                    for name in required:
                        if name not in names:
                            raise InputError(path, f"has no column {name!r}; the spec requires "
                                                   f"columns {', '.join(required)}")
                    data = _hdu_data(path, hdu, "table")
                    for name in required + [c for c in optional if c in names]:
                        arr = np.asarray(data[names[name]])
                        if arr.ndim != 1 or arr.dtype.kind not in "iuf":
                            raise InputError(path, f"column {name!r} must be a numeric scalar "
                                                   f"column, found type {arr.dtype}")
                    return (np.asarray(data[names["ra"]], dtype=np.float64),
                            np.asarray(data[names["dec"]], dtype=np.float64))
            raise InputError(path, "has no binary table HDU; a FITS reference catalog is a "
                                   "binary table")
        ra, dec = _with_fits(path, columns, scale=True)
    else:
        raise InputError(path, "is neither a Parquet file nor a FITS file; the reference "
                               "catalog must be one of them")
    _check_ra_dec(path, ra, dec)
    return path


# --------------------------------------------------------------------------- pixel data


def _check_pixels(path: Path, info: ScanInfo, band: str, layout: _BandLayout, ins: Instrument,
                  calib: CalibLibrary) -> None:
    """Finite float cubes; R1 and read 2 at most SAT + tolerance on good pixels."""
    r1 = _memmap_cube(path, "R1", layout.cubes["R1"])
    r2r1 = _memmap_cube(path, "R2R1", layout.cubes["R2R1"])
    limit = calib.image("satmap", band).astype(np.float64) + SAT_TOLERANCE_DN
    good = calib.image("badpix", band) == 0
    floats = [c for c in (r1, r2r1) if c.dtype.kind == "f"]
    step = max(1, _CHUNK_PIXELS // (ins.ny * ins.nx))
    for f0 in range(0, info.nframes, step):
        a = r1.read(f0, f0 + step).astype(np.float64)
        b = r2r1.read(f0, f0 + step).astype(np.float64)
        for cube, chunk in ((r1, a), (r2r1, b)):
            if cube in floats and not np.all(np.isfinite(chunk)):
                f, y, x = np.argwhere(~np.isfinite(chunk))[0]
                raise InputError(path, f"{cube.extname} frame {f0 + f} pixel (x={x}, y={y}) is "
                                       f"{chunk[f, y, x]}; float cubes must be finite (no NaN "
                                       "or inf)")
        read2 = a + b
        over = good & ((a > limit) | (read2 > limit))
        if np.any(over):
            f, y, x = np.argwhere(over)[0]
            which = "R1" if a[f, y, x] > limit[y, x] else "read 2 = R1 + R2R1"
            value = a[f, y, x] if which == "R1" else read2[f, y, x]
            raise InputError(path, (
                f"frame {f0 + f} pixel (x={x}, y={y}): {which} = {value:g} DN exceeds the "
                f"saturation level SAT = {limit[y, x] - SAT_TOLERANCE_DN:g} DN of "
                f"{calib.path('satmap', band).name} by more than {SAT_TOLERANCE_DN:g} DN; the "
                "spec clips saturated reads at SAT"))
