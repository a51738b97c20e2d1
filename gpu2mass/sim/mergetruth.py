"""Seeded synthetic truth for band merging and band-fills: ``(data, truth)`` generators.

- :func:`band_catalogs`: J, H, Ks detection lists of a Poisson star field in U-scan
  coordinates, with 2MASS-like position errors, per-band incompleteness, blending of
  unresolved pairs and band-to-band systematic offsets, and the truth they came from;
- :func:`atlas_like_image`: an Atlas-like 1" image made the way :mod:`gpu2mass.atlas`
  makes one (2" frames with white noise, interpolated bilinearly at random sub-pixel
  phases, coadded), with its exact ``SIGMA`` map and injected point sources.

Host NumPy; every random number comes from the caller's :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = ["M10", "OFFSETS", "atlas_like_image", "band_catalogs", "position_sigma"]

#: Magnitudes at SNR 10 of the six-frame coadd (facts sheet 17: J 15.8, H 15.1, Ks 14.3).
M10 = {"J": 15.8, "H": 15.1, "K": 14.3}
#: Default band-to-band systematic offsets (x_scan, y_scan), arcsec: 0.1–0.2" between bands.
OFFSETS = {"J": (0.08, -0.05), "H": (-0.07, 0.08), "K": (0.02, 0.12)}


def position_sigma(snr, *, floor: float = 0.05, coef: float = 2.0):
    """1-sigma position error per axis (arcsec): ``sqrt(floor² + (coef / snr)²)``.

    0.054" at SNR 100, 0.2" at SNR 10, 0.40" at SNR 5 (the 2MASS range: ~0.05" for bright
    stars to ~0.4" at the detection limit)."""
    snr = np.asarray(snr, float)
    return np.sqrt(floor**2 + (coef / snr) ** 2)


def band_catalogs(
    rng: np.random.Generator,
    *,
    density_per_arcmin2: float,
    width_arcsec: float = 512.0,
    length_arcsec: float = 1800.0,
    k_range: tuple[float, float] = (9.0, 16.3),
    count_slope: float = 0.30,
    m10: dict | None = None,
    detect_snr: float = 5.0,
    random_loss: float = 0.01,
    resolve_arcsec: float = 1.5,
    offsets: dict | None = None,
    axis_ratio: tuple[float, float] = (1.1, 0.9),
    correlation: float = 0.3,
):
    """Detection lists of a synthetic star field and their truth.

    Stars: Poisson, ``density_per_arcmin2`` × area, uniform over the
    ``width × length`` strip centred on (0, 0); Ks drawn from counts with
    d log N / dm = ``count_slope`` over ``k_range``; colours J−H ~ N(0.55, 0.15),
    H−Ks ~ N(0.15, 0.08).

    Each band: stars closer than ``resolve_arcsec`` are one object (friends of friends on
    the true positions; its flux is their sum and its position their flux-weighted
    centroid in that band: a blend no detector resolves). True SNR = 10 × 10^(−0.4 (m −
    m10)); measured SNR = true + N(0, 1); detected when measured > ``detect_snr`` and not
    lost at random (``random_loss``: masked pixels, artifacts). Position = centroid +
    band offset (``offsets``) + Gaussian error of covariance ``[[sx², r sx sy], [r sx sy,
    sy²]]`` with ``sx, sy = axis_ratio × position_sigma(true SNR)``, r = ``correlation``;
    the reported errors use the measured SNR.

    Returns
    -------
    (detections, truth)
        ``detections``: band → Table with ``x_scan``, ``y_scan``, ``sig_x``, ``sig_y``,
        ``sig_xy``, ``snr``, ``m`` (object magnitude), ``group`` (truth object id),
        ``x_true``, ``y_true`` (object centroid without offset or error).
        ``truth``: one row per star: ``id``, ``group``, ``x``, ``y``, ``j_m``, ``h_m``,
        ``k_m``; ``meta["detected_density"]``: band → detections per arcmin².
    """
    m10 = dict(M10 if m10 is None else m10)
    offsets = dict(OFFSETS if offsets is None else offsets)
    area = width_arcsec * length_arcsec / 3600.0
    n = int(rng.poisson(density_per_arcmin2 * area))
    x = rng.uniform(-width_arcsec / 2, width_arcsec / 2, n)
    y = rng.uniform(-length_arcsec / 2, length_arcsec / 2, n)
    lo, hi = k_range
    u = rng.uniform(0, 1, n)
    a, b = 10 ** (count_slope * lo), 10 ** (count_slope * hi)
    k_m = np.log10(a + u * (b - a)) / count_slope
    h_m = k_m + np.clip(rng.normal(0.15, 0.08, n), -0.1, 0.6)
    j_m = h_m + np.clip(rng.normal(0.55, 0.15, n), 0.0, 1.2)
    mags = {"J": j_m, "H": h_m, "K": k_m}
    # Unresolved groups.
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(resolve_arcsec, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) \
        else coo_matrix((n, n))
    ngroup, group = connected_components(graph, directed=False)
    truth = Table({"id": np.arange(n), "group": group, "x": x, "y": y,
                   "j_m": j_m, "h_m": h_m, "k_m": k_m})
    dets = {}
    dens = {}
    for band in ("J", "H", "K"):
        f = 10 ** (-0.4 * mags[band])
        ftot = np.bincount(group, f, ngroup)
        gx = np.bincount(group, f * x, ngroup) / ftot
        gy = np.bincount(group, f * y, ngroup) / ftot
        m = -2.5 * np.log10(ftot)
        snr_true = 10 * 10 ** (-0.4 * (m - m10[band]))
        snr = snr_true + rng.normal(0, 1, ngroup)
        det = (snr > detect_snr) & (rng.uniform(0, 1, ngroup) >= random_loss)
        gi = np.flatnonzero(det)
        s_true = position_sigma(snr_true[gi])
        sx, sy = axis_ratio[0] * s_true, axis_ratio[1] * s_true
        z1, z2 = rng.normal(0, 1, gi.size), rng.normal(0, 1, gi.size)
        ex = sx * z1
        ey = sy * (correlation * z1 + math.sqrt(1 - correlation**2) * z2)
        s_rep = position_sigma(snr[gi])
        rx, ry = axis_ratio[0] * s_rep, axis_ratio[1] * s_rep
        dx, dy = offsets[band]
        order = rng.permutation(gi.size)  # detection lists are not in truth order
        t = Table({
            "x_scan": (gx[gi] + dx + ex)[order], "y_scan": (gy[gi] + dy + ey)[order],
            "sig_x": rx[order], "sig_y": ry[order], "sig_xy": (correlation * rx * ry)[order],
            "snr": snr[gi][order], "m": m[gi][order], "group": gi[order],
            "x_true": gx[gi][order], "y_true": gy[gi][order],
        })
        dets[band] = t
        dens[band] = gi.size / area
    truth.meta["detected_density"] = dens
    truth.meta["area_arcmin2"] = area
    return dets, truth


