"""Every unreliable point source of a processed simulated night, and why (issue 4).

An unreliable detection is what ``measure_point_sources.py`` counts against reliability:
a band detection (``rd_flg`` 1, 2, 3, 4 or 9) with SNR ≥ 10 and no upper-case ``cc_flg``
letter that the truth does not explain (``measure_point_sources.explained_by_truth``: a
truth source within 2", asteroids where the scan passed them, the photocentre of a truth
pair or linked group closer than 5", a galaxy's half-light ellipse). Each is listed with
what the truth holds around it and put in the first class that fits:

- ``spike``, ``persistence``, ``stripe``, ``meteor``, ``cosmic_ray``: a truth artifact of
  the scan and band within 3" (spike and meteor segments by their distance to the line);
- ``moved``: a truth source within 5" (a real source whose measured position is 2–5" off:
  a failed fit, a source cut by the array edge, an unsplit wide pair);
- ``other``.

``area`` says whether the row lies in the PSC's area (more than 10" from the scan's edges,
selection rule 1). Per row: band, magnitude, SNR, ``rd_flg``, ``cc_flg``, ``psfchi``,
``ndet``, the nearest truth sources and the nearest truth star brighter than 11 mag in
the band (distance, position angle from it, magnitude, the ``rd_flg`` of its row).

Run: ``python profiling/measure_unreliable.py NIGHT OUT [--json PATH]``.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
from measure_point_sources import explained_by_truth  # profiling/ is on the path when run
from scipy.spatial import cKDTree

from gpu2mass.geometry import frame_geometry_from_truth, tan_project
from gpu2mass.io.products import read_columns
from gpu2mass.validate import _truth_positions as truth_positions

BANDS = ("J", "H", "K")
#: A truth artifact this close explains a detection (arcsec).
ARTIFACT_ARCSEC = 3.0
#: A real source this close, but more than 2" away, was measured in the wrong place.
MOVED_ARCSEC = 5.0
ARTIFACT_KINDS = ("spike", "persistence", "stripe", "meteor", "cosmic_ray")


def _segment_distance(x, y, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / np.maximum(dx * dx + dy * dy, 1e-12), 0, 1)
    return np.hypot(x0 + t * dx - x, y0 + t * dy - y)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest = json.loads((args.night / "night.json").read_text())
    src = read_columns(args.night / "truth" / "sources.parquet")
    tf = read_columns(args.night / "truth" / "frames.parquet")
    art = read_columns(args.night / "truth" / "artifacts.parquet")
    rows, counts = [], collections.Counter()
    for scan in (s["scan"] for s in manifest["scans"] if s["type"] == "sci"):
        path = args.out / "scans" / f"{scan:03d}" / "pts.parquet"
        if not path.exists():
            continue
        pts = read_columns(path)
        fsel = tf["scan"] == scan
        ra, dec = truth_positions(src, {k: v[fsel] for k, v in tf.items()}, float(np.mean(tf["mjd"][fsel])))
        ra0, dec0 = float(np.median(tf["ra"][fsel])), float(np.median(tf["dec"][fsel]))
        tx, ty = tan_project(ra, dec, ra0, dec0)
        txy = np.column_stack([tx, ty])
        px, py = tan_project(pts["ra"], pts["dec"], ra0, dec0)
        ptree, stree = cKDTree(np.column_stack([px, py])), cKDTree(txy)
        psc_area = (np.asarray(pts["dist_edge_ns"], float) > 10) & (np.asarray(pts["dist_edge_ew"], float) > 10)
        for k, b in enumerate(BANDS):
            p = b.lower()
            m_true = np.nan_to_num(src[f"{p}_m"].astype(float), nan=99.0)
            rd = np.array([s[k] for s in pts["rd_flg"].astype(str)])
            cc = np.array([s[k] for s in pts["cc_flg"].astype(str)])
            snr = np.nan_to_num(np.asarray(pts[f"{p}_snr"], float))
            rel = np.flatnonzero(np.isin(rd, list("12349")) & (snr >= 10) & ~np.char.isupper(cc))
            if rel.size == 0:
                continue
            real, _ = explained_by_truth(np.column_stack([px[rel], py[rel]]), txy, m_true, src["kind"],
                                         src["r_eff_arcsec"], src["axis_ratio"], src["pa_deg"])
            bad = rel[~real]
            if bad.size == 0:
                continue
            # The scan's truth artifacts of this band, in the same plane.
            a = (art["scan"] == scan) & (art["band"] == b)
            geo = frame_geometry_from_truth(args.night, scan, b)
            ends = []
            for c in ("0", "1"):
                r_, d_ = geo.pixel_to_sky(art["frame"][a], art[f"x{c}"][a], art[f"y{c}"][a])
                ends.append(tan_project(r_, d_, ra0, dec0))
            kinds = art["kind"][a]
            bright = np.flatnonzero(m_true < 11.0)
            btree = cKDTree(txy[bright]) if bright.size else None
            for r in bad:
                x, y = px[r], py[r]
                dist = _segment_distance(x, y, ends[0][0], ends[0][1], ends[1][0], ends[1][1])
                near_art = {kind: float(dist[kinds == kind].min()) for kind in ARTIFACT_KINDS
                            if (kinds == kind).any() and dist[kinds == kind].min() <= ARTIFACT_ARCSEC}
                dd, jj = stree.query([x, y], k=3)
                cls = next((kind for kind in ARTIFACT_KINDS if kind in near_art), None)
                if cls is None:
                    cls = "moved" if dd[0] <= MOVED_ARCSEC else "other"
                info = {"scan": int(scan), "band": b, "row": int(r), "class": cls,
                        "area": "psc" if psc_area[r] else "edge",
                        "m": float(pts[f"{p}_m"][r]) if pts[f"{p}_m"][r] is not None else None,
                        "snr": float(snr[r]), "rd_flg": str(pts["rd_flg"][r]), "cc_flg": str(pts["cc_flg"][r]),
                        "psfchi": None if pts[f"{p}_psfchi"][r] is None else float(pts[f"{p}_psfchi"][r]),
                        "ndet": str(pts["ndet"][r]),
                        "nearest_truth": [{"kind": str(src["kind"][j]), "m": float(m_true[j]), "d": float(e)}
                                          for e, j in zip(dd, jj, strict=True)],
                        "artifacts": near_art}
                if btree is not None:
                    e, q = btree.query([x, y])
                    q = bright[q]
                    pa = float(np.rad2deg(np.arctan2(x - tx[q], y - ty[q])) % 360)
                    e2, row = ptree.query(txy[q])
                    info["bright_star"] = {"m": float(m_true[q]), "d": float(e), "pa": pa,
                                           "row_d": float(e2), "row_rd_flg": str(pts["rd_flg"][row])}
                rows.append(info)
                counts[(b, cls, info["area"])] += 1
    for info in rows:
        bs = info.get("bright_star")
        print(f"scan {info['scan']} {info['band']} row {info['row']} [{info['class']}, {info['area']}] "
              f"m={info['m']} snr={info['snr']:.1f} rd={info['rd_flg']} cc={info['cc_flg']} "
              f"psfchi={info['psfchi']} ndet={info['ndet']}; truth: "
              + ", ".join(f"{t['kind']} {t['m']:.2f} at {t['d']:.1f}\"" for t in info["nearest_truth"])
              + (f"; artifacts {info['artifacts']}" if info["artifacts"] else "")
              + (f"; bright star {bs['m']:.2f} at {bs['d']:.1f}\" PA {bs['pa']:.0f} (its row {bs['row_d']:.1f}\" "
                 f"off, rd_flg {bs['row_rd_flg']})" if bs else ""))
    summary = {f"{b} {cls} {area}": n for (b, cls, area), n in sorted(counts.items())}
    print("by band, class and area:", json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
