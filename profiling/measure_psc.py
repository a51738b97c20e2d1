"""PSC columns and duplicate resolution (:mod:`gpu2mass.psc`) on a processed night, against truth.

Usage::

    .venv/bin/python profiling/measure_psc.py NIGHT OUT --scan SCAN [--truth-geometry]

``NIGHT`` is a simulated raw night (with ``truth/``), ``OUT`` its ``gpu2mass night`` output
(``scans/<scan>/pts.parquet``, ``frames.parquet``, ``atlas/``). Every scan's rows are turned
into catalog rows (:func:`gpu2mass.psc.finalize_point_sources`), then duplicates are resolved
among the science scans and, apart, among the calibration scans (with their footprints, so
pseudo-apparitions act). Printed: timings; ``dup_src`` counts and ``use_src`` totals; per true
star (nearest within 1"), how many rows were selected (exactly one expected), how many stars
lost every apparition although one passed rules 1–6 (pseudo-apparitions, by design), and
selected rows without a true star. For ``--scan``: the edge distances and ``x_scan`` of 150
of its sources against a walk over the TRUE three-band coverage (true frame geometry with
its distortion), with the outline from the frames table alone or, ``--truth-geometry``,
through the true geometry (as when the registration's geometry is passed).
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from gpu2mass.geometry import frame_geometry_from_truth, tan_deproject
from gpu2mass.io import products
from gpu2mass.psc import (
    atlas_grids_from_files,
    finalize_point_sources,
    psc_selection,
    resolve_duplicates,
    scan_edges,
)


def covered(geoms, ra, dec):
    """Inside every band's coverage (some frame holds the point)?"""
    ok = np.ones(ra.size, bool)
    for g in geoms.values():
        held = np.zeros(ra.size, bool)
        held[g.frames_holding(ra, dec)[0]] = True
        ok &= held
    return ok


