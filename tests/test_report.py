"""The night's QA report: a self-contained page with its figures and the scans table, written
atomically; calibration, astrometry and validation optional."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest

from gpu2mass import report
from gpu2mass.errors import InputError
from gpu2mass.qa import failed_scan_qa
from gpu2mass.report import (
    render_night_report,
    write_night_report,
    write_night_report_from_products,
)

T0 = 51600.10


def frames_table(n=20, t0=T0):
    band = np.repeat(["J", "H", "K"], n)
    mjd = np.tile(t0 + np.arange(n) * 1.4 / 86400, 3)
    return {"band": band, "frame": np.tile(np.arange(n), 3), "mjd": mjd,
            "seeing_arcsec": np.full(3 * n, 2.6), "sky_dn": np.repeat([750.0, 2800.0, 1700.0], n)}


def ok_qa(scan):
    band = {"seeing_fwhm": 2.6, "m10": 15.9, "airglow_excess": 0.1, "astrometric_rms_arcsec": 0.08,
            "offset_ra_mas": 4.0, "offset_dec_mas": -2.0, "zp_residual_rms": 0.01}
    return {"scan": scan, "scan_type": "sci", "score": 10, "status": "ok", "reasons": [],
            "bands": {b: dict(band) for b in "JHK"}}


def calibration_dict():
    """calibration.json content as photcal writes it: a linear zero-point drift, 4 calibration
    scans and their standards."""
    rng = np.random.default_rng(1)
    bands = {}
    for b, zp in (("J", 20.95), ("H", 20.92), ("K", 19.88)):
        t = T0 + np.array([0.0, 0.02, 0.04, 0.06])
        c1 = 0.01 + 0.02 * (t - T0) * 24
        std_t = np.repeat(t, 15)
        bands[b] = {"band": b, "status": "calibrated", "zp_inst": zp, "c2": 0.1, "c2_err": 0.0, "c2_fitted": False,
                    "form": "linear", "coefficients": [0.01, 0.02], "covariance": [[1e-6, 0.0], [0.0, 1e-6]],
                    "t_ref_mjd": T0, "t_span_hours": [0.0, 1.44], "residual_rms": 0.03, "scan_residual_rms": 0.005,
                    "scans": [{"scan": i + 2, "mjd": float(ti), "c1": float(ci), "c1_err": 0.004, "used": True}
                              for i, (ti, ci) in enumerate(zip(t, c1, strict=True))],
                    "standards": {"scan": np.repeat(np.arange(2, 6), 15).tolist(), "mjd": std_t.tolist(),
                                  "residual": (res := rng.normal(0, 0.03, std_t.size)).tolist(),
                                  "used": (np.abs(res) < 0.08).tolist()}}
    return {"status": "calibrated", "reasons": [], "bands": bands}


def validation_dict():
    m = np.arange(10.0, 17.0, 0.5)
    comp = lambda m50: [{"lo": float(x), "hi": float(x + 0.5), "n": 50,
                         "completeness": float(1 / (1 + np.exp((x + 0.25 - m50) / 0.2)))} for x in m]
    return {"bands": {b: {"completeness": {"curve": comp(m50), "m10": m50 - 0.5, "levels": {"m99": m50 - 1}}}
                      for b, m50 in (("J", 16.3), ("H", 15.6), ("K", 14.8))}}


def pngs(text):
    return [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_report_has_figures_and_scans_table(tmp_path):
    scans = [ok_qa(14), failed_scan_qa(15, "sci", "frame calibration: <all> frames saturated")]
    path = write_night_report(tmp_path, night="2000-03-01", scans_qa=scans, calibration=calibration_dict(),
                              frames={14: frames_table(), 15: frames_table(t0=T0 + 0.01)}, astrometry={"status": "solved"},
                              validation=validation_dict())
    assert path == tmp_path / "night" / "qa.html"
    text = path.read_text()
    # Self-contained: four figures embedded as PNG, nothing fetched from elsewhere.
    images = pngs(text)
    assert len(images) == 4 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in images)
    assert "http" not in text and "<script" not in text
    for title in ("Zero point vs time", "Seeing and background vs time", "Depth and astrometry per scan",
                  "Completeness vs magnitude"):
        assert f"<h2>{title}" in text
    # The scans table: one row per scan, status classes, reasons escaped.
    table = text[text.index('<table id="scans">'):text.index("</table>")]
    assert table.count("<tr class=") == 2
    assert '<tr class="ok"><td>14</td><td>sci</td><td>10</td>' in table
    assert '<tr class="failed"><td>15</td><td>sci</td><td>0</td>' in table
    assert "frame calibration: &lt;all&gt; frames saturated" in table
    assert "2 scans: 1 ok, 0 degraded, 1 failed" in text
    # Atomic write: nothing but the report in night/.
    assert [p.name for p in (tmp_path / "night").iterdir()] == ["qa.html"]


def test_report_without_calibration_astrometry_or_validation():
    text = render_night_report(night="2000-03-01", scans_qa=[ok_qa(3)], calibration=None, frames={3: frames_table()},
                               astrometry=None)
    assert len(pngs(text)) == 2  # seeing/background and per-scan depth; no zero points, no completeness
    assert "No photometric calibration for this night" in text
    assert "No validation against truth" in text
    assert "Photometric calibration: none. Astrometric solution: none." in text


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_zero_point_curve_is_the_calibrations_fit(monkeypatch, layout):
    """The drawn curve is zp_inst + c1(t) of photcal's solution (linear here), over the scans' span."""
    drawn = {}
    from matplotlib.axes import Axes

    original = Axes.plot

    def spy(self, x, y, *args, **kw):
        if str(kw.get("label", "")).startswith("fit"):
            drawn[self.get_title() or len(drawn)] = (np.asarray(x), np.asarray(y), kw["label"])
        return original(self, x, y, *args, **kw)

    monkeypatch.setattr(Axes, "plot", spy)
    monkeypatch.setattr(report, "_png", lambda fig: "drawn")  # the curve's data is the point here
    cal = calibration_dict()
    if layout == "rows":  # calibration.json's earlier layout: one dict per standard
        for c in cal["bands"].values():
            cols = c["standards"]
            c["standards"] = [dict(zip(cols, v, strict=True)) for v in zip(*cols.values(), strict=True)]
    _title, png = report._zero_point_figure(cal)
    assert png is not None and len(drawn) == 3
    for x, y, label in drawn.values():
        assert label == "fit (linear)"
        hours = x - (T0 % 1) * 24
        zp = y - y[0] + 0.01  # the J/H/K zp_inst differ; the shape is c1
        assert np.allclose(zp, 0.01 + 0.02 * hours, atol=1e-9)
        assert hours[0] == pytest.approx(0.0) and hours[-1] == pytest.approx(1.44)


def test_interrupted_write_keeps_the_previous_report(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_png", lambda fig: "")  # figures are not the point here
    path = write_night_report(tmp_path, night="n", scans_qa=[ok_qa(3)], calibration=None, frames={}, astrometry=None)
    before = path.read_bytes()

    def broken(self, text, encoding=None):
        Path.write_bytes(self, text.encode()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        write_night_report(tmp_path, night="n", scans_qa=[ok_qa(3), ok_qa(4)], calibration=None, frames={},
                           astrometry=None)
    assert path.read_bytes() == before
    assert [p.name for p in (tmp_path / "night").iterdir()] == ["qa.html"]


def test_report_redrawn_from_products_with_validation(tmp_path, monkeypatch):
    """``gpu2mass validate`` re-draws the report from qa.json, frames.parquet and
    calibration.json, adding the completeness figure."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(InputError, match="no scans/<scan>/qa.json"):
        write_night_report_from_products(tmp_path)
    for s in (2, 14):
        d = tmp_path / "scans" / f"{s:03d}"
        d.mkdir(parents=True)
        (d / "qa.json").write_text(json.dumps(ok_qa(s)))
        pq.write_table(pa.table(frames_table()), d / "frames.parquet")
    (tmp_path / "night").mkdir()
    (tmp_path / "night" / "calibration.json").write_text(json.dumps(calibration_dict()))
    (tmp_path / "run.json").write_text(json.dumps({"night": "2000-03-01"}))
    seen = {}
    monkeypatch.setattr(report, "_png", lambda fig: seen.setdefault(len(seen), "x") and "")
    path = write_night_report_from_products(tmp_path, validation=validation_dict())
    text = path.read_text()
    assert len(seen) == 4  # zero points, seeing/background, per scan, completeness
    assert "<h1>Night 2000-03-01: quality report</h1>" in text
    assert "2 scans: 2 ok" in text and "Photometric calibration: calibrated" in text
