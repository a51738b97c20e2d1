"""Frame position reconstruction (PosFrm, facts sheet section 5): where every frame looked.

Per band of a scan, one least-squares solution ties the frames to each other (the same
star seen in overlapping frames) and, simultaneously, to the astrometric reference catalog
(so that the frame chain does not random-walk), solving for

- the band's pixel scale and rotation (a = s cos θ, b = s sin θ),
- its focal-plane distortion (:data:`gpu2mass.geometry.DISTORTION_TERMS`, 14 coefficients),
- every frame's array-centre position on the sky, with a smoothness prior on the pointing
  offsets from the commanded track (second differences, σ = ``track_sigma_arcsec``): the
  "smooth pointing track in time" that absorbs the drift of the commanded pointing, while
  frames with many stars follow their own jitter and frames with few follow the track.

The commanded positions may be off by tens of arcsec: a coarse offset is found first by
voting over all detection–reference differences within ``search_radius_arcsec``.

Gauss–Newton iterations with matching and outlier rejection repeated at each step; residuals
are computed exactly on the sky, the Jacobian in each frame's own tangent plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.signal import savgol_filter
from scipy.sparse.linalg import splu
from scipy.spatial import cKDTree

from gpu2mass.errors import StepError
from gpu2mass.geometry import (
    DISTORTION_RADIUS_PX,
    DISTORTION_TERMS,
    BandGeometry,
    FrameGeometry,
    tan_deproject,
    tan_project,
)
from gpu2mass.refcat import ReferenceStars

__all__ = ["RegisterConfig", "Registration", "run_register"]

_NT = len(DISTORTION_TERMS)
_NG = 2 + 2 * _NT  # global parameters: a, b, distortion du (7), dv (7)


@dataclass(frozen=True)
class RegisterConfig:
    """Settings of frame position reconstruction.

    Attributes
    ----------
    nominal_scale_arcsec
        Starting pixel scale, arcsec/px (2MASS nominal 2.0).
    search_radius_arcsec
        Radius of the coarse offset search; covers commanded positions off by up to ~40".
    match_radius_arcsec
        Detection–reference and detection–detection match radius once the coarse offset is
        known (first iteration uses 2.5× this, for the unknown rotation and distortion).
    min_snr
        Detections fainter than this (single-frame SNR) are not used.
    max_frame_gap
        Frames up to this many apart are matched to each other (frames overlap ~5/6 of the
        array per step of 82.8"; 5 steps still overlap by ~100").
    track_sigma_arcsec
        σ of the second difference of successive frame offsets (the smoothness prior):
        frame jitter of ~0.15" rms gives second differences of ~0.37".
    distortion_prior_px
        σ of a weak prior pulling distortion coefficients to 0 (keeps scans with few stars
        well posed; real distortions are ≲ 2 px).
    clip_sigma
        Observations whose normalized residual exceeds this are dropped (re-evaluated each
        iteration).
    iterations
        Gauss–Newton iterations (converges in 4–5).
    min_reference_matches
        Fewer matched reference stars than this in the whole band is an error: the scan
        cannot be tied to the sky.
    reject_flags
        Detections with any of these :mod:`gpu2mass.framedet` flag bits are not used:
        aperture off the frame edge (2), saturated (4), PSF fit failed (16). A masked pixel
        nearby (1) or a neighbour within 5" (8) leaves a fitted position usable; the few
        that are spoiled are clipped as outliers.
    """

    nominal_scale_arcsec: float = 2.0
    search_radius_arcsec: float = 45.0
    match_radius_arcsec: float = 2.0
    min_snr: float = 10.0
    max_frame_gap: int = 5
    track_sigma_arcsec: float = 0.4
    distortion_prior_px: float = 5.0
    clip_sigma: float = 4.0
    iterations: int = 7
    min_reference_matches: int = 5
    reject_flags: int = 2 | 4 | 16


@dataclass(frozen=True)
class Registration:
    """Result of :func:`run_register` for one band of one scan.

    Attributes
    ----------
    geometry
        The solved :class:`~gpu2mass.geometry.FrameGeometry`.
    offsets_arcsec
        (n, 2) frame centre minus commanded position, (ξ east, η north), arcsec.
    track_arcsec
        (n, 2) the smooth pointing track (offsets smoothed over ~20 frames), arcsec.
    frame_errors_arcsec
        (n, 2) formal 1σ errors of the frame centres, arcsec.
    n_reference, n_pairs
        Reference and frame-to-frame matches used in the final iteration.
    rms_reference_arcsec, rms_pairs_arcsec
        RMS per coordinate of their residuals, arcsec.
    coarse_offset_arcsec
        The coarse offset of the commanded positions found by the vote.
    """

    geometry: FrameGeometry
    offsets_arcsec: np.ndarray
    track_arcsec: np.ndarray
    frame_errors_arcsec: np.ndarray
    n_reference: int
    n_pairs: int
    rms_reference_arcsec: float
    rms_pairs_arcsec: float
    coarse_offset_arcsec: tuple[float, float]


def _basis(u, v):
    s, t = u / DISTORTION_RADIUS_PX, v / DISTORTION_RADIUS_PX
    return np.stack([s**i * t**j for i, j in DISTORTION_TERMS], axis=-1)  # (m, 7)


def _coarse_offset(frame, u, v, cmd_ra, cmd_dec, ref: ReferenceStars, scale, radius):
    """Vote for the offset (ξ, η) arcsec of all frames from their commanded positions."""
    diffs = []
    for f in np.unique(frame):
        sel = frame == f
        xi_r, eta_r = tan_project(ref.ra, ref.dec, cmd_ra[f], cmd_dec[f])
        half = 1.45 * 128 * scale + radius
        near = (np.abs(xi_r) < half) & (np.abs(eta_r) < half)
        if not near.any():
            continue
        xi_d, eta_d = -scale * u[sel], scale * v[sel]
        tree = cKDTree(np.column_stack([xi_d, eta_d]))
        pairs = tree.query_ball_point(np.column_stack([xi_r[near], eta_r[near]]), radius)
        for (xr, er), idx in zip(np.column_stack([xi_r[near], eta_r[near]]), pairs, strict=True):
            for i in idx:
                diffs.append((xr - xi_d[i], er - eta_d[i]))
    if len(diffs) < 3:
        raise StepError("no reference star lies near any detection: the scan cannot be tied to the sky")
    d = np.asarray(diffs)
    bins = np.arange(-radius, radius + 1.0, 1.0)
    h, xe, ye = np.histogram2d(d[:, 0], d[:, 1], bins=[bins, bins])
    # Smooth the vote over 3×3 bins so a peak split between bins still wins.
    from scipy.ndimage import uniform_filter

    hs = uniform_filter(h, 3, mode="constant")
    i, j = np.unravel_index(np.argmax(hs), hs.shape)
    guess = np.array([(xe[i] + xe[i + 1]) / 2, (ye[j] + ye[j + 1]) / 2])
    near = np.hypot(*(d - guess).T) < 3.0
    return np.median(d[near], axis=0) if near.sum() >= 3 else guess


def run_register(detections, *, commanded_ra, commanded_dec, reference: ReferenceStars,
                 nx: int = 256, ny: int = 256, config: RegisterConfig = RegisterConfig()) -> Registration:
    """Solve the frame-to-sky mapping of one band of one scan.

    Parameters
    ----------
    detections
        Single-frame detections (table or mapping of arrays): ``frame`` (int), ``x``, ``y``
        (0-based pixels), ``snr``, and optionally ``x_err``, ``y_err`` (px; default 0.05)
        and ``flags`` (rows with any of ``config.reject_flags`` are not used).
    commanded_ra, commanded_dec
        (n,) commanded array-centre positions (deg), FRAMES ``RA_CMD``/``DEC_CMD``.
    reference
        Reference stars at the scan's epoch (:func:`gpu2mass.refcat.load_reference_stars`).

    Raises
    ------
    StepError
        Too few reference stars match (the scan cannot be tied to the sky), or no usable
        detections.
    """
    cfg = config
    cmd_ra = np.asarray(commanded_ra, float)
    cmd_dec = np.asarray(commanded_dec, float)
    n = cmd_ra.size
    def col(k):
        return np.asarray(detections[k])

    names = set(detections.colnames if hasattr(detections, "colnames") else detections)
    keep = col("snr") >= cfg.min_snr
    if "flags" in names:
        keep &= (col("flags").astype(np.int64) & cfg.reject_flags) == 0
    frame = col("frame").astype(np.int64)[keep]
    x, y = col("x")[keep].astype(float), col("y")[keep].astype(float)
    if "x_err" in names:
        sig_px = np.hypot(col("x_err")[keep], col("y_err")[keep]) / np.sqrt(2)
    else:
        sig_px = np.full(x.size, 0.05)
    sig_px = np.maximum(np.nan_to_num(sig_px, nan=0.2), 0.01)
    if frame.size == 0:
        raise StepError("no usable single-frame detections in this band")
    u, v = x - (nx - 1) / 2, y - (ny - 1) / 2
    B = _basis(u, v)

    coarse = _coarse_offset(frame, u, v, cmd_ra, cmd_dec, reference, cfg.nominal_scale_arcsec,
                            cfg.search_radius_arcsec)
    # Frame centres (the tangent points), starting at commanded + coarse offset.
    cen_ra, cen_dec = tan_deproject(np.full(n, coarse[0]), np.full(n, coarse[1]), cmd_ra, cmd_dec)
    a, b = cfg.nominal_scale_arcsec, 0.0
    c = np.zeros((2, _NT))
    ref_xy_err = reference.error_arcsec
    n_par = _NG + 2 * n
    stats = (0, 0, np.nan, np.nan)
    cov_diag = np.full(2 * n, np.nan)

    ref_order = np.argsort(reference.dec, kind="stable")
    ref_dec_sorted = np.asarray(reference.dec)[ref_order]
    for it in range(cfg.iterations):
        radius = cfg.match_radius_arcsec * (2.5 if it == 0 else 1.0)
        up = u + B @ c[0]
        vp = v + B @ c[1]
        xi = -a * up + b * vp
        eta = b * up + a * vp
        sky_ra, sky_dec = tan_deproject(xi, eta, cen_ra[frame], cen_dec[frame])
        sig = sig_px * np.hypot(a, b)
        # Jacobian blocks of each detection's own-plane position: (m, 16) for ξ and η.
        jx = np.column_stack([-up, vp, -a * B, b * B])
        jy = np.column_stack([vp, up, b * B, a * B])

        # Observations: detection index pairs (d1, d2) and frame pairs (f1, f2); d2 = f2 = -1
        # for a reference match, whose "second position" is the catalog star.
        d1s, d2s, f1s, f2s, res_l, w_l = [], [], [], [], [], []
        order = np.argsort(frame, kind="stable")
        by_frame = np.split(order, np.searchsorted(frame[order], np.arange(1, n)))
        for f in range(n):
            idx = by_frame[f]
            if idx.size == 0:
                continue
            tree = cKDTree(np.column_stack([xi[idx], eta[idx]]))
            # Reference stars, in this frame's plane: only those in its Dec band are
            # projected (a scan's catalog holds thousands; a frame sees tens).
            half = 1.45 * 128 * a + radius
            lo, hi = np.searchsorted(ref_dec_sorted, cen_dec[f] + np.array([-1.0, 1.0]) * 1.5 * half / 3600.0)
            band_idx = ref_order[lo:hi]
            xr, er = tan_project(reference.ra[band_idx], reference.dec[band_idx], cen_ra[f], cen_dec[f])
            inside = (np.abs(xr) < half) & (np.abs(er) < half)
            near, xr, er = band_idx[inside], xr[inside], er[inside]
            if near.size:
                dist, k = tree.query(np.column_stack([xr, er]), distance_upper_bound=radius)
                ok = np.isfinite(dist)
                d = idx[k[ok]]
                d1s.append(d)
                d2s.append(np.full(d.size, -1))
                f1s.append(np.full(d.size, f))
                f2s.append(np.full(d.size, -1))
                res_l.append(np.column_stack([xr[ok] - xi[d], er[ok] - eta[d]]))
                w_l.append(1.0 / (sig[d] ** 2 + ref_xy_err[near][ok] ** 2))
            # Later frames' detections, in this frame's plane: residual 0 − (pos_f − pos_g).
            # One projection and one tree query for all of them (a call per frame pair cost
            # ~1 s per band); each detection's match does not depend on the others'.
            i_all = np.concatenate(by_frame[f + 1:f + cfg.max_frame_gap + 1] or [np.zeros(0, np.int64)])
            if i_all.size == 0:
                continue
            x_all, e_all = tan_project(sky_ra[i_all], sky_dec[i_all], cen_ra[f], cen_dec[f])
            dist, k = tree.query(np.column_stack([x_all, e_all]), distance_upper_bound=radius)
            ok = np.isfinite(dist)
            dg, df = i_all[ok], idx[k[ok]]
            d1s.append(df)
            d2s.append(dg)
            f1s.append(np.full(df.size, f))
            f2s.append(frame[dg])
            res_l.append(np.column_stack([x_all[ok] - xi[df], e_all[ok] - eta[df]]))
            w_l.append(1.0 / (sig[df] ** 2 + sig[dg] ** 2))
        if not res_l:
            raise StepError("no matches between detections and reference stars or between frames")
        d1, d2 = np.concatenate(d1s), np.concatenate(d2s)
        f1, f2 = np.concatenate(f1s), np.concatenate(f2s)
        res, w = np.concatenate(res_l), np.concatenate(w_l)
        if it >= 2:  # outlier rejection once the solution is close
            good = np.hypot(*res.T) * np.sqrt(w / 2) < cfg.clip_sigma
            d1, d2, f1, f2, res, w = d1[good], d2[good], f1[good], f2[good], res[good], w[good]
        is_ref = d2 < 0
        n_ref = int(is_ref.sum())
        if n_ref < cfg.min_reference_matches:
            raise StepError(f"only {n_ref} reference stars match detections "
                            f"(need {cfg.min_reference_matches}): the scan cannot be tied to the sky")
        # Sparse Jacobian: each observation (a ξ and an η row) touches the 16 globals and the
        # offsets of one or two frames.
        m = res.shape[0]
        blocks = []
        for comp, jac in ((0, jx), (1, jy)):
            jg = jac[d1] - np.where(is_ref[:, None], 0.0, jac[np.maximum(d2, 0)])
            rows = 2 * np.arange(m) + comp
            rr = np.concatenate([np.repeat(rows, _NG), rows, rows[~is_ref]])
            cc = np.concatenate([np.tile(np.arange(_NG), m), _NG + 2 * f1 + comp,
                                 _NG + 2 * f2[~is_ref] + comp])
            vv = np.concatenate([jg.ravel(), np.ones(m), -np.ones(int((~is_ref).sum()))])
            blocks.append((rr, cc, vv))
        rr, cc, vv = (np.concatenate(z) for z in zip(*blocks, strict=True))
        J = sp.csr_matrix((vv, (rr, cc)), shape=(2 * m, n_par))
        W = np.repeat(w, 2)
        r = res.ravel()
        # The normal matrix is sparse: the 16 globals border a band of frame offsets (each
        # observation ties one or two nearby frames; the track prior ties neighbours). A
        # sparse LU solves it in milliseconds where a dense solve of (16 + 2n)² took ~0.2 s
        # per iteration for a 273-frame scan.
        N = (J.T @ sp.diags(W) @ J).tolil()
        g_vec = J.T @ (W * r)
        # Smoothness prior on the offsets from the commanded track (second differences).
        off_xi, off_eta = tan_project(cen_ra, cen_dec, cmd_ra, cmd_dec)
        prior = sp.lil_matrix((n_par, n_par))
        if n >= 3:
            D = sp.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n)).tocsr()
            DtD = (D.T @ D).tocoo()
            wt = 1.0 / cfg.track_sigma_arcsec**2
            for comp, off in ((0, off_xi), (1, off_eta)):
                rows = _NG + 2 * DtD.row + comp
                cols = _NG + 2 * DtD.col + comp
                prior += sp.coo_matrix((wt * DtD.data, (rows, cols)), shape=(n_par, n_par)).tolil()
                g_vec[_NG + 2 * np.arange(n) + comp] += wt * (D.T @ (-(D @ off)))
        # Weak priors: distortion towards 0; frames with nothing at all stay defined.
        diag = np.zeros(n_par)
        diag[2:_NG] = 1.0 / cfg.distortion_prior_px**2
        g_vec[2:_NG] += -c.ravel() / cfg.distortion_prior_px**2
        diag[_NG:] = 1e-8
        N = (N.tocsc() + prior.tocsc() + sp.diags(diag)).tocsc()
        try:
            lu = splu(N)
            delta = lu.solve(np.asarray(g_vec, float))
        except RuntimeError as exc:
            raise StepError(f"frame position solution is singular: {exc}") from None
        if not np.all(np.isfinite(delta)):
            raise StepError("frame position solution is singular (non-finite step)")
        a += delta[0]
        b += delta[1]
        c = c + delta[2:_NG].reshape(2, _NT)
        dxi, deta = delta[_NG::2], delta[_NG + 1 :: 2]
        cen_ra, cen_dec = tan_deproject(dxi, deta, cen_ra, cen_dec)
        chi2 = np.sum(W * r * r)
        stats = (n_ref, m - n_ref, float(np.sqrt(np.mean(res[is_ref] ** 2))),
                 float(np.sqrt(np.mean(res[~is_ref] ** 2))) if (~is_ref).any() else np.nan)
        if it == cfg.iterations - 1:
            dof = max(2 * m - n_par, 1)
            scale = max(chi2 / dof, 1.0)
            # Diagonal of the inverse for the offsets. A dense inverse of the (16 + 2n)²
            # normal matrix takes ~20 ms for a 273-frame scan; SuperLU's solve for the 2n
            # unit vectors took 0.2-0.9 s per band (the 16 globals make its factors dense).
            cov_diag = np.diag(np.linalg.inv(N.toarray()))[_NG:] * scale

    off_xi, off_eta = tan_project(cen_ra, cen_dec, cmd_ra, cmd_dec)
    offsets = np.column_stack([off_xi, off_eta])
    win = min(21, n if n % 2 == 1 else n - 1)
    track = savgol_filter(offsets, win, 2, axis=0) if win >= 5 else offsets.copy()
    geom = FrameGeometry(BandGeometry(nx, ny, float(np.hypot(a, b)), float(np.rad2deg(np.arctan2(b, a))), c),
                         cen_ra, cen_dec)
    return Registration(geom, offsets, track, np.sqrt(np.abs(cov_diag)).reshape(n, 2), stats[0], stats[1],
                        stats[2], stats[3], (float(coarse[0]), float(coarse[1])))
