"""Detection on Atlas Images against the tiny night's truth (gpu2mass.detect).

The Atlas Images are built exactly as ``tests/test_atlas.py`` builds them: ``simple_scan``
frames (calibrated the simplest way, no transient or saturation masks) with the TRUE
geometry, so what is tested is the detection step alone. Those frames keep every cosmic
ray, meteor trail, diffraction spike and stripe the simulator drew: they are real light
in the images and ``truth/artifacts.parquet`` lists them, so reliability counts a
detection on one of them as true.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from _frames import simple_scan
from scipy.spatial import cKDTree

from gpu2mass.atlas import AtlasConfig, plan_atlas_grids, run_atlas
from gpu2mass.detect import (
    FLAG_BITS,
    FLAG_EDGE,
    FLAG_HOLE,
    FLAG_SATURATED,
    FLAG_SECONDARY,
    DetectConfig,
    DetectWarning,
    atlas_psf,
    detection_maps,
    run_detect,
)
from gpu2mass.errors import ConfigError, InputError

BANDS = ("J", "H", "K")
MAG = {"J": "j_m", "H": "h_m", "K": "k_m"}
#: The 10σ limits of 2MASS (facts sheet 15 and 17): completeness must hold down to them.
LIMIT = {"J": 15.8, "H": 15.1, "K": 14.3}
ISOLATION_PX = 5.0  # 5" on the 1" Atlas grid


def _pixel_noise(s):
    d = np.diff(s.data, axis=2)
    ok = ~(s.bad[:, 1:] | s.bad[:, :-1])
    return np.array([1.4826 * np.median(np.abs(x[ok] - np.median(x[ok]))) for x in d]) / np.sqrt(2)


@pytest.fixture(scope="module")
def scans(tiny_night):
    return {b: simple_scan(tiny_night, b) for b in BANDS}


@pytest.fixture(scope="module")
def grids(scans):
    return plan_atlas_grids({b: s.geometry for b, s in scans.items()})


@pytest.fixture(scope="module")
def images(scans, grids):
    out = {}
    for b, s in scans.items():
        noise = _pixel_noise(s)
        out[b] = [
            run_atlas(s.data, mask=s.bad, geometry=s.geometry, noise=noise, grid=g, band=b,
                      scan=s.scan, scan_type="sci", scan_dir="n", sky=s.sky,
                      zp_mag=s.frames["zp_mag"],
                      seeing_arcsec=float(np.median(s.frames["fwhm_arcsec"])))
            for g in grids
        ]
    return out


@pytest.fixture(scope="module")
def detections(images):
    return {b: [run_detect(img) for img in imgs] for b, imgs in images.items()}


@pytest.fixture(scope="module")
def artifacts(tiny_night, scans, images):
    """Per band and image: (kind, x0, y0, x1, y1) of every artifact in Atlas pixels."""
    a = {k: np.asarray(v) for k, v in
         pq.read_table(tiny_night / "truth" / "artifacts.parquet").to_pydict().items()}
    out = {}
    for b, s in scans.items():
        sel = np.flatnonzero((a["scan"] == s.scan) & (a["band"] == b))
        ra0, de0 = s.geometry.pixel_to_sky(a["frame"][sel], a["x0"][sel], a["y0"][sel])
        ra1, de1 = s.geometry.pixel_to_sky(a["frame"][sel], a["x1"][sel], a["y1"][sel])
        out[b] = []
        for img in images[b]:
            x0, y0 = img.grid.sky_to_pixel(ra0, de0)
            x1, y1 = img.grid.sky_to_pixel(ra1, de1)
            out[b].append((a["kind"][sel], x0, y0, x1, y1))
    return out


def _segment_distance(px, py, x0, y0, x1, y1):
    """Distance (k, m) of points (k,) to segments (m,)."""
    px, py = px[:, None], py[:, None]
    dx, dy = x1 - x0, y1 - y0
    l2 = np.where(dx * dx + dy * dy > 0, dx * dx + dy * dy, 1.0)
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / l2, 0.0, 1.0)
    return np.hypot(px - (x0 + t * dx), py - (y0 + t * dy))


def _truth_on(img, src, band, margin=3.0):
    x, y = img.grid.sky_to_pixel(src["ra"], src["dec"])
    ny, nx = img.data.shape
    on = (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin)
    return x[on], y[on], src[MAG[band]][on], src["kind"][on]


def _completeness_sample(img, src, band, art):
    """Isolated truth stars at or brighter than the limit, wholly on >= 3-frame data.

    Isolated: no brighter truth source within 5" (the task's definition) and no artifact
    (cosmic ray, spike, meteor trail, persistence) within 5": a star under a meteor trail
    is not isolated, the trail is light on top of it.
    """
    x, y, m, kind = _truth_on(img, src, band)
    tree = cKDTree(np.stack([x, y], 1))
    iso = np.array([all(m[k] > m[i] for k in near if k != i)
                    for i, near in enumerate(tree.query_ball_point(np.stack([x, y], 1),
                                                                   ISOLATION_PX))])
    kinds, x0, y0, x1, y1 = art
    if kinds.size:
        iso &= _segment_distance(x, y, x0, y0, x1, y1).min(axis=1) > ISOLATION_PX
    ny, nx = img.data.shape
    xi, yi = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (xi >= 8) & (xi < nx - 8) & (yi >= 8) & (yi < ny - 8)
    cov = np.zeros(x.size, int)
    cov[inside] = img.coverage[yi[inside], xi[inside]]
    sel = inside & (cov >= 3) & iso & (kind == "star") & (m <= LIMIT[band])
    return x[sel], y[sel], m[sel]


# -- the PSF model and the noise ----------------------------------------------------------


def test_atlas_psf_model_matches_stacked_stars(scans, images):
    """The model (Moffat through the 2" pixel and the bilinear tent), placed at each bright
    isolated star's true sub-pixel position and scaled by least squares, against the Atlas
    pixels: the median residual stamp over the stars, relative to the model's peak."""
    for b in BANDS:
        src = scans[b].sources
        res = []
        for img in images[b]:
            seeing = img.header["SEEING"]
            x, y, m, kind = _truth_on(img, src, b)
            tree = cKDTree(np.stack([x, y], 1))
            sel = (kind == "star") & (m > LIMIT[b] - 6.0) & (m < LIMIT[b] - 2.5)
            for i in np.flatnonzero(sel):
                if len(tree.query_ball_point([x[i], y[i]], 12.0)) > 1:
                    continue
                xi, yi = int(np.rint(x[i])), int(np.rint(y[i]))
                psf = atlas_psf(seeing, offset=(x[i] - xi, y[i] - yi))
                h = psf.shape[0] // 2
                cut = img.data[yi - h:yi + h + 1, xi - h:xi + h + 1]
                if cut.shape != psf.shape or not np.isfinite(cut).all():
                    continue
                cut = cut - np.nanmedian(img.data[yi - 20:yi + 21, xi - 20:xi + 21])
                a_ = float((cut * psf).sum() / (psf * psf).sum())
                res.append((cut / a_ - psf) / psf.max())
        assert len(res) >= 10, b
        worst = float(np.max(np.abs(np.median(res, axis=0))))
        # Measured: 1.4 %, 1.9 %, 1.5 % of the peak (J, H, K; 35, 30, 20 stars).
        assert worst < 0.05, (b, worst)


def test_snr_map_has_unit_noise(scans, images, artifacts):
    """Robust std of the SNR map on source-free sky is 1 (required 0.9-1.1)."""
    for b in BANDS:
        src = scans[b].sources
        for k, img in enumerate(images[b]):
            maps = detection_maps(img)
            x, y, m, _ = _truth_on(img, src, b, margin=30)
            ny, nx = img.data.shape
            free = maps.usable & (maps.kernel_cover > 0.999) & (img.coverage >= 3)
            yy, xx = np.mgrid[:ny, :nx]
            _kinds, x0, y0, x1, y1 = artifacts[b][k]
            pts = [(xi, yi, 20 if mi < 12 else 10) for xi, yi, mi in zip(x, y, m, strict=True)
                   if mi < 17.0]
            # Artifacts: discs along each segment, every 8 pixels.
            for a, e, c, f in zip(x0, y0, x1, y1, strict=True):
                for u in np.linspace(0, 1, int(np.hypot(c - a, f - e) // 8) + 2):
                    pts.append((a + u * (c - a), e + u * (f - e), 8))
            for xi, yi, r in pts:
                y0_, y1_ = max(int(yi - r), 0), min(int(yi + r) + 1, ny)
                x0_, x1_ = max(int(xi - r), 0), min(int(xi + r) + 1, nx)
                if y1_ > y0_ and x1_ > x0_:
                    free[y0_:y1_, x0_:x1_] &= np.hypot(xx[y0_:y1_, x0_:x1_] - xi,
                                                       yy[y0_:y1_, x0_:x1_] - yi) > r
            v = maps.snr[free]
            assert v.size > 20_000
            std = 1.4826 * np.median(np.abs(v - np.median(v)))
            # Measured 0.92-0.97 by band and image (~3e5 free pixels each).
            assert 0.9 < std < 1.1, (b, k, std)
            assert abs(np.median(v)) < 0.15, (b, k, np.median(v))


# -- completeness, reliability, positions -------------------------------------------------


def test_completeness_of_isolated_stars(scans, images, detections, artifacts):
    """>= 99 % of isolated stars down to J 15.8, H 15.1, Ks 14.3 are detected within 2"."""
    for b in BANDS:
        found = total = 0
        for k, img in enumerate(images[b]):
            x, y, _ = _completeness_sample(img, scans[b].sources, b, artifacts[b][k])
            t = detections[b][k]
            d, _ = cKDTree(np.stack([t["x"], t["y"]], 1)).query(np.stack([x, y], 1))
            found += int(np.sum(d < 2.0))
            total += x.size
        # Measured: J 263/264, H 221/222, K 142/142 (the tiny night has ~140-260 per band).
        assert total >= 100, b
        assert found / total >= 0.99, (b, found, total)


def test_reliability_of_snr10_detections(scans, images, detections, artifacts):
    """>= 99.9 % of SNR >= 10 detections are a truth source (2") or an artifact (3")."""
    n_all = n_true = 0
    for b in BANDS:
        for k, img in enumerate(images[b]):
            t = detections[b][k]
            t = t[t["snr"] >= 10]
            x, y, _, _ = _truth_on(img, scans[b].sources, b)
            d, _ = cKDTree(np.stack([x, y], 1)).query(np.stack([t["x"], t["y"]], 1))
            ok = d < 2.0
            kinds, x0, y0, x1, y1 = artifacts[b][k]
            if kinds.size and (~ok).any():
                ok[~ok] = _segment_distance(t["x"][~ok], t["y"][~ok], x0, y0, x1, y1).min(
                    axis=1) < 3.0
            n_all += len(t)
            n_true += int(ok.sum())
    # Measured: 697 of 697 (about a third lie on the meteor trail, cosmic rays and spikes
    # that these unmasked frames keep).
    assert n_all >= 500
    assert n_true / n_all >= 0.999, (n_true, n_all)


def test_positions_against_truth(scans, images, detections):
    """Unflagged, isolated SNR 20-500 stars: position rms vs truth (Atlas pixels = arcsec)."""
    for b in BANDS:
        err = []
        for k, img in enumerate(images[b]):
            t = detections[b][k]
            t = t[(t["flags"] == 0) & (t["snr"] >= 20) & (t["snr"] <= 500)]
            x, y, _m, kind = _truth_on(img, scans[b].sources, b)
            tree = cKDTree(np.stack([x, y], 1))
            d, j = tree.query(np.stack([t["x"], t["y"]], 1))
            crowd = np.array([len(tree.query_ball_point([x[i], y[i]], 8.0)) for i in j])
            ok = (d < 2.0) & (kind[j] == "star") & (crowd == 1)
            err.append(d[ok])
        err = np.concatenate(err)
        assert err.size >= 50, b
        rms = float(np.sqrt(np.mean(err**2)))
        # Measured: J 0.13", H 0.07", K 0.08" (104, 93, 55 stars); the PSF fitter refines.
        assert rms < 0.15, (b, rms)


def test_ra_dec_follow_the_grid(images, detections):
    img, t = images["K"][1], detections["K"][1]
    ra, dec = img.grid.pixel_to_sky(t["x"], t["y"])
    np.testing.assert_allclose(t["ra"], ra)
    np.testing.assert_allclose(t["dec"], dec)
    assert np.all(np.diff(t["snr"]) <= 0)
    assert set(t.colnames) >= {"x", "y", "ra", "dec", "snr", "flux", "peak", "npix", "flags",
                                "group"}


def test_flux_estimate_against_truth(scans, images, detections):
    """The matched-filter flux of isolated stars vs 10^(-0.4 (m - MAGZP))."""
    ratios = []
    for k, img in enumerate(images["K"]):
        t = detections["K"][k]
        t = t[(t["flags"] == 0) & (t["snr"] > 30)]
        x, y, m, kind = _truth_on(img, scans["K"].sources, "K")
        tree = cKDTree(np.stack([x, y], 1))
        d, j = tree.query(np.stack([t["x"], t["y"]], 1))
        crowd = np.array([len(tree.query_ball_point([x[i], y[i]], 10.0)) for i in j])
        ok = (d < 1.0) & (kind[j] == "star") & (crowd == 1)
        truth = 10 ** (-0.4 * (m[j[ok]] - img.header["MAGZP"]))
        ratios.append(t["flux"][ok] / truth)
    r = np.concatenate(ratios)
    assert r.size >= 20
    # Measured: median 0.984 over 40 stars (the PSF fitter and the curve of growth give
    # the photometry).
    assert abs(np.median(r) - 1.0) < 0.05, np.median(r)


# -- blends -------------------------------------------------------------------------------


def _noise_frames_with_stars(s, rng, ra, dec, flux, fwhm, *, half_size, spikes=0):
    """The K scan's frames as pure noise (10 DN per pixel) with Moffat stars (index 2.5,
    sampled FWHM ``fwhm`` arcsec) of ``flux`` DN at (ra, dec) through the true geometry;
    the first ``spikes`` stars also throw the simulator's diffraction spikes. Returns the
    (n, 256, 256) float32 frames and the per-frame noise."""
    from gpu2mass.kernels import render_point_sources

    from gpu2mass.sim.artifacts import add_spikes
    from gpu2mass.sim.psf import moffat_alpha, optical_fwhm

    alpha = moffat_alpha(float(optical_fwhm(fwhm)) / 2.0, 2.5)
    noise = np.full(s.geometry.nframes, 10.0)
    frames = (rng.normal(size=s.data.shape) * noise[:, None, None]).astype(np.float32)
    for k in range(s.geometry.nframes):
        fx, fy = s.geometry.sky_to_pixel(k, ra, dec)
        on = (fx > -15) & (fx < 270) & (fy > -15) & (fy < 270)
        if on.any():
            frames[k] += render_point_sources((256, 256), fx[on], fy[on], flux[on], alpha, 2.5,
                                              half_size=half_size)
        for i in np.flatnonzero(on[:spikes]):
            add_spikes(frames[k], fx[i], fy[i], flux[i], 5.0, "K", rotation_deg=0.0,
                       sky_sigma=10.0, ids=(0, "K", k), parent_id=0)
    return frames, noise


def _detect_pairs(scans, grids, rng, *, n, sep, dmag, fwhm, f1_log=(3.0, 3.5), config=None):
    """Synthetic pairs rendered into the K frames (true geometry), resampled by run_atlas
    and detected: ``sep`` and ``dmag`` are (low, high) ranges (arcsec, mag fainter), the
    brighter member's flux 10**U(f1_log) DN. Returns the detections, both members'
    positions, the pair centres and, per pair, whether it came out as two detections
    within 1.5" of their stars and how many more detections lie within 8" of its centre."""
    s = scans["K"]
    g = grids[1]
    # Pair centres on a jittered lattice, well inside the image.
    cx = rng.uniform(40, g.nx - 40, n)
    cy = 40 + (np.arange(n) + rng.uniform(0, 0.5, n)) * (g.ny - 80) / n
    sep = rng.uniform(*sep, n)
    ang = rng.uniform(0, np.pi, n)
    x1, y1 = cx + 0.5 * sep * np.cos(ang), cy + 0.5 * sep * np.sin(ang)
    x2, y2 = cx - 0.5 * sep * np.cos(ang), cy - 0.5 * sep * np.sin(ang)
    f1 = 10 ** rng.uniform(*f1_log, n)
    f2 = f1 * 10 ** (-0.4 * rng.uniform(*dmag, n))
    ra, dec = g.pixel_to_sky(np.r_[x1, x2], np.r_[y1, y2])
    frames, noise = _noise_frames_with_stars(s, rng, ra, dec, np.r_[f1, f2], fwhm, half_size=12)
    img = run_atlas(frames, mask=s.bad, geometry=s.geometry, noise=noise, grid=g,
                    seeing_arcsec=fwhm, config=AtlasConfig(background_match=False))
    t = run_detect(img, config=config or DetectConfig())
    tree = cKDTree(np.stack([t["x"], t["y"]], 1))
    d1, j1 = tree.query(np.stack([x1, y1], 1))
    d2, j2 = tree.query(np.stack([x2, y2], 1))
    two = (d1 < 1.5) & (d2 < 1.5) & (j1 != j2)
    extra = np.array([max(0, len(tree.query_ball_point([cx[i], cy[i]], 8.0)) - 2) for i in range(n)])
    return t, (j1, j2), sep, two, extra


def test_close_pairs_come_out_as_two(scans, grids, rng):
    """Pairs 3"-6" apart, the fainter 0-1.5 mag below the brighter (SNR ~60-200): the
    fraction found as two detections, each within 1.5" of its star."""
    n = 120
    t, (j1, j2), sep, two, extra = _detect_pairs(scans, grids, rng, n=n, sep=(3.0, 6.0),
                                                 dmag=(0.0, 1.5), fwhm=2.9)
    near = sep < 4.5
    # Measured (seeing 2.9", Atlas PSF FWHM 3.6"): 4.5-6" apart 0.87, 3-4.5" 0.10 (closer
    # than the Atlas FWHM: the PSF fitter sees those as one).
    assert two[~near].mean() >= 0.75, two[~near].mean()
    assert two[near].mean() >= 0.05, two[near].mean()
    # Split pairs closer than the blend radius (measured positions) share a blend group.
    close = two & (np.hypot(t["x"][j1] - t["x"][j2], t["y"][j1] - t["y"][j2])
                   <= DetectConfig().blend_radius_arcsec)
    assert close.sum() >= 10
    assert np.all(t["group"][j1[close]] == t["group"][j2[close]])
    assert np.any(t["flags"][j2[two]] & FLAG_SECONDARY) or np.any(t["flags"][j1[two]]
                                                                  & FLAG_SECONDARY)
    # No spurious third detection near a pair. Measured: 3 around 120 pairs (4 before a
    # merged peak took over its nearest companion).
    assert extra.sum() <= 0.05 * n, extra.sum()


def test_equal_pairs_at_the_blend_radius_are_two_not_three(scans, grids, rng):
    """Near-equal pairs 5.0"-5.5" apart at 3.0" seeing: the matched filter's merged peak
    lies midway, farther than the merge radius from both stars' sharp peaks, which both
    become companions. On a ci night such a pair came out as three detections, the middle
    one's failed fit measured by a 4" aperture summing both stars (a false J 14.6
    source); the merged peak now takes over its nearest companion. Measured: all 60 pairs
    as two, 1 third detection (23 without the takeover)."""
    _, _, _, two, extra = _detect_pairs(scans, grids, rng, n=60, sep=(5.0, 5.5), dmag=(0.0, 0.4),
                                        fwhm=3.0)
    assert two.mean() >= 0.95, two.mean()
    assert extra.sum() <= 3, extra.sum()


def test_pairs_at_the_blend_radius_in_poor_seeing(scans, grids, rng):
    """Pairs 5.0"-5.6" apart at 3.1" seeing, the fainter 1.2-1.8 mag below (SNR ~10-40):
    the matched filter merges each into one peak, on the brighter's shoulder, and the
    sharp filter must give back the fainter star without a third detection. Measured: 33 %
    of pairs as two, no third detection (55 % without the sharp map's 3σ dip floor, at a
    cost in reliability: ``DetectConfig``); the rest show the fainter star as a shoulder
    without a peak of its own."""
    n = 60
    _, _, _, two, extra = _detect_pairs(scans, grids, rng, n=n, sep=(5.0, 5.6), dmag=(1.2, 1.8),
                                        fwhm=3.1)
    assert two.mean() >= 0.25, two.mean()
    assert extra.sum() <= 1, extra.sum()


# -- saturation, holes, edges ------------------------------------------------------------------


def _star_on(images, scans, band, mag):
    src = scans[band].sources
    i = int(np.argmin(np.abs(src["k_m"] - mag)))
    for k, img in enumerate(images[band]):
        x, y = img.grid.sky_to_pixel(src["ra"][i], src["dec"][i])
        if 20 < x < img.data.shape[1] - 20 and 20 < y < img.data.shape[0] - 20:
            return k, float(x), float(y)
    pytest.fail(f"no image holds the star of {band} {mag}")


def test_saturated_star_is_one_detection(scans, images, detections):
    """The Ks 3.0 star: in these unmasked frames its R2-R1 core is a crater (R1 already
    saturated), and with its core masked (what the frames step does) a hole; both ways one
    detection near its position, not a ring."""
    for b in BANDS:
        k, x, y = _star_on(images, scans, b, 3.0)
        t = detections[b][k]
        d = np.hypot(t["x"] - x, t["y"] - y)
        assert np.sum(d < 10.0) == 1, (b, t[d < 10.0])
        assert d.min() < 1.5, (b, d.min())
    img = images["K"][k]
    yy, xx = np.mgrid[:img.data.shape[0], :img.data.shape[1]]
    core = np.hypot(xx - x, yy - y) < 5.0
    data, cov, sig = img.data.copy(), img.coverage.copy(), img.sigma.copy()
    data[core], sig[core], cov[core] = np.nan, np.nan, 0
    t = run_detect(data, sigma=sig, coverage=cov, seeing_fwhm_arcsec=img.header["SEEING"],
                   grid=img.grid)
    d = np.hypot(t["x"] - x, t["y"] - y)
    assert np.sum(d < 12.0) == 1, t[d < 12.0]
    row = t[np.argmin(d)]
    assert d.min() < 1.5
    assert row["flags"] & FLAG_HOLE and row["flags"] & FLAG_SATURATED


def test_coverage_edge_and_large_nan_region(images, detections):
    img = images["K"][1]
    data, cov, sig = img.data.copy(), img.coverage.copy(), img.sigma.copy()
    data[:, :200] = np.nan  # a large unusable region touching the border: not a hole
    cov[:, :200] = 0
    t = run_detect(data, sigma=sig, coverage=cov, seeing_fwhm_arcsec=img.header["SEEING"])
    assert len(t) > 20
    assert np.all(t["x"] >= 199.5)
    edge = t["x"] < 205
    assert np.all(t["flags"][edge] & FLAG_EDGE)
    # Away from the cut, the same detections as on the whole image (one noise scale differs
    # by the region left out, so SNR within a few %).
    full = detections["K"][1]
    far = full[full["x"] > 230]
    mine = t[t["x"] > 230]
    d, _j = cKDTree(np.stack([mine["x"], mine["y"]], 1)).query(np.stack([far["x"], far["y"]], 1))
    strong = far["snr"] > 8
    assert np.mean(d[strong] < 0.5) > 0.97


def test_arrays_and_atlas_image_agree(images, detections):
    img = images["H"][0]
    t = run_detect(img.data, sigma=img.sigma, coverage=img.coverage,
                   seeing_fwhm_arcsec=img.header["SEEING"], grid=img.grid)
    ref = detections["H"][0]
    assert len(t) == len(ref)
    np.testing.assert_allclose(t["x"], ref["x"])
    np.testing.assert_allclose(t["snr"], ref["snr"])


def test_pure_noise_gives_no_detection(rng):
    data = rng.normal(size=(256, 256)).astype(np.float32)
    sig = np.ones_like(data)
    cov = np.full(data.shape, 6, np.uint8)
    with pytest.warns(DetectWarning, match="no sources"):
        t = run_detect(data, sigma=sig, coverage=cov, seeing_fwhm_arcsec=2.9,
                       config=DetectConfig(threshold_snr=5.5))
    assert len(t) == 0 and "snr" in t.colnames


def test_bad_input_and_config():
    with pytest.raises(ConfigError, match="detect.threshold_snr"):
        DetectConfig(threshold_snr=0.0)
    with pytest.raises(ConfigError, match="detect.mesh_filter"):
        DetectConfig(mesh_filter=2)
    with pytest.raises(ConfigError, match="merge_radius"):
        DetectConfig(merge_radius_arcsec=6.0)
    z = np.zeros((64, 64), np.float32)
    with pytest.raises(InputError, match="no usable pixel"):
        run_detect(z, sigma=z, coverage=z.astype(np.uint8), seeing_fwhm_arcsec=2.9)
    with pytest.raises(InputError, match="one \\(ny, nx\\) shape"):
        run_detect(z, sigma=z[:10], coverage=z.astype(np.uint8), seeing_fwhm_arcsec=2.9)
    with pytest.raises(InputError, match="seeing_fwhm"):
        run_detect(z, sigma=z + 1, coverage=z.astype(np.uint8) + 1, seeing_fwhm_arcsec=-1.0)
    with pytest.raises(InputError, match="needs sigma"):
        run_detect(z)
    assert all(isinstance(v, str) for v in FLAG_BITS.values())


def _wing_pairs_found(scans, grids, *, seed, sep, dmag, off):
    """40 pairs of a bright star (SNR ~1000-3000, seeing 3.1") and one ``dmag`` fainter
    ``sep`` arcsec away, detected with the default config and with ``off`` replacing some
    of it. Returns ({"on", "off"}: fraction found as two detections, with no other
    detection near any pair), and the detections within 16" of the same bright stars
    alone (their neighbour 15 mag fainter)."""
    import dataclasses

    kw = {"n": 40, "sep": sep, "fwhm": 3.1, "f1_log": (4.3, 4.7)}
    found = {}
    for name, cfg in (("on", DetectConfig()), ("off", dataclasses.replace(DetectConfig(), **off))):
        _, _, _, two, extra = _detect_pairs(scans, grids, np.random.default_rng(seed), dmag=dmag,
                                            config=cfg, **kw)
        found[name] = two.mean()
        assert extra.sum() == 0
    t, (j1, _), _, _, _ = _detect_pairs(scans, grids, np.random.default_rng(seed), dmag=(15.0, 15.0), **kw)
    tree = cKDTree(np.stack([t["x"], t["y"]], 1))
    return found, sum(len(tree.query_ball_point([t["x"][j], t["y"][j]], 16.0)) - 1 for j in j1)


def test_stars_on_a_bright_neighbours_wing_are_found(scans, grids):
    """A faint star 10.5-14" from a star 4.5-6 mag brighter (SNR ~1000-3000) in poor
    seeing (3.1") can show no matched-filter peak of its own, the bright wing's slope
    being steeper; the sharp filter shows it (``hidden_ring_arcsec``). Measured on 40
    pairs: 80 % found as two detections, 45 % without the search; no other detection near
    the pairs, and none around the same bright stars when they have no neighbour."""
    found, lone = _wing_pairs_found(scans, grids, seed=11, sep=(10.5, 14.0), dmag=(4.5, 6.0),
                                    off={"hidden_ring_arcsec": 0.0})
    assert found["on"] >= 0.7 and found["off"] <= 0.6, found
    assert lone == 0


def test_stars_closer_in_on_a_bright_wing_are_found(scans, grids):
    """6-10" from a star 3-5 mag brighter (SNR ~1000-3000, seeing 3.1") a faint star can
    show no peak in either map; the sharp map less the bright star's azimuthal median
    profile shows it (``wing_parent_snr``, step 7b). Measured on 40 pairs: 88 % found as
    two detections, 50 % without; no other detection near the pairs, and none within 16"
    of the same bright stars alone (7 there before the profile margin)."""
    found, lone = _wing_pairs_found(scans, grids, seed=12, sep=(6.0, 10.0), dmag=(3.0, 5.0),
                                    off={"wing_parent_snr": 0.0})
    assert found["on"] >= 0.8 and found["off"] <= 0.6, found
    assert lone == 0


def test_saturated_star_in_a_bright_wing_search_adds_no_source(scans, grids):
    """A saturated star (10**6.8-7.4 DN, core masked as the frames step masks it, with the
    simulator's diffraction spikes) 11-16" from a bright unsaturated one (SNR ~1000-3000)
    lies in that star's wing search (step 7b), which sees its spikes and masked core as
    peaks. The saturated star absorbs them like any peak around it: no detection within 7"
    of it but its own. Measured on 16 pairs: none; 11 when the wing peaks are kept (as
    two false sources 4.3-4.7" from J 6.3 and H 5.0 stars were on ci seed 2); 2 on one
    star when the absorb radius was measured from its peak alone, on the hole's rim 4.2"
    from its centre."""
    s, g = scans["K"], grids[1]
    rng = np.random.default_rng(4)
    n, fwhm = 16, 3.1
    cx = rng.uniform(50, g.nx - 50, n)
    cy = 50 + (np.arange(n) + rng.uniform(0, 0.4, n)) * (g.ny - 100) / n
    sep, ang = rng.uniform(11.0, 16.0, n), rng.uniform(0, np.pi, n)
    xs, ys = cx + 0.5 * sep * np.cos(ang), cy + 0.5 * sep * np.sin(ang)  # saturated
    xp, yp = cx - 0.5 * sep * np.cos(ang), cy - 0.5 * sep * np.sin(ang)  # wing parent
    flux = np.r_[10 ** rng.uniform(6.8, 7.4, n), 10 ** rng.uniform(4.3, 4.7, n)]
    ra, dec = g.pixel_to_sky(np.r_[xs, xp], np.r_[ys, yp])
    frames, noise = _noise_frames_with_stars(s, rng, ra, dec, flux, fwhm, half_size=20, spikes=n)
    img = run_atlas(frames, mask=s.bad[None] | (frames > 60000), geometry=s.geometry,
                    noise=noise, grid=g, seeing_arcsec=fwhm,
                    config=AtlasConfig(background_match=False))
    t = run_detect(img)
    tree = cKDTree(np.stack([t["x"], t["y"]], 1))
    d, j = tree.query(np.stack([xs, ys], 1))
    # One saturated detection each, at its peak: on the hole's rim, up to 4.2" off (the R1
    # and radial-profile fits measure these stars).
    assert np.all(d < 5.0) and np.all(t["flags"][j] & FLAG_SATURATED), (d, t["flags"][j])
    extra = [len(tree.query_ball_point([xs[i], ys[i]], 7.0)) - 1 for i in range(n)]
    assert sum(extra) == 0, extra
    # The wing parents themselves are still found (a few lie within a saturated star's
    # absorb radius: 12 of 16 found).
    assert np.mean(tree.query(np.stack([xp, yp], 1))[0] < 1.5) >= 0.6


def test_stars_five_to_six_arcsec_from_a_brighter_one_are_found(scans, grids):
    """Between the sharp companions (within 5") and the old wing search (from 6"): a star
    5-6" from one 2-3 mag brighter (SNR ~1000-3000) in poor seeing, as three of ci seed 7's
    J misses were. Measured on 40 pairs: 68 % found as two detections (each within 1.5"),
    28 % with the wing search from 6"; no third detection near any pair (two were, when a
    wing peak 2.2" from a mis-placed sharp companion of the same star was kept:
    ``wing_clear_arcsec``), none around the same bright stars alone."""
    found, lone = _wing_pairs_found(scans, grids, seed=13, sep=(5.0, 6.0), dmag=(2.0, 3.0),
                                    off={"wing_inner_arcsec": 6.0})
    assert found["on"] >= 0.55 and found["off"] <= 0.4, found
    assert lone == 0
