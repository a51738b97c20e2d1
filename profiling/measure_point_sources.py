"""Point sources of a processed simulated night against its truth (issue 4).

Per band, over the science scans' ``pts.parquet`` rows and the truth sources (positions
moved to the scan epoch by their proper motions):

- completeness of isolated truth stars (no brighter truth source within 5") inside the
  Atlas coverage, by magnitude, and the magnitudes where it falls below 99 % and 90 %;
- reliability: the fraction of detections with SNR ≥ 10 and no artifact flag (no
  upper-case ``cc_flg`` letter: 2MASS's marks of a detection that is an artifact) that lie
  within 2" of a truth source (stars, galaxies, and asteroids where the scan passed them:
  ``gpu2mass.validate``'s truth positions), of the band's photocentre of a pair or a
  linked group of truth sources closer than the blend radius (5", inside which 2MASS
  fitted candidates together: a group that the detection does not split is one real
  detection at its photocentre, which can lie more than 2" from each), or inside a truth
  galaxy's half-light ellipse (a resolved galaxy fitted by point sources comes out in
  pieces; 2MASS marked them ``gal_contam``; counted and printed apart: :func:`explained_by_truth`);
  over all rows, and over the rows of the PSC's
  area (selection rule 1: more than 10" from the scan's edges, ``dist_edge_ns`` and
  ``dist_edge_ew``), and over the rows the PSC selection keeps (rules 1–6, which add
  ``psfchi`` < 10 and the frame statistics of ``ndet``: 2MASS quoted its reliability for
  the catalog, and the frame statistics are its rule against single-frame detections that
  nothing can confirm: near the scan ends one frame alone holds the sky for ~80");
- photometry of unsaturated stars from the R2−R1 saturation limit to 2 mag above the 10σ
  limit (J 9.0–13.8, H 8.5–13.1, Ks 8.0–12.3): median Δm, robust scatter, median ``cmsig``,
  robust spread of Δm / cmsig; the same for ``rd_flg`` 1 (R1) and 3 (saturated in R1);
  over the isolated stars that are also clean: no other truth source within 5" holding
  more than 1 % of their flux (2" pixels measure a pair 1" apart as one source, and the
  truth magnitude of one member is not what was measured); beside the spread of Δm / cmsig,
  the range honest errors would give on the same stars (:func:`honest_spread`): a scan's
  photometric-scale error is one draw shared by all its stars, so a night's two science
  scans move its bright stars in two blocks and its spread scatters far more than the
  star count suggests;
- band merging: truth stars detected in all three bands whose detections ended up in one
  row, and rows whose bands belong to different truth stars more than 3" apart (false
  merges; closer pairs are not resolved at the faint end and are counted apart).

Magnitudes are compared through the true zero points, as issue 4 allows: Δm = m − (zp −
zp_truth) − m_true, with zp_truth the mean true zero point of the frames that hold the star
and zp the zero point the magnitudes were made with: the instrumental one, or once the night
is calibrated (``run.json`` ``calibration`` "calibrated") the fitted one of those frames
(``scans/<scan>/frames.parquet`` ``zp_mag``). The night calibration's own error is thereby
left out (``gpu2mass validate`` measures it, and the calibrated Δm).

Run: ``python profiling/measure_point_sources.py NIGHT OUT [--json PATH]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from astropy.table import Table
from scipy.spatial import cKDTree

from gpu2mass.config import RunConfig
from gpu2mass.geometry import frame_geometry_from_truth, tan_project
from gpu2mass.io.products import read_columns
from gpu2mass.psc import psc_selection
from gpu2mass.validate import _truth_positions as truth_positions

BANDS = ("J", "H", "K")
UNSAT = {"J": (9.0, 13.8), "H": (8.5, 13.1), "K": (8.0, 12.3)}
LIMIT = {"J": 15.8, "H": 15.1, "K": 14.3}
#: Pairs of truth stars closer than this (about one seeing FWHM) count as unresolved.
RESOLVED_ARCSEC = 3.0
#: Truth pairs closer than this may come out as one detection at their photocentre (2MASS
#: fitted candidates closer than ~5" together).
BLEND_ARCSEC = 5.0


def explained_by_truth(det_xy, src_xy, m_band, kind, r_eff, axis_ratio, pa_deg, radius=2.0):
    """Which detections the truth explains, and which of those only a galaxy's body does.

    ``det_xy`` (n, 2) and ``src_xy`` (m, 2): tangent-plane (ξ east, η north) arcsec;
    ``m_band`` (m,) the truth sources' magnitudes in the band; ``kind``, ``r_eff``
    (arcsec), ``axis_ratio``, ``pa_deg`` (east of north) their truth columns. A detection
    is explained when it lies within ``radius`` of

    - a truth source;
    - the band's photocentre of a group of truth sources linked by separations under
      the blend radius (5": 2MASS fitted such candidates together, and a group it does
      not split is one real detection at the photocentre of the group, or of any pair in
      it, which can lie more than 2" from each member);
    - or the body of a truth galaxy: inside its half-light ellipse (semi-axes ``r_eff``
      and ``r_eff × axis_ratio``, each at least ``radius``). A resolved galaxy fitted by
      point sources comes out in pieces (2MASS marked such point sources with
      ``gal_contam`` from the extended-source catalogue; those pieces are real light).

    Returns ``(explained, galaxy_only)``, bool (n,).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(det_xy)
    if n == 0 or len(src_xy) == 0:
        return np.zeros(n, bool), np.zeros(n, bool)
    stree = cKDTree(src_xy)
    d, _ = stree.query(det_xy, distance_upper_bound=radius)
    point = np.isfinite(d)
    w = 10 ** (-0.4 * np.nan_to_num(m_band, nan=99.0))
    pairs = stree.query_pairs(BLEND_ARCSEC, output_type="ndarray")
    centres = []
    if len(pairs):
        centres.append((src_xy[pairs] * w[pairs][:, :, None]).sum(1) / w[pairs].sum(1)[:, None])
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(src_xy),) * 2)
        _, label = connected_components(graph, directed=False)
        size = np.bincount(label)
        big = np.flatnonzero(size >= 3)
        if big.size:
            members = np.isin(label, big)
            lab = label[members]
            wsum = np.bincount(lab, w[members], minlength=label.max() + 1)[big]
            cx = np.bincount(lab, w[members] * src_xy[members, 0], minlength=label.max() + 1)[big] / wsum
            cy = np.bincount(lab, w[members] * src_xy[members, 1], minlength=label.max() + 1)[big] / wsum
            centres.append(np.column_stack([cx, cy]))
    if centres:
        db, _ = cKDTree(np.concatenate(centres)).query(det_xy, distance_upper_bound=radius)
        point |= np.isfinite(db)
    on_galaxy = np.zeros(n, bool)
    gal = np.flatnonzero((np.asarray(kind) == "galaxy") & np.isfinite(np.asarray(r_eff, float)))
    if gal.size:
        a = np.maximum(np.asarray(r_eff, float)[gal], radius)
        b = np.maximum(np.asarray(r_eff, float)[gal] * np.nan_to_num(np.asarray(axis_ratio, float)[gal], nan=1.0), radius)
        t = np.deg2rad(np.nan_to_num(np.asarray(pa_deg, float)[gal]))
        for i, near in enumerate(cKDTree(src_xy[gal]).query_ball_point(det_xy, a.max())):
            if point[i] or not near:
                continue
            k = np.asarray(near)
            dx, dy = det_xy[i, 0] - src_xy[gal[k], 0], det_xy[i, 1] - src_xy[gal[k], 1]
            u = dx * np.sin(t[k]) + dy * np.cos(t[k])  # along the major axis (PA east of north)
            v = dx * np.cos(t[k]) - dy * np.sin(t[k])
            on_galaxy[i] = bool(np.any((u / a[k]) ** 2 + (v / b[k]) ** 2 <= 1.0))
    return point | on_galaxy, on_galaxy & ~point


