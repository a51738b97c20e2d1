"""The night's quality report, ``night/qa.html`` (products spec section 1, facts sheet 9).

One self-contained HTML page (figures are PNGs embedded as base64, no external files or
scripts) that a person reads to decide whether the night is good:

- a table of scans: type, score, status, the figures that decide the score and the reasons;
- zero point vs time per band: each calibration scan's zero point with its error, the
  night's fitted curve and, below, every standard's residual about it (from the content of
  ``night/calibration.json``, :mod:`gpu2mass.photcal`);
- seeing (FWHM) and frame background vs time, per band, from the scans' frames tables;
- m10 per scan, per band, against the 10σ Level-1 limits;
- astrometric rms and mean offsets per scan against the reference catalog;
- when ``validation`` is given (``gpu2mass validate``, which knows the simulated truth):
  completeness vs magnitude per band. The pipeline itself never reads truth.

Figures are drawn with Matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), five at most, so a report costs about a second.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gpu2mass.io._atomic import atomic_path

__all__ = ["render_night_report", "write_night_report", "write_night_report_from_products"]

BANDS = ("J", "H", "K")
_COLORS = {"J": "#1f77b4", "H": "#2ca02c", "K": "#d62728"}
#: 10σ Level-1 limits (facts sheet 11), drawn on the m10 figure.
_M10_LIMIT = {"J": 15.8, "H": 15.1, "K": 14.3}


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _legend(ax, **kw) -> None:
    """A legend when the axes have labelled artists (a night may lack a kind of data)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _figure(nrows: int, ncols: int, size: tuple[float, float], **kw):
    from matplotlib.figure import Figure

    # Fixed margins, in inches, instead of matplotlib's constrained layout: the layout
    # engine draws every figure twice and tripled the report's share of the night phase.
    # The margins hold a y label with its tick labels (left), a title (top) and the x label
    # (bottom); the gaps hold the next column's y label and the next row's title.
    fig = Figure(figsize=size)
    width, height = size
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.5 / height,
                        top=1 - 0.35 / height, wspace=0.38, hspace=0.35)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def _band_entry(mapping: Mapping | None, band: str):
    if not mapping:
        return None
    for key in (band, band.lower(), "Ks" if band == "K" else band, "k" if band == "K" else band.lower()):
        if key in mapping:
            return mapping[key]
    return None


def _column(table, name) -> np.ndarray | None:
    try:
        c = table[name]
    except (KeyError, ValueError, TypeError, IndexError):
        return None
    if hasattr(c, "to_pylist") and not isinstance(c, np.ndarray):
        c = c.to_pylist()
    elif np.ma.isMaskedArray(c) or hasattr(c, "mask"):
        c = np.ma.asarray(c).astype(object).filled(None)
    return np.asarray(c, dtype=object)


def _floats(a) -> np.ndarray:
    return np.array([math.nan if v is None else _num(v) for v in a], float)


