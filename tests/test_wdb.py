"""The working database (gpu2mass.wdb): loading a processed night into DuckDB, querying it.

Every test builds a small processed-night directory by hand (run.json with a failed scan and
a scan that QA failed, pts/frames Parquet, qa.json, calibration.json, tiny Atlas FITS) whose
content is known exactly, and checks what the database holds against it.
"""

from __future__ import annotations

import csv
import io
import json
import math

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu2mass import wdb
from gpu2mass.errors import InputError, StepError

NIGHT = "2001-06-01"
#: scan -> (type, run.json status, QA status, number of pts rows)
SCANS = {21: ("cal", "ok", "ok", 7), 22: ("sci", "ok", "degraded", 11),
         23: ("sci", "failed", "failed", 0), 24: ("sci", "ok", "failed", 5)}
ATLAS_SHAPE = (8, 16)  # NAXIS1, NAXIS2
PIXEL_DEG = 1.0 / 3600.0


def _pts(scan: int, n: int, rng) -> pa.Table:
    """pts rows with the types the pipeline writes: doubles with nulls, flag strings, an
    int32 scan, an int64 healpix index beyond 2**53 and a column null in every row."""
    j_m = rng.uniform(8, 16, n)
    j_null = np.arange(n) % 3 == 0
    return pa.table({
        "ra": pa.array(rng.uniform(10, 11, n)), "dec": pa.array(rng.uniform(-5, -4, n)),
        "designation": pa.array([f"0040{i:05d}-0430{scan:03d}" for i in range(n)]),
        "j_m": pa.array(j_m, mask=j_null),
        "ph_qual": pa.array(["AAU" if u else "AAA" for u in j_null]),
        "mp_flg": pa.nulls(n),
        "hemis": pa.array(["s"] * n),
        "scan": pa.array([scan] * n, pa.int32()),
        "pts_key": pa.array(scan * 1_000_000 + np.arange(n), pa.int64()),
        "healpix_29": pa.array(2**60 + scan * 1000 + np.arange(n, dtype=np.int64), pa.int64()),
    })


def _qa(scan: int, status: str) -> dict:
    qa = {"scan": scan, "score": 10.0 if status == "ok" else 1.0, "status": status,
          "bands": {b: {"seeing_fwhm": 2.5 + 0.1 * i + 0.01 * scan, "m10": 15.0 - i,
                        "n_sources": 100 + i, "astrometric_rms_arcsec": None}
                    for i, b in enumerate("JHK")}}
    # As gpu2mass.qa writes them: a scan's own time span, score factors (null when failed).
    qa["scan_type"] = SCANS[scan][0]
    qa["mjd_start"] = None if status == "failed" else 1.0
    qa["factors"] = None if status == "failed" else {"seeing": 10, "airglow": 1}
    if status != "ok":
        qa["reasons"] = [f"scan {scan}: seeing too broad", "background high"]
    return qa


def _write_atlas(path, *, scan: int, band: str, crval: tuple[float, float], magzp: float):
    from astropy.io import fits

    nx, ny = ATLAS_SHAPE
    h = fits.Header()
    h["TYPE"], h["SCANNO"], h["SCANDIR"], h["FILTER"] = "sci", scan, "n", band.lower()
    h["CTYPE1"], h["CTYPE2"] = "RA---SIN", "DEC--SIN"
    h["CRPIX1"], h["CRPIX2"] = (nx + 1) / 2, (ny + 1) / 2
    h["CRVAL1"], h["CRVAL2"] = crval
    h["CDELT1"], h["CDELT2"] = -PIXEL_DEG, PIXEL_DEG
    h["RADESYS"], h["EQUINOX"] = "ICRS", 2000.0
    h["MAGZP"], h["MAGZPERR"], h["SEEING"], h["NFRAMES"], h["M10"] = magzp, 0.01, 2.6, 7, 15.2
    h["ORDATE"] = "010601"
    fits.PrimaryHDU(np.zeros((ny, nx), np.float32), header=h).writeto(path)


