"""Frame position accuracy of a processed simulated night against its truth (issue 3).

Run: ``python profiling/measure_frame_positions.py NIGHT OUT`` after
``gpu2mass night NIGHT --out OUT``. Prints, per scan and band, the rms per coordinate and
the largest error of the frame centres (arcsec) and the rotation error (deg).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def main(night: Path, out: Path) -> dict:
    truth = pq.read_table(night / "truth" / "frames.parquet").to_pydict()
    t = {(s, b, f): (r, d, rot) for s, b, f, r, d, rot in zip(
        truth["scan"], truth["band"], truth["frame"], truth["ra"], truth["dec"], truth["rot_deg"], strict=True)}
    rows, all_err = [], []
    for path in sorted((out / "scans").glob("*/frames.parquet")):
        scan = int(path.parent.name)
        fr = pq.read_table(path).to_pydict()
        for band in sorted(set(fr["band"])):
            sel = [i for i, b in enumerate(fr["band"]) if b == band]
            e = np.array([((fr["ra"][i] - t[(scan, band, fr["frame"][i])][0]) * np.cos(np.deg2rad(fr["dec"][i])) * 3600,
                           (fr["dec"][i] - t[(scan, band, fr["frame"][i])][1]) * 3600) for i in sel])
            rot_err = fr["rot_deg"][sel[0]] - t[(scan, band, 0)][2]
            rms = np.sqrt((e**2).mean(0))
            rows.append({"scan": scan, "band": band, "frames": len(sel), "rms_ra_arcsec": rms[0],
                         "rms_dec_arcsec": rms[1], "max_arcsec": float(np.hypot(*e.T).max()),
                         "rotation_error_deg": rot_err})
            all_err.append(e)
            print(f"scan {scan:3d} {band}: {len(sel):3d} frames  rms {rms[0]:.3f}\" / {rms[1]:.3f}\"  "
                  f"max {np.hypot(*e.T).max():.3f}\"  rotation error {rot_err:+.4f} deg")
    e = np.concatenate(all_err)
    summary = {"frames": len(e), "rms_ra_arcsec": float(np.sqrt((e[:, 0] ** 2).mean())),
               "rms_dec_arcsec": float(np.sqrt((e[:, 1] ** 2).mean())), "max_arcsec": float(np.hypot(*e.T).max()),
               "max_rotation_error_deg": float(max(abs(r["rotation_error_deg"]) for r in rows))}
    print(json.dumps(summary, indent=1))
    return {"per_scan_band": rows, "summary": summary}


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
