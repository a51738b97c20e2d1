"""The raw night format, version 1, as constants (``shared/spec/raw-night.md``).

One place for every name the spec fixes, so that the writer (:mod:`.rawwrite`), the
reader (:mod:`.rawnight`) and the tests cannot drift apart.
"""

from __future__ import annotations

__all__ = [
    "BADPIX_BITS",
    "BANDS",
    "CALIB_KINDS",
    "CAL_SCAN_KEYS",
    "CUBE_EXTNAMES",
    "DIRECTIONS",
    "FORMAT",
    "FORMAT_VERSION",
    "FRAMES_COLUMNS",
    "FRAMES_EXTNAME",
    "INSTRUMENT_KEYS",
    "MANIFEST_KEYS",
    "MANIFEST_NAME",
    "MANIFEST_OPTIONAL_KEYS",
    "NIGHT_WINDOW_DAYS",
    "OBSERVATORIES",
    "PRIMARY_KEYS",
    "REFCAT_COLUMNS",
    "REFCAT_OPTIONAL_COLUMNS",
    "SCAN_KEYS",
    "SCAN_TYPES",
    "SITE_KEYS",
    "SKY_SCAN_KEYS",
    "SKY_SCAN_TYPES",
    "STANDARDS_COLUMNS",
    "STANDARDS_FILE",
    "TRUTH_FILES",
    "calib_file",
]

FORMAT = "gpu2mass-raw-night"
FORMAT_VERSION = 1

#: Band codes in file order; "K" means Ks.
BANDS = ("J", "H", "K")
SCAN_TYPES = ("sci", "cal", "dark", "flat")
DIRECTIONS = ("n", "s")
OBSERVATORIES = ("n", "s")

MANIFEST_NAME = "night.json"

#: Manifest keys → accepted JSON types (section 2). ``reference_catalog`` may be null or absent.
MANIFEST_KEYS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "format_version": (int,),
    "night": (str,),
    "observatory": (str,),
    "site": (dict,),
    "instrument": (dict,),
    "calib": (str,),
    "scans": (list,),
}
#: Optional manifest keys → accepted JSON types (``type(None)`` is JSON null).
MANIFEST_OPTIONAL_KEYS: dict[str, tuple[type, ...]] = {
    "reference_catalog": (str, type(None)),
}
SITE_KEYS = ("lon_deg", "lat_deg", "height_m")

#: ``instrument`` keys → types (section 2.1). Numbers accept int or float.
INSTRUMENT_KEYS: dict[str, tuple[type, ...]] = {
    "bands": (list,),
    "nx": (int,),
    "ny": (int,),
    "pixel_scale_arcsec": (int, float),
    "r1_exptime_s": (int, float),
    "r2r1_exptime_s": (int, float),
    "frame_step_arcsec": (int, float),
    "gain_e_per_dn": (dict,),
    "read_noise_e": (dict,),
}

#: Keys every scan object has (section 2.2).
SCAN_KEYS: dict[str, tuple[type, ...]] = {
    "scan": (int,),
    "type": (str,),
    "nframes": (int,),
    "start_mjd": (int, float),
    "files": (dict,),
}
#: Keys that sky scans (sci, cal, flat) have and dark scans do not.
SKY_SCAN_KEYS: dict[str, tuple[type, ...]] = {
    "tile": (int,),
    "direction": (str,),
}

#: Scan types that look at the sky and so have ``tile`` and ``direction``.
SKY_SCAN_TYPES = ("sci", "cal", "flat")
#: Keys that ``cal`` scans have in addition (and other scans do not).
CAL_SCAN_KEYS: dict[str, tuple[type, ...]] = {
    "field": (str,),
}
#: Every scan starts within this many days after 00:00 UT of the manifest's ``night``.
NIGHT_WINDOW_DAYS = 1.5

#: Primary-header keywords of a scan band file (section 3).
PRIMARY_KEYS = ("SCANNO", "BAND", "TYPE", "SCANDIR", "NFRAMES", "OBSERVAT")
CUBE_EXTNAMES = ("R1", "R2R1")
FRAMES_EXTNAME = "FRAMES"
FRAMES_COLUMNS = ("FRAME", "MJD", "RA_CMD", "DEC_CMD", "AIRMASS")

STANDARDS_COLUMNS = (
    "field", "ra", "dec", "j_m", "h_m", "k_m", "j_msig", "h_msig", "k_msig",
)
REFCAT_COLUMNS = ("ra", "dec", "ref_epoch", "pmra", "pmdec", "mag")
REFCAT_OPTIONAL_COLUMNS = ("ra_error", "dec_error")

#: Calibration images per band, ``calib/<kind>_<band>.fits`` (section 4).
CALIB_KINDS = ("flat", "satmap", "badpix")
STANDARDS_FILE = "standards.parquet"

#: Bad-pixel bits of ``calib/badpix_<band>.fits`` (section 4).
BADPIX_BITS = {"dead": 1, "hot": 2, "noisy": 4, "low_response": 8}

TRUTH_FILES = ("sources.parquet", "frames.parquet", "artifacts.parquet", "night.json")


def calib_file(kind: str, band: str) -> str:
    """File name of a calibration image: ``kind`` is ``flat``, ``satmap`` or ``badpix``."""
    return f"{kind}_{band}.fits"
