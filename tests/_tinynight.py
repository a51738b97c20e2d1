"""A tiny, spec-conforming raw night for tests (``shared/spec/raw-night.md``).

Written through :mod:`gpu2mass.io.rawwrite`, as the simulator writes, in well under a
second: one dark, one cal and one sci scan, three bands, 32 × 32 pixels, 4–5 frames, R1
stored as uint16 (FITS int16 with BZERO = 32768) and R2R1 as int16 with negative values,
a consistent calibration library, standards and an optional reference catalog.

Import from tests as ``from _tinynight import build_tiny_night`` (pytest's default
``prepend`` import mode puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpu2mass.io import rawformat as rf
from gpu2mass.io.rawwrite import write_calib_image, write_manifest, write_parquet, write_scan_band

NX = NY = 32
NIGHT = "2000-03-01"
NIGHT_MJD = 51604.0
FRAME_S = 1.3  # seconds between frames
#: (scan, type, tile, field, direction, nframes, start_mjd)
SCANS = (
    (1, "dark", None, None, None, 4, NIGHT_MJD + 0.10),
    (2, "cal", 7, "F90001", "n", 5, NIGHT_MJD + 0.11),
    (3, "sci", 1234, None, "s", 5, NIGHT_MJD + 0.12),
)


@dataclass
class TinyNight:
    """What was written: the directory, the manifest dict and the exact arrays."""

    root: Path
    manifest: dict
    r1: dict  # (scan, band) -> uint16 (nframes, NY, NX)
    r2r1: dict  # (scan, band) -> int16 (nframes, NY, NX)
    frames: dict  # scan -> column -> array
    satmap: dict  # band -> float32 (NY, NX)
    badpix: dict  # band -> uint8 (NY, NX)
    flat: dict  # band -> float32 (NY, NX)


def scan_file(scan: int, band: str) -> str:
    """Manifest path of a band file of the tiny night."""
    return f"scans/s{scan:03d}_{band}.fits"


def build_tiny_night(root: Path, *, seed: int = 1, refcat: bool = True) -> TinyNight:
    """Write the tiny night into ``root`` (created) and return what was written."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    calib = root / "calib"
    bands = rf.BANDS
    satmap, badpix, flat = {}, {}, {}
    for band in bands:
        sat = np.rint(rng.uniform(14000, 16000, (NY, NX))).astype(np.float32)
        bp = np.zeros((NY, NX), np.uint8)
        for bit in rf.BADPIX_BITS.values():
            ys, xs = rng.integers(0, NY, 3), rng.integers(0, NX, 3)
            bp[ys, xs] |= bit
        fl = rng.normal(1.0, 0.03, (NY, NX)).astype(np.float32)
        fl /= np.median(fl[bp == 0])
        satmap[band], badpix[band], flat[band] = sat, bp, fl
        write_calib_image(calib, "flat", band, fl)
        write_calib_image(calib, "satmap", band, sat)
        write_calib_image(calib, "badpix", band, bp)
    write_parquet(calib / rf.STANDARDS_FILE, {
        "field": ["F90001", "F90001", "F90002"],
        "ra": np.array([150.10, 150.12, 30.0]),
        "dec": np.array([2.10, 2.12, -5.0]),
        "j_m": [11.2, 12.5, None], "h_m": [10.9, 12.1, 9.0], "k_m": [10.8, None, 8.9],
        "j_msig": [0.01, 0.02, None], "h_msig": [0.01, 0.02, 0.01], "k_msig": [0.01, None, 0.01],
    })

    scans, r1s, r2s, frames = [], {}, {}, {}
    for number, kind, tile, fld, direction, n, start in SCANS:
        dt = np.arange(n) * FRAME_S / 86400.0
        dec0 = 2.1 if kind == "cal" else -30.0
        step = 82.8 / 3600.0 * (1 if direction == "n" else -1)
        fr = {
            "FRAME": np.arange(n, dtype=np.int32),
            "MJD": start + dt,
            "RA_CMD": np.full(n, 150.1 if kind != "sci" else 359.99),
            "DEC_CMD": dec0 + (step if direction else 0.0) * np.arange(n),
            "AIRMASS": np.linspace(1.0, 1.05, n).astype(np.float32),
        }
        frames[number] = fr
        entry = {"scan": number, "type": kind}
        if kind != "dark":
            entry["tile"] = tile
            if fld is not None:
                entry["field"] = fld
            entry["direction"] = direction
        entry.update({"nframes": n, "start_mjd": start,
                      "files": {b: scan_file(number, b) for b in bands}})
        scans.append(entry)
        for band in bands:
            r1 = rng.integers(2900, 3100, (n, NY, NX)).astype(np.uint16)
            r2 = rng.integers(-40, 2000, (n, NY, NX)).astype(np.int16)
            # a few saturated pixels, clipped as the spec says: read 2 = SAT
            sat = satmap[band].astype(np.int64)
            for f in range(n):
                y, x = rng.integers(0, NY), rng.integers(0, NX)
                r2[f, y, x] = sat[y, x] - r1[f, y, x]
            if kind != "dark":  # R1 saturated too: R1 = SAT, R2R1 = 0
                r1[0, 5, 6], r2[0, 5, 6] = sat[5, 6], 0
            r1s[number, band], r2s[number, band] = r1, r2
            write_scan_band(root / scan_file(number, band), scan=number, band=band,
                            scan_type=kind, scandir=direction or "", observatory="n",
                            r1=r1, r2r1=r2, frames=fr)

    manifest = {
        "format": rf.FORMAT,
        "format_version": rf.FORMAT_VERSION,
        "night": NIGHT,
        "observatory": "n",
        "site": {"lon_deg": -110.73, "lat_deg": 31.68, "height_m": 2616.0},
        "instrument": {
            "bands": list(bands), "nx": NX, "ny": NY, "pixel_scale_arcsec": 2.0,
            "r1_exptime_s": 0.051, "r2r1_exptime_s": 1.25, "frame_step_arcsec": 82.8,
            "gain_e_per_dn": {"J": 10.0, "H": 10.0, "K": 8.0},
            "read_noise_e": {"J": 40.0, "H": 40.0, "K": 45.0},
        },
        "calib": "calib",
        "reference_catalog": "refcat.parquet" if refcat else None,
        "scans": scans,
    }
    if refcat:
        write_parquet(root / "refcat.parquet", {
            "ra": np.array([150.1, 150.2, 359.99]), "dec": np.array([2.1, 2.2, -30.0]),
            "ref_epoch": np.array([2016.0, 2016.0, 2016.0]),
            "pmra": [1.5, None, 0.0], "pmdec": [-2.0, None, 0.0],
            "mag": np.array([9.0, 10.0, 8.0]), "ra_error": np.array([0.1, 0.2, 0.1]),
        })
    write_manifest(root, copy.deepcopy(manifest))
    return TinyNight(root=root, manifest=manifest, r1=r1s, r2r1=r2s, frames=frames,
                     satmap=satmap, badpix=badpix, flat=flat)
