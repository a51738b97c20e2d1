"""Single-frame detection and photometry against the simulator's truth, and against SEP.

On the tiny night's science scan (30 frames of 256 x 256 per band, ``simple_scan``): the
truth sources projected with the true frame geometry give each star's pixel position, and
its flux in R2−R1 DN is ``10**(-0.4 (m - zp_mag))``; its expected 4" aperture flux is that
times the aperture fraction of the simulator's own pixel fractions (``pixel_fractions`` at
the star's sub-pixel phase) minus the area times the star's own light in the sky annulus.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from _frames import simple_scan
from gpu2mass.kernels.reference.detect import aperture_weights

from gpu2mass.framedet import (
    COLUMNS,
    FLAG_BLENDED,
    FrameDetConfig,
    FrameDetWarning,
    moffat_alpha_px,
    run_frame_detection,
)
from gpu2mass.sim.psf import optical_fwhm, pixel_fractions

BANDS = ("J", "H", "K")
_MAG = {"J": "j_m", "H": "h_m", "K": "k_m"}
R_AP, R_IN, R_OUT = 2.0, 7.0, 10.0  # px: 4", 14", 20" at 2"/px


def _gain(night, band):
    return json.loads((night / "night.json").read_text())["instrument"]["gain_e_per_dn"][band]


@pytest.fixture(scope="module")
def scans(tiny_night):
    return {b: simple_scan(tiny_night, b) for b in BANDS}


@pytest.fixture(scope="module")
def detections(tiny_night, scans):
    """Our detections per band, the seeing estimated from the frames (the default)."""
    out = {}
    for b, s in scans.items():
        cfg = FrameDetConfig(gain_e_per_dn=_gain(tiny_night, b))
        out[b] = run_frame_detection(s.data, mask=s.bad, noise=s.noise, config=cfg)
    return out


def _expected_aperture_fraction(fwhm_sampled, fx, fy):
    """Aperture fraction minus annulus contribution of a star at phase (fx, fy) px."""
    frac = pixel_fractions(fwhm_sampled, phase=(fx, fy), half=12)
    off = np.arange(-12, 13)
    cx = off[None, :] - fx
    cy = off[:, None] - fy
    w = aperture_weights(cx, cy, R_AP)
    d2 = cx**2 + cy**2
    ann = (d2 >= R_IN**2) & (d2 <= R_OUT**2)
    return float((w * frac).sum() - w.sum() * np.median(frac[ann]))


def _truth_table(scan, night):
    """Per (frame, source): truth x, y, flux and expected aperture flux, with selections."""
    src = scan.sources
    m = src[_MAG[scan.band]]
    n, ny, nx = scan.data.shape
    gain = _gain(night, scan.band)
    rows = []
    ap_area = math.pi * R_AP**2
    bad = scan.bad
    for f in range(n):
        x, y = scan.geometry.sky_to_pixel(f, src["ra"], src["dec"])
        on = (x > -15) & (x < nx + 15) & (y > -15) & (y < ny + 15) & np.isfinite(m)
        idx = np.flatnonzero(on)
        flux = 10 ** (-0.4 * (m[idx] - scan.frames["zp_mag"][f]))
        xs, ys, ms = x[idx], y[idx], m[idx]
        # isolation: no other source brighter than m + 2.5 within 10" (5 px)
        d2 = (xs[:, None] - xs[None, :]) ** 2 + (ys[:, None] - ys[None, :]) ** 2
        brighter = (ms[None, :] < ms[:, None] + 2.5) & (d2 < 25.0) & (d2 > 0)
        isolated = ~brighter.any(axis=1)
        snr = flux * 0.8 / np.sqrt(ap_area * scan.noise[f] ** 2 + flux * 0.8 / gain)
        inside = (xs >= 10) & (xs <= nx - 11) & (ys >= 10) & (ys <= ny - 11)
        ix = np.clip(np.rint(xs).astype(int), 0, nx - 1)
        iy = np.clip(np.rint(ys).astype(int), 0, ny - 1)
        clean = np.array([not bad[max(j - 3, 0) : j + 4, max(i - 3, 0) : i + 4].any()
                          for i, j in zip(ix, iy, strict=True)])
        star = src["kind"][idx] == "star"
        rows.append({"frame": np.full(idx.size, f), "src": idx, "x": xs, "y": ys, "m": ms, "flux": flux,
                         "snr": snr, "good": star & isolated & inside & clean & (ms > 8.5)})
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _match(det, truth, frame, radius=1.5):
    """Index of the nearest detection (same frame) within radius px of each truth row."""
    out = np.full(truth["x"].size, -1)
    for f in np.unique(truth["frame"]):
        ti = np.flatnonzero(truth["frame"] == f)
        di = np.flatnonzero(det["frame"] == f)
        if not di.size:
            continue
        d2 = ((truth["x"][ti, None] - det["x"][None, di]) ** 2
              + (truth["y"][ti, None] - det["y"][None, di]) ** 2)
        best = d2.argmin(axis=1)
        ok = d2[np.arange(ti.size), best] < radius**2
        out[ti[ok]] = di[best[ok]]
    return out


@pytest.fixture(scope="module")
def truth(tiny_night, scans):
    return {b: _truth_table(s, tiny_night) for b, s in scans.items()}


@pytest.mark.parametrize("band", BANDS)
def test_completeness_positions_and_fluxes(band, scans, detections, truth):
    s, det, t = scans[band], detections[band], truth[band]
    assert set(det.colnames) == set(COLUMNS)
    sel = t["good"] & (t["snr"] >= 20)
    match = _match(det, t, t["frame"])
    found = match[sel] >= 0
    completeness = found.mean()
    print(f"\n{band}: {sel.sum()} truth stars SNR>=20, completeness {completeness:.4f}")
    assert sel.sum() > 100
    assert completeness >= 0.98

    # Positions: bright, unflagged (fit converged, no blend), fit with the estimated seeing.
    b = sel & (t["snr"] > 50) & (match >= 0)
    di = match[b]
    ok = det["flags"][di] == 0
    dx = det["x"][di][ok] - t["x"][b][ok]
    dy = det["y"][di][ok] - t["y"][b][ok]
    rms = math.sqrt(np.mean(np.r_[dx, dy] ** 2))
    print(f"{band}: {ok.sum()} bright: bias x {dx.mean():+.4f} y {dy.mean():+.4f} px, "
          f"rms {rms:.4f} px; median reported err {np.median(det['x_err'][di][ok]):.4f}")
    assert ok.sum() > 30
    assert rms <= 0.05
    assert abs(dx.mean()) <= 0.02 and abs(dy.mean()) <= 0.02

    # 4" aperture flux against the truth aperture flux (unflagged, SNR >= 20).
    m = sel & (match >= 0)
    di = match[m]
    ok = det["flags"][di] == 0
    fw = s.frames["fwhm_arcsec"]
    exp = np.array([
        flux * _expected_aperture_fraction(fw[f], x - round(x), y - round(y))
        for f, x, y, flux in zip(t["frame"][m][ok], t["x"][m][ok], t["y"][m][ok],
                                 t["flux"][m][ok], strict=True)
    ])
    got = det["flux"][di][ok]
    err = det["flux_err"][di][ok]
    ratio = np.median(got / exp) - 1
    z = (got - exp) / err
    zstd = 1.4826 * np.median(np.abs(z - np.median(z)))
    print(f"{band}: {ok.sum()} fluxes: median bias {ratio:+.4f}, normalized residual "
          f"robust std {zstd:.3f}, median z {np.median(z):+.3f}")
    assert abs(ratio) <= 0.02
    assert 0.8 <= zstd <= 1.25


def _artifact_distance(art, band, scan, frame, x, y):
    """Distance (px) from (x, y) to the nearest truth artifact segment on this frame."""
    sel = (art["band"] == band) & (art["scan"] == scan) & (art["frame"] == frame)
    if not sel.any():
        return np.full(x.shape, np.inf)
    a = {k: v[sel] for k, v in art.items()}
    x0, y0, x1, y1 = (np.asarray(a[k], float)[None, :] for k in ("x0", "y0", "x1", "y1"))
    vx, vy = x1 - x0, y1 - y0
    L2 = np.maximum(vx**2 + vy**2, 1e-12)
    u = np.clip(((x[:, None] - x0) * vx + (y[:, None] - y0) * vy) / L2, 0, 1)
    return np.hypot(x[:, None] - x0 - u * vx, y[:, None] - y0 - u * vy).min(axis=1)


@pytest.mark.parametrize("band", BANDS)
def test_false_detections_are_rare(band, tiny_night, scans, detections):
    s, det = scans[band], detections[band]
    src = s.sources
    m = src[_MAG[band]]
    n = s.data.shape[0]
    arts = pq.read_table(tiny_night / "truth" / "artifacts.parquet").to_pydict()
    arts = {k: np.asarray(v) for k, v in arts.items()}
    false_all = 0
    false_clean = false_cr = false_bright = 0
    for f in range(n):
        d = det[det["frame"] == f]
        if not len(d):
            continue
        x, y = s.geometry.sky_to_pixel(f, src["ra"], src["dec"])
        # 3 sigma limit of the frame (4" aperture, sky noise only)
        lim = s.frames["zp_mag"][f] - 2.5 * math.log10(3 * math.sqrt(math.pi * 4) * s.noise[f])
        real = np.isfinite(m) & (m < lim)
        dx = np.asarray(d["x"])[:, None] - x[None, real]
        dy = np.asarray(d["y"])[:, None] - y[None, real]
        near_real = (dx**2 + dy**2 < 4.0).any(axis=1)
        # light of very bright stars (spikes, halos, saturation structure) is real signal
        dd = np.hypot(np.asarray(d["x"])[:, None] - x[None, :], np.asarray(d["y"])[:, None]
                      - y[None, :])
        near_bright = ((dd < 40) & (m < 6.0)).any(axis=1) | ((dd < 10) & (m < 8.5)).any(axis=1)
        adist = _artifact_distance(arts, band, s.scan, f, np.asarray(d["x"]), np.asarray(d["y"]))
        false = ~near_real
        false_all += false.sum()
        false_clean += (false & (adist > 3) & ~near_bright).sum()
        false_cr += (false & (adist <= 3)).sum()
        false_bright += (false & (adist > 3) & near_bright).sum()
    print(f"\n{band}: false detections per frame {false_all / n:.2f} in all, "
          f"{false_cr / n:.2f} within 3 px of truth artifacts (cosmic rays, spikes, persistence, "
          f"stripes, meteors), "
          f"{false_bright / n:.2f} near saturated stars, {false_clean / n:.2f} elsewhere")
    assert false_clean / n <= 0.5


def test_sep_agrees_on_bright_sources(scans, detections):
    """SEP (SExtractor's algorithms) on ten K frames: bright detections at the same places.

    SEP thresholds at 1.5 sigma per raw pixel with its default 3 x 3 filter and
    ``minarea = 5``. Its isophotal barycentres are unbiased for isolated symmetric sources
    at high SNR, so our bright (SNR > 50), unflagged sources must all be found by SEP, and
    those SEP does not flag (merged or deblended objects have shifted barycentres) agree to 0.1 px: both statistical errors are below
    0.03 px there, and 0.1 px leaves room for the barycentre's truncation at the isophote.
    """
    sep = pytest.importorskip("sep")
    s, det = scans["K"], detections["K"]
    nearest, clean = [], []
    n_sep = n_ours = 0
    for f in range(0, 30, 3):
        img = np.ascontiguousarray(s.data[f], dtype=np.float32)
        objs = sep.extract(img, 1.5, err=float(s.noise[f]), mask=s.bad, minarea=5)
        d = det[(det["frame"] == f) & (det["snr"] > 50) & (det["flags"] == 0)]
        # R2-R1-saturated stars (Ks < 8.5) have clipped, hollow cores that both codes break
        # up differently (the pipeline masks them through the calibration mask).
        sx, sy = s.geometry.sky_to_pixel(f, s.sources["ra"], s.sources["dec"])
        sat = s.sources["k_m"] < 8.5
        dsat = np.hypot(np.asarray(d["x"])[:, None] - sx[None, sat],
                        np.asarray(d["y"])[:, None] - sy[None, sat]).min(axis=1, initial=np.inf)
        d = d[dsat > 10]
        n_sep += len(objs)
        n_ours += int(np.sum(det["frame"] == f))
        if len(d) and len(objs):
            dist = np.hypot(np.asarray(d["x"])[:, None] - objs["x"][None, :],
                            np.asarray(d["y"])[:, None] - objs["y"][None, :])
            j = dist.argmin(axis=1)
            nearest.append(dist[np.arange(len(d)), j])
            clean.append(objs["flag"][j] == 0)
    nearest, clean = np.concatenate(nearest), np.concatenate(clean)
    found = nearest < 1.0
    common = nearest[found & clean]
    print(f"\nSEP on 10 frames: {n_sep} objects, ours {n_ours}; our bright: {nearest.size}, "
          f"found by SEP {found.sum()}, of which SEP-unflagged {common.size}: offsets median "
          f"{np.median(common):.4f}, max {common.max():.4f} px")
    assert found.mean() >= 0.95
    assert common.size >= 10
    assert np.all(common < 0.1)


def test_known_seeing_gives_same_positions(tiny_night, scans, detections):
    """Passing the true seeing instead of estimating it changes positions negligibly."""
    s = scans["H"]
    fw = optical_fwhm(s.frames["fwhm_arcsec"])
    cfg = FrameDetConfig(gain_e_per_dn=_gain(tiny_night, "H"))
    t = run_frame_detection(s.data[:3], mask=s.bad, noise=s.noise[:3], seeing_fwhm=fw[:3],
                            config=cfg)
    est = detections["H"].meta["seeing_fwhm"][:3]
    assert np.allclose(est, fw[:3], rtol=0.03)  # the seeing estimate itself: within 3 %
    d = detections["H"]
    d = d[d["frame"] < 3]
    assert len(t) == len(d)
    bright = (t["snr"] > 50) & (t["flags"] == 0)
    assert np.max(np.abs(t["x"][bright] - d["x"][bright])) < 0.02
    assert moffat_alpha_px(fw[0], 2.5, 2.0) > 0


def test_r1_like_frames_and_empty_inputs(scans):
    """Fainter (R1-like: 51 ms / 1.3 s of the flux) frames use the same rules; empty in,
    empty table out; a blank frame warns and returns the columns."""
    s = scans["K"]
    scale = 0.051 / 1.3
    noise = s.noise[:2] * 0.5
    rng = np.random.default_rng(5)
    r1 = (s.data[:2] * scale + rng.normal(0, 1, s.data[:2].shape) * noise[:, None, None])
    t = run_frame_detection(r1.astype(np.float32), mask=s.bad, noise=noise,
                            seeing_fwhm=2.8)
    assert len(t) >= 1 and np.all(t["snr"] > 5)
    empty = run_frame_detection(np.zeros((0, 8, 8), np.float32), mask=np.zeros((8, 8), bool),
                                noise=np.zeros(0))
    assert len(empty) == 0 and empty.colnames == list(COLUMNS)
    with pytest.warns(FrameDetWarning, match="no sources"):
        blank = run_frame_detection(np.zeros((1, 32, 32), np.float32),
                                    mask=np.zeros((32, 32), bool), noise=np.ones(1))
    assert blank.colnames == list(COLUMNS)
    assert FLAG_BLENDED == 8


def test_bad_pixels_and_bad_inputs(rng):
    """Non-finite pixels join the mask with one warning; bad inputs raise clearly."""
    from gpu2mass.errors import ConfigError, InputError

    img = rng.normal(0, 1, (2, 40, 40)).astype(np.float32)
    img[0, 20, 20] = np.nan
    img[:, 14:17, 14:17] += 40.0  # a source on each frame, so that only one warning comes
    img[:, 15, 15] += 60.0
    with pytest.warns(FrameDetWarning, match="non-finite"):
        t = run_frame_detection(img, mask=np.zeros((2, 40, 40), bool), noise=np.ones(2),
                                seeing_fwhm=2.8)
    assert t.colnames == list(COLUMNS) and len(t) == 2
    img = np.nan_to_num(img)
    with pytest.raises(InputError, match="masked"):
        run_frame_detection(img, mask=np.ones((40, 40), bool), noise=np.ones(2))
    with pytest.raises(InputError, match="noise"):
        run_frame_detection(img, mask=np.zeros((40, 40), bool), noise=np.ones(3))
    with pytest.raises(InputError, match="mask"):
        run_frame_detection(img, mask=np.zeros((3, 3), bool), noise=np.ones(2))
    with pytest.raises(ConfigError, match="tpk"):
        FrameDetConfig(tpk=-1.0)
    with pytest.raises(ConfigError, match="sky_inner"):
        FrameDetConfig(sky_inner_arcsec=30.0, sky_outer_arcsec=20.0)


def test_alpha_bisection_equals_interpolating_the_whole_curve():
    """The seeing estimate's bisection gives np.interp on the full prediction curve exactly,
    NaN ratios and ratios beyond the curve's ends included."""
    from gpu2mass.framedet import _interp_decreasing
    from gpu2mass.kernels.reference.psf import moffat_pixel_integral

    rng = np.random.default_rng(2)
    m = 400
    px, py = rng.uniform(-0.5, 0.5, m), rng.uniform(-0.5, 0.5, m)
    grid, beta, r_ap = np.linspace(0.4, 3.0, 105), 2.5, 2.0
    ee = 1.0 - (1.0 + r_ap**2 / grid**2) ** (1.0 - beta)
    full = moffat_pixel_integral(-px[:, None], -py[:, None], grid[None, :], beta) / ee[None, :]
    r = full[np.arange(m), rng.integers(0, grid.size, m)] * rng.uniform(0.7, 1.3, m)
    r[:3], r[3], r[4], r[5] = np.nan, 10.0, -1.0, full[5, 50]
    want = np.array([np.interp(-ri, -p, grid) for ri, p in zip(r, full, strict=True)])
    got = _interp_decreasing(r, lambda k: moffat_pixel_integral(-px, -py, grid[k], beta) / ee[k], grid)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("sigma", [0.85, 1.0, 1.3])
def test_compiled_smoothing_equals_scipy_bit_for_bit(sigma):
    """The CPU smoothing kernel is SciPy's gaussian_filter (0, σ, σ), constant mode, exactly."""
    import scipy.ndimage as snd
    from gpu2mass.kernels.cpu.gauss import gaussian_smooth_frames

    frames = np.random.default_rng(3).normal(0.0, 10.0, (3, 40, 33)).astype(np.float32)
    want = snd.gaussian_filter(frames, sigma=(0, sigma, sigma), mode="constant", cval=0.0)
    np.testing.assert_array_equal(gaussian_smooth_frames(frames, sigma), want)
