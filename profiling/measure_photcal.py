"""Photometric calibration of a processed night against the simulator's truth.

Usage: ``python profiling/measure_photcal.py NIGHT OUT [--json FILE] [--set photcal.NAME=VALUE ...]``

Reads ``OUT/scans/*/pts.parquet`` and ``frames.parquet`` (instrumental magnitudes, as the
scan pipeline writes them), matches every calibration scan to the night's standards, solves
the night's calibration (:mod:`gpu2mass.photcal`), applies it and prints, per band:

- the chosen form, its leave-one-observation-out RMS and every form's, the standards'
  residual RMS;
- the fitted zero point (``zp_inst + offset``) minus the truth's (``truth/frames.parquet``
  ``zp_mag``: magnitude of a source giving 1 DN in R2−R1 at flat 1, per frame with its
  airmass) at every frame of each science scan: per-scan mean, and the RMS over science
  scans (acceptance: ≤ 0.01 mag);
- calibrated unsaturated stars (``rd_flg`` 2, truth magnitude 10–14) of the science scans
  matched to the truth within 1": ``median(m − m_true)`` (acceptance: |…| ≤ 0.01 mag),
  before (instrumental) and after calibration.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from gpu2mass.config import RunConfig
from gpu2mass.io import products
from gpu2mass.io.rawnight import open_night
from gpu2mass.photcal import (
    BANDS,
    PhotcalConfig,
    PhotcalWarning,
    apply_calibration,
    calibration_matches,
    solve_night_calibration,
)
from gpu2mass.transients import TransientConfig


def _xyz(ra, dec):
    r, d = np.deg2rad(ra), np.deg2rad(dec)
    return np.c_[np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)]


def measure(night_dir: Path, out_dir: Path, cfg: PhotcalConfig, zp_inst: dict) -> dict:
    night = open_night(night_dir, check_data=False)
    cal_scans = [s for s in night.scans if s.type == "cal"]
    sci_scans = [s for s in night.scans if s.type == "sci"]
    matches = []
    for s in cal_scans:
        d = out_dir / "scans" / f"{s.number:03d}"
        if not (d / "pts.parquet").exists():
            print(f"cal scan {s.number}: no pts.parquet, skipped")
            continue
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", PhotcalWarning)
            m = calibration_matches(products.read_table(d / "pts.parquet"), products.read_columns(d / "frames.parquet"), night.standards,
                                    scan=s.number, field=s.field, zp_inst=zp_inst, config=cfg)
        for x in w:
            print("  warning:", x.message)
        matches.append(m)
    cal = solve_night_calibration(matches, config=cfg, zp_inst=zp_inst)
    print(f"night {night.night}: {len(cal_scans)} calibration scans, status {cal.status}",
          *(f"({r})" for r in cal.reasons))
    truth_frames = products.read_columns(night_dir / "truth" / "frames.parquet")
    src = products.read_columns(night_dir / "truth" / "sources.parquet")
    tree = cKDTree(_xyz(src["ra"], src["dec"]))
    result = {"night": str(night_dir), "out": str(out_dir), "status": cal.status, "bands": {}}
    calibrated = {}
    for s in sci_scans:
        d = out_dir / "scans" / f"{s.number:03d}"
        if (d / "pts.parquet").exists():
            pts = products.read_table(d / "pts.parquet")
            calibrated[s.number] = (pts, apply_calibration(pts, products.read_columns(d / "frames.parquet"), cal))
    for band in BANDS:
        b = cal.bands[band]
        p = band.lower()
        loo = {k: (None if not np.isfinite(v) else round(v, 4)) for k, v in b.loo_rms.items()}
        print(f"\n{band}: form {b.form}  c2 {b.c2:.3f}{' (fitted)' if b.c2_fitted else ''}  "
              f"jitter {b.jitter:.4f}  standards used {b.n_used}/{b.n_standards} in {b.n_scans} scans, "
              f"{b.n_observations} observations; residual rms {b.residual_rms:.4f}, scan rms "
              f"{b.scan_residual_rms:.4f}; LOO rms {loo}")
        per_scan, all_d = {}, []
        for s in sci_scans:
            sel = (truth_frames["scan"] == s.number) & (truth_frames["band"] == band)
            if not sel.any():
                continue
            fit = cal.zero_point(band, truth_frames["mjd"][sel], truth_frames["airmass"][sel])
            dzp = fit - truth_frames["zp_mag"][sel]
            err = float(np.median(cal.offset_err(band, truth_frames["mjd"][sel], truth_frames["airmass"][sel])))
            per_scan[s.number] = {"dzp_mean": float(np.mean(dzp)), "zp_err": err,
                                  "airmass": float(np.mean(truth_frames["airmass"][sel]))}
            all_d.append(dzp)
            print(f"  sci scan {s.number}: fitted − true zero point {np.mean(dzp):+.4f} mag "
                  f"(quoted error {err:.4f}, airmass {per_scan[s.number]['airmass']:.3f})")
        zp_rms = float(np.sqrt(np.mean(np.concatenate(all_d) ** 2))) if all_d else float("nan")
        dm_cal, dm_inst = [], []
        for pts, cpts in calibrated.values():
            dist, idx = tree.query(_xyz(np.asarray(pts["ra"], float), np.asarray(pts["dec"], float)))
            rd = np.array([r[BANDS.index(band)] for r in np.asarray(pts["rd_flg"]).astype(str)])
            mt = src[f"{p}_m"][idx]
            m0 = np.asarray(pts[f"{p}_m"].filled(np.nan) if hasattr(pts[f"{p}_m"], "filled") else pts[f"{p}_m"],
                            float)
            m1 = np.asarray(cpts[f"{p}_m"].filled(np.nan), float)
            ok = (dist < np.deg2rad(1 / 3600)) & (rd == "2") & (mt > 10) & (mt < 14) & np.isfinite(m1)
            dm_cal.append(m1[ok] - mt[ok])
            dm_inst.append(m0[ok] - mt[ok])
        dm_cal = np.concatenate(dm_cal) if dm_cal else np.zeros(0)
        dm_inst = np.concatenate(dm_inst) if dm_inst else np.zeros(0)
        med_cal = float(np.median(dm_cal)) if dm_cal.size else float("nan")
        med_inst = float(np.median(dm_inst)) if dm_inst.size else float("nan")
        print(f"  zero point rms over science frames: {zp_rms:.4f} mag  [{'PASS' if zp_rms <= 0.01 else 'FAIL'} ≤ 0.01]")
        print(f"  science stars (rd_flg 2, 10 < m_true < 14, n = {dm_cal.size}): median(m − m_true) "
              f"calibrated {med_cal:+.4f}, instrumental {med_inst:+.4f}  "
              f"[{'PASS' if abs(med_cal) <= 0.01 else 'FAIL'} |…| ≤ 0.01]")
        result["bands"][band] = {"form": b.form, "loo_rms": loo, "c2": b.c2, "jitter": b.jitter,
                                 "residual_rms": b.residual_rms, "n_used": b.n_used, "sci_scans": per_scan,
                                 "zp_rms": zp_rms, "n_stars": int(dm_cal.size), "median_dm_calibrated": med_cal,
                                 "median_dm_instrumental": med_inst}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--set", action="append", default=[], help="photcal.NAME=VALUE override")
    a = ap.parse_args(argv)
    cfg = RunConfig({}).with_overrides(a.set).steps.get("photcal", PhotcalConfig())
    run_json = a.out / "run.json"
    zp_inst = dict(TransientConfig().zero_point)
    if run_json.exists():
        zp_inst = dict(json.loads(run_json.read_text())["config"]["transients"]["zero_point"])
    res = measure(a.night, a.out, cfg, zp_inst)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
