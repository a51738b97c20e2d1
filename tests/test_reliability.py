"""Reliability of ``gpu2mass night`` (DESIGN.md section 6; issue 5's acceptance):

- every malformed night the reader rejects ends with exit status 2, a message naming the file,
  and nothing written;
- scans whose data is pure noise, all saturated, blank in one band, or without reference
  stars fail with a message a person can act on, while the good scans' products are complete
  and nothing partial of the failed ones is on disk;
- a run killed at random moments (10 times) and resumed gives the same products as an
  uninterrupted run;
- loading the same night into the working database twice leaves the same rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pytest
from astropy.io import fits
from gpu2mass.cli.main import app
from typer.testing import CliRunner

# --------------------------------------------------------------------- rejected at the door


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory):
    from _tinynight import build_tiny_night

    return build_tiny_night(tmp_path_factory.mktemp("tinyraw") / "night")


def _reader_cases():
    import test_rawnight

    return test_rawnight.CASES, test_rawnight.Broken


@pytest.mark.parametrize("case", [c[0] for c in _reader_cases()[0]])
def test_a_malformed_night_is_rejected_before_anything_is_written(tiny_raw, tmp_path, case):
    cases, broken_cls = _reader_cases()
    _, mutate, rel, _match = next(c for c in cases if c[0] == case)
    b = broken_cls(tiny_raw, tmp_path / "night")
    mutate(b)
    if b.m is not None:
        b.save()
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["night", str(b.root), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert str(b.root / rel) in res.output
    assert not out.exists() or not any(out.rglob("*"))


# ------------------------------------------------------------------- scans that cannot work


def _rewrite_scan(night_dir: Path, scan: int, bands: str, fn=None, frames_fn=None) -> None:
    """Replace the R1 and R2R1 data of a scan's ``bands`` by ``fn(r1, r2r1, satmap)`` (DN
    cubes) and their FRAMES columns by ``frames_fn(frames)``, as a broken instrument would
    have written them (all bands read before any is written: the reader checks that the
    band files agree)."""
    from gpu2mass.io.rawnight import open_night
    from gpu2mass.io.rawwrite import write_scan_band

    night = open_night(night_dir, check_data=False)
    info = night.scan(scan)
    loaded = night.load_scan(scan)
    new = {}
    for band in bands:
        sb = loaded[band]
        r1, r2r1 = np.asarray(sb.r1[:], np.int64), np.asarray(sb.r2r1[:], np.int64)
        if fn is not None:
            r1, r2r1 = fn(r1, r2r1, night.calib_image("satmap", band))
        frames = {k: np.asarray(v) for k, v in sb.frames.items()}
        if frames_fn is not None:
            frames = frames_fn(frames)
        new[band] = (r1, r2r1, frames)
    del loaded
    for band, (r1, r2r1, frames) in new.items():
        write_scan_band(Path(info.files[band]), scan=scan, band=band, scan_type=info.type,
                        scandir=info.direction, observatory=night.observatory, r1=r1, r2r1=r2r1,
                        frames=frames)


def _pure_noise(r1, r2r1, satmap):
    rng = np.random.default_rng(3)
    sky1, sky2 = np.median(r1), np.median(r2r1)
    return (np.round(sky1 + rng.normal(0, 5, r1.shape)).astype(np.int64),
            np.round(sky2 + rng.normal(0, 12, r2r1.shape)).astype(np.int64))


def _all_saturated(r1, r2r1, satmap):
    # A saturated pixel reads its full well at read 1 and nothing more at read 2.
    full = np.floor(np.broadcast_to(satmap, r1.shape)).astype(np.int64)
    return full, np.zeros_like(r2r1)


def _blank(r1, r2r1, satmap):
    return np.zeros_like(r1), np.zeros_like(r2r1)


@pytest.fixture(scope="module")
def broken_scans(tmp_path_factory):
    """A tiny night with four more science scans: pure noise (4), all saturated (5), blank
    in H (6), no reference stars (7); scan 2 (cal) and 3 (sci) are good."""
    from gpu2mass.sim import SimulationRequest, simulate_night

    root = tmp_path_factory.mktemp("broken") / "night"
    simulate_night(root, SimulationRequest(preset="tiny", seed=11, scans=5))
    _rewrite_scan(root, 4, "JHK", _pure_noise)
    _rewrite_scan(root, 5, "JHK", _all_saturated)
    _rewrite_scan(root, 6, "H", _blank)
    # Scan 7 without reference stars: its telescope pointing was logged 3° north of where it
    # looked, where the night's reference catalog has no star (the catalog covers the
    # simulated fields only).
    _rewrite_scan(root, 7, "JHK", frames_fn=lambda f: {**f, "DEC_CMD": f["DEC_CMD"] + 3.0})
    out = tmp_path_factory.mktemp("broken_out") / "out"
    with warnings.catch_warnings():
        # Broken data warns on its way to failing (no sources on a frame, ...); here the
        # warnings are what a user would see, not errors.
        warnings.simplefilter("default")
        res = CliRunner().invoke(app, ["night", str(root), "--out", str(out), "--device", "cpu"])
    return root, out, res


@pytest.mark.slow
def test_broken_scans_fail_alone_with_a_reason(broken_scans):
    _root, out, res = broken_scans
    assert res.exit_code == 1, res.output
    run = json.loads((out / "run.json").read_text())
    status = {s["scan"]: s for s in run["scans"]}
    assert status[2]["status"] == status[3]["status"] == "ok"
    reasons = {4: "no usable single-frame detections", 5: "band J: every frame is saturated",
               6: "band H: no signal", 7: "no reference star"}
    for scan, pattern in reasons.items():
        assert status[scan]["status"] == "failed", status[scan]
        assert pattern in status[scan]["reason"], status[scan]["reason"]
        qa = json.loads((out / "scans" / f"{scan:03d}" / "qa.json").read_text())
        assert qa["status"] == "failed" and qa["reasons"]
        # Nothing of a failed scan but its QA record.
        assert [p.name for p in (out / "scans" / f"{scan:03d}").iterdir()] == ["qa.json"]
        assert not list((out / "atlas").glob(f"*_{scan:03d}_*"))
    for scan in (2, 3):
        d = out / "scans" / f"{scan:03d}"
        assert {p.name for p in d.iterdir()} >= {"pts.parquet", "frames.parquet", "qa.json"}
        assert len(list((out / "atlas").glob(f"*_{scan:03d}_*.fits"))) == 9
    assert not list(out.rglob("*.tmp")) and not (out / ".staging").exists()
    # The database holds the good scans' sources and every scan's row.
    con = duckdb.connect(str(out / "wdb.duckdb"), read_only=True)
    assert {r[0] for r in con.execute("select distinct scan from pts").fetchall()} == {2, 3}
    assert con.execute("select count(*) from scans").fetchone()[0] == 6
    con.close()


# ------------------------------------------------------------------- killed and resumed


def _product_digests(out: Path) -> dict[str, str]:
    """SHA-256 of every product file (run.json and the database are compared separately:
    run.json holds timings, a DuckDB file its own page layout)."""
    skip = {"run.json", "wdb.duckdb", "wdb.duckdb.wal"}
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in skip}


def _db_rows(out: Path) -> dict[str, list]:
    """Every table's rows, minus what differs between two runs by nature (timings, memory,
    the output directory's own path)."""
    varying = {"loaded_at", "seconds_total", "peak_host_memory_mb", "peak_device_memory_mb",
               "out_dir"}
    con = duckdb.connect(str(out / "wdb.duckdb"), read_only=True)
    try:
        rows = {}
        for table in ("pts", "scans", "atlas", "nights"):
            cols = [c[0] for c in con.execute(f"describe {table}").fetchall() if c[0] not in varying]
            got = con.execute(f"select {', '.join(cols)} from {table} order by all").fetchall()
            rows[table] = [tuple(v.replace(str(out), "OUT") if isinstance(v, str) else v for v in r)
                           for r in got]
        return rows
    finally:
        con.close()