def _records_columns(obj, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns ``names`` of rows given either as a list of dicts or as a dict of columns
    (calibration.json has used both); missing columns are all None."""
    if isinstance(obj, Mapping):
        n = max((len(v) for v in obj.values() if isinstance(v, Sequence | np.ndarray)), default=0)
        return {k: np.asarray(obj[k], dtype=object) if k in obj else np.full(n, None, dtype=object)
                for k in names}
    rows = [r for r in (obj or ()) if isinstance(r, Mapping)]
    return {k: np.array([r.get(k) for r in rows], dtype=object) for k in names}


# ----------------------------------------------------------------------------------------
# Figures. Each returns (title, base64 PNG) or (title, None, note) when it has nothing to draw.


def _zero_point_figure(calibration: Mapping | None):
    """Zero point vs time per band: calibration scans, fitted curve, standards' residuals.

    Reads ``calibration["bands"][band]`` as written by :meth:`gpu2mass.photcal.NightCalibration.to_dict`:
    ``status``, ``zp_inst``, ``scans`` (rows with ``mjd``, ``c1``, ``c1_err``, ``used``),
    ``standards`` (``mjd``, ``residual``, ``used``: a dict of columns or a list of rows) and
    the fit, evaluated through
    :class:`gpu2mass.photcal.BandCalibration` (``c1(mjd)``). Missing pieces are skipped.
    """
    title = "Zero point vs time"
    if not calibration or not isinstance(calibration.get("bands"), Mapping) or not calibration["bands"]:
        return title, None, "No photometric calibration for this night: magnitudes are instrumental."
    bands = [b for b in BANDS if _band_entry(calibration["bands"], b)]
    fig, ax = _figure(2, len(bands), (4.2 * len(bands), 5.2), sharex="col")
    drew = False
    for k, b in enumerate(bands):
        cal = _band_entry(calibration["bands"], b)
        zp_inst = _num(cal.get("zp_inst", 0.0))
        zp_inst = 0.0 if not math.isfinite(zp_inst) else zp_inst
        top, bottom = ax[0, k], ax[1, k]
        rows = [r for r in cal.get("scans", ()) if isinstance(r, Mapping)]
        t = np.array([_num(r.get("mjd")) for r in rows])
        if rows:
            c1 = np.array([_num(r.get("c1")) for r in rows])
            err = np.array([_num(r.get("c1_err")) for r in rows])
            used = np.array([bool(r.get("used", True)) for r in rows])
            for sel, style, label in ((used, "o", "calibration scan"), (~used, "x", "rejected")):
                if sel.any():
                    top.errorbar((t[sel] % 1) * 24, zp_inst + c1[sel], yerr=np.nan_to_num(err[sel]), fmt=style,
                                 ms=4, color=_COLORS[b], label=label)
            drew = True
        std = _records_columns(cal.get("standards"), ("mjd", "residual", "used"))
        st = _floats(std["mjd"])
        if st.size:
            res = _floats(std["residual"])
            used = np.array([True if v is None else bool(v) for v in std["used"]])
            bottom.plot((st[~used] % 1) * 24, res[~used], "x", ms=3, color="0.6", label="not used")
            bottom.plot((st[used] % 1) * 24, res[used], ".", ms=3, color=_COLORS[b], label="used")
            # The used standards set the scale; rejected ones far out are clipped to the frame.
            ru = np.abs(res[used & np.isfinite(res)])
            lim = max(0.1, 1.3 * float(ru.max())) if ru.size else 0.5
            bottom.set_ylim(-lim, lim)
            _legend(bottom, fontsize=7)
            drew = True
        span = np.concatenate([t[np.isfinite(t)], st[np.isfinite(st)]])
        if span.size and cal.get("status") == "calibrated":
            try:
                from gpu2mass.photcal import BandCalibration

                grid = np.linspace(span.min(), span.max(), 200)
                # The standards' rows are not needed for the curve (and their layout varies).
                curve = BandCalibration.from_dict({k: v for k, v in cal.items() if k != "standards"}).c1(grid)
                top.plot((grid % 1) * 24, zp_inst + curve, "-", color="k", lw=1,
                         label=f"fit ({cal.get('form', '?')})")
            except (ImportError, KeyError, TypeError, ValueError):
                pass  # the points alone still tell the story
        rms = _num(cal.get("residual_rms"))
        top.set_title(f"{b}: {cal.get('status', '?')}" + (f", rms {rms:.3f} mag" if math.isfinite(rms) else ""))
        top.set_ylabel("zero point (mag for 1 DN)")
        top.ticklabel_format(axis="y", useOffset=False)
        top.invert_yaxis()
        bottom.axhline(0.0, color="k", lw=0.6)
        bottom.set_ylabel("residual (mag)")
        bottom.set_xlabel("UT (h)")
        _legend(top, fontsize=7)
    if not drew:
        return title, None, "The calibration has no calibration-scan or standard rows to draw."
    return title, _png(fig)


def _frames_figure(frames: Mapping[int, object]):
    """Seeing FWHM and frame background vs time, per band, every scan."""
    title = "Seeing and background vs time"
    if not frames:
        return title, None, "No frames tables."
    fig, ax = _figure(2, 3, (12.5, 5.0), sharex=True)
    drew = False
    for scan in sorted(frames):
        tab = frames[scan]
        band = _column(tab, "band")
        mjd, see, sky = _column(tab, "mjd"), _column(tab, "seeing_arcsec"), _column(tab, "sky_dn")
        if band is None or mjd is None:
            continue
        band = np.char.upper(band.astype(str))
        for k, b in enumerate(BANDS):
            sel = band == b
            if not sel.any():
                continue
            t = (_floats(mjd[sel]) % 1) * 24
            if see is not None:
                ax[0, k].plot(t, _floats(see[sel]), ".", ms=2, color=_COLORS[b])
            if sky is not None:
                ax[1, k].plot(t, _floats(sky[sel]), ".", ms=2, color=_COLORS[b])
            drew = True
    if not drew:
        return title, None, "The frames tables have no band/mjd columns."
    for k, b in enumerate(BANDS):
        ax[0, k].set_title(b)
        if b == "J":  # the 2MASS limit: mean J seeing shape 1.25 (FWHM 3.45")
            ax[0, k].axhline(3.13 * 1.25 - 0.46, color="0.5", ls="--", lw=0.8)
        ax[0, k].set_ylabel("seeing FWHM (\")")
        ax[1, k].set_ylabel("frame sky (DN)")
        ax[1, k].set_xlabel("UT (h)")
    return title, _png(fig)


def _scan_figure(scans_qa: Sequence[Mapping]):
    """m10 per scan against the Level-1 limits, and astrometric rms / offsets per scan."""
    title = "Depth and astrometry per scan"
    rows = [q for q in scans_qa if isinstance(q.get("bands"), Mapping)]
    if not rows:
        return title, None, "No scan QA."
    scan = np.array([int(q["scan"]) for q in rows])
    fig, ax = _figure(1, 3, (13.0, 3.6))
    drew_ast = False
    for k, b in enumerate(BANDS):
        off = (k - 1) * 0.12
        m10 = np.array([_num((_band_entry(q["bands"], b) or {}).get("m10")) for q in rows])
        ax[0, 0].plot(scan + off, m10, "o", ms=4, color=_COLORS[b], label=b)
        ax[0, 0].axhline(_M10_LIMIT[b], color=_COLORS[b], ls="--", lw=0.8)
        rms = np.array([_num((_band_entry(q["bands"], b) or {}).get("astrometric_rms_arcsec")) for q in rows])
        dra = np.array([_num((_band_entry(q["bands"], b) or {}).get("offset_ra_mas")) for q in rows])
        dde = np.array([_num((_band_entry(q["bands"], b) or {}).get("offset_dec_mas")) for q in rows])
        if np.isfinite(rms).any():
            ax[0, 1].plot(scan + off, rms, "o", ms=4, color=_COLORS[b], label=b)
            drew_ast = True
        if np.isfinite(dra).any() or np.isfinite(dde).any():
            ax[0, 2].plot(scan + off, dra, "o", ms=4, color=_COLORS[b], label=f"{b} RA")
            ax[0, 2].plot(scan + off, dde, "s", ms=4, mfc="none", color=_COLORS[b], label=f"{b} Dec")
            drew_ast = True
    ax[0, 0].set_ylabel("m10 (mag at SNR 10)")
    ax[0, 0].set_title("m10 (dashed: 10σ Level-1 limits)")
    ax[0, 0].invert_yaxis()
    _legend(ax[0, 0], fontsize=7)
    ax[0, 1].set_ylabel("rms vs reference (\")")
    ax[0, 1].set_title("astrometric rms")
    ax[0, 2].set_ylabel("mean offset (mas)")
    ax[0, 2].axhline(0.0, color="k", lw=0.6)
    ax[0, 2].set_title("astrometric offsets")
    for a in ax[0]:
        a.set_xlabel("scan")
    if drew_ast:
        _legend(ax[0, 1], fontsize=7)
        _legend(ax[0, 2], fontsize=6, ncol=3)
    else:
        for a in ax[0, 1:]:
            a.text(0.5, 0.5, "no astrometric solution", ha="center", va="center", transform=a.transAxes)
    return title, _png(fig)


def _completeness_figure(validation: Mapping | None):
    """Completeness vs true magnitude per band, from ``validation["bands"][b]["completeness"]``
    (``curve``: rows ``lo``, ``hi``, ``n``, ``completeness``; ``m10``; ``levels``)."""
    title = "Completeness vs magnitude (validation against the truth)"
    bands = validation.get("bands") if isinstance(validation, Mapping) else None
    if not isinstance(bands, Mapping):
        return title, None, "The validation result has no per-band figures."
    fig, ax = _figure(1, 1, (7.0, 3.8))
    a = ax[0, 0]
    drew = False
    for b in BANDS:
        comp = (_band_entry(bands, b) or {}).get("completeness") or {}
        curve = [c for c in comp.get("curve", ()) if isinstance(c, Mapping)]
        if not curve:
            continue
        m = np.array([0.5 * (_num(c.get("lo")) + _num(c.get("hi"))) for c in curve])
        f = np.array([_num(c.get("completeness")) for c in curve])
        a.plot(m, f, "-o", ms=3, color=_COLORS[b], label=b)
        m10 = _num(comp.get("m10"))
        if math.isfinite(m10):
            a.axvline(m10, color=_COLORS[b], ls=":", lw=0.8)
        drew = True
    if not drew:
        return title, None, "The validation result has no completeness curves."
    a.axhline(0.99, color="0.5", ls="--", lw=0.8)
    a.set_xlabel("true magnitude")
    a.set_ylabel("completeness")
    a.set_title("dotted: each band's truth m10; dashed: 99 %")
    _legend(a, fontsize=8)
    return title, _png(fig)


# ----------------------------------------------------------------------------------------
# The page.

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
td.reasons { text-align: left; max-width: 42em; }
tr.ok td.status { background: #d9f2d9; } tr.degraded td.status { background: #fff1c2; }
tr.failed td.status { background: #f7c6c6; }
img { max-width: 100%; } .note { color: #666; font-style: italic; }
"""


def _fmt(v, spec: str) -> str:
    v = _num(v)
    return "" if not math.isfinite(v) else format(v, spec)


def _scans_table(scans_qa: Sequence[Mapping]) -> str:
    head = ("scan", "type", "score", "status", "seeing J (\")", "m10 J", "m10 H", "m10 K", "airglow H",
            "ast. rms J (\")", "zp rms J", "reasons")
    out = ['<table id="scans"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for q in sorted(scans_qa, key=lambda q: int(q.get("scan", 0))):
        bands = q.get("bands") or {}
        j, h = _band_entry(bands, "J") or {}, _band_entry(bands, "H") or {}
        k = _band_entry(bands, "K") or {}
        status = str(q.get("status", ""))
        reasons = "<br>".join(html.escape(str(r)) for r in q.get("reasons") or ())
        cells = (str(int(q.get("scan", 0))), html.escape(str(q.get("scan_type", ""))), str(q.get("score", "")),
                 html.escape(status), _fmt(j.get("seeing_fwhm"), ".2f"), _fmt(j.get("m10"), ".2f"),
                 _fmt(h.get("m10"), ".2f"), _fmt(k.get("m10"), ".2f"), _fmt(h.get("airglow_excess"), ".2f"),
                 _fmt(j.get("astrometric_rms_arcsec"), ".3f"), _fmt(j.get("zp_residual_rms"), ".3f"))
        cls = ("", "", "", ' class="status"', "", "", "", "", "", "", "")
        out.append(f'<tr class="{html.escape(status)}">'
                   + "".join(f"<td{c}>{v}</td>" for c, v in zip(cls, cells, strict=True))
                   + f'<td class="reasons">{reasons}</td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def render_night_report(
    *,
    night: str,
    scans_qa: Sequence[Mapping],
    calibration: Mapping | None,
    frames: Mapping[int, object],
    astrometry: Mapping | None,
    validation: Mapping | None = None,
) -> str:
    """The report as an HTML string (see :func:`write_night_report` for the arguments)."""
    scans_qa = list(scans_qa)
    n_ok = sum(q.get("status") == "ok" for q in scans_qa)
    n_deg = sum(q.get("status") == "degraded" for q in scans_qa)
    n_fail = sum(q.get("status") == "failed" for q in scans_qa)
    cal_status = calibration.get("status", "?") if isinstance(calibration, Mapping) else "none"
    ast_status = astrometry.get("status", "solved") if isinstance(astrometry, Mapping) else "none"
    figures = [_zero_point_figure(calibration), _frames_figure(frames), _scan_figure(scans_qa)]
    if validation is not None:
        figures.append(_completeness_figure(validation))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>gpu2mass night {html.escape(night)}: quality report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Night {html.escape(night)}: quality report</h1>",
        (f"<p>{len(scans_qa)} scans: {n_ok} ok, {n_deg} degraded, {n_fail} failed. "
         f"Photometric calibration: {html.escape(str(cal_status))}. "
         f"Astrometric solution: {html.escape(str(ast_status))}.</p>"),
        "<h2>Scans</h2>",
        _scans_table(scans_qa),
    ]
    for fig in figures:
        title, png = fig[0], fig[1]
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if png is None:
            parts.append(f'<p class="note">{html.escape(fig[2])}</p>')
        else:
            parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">')
    if validation is None:
        parts.append('<p class="note">No validation against truth (a real night has none; run '
                     "<code>gpu2mass validate</code> on a simulated one).</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_night_report(
    out_dir,
    *,
    night: str,
    scans_qa: Sequence[Mapping],
    calibration: Mapping | None,
    frames: Mapping[int, object],
    astrometry: Mapping | None,
    validation: Mapping | None = None,
) -> Path:
    """Write the night's quality report ``<out_dir>/night/qa.html`` atomically.

    Parameters
    ----------
    out_dir
        The night's output directory.
    night
        The night's name (its date), for the title.
    scans_qa
        Every scan's QA dict (:func:`gpu2mass.qa.scan_qa` / :func:`gpu2mass.qa.failed_scan_qa`).
    calibration
        The content of ``night/calibration.json`` (:meth:`gpu2mass.photcal.NightCalibration.to_dict`)
        or ``None``.
    frames
        Scan number → its frames table (``band``, ``mjd``, ``seeing_arcsec``, ``sky_dn``
        columns; astropy/pyarrow Table or dict of arrays).
    astrometry
        The night's astrometric solution summary (:meth:`gpu2mass.astrometry.NightAstrometry.to_dict`)
        or ``None``; the per-scan figures are read from ``scans_qa``.
    validation
        :func:`gpu2mass.validate.validate_night`'s result, for simulated nights only.

    Returns
    -------
    Path of the written ``qa.html``.
    """
    text = render_night_report(night=night, scans_qa=scans_qa, calibration=calibration, frames=frames,
                               astrometry=astrometry, validation=validation)
    path = Path(out_dir) / "night" / "qa.html"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_night_report_from_products(out_dir, *, validation: Mapping | None = None, night: str | None = None) -> Path:
    """Re-draw ``<out_dir>/night/qa.html`` from a finished night's products.

    For ``gpu2mass validate``, which knows the truth and adds the completeness figure: the
    scans' QA from ``scans/<scan>/qa.json``, their frames from ``scans/<scan>/frames.parquet``,
    the calibration from ``night/calibration.json`` and the astrometric summary from
    ``night/astrometry.json`` (each optional); the night's name from ``run.json`` unless
    given.

    Raises
    ------
    InputError
        ``out_dir`` has no scan with a ``qa.json``, or a product cannot be read.
    """
    import json

    import pyarrow.parquet as pq

    from gpu2mass.errors import InputError

    out_dir = Path(out_dir)

    def read_json(path: Path):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(path, f"cannot read JSON: {exc}") from exc

    qa_paths = sorted(out_dir.glob("scans/*/qa.json"))
    if not qa_paths:
        raise InputError(out_dir, "no scans/<scan>/qa.json: not a finished night's output")
    scans_qa = [read_json(p) for p in qa_paths]
    frames = {}
    for p in qa_paths:
        fp = p.parent / "frames.parquet"
        if fp.is_file():
            try:
                frames[int(p.parent.name)] = pq.read_table(fp)
            except (OSError, ValueError) as exc:
                raise InputError(fp, f"cannot read the frames table: {exc}") from exc
    cal_path, ast_path = out_dir / "night" / "calibration.json", out_dir / "night" / "astrometry.json"
    calibration = read_json(cal_path) if cal_path.is_file() else None
    astrometry = read_json(ast_path) if ast_path.is_file() else None
    if night is None:
        run = out_dir / "run.json"
        # The UT date, as gpu2mass night titles the report (run.json's "night" is the path).
        meta = read_json(run) if run.is_file() else {}
        night = str(meta.get("night_date") or meta.get("night") or out_dir.name)
    return write_night_report(out_dir, night=night, scans_qa=scans_qa, calibration=calibration, frames=frames,
                              astrometry=astrometry, validation=validation)