def make_out(root, *, night: str = NIGHT, observatory: str = "s", seed: int = 1,
             pts_hook=None):
    """A processed-night directory with :data:`SCANS`; returns ``(root, {scan: pts table})``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tables = {}
    run_scans = []
    for scan, (kind, run_status, qa_status, n) in SCANS.items():
        d = root / "scans" / f"{scan:03d}"
        d.mkdir(parents=True)
        run_scans.append({"scan": scan, "type": kind, "status": run_status,
                          "reason": "StepError: no frames registered" if run_status == "failed"
                          else None, "qa_status": qa_status})
        (d / "qa.json").write_text(json.dumps(_qa(scan, qa_status)))
        if run_status == "failed":
            continue
        t = _pts(scan, n, rng)
        if pts_hook is not None:
            t = pts_hook(scan, t)
        pq.write_table(t, d / "pts.parquet")
        tables[scan] = t
        bands = np.repeat(["J", "H", "K"], 4)
        frame = np.tile(np.arange(4), 3)
        pq.write_table(pa.table({
            "band": bands, "frame": frame, "mjd": 52061.1 + 0.001 * scan + 1e-4 * frame,
            "ra": np.full(12, 359.9 + 0.1 * (frame % 2)) % 360.0,  # straddles RA 0
            "dec": np.full(12, -4.5), "airmass": 1.0 + 0.01 * frame}), d / "frames.parquet")
    (root / "atlas").mkdir()
    for scan in (21, 22):
        for img in (1, 2):
            for b, zp in zip("JHK", (20.9, 20.8, 19.9)):
                _write_atlas(root / "atlas" / f"{b.lower()}_{scan:03d}_{img:03d}.fits",
                             scan=scan, band=b, crval=(10.0 + 0.01 * img, -4.5 + 0.1 * img),
                             magzp=zp + 0.001 * img)
    (root / "night").mkdir()
    (root / "night" / "calibration.json").write_text(json.dumps({
        "status": "calibrated", "reasons": ["K: 2 standards clipped"],
        "bands": {b: {"band": b, "form": "linear", "c2": c2, "residual_rms": 0.012,
                      "residuals": [{"field": "f1", "resid": 0.01}]}
                  for b, c2 in zip("JHK", (0.109, 0.031, 0.061))}}))
    (root / "run.json").write_text(json.dumps({
        "gpu2mass": {"gpu2mass": "0.1.0", "numpy": "2.0"}, "device": "cpu",
        "night": "/nonexistent/raw", "night_date": night, "observatory": observatory,
        "manifest_sha256": "ab" * 32, "config": {"psc": {"edge_margin_arcsec": 10.0}},
        "calibration": "calibrated", "seconds": {"total": 12.5}, "exit_status": 1,
        "scans": run_scans}))
    return root, tables


def snapshot(db) -> dict:
    """Every table's rows, sorted, with its column names and types."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {}
        for t in wdb.TABLES:
            cols = con.execute(f'DESCRIBE "{t}"').fetchall()
            rows = con.execute(f'SELECT * FROM "{t}"').fetchall()
            out[t] = (cols, sorted(rows, key=repr))
        return out
    finally:
        con.close()


def query(db, sql, params=()):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


@pytest.fixture
def loaded(tmp_path):
    out, tables = make_out(tmp_path / "out")
    counts = wdb.load_night(out)
    return out, out / wdb.DB_NAME, tables, counts


def test_load_counts_and_reload_leaves_same_rows(loaded):
    out, db, tables, counts = loaded
    loaded_scans = [s for s, v in SCANS.items() if v[2] != "failed"]
    assert counts == {"nights": 1, "scans": 4, "atlas": 12, "xsc": 0,
                      "pts": sum(tables[s].num_rows for s in loaded_scans)}
    first = snapshot(db)
    assert wdb.load_night(out) == counts
    assert snapshot(db) == first


def test_failed_scans_only_in_scans_table(loaded):
    _out, db, _tables, _ = loaded
    per_scan = dict(query(db, "SELECT scan, count(*) FROM pts GROUP BY scan"))
    assert per_scan == {21: 7, 22: 11}  # 23 failed in the run, 24 failed its QA
    rows = {r[0]: r[1:] for r in query(
        db, "SELECT scan, type, status, run_status, reason, loaded, n_pts, reasons FROM scans")}
    assert set(rows) == set(SCANS)
    for scan, (kind, run_status, qa_status, n) in SCANS.items():
        assert rows[scan][:3] == (kind, qa_status, run_status)
        assert rows[scan][4] is (qa_status != "failed")
        assert rows[scan][5] == (n if qa_status != "failed" else 0)
    assert rows[23][3] == "StepError: no frames registered"
    assert rows[22][6] == ["scan 22: seeing too broad", "background high"]
    assert rows[21][6] is None