def _robust(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.nan, np.nan
    med = np.median(x)
    return float(med), float(1.4826 * np.median(np.abs(x - med)))


def _completeness_mag(mags, found, level):
    """Faintest magnitude bin edge (0.25 mag bins from bright) down to which every bin's
    completeness is >= level."""
    edges = np.arange(8.0, 18.01, 0.25)
    last = np.nan
    for lo, hi in itertools.pairwise(edges):
        sel = (mags >= lo) & (mags < hi)
        if sel.sum() < 5:
            continue
        if found[sel].mean() < level:
            return last
        last = hi
    return last


def honest_spread(cmsig, scale, scan, draws=2000, seed=0):
    """The robust spread of Δm / cmsig that honest errors give on these stars.

    ``cmsig`` (n,) mag, each star's quoted error; ``scale`` (n,) mag, the part of it its
    scan's photometric scale holds (errcal's ``k·q``: one error shared by the scan's
    stars); ``scan`` (n,) the scan of each. Each draw gives every scan one offset from
    N(0, scale) and every star its own from N(0, cmsig² − scale²). Returns the median,
    5th and 95th percentile of the draws' spreads, and the fraction of draws outside
    [0.85, 1.2] (issue 4's range)."""
    rng = np.random.default_rng(seed)
    rand = np.sqrt(np.maximum(cmsig**2 - scale**2, 0.0))
    ids, inv = np.unique(scan, return_inverse=True)
    spreads = np.empty(draws)
    for k in range(draws):
        z = (rng.normal(0.0, 1.0, ids.size)[inv] * scale + rng.normal(0.0, 1.0, cmsig.size) * rand) / cmsig
        spreads[k] = _robust(z)[1]
    return (float(np.median(spreads)), float(np.percentile(spreads, 5)), float(np.percentile(spreads, 95)),
            float(np.mean((spreads < 0.85) | (spreads > 1.2))))


def _scale_errors(out: Path, scan: int) -> dict:
    """Band → the part of a scan's cmsig its photometric scale holds (mag): the scan's
    quoted ``psf_scale_err`` times the night's ``scale_factor`` (errcal), 0 where absent."""
    try:
        q = json.loads((out / ".work" / "scans" / f"{scan:03d}" / "photometry.json").read_text())
        k = json.loads((out / "night" / "errors.json").read_text())["bands"]
    except (OSError, ValueError, KeyError):
        return {}
    return {b: 2.5 / np.log(10) * float(q.get(b, {}).get("psf_scale_err") or 0.0)
            * float(k.get(b, {}).get("scale_factor") or 1.0) for b in BANDS}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest = json.loads((args.night / "night.json").read_text())
    zp_inst = RunConfig.defaults().transients.zero_point
    run = json.loads((args.out / "run.json").read_text()) if (args.out / "run.json").exists() else {}
    calibrated = run.get("calibration") == "calibrated"
    src = {k: np.asarray(v) for k, v in pq.read_table(args.night / "truth" / "sources.parquet").to_pydict().items()}
    tf = {k: np.asarray(v) for k, v in pq.read_table(args.night / "truth" / "frames.parquet").to_pydict().items()}
    acc = {b: {"m_true": [], "found": [], "dm": [], "cmsig": [], "rd": [], "rel": [], "rel_psc": [], "rel_sel": [],
               "scale": [], "scan": [], "on_galaxy": 0, "n3": 0, "one_row": 0} for b in BANDS}
    merge = {"three_band_stars": 0, "merged_one_row": 0, "rows_checked": 0, "false_merges": 0,
             "unresolved_pairs": 0}
    for scan in (s for s in manifest["scans"] if s["type"] == "sci"):
        path = args.out / "scans" / f"{scan['scan']:03d}" / "pts.parquet"
        if not path.exists():
            continue
        pts = {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}
        out_frames = read_columns(path.parent / "frames.parquet")
        geo = {b: frame_geometry_from_truth(args.night, scan["scan"], b) for b in BANDS}
        fsel = (tf["scan"] == scan["scan"])
        mjd = float(np.mean(tf["mjd"][fsel]))
        # Stars by their proper motions; asteroids to the time the scan passed them.
        ra, dec = truth_positions(src, {k: v[fsel] for k, v in tf.items()}, mjd)
        ra0, dec0 = float(np.median(tf["ra"][fsel])), float(np.median(tf["dec"][fsel]))
        tx, ty = tan_project(ra, dec, ra0, dec0)
        near_scan = (np.abs(tx) < 600) & (np.abs(ty) < np.ptp(tan_project(tf["ra"][fsel], tf["dec"][fsel], ra0, dec0)[1]) / 2 + 300)
        px, py = tan_project(pts["ra"], pts["dec"], ra0, dec0)
        ptree = cKDTree(np.column_stack([px, py]))
        selected = psc_selection(Table(pts))
        scale_err = _scale_errors(args.out, scan["scan"])
        for b in BANDS:
            p = b.lower()
            m_true = np.nan_to_num(src[f"{p}_m"].astype(float), nan=99.0)
            g = geo[b]
            # Inside the scan: at least 3 frames hold the position away from the edges.
            idx = np.flatnonzero(near_scan & (m_true < 18.5))
            xs, ys = g.sky_to_pixel(np.arange(g.nframes)[:, None], ra[idx][None, :], dec[idx][None, :])
            cover = (xs > 10) & (xs < 245) & (ys > 10) & (ys < 245)
            inside = cover.sum(0) >= 3
            # Each star's truth zero point, and the one its magnitude was made with: the
            # mean over the frames that hold it.
            zp_f = tf["zp_mag"][fsel & (tf["band"] == b)][np.argsort(tf["frame"][fsel & (tf["band"] == b)])]
            if calibrated:
                ob = out_frames["band"] == b
                zp_f = zp_f - out_frames["zp_mag"][ob][np.argsort(out_frames["frame"][ob])]
            else:
                zp_f = zp_f - zp_inst[b]
            with np.errstate(invalid="ignore"):
                zp_star = (cover * zp_f[:, None]).sum(0) / cover.sum(0)
            idx, zp_star = idx[inside], zp_star[inside]
            tree = cKDTree(np.column_stack([tx[idx], ty[idx]]))
            # Isolation: no brighter truth source within 5".
            iso = np.ones(idx.size, bool)
            for i, nb in enumerate(tree.query_ball_point(np.column_stack([tx[idx], ty[idx]]), 5.0)):
                nb = [j for j in nb if j != i]
                if nb and np.any(m_true[idx][nb] < m_true[idx][i]):
                    iso[i] = False
            # Clean, for photometry: no other truth source within 5" holding more than 1 % of
            # the star's flux (a fainter one 1" away is measured with it by 2" pixels: the
            # Ks 5.5 star of a 1" pair in the ci field came out 0.5 mag bright).
            clean = iso.copy()
            for i, nb in enumerate(tree.query_ball_point(np.column_stack([tx[idx], ty[idx]]), 5.0)):
                nb = [j for j in nb if j != i]
                if nb and np.any(m_true[idx][nb] < m_true[idx][i] + 5.0):
                    clean[i] = False
            is_star = (src["kind"][idx] == "star") & iso
            clean = clean[is_star]
            stars, zp_star = idx[is_star], zp_star[is_star]
            rdb = np.array([int(s[BANDS.index(b)]) for s in pts["rd_flg"].astype(str)])
            det_b = np.isin(rdb, (1, 2, 3, 4, 9))
            d, j = ptree.query(np.column_stack([tx[stars], ty[stars]]), distance_upper_bound=2.0)
            ok = np.isfinite(d)
            found = np.zeros(stars.size, bool)
            found[ok] = det_b[j[ok]]
            acc[b]["m_true"].append(m_true[stars])
            acc[b]["found"].append(found)
            mm = np.full(stars.size, np.nan)
            cs = np.full(stars.size, np.nan)
            rr = np.full(stars.size, -1)
            mcol = np.asarray(pts[f"{p}_m"], float) if f"{p}_m" in pts else None
            ccol = np.asarray(pts[f"{p}_cmsig"], float)
            # zp_star holds zp_truth − zp: Δm = m − (zp − zp_truth) − m_true.
            mm[found] = mcol[j[found]] + zp_star[found] - m_true[stars][found]
            cs[found] = ccol[j[found]]
            rr[found] = rdb[j[found]]
            mm[~clean] = np.nan  # photometry on clean stars only (above)
            acc[b]["dm"].append(mm)
            acc[b]["cmsig"].append(cs)
            acc[b]["rd"].append(rr)
            acc[b]["scale"].append(np.full(stars.size, scale_err.get(b, 0.0)))
            acc[b]["scan"].append(np.full(stars.size, scan["scan"]))
            # Reliability.
            snr = np.asarray(pts[f"{p}_snr"], float)
            cc = np.array([s[BANDS.index(b)] for s in pts["cc_flg"].astype(str)])
            rel = np.flatnonzero(det_b & (np.nan_to_num(snr) >= 10) & ~np.char.isupper(cc))
            all_src = np.flatnonzero(near_scan)
            real, on_galaxy = explained_by_truth(
                np.column_stack([px[rel], py[rel]]), np.column_stack([tx[all_src], ty[all_src]]),
                m_true[all_src], src["kind"][all_src], src["r_eff_arcsec"][all_src],
                src["axis_ratio"][all_src], src["pa_deg"][all_src])
            acc[b]["rel"].append(real)
            acc[b]["on_galaxy"] += int(on_galaxy.sum())
            # The PSC's area: more than 10" from the scan's edges (selection rule 1).
            psc_area = (np.asarray(pts["dist_edge_ns"], float)[rel] > 10) & (np.asarray(pts["dist_edge_ew"], float)[rel] > 10)
            acc[b]["rel_psc"].append(real[psc_area])
            # The rows the PSC selection keeps (rules 1-6: also psfchi and frame statistics).
            acc[b]["rel_sel"].append(real[selected[rel]])
        # Band merging: truth stars found in all three bands.
        rd = np.array([[int(c) for c in s] for s in pts["rd_flg"].astype(str)]) if len(pts["ra"]) else np.zeros((0, 3), int)
        has = np.isin(rd, (1, 2, 3, 4, 9))
        band_xy = {}
        for k, b in enumerate(BANDS):
            x = np.asarray(pts[f"{b.lower()}_x"], float)
            y = np.asarray(pts[f"{b.lower()}_y"], float)
            r_, d_ = geo[b].pixel_to_sky(0, np.nan_to_num(x), np.nan_to_num(y))
            band_xy[b] = np.column_stack(tan_project(r_, d_, ra0, dec0))
        star_idx = np.flatnonzero(near_scan & (src["kind"] == "star"))
        stree = cKDTree(np.column_stack([tx[star_idx], ty[star_idx]]))
        nearest = {}
        for k, b in enumerate(BANDS):
            dd, jj = stree.query(band_xy[b], distance_upper_bound=2.0)
            nearest[b] = np.where(np.isfinite(dd) & has[:, k], star_idx[np.minimum(jj, star_idx.size - 1)], -1)
        # Rows with two or more bands: do their bands point at different truth stars?
        multi = has.sum(1) >= 2
        for r in np.flatnonzero(multi):
            ids = sorted({nearest[b][r] for k, b in enumerate(BANDS) if has[r, k] and nearest[b][r] >= 0})
            merge["rows_checked"] += 1
            if len(ids) > 1:
                sep = max(np.hypot(tx[a] - tx[c], ty[a] - ty[c]) for a in ids for c in ids)
                # Stars closer than about one seeing FWHM are not resolved at the faint end:
                # the bands of such a blend may settle on either star. Counted apart.
                merge["false_merges"] += int(sep > RESOLVED_ARCSEC)
                merge["unresolved_pairs"] += int(sep <= RESOLVED_ARCSEC)
        # Truth stars detected in all three bands (some row's band detection points at them).
        per_star = {}
        for k, b in enumerate(BANDS):
            for r in np.flatnonzero(nearest[b] >= 0):
                per_star.setdefault(int(nearest[b][r]), {}).setdefault(b, set()).add(int(r))
        for bb in per_star.values():
            if len(bb) == 3:
                merge["three_band_stars"] += 1
                rows = set.intersection(*bb.values())
                merge["merged_one_row"] += int(len(rows) >= 1)
    result = {"bands": {}, "merge": merge}
    for b in BANDS:
        a = acc[b]
        if not a["m_true"]:
            continue
        m_true = np.concatenate(a["m_true"])
        found = np.concatenate(a["found"])
        dm = np.concatenate(a["dm"])
        cs = np.concatenate(a["cmsig"])
        rd = np.concatenate(a["rd"])
        rel = np.concatenate(a["rel"])
        rel_psc = np.concatenate(a["rel_psc"])
        rel_sel = np.concatenate(a["rel_sel"])
        lo, hi = UNSAT[b]
        reg = (m_true >= lo) & (m_true <= hi) & np.isfinite(dm) & (rd == 2)
        med, sc = _robust(dm[reg])
        _, nsc = _robust(dm[reg] / cs[reg])
        honest = honest_spread(cs[reg], np.concatenate(a["scale"])[reg], np.concatenate(a["scan"])[reg]) \
            if reg.sum() >= 10 else (np.nan,) * 4
        lim = m_true <= LIMIT[b]
        res = {
            "isolated_stars_to_limit": int(lim.sum()),
            "completeness_to_limit": float(found[lim].mean()) if lim.any() else None,
            "m99": _completeness_mag(m_true, found, 0.99),
            "m90": _completeness_mag(m_true, found, 0.90),
            "completeness_bins": [[float(lo), int(((m_true >= lo) & (m_true < lo + 0.25)).sum()),
                                   float(found[(m_true >= lo) & (m_true < lo + 0.25)].mean())]
                                  for lo in np.arange(8.0, 18.0, 0.25)
                                  if ((m_true >= lo) & (m_true < lo + 0.25)).sum() >= 5],
            "reliability_snr10": float(rel.mean()) if rel.size else None,
            "n_reliability": int(rel.size),
            "n_reliability_on_galaxy_body": a["on_galaxy"],
            "reliability_snr10_psc_area": float(rel_psc.mean()) if rel_psc.size else None,
            "n_reliability_psc_area": int(rel_psc.size),
            "reliability_snr10_psc_selected": float(rel_sel.mean()) if rel_sel.size else None,
            "n_reliability_psc_selected": int(rel_sel.size),
            "unsat_n": int(reg.sum()), "unsat_bias": med, "unsat_scatter": sc,
            "unsat_median_cmsig": float(np.nanmedian(cs[reg])) if reg.any() else None,
            "unsat_norm_spread": nsc,
            "unsat_norm_spread_honest": dict(zip(("median", "p5", "p95", "p_outside_0.85_1.2"), honest,
                                                 strict=True)),
        }
        for code in (1, 3):
            sel = (rd == code) & np.isfinite(dm)
            res[f"rd{code}_n"] = int(sel.sum())
            res[f"rd{code}_bias"], res[f"rd{code}_scatter"] = _robust(dm[sel])
            res[f"rd{code}_mags"] = [float(v) for v in np.sort(m_true[sel])[:20]]
        result["bands"][b] = res
        print(f"{b}: completeness to {LIMIT[b]} {res['completeness_to_limit']:.4f} "
              f"({res['isolated_stars_to_limit']} stars), m99 {res['m99']}, m90 {res['m90']}; "
              f"reliability(SNR>=10) {res['reliability_snr10']:.4f} of {rel.size} "
              f"[{a['on_galaxy']} on a galaxy's body] "
              f"(PSC area {res['reliability_snr10_psc_area']:.4f} of {rel_psc.size}, PSC-selected "
              f"{res['reliability_snr10_psc_selected']:.4f} of {rel_sel.size}); "
              f"unsat ({reg.sum()}): bias {med:+.4f} scatter {sc:.4f} median cmsig "
              f"{res['unsat_median_cmsig']:.4f} norm spread {nsc:.2f} (honest errors: {honest[0]:.2f}, "
              f"5-95 % {honest[1]:.2f}-{honest[2]:.2f}, outside 0.85-1.2 {honest[3]:.0%}); "
              f"R1 n={res['rd1_n']} bias {res['rd1_bias']:+.3f} scatter {res['rd1_scatter']:.3f}; "
              f"rd3 n={res['rd3_n']}")
    m = merge
    if m["three_band_stars"]:
        print(f"band merging: {m['merged_one_row']}/{m['three_band_stars']} three-band stars in one row "
              f"({m['merged_one_row'] / m['three_band_stars']:.4f}); false merges "
              f"{m['false_merges']}/{m['rows_checked']} rows with >= 2 bands (bands on different stars > "
              f"{RESOLVED_ARCSEC}\" apart; {m['unresolved_pairs']} more on closer, unresolved pairs)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
