"""PSF photometry on the stack of frames (PROPHOT, 2MAPPS IV.4; facts sheet 3.3).

Sources found on the Atlas Images (:mod:`gpu2mass.detect`) are measured on the calibrated
R2−R1 frames that cover them, usually six, all at once: per source a flux and a sky position
common to every frame, with each frame's mapping to the sky held fixed (from registration,
:class:`~gpu2mass.geometry.FrameGeometry`) and each frame's own PSF (from
:mod:`gpu2mass.psfmodel`). Host bookkeeping here; the fits are the batched kernel
:func:`gpu2mass.kernels.psffit.fit_psf_groups` (Levenberg–Marquardt, one group per CUDA
block, ``prange`` on the CPU).

1. **Groups.** Sources closer than :attr:`PsfPhotConfig.group_radius_arcsec` (5",
   2MASS) to each other are linked (friends of friends) and fitted together; so is a
   source with a brighter one farther out whose wing, somewhere in the source's data
   region, is at least :attr:`PsfPhotConfig.wing_link_fraction` of the source's own peak
   (within :attr:`PsfPhotConfig.wing_link_arcsec`), and a source found on a bright star's
   wing (``wing``: detection step 7b) with the brightest source within that distance.
   The fit then models that wing instead of a flat background. Alone, a J 13.5 star 6.3"
   from a J 11.45 one was fitted 2.0" off in J (psfchi 39) and 4.2" off in H (ci seed 7),
   and stars found on a wing 2.7–2.9" off (seeds 7, 12): the wing's slope pulled them. A
   group of
   more than :attr:`PsfPhotConfig.max_group` (7, 2MASS ``bl_flg``) is cut into pieces of
   at most 7 around its brightest members, each piece fitted with the others' light
   subtracted at their initial fluxes (so that a crowd never drops a source).
2. **Common coordinates.** Each group's (u, v) is the gnomonic plane about its centre in
   units of the nominal frame pixel (east, north); a frame's affine map (u, v) → frame pixel
   is the local linearisation of its geometry at the centre (its non-linearity across a
   15-pixel stamp is below 1e-4 px).
3. **Stamps and data region.** ``stamp_size``² frame pixels around the group centre in
   every frame whose array holds it at least ``edge_px`` from the edge (at most
   ``max_frames``); weights 1/σ_f² on unmasked pixels within ``data_radius_px`` (2 camera
   pixels, 2MASS) of any member's initial position, 0 elsewhere.
4. **Local background.** Per frame and group, the median of the stamp's unmasked pixels
   farther than ``background_clear_arcsec`` from every member, subtracted (the frames are
   already sky-subtracted; this takes out what the sky-illumination model leaves).
5. **Results.** Flux (DN in R2−R1, the frames' unit), its error, sky position and its
   errors (arcsec), the reduced χ² over the data region (``psfchi``), the number of frames
   and pixels used, the group size (``bl_flg``) and the fit status bits.

Flux errors are those of the fit (inverse of the weighted normal matrix with the frames'
pixel noise); :mod:`gpu2mass.cogphot`-style normalisation to aperture magnitudes and the
2MASS error recalibration (``cmsig``) come after this step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from gpu2mass.backend import get_namespace, to_host
from gpu2mass.errors import ConfigError
from gpu2mass.geometry import FrameGeometry, tan_deproject, tan_project

__all__ = ["PSF_STATUS_BITS", "PsfPhotConfig", "PsfPhotWarning", "run_psf_photometry"]

#: Status bits of a PSF measurement: the kernel's (1 not converged, 2 singular, 4 flux
#: <= 0, 8 held at the position bound, 16 no data) plus this step's.
PSF_STATUS_BITS = {
    "not_converged": 1,
    "singular": 2,
    "nonpositive_flux": 4,
    "position_bound": 8,
    "no_data": 16,
    "no_frames": 32,
    "group_split": 64,
}


class PsfPhotWarning(UserWarning):
    """A PSF-photometry call that measured nothing (no sources, or none on any frame)."""


@dataclass(frozen=True)
class PsfPhotConfig:
    """Settings of PSF photometry on the frame stack (2MASS values where published).

    Attributes
    ----------
    group_radius_arcsec
        Sources closer than this are fitted together (5", facts sheet 3.3).
    wing_link_arcsec, wing_link_fraction
        A source is fitted together with a brighter one within ``wing_link_arcsec`` (17":
        the detection's wing search reaches 16", plus position errors) whose light per
        pixel, at the near edge of the source's data region (``data_radius_px`` closer),
        is at least ``wing_link_fraction`` (0.1) of the source's own peak pixel (both
        from the initial fluxes and the frames' median Moffat). Decided: at 2.7" seeing
        0.1 links a source to any brighter one within ~7" (their data regions overlap),
        to one 1.1 mag brighter at 8", 2.9 mag at 10", 4.3 mag at 12", 6.4 mag at 16".
        Synthetic pairs 7–13", 3.5–5.5 mag (``tests/test_psfphot.py``): Δm scatter 0.184
        mag alone, 0.129 with 0.1 (19 of 30 pairs linked), 0.114 with all linked; with
        0.3, 11 were linked and the fluxes of the others were within 2σ. A source found on a wing (``wing``) is linked to the brightest
        source within ``wing_link_arcsec`` whatever the fraction. 0 turns the light test
        off.
    max_group
        Most sources per simultaneous fit (7: the largest ``bl_flg``).
    data_radius_px
        Pixels within this distance (camera pixels) of a member are fitted (2, 2MASS).
    stamp_size
        Stamp side, camera pixels (odd; 17 = 34": the 5" group reach plus the data region
        and a background border).
    background_clear_arcsec
        Stamp pixels farther than this from every member estimate the local background (8").
    edge_px
        A frame is used if the group centre lies at least this far inside its array (2 px).
    max_frames
        Most frames per group (8; a scan gives 6, sometimes 7).
    max_iter, tol
        Iteration budget and convergence tolerance of the fit (kernel ``max_iter``,
        ``tol``: the fit stops when every Gauss-Newton step component is below ``tol``
        times its conditional error). 0.01: a hundredth of an error bar; on the scan
        preset's Ks sources the fluxes move by at most 0.004 σ and the positions by at most
        0.06 σ against 0.001, with 3.7 instead of 5.3 passes per group on average (the fit
        is a quarter faster).
    max_shift_px
        A fitted position may move at most this far (camera pixels) from the Atlas
        detection (1.5 px = 3": detections are good to a fraction of an arcsec; a member
        wandering further is pulled into a neighbour).
    pixel_scale_arcsec
        Nominal camera pixel, arcsec (2.0): the unit of (u, v).
    """

    group_radius_arcsec: float = 5.0
    wing_link_arcsec: float = 17.0
    wing_link_fraction: float = 0.1
    max_group: int = 7
    data_radius_px: float = 2.0
    stamp_size: int = 17
    background_clear_arcsec: float = 8.0
    edge_px: float = 2.0
    max_frames: int = 8
    max_iter: int = 50
    tol: float = 1e-2
    max_shift_px: float = 1.5
    pixel_scale_arcsec: float = 2.0

    def __post_init__(self):
        checks = (
            ("group_radius_arcsec", self.group_radius_arcsec >= 0, ">= 0"),
            ("wing_link_arcsec", self.wing_link_arcsec >= 0, ">= 0"),
            ("wing_link_fraction", self.wing_link_fraction >= 0, ">= 0"),
            ("max_group", 1 <= self.max_group <= 7, "in [1, 7]"),
            ("data_radius_px", self.data_radius_px > 0, "> 0"),
            ("stamp_size", self.stamp_size >= 7 and self.stamp_size % 2 == 1, "odd and >= 7"),
            ("background_clear_arcsec", self.background_clear_arcsec > 0, "> 0"),
            ("edge_px", self.edge_px >= 0, ">= 0"),
            ("max_frames", self.max_frames >= 1, ">= 1"),
            ("max_iter", self.max_iter >= 1, ">= 1"),
            ("tol", self.tol > 0, "> 0"),
            ("max_shift_px", self.max_shift_px > 0, "> 0"),
            ("pixel_scale_arcsec", self.pixel_scale_arcsec > 0, "> 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"psfphot.{name} must be {rule}, not {getattr(self, name)!r}")


def _groups(xi, eta, flux, radius, max_group, links=()):
    """Friends-of-friends groups of positions (arcsec), cut into pieces of <= max_group.
    ``links``: further (i, j) pairs to put in one group, whatever their distance.

    Returns (members: list of index arrays, split: bool per piece)."""
    n = xi.size
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = [np.asarray(links, np.int64).reshape(-1, 2)]
    if n > 1 and radius > 0:
        pairs.append(cKDTree(np.column_stack([xi, eta])).query_pairs(radius, output_type="ndarray"))
    for i, j in np.concatenate(pairs):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
    roots = np.array([find(i) for i in range(n)])
    pieces, split = [], []
    for r in np.unique(roots):
        idx = np.flatnonzero(roots == r)
        if idx.size <= max_group:
            pieces.append(idx)
            split.append(False)
            continue
        # Cut around the brightest: each piece is a seed and its nearest unassigned members.
        left = idx[np.argsort(-flux[idx], kind="stable")]
        while left.size:
            seed = left[0]
            d = np.hypot(xi[left] - xi[seed], eta[left] - eta[seed])
            take = left[np.argsort(d, kind="stable")[:max_group]]
            pieces.append(np.sort(take))
            split.append(True)
            left = np.setdiff1d(left, take, assume_unique=True)
            left = left[np.argsort(-flux[left], kind="stable")]
    return pieces, split


def run_psf_photometry(frames, *, mask, noise, geometry: FrameGeometry, psf_alpha, psf_beta,
                       ra, dec, flux, wing=None, gain_e_per_dn: float = 0.0,
                       config: PsfPhotConfig = PsfPhotConfig()) -> Table:
    """Fit every source on the stack of frames that cover it.

    Parameters
    ----------
    frames
        float32 (n, ny, nx): calibrated, sky-subtracted R2−R1 frames, DN (NumPy or CuPy).
    mask
        (ny, nx) or (n, ny, nx), non-zero = do not use (bad, saturated, transient).
    noise
        (n,) per-pixel noise of each frame, DN (host).
    geometry
        The frames' mapping to the sky (registration).
    psf_alpha, psf_beta
        (n,) Moffat core width (camera pixels) and index of each frame's PSF.
    ra, dec
        (m,) source positions, degrees (from the Atlas detection).
    flux
        (m,) initial flux estimates, DN (R2−R1), > 0 (e.g. the detection's).
    wing
        (m,) bool or None: sources found on a bright neighbour's wing (detection flag
        ``FLAG_WING``), each fitted together with the brightest source within
        :attr:`PsfPhotConfig.wing_link_arcsec`.
    gain_e_per_dn
        Detector gain (e⁻/DN): each pixel's variance is the frame's noise² plus the
        source's own photon noise, max(data, 0)/gain (0: background noise only). For a
        star of J 11 the photon noise of its core pixels equals the background's; leaving it
        out makes the errors of bright stars too small by up to 4× (measured on ``ci``).
    config
        :class:`PsfPhotConfig`.

    Returns
    -------
    astropy.table.Table
        One row per input source, in input order, on the host: ``ra``, ``dec`` (deg),
        ``ra_err``, ``dec_err`` (arcsec, along RA·cos δ and Dec), ``flux``, ``flux_err``
        (DN), ``psfchi``, ``npix``, ``nframes``, ``bl_flg`` (sources fitted together),
        ``group`` (id), ``status`` (:data:`PSF_STATUS_BITS`). Sources that no frame covers
        have NaN measurements and status ``no_frames``.
    """
    from gpu2mass.kernels.psffit import fit_psf_groups

    cfg = config
    xp = get_namespace(frames)
    n, ny, nx = frames.shape
    noise = np.asarray(noise, float)
    alpha = np.broadcast_to(np.asarray(psf_alpha, float), (n,))
    beta = np.broadcast_to(np.asarray(psf_beta, float), (n,))
    ra, dec = np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float))
    flux0 = np.maximum(np.atleast_1d(np.asarray(flux, float)), 1e-3)
    m = ra.size
    out = _empty(m)
    if m == 0:
        warnings.warn("no sources to measure", PsfPhotWarning, stacklevel=2)
        return out
    mask = xp.asarray(mask)
    if mask.ndim == 2:
        mask = mask[None]
    ra0, dec0 = float(np.median(ra)), float(np.median(dec))
    xi, eta = tan_project(ra, dec, ra0, dec0)
    links = _wing_links(xi, eta, flux0, wing, cfg.wing_link_arcsec, cfg.wing_link_fraction,
                        cfg.data_radius_px * cfg.pixel_scale_arcsec,
                        float(np.median(alpha)) * cfg.pixel_scale_arcsec, float(np.median(beta)))
    pieces, split = _groups(xi, eta, flux0, cfg.group_radius_arcsec, cfg.max_group, links)
    scale = cfg.pixel_scale_arcsec
    s = cfg.stamp_size
    half = s // 2
    F, K = cfg.max_frames, 7
    G = len(pieces)
    gid = np.empty(m, np.int64)
    centre = np.empty((G, 2))
    for g, idx in enumerate(pieces):
        gid[idx] = g
        centre[g] = (xi[idx].mean(), eta[idx].mean())
    c_ra, c_dec = tan_deproject(centre[:, 0], centre[:, 1], ra0, dec0)

    # Frames covering each group centre, and the linear map (u, v) -> frame pixel there.
    # Only the (group, frame) pairs near each other are mapped exactly (a scan's frame
    # holds a few per cent of its groups): mapping every pair cost seconds per band.
    pg, pk, fx, fy = geometry.frames_holding(c_ra, c_dec)
    inside = (fx >= cfg.edge_px) & (fx <= nx - 1 - cfg.edge_px) & (fy >= cfg.edge_px) & (fy <= ny - 1 - cfg.edge_px)
    pg, pk, fx, fy = pg[inside], pk[inside], fx[inside], fy[inside]
    # Per group at most F frames, those where it lies most centrally (ties: earlier frame),
    # then in frame order.
    d = np.hypot(fx - (nx - 1) / 2, fy - (ny - 1) / 2)
    order = np.lexsort((pk, d, pg))
    pg, pk = pg[order], pk[order]
    first = np.searchsorted(pg, np.arange(G))
    rank = np.arange(pg.size) - first[pg]
    keep = rank < F
    pg, pk = pg[keep], pk[keep]
    order = np.lexsort((pk, pg))
    pg, pk = pg[order], pk[order]
    frame_of = np.full((G, F), -1, np.int64)
    frame_of[pg, np.arange(pg.size) - np.searchsorted(pg, np.arange(G))[pg]] = pk
    gi, fi = np.nonzero(frame_of >= 0)
    ki = frame_of[gi, fi]
    maps = np.zeros((G, F, 2, 3))
    if gi.size:
        step = 1.0  # (u, v) units: camera pixels
        pts = {}
        for name, du, dv in (("0", 0, 0), ("u", step, 0), ("v", 0, step)):
            r_, d_ = tan_deproject((centre[gi, 0] + du * scale), (centre[gi, 1] + dv * scale), ra0, dec0)
            pts[name] = geometry.sky_to_pixel(ki, r_, d_)
        x0, y0 = pts["0"]
        ox, oy = np.rint(x0) - half, np.rint(y0) - half  # stamp origin in the frame
        maps[gi, fi, 0] = np.column_stack([x0 - ox, (pts["u"][0] - x0) / step, (pts["v"][0] - x0) / step])
        maps[gi, fi, 1] = np.column_stack([y0 - oy, (pts["u"][1] - y0) / step, (pts["v"][1] - y0) / step])
    # Stamps (gathered on the device; pixels off the array are NaN and weight 0).
    stamps = np.full((G, F, s, s), np.nan, np.float32)
    bad = np.ones((G, F, s, s), bool)
    if gi.size:
        rows = (oy[:, None] + np.arange(s)[None, :]).astype(np.int64)  # (q, s)
        cols = (ox[:, None] + np.arange(s)[None, :]).astype(np.int64)
        rv = (rows >= 0) & (rows < ny)
        cv = (cols >= 0) & (cols < nx)
        rr = np.clip(rows, 0, ny - 1)
        cc = np.clip(cols, 0, nx - 1)
        kk = xp.asarray(ki)[:, None, None]
        cut = to_host(frames[kk, xp.asarray(rr)[:, :, None], xp.asarray(cc)[:, None, :]])
        mk = mask[kk if mask.shape[0] > 1 else 0 * kk, xp.asarray(rr)[:, :, None], xp.asarray(cc)[:, None, :]]
        mk = to_host(mk) != 0
        valid = rv[:, :, None] & cv[:, None, :]
        stamps[gi, fi] = np.where(valid, cut, np.nan)
        bad[gi, fi] = mk | ~valid | ~np.isfinite(cut)

    # Initial parameters in (u, v), camera pixels.
    init = np.zeros((G, K, 3))
    nsrc = np.zeros(G, np.int32)
    for g, idx in enumerate(pieces):
        nsrc[g] = idx.size
        init[g, : idx.size, 0] = flux0[idx]
        init[g, : idx.size, 1] = (xi[idx] - centre[g, 0]) / scale
        init[g, : idx.size, 2] = (eta[idx] - centre[g, 1]) / scale
    # Pixel positions of every member in every stamp: data region and background pixels.
    yy, xx = np.mgrid[0:s, 0:s]
    mx = maps[:, :, 0, 0, None] + maps[:, :, 0, 1, None] * init[:, None, :, 1] + maps[:, :, 0, 2, None] * init[:, None, :, 2]
    my = maps[:, :, 1, 0, None] + maps[:, :, 1, 1, None] * init[:, None, :, 1] + maps[:, :, 1, 2, None] * init[:, None, :, 2]
    # Squared distance (G, F, s, s) to the nearest member, slot by slot over the groups that
    # have that slot (most groups have one member: no (G, F, K, s, s) array).
    d2 = (xx - mx[:, :, 0, None, None]) ** 2 + (yy - my[:, :, 0, None, None]) ** 2  # slot 0
    for k in range(1, K):
        gk = np.flatnonzero(nsrc > k)
        if gk.size == 0:
            break
        dk = (xx - mx[gk, :, k, None, None]) ** 2 + (yy - my[gk, :, k, None, None]) ** 2
        d2[gk] = np.minimum(d2[gk], dk)
    region = (d2 <= cfg.data_radius_px**2) & ~bad
    clear = (d2 > (cfg.background_clear_arcsec / scale) ** 2) & ~bad
    # Light of the other pieces of a split crowd, at their initial fluxes, is subtracted.
    extra = _other_pieces_light(pieces, split, gid, xi, eta, flux0, centre, maps, frame_of,
                                alpha, beta, scale, s)
    stamps = stamps - extra
    bg = _stamp_medians(np.where(clear, stamps, np.nan))
    bg = np.where(np.isfinite(bg), bg, 0.0)
    stamps = np.where(np.isfinite(stamps), stamps - bg[..., None, None], 0.0).astype(np.float32)
    has = frame_of >= 0
    var = noise[np.maximum(frame_of, 0)][..., None, None] ** 2
    if gain_e_per_dn > 0:
        var = var + np.maximum(stamps, 0.0) / gain_e_per_dn
    weights = np.where(region & has[..., None, None], 1.0 / var, 0.0).astype(np.float32)
    psf = np.ones((G, F, 2))
    psf[..., 0] = np.where(has, alpha[np.maximum(frame_of, 0)], 1.0)
    psf[..., 1] = np.where(has, beta[np.maximum(frame_of, 0)], 2.5)
    fit = fit_psf_groups(xp.asarray(stamps), xp.asarray(weights), xp.asarray(maps), xp.asarray(psf),
                         xp.asarray(np.ones((G, F))), xp.asarray(init), xp.asarray(nsrc),
                         max_iter=cfg.max_iter, tol=cfg.tol, chi_radius=cfg.data_radius_px,
                         max_shift=cfg.max_shift_px)
    params, errors = to_host(fit.params), to_host(fit.errors)
    chi2, npix, status = to_host(fit.chi2), to_host(fit.npix), to_host(fit.status)

    slot = np.empty(m, np.int64)
    for idx in pieces:
        slot[idx] = np.arange(idx.size)
    p = params[gid, slot]
    e = errors[gid, slot]
    u_as = centre[gid, 0] + p[:, 1] * scale
    v_as = centre[gid, 1] + p[:, 2] * scale
    out["ra"], out["dec"] = tan_deproject(u_as, v_as, ra0, dec0)
    out["ra_err"], out["dec_err"] = e[:, 1] * scale, e[:, 2] * scale
    out["flux"], out["flux_err"] = p[:, 0], e[:, 0]
    out["psfchi"] = chi2[gid, slot]
    out["npix"] = npix[gid, slot]
    out["nframes"] = has.sum(axis=1)[gid]
    out["bl_flg"] = nsrc[gid]
    out["group"] = gid
    st = status[gid, slot].astype(np.int32)
    st |= np.where(out["nframes"] == 0, PSF_STATUS_BITS["no_frames"], 0).astype(np.int32)
    st |= np.where(np.asarray(split)[gid], PSF_STATUS_BITS["group_split"], 0).astype(np.int32)
    out["status"] = st
    none = out["nframes"] == 0
    # A fit that failed (singular, no data, non-positive flux) has no position worth more
    # than the Atlas detection's: keep that.
    failed = none | ((st & (PSF_STATUS_BITS["singular"] | PSF_STATUS_BITS["no_data"]
                            | PSF_STATUS_BITS["nonpositive_flux"])) != 0)
    for c in ("ra", "dec"):
        out[c][failed] = (ra if c == "ra" else dec)[failed]
    for c in ("ra_err", "dec_err"):
        out[c][failed] = np.nan
    for c in ("ra_err", "dec_err", "flux", "flux_err", "psfchi"):
        out[c][none] = np.nan
    if none.all():
        warnings.warn("no source lies on any frame", PsfPhotWarning, stacklevel=2)
    return out


def _wing_links(xi, eta, flux, wing, radius, fraction, data_radius, alpha, beta):
    """(k, 2) pairs of sources to fit together beyond the group radius (arcsec throughout).

    Each source and every brighter one within ``radius`` whose Moffat (``alpha``,
    ``beta``) light per pixel at ``data_radius`` closer than the source reaches
    ``fraction`` of the source's peak pixel (``fraction`` 0: none); and each ``wing``
    source and the brightest other source within ``radius`` when that one is brighter."""
    if xi.size < 2:
        return np.zeros((0, 2), np.int64)
    tree = cKDTree(np.column_stack([xi, eta]))
    pairs = [np.zeros((0, 2), np.int64)]
    if fraction > 0:
        ij = tree.query_pairs(radius, output_type="ndarray")
        if ij.size:
            # Faint member first.
            ij = np.where((flux[ij[:, 0]] <= flux[ij[:, 1]])[:, None], ij, ij[:, ::-1])
            d = np.hypot(xi[ij[:, 0]] - xi[ij[:, 1]], eta[ij[:, 0]] - eta[ij[:, 1]])
            reach = np.maximum(d - data_radius, 0.0)
            wing_light = flux[ij[:, 1]] * (1.0 + (reach / alpha) ** 2) ** -beta
            pairs.append(ij[wing_light >= fraction * flux[ij[:, 0]]])
    if wing is not None and np.any(wing):
        for i in np.flatnonzero(np.asarray(wing, bool)):
            near = np.asarray(tree.query_ball_point([xi[i], eta[i]], radius), np.int64)
            near = near[near != i]
            if near.size:
                j = near[np.argmax(flux[near])]
                if flux[j] > flux[i]:
                    pairs.append(np.array([[i, j]], np.int64))
    return np.concatenate(pairs)


def _stamp_medians(a):
    """Median of the finite pixels of each stamp of ``a`` (G, F, s, s), NaN for a stamp
    with none: numpy.nanmedian over the last two axes (the same values), by one sort of
    all stamps (nanmedian goes stamp by stamp through masked arrays, 15x slower)."""
    flat = np.sort(a.reshape(*a.shape[:2], -1), axis=-1)  # NaN sort last
    n = np.isfinite(flat).sum(axis=-1)
    lo = np.take_along_axis(flat, np.maximum((n - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(flat, (n // 2)[..., None], axis=-1)[..., 0]
    return np.where(n > 0, (lo + hi) / 2, np.nan)


def _other_pieces_light(pieces, split, gid, xi, eta, flux0, centre, maps, frame_of, alpha, beta,
                        scale, s):
    """(G, F, s, s) model light of the sources of a split crowd's *other* pieces, at their
    initial fluxes, in each piece's stamps (zero for groups that were not split)."""
    from gpu2mass.kernels.psf import render_psf_stamps

    G, F = frame_of.shape
    extra = np.zeros((G, F, s, s), np.float32)
    split = np.asarray(split)
    if not split.any():
        return extra
    tree = cKDTree(np.column_stack([xi, eta]))
    reach = (s / 2 + 3) * scale * np.sqrt(2)
    for g in np.flatnonzero(split):
        near = np.asarray(tree.query_ball_point(centre[g], reach), np.int64)
        near = near[gid[near] != g]
        for f in np.flatnonzero(frame_of[g] >= 0):
            k = frame_of[g, f]
            u = (xi[near] - centre[g, 0]) / scale
            v = (eta[near] - centre[g, 1]) / scale
            M = maps[g, f]
            x = M[0, 0] + M[0, 1] * u + M[0, 2] * v
            y = M[1, 0] + M[1, 1] * u + M[1, 2] * v
            ix, iy = np.rint(x), np.rint(y)
            h = s
            st = render_psf_stamps(x - ix, y - iy, flux0[near], np.full(near.size, alpha[k]),
                                   np.full(near.size, beta[k]), half_size=h, target="cpu")
            for j in range(near.size):
                a0, b0 = int(h - iy[j]), int(h - ix[j])
                if 0 <= a0 <= 2 * h + 1 - s and 0 <= b0 <= 2 * h + 1 - s:
                    extra[g, f] += st[j, a0:a0 + s, b0:b0 + s]
    return extra


def _empty(m: int) -> Table:
    t = Table()
    for c, dt in (("ra", float), ("dec", float), ("ra_err", float), ("dec_err", float),
                  ("flux", float), ("flux_err", float), ("psfchi", float)):
        t[c] = np.full(m, np.nan, dt)
    for c in ("npix", "nframes", "bl_flg", "group", "status"):
        t[c] = np.zeros(m, np.int32 if c != "group" else np.int64)
    for c, u in (("ra", "deg"), ("dec", "deg"), ("ra_err", "arcsec"), ("dec_err", "arcsec")):
        t[c].unit = u
    return t
