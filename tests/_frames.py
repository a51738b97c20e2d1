"""Test helper: a simulated scan calibrated the simplest way, with its truth geometry.

For tests of steps that come after frame calibration (detection, registration, Atlas
Images) that must not depend on the calibration step under test: (R2R1 − mean dark)/flat,
minus each frame's median; bad pixels masked. Import as ``from _frames import simple_scan``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from astropy.io import fits

from gpu2mass.geometry import FrameGeometry, frame_geometry_from_truth
from gpu2mass.io import rawformat as rf


@dataclass(frozen=True)
class SimpleScan:
    """``data`` (n, ny, nx) float32 sky-subtracted DN at flat = 1; ``bad`` (ny, nx) bool;
    ``sky`` and ``noise`` (n,) DN; ``geometry`` the truth FrameGeometry; ``frames`` the
    truth frame rows (dict of arrays, by frame); ``sources`` truth sources (dict)."""

    scan: int
    band: str
    data: np.ndarray
    bad: np.ndarray
    sky: np.ndarray
    noise: np.ndarray
    geometry: FrameGeometry
    frames: dict
    sources: dict


def simple_scan(night_dir: str | Path, band: str, scan_type: str = "sci") -> SimpleScan:
    night_dir = Path(night_dir)
    manifest = json.loads((night_dir / "night.json").read_text())
    scan = next(s for s in manifest["scans"] if s["type"] == scan_type)
    dark_scan = next(s for s in manifest["scans"] if s["type"] == "dark")
    dark = fits.getdata(night_dir / dark_scan["files"][band], "R2R1").astype(np.float64).mean(0)
    flat = fits.getdata(night_dir / "calib" / rf.calib_file("flat", band)).astype(np.float64)
    bad = fits.getdata(night_dir / "calib" / rf.calib_file("badpix", band)) > 0
    raw = fits.getdata(night_dir / scan["files"][band], "R2R1").astype(np.float64)
    cal = (raw - dark) / np.where(bad, 1.0, flat)
    sky = np.array([np.median(c[~bad]) for c in cal])
    q = np.array([np.percentile(c[~bad], [15.87, 84.13]) for c in cal])
    data = (cal - sky[:, None, None]).astype(np.float32)
    data[:, bad] = 0.0
    t = pq.read_table(night_dir / "truth" / "frames.parquet").to_pydict()
    sel = sorted((i for i, (s, b) in enumerate(zip(t["scan"], t["band"], strict=True))
                  if s == scan["scan"] and b == band), key=lambda i: t["frame"][i])
    frames = {k: np.array([v[i] for i in sel]) for k, v in t.items()}
    sources = {k: np.asarray(v) for k, v in pq.read_table(night_dir / "truth" / "sources.parquet").to_pydict().items()}
    return SimpleScan(scan["scan"], band, data, bad, sky, (q[:, 1] - q[:, 0]) / 2,
                      frame_geometry_from_truth(night_dir, scan["scan"], band), frames, sources)
