"""The raw-night reader against ``shared/spec/raw-night.md``: a tiny night written through
:mod:`gpu2mass.io.rawwrite` must be accepted and read back exactly; every broken copy of
it must be rejected with an :class:`InputError` naming the file and the rule."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from _tinynight import NX, NY, SCANS, build_tiny_night, scan_file
from astropy.io import fits

from gpu2mass.errors import ConfigError, InputError
from gpu2mass.io import rawformat as rf
from gpu2mass.io import rawnight
from gpu2mass.io.rawnight import Night, RawCube, Scan, ScanInfo, open_night
from gpu2mass.io.rawwrite import write_calib_image, write_manifest, write_parquet, write_scan_band


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_night(tmp_path_factory.mktemp("tiny") / "night")


def _digest(root: Path) -> dict:
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the good night


def test_accepts_the_tiny_night_and_types_the_manifest(tiny):
    night = open_night(tiny.root)
    assert isinstance(night, Night)
    assert night.root == tiny.root
    raw = (tiny.root / "night.json").read_bytes()
    assert night.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert night.night.isoformat() == "2000-03-01" and night.night_mjd == 51604.0
    assert night.observatory == "n" and night.site.lat_deg == pytest.approx(31.68)
    ins = night.instrument
    assert ins.bands == ("J", "H", "K") and (ins.nx, ins.ny) == (NX, NY)
    assert ins.gain_e_per_dn["K"] == 8.0 and ins.read_noise_e["J"] == 40.0
    assert [s.number for s in night.scans] == [1, 2, 3]
    dark, cal, sci = night.scans
    assert dark.type == "dark" and dark.tile is None and dark.direction is None
    assert cal.field == "F90001" and cal.tile == 7 and cal.direction == "n"
    assert sci.files["H"] == tiny.root / scan_file(3, "H")
    assert sci.end_mjd == pytest.approx(sci.start_mjd + 4 * 1.3 / 86400, abs=1e-9)
    assert night.reference_catalog == tiny.root / "refcat.parquet"
    std = night.standards
    assert list(std.colnames) == list(rf.STANDARDS_COLUMNS)
    assert list(std["field"]) == ["F90001", "F90001", "F90002"]
    assert std["k_m"].mask.tolist() == [False, True, False]
    # the manifest file itself can be given
    assert open_night(tiny.root / "night.json", check_data=False).scans == night.scans


def test_round_trips_cubes_frames_and_calibration_exactly(tiny):
    night = open_night(tiny.root)
    for number, *_ in SCANS:
        scan = night.load_scan(number)
        assert isinstance(scan, Scan) and scan.number == number
        for band in rf.BANDS:
            sb = scan[band]
            assert sb.header["SCANNO"] == number and sb.header["BAND"] == band
            r1, r2r1 = sb.r1, sb.r2r1
            # R1 is uint16, stored as int16 + BZERO 32768: decoded exactly, not as float
            assert r1.scaled and r1.dtype == np.uint16 and r1.raw.dtype == np.dtype(">i2")
            assert not r2r1.scaled and r2r1.dtype == np.int16
            np.testing.assert_array_equal(r1[:], tiny.r1[number, band])
            np.testing.assert_array_equal(np.asarray(r2r1), tiny.r2r1[number, band])
            assert r1[:].dtype == np.uint16 and (r2r1[:] < 0).any()
            np.testing.assert_array_equal(r1.read(1, 3), tiny.r1[number, band][1:3])
            np.testing.assert_array_equal(r2r1[2], tiny.r2r1[number, band][2])
            for col, values in tiny.frames[number].items():
                np.testing.assert_array_equal(sb.frames[col], values)
    for band in rf.BANDS:
        flat, sat, bp = (night.calib_image(k, band) for k in ("flat", "satmap", "badpix"))
        assert (flat.dtype, sat.dtype, bp.dtype) == (np.float32, np.float32, np.uint8)
        np.testing.assert_array_equal(flat, tiny.flat[band])
        np.testing.assert_array_equal(sat, tiny.satmap[band])
        np.testing.assert_array_equal(bp, tiny.badpix[band])
        assert night.calib_image("flat", band) is flat  # cached
        assert not flat.flags.writeable
    with pytest.raises(ConfigError):
        night.calib_image("dark", "J")


def test_cubes_are_read_only_memory_maps(tiny):
    night = open_night(tiny.root, check_data=False)
    cube = night.load_scan(3)["J"].r1
    assert isinstance(cube, RawCube) and cube.shape == (5, NY, NX) and len(cube) == 5
    assert isinstance(cube.raw, np.memmap) and not cube.raw.flags.writeable
    with pytest.raises(ValueError):
        cube.raw[0, 0, 0] = 1
    with pytest.raises(ValueError):
        np.asarray(cube, copy=False)


def test_loading_is_lazy_and_one_scan_at_a_time(tiny, monkeypatch):
    night = open_night(tiny.root)
    calls = []
    real = rawnight._read_band_file
    monkeypatch.setattr(rawnight, "_read_band_file",
                        lambda path, *a: calls.append(path) or real(path, *a))
    it = night.iter_scans()
    assert isinstance(it, types.GeneratorType) and calls == []
    first = next(it)
    assert first.number == 2 and len(calls) == 3
    assert [s.number for s in it] == [3] and len(calls) == 6
    assert [s.number for s in night.iter_scans(("dark",))] == [1]
    with pytest.raises(ConfigError):
        list(night.iter_scans(("science",)))
    with pytest.raises(KeyError):
        night.load_scan(99)


def test_nothing_the_user_gave_is_modified(tiny):
    before = _digest(tiny.root)
    night = open_night(tiny.root)
    for scan in night.iter_scans(rf.SCAN_TYPES):
        for band in rf.BANDS:
            scan[band].r1[:].sum()
            scan[band].r2r1[:].sum()
    assert _digest(tiny.root) == before


# --------------------------------------------------------------------------- broken copies


class Broken:
    """A fresh copy of the tiny night and helpers to break it."""

    def __init__(self, tiny, root: Path):
        shutil.copytree(tiny.root, root)
        self.tiny, self.root = tiny, root
        self.m = copy.deepcopy(tiny.manifest)

    def scan(self, number: int) -> dict:
        return next(s for s in self.m["scans"] if s["scan"] == number)

    def band(self, scan: int, band: str = "J", **overrides) -> Path:
        """Rewrite a band file through the writer with some arrays or keywords replaced."""
        number, kind, _, _, direction, *_ = next(s for s in SCANS if s[0] == scan)
        kw = {"scan": number, "band": band, "scan_type": kind, "scandir": direction or "",
              "observatory": "n", "r1": self.tiny.r1[scan, band],
              "r2r1": self.tiny.r2r1[scan, band], "frames": dict(self.tiny.frames[scan])}
        frames = overrides.pop("frames", {})
        kw.update(overrides)
        kw["frames"].update(frames)
        path = self.root / scan_file(scan, band)
        write_scan_band(path, **kw)
        return path

    def edit_fits(self, rel: str, fn) -> None:
        """Apply ``fn(hdul)`` to an in-memory copy of a FITS file and write it back."""
        path = self.root / rel
        with fits.open(path, memmap=False, do_not_scale_image_data=True) as hdul:
            for hdu in hdul:
                hdu.data  # noqa: B018 - load everything before the file closes
            fn(hdul)
            hdul.writeto(path.with_suffix(".tmp"), overwrite=True)
        os.replace(path.with_suffix(".tmp"), path)

    def save(self) -> None:
        write_manifest(self.root, self.m)


def _raw_manifest(text: bytes):
    def mutate(b):
        (b.root / "night.json").write_bytes(text)
        b.m = None
    return mutate


def _set(*keys_and_value):
    """Mutation setting ``m[k1][k2]... = value``; a value of ``DEL`` deletes the key."""
    *keys, value = keys_and_value

    def mutate(b):
        obj = b.m
        for k in keys[:-1]:
            obj = obj[k]
        if value is DEL:
            del obj[keys[-1]]
        else:
            obj[keys[-1]] = value
    return mutate


DEL = object()
S = "scans"  # manifest scans index: 0 dark (scan 1), 1 cal (scan 2), 2 sci (scan 3)
J3 = scan_file(3, "J")


def _symlink_out(b):
    outside = b.root.parent / "outside.fits"
    shutil.copy(b.root / J3, outside)
    (b.root / "scans" / "link.fits").symlink_to(outside)
    b.scan(3)["files"]["J"] = "scans/link.fits"


def _truncate(nbytes):
    def mutate(b):
        data = (b.root / J3).read_bytes()
        (b.root / J3).write_bytes(data[:len(data) - nbytes])
    return mutate


def _drop_hdu(name):
    def mutate(b):
        b.edit_fits(J3, lambda h: h.pop(h.index_of(name)))
    return mutate


def _header(rel, key, value, hdu=0):
    def edit(h):
        if value is DEL:
            del h[hdu].header[key]
        else:
            h[hdu].header[key] = value
    return lambda b: b.edit_fits(rel, edit)


def _frames(scan=3, band="J", **cols):
    def mutate(b):
        base = b.tiny.frames[scan]
        b.band(scan, band, frames={k: (v(base[k]) if callable(v) else v) for k, v in cols.items()})
    return mutate


def _drop_frames_column(col):
    def edit(h):
        table = h["FRAMES"]
        keep = [c for c in table.columns if c.name != col]
        h[h.index_of("FRAMES")] = fits.BinTableHDU.from_columns(keep, name="FRAMES")
    return lambda b: b.edit_fits(J3, edit)


def _float_cube_with_nan(b):
    r2 = b.tiny.r2r1[3, "J"].astype(np.float32)
    r2[2, 3, 4] = np.nan
    def edit(h):
        h[h.index_of("R2R1")] = fits.ImageHDU(r2, name="R2R1")
    b.edit_fits(J3, edit)


def _saturate(b, which):
    sat = b.tiny.satmap["J"]
    good = np.argwhere(b.tiny.badpix["J"] == 0)
    y, x = good[10]
    r1, r2 = b.tiny.r1[3, "J"].copy(), b.tiny.r2r1[3, "J"].copy()
    if which == "read2":
        r2[1, y, x] = int(sat[y, x]) - int(r1[1, y, x]) + 10
    else:
        r1[1, y, x], r2[1, y, x] = int(sat[y, x]) + 10, 0
    b.band(3, "J", r1=r1, r2r1=r2)


def _calib(kind, band, image):
    return lambda b: write_calib_image(b.root / "calib", kind, band, image(b))


def _standards(drop=None, **replace):
    def mutate(b):
        cols = {
            "field": ["F90001", "F90002"], "ra": np.array([150.1, 30.0]),
            "dec": np.array([2.1, -5.0]), **{c: np.array([10.0, 11.0]) for c in
                                                 rf.STANDARDS_COLUMNS[3:]},
        }
        cols.update(replace)
        cols.pop(drop, None)
        write_parquet(b.root / "calib" / rf.STANDARDS_FILE, cols)
    return mutate


def _refcat(drop=None, **replace):
    def mutate(b):
        cols = {"ra": np.array([1.0, 2.0]), "dec": np.array([3.0, 4.0]),
                "ref_epoch": np.array([2016.0, 2016.0]), "pmra": np.array([0.0, 1.0]),
                "pmdec": np.array([0.0, 1.0]), "mag": np.array([8.0, 9.0])}
        cols.update(replace)
        cols.pop(drop, None)
        write_parquet(b.root / "refcat.parquet", cols)
    return mutate


def _reverse_direction(b):
    for band in rf.BANDS:
        b.band(3, band, frames={"DEC_CMD": b.tiny.frames[3]["DEC_CMD"][::-1].copy()})


def _delete(rel):
    return lambda b: (b.root / rel).unlink()


def _flat(b):
    return b.tiny.flat["J"]


GOOD_MJD = SCANS[2][6]
M = "night.json"
STD = "calib/standards.parquet"

# (id, mutation, offending file relative to the night directory, regex the message matches)
CASES = [
    # the manifest as a file
    ("invalid_json", _raw_manifest(b'{"format": "gpu2mass-raw-night",'), M, "not valid JSON"),
    ("not_utf8", _raw_manifest(b'{"format": "\xff"}'), M, "UTF-8"),
    ("not_an_object", _raw_manifest(b"[1, 2]"), M, "JSON object"),
    ("duplicate_json_key", lambda b: _raw_manifest(
        b'{"night": "2000-03-01", ' + json.dumps(b.m).encode()[1:])(b), M, "twice"),
    ("nan_literal", _set("site", "height_m", float("nan")), M, "NaN"),
    # top-level keys and values
    ("missing_key", _set("site", DEL), M, "'site' is missing"),
    ("unknown_key", _set("referance_catalog", "x.parquet"), M, "unknown key 'referance_catalog'"),
    ("wrong_format", _set("format", "gpu2mass-raw"), M, "format is 'gpu2mass-raw'"),
    ("wrong_format_version", _set("format_version", 2), M, "format_version 2 is not supported"),
    ("bool_format_version", _set("format_version", True), M, "integer, found a boolean"),
    ("float_format_version", _set("format_version", 1.0), M, "integer, found a number"),
    ("bad_night_date", _set("night", "2000-02-30"), M, "real UT date"),
    ("night_date_format", _set("night", "20000301"), M, "YYYY-MM-DD"),
    ("bad_observatory", _set("observatory", "north"), M, "observatory"),
    ("latitude_range", _set("site", "lat_deg", 95.0), M, "lat_deg"),
    ("site_string", _set("site", "lon_deg", "-110"), M, "lon_deg.*number"),
    ("calib_not_dir", _set("calib", "nocalib"), "nocalib", "not a directory"),
    ("refcat_number", _set("reference_catalog", 5), M, "string or null"),
    # instrument
    ("bands_not_subset", _set("instrument", "bands", ["J", "H", "Z"]), M, "subset"),
    ("bands_duplicate", _set("instrument", "bands", ["J", "J"]), M, "twice"),
    ("bands_empty", _set("instrument", "bands", []), M, "bands is empty"),
    ("nx_zero", _set("instrument", "nx", 0), M, "nx"),
    ("ny_bool", _set("instrument", "ny", True), M, "'ny' must be an integer"),
    ("exptime_negative", _set("instrument", "r2r1_exptime_s", -1.25), M, "positive"),
    ("gain_missing_band", _set("instrument", "gain_e_per_dn", "K", DEL), M, "gain_e_per_dn"),
    ("read_noise_extra_band", _set("instrument", "read_noise_e", "Z", 3.0), M, "'Z'"),
    ("read_noise_zero", _set("instrument", "read_noise_e", "H", 0), M, "positive"),
    # scans in the manifest
    ("scans_empty", _set(S, []), M, "scans is empty"),
    ("duplicate_scan_number", _set(S, 2, "scan", 2), M, "not unique"),
    ("scan_number_zero", _set(S, 0, "scan", 0), M, ">= 1"),
    ("start_not_increasing", _set(S, 2, "start_mjd", SCANS[1][6] - 0.001), M,
     "strictly increasing"),
    ("scans_overlap", _set(S, 2, "start_mjd", SCANS[1][6] + 2.0 / 86400), M, "overlap"),
    ("outside_window_after", _set("night", "2000-02-27"), M, "1.5 days"),
    ("outside_window_before", _set("night", "2000-03-02"), M, "1.5 days"),
    ("unknown_scan_type", _set(S, 2, "type", "science"), M, "type 'science'"),
    ("dark_with_direction", _set(S, 0, "direction", "n"), M, "dark scans have no"),
    ("dark_with_tile", _set(S, 0, "tile", 3), M, "dark scans have no"),
    ("cal_without_field", _set(S, 1, "field", DEL), M, "'field' is missing"),
    ("sci_with_field", _set(S, 2, "field", "F90001"), M, "only cal scans"),
    ("sky_without_tile", _set(S, 2, "tile", DEL), M, "'tile' is missing"),
    ("bad_direction", _set(S, 2, "direction", "e"), M, "direction 'e'"),
    ("nframes_bool", _set(S, 2, "nframes", True), M, "'nframes' must be an integer"),
    ("nframes_zero", _set(S, 2, "nframes", 0), M, "nframes is 0"),
    ("start_mjd_string", _set(S, 2, "start_mjd", "51604.12"), M, "start_mjd.*number"),
    ("files_missing_band", _set(S, 2, "files", "K", DEL), M, "files has no band 'K'"),
    ("files_extra_band", _set(S, 2, "files", "Z", "scans/z.fits"), M, "files has band 'Z'"),
    ("path_escapes", _set(S, 2, "files", "J", "../x.fits"), M, "escapes the night directory"),
    ("path_escapes_inner", _set(S, 2, "files", "J", "scans/../../night/../x.fits"), M,
     "escapes"),
    ("path_absolute", _set(S, 2, "files", "J", "/tmp/x.fits"), M, "absolute path"),
    ("symlink_escapes", _symlink_out, M, "escapes the night directory"),
    ("missing_band_file", _delete(scan_file(3, "H")), scan_file(3, "H"), "does not exist"),
    # scan band files
    ("truncated_fits", _truncate(1000), J3, "truncated"),
    ("truncated_at_block", _truncate(2880), J3, "truncated"),
    ("corrupt_fits", lambda b: (b.root / J3).write_bytes(b"not a FITS file" * 300), J3,
     "not a readable FITS file"),
    ("wrong_cube_shape", lambda b: b.band(3, r1=b.tiny.r1[3, "J"][:, :31],
                                          r2r1=b.tiny.r2r1[3, "J"][:, :31]), J3, "shape"),
    ("r2r1_shape_differs", lambda b: b.edit_fits(J3, lambda h: h.__setitem__(
        h.index_of("R2R1"), fits.ImageHDU(b.tiny.r2r1[3, "J"][:4], name="R2R1"))), J3,
     r"R2R1 has shape \(4, 32, 32\)"),
    ("cube_2d", lambda b: b.edit_fits(J3, lambda h: h.__setitem__(
        h.index_of("R1"), fits.ImageHDU(b.tiny.r1[3, "J"][0], name="R1"))), J3, "3-d cube"),
    ("nan_float_cube", _float_cube_with_nan, J3, "must be finite"),
    ("no_frames_hdu", _drop_hdu("FRAMES"), J3, "no HDU with EXTNAME FRAMES"),
    ("no_r1_hdu", _drop_hdu("R1"), J3, "no HDU with EXTNAME R1"),
    ("band_mismatch", _header(J3, "BAND", "H"), J3, "BAND = 'H'"),
    ("nframes_mismatch", _header(J3, "NFRAMES", 4), J3, "NFRAMES = 4"),
    ("scanno_mismatch", _header(J3, "SCANNO", 7), J3, "SCANNO"),
    ("type_mismatch", _header(J3, "TYPE", "cal"), J3, "TYPE = 'cal'"),
    ("observat_mismatch", _header(J3, "OBSERVAT", "s"), J3, "OBSERVAT"),
    ("dark_scandir", _header(scan_file(1, "K"), "SCANDIR", "n"), scan_file(1, "K"), "SCANDIR"),
    ("keyword_missing", _header(J3, "TYPE", DEL), J3, "no keyword TYPE"),
    ("mjd_not_monotonic", _frames(MJD=lambda v: v[[0, 2, 1, 3, 4]]), J3, "strictly increasing"),
    ("mjd_nan", _frames(MJD=lambda v: np.where(np.arange(5) == 3, np.nan, v)), J3, "non-finite"),
    ("mjd_far_from_start", _frames(MJD=lambda v: v + 10 / 86400), J3, "start_mjd"),
    ("frame_not_0_to_n", _frames(FRAME=lambda v: v + 1), J3, "FRAME must be 0"),
    ("frames_column_missing", _drop_frames_column("AIRMASS"), J3, "no column AIRMASS"),
    ("airmass_below_1", _frames(AIRMASS=lambda v: v - 0.2), J3, "AIRMASS must be finite and >= 1"),
    ("ra_cmd_360", _frames(RA_CMD=lambda v: v + 0.02), J3, "RA_CMD must be in"),
    ("dec_cmd_range", _frames(DEC_CMD=lambda v: v + 125), J3, "DEC_CMD must be in"),
    ("bands_disagree_on_ra", _frames(band="H", RA_CMD=lambda v: v - 0.01), scan_file(3, "H"),
     "same estimate"),
    ("bands_disagree_on_mjd", _frames(band="K", MJD=lambda v: v + (np.arange(5) == 4) * 2 / 86400),
     scan_file(3, "K"), "exposed together"),
    ("direction_vs_dec", _reverse_direction, J3, "Dec increases"),
    ("saturation_read2", lambda b: _saturate(b, "read2"), J3, "read 2 .* exceeds the saturation"),
    ("saturation_r1", lambda b: _saturate(b, "r1"), J3, "R1 = .* exceeds the saturation"),
    # calibration library
    ("flat_missing", _delete("calib/flat_H.fits"), "calib/flat_H.fits", "does not exist"),
    ("flat_wrong_shape", _calib("flat", "J", lambda b: np.ones((NY, NX + 1), np.float32)),
     "calib/flat_J.fits", r"shape \(32, 33\)"),
    ("flat_median", _calib("flat", "J", lambda b: _flat(b) * 100), "calib/flat_J.fits", "median"),
    ("flat_negative", _calib("flat", "J", lambda b: -_flat(b)), "calib/flat_J.fits", "positive"),
    ("satmap_zero", _calib("satmap", "K", lambda b: np.zeros((NY, NX), np.float32)),
     "calib/satmap_K.fits", "finite and positive"),
    ("badpix_unknown_bit", _calib("badpix", "H", lambda b: np.full((NY, NX), 16, np.uint8)),
     "calib/badpix_H.fits", "only bits"),
    ("badpix_float", _calib("badpix", "H", lambda b: np.zeros((NY, NX), np.float32)),
     "calib/badpix_H.fits", "integer"),
    ("standards_missing", _delete(STD), STD, "does not exist"),
    ("standards_missing_column", _standards(drop="k_msig"), STD, "no column 'k_msig'"),
    ("standards_ra_string", _standards(ra=["150.1", "30.0"]), STD, "column 'ra' has type"),
    ("field_not_in_standards", _set(S, 1, "field", "F99999"), STD, "F99999"),
    ("refcat_missing", _delete("refcat.parquet"), "refcat.parquet", "does not exist"),
    ("refcat_missing_column", _refcat(drop="pmra"), "refcat.parquet", "no column 'pmra'"),
    ("refcat_dec_range", _refcat(dec=np.array([3.0, 95.0])), "refcat.parquet", "column dec"),
    ("refcat_not_a_table", lambda b: (b.root / "refcat.parquet").write_text("ra,dec\n"),
     "refcat.parquet", "neither a Parquet file nor a FITS file"),
]


@pytest.mark.parametrize("mutate, rel, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejects_broken_night(tiny, tmp_path, mutate, rel, match):
    b = Broken(tiny, tmp_path / "night")
    mutate(b)
    if b.m is not None:
        b.save()
    with pytest.raises(InputError, match=match) as info:
        open_night(b.root)
    assert info.value.path == b.root / rel, info.value
    assert str(info.value.path) in str(info.value)


def test_nonexistent_night(tmp_path):
    with pytest.raises(InputError, match="does not exist") as info:
        open_night(tmp_path / "nope")
    assert info.value.path == tmp_path / "nope"
    with pytest.raises(InputError, match="night.json"):
        open_night(tmp_path)


def test_pixel_checks_only_with_check_data(tiny, tmp_path):
    b = Broken(tiny, tmp_path / "night")
    _float_cube_with_nan(b)
    night = open_night(b.root, check_data=False)
    assert np.isnan(night.load_scan(3)["J"].r2r1[2, 3, 4])
    with pytest.raises(InputError, match="finite"):
        open_night(b.root)


# --------------------------------------------------------------------------- legal variants


def _reorder_hdus(b):
    b.edit_fits(J3, lambda h: h.insert(1, h.pop(h.index_of("FRAMES"))))
    b.edit_fits(scan_file(3, "H"), lambda h: h.insert(1, h.pop(h.index_of("R2R1"))))


def _shared_calib(b):
    shutil.move(b.root / "calib", b.root.parent / "shared_calib")
    b.m["calib"] = "../shared_calib"


def _no_cal_scan(b):
    del b.m["scans"][1]
    (b.root / STD).unlink()


def _fits_refcat(b):
    cols = [fits.Column(name=n.upper(), format="D", array=np.array([1.0, 2.0]))
            for n in rf.REFCAT_COLUMNS]
    fits.BinTableHDU.from_columns(cols).writeto(b.root / "refcat.fits")
    b.m["reference_catalog"] = "refcat.fits"


LEGAL = [
    ("hdus_in_any_order", _reorder_hdus),
    ("calib_outside_night_dir", _shared_calib),
    ("reference_catalog_null", _set("reference_catalog", None)),
    ("reference_catalog_absent", _set("reference_catalog", DEL)),
    ("refcat_as_fits_table", _fits_refcat),
    ("no_cal_scan_no_standards", _no_cal_scan),
    ("bands_subset", lambda b: b.m["instrument"].update(
        bands=["K", "J"], gain_e_per_dn={"J": 10.0, "K": 8.0}, read_noise_e={"J": 4, "K": 4})
     or [s["files"].pop("H") for s in b.m["scans"]]),
    ("path_with_dotdot_inside", _set(S, 2, "files", "J", "scans/../" + J3)),
]


@pytest.mark.parametrize("mutate", [c[1] for c in LEGAL], ids=[c[0] for c in LEGAL])
def test_accepts_legal_variants(tiny, tmp_path, mutate):
    b = Broken(tiny, tmp_path / "night")
    mutate(b)
    b.save()
    night = open_night(b.root)
    for scan in night.iter_scans():
        for band in night.instrument.bands:
            np.testing.assert_array_equal(scan[band].r1[:], tiny.r1[scan.number, band])


@pytest.mark.parametrize("r1_dtype, r2r1_dtype", [
    (np.float32, np.float32), (np.float64, np.int32), (np.uint32, np.int64),
    (np.int32, np.int16), (np.uint8, np.int8),
])
def test_cube_encodings_round_trip(tiny, tmp_path, r1_dtype, r2r1_dtype):
    b = Broken(tiny, tmp_path / "night")
    r1 = tiny.r1[3, "J"]
    r2 = tiny.r2r1[3, "J"]
    if r1_dtype == np.uint8:  # values that fit one byte each
        r1, r2 = (r1 % 250).astype(np.uint16), np.clip(r2, -100, 100).astype(np.int16)
    r1, r2 = r1.astype(r1_dtype), r2.astype(r2r1_dtype)

    def edit(h):  # straight through astropy: the writer would round float cubes to integers
        h[h.index_of("R1")] = fits.ImageHDU(r1, name="R1")
        h[h.index_of("R2R1")] = fits.ImageHDU(r2, name="R2R1")
    b.edit_fits(J3, edit)
    cube = open_night(b.root).load_scan(3)["J"]
    assert cube.r1.dtype == r1_dtype and cube.r2r1.dtype == r2r1_dtype
    np.testing.assert_array_equal(cube.r1[:], r1)
    np.testing.assert_array_equal(cube.r2r1[:], r2)


def test_general_bscale_bzero_decodes_like_astropy(tiny, tmp_path):
    b = Broken(tiny, tmp_path / "night")
    raw = (tiny.r1[3, "J"].astype(np.int32) - 3000).astype(np.int16)

    def edit(h):
        hdu = fits.ImageHDU(raw, name="R1")
        hdu.header["BSCALE"], hdu.header["BZERO"] = 0.5, 2900.0
        h[h.index_of("R1")] = hdu
    b.edit_fits(J3, edit)
    cube = open_night(b.root).load_scan(3)["J"].r1
    assert cube.dtype == np.float32 and cube.scaled
    np.testing.assert_array_equal(cube[:], raw.astype(np.float32) * 0.5 + 2900.0)
    np.testing.assert_array_equal(cube[:], fits.getdata(b.root / J3, "R1"))


def test_scan_info_is_frozen(tiny):
    info = open_night(tiny.root, check_data=False).scans[0]
    assert isinstance(info, ScanInfo)
    with pytest.raises(AttributeError):
        info.number = 5
    with pytest.raises(TypeError):
        info.files["J"] = Path("x")
