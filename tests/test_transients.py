"""Solos, streaks and transient masks against the simulator's truth artifacts.

Detections are built from truth (stars at their true positions in every frame covering
them, cosmic rays as sharp single-frame detections, the meteor trail as detections along
its length), so these tests isolate the transient logic from detection."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from gpu2mass.geometry import frame_geometry_from_truth
from gpu2mass.transients import run_transients


def _truth_detections(tiny_night, band, rng):
    import json

    manifest = json.loads((tiny_night / "night.json").read_text())
    sci = next(s for s in manifest["scans"] if s["type"] == "sci")
    geo = frame_geometry_from_truth(tiny_night, sci["scan"], band)
    src = {k: np.asarray(v) for k, v in pq.read_table(tiny_night / "truth" / "sources.parquet").to_pydict().items()}
    art = {k: np.asarray(v) for k, v in pq.read_table(tiny_night / "truth" / "artifacts.parquet").to_pydict().items()}
    mag = src[{"J": "j_m", "H": "h_m", "K": "k_m"}[band]]
    zp = {"J": 20.95, "H": 20.92, "K": 19.88}[band]
    star = (src["kind"] == "star") & (mag < 15.0) & (mag > 6.0)
    rows = {"frame": [], "x": [], "y": [], "flux": [], "fpeak": [], "what": []}

    def add(f, x, y, flux, fpeak, what):
        rows["frame"].append(np.full(np.size(x), f))
        rows["x"].append(np.atleast_1d(x))
        rows["y"].append(np.atleast_1d(y))
        rows["flux"].append(np.broadcast_to(flux, np.shape(np.atleast_1d(x))).astype(float))
        rows["fpeak"].append(np.full(np.size(x), fpeak))
        rows["what"].append(np.full(np.size(x), what))

    for f in range(sci["nframes"]):
        close = star & (np.abs(src["dec"] - geo.dec[f]) < 0.15)
        x, y = geo.sky_to_pixel(f, src["ra"][close], src["dec"][close])
        ok = (x > 1) & (x < 254) & (y > 1) & (y < 254)
        add(f, x[ok] + rng.normal(0, 0.05, ok.sum()), y[ok] + rng.normal(0, 0.05, ok.sum()),
            10 ** (-0.4 * (mag[close][ok] - zp)), 0.3, "star")
    sel = (art["scan"] == sci["scan"]) & (art["band"] == band)
    cr = np.flatnonzero(sel & (art["kind"] == "cosmic_ray"))
    for k in cr:
        add(int(art["frame"][k]), art["x0"][k], art["y0"][k], 300.0, 0.9, "cr")
    met = np.flatnonzero(sel & (art["kind"] == "meteor"))
    for k in met:
        n = int(np.hypot(art["x1"][k] - art["x0"][k], art["y1"][k] - art["y0"][k]) / 3)
        t = np.linspace(0.02, 0.98, n)
        add(int(art["frame"][k]), art["x0"][k] + t * (art["x1"][k] - art["x0"][k]) + rng.normal(0, 0.4, n),
            art["y0"][k] + t * (art["y1"][k] - art["y0"][k]) + rng.normal(0, 0.4, n), 2000.0, 0.3, "meteor")
    det = {k: np.concatenate(v) for k, v in rows.items()}
    return det, geo, sci, art, sel, cr, met


def test_solos_streaks_and_masks(tiny_night, rng):
    for band in ("J", "K"):
        det, geo, sci, art, _sel, cr, met = _truth_detections(tiny_night, band, rng)
        res = run_transients(det, geometry=geo, band=band, nframes=sci["nframes"])
        what = det["what"]
        # Stars are confirmed by the overlapping frames; cosmic rays and meteor points are not.
        assert res.solo[what == "star"].mean() < 0.01
        assert res.solo[what == "cr"].mean() > 0.95
        assert res.solo[what == "meteor"].mean() > 0.95
        # The meteor is found as a streak and ≥ 95 % of its trail pixels are masked.
        assert len(met) >= 1 and len(res.streaks) == len(met)
        yy, xx = np.mgrid[0:256, 0:256]
        for k in met:
            f = int(art["frame"][k])
            x0, y0, x1, y1 = art["x0"][k], art["y0"][k], art["x1"][k], art["y1"][k]
            L = np.hypot(x1 - x0, y1 - y0)
            t = ((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / L**2
            d = np.abs((xx - x0) * (y1 - y0) - (yy - y0) * (x1 - x0)) / L
            trail = (d <= 2.0) & (t >= 0) & (t <= 1)
            assert res.mask[f][trail].mean() >= 0.95
        # Every cosmic ray position is masked in its own frame, and not in the others.
        fr, ys, xs = art["frame"][cr].astype(int), np.rint(art["y0"][cr]).astype(int), np.rint(art["x0"][cr]).astype(int)
        assert res.mask[fr, ys, xs].mean() > 0.95
        # Masks stay small: well under 2 % of the pixels outside the meteor frames.
        other = np.setdiff1d(np.arange(sci["nframes"]), art["frame"][met].astype(int))
        assert res.mask[other].mean() < 0.02


def test_no_detections(tiny_night):
    geo = frame_geometry_from_truth(tiny_night, 3, "H")
    empty = {"frame": np.array([], int), "x": np.array([]), "y": np.array([]), "flux": np.array([])}
    res = run_transients(empty, geometry=geo, band="H", nframes=geo.nframes)
    assert res.solo.size == 0 and not res.mask.any() and res.streaks == ()


def test_sharp_detections_no_other_frame_covers_are_masked(tiny_night, rng):
    """At the end of a scan one frame alone covers the sky: a cosmic ray there can be
    neither confirmed nor rejected in the coadd, so a detection sharper than any star is
    masked; a star-like one (fpeak 0.3) is left alone."""
    det, geo, sci, *_ = _truth_detections(tiny_night, "K", rng)
    n = sci["nframes"]
    # The last frame's far edge: no other frame holds it (the scan moves along y).
    x_end, y_end = 128.0, 252.0 if geo.dec[-1] > geo.dec[0] else 3.0
    ra, dec = geo.pixel_to_sky(n - 1, x_end, y_end)
    fx, fy = geo.sky_to_pixel(np.arange(n - 1), ra, dec)
    assert not np.any((fx > 2) & (fx < 253) & (fy > 2) & (fy < 253))
    extra = {k: np.concatenate([v, np.asarray(a)]) for (k, v), a in zip(
        det.items(), ([n - 1, n - 1], [x_end, x_end - 40.0], [y_end, y_end], [300.0, 300.0],
                      [0.9, 0.3], ["cr", "star"]), strict=True)}
    res = run_transients(extra, geometry=geo, band="K", nframes=n)
    assert res.mask[n - 1, int(y_end), int(x_end)]
    assert not res.mask[n - 1, int(y_end), int(x_end - 40.0)]
    assert not res.solo[-2:].any()


def test_lone_regions_match_the_exact_coverage(tiny_night):
    """The pixels no other frame holds, from the screened quadratic maps, against every
    pixel transformed exactly: the first and last frames' outer ends, the array's side
    columns where the dithers leave them, nothing else."""
    from gpu2mass.transients import lone_regions

    geo = frame_geometry_from_truth(tiny_night, 3, "K")
    n = geo.nframes
    regions = lone_regions(geo, n)
    gy, gx = np.mgrid[0:256, 0:256].astype(float)
    for f in range(n):
        ra, dec = geo.pixel_to_sky(f, gx.ravel(), gy.ravel())
        held = np.zeros(ra.size, bool)
        for g in range(n):
            if g != f:
                x, y = geo.sky_to_pixel(g, ra, dec)
                held |= (x >= 0) & (x <= 255) & (y >= 0) & (y <= 255)
        exact = ~held.reshape(256, 256)
        got = regions.get(f, np.zeros((256, 256), bool))
        assert (got != exact).sum() <= 3, f  # pixel centres within ~0.01 px of an edge
    # The scan's ends: ~41 rows of 256 (82.8" steps of 2" pixels) in the first and last frames.
    for f in (0, n - 1):
        assert 35 * 256 < regions[f].sum() < 48 * 256
    assert all(regions[f].sum() < 3 * 256 for f in range(1, n - 1) if f in regions)


def test_lone_sharp_pixels_find_hits_and_spare_stars(rng):
    """None of ~3800 stars (peak 5–300 noise units, centred anywhere on their pixel, seeing
    1.7"–2.6") is taken for a hit even when the test is told a seeing 15 % broader than
    the truth; told the truth, every single-pixel hit of ≥ 40 noise units is found (≥ 30
    at seeing ≥ 2"); an equal two-pixel hit is as broad as a 1.7"–2" star along its
    length, but not across it, and is found when bright (≥ 50 units; ≥ 35 at 2.6"). At 1.7" a star's
    neighbours hold only ~0.6 of its peak, so a hit must stand well clear of its
    neighbours' noise: half of those of ~22 units are found there (measured, 1.7": 35 % at
    16–20, 73 % at 20–25, 93 % at 25–30, 99.7 % at 30–40; 2.0": 81 %, 98 %, 100 %)."""
    from gpu2mass.kernels.psf import add_stamps, render_psf_stamps

    from gpu2mass.framedet import moffat_alpha_px
    from gpu2mass.transients import lone_sharp_pixels

    noise, ny, nx = 10.0, 256, 256
    n_star = 0
    for fwhm in (1.7, 2.0, 2.6):
        for _ in range(3):
            img = rng.normal(0, noise, (ny, nx)).astype(np.float32)
            mask = rng.random((ny, nx)) < 0.01  # bad pixels next to some candidates
            # Stars on a 12-px grid, hits between them.
            sy, sx = (a.ravel() for a in np.meshgrid(np.arange(8, ny - 8, 12), np.arange(8, nx - 8, 12), indexing="ij"))
            fx, fy = rng.uniform(-0.5, 0.5, sx.size), rng.uniform(-0.5, 0.5, sx.size)
            alpha = moffat_alpha_px(fwhm, 2.5, 2.0)
            peak_frac = render_psf_stamps(np.zeros(1), np.zeros(1), 1.0, alpha, 2.5, half_size=0)[0, 0, 0]
            flux = np.exp(rng.uniform(np.log(5), np.log(300), sx.size)) * noise / peak_frac
            stamps = render_psf_stamps(fx, fy, flux, alpha, 2.5, half_size=4)
            add_stamps(img, stamps, sx - 4, sy - 4)
            n_star += sx.size
            hy, hx = sy[:-1] + 6, sx[:-1] + 6
            single = np.arange(hy.size) % 2 == 0
            amp = np.exp(rng.uniform(np.log(16), np.log(200), hy.size)) * noise
            img[hy, hx] += amp
            img[hy[~single], hx[~single] + 1] += amp[~single]  # equal two-pixel hits
            everywhere = np.ones((ny, nx), bool)
            broad = lone_sharp_pixels(img, mask, noise, everywhere, 1.15 * fwhm)
            stars = {(int(y), int(x)) for y, x in zip(sy, sx, strict=True)}
            assert not any(abs(y - a) <= 1 and abs(x - b) <= 1 for y, x in broad for a, b in stars)
            got = {(int(y), int(x)) for y, x in lone_sharp_pixels(img, mask, noise, everywhere, fwhm)}
            assert not any(abs(y - a) <= 1 and abs(x - b) <= 1 for y, x in got for a, b in stars)
            hit = np.array([(int(y), int(x)) in got for y, x in zip(hy, hx, strict=True)])
            # No bad pixel beside the hit: a star centred between a pixel and a bad neighbour
            # shows only half of itself, so hits there must be brighter to be told apart.
            near_bad = np.array([mask[y - 1:y + 2, x - 1:x + 3].any() for y, x in zip(hy, hx, strict=True)])
            clear = single & ~near_bad
            assert hit[clear & (amp >= (40 if fwhm < 2 else 30) * noise)].all()  # before pairs join
            pair = ~single & ~near_bad
            hit |= np.array([(int(y), int(x) + 1) in got for y, x in zip(hy, hx, strict=True)])
            # Across the pair its upper and lower neighbours are empty, which no star is.
            assert hit[pair & (amp >= (50 if fwhm <= 2.0 else 35) * noise)].all()
    assert n_star > 3500


def test_lone_tracks_are_found_across(rng):
    """Two-pixel tracks (a second pixel of 0.7 the first, along a row or a column): no
    star (5–300 noise units) is taken for one with the seeing told 15 % broad; all are
    found from 40 noise units at 1.7" seeing, 30 at 2.0", 20 at 2.6". Measured with this
    set-up on 6 images per seeing (~4,300 tracks, 2,400 stars each): at 1.7" 33 % found
    at 20–25 units, 72 % at 25–30, 96 % at 30–40; at 2.0" 82 %, 96 %, 100 %; at 2.6" 74 %
    at 12–16, 97 % at 16–20; no star taken."""
    from gpu2mass.kernels.psf import add_stamps, render_psf_stamps

    from gpu2mass.framedet import moffat_alpha_px
    from gpu2mass.transients import lone_sharp_pixels

    noise, ny, nx = 10.0, 256, 256
    for fwhm, sure in ((1.7, 40), (2.0, 30), (2.6, 20)):
        img = rng.normal(0, noise, (ny, nx)).astype(np.float32)
        mask = np.zeros((ny, nx), bool)
        sy, sx = (a.ravel() for a in np.meshgrid(np.arange(8, ny - 8, 12), np.arange(8, nx - 8, 12), indexing="ij"))
        alpha = moffat_alpha_px(fwhm, 2.5, 2.0)
        peak_frac = render_psf_stamps(np.zeros(1), np.zeros(1), 1.0, alpha, 2.5, half_size=0)[0, 0, 0]
        flux = np.exp(rng.uniform(np.log(5), np.log(300), sx.size)) * noise / peak_frac
        stamps = render_psf_stamps(rng.uniform(-0.5, 0.5, sx.size), rng.uniform(-0.5, 0.5, sx.size), flux,
                                   alpha, 2.5, half_size=4)
        add_stamps(img, stamps, sx - 4, sy - 4)
        hy, hx = sy[:-1] + 6, sx[:-1] + 6
        amp = np.exp(rng.uniform(np.log(8), np.log(200), hy.size)) * noise
        down = np.arange(hy.size) % 2 == 0
        img[hy, hx] += amp
        img[hy[down] + 1, hx[down]] += 0.7 * amp[down]
        img[hy[~down], hx[~down] + 1] += 0.7 * amp[~down]
        everywhere = np.ones((ny, nx), bool)
        stars = {(int(y), int(x)) for y, x in zip(sy, sx, strict=True)}
        broad = lone_sharp_pixels(img, mask, noise, everywhere, 1.15 * fwhm)
        assert not any(abs(y - a) <= 1 and abs(x - b) <= 1 for y, x in broad for a, b in stars)
        got = {(int(y), int(x)) for y, x in lone_sharp_pixels(img, mask, noise, everywhere, fwhm)}
        hit = np.array([(int(y), int(x)) in got for y, x in zip(hy, hx, strict=True)])
        assert hit[amp >= sure * noise].all()


def _hits_in_the_last_frame(tiny_night, seed, add_hits):
    """Noise frames (10 DN) of the tiny night's scan 3 K, ``add_hits(last_frame, y_end)``
    drawing into the last one (``y_end``: a row at its far end, which no other frame
    covers), run through :func:`run_transients` with no detections. Returns
    ``(nframes, y_end, result)``."""
    geo = frame_geometry_from_truth(tiny_night, 3, "K")
    n = geo.nframes
    frames = np.random.default_rng(seed).normal(0, 10.0, (n, 256, 256)).astype(np.float32)
    y_end = 252 if geo.dec[-1] > geo.dec[0] else 3
    add_hits(frames[n - 1], y_end)
    empty = {"frame": np.array([], int), "x": np.array([]), "y": np.array([]), "flux": np.array([])}
    res = run_transients(empty, geometry=geo, band="K", nframes=n, frames=frames,
                         frame_mask=np.zeros((256, 256), bool), noise=np.full(n, 10.0),
                         seeing_fwhm=np.full(n, 2.0))
    return n, y_end, res


def test_lone_sharp_pixels_are_masked_at_the_ends_of_a_scan(tiny_night):
    """With the frames given, a hot pixel at the far end of the last frame (no other frame
    covers it, and the frame detection's Tsnr drops it) is masked with its neighbours;
    the same hit where other frames cover the sky is left to the coadd."""
    def hits(last, y_end):
        last[y_end, 100] += 250.0
        last[128, 100] += 250.0

    n, y_end, res = _hits_in_the_last_frame(tiny_night, 3, hits)
    assert res.lone_pixels.tolist() == [[n - 1, y_end, 100]]
    assert res.mask[n - 1, y_end - 1:y_end + 2, 99:102].all() and res.mask.sum() == 9


def test_a_lone_track_is_masked_with_its_neighbours(tiny_night):
    """A three-pixel cosmic-ray track where only the last frame covers the sky: every
    pixel of it and their neighbours are masked, nothing else."""
    def track(last, y_end):
        last[y_end, 100:103] += np.array([400.0, 250.0, 120.0], np.float32)

    n, y_end, res = _hits_in_the_last_frame(tiny_night, 4, track)
    assert res.lone_pixels.tolist() == [[n - 1, y_end, 100]]
    assert res.mask[n - 1, y_end - 1:y_end + 2, 99:104].all() and res.mask.sum() == 15


def test_bright_trails_are_blanked_and_static_lines_kept(tiny_night):
    """A saturated meteor in one frame (its saturated core NaN), which the frame detection
    sees as a few peaks, is found as a bright trail and blanked edge to edge; a line as
    bright that is fixed on the sky (a bright star's spike, in every frame that holds it)
    is left alone, and so is a bright but round star."""
    from gpu2mass.frames import MASK_SATURATED
    from gpu2mass.sim.artifacts import add_trail
    from gpu2mass.transients import find_bright_trails

    geo = frame_geometry_from_truth(tiny_night, 3, "K")
    n = geo.nframes
    rng = np.random.default_rng(6)
    frames = rng.normal(0, 10.0, (n, 256, 256)).astype(np.float32)
    mask = np.zeros((n, 256, 256), np.uint8)
    # The meteor: frame 1, 150 pixels long, saturated along its core.
    add_trail(frames[1], 40.0, 30.0, 160.0, 120.0, dn_per_px_length=40000.0, sigma_px=0.7)
    core = frames[1] > 15000
    mask[1][core] = MASK_SATURATED
    frames[1][core] = np.nan  # what a saturated pixel holds is no measure of the trail
    # The static line: 60 pixels on the sky, drawn into every frame that holds it.
    ra, dec = geo.pixel_to_sky(0, np.array([190.0, 190.0]), np.array([150.0, 210.0]))
    for f in range(n):
        x, y = geo.sky_to_pixel(f, ra, dec)
        add_trail(frames[f], x[0], y[0], x[1], y[1], dn_per_px_length=8000.0, sigma_px=0.7)
        frames[f, 60:63, 200:203] += 5000.0  # a round bright blob, not elongated
    seeing = np.full(n, 2.5)
    trails = find_bright_trails(frames, mask, np.full(n, 10.0), seeing, geo)
    assert [t.frame for t in trails] == [1] and trails[0].found_by == "trail"
    t = trails[0]
    direction = np.array([t.x1 - t.x0, t.y1 - t.y0]) / np.hypot(t.x1 - t.x0, t.y1 - t.y0)
    assert abs(direction @ np.array([120.0, 90.0]) / 150.0) > 0.999
    assert 10 < t.width_px < 40
    empty = {"frame": np.array([], int), "x": np.array([]), "y": np.array([]), "flux": np.array([])}
    res = run_transients(empty, geometry=geo, band="K", nframes=n, frames=frames, frame_mask=mask,
                         noise=np.full(n, 10.0), seeing_fwhm=seeing)
    assert res.mask[1, 75, 100] and not res.mask[1, 10, 200]
    # Edge to edge: the line's continuation beyond the meteor's end is blanked too.
    assert res.mask[1, 165, 220]
    assert not res.mask[0].any() and not res.mask[2:].any()
