"""Detection on Atlas Images (issue 4): ours (gpu2mass.detect) beside SEP on the same images.

The science scan of a simulated night is calibrated the simplest way (``tests/_frames``) and
resampled with the TRUE geometry into Atlas Images (``run_atlas``), as the tests do. On each
image of one band:

- **ours**: ``run_detect`` with its defaults (threshold SNR 5);
- **SEP**: ``sep.Background`` (64-pixel meshes, 3 × 3 filter, as ours) and ``sep.extract``
  with ``filter_type="matched"`` and the same PSF kernel (:func:`gpu2mass.detect.atlas_psf`),
  ``err`` = the Atlas SIGMA times our measured noise scale (SIGMA alone ignores the
  resampling's correlations, which would make SEP's thresholds ~2.8× lower in real σ),
  threshold 5 (completeness, positions) and 10 (its "SNR >= 10" detections, reliability).

Measures, against the truth: completeness of isolated stars (no brighter source or artifact
within 5") down to J 15.8 / H 15.1 / Ks 14.3; reliability of SNR >= 10 detections (a truth
source within 2" or an artifact within 3"); position rms (isolated stars SNR >= 20 found by
both, arcsec); seconds per image. Prints ours beside SEP with ratios.

Run: ``python profiling/bench_detect.py --night NIGHT [--band K] [--json PATH]``
(``NIGHT`` from ``gpu2mass simulate NIGHT --preset tiny`` or ``ci``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MAG = {"J": "j_m", "H": "h_m", "K": "k_m"}
LIMIT = {"J": 15.8, "H": 15.1, "K": 14.3}


def _pixel_noise(s):
    d = np.diff(s.data, axis=2)
    ok = ~(s.bad[:, 1:] | s.bad[:, :-1])
    return np.array([1.4826 * np.median(np.abs(x[ok] - np.median(x[ok]))) for x in d]) / np.sqrt(2)


def _segment_distance(px, py, x0, y0, x1, y1):
    px, py = px[:, None], py[:, None]
    dx, dy = x1 - x0, y1 - y0
    l2 = np.where(dx * dx + dy * dy > 0, dx * dx + dy * dy, 1.0)
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / l2, 0.0, 1.0)
    return np.hypot(px - (x0 + t * dx), py - (y0 + t * dy))


def _sep_extract(img, scale, thresh, psf):
    import sep

    data = np.ascontiguousarray(img.data, dtype=np.float64)
    bad = ~np.isfinite(data) | (img.coverage == 0)
    data = np.where(bad, 0.0, data)
    err = np.where(bad, 1.0, img.sigma.astype(np.float64) * scale)
    bkg = sep.Background(data, mask=bad, bw=64, bh=64, fw=3, fh=3)
    sub = data - bkg.back()
    sep.set_extract_pixstack(2_000_000)
    sep.set_sub_object_limit(4096)
    obj = sep.extract(sub, thresh, err=err, mask=bad, filter_kernel=psf,
                      filter_type="matched", minarea=3)
    return obj


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--night", type=Path, required=True)
    ap.add_argument("--band", default="K", choices=("J", "H", "K"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import pyarrow.parquet as pq
    from scipy.spatial import cKDTree

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _frames import simple_scan

    from gpu2mass.atlas import plan_atlas_grids, run_atlas
    from gpu2mass.detect import atlas_psf, run_detect

    b = args.band
    scans = {x: simple_scan(args.night, x) for x in ("J", "H", "K")}
    grids = plan_atlas_grids({x: s.geometry for x, s in scans.items()})
    s = scans[b]
    src = s.sources
    a = {k: np.asarray(v) for k, v in
         pq.read_table(args.night / "truth" / "artifacts.parquet").to_pydict().items()}
    asel = np.flatnonzero((a["scan"] == s.scan) & (a["band"] == b))
    ara0, ade0 = s.geometry.pixel_to_sky(a["frame"][asel], a["x0"][asel], a["y0"][asel])
    ara1, ade1 = s.geometry.pixel_to_sky(a["frame"][asel], a["x1"][asel], a["y1"][asel])
    noise = _pixel_noise(s)
    tot = {k: {"found": 0, "n": 0, "rel_ok": 0, "rel_n": 0, "err": [], "seconds": 0.0,
               "ndet": 0} for k in ("ours", "sep")}
    for g in grids:
        img = run_atlas(s.data, mask=s.bad, geometry=s.geometry, noise=noise, grid=g, band=b,
                        sky=s.sky, zp_mag=s.frames["zp_mag"],
                        seeing_arcsec=float(np.median(s.frames["fwhm_arcsec"])))
        t0 = time.perf_counter()
        ours = run_detect(img)
        t_ours = time.perf_counter() - t0
        psf = atlas_psf(img.header["SEEING"])
        t0 = time.perf_counter()
        sep5 = _sep_extract(img, ours.meta["noise_scale"], 5.0, psf)
        t_sep = time.perf_counter() - t0
        sep10 = _sep_extract(img, ours.meta["noise_scale"], 10.0, psf)
        # Truth on this image, artifacts in its pixels.
        x, y = g.sky_to_pixel(src["ra"], src["dec"])
        ny, nx = img.data.shape
        on = (x > -3) & (x < nx + 2) & (y > -3) & (y < ny + 2)
        tx, ty, tm, tk = x[on], y[on], src[MAG[b]][on], src["kind"][on]
        ax0, ay0 = g.sky_to_pixel(ara0, ade0)
        ax1, ay1 = g.sky_to_pixel(ara1, ade1)
        tree = cKDTree(np.stack([tx, ty], 1))
        iso = np.array([all(tm[k] > tm[i] for k in near if k != i)
                        for i, near in enumerate(tree.query_ball_point(np.stack([tx, ty], 1), 5.0))])
        if asel.size:
            iso &= _segment_distance(tx, ty, ax0, ay0, ax1, ay1).min(axis=1) > 5.0
        xi, yi = np.rint(tx).astype(int), np.rint(ty).astype(int)
        inside = (xi >= 8) & (xi < nx - 8) & (yi >= 8) & (yi < ny - 8)
        cov = np.zeros(tx.size, int)
        cov[inside] = img.coverage[yi[inside], xi[inside]]
        comp = inside & (cov >= 3) & iso & (tk == "star") & (tm <= LIMIT[b])
        bright = comp & (tm <= LIMIT[b] - 1.5)
        crowd = np.array([len(v) for v in tree.query_ball_point(np.stack([tx, ty], 1), 8.0)])
        bright &= crowd == 1
        found_pos = {}
        for name, dx, dy, hx, hy, sec in (
            ("ours", ours["x"], ours["y"], ours["x"][ours["snr"] >= 10],
             ours["y"][ours["snr"] >= 10], t_ours),
            ("sep", sep5["x"], sep5["y"], sep10["x"], sep10["y"], t_sep),
        ):
            r = tot[name]
            r["seconds"] += sec
            r["ndet"] += len(dx)
            dt = cKDTree(np.stack([dx, dy], 1))
            d, _ = dt.query(np.stack([tx[comp], ty[comp]], 1))
            r["found"] += int(np.sum(d < 2.0))
            r["n"] += int(comp.sum())
            d, _ = tree.query(np.stack([hx, hy], 1))
            ok = d < 2.0
            if asel.size and (~ok).any():
                ok[~ok] = _segment_distance(np.asarray(hx)[~ok], np.asarray(hy)[~ok],
                                            ax0, ay0, ax1, ay1).min(axis=1) < 3.0
            r["rel_ok"] += int(ok.sum())
            r["rel_n"] += int(ok.size)
            d, _j = dt.query(np.stack([tx[bright], ty[bright]], 1))
            found_pos[name] = d
        both = (found_pos["ours"] < 2.0) & (found_pos["sep"] < 2.0)
        for name in ("ours", "sep"):
            tot[name]["err"].append(found_pos[name][both])
    out = {"band": b, "night": str(args.night), "images": len(grids)}
    for name, r in tot.items():
        e = np.concatenate(r["err"]) if r["err"] else np.zeros(0)
        out[name] = {
            "completeness": r["found"] / max(r["n"], 1), "n_complete_sample": r["n"],
            "reliability_snr10": r["rel_ok"] / max(r["rel_n"], 1), "n_snr10": r["rel_n"],
            "position_rms_arcsec": float(np.sqrt(np.mean(e**2))) if e.size else float("nan"),
            "n_position": int(e.size), "seconds": r["seconds"], "detections": r["ndet"],
        }
    o, p = out["ours"], out["sep"]
    print(f"band {b}, {len(grids)} Atlas Images of scan {s.scan} ({args.night})")
    print(f"{'':28s}{'ours':>12s}{'SEP':>12s}{'ours/SEP':>10s}")
    rows = ((f"completeness (isolated, <= {LIMIT[b]:.1f})", "completeness", "{:.4f}"),
            ("reliability (SNR >= 10)", "reliability_snr10", "{:.4f}"),
            ("position rms (arcsec)", "position_rms_arcsec", "{:.3f}"),
            ("seconds (all images)", "seconds", "{:.2f}"),
            ("detections (thresh 5)", "detections", "{:d}"))
    for label, key, fmt in rows:
        ratio = o[key] / p[key] if p[key] else float("nan")
        print(f"{label:28s}{fmt.format(o[key]):>12s}{fmt.format(p[key]):>12s}{ratio:10.3f}")
    print(f"samples: completeness {o['n_complete_sample']}, SNR>=10 ours {o['n_snr10']} "
          f"SEP {p['n_snr10']}, positions {o['n_position']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