def test_pts_values_and_types_preserved(loaded):
    _, db, tables, _ = loaded
    types = {r[0]: r[1] for r in query(db, "DESCRIBE pts")}
    assert types["night"] == "VARCHAR" and types["designation"] == "VARCHAR"
    assert types["scan"] == "INTEGER" and types["healpix_29"] == "BIGINT"
    assert types["mp_flg"] == "INTEGER"  # null everywhere: the PSC's type
    assert types["j_m"] == "DOUBLE"
    for scan in (21, 22):
        t = tables[scan]
        got = query(db, "SELECT pts_key, healpix_29, j_m, designation, night, hemis, mp_flg "
                        "FROM pts WHERE scan = ? ORDER BY pts_key", [scan])
        assert [g[0] for g in got] == t["pts_key"].to_pylist()
        assert [g[1] for g in got] == t["healpix_29"].to_pylist()  # exact beyond 2**53
        assert [g[2] for g in got] == t["j_m"].to_pylist()  # nulls stay nulls
        assert sum(g[2] is None for g in got) == t["j_m"].null_count > 0
        assert [g[3] for g in got] == t["designation"].to_pylist()
        assert {(g[4], g[5], g[6]) for g in got} == {(NIGHT, "s", None)}


def test_xsc_table_without_files_has_spec_columns(loaded, tmp_path):
    _, db, _, _ = loaded
    cols = {r[0]: r[1] for r in query(db, "DESCRIBE xsc")}
    for c in ("night", "hemis", "scan", "ra", "dec", "healpix_29", "r_k20fe", "k_m_k20fe",
              "j_flg_k20fe", "h_m_25", "e_score", "density", "jdate"):
        assert c in cols
    assert cols["healpix_29"] == "BIGINT" and cols["cc_flg"] == "VARCHAR"
    assert query(db, "SELECT count(*) FROM xsc") == [(0,)]

    # With an xsc.parquet in a loaded scan and one in a QA-failed scan.
    out2, _ = make_out(tmp_path / "out2")
    for scan in (22, 24):
        pq.write_table(pa.table({"ra": [1.0, 2.0], "dec": [3.0, 4.0],
                                 "scan": pa.array([scan] * 2, pa.int32()),
                                 "healpix_29": pa.array([5, 6], pa.int64())}),
                       out2 / "scans" / f"{scan:03d}" / "xsc.parquet")
    counts = wdb.load_night(out2)
    assert counts["xsc"] == 2
    assert query(out2 / wdb.DB_NAME, "SELECT night, scan, ra, healpix_29 FROM xsc ORDER BY ra") \
        == [(NIGHT, 22, 1.0, 5), (NIGHT, 22, 2.0, 6)]
    assert query(out2 / wdb.DB_NAME, "SELECT n_xsc FROM scans WHERE scan = 22") == [(2,)]


def test_scans_qa_figures_frames_and_zero_points(loaded):
    _out, db, _, _ = loaded
    row = query(db, "SELECT score, j_seeing_fwhm, h_m10, k_n_sources, j_astrometric_rms_arcsec,"
                    " qa, mjd_start, mjd_end, airmass, ra, dec, n_frames, j_magzp, h_magzperr,"
                    " k_n_atlas FROM scans WHERE scan = 22")[0]
    qa = _qa(22, "degraded")
    assert row[0] == 1.0
    assert row[1] == qa["bands"]["J"]["seeing_fwhm"]
    assert row[2] == qa["bands"]["H"]["m10"]
    assert row[3] == qa["bands"]["K"]["n_sources"]
    assert row[4] is None
    assert json.loads(row[5]) == qa
    assert row[6] == pytest.approx(52061.1 + 0.022) and row[7] == pytest.approx(52061.1 + 0.0223)
    assert row[8] == pytest.approx(1.015)
    # Frames at RA 359.9 and 0.0: the mean pointing is near 359.95, not 180.
    assert (row[9] - 359.95) % 360.0 == pytest.approx(0.0, abs=1e-6)
    assert row[10] == pytest.approx(-4.5)
    assert row[11] == 4
    assert row[12] == pytest.approx(20.9015)  # median of the scan's two J images
    assert row[13] == pytest.approx(0.01)
    assert row[14] == 2
    # QA figures beside the loader's own: the frames' time span wins, factors flattened.
    cols = {r[0] for r in query(db, "DESCRIBE scans")}
    assert {"scan_type", "factors_seeing", "factors_airglow"} <= cols
    assert not {"factors", "qa_mjd_start"} & cols
    assert query(db, "SELECT factors_airglow, scan_type FROM scans WHERE scan = 21") == [(1, "cal")]
    failed = query(db, "SELECT j_magzp, mjd_start, j_seeing_fwhm FROM scans WHERE scan = 23")[0]
    assert failed[:2] == (None, None) and failed[2] == _qa(23, "failed")["bands"]["J"]["seeing_fwhm"]


