"""Transients: single-frame detections that overlapping frames do not confirm ("solos"),
and the meteor and satellite streaks they line up into (facts sheet 2.3, 2MAPPS v3).

- A detection is a **solo** when at least one other frame covers its sky position and no
  detection of those frames lies within ``confirm_radius_arcsec`` of it.
- Solos brighter than J 15.0 / H 14.5 / Ks 14.0 are masked with a 5" radius in their frame
  only. Solos sharper than any star (fraction of flux in the peak pixel above
  ``cosmic_ray_fpeak``: cosmic rays and hot pixels) are masked with ``cosmic_ray_radius_px``
  whatever their brightness, so that they cannot survive into the Atlas Images; so are
  sharp detections where no other frame covers the sky (the ends of a scan), which can be
  neither confirmed nor rejected in the coadd.
- **Lone sharp pixels.** Where no other frame covers the sky, a cosmic ray that the frame
  detection drops (a single hot pixel fails Tsnr, whose 3 x 3 sum dilutes it, yet the Atlas
  Image's interpolation makes it a source of SNR ~20) is found on the pixels themselves
  when the frames are given: a local maximum whose eight neighbours hold significantly
  less flux than the sharpest star the frame's seeing allows could put there. The pixel
  and its neighbours are masked. Elsewhere the coadd's outlier rejection removes them.
  A short track (a cosmic ray crossing 2–4 pixels) has its neighbours on the track, so
  the eight-neighbour test misses it; across the track, though, the pixel's two opposite
  neighbours (left and right, or above and below) hold less than any star could put
  there, which is tested too; the track's pixels are masked with their neighbours.
- **Streaks**: in each frame, the line through two solos that has the most solos within
  3" of it is taken if it has ≥ 15 of them over ≥ 20"; its solos are removed and the search
  repeats. A streak is blanked edge to edge across its frame with width 6 × (count // 8)
  camera pixels (at least 6); streaks found in more than 2 frames (slow meteors,
  satellites) are blanked only along their detected length.
- **Bright trails.** A meteor bright enough to saturate is one broad ridge to the frame
  detection, which finds one to a few peaks on it, too few for a streak. So each frame's
  pixels above ``trail_sigma`` noise units (or saturated) are grouped into connected
  regions; a region at least ``trail_min_length_arcsec`` long and ``trail_min_elongation``
  times longer than wide, whose sky the overlapping frames do not show bright (a bright
  star's diffraction spikes and bleed stripes are in every frame that holds the star),
  is a trail: blanked edge to edge, as wide as the line's wings stay above the noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from gpu2mass.errors import ConfigError
from gpu2mass.geometry import FrameGeometry

__all__ = ["Streak", "TransientConfig", "Transients", "find_bright_trails", "lone_regions", "lone_sharp_pixels",
           "run_transients"]


@dataclass(frozen=True)
class TransientConfig:
    """Settings of transient masking (2MASS v3 values where published).

    Attributes
    ----------
    confirm_radius_arcsec
        A detection is confirmed by one in an overlapping frame within this distance.
    solo_mask_mag
        Band → magnitude: solos brighter than this are masked (J 15.0, H 14.5, Ks 14.0).
    zero_point
        Band → instrumental zero point (mag giving 1 DN in R2−R1) used to turn a solo's
        4" aperture flux into a magnitude before photometric calibration exists.
    solo_mask_radius_arcsec
        Mask radius around bright solos (5").
    cosmic_ray_fpeak, cosmic_ray_radius_px
        Solos with more than this fraction of their aperture flux in the peak pixel are
        sharper than the PSF (≤ 0.37 at the 2.4" seeing floor): masked with this radius.
    streak_min_count, streak_width_arcsec, streak_min_length_arcsec
        A streak needs ≥ 15 solos within 3" of its line over ≥ 20".
    streak_multi_frame
        Streaks found in more than this many frames are blanked along their length only.
    pixel_scale_arcsec
        Nominal frame pixel scale, for turning arcsec into pixels in frame coordinates.
    lone_pixel_min_sigma
        A lone sharp pixel (module docstring) is at least this many frame noise units.
    lone_pixel_sigma
        ... and its eight neighbours hold at least this many noise units (of their
        difference) less than a star would: the star, a Moffat of index ``psf_beta``
        integrated over the pixels, centred anywhere on the pixel, FWHM the frame's seeing
        times ``lone_pixel_fwhm_factor``. Decision (2MASS masked solos only): 4 units and
        0.8 keep a star's chance of being masked to the 4-sigma tail (~3e-5) even with a
        seeing estimate 15 % too broad; single-pixel hits are found half the time at ~22
        noise units and always above ~35 at the sharpest seeing (1.7"), at ~17 and above
        ~25 at 2" (tests). Fainter hits make Atlas sources of SNR ≲ 10.
    psf_beta
        Moffat index of the frames' PSF (2.5, as the frame detection's template).
    trail_sigma, trail_min_length_arcsec, trail_min_elongation, trail_confirm_fraction
        Bright trails (module docstring): pixels above 20 noise units; a region at least
        40" long and 4 times longer than wide (second moments); static when the other
        frames show at least half of its sampled points bright. Decision (2MASS's streak
        rule needs solos, which a saturated trail does not give): the simulator's meteors
        are 500–2,000 noise units per pixel; a saturated star's core is round and its
        spikes and stripes are static.
    """

    confirm_radius_arcsec: float = 2.0
    solo_mask_mag: dict = field(default_factory=lambda: {"J": 15.0, "H": 14.5, "K": 14.0})
    zero_point: dict = field(default_factory=lambda: {"J": 20.95, "H": 20.92, "K": 19.88})
    solo_mask_radius_arcsec: float = 5.0
    cosmic_ray_fpeak: float = 0.5
    cosmic_ray_radius_px: float = 1.5
    streak_min_count: int = 15
    streak_width_arcsec: float = 3.0
    streak_min_length_arcsec: float = 20.0
    streak_multi_frame: int = 2
    pixel_scale_arcsec: float = 2.0
    lone_pixel_min_sigma: float = 5.0
    lone_pixel_sigma: float = 4.0
    lone_pixel_fwhm_factor: float = 0.8
    psf_beta: float = 2.5
    trail_sigma: float = 20.0
    trail_min_length_arcsec: float = 40.0
    trail_min_elongation: float = 4.0
    trail_confirm_fraction: float = 0.5

    def __post_init__(self):
        if (self.trail_sigma <= 0 or self.trail_min_length_arcsec <= 0 or self.trail_min_elongation < 1
                or not 0 < self.trail_confirm_fraction <= 1):
            raise ConfigError("transients: trail_sigma, trail_min_length_arcsec > 0; "
                              "trail_min_elongation >= 1; 0 < trail_confirm_fraction <= 1")


@dataclass(frozen=True)
class Streak:
    """A streak in one frame: its line through (x0, y0)–(x1, y1) (the extreme solos, or a
    bright trail's ends; frame pixels), the number of solos on it (a bright trail: its
    pixels above the trail threshold), the blanking width (camera pixels) and how it was
    found: ``"solos"`` or ``"trail"``."""

    frame: int
    x0: float
    y0: float
    x1: float
    y1: float
    count: int
    width_px: float
    found_by: str = "solos"


@dataclass(frozen=True)
class Transients:
    """Result of :func:`run_transients` for one band of one scan.

    ``solo`` (bool per input detection), ``streaks``, ``mask`` (n, ny, nx) bool: pixels
    to exclude from the Atlas Images (True = masked), and ``lone_pixels`` (k, 3) int:
    (frame, y, x) of the lone sharp pixels found (empty when no frames were given)."""

    solo: np.ndarray
    streaks: tuple[Streak, ...]
    mask: np.ndarray
    lone_pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), int))


def _covering(geometry: FrameGeometry, ra, dec, nframes, margin_px=2.0):
    """For each position, the frames whose array covers it (list of index arrays)."""
    out = [[] for _ in range(np.size(ra))]
    band = geometry.band
    for g in range(nframes):
        near = np.abs(dec - geometry.dec[g]) < 0.2
        if not near.any():
            continue
        idx = np.flatnonzero(near)
        x, y = geometry.sky_to_pixel(g, ra[idx], dec[idx])
        ok = (x > margin_px) & (x < band.nx - 1 - margin_px) & (y > margin_px) & (y < band.ny - 1 - margin_px)
        for i in idx[ok]:
            out[i].append(g)
    return out


def lone_regions(geometry: FrameGeometry, nframes: int, *, edge_px: float = 0.5) -> dict[int, np.ndarray]:
    """The pixels whose sky no other frame holds: frame index → (ny, nx) bool.

    Another frame holds a pixel's centre when it falls at least ``edge_px`` inside that
    frame's outer pixel edges (0.5: on a pixel of that frame that has all its
    neighbours). Only frames with such pixels are keys: on a scan, the first and last
    frames' outer ends (~41 rows at 2MASS's frame step) and the array's outer columns
    where the frames' cross-scan dithers leave them alone. The lone areas are grown
    inwards from the array's rim over a grid of every fourth pixel (edges included; on a
    scan they always reach the rim), and the pixels within 4 of a lone grid point are
    then tested one by one (frames step along the scan by much more than the grid, so no
    lone strip hides between its points).
    """
    nx, ny = geometry.band.nx, geometry.band.ny
    sep = np.hypot((geometry.ra - geometry.ra[0]) * np.cos(np.deg2rad(geometry.dec)), geometry.dec - geometry.dec[0])
    # Frames whose centres lie farther apart than the array's diagonal cannot overlap.
    reach = 1.1 * np.hypot(nx, ny) * geometry.band.scale_arcsec / 3600.0

    # Frame f's pixels → frame g's pixels is smooth (one camera's distortion, frames a
    # few arcmin apart): a quadratic in (x, y) fitted to 5 x 5 exact transforms holds it
    # to far better than the 0.5 px that matter here, at a fraction of the cost.
    gy5, gx5 = (a.ravel() for a in np.meshgrid(np.linspace(0, ny - 1, 5), np.linspace(0, nx - 1, 5), indexing="ij"))

    def design(x, y):
        u, v = (x - 0.5 * (nx - 1)) / nx, (y - 0.5 * (ny - 1)) / ny
        return np.column_stack([np.ones_like(u), u, v, u * u, u * v, v * v])

    solve = np.linalg.pinv(design(gx5, gy5))

    def lone_test(f):
        others = np.flatnonzero(np.abs(sep[:nframes] - sep[f]) < reach)
        others = others[others != f]
        if others.size == 0:
            return lambda x, y: np.ones(np.shape(x), bool)
        ra, dec = geometry.pixel_to_sky(f, gx5, gy5)
        ox, oy = geometry.sky_to_pixel(others[:, None], ra[None, :], dec[None, :])
        cxy = solve @ np.concatenate([ox, oy]).T  # (6, 2 k)

        def lone(x, y):
            mapped = design(x, y) @ cxy
            gx, gy = mapped[:, :others.size], mapped[:, others.size:]
            held = ((gx >= edge_px - 0.5) & (gx <= nx - 0.5 - edge_px)
                    & (gy >= edge_px - 0.5) & (gy <= ny - 0.5 - edge_px))
            return ~held.any(axis=1)

        return lone

    step = 4
    cy = np.unique(np.r_[np.arange(0, ny, step), ny - 1])
    cx = np.unique(np.r_[np.arange(0, nx, step), nx - 1])
    coarse_y, coarse_x = np.meshgrid(cy, cx, indexing="ij")
    rim = np.zeros(coarse_y.shape, bool)
    rim[[0, -1], :] = rim[:, [0, -1]] = True
    out = {}
    for f in range(nframes):
        lone = lone_test(f)
        # A lone area reaches the array's rim (other frames' outlines leave no interior
        # holes on a scan): grow it inwards from the rim over the coarse grid.
        tested = rim.copy()
        coarse = np.zeros(rim.shape, bool)
        coarse[rim] = lone(coarse_x[rim].astype(float), coarse_y[rim].astype(float))
        while True:
            grown = coarse.copy()
            grown[1:] |= coarse[:-1]
            grown[:-1] |= coarse[1:]
            grown[:, 1:] |= grown[:, :-1]
            grown[:, :-1] |= grown[:, 1:]
            new = grown & ~tested
            if not new.any():
                break
            tested |= new
            coarse[new] = lone(coarse_x[new].astype(float), coarse_y[new].astype(float))
        if not coarse.any():
            continue
        near = np.zeros((ny, nx), bool)
        for y, x in zip(coarse_y[coarse], coarse_x[coarse], strict=True):
            near[max(y - step, 0):y + step + 1, max(x - step, 0):x + step + 1] = True
        ys, xs = np.nonzero(near)
        region = np.zeros((ny, nx), bool)
        region[ys, xs] = lone(xs.astype(float), ys.astype(float))
        if region.any():
            out[f] = region
    return out


def _neighbour_ratios(fwhm_arcsec: float, cfg: TransientConfig) -> np.ndarray:
    """(phases, 8): a star's flux in each of the 8 neighbours over the flux in the pixel
    it is centred on, for centres on an 11 x 11 grid over that pixel; the neighbours in
    :data:`_NEIGHBOURS` order."""
    from gpu2mass.brightstars import moffat_pixel_template
    from gpu2mass.framedet import moffat_alpha_px

    alpha = moffat_alpha_px(fwhm_arcsec, cfg.psf_beta, cfg.pixel_scale_arcsec)
    ph = np.linspace(-0.5, 0.5, 11)
    py, px = (a.ravel() for a in np.meshgrid(ph, ph, indexing="ij"))
    dy, dx = np.array(_NEIGHBOURS).T
    centre = moffat_pixel_template(-px, -py, alpha, cfg.psf_beta)[0]
    nb = moffat_pixel_template(dx[None, :] - px[:, None], dy[None, :] - py[:, None], alpha, cfg.psf_beta)[0]
    return nb / centre[:, None]


#: The 8 neighbours of a pixel, (dy, dx).
_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def lone_sharp_pixels(image, mask, noise: float, region, fwhm_arcsec: float,
                      config: TransientConfig = TransientConfig()) -> np.ndarray:
    """Pixels sharper than any star where no other frame covers the sky (module docstring).

    ``image``: (ny, nx) calibrated, sky-subtracted frame, DN; ``mask`` (ny, nx) bool, True
    unusable; ``noise`` its pixel noise, DN; ``region`` (ny, nx) bool, where to look;
    ``fwhm_arcsec`` the frame's seeing (Moffat FWHM). Returns (k, 2) int (y, x).

    A pixel qualifies when it is unmasked, in ``region``, above ``lone_pixel_min_sigma``
    noise units and above its unmasked neighbours, and when the sum S of those neighbours
    falls short of q v (v the pixel, q the least share a star of the sharpened seeing can
    put in those same neighbours relative to the pixel it is centred on) by more than
    ``lone_pixel_sigma`` × noise × sqrt(n + q²), the noise of q v − S for n neighbours.
    q is the least over the star's centres on the pixel, so beside a bad pixel (a star
    centred between the two shows half of itself) a hit must be brighter to qualify.
    """
    cfg = config
    v = np.asarray(image)
    usable = ~np.asarray(mask, bool)
    ny, nx = v.shape
    ys, xs = np.nonzero(region & usable & (v > cfg.lone_pixel_min_sigma * noise))
    if ys.size == 0:
        return np.zeros((0, 2), int)
    # The candidates' neighbours only (few pixels: the lone areas are small).
    dy, dx = np.array(_NEIGHBOURS).T
    ny_, nx_ = ys[:, None] + dy, xs[:, None] + dx
    ok = (ny_ >= 0) & (ny_ < ny) & (nx_ >= 0) & (nx_ < nx)
    ny_, nx_ = np.clip(ny_, 0, ny - 1), np.clip(nx_, 0, nx - 1)
    ok &= usable[ny_, nx_]  # (k, 8)
    nb = np.where(ok, v[ny_, nx_], 0.0).astype(float)
    val = v[ys, xs].astype(float)
    peak = np.all(~ok | (nb < val[:, None]), axis=1)
    ys, xs, ok, nb, val = ys[peak], xs[peak], ok[peak], nb[peak], val[peak]
    if ys.size == 0:
        return np.zeros((0, 2), int)
    ratios = _neighbour_ratios(cfg.lone_pixel_fwhm_factor * fwhm_arcsec, cfg)  # (phases, 8)
    q = (ok.astype(float) @ ratios.T).min(axis=1)  # the sharpest star over the centres
    s = nb.sum(axis=1)
    n = ok.sum(axis=1)
    sharp = q * val - s > cfg.lone_pixel_sigma * noise * np.sqrt(n + q * q)
    # Across a track: the left and right, or the upper and lower, neighbours (a track's
    # other pixels lie along it; the diagonal pairs of the sharpest star hold too little
    # light to tell, 0.06 of its pixel at 1.7" seeing against 0.23 for these).
    for a, b in _ACROSS:
        both = ok[:, a] & ok[:, b]
        qa = float((ratios[:, a] + ratios[:, b]).min())
        sharp |= both & (qa * val - nb[:, a] - nb[:, b] > cfg.lone_pixel_sigma * noise * np.sqrt(2 + qa * qa))
    return np.column_stack([ys[sharp], xs[sharp]])


#: Indices in :data:`_NEIGHBOURS` of the left/right and the upper/lower neighbour pairs.
_ACROSS = ((3, 4), (1, 6))


def _hit_footprint(image, mask, noise: float, hits) -> np.ndarray:
    """(ny, nx) bool: each hit's pixels (above 3 noise units, connected to it, within 4
    pixels: a track of up to 4 pixels from its brightest one) and their neighbours."""
    from scipy.ndimage import binary_dilation, label

    out = np.zeros(np.shape(image), bool)
    if len(hits) == 0:
        return out
    lab, _ = label((np.asarray(image) > 3.0 * noise) & ~np.asarray(mask, bool), structure=np.ones((3, 3), bool))
    yy, xx = np.indices(out.shape)
    for y, x in hits:
        out |= (lab == lab[y, x]) & (np.abs(yy - y) <= 4) & (np.abs(xx - x) <= 4)
        out[y, x] = True
    return binary_dilation(out, structure=np.ones((3, 3), bool))


def _find_streaks(frame: int, x, y, cfg: TransientConfig, nx, ny):
    """Greedy line search among one frame's solos (pixel coordinates)."""
    streaks = []
    width_px = cfg.streak_width_arcsec / cfg.pixel_scale_arcsec
    alive = np.ones(x.size, bool)
    while alive.sum() >= cfg.streak_min_count:
        idx = np.flatnonzero(alive)
        px, py = x[idx], y[idx]
        best = (0, None)
        for i in range(idx.size):
            dx, dy = px - px[i], py - py[i]
            norm = np.hypot(dx, dy)
            for j in range(i + 1, idx.size):
                if norm[j] == 0:
                    continue
                nxv, nyv = -dy[j] / norm[j], dx[j] / norm[j]  # unit normal of line i–j
                on = np.abs(dx * nxv + dy * nyv) <= width_px
                cnt = int(on.sum())
                if cnt > best[0]:
                    best = (cnt, on)
        cnt, on = best
        if cnt < cfg.streak_min_count:
            break
        pts = np.column_stack([px[on], py[on]])
        # Extent along the line: the two extreme solos.
        d = pts - pts.mean(0)
        axis = np.linalg.svd(d, full_matrices=False)[2][0]
        proj = d @ axis
        p0, p1 = pts.mean(0) + proj.min() * axis, pts.mean(0) + proj.max() * axis
        if (proj.max() - proj.min()) * cfg.pixel_scale_arcsec < cfg.streak_min_length_arcsec:
            alive[idx[on]] = False  # these solos line up too briefly: not a streak
            continue
        width = max(6.0, 6.0 * (cnt // 8))
        streaks.append(Streak(frame, float(p0[0]), float(p0[1]), float(p1[0]), float(p1[1]), cnt, width))
        alive[idx[on]] = False
    return streaks


def _blank(mask2d, s: Streak, *, full: bool):
    ny, nx = mask2d.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    dx, dy = s.x1 - s.x0, s.y1 - s.y0
    length = np.hypot(dx, dy)
    ux, uy = dx / length, dy / length
    t = (xx - s.x0) * ux + (yy - s.y0) * uy
    dist = np.abs((xx - s.x0) * uy - (yy - s.y0) * ux)
    sel = dist <= s.width_px / 2
    if not full:
        sel &= (t >= -s.width_px / 2) & (t <= length + s.width_px / 2)
    mask2d |= sel


def run_transients(detections, *, geometry: FrameGeometry, band: str, nframes: int,
                   frames=None, frame_mask=None, noise=None, seeing_fwhm=None,
                   config: TransientConfig = TransientConfig()) -> Transients:
    """Find solos and streaks among one band's single-frame detections and build masks.

    ``detections`` has columns ``frame``, ``x``, ``y``, ``flux`` (4" aperture, DN) and
    optionally ``fpeak``; ``geometry`` is the band's solved frame geometry. With
    ``frames`` ((n, ny, nx) calibrated R2−R1 frames, NumPy or CuPy), ``frame_mask``
    ((ny, nx) or (n, ny, nx), non-zero unusable), ``noise`` ((n,) DN) and ``seeing_fwhm``
    ((n,) arcsec), the lone sharp pixels are found and masked too (module docstring);
    only the lone areas' boxes are copied to the host.
    """
    cfg = config
    nx, ny = geometry.band.nx, geometry.band.ny
    frame = np.asarray(detections["frame"]).astype(int)
    x = np.asarray(detections["x"], float)
    y = np.asarray(detections["y"], float)
    flux = np.asarray(detections["flux"], float)
    names = detections.colnames if hasattr(detections, "colnames") else list(detections)
    fpeak = np.asarray(detections["fpeak"], float) if "fpeak" in names else np.zeros(x.size)
    mask = np.zeros((nframes, ny, nx), bool)
    if x.size == 0:
        trails = _blank_trails(mask, geometry, frames, frame_mask, noise, seeing_fwhm, cfg)
        lone = _mask_lone_sharp_pixels(mask, geometry, nframes, frames, frame_mask, noise, seeing_fwhm, cfg)
        return Transients(np.zeros(0, bool), trails, mask, lone)
    ra, dec = geometry.pixel_to_sky(frame, x, y)
    # Confirmation: a detection in another covering frame within the radius.
    xi0 = np.deg2rad(ra) * np.cos(np.deg2rad(dec.mean()))
    pts = np.column_stack([xi0, np.deg2rad(dec)]) * 206264.806
    tree = cKDTree(pts)
    cover = _covering(geometry, ra, dec, nframes)
    solo = np.zeros(x.size, bool)
    alone = np.zeros(x.size, bool)  # where no other frame covers the sky (ends of a scan)
    for i, nb in enumerate(tree.query_ball_point(pts, cfg.confirm_radius_arcsec)):
        others = [g for g in cover[i] if g != frame[i]]
        if not others:
            alone[i] = True  # seen by no other frame: nothing to confirm or refute it
            continue
        confirmed = any(frame[j] != frame[i] for j in nb)
        solo[i] = not confirmed
    # Masks around bright or sharp solos.
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = cfg.zero_point[band] - 2.5 * np.log10(np.maximum(flux, 1e-3))
    r_bright = cfg.solo_mask_radius_arcsec / cfg.pixel_scale_arcsec
    yy, xx = np.mgrid[0:ny, 0:nx]
    sharp = fpeak > cfg.cosmic_ray_fpeak
    for i in np.flatnonzero(solo | (alone & sharp)):
        # Where one frame alone covers the sky only sharpness can tell a cosmic ray (no
        # other frame and no coadd rejection will): those are masked too.
        r = r_bright if solo[i] and mag[i] < cfg.solo_mask_mag[band] else (
            cfg.cosmic_ray_radius_px if sharp[i] else 0.0)
        if r > 0:
            y0, y1 = max(int(y[i] - r) - 1, 0), min(int(y[i] + r) + 2, ny)
            x0, x1 = max(int(x[i] - r) - 1, 0), min(int(x[i] + r) + 2, nx)
            mask[frame[i], y0:y1, x0:x1] |= (xx[y0:y1, x0:x1] - x[i]) ** 2 + (yy[y0:y1, x0:x1] - y[i]) ** 2 <= r * r
    # Streaks, frame by frame, among the solos.
    streaks: list[Streak] = []
    for f in np.unique(frame[solo]):
        sel = solo & (frame == f)
        if sel.sum() >= cfg.streak_min_count:
            streaks += _find_streaks(int(f), x[sel], y[sel], cfg, nx, ny)
    multi = len({s.frame for s in streaks}) > cfg.streak_multi_frame
    for s in streaks:
        _blank(mask[s.frame], s, full=not multi)
    trails = _blank_trails(mask, geometry, frames, frame_mask, noise, seeing_fwhm, cfg)
    lone = _mask_lone_sharp_pixels(mask, geometry, nframes, frames, frame_mask, noise, seeing_fwhm, cfg)
    return Transients(solo, tuple(streaks) + trails, mask, lone)


def _blank_trails(mask, geometry, frames, frame_mask, noise, seeing_fwhm, cfg) -> tuple[Streak, ...]:
    """Find the bright trails (when the frames are given) and blank them edge to edge."""
    if frames is None:
        return ()
    if frame_mask is None or noise is None or seeing_fwhm is None:
        raise TypeError("run_transients: frames need frame_mask, noise and seeing_fwhm too")
    trails = tuple(find_bright_trails(frames, frame_mask, noise, seeing_fwhm, geometry, cfg))
    for s in trails:
        _blank(mask[s.frame], s, full=True)
    return trails


def _mask_lone_sharp_pixels(mask, geometry, nframes, frames, frame_mask, noise, seeing_fwhm, cfg):
    """Find the lone sharp pixels of every frame, mask each with its neighbours; (k, 3)."""
    from gpu2mass.backend import to_host

    found = [np.zeros((0, 3), int)]
    if frames is None:
        return found[0]
    if frame_mask is None or noise is None or seeing_fwhm is None:
        raise TypeError("run_transients: frames need frame_mask, noise and seeing_fwhm too")
    noise = np.asarray(to_host(noise), float)
    seeing = np.broadcast_to(np.asarray(to_host(seeing_fwhm), float), (nframes,))
    from scipy.ndimage import find_objects, label

    ny, nx = mask.shape[1:]
    for f, region in lone_regions(geometry, nframes).items():
        fm = frame_mask if frame_mask.ndim == 2 else frame_mask[f]
        # Each lone area's box (with the neighbours' margin) comes to the host, not the
        # frame: on a device that is a few thin strips per frame.
        lab, _ = label(region, structure=np.ones((3, 3), bool))
        for box in find_objects(lab):
            # The box holds the area, a track's reach (4 pixels) and its neighbours.
            y0, y1 = max(box[0].start - 5, 0), min(box[0].stop + 5, ny)
            x0, x1 = max(box[1].start - 5, 0), min(box[1].stop + 5, nx)
            img, bad = to_host(frames[f, y0:y1, x0:x1]), to_host(fm[y0:y1, x0:x1]) != 0
            yx = lone_sharp_pixels(img, bad, float(noise[f]), region[y0:y1, x0:x1], float(seeing[f]), cfg)
            mask[f, y0:y1, x0:x1] |= _hit_footprint(img, bad, float(noise[f]), yx)
            found.append(np.column_stack([np.full(len(yx), f), yx + np.array([y0, x0])]))
    return np.unique(np.concatenate(found).astype(int), axis=0)  # boxes may overlap


def find_bright_trails(frames, frame_mask, noise, seeing_fwhm, geometry: FrameGeometry,
                       config: TransientConfig = TransientConfig()) -> list[Streak]:
    """Bright trails that no overlapping frame shows (module docstring).

    ``frames`` (n, ny, nx) calibrated R2−R1 frames, NumPy or CuPy; ``frame_mask`` (ny, nx)
    or (n, ny, nx) mask bits (:data:`gpu2mass.frames.MASK_SATURATED` marks saturation;
    other bits make a pixel unusable); ``noise`` (n,) DN; ``seeing_fwhm`` (n,) arcsec;
    ``geometry`` the band's solved frame geometry. Only the bright-pixel map comes to the
    host (packed, 1 bit a pixel) and each trail's peak value. Returns :class:`Streak`
    objects with ``found_by`` ``"trail"``: the line through the region's ends along its
    major axis, width twice the distance at which a line of the region's peak brightness
    (Moffat wings, FWHM the frame's seeing) falls to 1 noise unit, plus the region's width.
    """
    from scipy.ndimage import find_objects, label, maximum_filter

    from gpu2mass.backend import get_namespace, to_host
    from gpu2mass.framedet import moffat_alpha_px
    from gpu2mass.frames import MASK_SATURATED

    cfg = config
    xp = get_namespace(frames)
    n, ny, nx = frames.shape
    noise = np.asarray(to_host(noise), float).reshape(n)
    seeing = np.broadcast_to(np.asarray(to_host(seeing_fwhm), float), (n,))
    fm = xp.asarray(frame_mask)
    thr = xp.asarray(cfg.trail_sigma * noise, dtype=frames.dtype)[:, None, None]
    bright_d = ((frames > thr) & (fm == 0)) | ((fm & MASK_SATURATED) != 0)
    # Packed flat (1 bit a pixel): the only copy of the frames' size that leaves the device.
    bright = np.unpackbits(to_host(xp.packbits(bright_d.ravel())), count=n * ny * nx).astype(bool)
    bright = bright.reshape(n, ny, nx)
    # A point of a trail is seen by another frame when that frame is bright within 1 pixel.
    seen_map = maximum_filter(bright, size=(1, 3, 3))
    min_len = cfg.trail_min_length_arcsec / cfg.pixel_scale_arcsec
    trails = []
    for f in range(n):
        lab, _ = label(bright[f], structure=np.ones((3, 3), bool))
        for i, sl in enumerate(find_objects(lab), 1):
            if max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) < min_len / np.sqrt(2):
                continue
            yy, xx = np.nonzero(lab[sl] == i)
            xx, yy = xx + sl[1].start, yy + sl[0].start
            c = np.array([xx.mean(), yy.mean()])
            evals, evecs = np.linalg.eigh(np.cov(np.vstack([xx, yy])))
            length = np.sqrt(12 * max(evals[1], 0.0))
            width = np.sqrt(12 * max(evals[0], 1 / 12))
            if length < min_len or length < cfg.trail_min_elongation * width:
                continue
            axis = evecs[:, 1]
            t = (xx - c[0]) * axis[0] + (yy - c[1]) * axis[1]
            ts = np.linspace(t.min(), t.max(), 9)
            ra, dec = geometry.pixel_to_sky(f, c[0] + ts * axis[0], c[1] + ts * axis[1])
            covered = seen = 0
            for g in range(n):
                if g == f or abs(float(np.mean(dec)) - geometry.dec[g]) > 0.2:
                    continue
                gx, gy = geometry.sky_to_pixel(g, ra, dec)
                inside = (gx > -0.5) & (gx < nx - 0.5) & (gy > -0.5) & (gy < ny - 0.5)
                covered += int(inside.sum())
                seen += int(seen_map[g, np.rint(gy[inside]).astype(int), np.rint(gx[inside]).astype(int)].sum())
            if covered == 0 or seen >= cfg.trail_confirm_fraction * covered:
                continue  # static (a bright star's spike or stripe), or nothing can tell
            # Saturated pixels may hold anything (NaN included): their trail is at least
            # as bright as the threshold.
            peak = float(to_host(xp.nanmax(xp.where(xp.isfinite(frames[f, sl[0], sl[1]]),
                                                    frames[f, sl[0], sl[1]], -np.inf)))) / noise[f]
            peak = max(peak, cfg.trail_sigma)
            alpha = float(moffat_alpha_px(seeing[f], cfg.psf_beta, cfg.pixel_scale_arcsec))
            # A Moffat line's profile falls as (1 + r²/α²)^(1/2 − β): to 1 noise unit at
            # r = α (peak^(1/(β − 1/2)) − 1)^(1/2).
            reach = alpha * np.sqrt(max(peak ** (1.0 / (cfg.psf_beta - 0.5)) - 1.0, 0.0))
            p0, p1 = c + t.min() * axis, c + t.max() * axis
            trails.append(Streak(f, float(p0[0]), float(p0[1]), float(p1[0]), float(p1[1]),
                                 int(xx.size), float(2 * reach + width), found_by="trail"))
    return trails
