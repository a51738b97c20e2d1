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
- **Streaks**: in each frame, the line through two solos that has the most solos within
  3" of it is taken if it has ≥ 15 of them over ≥ 20"; its solos are removed and the search
  repeats. A streak is blanked edge to edge across its frame with width 6 × (count // 8)
  camera pixels (at least 6); streaks found in more than 2 frames (slow meteors,
  satellites) are blanked only along their detected length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from gpu2mass.geometry import FrameGeometry

__all__ = ["Streak", "TransientConfig", "Transients", "run_transients"]


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


@dataclass(frozen=True)
class Streak:
    """A streak in one frame: its line through (x0, y0)–(x1, y1) (the extreme solos, frame
    pixels), the number of solos on it, and the blanking width (camera pixels)."""

    frame: int
    x0: float
    y0: float
    x1: float
    y1: float
    count: int
    width_px: float


@dataclass(frozen=True)
class Transients:
    """Result of :func:`run_transients` for one band of one scan.

    ``solo`` (bool per input detection), ``streaks``, and ``mask`` (n, ny, nx) bool:
    pixels to exclude from the Atlas Images (True = masked)."""

    solo: np.ndarray
    streaks: tuple[Streak, ...]
    mask: np.ndarray


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
                   config: TransientConfig = TransientConfig()) -> Transients:
    """Find solos and streaks among one band's single-frame detections and build masks.

    ``detections`` has columns ``frame``, ``x``, ``y``, ``flux`` (4" aperture, DN) and
    optionally ``fpeak``; ``geometry`` is the band's solved frame geometry.
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
        return Transients(np.zeros(0, bool), (), mask)
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
    return Transients(solo, tuple(streaks), mask)
