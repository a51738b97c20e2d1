"""Simulating the frames of one scan: sky → optics → detector → R1 and R2−R1 cubes.

For every frame of every band, in order:

1. **Geometry.** The telescope's boresight is the commanded position plus the true
   pointing error (a per-scan offset, a slow drift and per-frame jitter, see
   :class:`Pointing`); each band's array centre is offset from it by the band's
   ``offset_arcsec``; sources are projected through the band's true rotation, scale and
   distortion (:mod:`gpu2mass.sim.camera`).
2. **Scene** (DN in the R2−R1 interval, flat = 1): stars and asteroids as pixel-integrated
   Moffat stamps (the :mod:`gpu2mass.kernels` PSF renderer), galaxies as Sérsic ⊗ Moffat
   stamps; flux ``10^(−0.4 (m − zp))`` with the frame's true zero point.
3. **Sky**: the band's sky level times (1 + airglow structure), persistence released by
   earlier bright stars, diffraction spikes and stripes of bright stars, meteor trails.
4. **Detector**: × flat, + dark, + cosmic rays; Gaussian noise of variance
   ``signal/g + (RN·f_noisy/g)²`` (Poisson statistics at ≥ 100 e⁻ per pixel are Gaussian
   to better than the other approximations here); R1 gets ``t_R1/t_R2R1`` of the signal
   on top of the pixel's pedestal.
5. **Saturation** exactly as the spec states: read 2 = R1 + R2R1 is clipped at SAT, so
   R2R1 = SAT − R1; R1 itself is clipped at SAT (then R2R1 = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu2mass.geometry import tan_deproject, tan_project
from gpu2mass.kernels import add_stamps, render_psf_stamps
from gpu2mass.sim import artifacts as art
from gpu2mass.sim.camera import CalibrationLibrary, Camera
from gpu2mass.sim.galaxy import galaxy_half_size, render_galaxy
from gpu2mass.sim.observing import Atmosphere, Site, SmoothProcess, airmass, gmst_deg
from gpu2mass.sim.plan import ScanPlan
from gpu2mass.sim.psf import moffat_alpha, optical_fwhm

__all__ = ["Meteor", "Pointing", "ScanSimulation", "SkyCatalog", "simulate_scan"]

_CHUNK = 24  # frames rendered together (bounds the stamp memory to tens of MB)


@dataclass(frozen=True)
class Meteor:
    """A meteor seen in one frame of a scan (all bands): sky endpoints and brightness.

    ``j_mag_per_arcsec``: J magnitude of one arcsec of trail; H and Ks are 0.3 and 0.5 mag
    brighter per arcsec (meteors are warm: J−Ks ≈ 0.5).
    """

    scan: int
    frame: int
    ra: tuple[float, float]
    dec: tuple[float, float]
    j_mag_per_arcsec: float

    def mag(self, band: str) -> float:
        return self.j_mag_per_arcsec - {"J": 0.0, "H": 0.3, "K": 0.5}[band]


class Pointing:
    """True boresight error vs the commanded position: ξ, η arcsec (east, north).

    Slow drift: 3" rms, 10-minute correlation (2MASS: deviations < 2", rarely 7–8");
    per-frame jitter 0.15" rms; per-scan offset drawn by the caller.
    """

    def __init__(self, rng: np.random.Generator, t0_mjd: float):
        self.t0 = t0_mjd
        self._xi = SmoothProcess(rng, 10 / 1440)
        self._eta = SmoothProcess(rng, 10 / 1440)
        self.drift_arcsec = 3.0 / np.sqrt(2)
        self.jitter_arcsec = 0.15

    def error(self, mjd: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(mjd) - self.t0
        jit = rng.normal(0, self.jitter_arcsec, (2, np.size(t)))
        return (self.drift_arcsec * self._xi(t) + jit[0], self.drift_arcsec * self._eta(t) + jit[1])


@dataclass(frozen=True)
class SkyCatalog:
    """The truth sources a scan can see, sorted by Dec for fast frame selection.

    Arrays of equal length: ``id``, ``kind`` (str), ``ra``, ``dec`` (deg, at
    ``epoch_mjd``), ``epoch_mjd``, ``mag`` (dict band → array), galaxy shape columns
    (``r_eff_arcsec``, ``sersic_n``, ``axis_ratio``, ``pa_deg``), ``ra_rate``/``dec_rate``
    (arcsec/hour; asteroids, NaN otherwise).
    """

    columns: dict

    @classmethod
    def from_columns(cls, cols: dict) -> SkyCatalog:
        order = np.argsort(np.asarray(cols["dec"]), kind="stable")
        return cls({k: np.asarray(v)[order] for k, v in cols.items()})

    def near(self, dec0: float, radius_deg: float) -> np.ndarray:
        dec = self.columns["dec"]
        lo, hi = np.searchsorted(dec, [dec0 - radius_deg, dec0 + radius_deg])
        return np.arange(lo, hi)


@dataclass
class ScanSimulation:
    """Result of :func:`simulate_scan`: per band the raw cubes (float DN, unrounded) and
    the FRAMES columns; the truth frame rows and artifact rows of the scan."""

    r1: dict[str, np.ndarray]
    r2r1: dict[str, np.ndarray]
    frames: dict[str, np.ndarray]
    truth_frames: list[dict]
    truth_artifacts: list[dict]


def _frame_geometry(plan: ScanPlan, camera: Camera, site: Site, pointing: Pointing,
                    rng: np.random.Generator):
    mjd = plan.frame_mjd(camera.frame_period_s)
    if not plan.is_sky:
        lst = np.mod(gmst_deg(mjd) + site.lon_deg, 360)
        return mjd, lst, np.full(plan.nframes, site.lat_deg), None, None
    ra_cmd, dec_cmd = plan.commanded(camera.frame_step_arcsec)
    exi, eeta = pointing.error(mjd, rng)
    exi = exi + plan.pointing_offset_arcsec[0]
    eeta = eeta + plan.pointing_offset_arcsec[1]
    ra_b, dec_b = tan_deproject(exi, eeta, ra_cmd, dec_cmd)
    return mjd, ra_cmd, dec_cmd, ra_b, dec_b


def simulate_scan(plan: ScanPlan, *, camera: Camera, calib: CalibrationLibrary, atm: Atmosphere,
                  site: Site, pointing: Pointing, sky: SkyCatalog | None, rng: np.random.Generator,
                  meteors: list[Meteor] = (), cosmic_ray_rate: float = 3.0) -> ScanSimulation:
    """Simulate every band of one scan (see the module docstring for the model)."""
    mjd, ra_cmd, dec_cmd, ra_b, dec_b = _frame_geometry(plan, camera, site, pointing, rng)
    n = plan.nframes
    if plan.is_sky:
        xmass = airmass(ra_b, dec_b, mjd, site)
    else:
        xmass = np.ones(n)
    frames = {"FRAME": np.arange(n, dtype=np.int32), "MJD": mjd, "RA_CMD": ra_cmd,
              "DEC_CMD": dec_cmd, "AIRMASS": xmass.astype(np.float32)}
    out = ScanSimulation({}, {}, frames, [], [])
    for band in camera.bands:
        _simulate_band(plan, band, out, camera=camera, calib=calib, atm=atm, mjd=mjd, ra_b=ra_b,
                       dec_b=dec_b, xmass=xmass, sky=sky, rng=rng, meteors=meteors,
                       cosmic_ray_rate=cosmic_ray_rate)
    return out


def _simulate_band(plan, band, out, *, camera, calib, atm, mjd, ra_b, dec_b, xmass, sky, rng,
                   meteors, cosmic_ray_rate):
    n, ny, nx = plan.nframes, camera.ny, camera.nx
    det, opt = camera.detectors[band], camera.optics.get(band)
    g, t1, t21 = det.gain_e_per_dn, camera.r1_exptime_s, camera.r2r1_exptime_s
    flat, satmap = calib.flat[band], calib.satmap[band]
    pedestal, dark21, dark1 = calib.pedestal[band], calib.dark_r2r1[band], calib.dark_r1[band]
    rn2 = (det.read_noise_e * calib.noise_factor[band] / g) ** 2
    well = satmap - pedestal
    r1 = np.empty((n, ny, nx), np.float32)
    r2r1 = np.empty((n, ny, nx), np.float32)

    scene = np.zeros((n, ny, nx), np.float32)
    skylev = np.zeros(n)
    sky_sigma = np.zeros(n)
    bright_by_frame: list[list] = [[] for _ in range(n)]
    if plan.is_sky:
        ra_c, dec_c = tan_deproject(*opt.offset_arcsec, ra_b, dec_b)
        fwhm = atm.seeing(band, mjd)
        zp = atm.zero_point(band, mjd, xmass)
        skylev = atm.sky(band, mjd)
        sky_sigma = np.sqrt(skylev / g + det.read_noise_e**2 / g**2)
        alpha = moffat_alpha(optical_fwhm(fwhm, scale=opt.scale_arcsec, beta=camera.psf_beta)
                             / opt.scale_arcsec, camera.psf_beta)
        _render_scene(scene, plan, band, camera, opt, sky, mjd, ra_c, dec_c, zp, alpha,
                      sky_sigma, bright_by_frame, out.truth_artifacts)
        for f in range(n):
            out.truth_frames.append({
                "scan": plan.number, "band": band, "frame": f, "mjd": float(mjd[f]),
                "ra": float(ra_c[f]), "dec": float(dec_c[f]), "rot_deg": opt.rotation_deg,
                "fwhm_arcsec": float(fwhm[f]), "sky_dn": float(skylev[f]), "zp_mag": float(zp[f]),
                "airmass": float(xmass[f])})
        # Tangent-plane offsets of every pixel, for the airglow structure.
        yy, xx = np.mgrid[0:ny, 0:nx]
        gxi, geta = opt.pixel_to_tangent(xx - (nx - 1) / 2, yy - (ny - 1) / 2)

    latent = art.Persistence((ny, nx))
    period = camera.frame_period_s
    for f in range(n):
        ids = (plan.number, band, f)
        sig = scene[f]
        if plan.is_sky:
            sig += np.float32(skylev[f]) * (1 + atm.airglow(band, mjd[f], gxi, geta)).astype(np.float32)
            for m in meteors:
                if m.frame == f:
                    _add_meteor(sig, m, band, camera, opt, ra_c[f], dec_c[f], zp[f], alpha[f], ids,
                                out.truth_artifacts)
        release, rows = latent.release(period, t21, float(sky_sigma[f]) if plan.is_sky else 5.0, ids)
        out.truth_artifacts.extend(rows)
        sig += release
        illum = sig * flat
        s21 = illum + dark21
        out.truth_artifacts.extend(
            art.add_cosmic_rays(s21, rng, gain=g, rate=cosmic_ray_rate, ids=ids))
        s1 = illum * np.float32(t1 / t21) + dark1
        noise = rng.standard_normal((2, ny, nx), dtype=np.float32)
        a21 = s21 + np.sqrt(np.maximum(s21, 0) / g + rn2) * noise[0]
        a1 = pedestal + s1 + np.sqrt(np.maximum(s1, 0) / g + rn2) * noise[1]
        # The spec's saturation rule: read 2 = R1 + R2R1 clipped at SAT.
        np.minimum(a1, satmap, out=a1)
        np.minimum(a21, satmap - a1, out=a21)
        r1[f], r2r1[f] = a1, a21
        if plan.is_sky:
            latent.trap(illum * np.float32((t1 + t21) / t21), well, bright_by_frame[f])
    out.r1[band] = r1
    out.r2r1[band] = r2r1


def _render_scene(scene, plan, band, camera, opt, sky, mjd, ra_c, dec_c, zp, alpha, sky_sigma,
                  bright_by_frame, artifact_rows):
    """Draw every source into ``scene`` (n, ny, nx), DN in the R2−R1 interval, flat = 1."""
    if sky is None:
        return
    n, ny, nx = scene.shape
    cols = sky.columns
    mags = cols[{"J": "j_m", "H": "h_m", "K": "k_m"}[band]]
    kind = cols["kind"]
    radius = (np.hypot(nx, ny) * opt.scale_arcsec / 2 + 200) / 3600.0
    beta = camera.psf_beta
    for c0 in range(0, n, _CHUNK):
        fr = range(c0, min(n, c0 + _CHUNK))
        pts = {k: [] for k in ("f", "x", "y", "flux", "alpha", "id", "mag", "half")}
        for f in fr:
            idx = sky.near(dec_c[f], radius)
            if idx.size == 0:
                continue
            ra, dec = cols["ra"][idx], cols["dec"][idx]
            moving = np.isfinite(cols["ra_rate"][idx])
            if moving.any():
                dt_h = (mjd[f] - cols["epoch_mjd"][idx][moving]) * 24.0
                dec = dec.copy()
                ra = ra.copy()
                dec[moving] += cols["dec_rate"][idx][moving] * dt_h / 3600.0
                ra[moving] += cols["ra_rate"][idx][moving] * dt_h / 3600.0 / np.cos(np.deg2rad(dec[moving]))
            xi, eta = tan_project(ra, dec, ra_c[f], dec_c[f])
            u, v = opt.tangent_to_pixel(xi, eta)
            x, y = u + (nx - 1) / 2, v + (ny - 1) / 2
            flux = 10.0 ** (-0.4 * (mags[idx] - zp[f]))
            gal = kind[idx] == "galaxy"
            # Keep a source only if its own stamp touches the frame.
            half = _HALF_CLASSES[np.searchsorted(_HALF_CLASSES, _half_size(flux, alpha[f], sky_sigma[f]))]
            if gal.any():
                r_px = cols["r_eff_arcsec"][idx[gal]] / opt.scale_arcsec
                half[gal] = galaxy_half_size(r_px, cols["sersic_n"][idx[gal]], psf_alpha_px=alpha[f],
                                             psf_beta=beta)
            # Spike parents outside the frame still throw spikes into it.
            reach = np.where(mags[idx] <= art.SPIKE_LIMIT[band], np.maximum(half, 96), half)
            inside = (x > -reach - 0.5) & (x < nx - 0.5 + reach) & (y > -reach - 0.5) & (y < ny - 0.5 + reach)
            for k in np.flatnonzero(inside & gal):
                _add_galaxy(scene[f], cols, idx[k], x[k], y[k], flux[k], alpha[f], beta, opt, int(half[k]))
            k = np.flatnonzero(inside & ~gal)
            pts["f"].append(np.full(k.size, f))
            for name, arr in (("x", x), ("y", y), ("flux", flux), ("id", cols["id"][idx]),
                              ("mag", mags[idx]), ("half", half)):
                pts[name].append(arr[k])
            pts["alpha"].append(np.full(k.size, alpha[f]))
        if not pts["f"]:
            continue
        p = {k: np.concatenate(v) for k, v in pts.items()}
        _render_points(scene, p, beta)
        _bright_star_artifacts(scene, p, band, opt, sky_sigma, camera, bright_by_frame,
                               artifact_rows, plan.number)


def _half_size(flux, alpha, sky_sigma_px):
    """Stamp half-size (px) so that the truncated Moffat (β = 2.5) wing is below 5 % of
    the pixel noise, at most 96 px; at least 10 px (≤ 0.15 % of the flux lost) for stars
    brighter than 13σ of the pixel noise, and 6 px (≤ 0.6 %, under 5 % of the star's own
    noise in a frame) for fainter ones, which are most of the stars and most of the cost."""
    wing = flux * 0.477 * alpha**3 / (0.05 * sky_sigma_px)
    h = np.ceil(wing ** 0.2)
    floor = np.where(flux < 13 * sky_sigma_px, 6, 10)
    return np.clip(np.maximum(h, floor), 6, 96).astype(int)


_HALF_CLASSES = np.array([6, 10, 14, 20, 28, 40, 56, 96])


def _render_points(scene, p, beta):
    h_cls = p["half"]
    cx, cy = np.rint(p["x"]).astype(np.int64), np.rint(p["y"]).astype(np.int64)
    fx, fy = p["x"] - cx, p["y"] - cy
    for h in np.unique(h_cls):
        sel = np.flatnonzero(h_cls == h)
        stamps = render_psf_stamps(fx[sel], fy[sel], p["flux"][sel], p["alpha"][sel],
                                   np.full(sel.size, beta), half_size=int(h))
        fsel = p["f"][sel]
        for f in np.unique(fsel):
            k = np.flatnonzero(fsel == f)
            add_stamps(scene[f], stamps[k], cx[sel][k] - h, cy[sel][k] - h)


def _add_galaxy(image, cols, i, x, y, flux, alpha, beta, opt, h):
    r_eff_px = cols["r_eff_arcsec"][i] / opt.scale_arcsec
    cx, cy = int(np.rint(x)), int(np.rint(y))
    stamp = render_galaxy(flux, r_eff_px, cols["sersic_n"][i], cols["axis_ratio"][i],
                          cols["pa_deg"][i], x - cx, y - cy, alpha, beta, half_size=h,
                          rotation_deg=opt.rotation_deg)
    add_stamps(image, stamp[None], np.array([cx - h]), np.array([cy - h]))


def _bright_star_artifacts(scene, p, band, opt, sky_sigma, camera, bright_by_frame, rows, scan):
    """Spikes and stripes for bright point sources; remember persistence candidates."""
    from gpu2mass.sim.sensitivity import full_well_dn

    n, ny, nx = scene.shape
    lim = art.SPIKE_LIMIT[band]
    well = full_well_dn(band, camera.detectors[band])
    for k in np.flatnonzero(p["mag"] <= lim + 1.5):
        f, x, y, flux, pid = int(p["f"][k]), p["x"][k], p["y"][k], p["flux"][k], int(p["id"][k])
        ids = (scan, band, f)
        peak = 0.3 * flux  # peak-pixel fraction at median seeing
        if 0 <= x < nx and 0 <= y < ny and peak > 0.3 * well:
            bright_by_frame[f].append((pid, x, y))
        if p["mag"][k] <= lim:
            rows.extend(art.add_spikes(scene[f], x, y, flux, p["mag"][k], band,
                                       rotation_deg=opt.rotation_deg,
                                       sky_sigma=float(sky_sigma[f]), ids=ids, parent_id=pid))
        if peak > 10 * well and -0.5 <= y < ny - 0.5:
            rows.extend(art.add_stripe(scene[f], y, flux, ids=ids, parent_id=pid))


def _add_meteor(image, m: Meteor, band, camera, opt, ra_c, dec_c, zp, alpha, ids, rows):
    ny, nx = image.shape
    xi, eta = tan_project(np.array(m.ra), np.array(m.dec), ra_c, dec_c)
    u, v = opt.tangent_to_pixel(xi, eta)
    x0, x1 = u + (nx - 1) / 2
    y0, y1 = v + (ny - 1) / 2
    seg = art.segment_in_frame(x0, y0, x1, y1, nx, ny)
    if seg is None:
        return
    dn_per_px = 10.0 ** (-0.4 * (m.mag(band) - zp)) * opt.scale_arcsec
    sigma = alpha * 0.9  # Moffat β = 2.5 core ≈ Gaussian of σ ≈ 0.9 α
    art.add_trail(image, x0, y0, x1, y1, dn_per_px_length=dn_per_px, sigma_px=sigma)
    rows.append({"scan": ids[0], "band": band, "frame": ids[2], "kind": "meteor",
                 "x0": seg[0], "y0": seg[1], "x1": seg[2], "y1": seg[3], "parent_id": None})