def _run_until_killed(cmd, env, lines: int, delay_s: float) -> bool:
    """Start ``cmd``, read its progress lines (one per step, on stderr) and kill it
    ``delay_s`` after the ``lines``-th; returns whether it was killed before finishing."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            text=True)
    for seen, _ in enumerate(proc.stderr, start=1):
        if seen >= lines:
            break
    time.sleep(delay_s)
    killed = proc.poll() is None
    proc.kill()
    proc.communicate()
    return killed


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_products(tiny_night, processed_tiny, tmp_path):
    """Ten SIGKILLs at random moments, each followed by ``--resume``: the products equal
    those of the uninterrupted run (``processed_tiny``) byte for byte, the database row for
    row, and no temporary file is left."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "gpu2mass.cli.main", "night", str(tiny_night), "--out", str(out),
           "--device", "cpu", "--resume"]
    # Compiled kernels cached on disk for these short-lived processes (tmp dir: never stale).
    env = {**os.environ, "GPU2MASS_JIT_CACHE": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    n_lines = 2 * 14 + 9  # progress lines of a whole run: 2 scans × their steps + the night's
    rng = np.random.default_rng(20261124)
    kills = attempts = 0
    while kills < 10:
        attempts += 1
        assert attempts < 40, "the run keeps finishing before the kill"
        kills += _run_until_killed(cmd, env, int(rng.integers(1, n_lines)), float(rng.uniform(0, 1.5)))
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    assert not list(out.rglob("*.tmp")) and not (out / ".staging").exists()
    assert _product_digests(out) == _product_digests(processed_tiny)
    got, want = _db_rows(out), _db_rows(processed_tiny)
    for table in want:  # table by table, so that a failure names the table
        assert got[table] == want[table], table
    run = json.loads((out / "run.json").read_text())
    assert all(s["status"] == "ok" for s in run["scans"])


def test_loading_a_night_twice_keeps_the_same_rows(processed_tiny, tmp_path):
    from gpu2mass.wdb import load_night

    out = tmp_path / "out"
    shutil.copytree(processed_tiny, out)
    load_night(out)  # the copy's database, with the copy's paths
    before = _db_rows(out)
    load_night(out)
    load_night(out)
    assert _db_rows(out) == before
    assert len(before["pts"]) > 100


def test_atlas_headers_carry_the_calibrated_zero_point(processed_tiny, tiny_night):
    cal = json.loads((processed_tiny / "night" / "calibration.json").read_text())
    with fits.open(processed_tiny / "atlas" / "k_003_002.fits") as h:
        hdr = h[0].header
    for key in ("ORDATE", "TYPE", "SCANNO", "SCANDIR", "STRIP_ID", "FILTER", "MAGZP", "MAGZPERR",
                "SKYVAL", "SKYSIG", "SEESH", "SEEING", "NFRAMES", "M10"):
        assert key in hdr, key
    assert cal["status"] in ("calibrated", "instrumental")
    assert 0 < hdr["MAGZPERR"] < 0.1
    # M10 (from the images' noise and seeing) agrees with the depth the scan's measured
    # sources reach (QA's m10 from their SNRs, which runs ~0.1 mag deeper: faint SNRs are
    # slightly optimistic), band by band.
    qa = json.loads((processed_tiny / "scans" / "003" / "qa.json").read_text())
    for band in "jhk":
        m10 = np.median([fits.getheader(p)["M10"] for p in (processed_tiny / "atlas").glob(f"{band}_003_*.fits")])
        assert -0.3 < m10 - qa["bands"][band.upper()]["m10"] < 0.05, band