def _moffat_pixel_flux(cx, cy, x0, y0, size, alpha, beta, sub=8):
    """Flux fraction of square pixels (centres cx, cy; side ``size``) of a Moffat at (x0, y0)."""
    s = ((np.arange(sub) + 0.5) / sub - 0.5) * size
    dx = cx[..., None, None] + s[:, None] - x0
    dy = cy[..., None, None] + s[None, :] - y0
    r2 = dx**2 + dy**2
    dens = (beta - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
    return dens.mean(axis=(-1, -2)) * size * size


def atlas_like_image(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int] = (512, 512),
    nframes: int = 6,
    sigma_frame: float = 10.0,
    sources=None,
    fwhm_arcsec: float = 2.8,
    beta: float = 2.5,
    stamp_arcsec: float = 24.0,
):
    """An Atlas-like 1" image and its ``SIGMA`` map, made like :func:`gpu2mass.atlas.run_atlas`.

    ``nframes`` frames of 2" pixels with white noise ``sigma_frame`` (DN per frame pixel)
    and the ``sources`` (x, y, flux: 1" pixel coordinates of the output, total flux in DN)
    drawn as pixel-integrated Moffats (index ``beta``, FWHM ``fwhm_arcsec``, out to
    ``stamp_arcsec``), each frame at its own random sub-pixel phase, are interpolated
    bilinearly onto the 1" grid, multiplied by the Jacobian 1/4 (flux is conserved) and
    averaged. ``SIGMA`` is the exact per-pixel noise of that average.

    Returns
    -------
    (image, sigma, truth)
        float64 (ny, nx) arrays and a Table of the sources (``x``, ``y``, ``flux``).
    """
    from gpu2mass.bandmerge import _tent_matrix  # the same tent as the noise factor

    ny, nx = shape
    if sources is None:
        sources = (np.zeros(0), np.zeros(0), np.zeros(0))
    sx_, sy_, sf_ = (np.asarray(v, float) for v in sources)
    alpha = fwhm_arcsec / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    image = np.zeros(shape)
    var = np.zeros(shape)
    jac = 0.25
    for _ in range(nframes):
        phx, phy = rng.uniform(0, 2, 2)
        tx, ty = _tent_matrix(nx, phx), _tent_matrix(ny, phy)
        kx0 = math.floor(phx / 2.0) - 1
        ky0 = math.floor(phy / 2.0) - 1
        frame = rng.normal(0.0, sigma_frame, (ty.shape[1], tx.shape[1]))
        # Frame pixel (l, k) is centred at output coordinate (2 (ky0 + l) − phy, 2 (kx0 + k) − phx).
        half = int(stamp_arcsec / 2) + 1
        for x0, y0, f in zip(sx_, sy_, sf_, strict=True):
            kc = round((x0 + phx) / 2.0) - kx0
            lc = round((y0 + phy) / 2.0) - ky0
            ks = np.arange(max(kc - half // 2, 0), min(kc + half // 2 + 1, tx.shape[1]))
            ls = np.arange(max(lc - half // 2, 0), min(lc + half // 2 + 1, ty.shape[1]))
            if ks.size == 0 or ls.size == 0:
                continue
            cx = 2.0 * (kx0 + ks) - phx
            cy = 2.0 * (ky0 + ls) - phy
            frame[np.ix_(ls, ks)] += f * _moffat_pixel_flux(cx[None, :], cy[:, None], x0, y0, 2.0,
                                                            alpha, beta)
        image += jac * (ty @ frame @ tx.T)
        var += (jac * sigma_frame) ** 2 * (ty**2).sum(1)[:, None] * (tx**2).sum(1)[None, :]
    image /= nframes
    sigma = np.sqrt(var) / nframes
    return image, sigma, Table({"x": sx_, "y": sy_, "flux": sf_})
