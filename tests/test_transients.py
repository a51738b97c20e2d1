"""Solos, streaks and transient masks against the simulator's truth artifacts.

Detections are built from truth (stars at their true positions in every frame covering
them, cosmic rays as sharp single-frame detections, the meteor trail as detections along
its length), so these tests isolate the transient logic from detection."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from gpu2mass.geometry import frame_geometry_from_truth
from gpu2mass.transients import run_transients


def _truth_detections(tiny_night, band, rng):
    import json

    manifest = json.loads((tiny_night / "night.json").read_text())
    sci = next(s for s in manifest["scans"] if s["type"] == "sci")
    geo = frame_geometry_from_truth(tiny_night, sci["scan"], band)
    src = {k: np.asarray(v) for k, v in pq.read_table(tiny_night / "truth" / "sources.parquet").to_pydict().items()}
    art = {k: np.asarray(v) for k, v in pq.read_table(tiny_night / "truth" / "artifacts.parquet").to_pydict().items()}
    mag = src[{"J": "j_m", "H": "h_m", "K": "k_m"}[band]]
    zp = {"J": 20.95, "H": 20.92, "K": 19.88}[band]
    star = (src["kind"] == "star") & (mag < 15.0) & (mag > 6.0)
    rows = {"frame": [], "x": [], "y": [], "flux": [], "fpeak": [], "what": []}

    def add(f, x, y, flux, fpeak, what):
        rows["frame"].append(np.full(np.size(x), f))
        rows["x"].append(np.atleast_1d(x))
        rows["y"].append(np.atleast_1d(y))
        rows["flux"].append(np.broadcast_to(flux, np.shape(np.atleast_1d(x))).astype(float))
        rows["fpeak"].append(np.full(np.size(x), fpeak))
        rows["what"].append(np.full(np.size(x), what))

    for f in range(sci["nframes"]):
        close = star & (np.abs(src["dec"] - geo.dec[f]) < 0.15)
        x, y = geo.sky_to_pixel(f, src["ra"][close], src["dec"][close])
        ok = (x > 1) & (x < 254) & (y > 1) & (y < 254)
        add(f, x[ok] + rng.normal(0, 0.05, ok.sum()), y[ok] + rng.normal(0, 0.05, ok.sum()),
            10 ** (-0.4 * (mag[close][ok] - zp)), 0.3, "star")
    sel = (art["scan"] == sci["scan"]) & (art["band"] == band)
    cr = np.flatnonzero(sel & (art["kind"] == "cosmic_ray"))
    for k in cr:
        add(int(art["frame"][k]), art["x0"][k], art["y0"][k], 300.0, 0.9, "cr")
    met = np.flatnonzero(sel & (art["kind"] == "meteor"))
    for k in met:
        n = int(np.hypot(art["x1"][k] - art["x0"][k], art["y1"][k] - art["y0"][k]) / 3)
        t = np.linspace(0.02, 0.98, n)
        add(int(art["frame"][k]), art["x0"][k] + t * (art["x1"][k] - art["x0"][k]) + rng.normal(0, 0.4, n),
            art["y0"][k] + t * (art["y1"][k] - art["y0"][k]) + rng.normal(0, 0.4, n), 2000.0, 0.3, "meteor")
    det = {k: np.concatenate(v) for k, v in rows.items()}
    return det, geo, sci, art, sel, cr, met


def test_solos_streaks_and_masks(tiny_night, rng):
    for band in ("J", "K"):
        det, geo, sci, art, sel, cr, met = _truth_detections(tiny_night, band, rng)
        res = run_transients(det, geometry=geo, band=band, nframes=sci["nframes"])
        what = det["what"]
        # Stars are confirmed by the overlapping frames; cosmic rays and meteor points are not.
        assert res.solo[what == "star"].mean() < 0.01
        assert res.solo[what == "cr"].mean() > 0.95
        assert res.solo[what == "meteor"].mean() > 0.95
        # The meteor is found as a streak and ≥ 95 % of its trail pixels are masked.
        assert len(met) >= 1 and len(res.streaks) == len(met)
        yy, xx = np.mgrid[0:256, 0:256]
        for k in met:
            f = int(art["frame"][k])
            x0, y0, x1, y1 = art["x0"][k], art["y0"][k], art["x1"][k], art["y1"][k]
            L = np.hypot(x1 - x0, y1 - y0)
            t = ((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / L**2
            d = np.abs((xx - x0) * (y1 - y0) - (yy - y0) * (x1 - x0)) / L
            trail = (d <= 2.0) & (t >= 0) & (t <= 1)
            assert res.mask[f][trail].mean() >= 0.95
        # Every cosmic ray position is masked in its own frame, and not in the others.
        fr, ys, xs = art["frame"][cr].astype(int), np.rint(art["y0"][cr]).astype(int), np.rint(art["x0"][cr]).astype(int)
        assert res.mask[fr, ys, xs].mean() > 0.95
        # Masks stay small: well under 2 % of the pixels outside the meteor frames.
        other = np.setdiff1d(np.arange(sci["nframes"]), art["frame"][met].astype(int))
        assert res.mask[other].mean() < 0.02


def test_no_detections(tiny_night):
    geo = frame_geometry_from_truth(tiny_night, 3, "H")
    empty = {"frame": np.array([], int), "x": np.array([]), "y": np.array([]), "flux": np.array([])}
    res = run_transients(empty, geometry=geo, band="H", nframes=geo.nframes)
    assert res.solo.size == 0 and not res.mask.any() and res.streaks == ()


def test_sharp_detections_no_other_frame_covers_are_masked(tiny_night, rng):
    """At the end of a scan one frame alone covers the sky: a cosmic ray there can be
    neither confirmed nor rejected in the coadd, so a detection sharper than any star is
    masked; a star-like one (fpeak 0.3) is left alone."""
    det, geo, sci, *_ = _truth_detections(tiny_night, "K", rng)
    n = sci["nframes"]
    # The last frame's far edge: no other frame holds it (the scan moves along y).
    x_end, y_end = 128.0, 252.0 if geo.dec[-1] > geo.dec[0] else 3.0
    ra, dec = geo.pixel_to_sky(n - 1, x_end, y_end)
    fx, fy = geo.sky_to_pixel(np.arange(n - 1), ra, dec)
    assert not np.any((fx > 2) & (fx < 253) & (fy > 2) & (fy < 253))
    extra = {k: np.concatenate([v, np.asarray(a)]) for (k, v), a in zip(
        det.items(), ([n - 1, n - 1], [x_end, x_end - 40.0], [y_end, y_end], [300.0, 300.0],
                      [0.9, 0.3], ["cr", "star"]), strict=True)}
    res = run_transients(extra, geometry=geo, band="K", nframes=n)
    assert res.mask[n - 1, int(y_end), int(x_end)]
    assert not res.mask[n - 1, int(y_end), int(x_end - 40.0)]
    assert not res.solo[-2:].any()