def test_atlas_rows_centre_and_corners(loaded):
    """Centre and corners against the SIN projection worked out by hand: an azimuthal
    projection keeps, at its tangent point, the true distance as arcsin of the projected
    radius and the true position angle."""
    from astropy.coordinates import SkyCoord

    out, db, _, _ = loaded
    rows = query(db, "SELECT scan, band, image, path, magzp, magzperr, seeing, nframes, m10, "
                     "ordate, scandir, strip_id, ra, dec, ra1, dec1, ra2, dec2, ra3, dec3, "
                     "ra4, dec4 FROM atlas ORDER BY scan, band, image")
    assert len(rows) == 12
    nx, ny = ATLAS_SHAPE
    # Pixel-edge offsets of the corners from the centre, east (xi) and north (eta), degrees:
    # (1,1) is south-east (CDELT1 < 0 puts east to the left), then anticlockwise.
    half_x, half_y = nx / 2 * PIXEL_DEG, ny / 2 * PIXEL_DEG
    corners = [(half_x, -half_y), (-half_x, -half_y), (-half_x, half_y), (half_x, half_y)]
    for r in rows:
        scan, band, img = r[0], r[1], r[2]
        assert r[3] == str(out.resolve() / "atlas" / f"{band.lower()}_{scan:03d}_{img:03d}.fits")
        assert r[4] == pytest.approx({"J": 20.9, "H": 20.8, "K": 19.9}[band] + 0.001 * img)
        assert r[5:12] == (0.01, 2.6, 7, 15.2, "010601", "n", None)
        centre = SkyCoord(10.0 + 0.01 * img, -4.5 + 0.1 * img, unit="deg")
        assert r[12] == pytest.approx(centre.ra.deg, abs=1e-10)
        assert r[13] == pytest.approx(centre.dec.deg, abs=1e-10)
        for i, (xi, eta) in enumerate(corners):
            c = SkyCoord(r[14 + 2 * i], r[15 + 2 * i], unit="deg")
            dist = math.degrees(math.asin(math.radians(math.hypot(xi, eta))))
            assert centre.separation(c).deg == pytest.approx(dist, abs=1e-9)
            pa_true = math.degrees(math.atan2(xi, eta)) % 360.0
            assert centre.position_angle(c).deg == pytest.approx(pa_true, abs=1e-4)


def test_nights_row(loaded):
    out, db, _, counts = loaded
    row = query(db, "SELECT night, hemis, manifest_sha256, device, gpu2mass_version, "
                    "calibration_status, exit_status, n_scans, n_scans_loaded, n_scans_failed, "
                    "n_pts, n_atlas, seconds_total, calibration, j_cal_c2, k_cal_form, "
                    "h_cal_residual_rms, config, out_dir, calibration_reasons FROM nights")
    assert len(row) == 1
    r = row[0]
    assert r[:13] == (NIGHT, "s", "ab" * 32, "cpu", "0.1.0", "calibrated", 1, 4, 2, 2,
                      counts["pts"], 12, 12.5)
    assert json.loads(r[13]) == json.loads((out / "night" / "calibration.json").read_text())
    assert r[14:17] == (0.109, "linear", 0.012)
    assert json.loads(r[17]) == {"psc": {"edge_margin_arcsec": 10.0}}
    assert r[18] == str(out.resolve())
    assert r[19] == ["K: 2 standards clipped"]
    assert "j_cal_band" not in {c[0] for c in query(db, "DESCRIBE nights")}


def test_failure_mid_load_leaves_previous_content(loaded, monkeypatch):
    out, db, _, _ = loaded
    before = snapshot(db)
    # A new version of the products: the first scan read succeeds, the second raises.
    pq.write_table(_pts(21, 3, np.random.default_rng(9)), out / "scans" / "021" / "pts.parquet")
    real = wdb._read_scan_table
    calls = []

    def flaky(out_dir, scan, kind):
        calls.append((scan, kind))
        if len(calls) == 2:
            raise OSError("disk vanished")
        return real(out_dir, scan, kind)

    monkeypatch.setattr(wdb, "_read_scan_table", flaky)
    with pytest.raises(OSError, match="disk vanished"):
        wdb.load_night(out)
    assert len(calls) == 2
    assert snapshot(db) == before
    monkeypatch.undo()
    assert wdb.load_night(out)["pts"] == 3 + 11


