"""What the sky and the camera add that is not a source (recorded in ``truth/artifacts``).

Every function draws into a float image of one frame (DN in the R2−R1 interval at flat = 1,
unless stated) and returns the truth rows it is responsible for, with the geometry
columns of ``truth/artifacts.parquet`` (frame pixels). Models and numbers:

- **Cosmic rays** (:func:`add_cosmic_rays`): Poisson, ``rate`` per R2−R1 frame (3 by
  default, a ground-level NICMOS3 in a dewar); short tracks of 1–4 pixels, 300–15,000 e⁻
  each. Only hits in the R2−R1 interval are simulated, so R1 frames carry none.
- **Meteor trails** (:func:`add_trail`): a straight line of Gaussian cross-section
  (σ = PSF width) and uniform surface brightness, in one frame of each band.
- **Diffraction spikes** (:func:`add_spikes`): parents brighter than J 10.0, H 9.5,
  Ks 9.0 (facts sheet 6); four spikes at position angles 0/90/180/270° from the secondary
  mirror's spider, split into two components ±1.2° apart near 90° and 270° for parents
  more than 3 mag brighter than that limit (2MASS saw ~6 components). Surface brightness
  ``3e-3 F / r^1.5`` per pixel of length out to where it drops below 0.3σ of the sky.
- **Stripes** (:func:`add_stripe`): NICMOS3 electronic row stripes from parents whose
  peak saturates read 2 by ≥ 10×: rows within ±1 of the parent lose ``2e-5 F`` DN across
  the array.
- **Persistence**: see :class:`Persistence`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SPIKE_LIMIT",
    "Persistence",
    "add_cosmic_rays",
    "add_spikes",
    "add_stripe",
    "add_trail",
    "segment_in_frame",
]

#: Parents at least this bright produce visible diffraction spikes (facts sheet 6).
SPIKE_LIMIT = {"J": 10.0, "H": 9.5, "K": 9.0}


def _row(scan, band, frame, kind, x0, y0, x1, y1, parent_id=None) -> dict:
    return {"scan": int(scan), "band": band, "frame": int(frame), "kind": kind,
            "x0": float(x0), "y0": float(y0), "x1": float(x1), "y1": float(y1),
            "parent_id": None if parent_id is None else int(parent_id)}


def add_cosmic_rays(image: np.ndarray, rng: np.random.Generator, *, gain: float, rate: float,
                    ids: tuple[int, str, int]) -> list[dict]:
    """Add Poisson(``rate``) cosmic-ray hits to ``image`` (DN, in place); return rows."""
    ny, nx = image.shape
    rows = []
    for _ in range(rng.poisson(rate)):
        n = int(rng.integers(1, 5))
        e_total = float(np.exp(rng.uniform(np.log(300), np.log(15000))))
        ang = rng.uniform(0, np.pi)
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        xs = np.clip(np.rint(x0 + np.arange(n) * np.cos(ang)), 0, nx - 1).astype(int)
        ys = np.clip(np.rint(y0 + np.arange(n) * np.sin(ang)), 0, ny - 1).astype(int)
        share = rng.dirichlet(np.ones(n)) * e_total / gain
        np.add.at(image, (ys, xs), share)
        rows.append(_row(*ids, "cosmic_ray", xs[0], ys[0], xs[-1], ys[-1]))
    return rows


def segment_in_frame(x0, y0, x1, y1, nx, ny) -> tuple[float, float, float, float] | None:
    """Clip a segment to the frame ``[-0.5, n-0.5]`` (Liang–Barsky); ``None`` if outside."""
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0 + 0.5), (dx, nx - 0.5 - x0), (-dy, y0 + 0.5), (dy, ny - 0.5 - y0)):
        if p == 0:
            if q < 0:
                return None
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return None
    return x0 + t0 * dx, y0 + t0 * dy, x0 + t1 * dx, y0 + t1 * dy


def add_trail(image: np.ndarray, x0, y0, x1, y1, *, dn_per_px_length: float,
              sigma_px: float) -> None:
    """Add a straight trail of Gaussian cross-section (σ px), ``dn_per_px_length`` DN per
    pixel of length, from (x0, y0) to (x1, y1) (ends may lie outside the image)."""
    ny, nx = image.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    dx, dy = x1 - x0, y1 - y0
    length = np.hypot(dx, dy)
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / length**2, 0, 1)
    d2 = (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2
    image += (dn_per_px_length / (np.sqrt(2 * np.pi) * sigma_px) * np.exp(-0.5 * d2 / sigma_px**2)
              ).astype(image.dtype)


def add_spikes(image: np.ndarray, x: float, y: float, flux: float, mag: float, band: str, *,
               rotation_deg: float, sky_sigma: float, ids: tuple[int, str, int],
               parent_id: int) -> list[dict]:
    """Diffraction spikes of a parent at pixel (x, y) with total flux ``flux`` (DN)."""
    ny, nx = image.shape
    amp = 3e-3 * flux
    length = min((amp / (0.3 * sky_sigma)) ** (1 / 1.5), 400.0)
    if length < 4:
        return []
    pas = [0.0, 90.0, 180.0, 270.0]
    if mag < SPIKE_LIMIT[band] - 3:
        pas = [0.0, 88.8, 91.2, 180.0, 268.8, 271.2]
    rows = []
    r = np.arange(2.0, length, 0.25)
    for pa in pas:
        # Sky PA (east of north) → pixel direction: +y is PA = rotation, +x is west.
        t = np.deg2rad(pa - rotation_deg)
        ux, uy = -np.sin(t), np.cos(t)
        xs, ys = x + r * ux, y + r * uy
        w = amp * r ** -1.5 * 0.25 / (len(pas) / 4)
        ix, iy = np.rint(xs).astype(int), np.rint(ys).astype(int)
        ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        if not ok.any():
            continue
        np.add.at(image, (iy[ok], ix[ok]), w[ok])
        seg = segment_in_frame(x + 2 * ux, y + 2 * uy, x + length * ux, y + length * uy, nx, ny)
        if seg is not None:
            rows.append(_row(*ids, "spike", *seg, parent_id=parent_id))
    return rows


def add_stripe(image: np.ndarray, y: float, flux: float, *, ids: tuple[int, str, int],
               parent_id: int) -> list[dict]:
    """An electronic stripe: rows within ±1 of ``y`` lose ``2e-5 flux`` DN."""
    ny, nx = image.shape
    iy = int(np.rint(y))
    rows = []
    for r in (iy - 1, iy, iy + 1):
        if 0 <= r < ny:
            image[r, :] -= 2e-5 * flux
    if 0 <= iy < ny:
        rows.append(_row(*ids, "stripe", 0, iy, nx - 1, iy, parent_id=parent_id))
    return rows


@dataclass
class Persistence:
    """Latent images of bright stars on one band's array (NICMOS3 charge trapping).

    Pixels whose read-2 signal exceeds ``threshold`` × full well trap ``efficiency`` of the
    excess, counting the charge a saturated pixel would have collected (up to
    ``overfill`` × full well: persistence grows with over-saturation); the trapped charge is released exponentially with time constant ``tau_s``,
    adding to later frames at the same *pixel* position. Since the sky moves 41 px per
    frame, a bright star leaves a trail of ghosts along the scan (facts sheet 6).

    The latent image is kept in DN; :meth:`release` returns the charge released during the
    next frame's R2−R1 interval and records each parent's ghost while it is above
    ``visible_sigma`` × the sky noise.
    """

    shape: tuple[int, int]
    tau_s: float = 6.0
    efficiency: float = 0.005
    threshold: float = 0.3
    overfill: float = 20.0
    visible_sigma: float = 3.0
    latent: np.ndarray = field(init=False)
    parents: list = field(init=False, default_factory=list)

    def __post_init__(self):
        self.latent = np.zeros(self.shape, np.float32)

    def release(self, dt_s: float, r2r1_s: float, sky_sigma: float, ids) -> tuple[np.ndarray, list]:
        """Charge (DN) released during the next R2−R1 interval, after ``dt_s`` seconds."""
        if not self.parents and not self.latent.any():
            return np.zeros(self.shape, np.float32), []
        self.latent *= np.float32(np.exp(-(dt_s - r2r1_s) / self.tau_s))
        frac = 1 - np.exp(-r2r1_s / self.tau_s)
        out = self.latent * np.float32(frac)
        self.latent -= out
        rows, keep = [], []
        for pid, x, y, peak in self.parents:
            peak *= np.exp(-(dt_s - r2r1_s) / self.tau_s)
            rel = peak * frac
            peak -= rel
            if rel > self.visible_sigma * sky_sigma:
                rows.append(_row(*ids, "persistence", x, y, x, y, parent_id=pid))
                keep.append((pid, x, y, peak))
        self.parents = keep
        return out, rows

    def trap(self, read2_signal: np.ndarray, well: np.ndarray, bright: list[tuple[int, float, float]]):
        """Trap charge after a frame. ``bright``: (parent_id, x, y) of stars that may exceed
        the threshold; their trapped peak is remembered for the truth rows."""
        excess = np.minimum(read2_signal, self.overfill * well) - self.threshold * well
        np.maximum(excess, 0, out=excess)
        if not excess.any():
            return
        self.latent += np.float32(self.efficiency) * excess.astype(np.float32)
        ny, nx = self.shape
        for pid, x, y in bright:
            ix, iy = int(np.rint(x)), int(np.rint(y))
            if 0 <= ix < nx and 0 <= iy < ny and excess[iy, ix] > 0:
                self.parents.append((pid, float(x), float(y), float(self.efficiency * excess[iy, ix])))