def walk(geoms, ra, dec, direction, limit):
    """Distance (arcsec) along ``direction`` (ξ, η) to where the coverage ends (0.01")."""
    lo, hi = np.zeros(ra.size), np.full(ra.size, np.nan)
    for t in np.arange(10.0, limit + 10.0, 10.0):
        r, d = tan_deproject(direction[0] * t, direction[1] * t, ra, dec)
        out = ~covered(geoms, r, d) & np.isnan(hi)
        hi[out] = t
        lo[np.isnan(hi)] = t
    for _ in range(10):
        mid = 0.5 * (lo + hi)
        r, d = tan_deproject(direction[0] * mid, direction[1] * mid, ra, dec)
        inside = covered(geoms, r, d)
        lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
    return 0.5 * (lo + hi)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night")
    ap.add_argument("out")
    ap.add_argument("--scan", type=int, required=True)
    ap.add_argument("--truth-geometry", action="store_true")
    a = ap.parse_args()
    man = json.loads(Path(a.night, "night.json").read_text())
    inst = man["instrument"]
    types = {s["scan"]: s["type"] for s in man["scans"]}
    tabs, frames = {}, {}
    t0 = time.perf_counter()
    for path in sorted(glob.glob(f"{a.out}/scans/*/pts.parquet")):
        scan = int(path.split("/")[-2])
        frames[scan] = products.read_table(f"{a.out}/scans/{scan:03d}/frames.parquet")
        grids = atlas_grids_from_files(sorted(glob.glob(f"{a.out}/atlas/*_{scan:03d}_*.fits")))
        tabs[scan] = finalize_point_sources(
            products.read_table(path), scan=scan, night_date=man["night"], observatory=man["observatory"],
            frames=frames[scan], atlas_images=grids, nx=inst["nx"], ny=inst["ny"],
            site_lon_deg=man["site"]["lon_deg"])
    t1 = time.perf_counter()
    groups = {kind: {s: t for s, t in tabs.items() if types[s] == kind} for kind in ("sci", "cal")}
    resolved = {kind: resolve_duplicates(g, frames={s: frames[s] for s in g}, nx=inst["nx"], ny=inst["ny"])
                for kind, g in groups.items() if g}
    t2 = time.perf_counter()
    n = sum(len(t) for t in tabs.values())
    print(f"finalize_point_sources: {len(tabs)} scans, {n} rows, {t1 - t0:.2f} s; "
          f"resolve_duplicates: {t2 - t1:.2f} s")
    keys = np.concatenate([np.asarray(t["pts_key"]) for t in tabs.values()])
    print(f"pts_key unique over the night: {np.unique(keys).size == keys.size}")

    src = products.read_table(f"{a.night}/truth/sources.parquet")

    def unit(r, d):
        r, d = np.deg2rad(r), np.deg2rad(d)
        return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])

    tree = cKDTree(unit(np.asarray(src["ra"], float), np.asarray(src["dec"], float)))
    for kind, r in resolved.items():
        def cat(c, r=r):
            return np.concatenate([np.asarray(t[c]) for t in r.values()])

        dup, use = cat("dup_src"), cat("use_src").astype(bool)
        passes = np.concatenate([psc_selection(t) for t in r.values()])
        dist, idx = tree.query(unit(cat("ra"), cat("dec")))
        ok = dist / (np.pi / 180 / 3600) < 1.0
        ids = np.where(ok, idx, -1)
        m = len(src)
        selected = np.bincount(ids[use & ok], minlength=m)
        any_pass = np.bincount(ids[passes & ok], minlength=m) > 0
        print(f"{kind}: {dup.size} rows, dup_src {dict(zip(*(v.tolist() for v in np.unique(dup, return_counts=True)), strict=True))}, "
              f"rules 1-6 {passes.sum()}, use_src 1: {use.sum()}; true stars with a passing row "
              f"{any_pass.sum()}: selected once {np.sum(selected == 1)}, more than once "
              f"{np.sum(selected > 1)}, none (pseudo-apparition won) {np.sum((selected == 0) & any_pass)}; "
              f"selected rows without a true star: {np.sum(use & ~ok)}")

    t = tabs[a.scan]
    geoms = {b: frame_geometry_from_truth(a.night, a.scan, b) for b in inst["bands"]}
    pick = np.random.default_rng(1).choice(len(t), size=min(150, len(t)), replace=False)
    ra, dec = np.asarray(t["ra"])[pick], np.asarray(t["dec"])[pick]
    north, south, east, west, xs = scan_edges(ra, dec, frames[a.scan], nx=inst["nx"], ny=inst["ny"],
                                              geometries=geoms if a.truth_geometry else None)
    inside = covered(geoms, ra, dec)
    side = np.minimum(east, west) > 20  # walking N/S near a side leaves through the side
    print(f"scan {a.scan}, outline {'through the true geometry' if a.truth_geometry else 'from the frames table'}:")
    for name, dist, direction, limit, use in (("east", east, (1, 0), 600, inside),
                                             ("west", west, (-1, 0), 600, inside),
                                             ("north", north, (0, 1), 25000, inside & side),
                                             ("south", south, (0, -1), 25000, inside & side)):
        err = dist[use] - walk(geoms, ra[use], dec[use], direction, limit)
        print(f"  {name}: {use.sum()} sources, error median {np.median(err):+.2f}\", "
              f"max |error| {np.max(np.abs(err)):.2f}\"")
    xt, nn = np.zeros(ra.size), np.zeros(ra.size)
    for g in geoms.values():
        s, _f, x, _y = g.frames_holding(ra, dec)
        np.add.at(xt, s, (x - (g.band.nx - 1) / 2) * g.band.scale_arcsec)
        np.add.at(nn, s, 1)
    held = nn > 0
    print(f"  x_scan: max |error| {np.max(np.abs(xs[held] - xt[held] / nn[held])):.2f}\" over {held.sum()}")


if __name__ == "__main__":
    main()