def test_database_error_is_a_step_error_and_changes_nothing(loaded, tmp_path):
    _out, db, _, _ = loaded
    before = snapshot(db)

    def text_healpix(scan, t):  # a column whose type conflicts with the stored one
        i = t.schema.get_field_index("healpix_29")
        return t.set_column(i, "healpix_29", pa.array(["x"] * t.num_rows))

    other, _ = make_out(tmp_path / "other", night="2001-06-02", pts_hook=text_healpix)
    with pytest.raises(StepError, match="2001-06-02.*unchanged"):
        wdb.load_night(other, db)
    assert snapshot(db) == before


def test_nights_share_a_database_and_schemas_evolve(loaded, tmp_path):
    out, db, _tables, _ = loaded

    def evolve(scan, t):  # night B: one more column, one less, an integer column widened
        t = t.drop_columns(["designation"]).append_column("new_col", pa.array([1.5] * t.num_rows))
        return t.set_column(t.schema.get_field_index("pts_key"), "pts_key",
                            pa.array(np.arange(t.num_rows) + 0.5))

    other, _tables_b = make_out(tmp_path / "b", night="2001-06-02", seed=2, pts_hook=evolve)
    wdb.load_night(other, db)
    # The same UT date seen from the other hemisphere is a different night.
    north, _tables_n = make_out(tmp_path / "n", observatory="n", seed=3)
    wdb.load_night(north, db)
    nights = query(db, "SELECT night, hemis, count(*) FROM pts GROUP BY 1, 2 ORDER BY 1, 2")
    assert nights == [(NIGHT, "n", 18), (NIGHT, "s", 18), ("2001-06-02", "s", 18)]
    assert query(db, "SELECT count(*) FROM scans") == [(12,)]
    assert query(db, "SELECT count(*) FROM pts WHERE night = ? AND (new_col IS NOT NULL OR "
                     "designation IS NULL)", [NIGHT]) == [(0,)]
    got = query(db, "SELECT pts_key, new_col, designation FROM pts WHERE night = '2001-06-02' "
                    "AND scan = 22 ORDER BY pts_key")
    assert [g[0] for g in got] == list(np.arange(11) + 0.5)  # widened, not rounded
    assert {(g[1], g[2]) for g in got} == {(1.5, None)}
    # Reloading night A replaces only its own rows.
    others = query(db, "SELECT * FROM pts WHERE NOT (night = ? AND hemis = 's') ORDER BY "
                       "night, hemis, pts_key", [NIGHT])
    wdb.load_night(out, db)
    assert query(db, "SELECT * FROM pts WHERE NOT (night = ? AND hemis = 's') ORDER BY "
                     "night, hemis, pts_key", [NIGHT]) == others
    assert query(db, "SELECT count(*) FROM pts WHERE night = ? AND hemis = 's'", [NIGHT]) \
        == [(18,)]


def test_night_identity_from_the_raw_manifest(tmp_path):
    out, _ = make_out(tmp_path / "out")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "night.json").write_text(json.dumps({"night": "1999-12-31", "observatory": "n"}))
    run = json.loads((out / "run.json").read_text())
    del run["night_date"], run["observatory"]
    run["night"] = str(raw)
    (out / "run.json").write_text(json.dumps(run))
    wdb.load_night(out)
    assert query(out / wdb.DB_NAME, "SELECT night, hemis FROM nights") == [("1999-12-31", "n")]
    run["night"] = str(tmp_path / "gone")
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(InputError, match="night_date"):
        wdb.load_night(out)
    with pytest.raises(InputError, match="run.json"):
        wdb.load_night(tmp_path / "empty")


def test_flatten_qa_shapes():
    flat = wdb._flatten_qa({"scan": 3, "J": {"m10": 15.0, "seeing fwhm": float("nan")},
                            "calibration": {"K": {"zp_offset": 0.1}}, "reasons": [],
                            "tests": [1, 2]})
    assert flat == {"scan": 3, "j_m10": 15.0, "j_seeing_fwhm": None,
                    "calibration_k_zp_offset": 0.1, "reasons": [], "tests": "[1, 2]"}


def test_run_query_formats(loaded, tmp_path):
    out, db, _tables, _ = loaded
    sql = "SELECT scan, pts_key, j_m, ph_qual FROM pts ORDER BY pts_key"
    expected = query(db, sql)

    text = wdb.run_query(out, sql, max_rows=6)  # the output directory finds wdb.duckdb
    lines = text.splitlines()
    assert lines[0].split() == ["scan", "pts_key", "j_m", "ph_qual"]
    assert set(lines[1]) == {"-", " "}
    assert lines[-1] == "(18 rows)"
    assert "... 12 more rows ..." in lines
    body = [ln for ln in lines[2:-1] if not ln.startswith("...")]
    assert len(body) == 6
    assert body[0].split()[1] == str(expected[0][1])
    assert body[-1].split()[1] == str(expected[-1][1])
    assert "NULL" in text  # j_m of every third row
    # Numbers right-aligned: every line of the body ends its pts_key column at one place.
    ends = {ln.index(str(r[1])) + len(str(r[1])) for ln, r in zip(body, expected[:3])}
    assert len(ends) == 1

    got = list(csv.reader(io.StringIO(wdb.run_query(db, sql, fmt="csv"))))
    assert got[0] == ["scan", "pts_key", "j_m", "ph_qual"]
    assert len(got) == 19
    for g, e in zip(got[1:], expected):
        assert (int(g[0]), int(g[1]), None if g[2] == "" else float(g[2]), g[3]) == e

    path = wdb.run_query(db, sql, fmt="parquet", output=tmp_path / "q.parquet")
    t = pq.read_table(path)
    assert t.schema.field("pts_key").type == pa.int64()
    assert [tuple(r.values()) for r in t.to_pylist()] == expected

    assert wdb.run_query(db, "SELECT reasons FROM scans WHERE scan = 22").splitlines()[2] \
        == "[scan 22: seeing too broad, background high]"[:40 - 3] + "..."


def test_run_query_errors(loaded, tmp_path):
    _out, db, _, _ = loaded
    with pytest.raises(InputError, match="no working database"):
        wdb.run_query(tmp_path / "nothing.duckdb", "SELECT 1")
    with pytest.raises(InputError, match="output"):
        wdb.run_query(db, "SELECT 1", fmt="parquet")
    with pytest.raises(InputError, match="unknown query format"):
        wdb.run_query(db, "SELECT 1", fmt="json")
    with pytest.raises(InputError, match="query failed"):
        wdb.run_query(db, "SELECT * FROM no_such_table")
    with pytest.raises(InputError, match="read-only"):
        wdb.run_query(db, "DELETE FROM pts")
    assert query(db, "SELECT count(*) FROM pts") == [(18,)]


def test_database_held_elsewhere_is_a_step_error(loaded):
    out, db, _, _ = loaded
    before = snapshot(db)
    holder = duckdb.connect(str(db), read_only=True)  # a reader with another configuration
    try:
        with pytest.raises(StepError, match="cannot open the working database"):
            wdb.load_night(out)
    finally:
        holder.close()
    assert snapshot(db) == before


def test_pipeline_database_holds_its_products(processed_tiny, tmp_path):
    """``gpu2mass night`` loads its own products: every loaded scan's pts rows with their
    values, every scan, every Atlas Image; a fresh load elsewhere gives the same tables."""
    out = processed_tiny
    db = out / wdb.DB_NAME
    run = json.loads((out / "run.json").read_text())
    assert query(db, "SELECT count(*) FROM scans") == [(len(run["scans"]),)]
    assert query(db, "SELECT count(*) FROM atlas") == [(len(list(out.glob("atlas/*.fits"))),)]
    n_loaded = 0
    for item in run["scans"]:
        scan = item["scan"]
        qa = json.loads((out / "scans" / f"{scan:03d}" / "qa.json").read_text())
        got = query(db, "SELECT pts_key, j_m, k_m, ph_qual, designation FROM pts WHERE scan = ?"
                        " ORDER BY pts_key", [scan])
        status = query(db, "SELECT status FROM scans WHERE scan = ?", [scan])
        assert status == [(qa["status"],)]
        if qa["status"] == "failed":
            assert got == []
            continue
        t = pq.read_table(out / "scans" / f"{scan:03d}" / "pts.parquet").sort_by("pts_key")
        assert got == list(zip(*(t[c].to_pylist()
                                 for c in ("pts_key", "j_m", "k_m", "ph_qual", "designation"))))
        n_loaded += 1
    assert n_loaded > 0
    copy = tmp_path / "copy.duckdb"
    wdb.load_night(out, copy)
    assert snapshot(copy) == snapshot(db)
