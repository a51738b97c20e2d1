"""``gpu2mass night``: process a raw night (orchestration only: no science here).

Per sky scan (science and calibration), band by band: frame calibration, single-frame
detection, frame position reconstruction, transient masks; the scan's Atlas Images; then
the point sources (Atlas detection, PSF model and photometry, aperture and R1 photometry,
band merging, artifact flags) into the scan's instrumental rows. Darks are built once per
night from its dark scans. A scan that fails is recorded with its reason and the others go
on; its products are staged under ``.staging/`` and moved into place only when the whole
scan succeeded (``scans/<scan>/frames.parquet`` last, as the completion marker), so an
interrupted or failed scan never leaves partial products.

Then the night-level steps (:func:`_night_steps`): photometric calibration, final
astrometry, the catalog rows, the Atlas zero points, QA and the report; then ``run.json``
and the working database. ``resume`` keeps the scans whose marker exists and recomputes
the night-level products from the scans' working files, so it writes what an
uninterrupted run writes.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from astropy.time import Time

from gpu2mass import backend
from gpu2mass.config import RunConfig
from gpu2mass.errors import Gpu2MassError, InputError, StepError
from gpu2mass.geometry import tan_deproject
from gpu2mass.io import products
from gpu2mass.io.rawnight import Night, open_night

__all__ = ["NightResult", "ScanOutcome", "run_night"]

log = logging.getLogger(__name__)


@dataclass
class ScanOutcome:
    """What happened to one scan: ``status`` ok/failed/skipped, the reason when failed,
    seconds per stage, and the products written."""

    scan: int
    type: str
    status: str = "ok"
    reason: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    products: list[str] = field(default_factory=list)
    resumed: bool = False


@dataclass
class NightResult:
    """The night's outcome: per scan, and the night-level steps' and the database load's
    errors (``None`` when they succeeded)."""

    out_dir: Path
    scans: list[ScanOutcome]
    device: str
    seconds: float
    night_error: str | None = None
    database_error: str | None = None

    @property
    def failed(self) -> list[ScanOutcome]:
        return [s for s in self.scans if s.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and self.night_error is None and self.database_error is None


class _Timer:
    """``with timer("step"):`` adds the step's wall time to ``seconds`` (device work
    included) and tells ``on_step`` which step starts (progress display)."""

    def __init__(self, seconds: dict, xp, on_step: Callable[[str], None] | None = None):
        self.seconds, self.xp, self.on_step = seconds, xp, on_step

    def __call__(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                if timer.on_step is not None:
                    timer.on_step(stage)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.xp.__name__ == "cupy":  # time device work, not its launch
                    timer.xp.cuda.get_current_stream().synchronize()
                timer.seconds[stage] = timer.seconds.get(stage, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


@contextmanager
def _band_context(band: str):
    """Name the band in a step's failure (the steps themselves work on one band's arrays)."""
    try:
        yield
    except StepError as exc:
        if str(exc).startswith("band "):
            raise
        raise StepError(f"band {band}: {exc}") from exc


def _check_band_data(band: str, r1: np.ndarray, r2r1: np.ndarray, satmap: np.ndarray) -> None:
    """Fail a scan whose band holds no data a pipeline can use, saying so in words a person
    can act on (a dead readout, a saturated array), before the steps fail obscurely.

    ``r1``, ``r2r1``: (nframes, ny, nx) DN; ``satmap``: (ny, nx) DN.
    """
    sub1, sub2 = r1[:, ::4, ::4], r2r1[:, ::4, ::4]
    if float(np.ptp(sub2)) == 0.0 and float(np.ptp(sub1)) == 0.0:
        raise StepError(f"band {band}: no signal: every R1 and R2-R1 pixel of every frame reads "
                        f"{float(sub2.flat[0]):g} DN (a dead or missing readout)")
    # A saturated pixel stops at its full well in read 1 and gains nothing by read 2.
    saturated = (sub1 >= 0.98 * satmap[::4, ::4]).mean(axis=(1, 2))
    if float(saturated.min()) >= 0.99:
        raise StepError(f"band {band}: every frame is saturated (at least 99 % of the pixels of "
                        f"each frame at the saturation level): nothing can be measured")


def _scan_epoch_jyear(night: Night, scan) -> float:
    return float(Time(scan.start_mjd, format="mjd").jyear)


def _no_timer(stage: str):
    """A timer that times nothing (for callers outside a night run)."""
    return nullcontext()


def calibrate_and_register(night: Night, info, scan, band: str, darks, cfg: RunConfig, xp,
                           timer: Callable = _no_timer):
    """The first steps of one band of one scan: frame calibration, single-frame detection
    on R2−R1 and R1, frame position reconstruction and transient masks.

    ``scan``: the scan's raw data (``night.load_scan(info.number)``); ``darks``: the night's
    darks per band; ``xp``: NumPy or CuPy, where the frames are processed; ``timer``:
    ``timer(step)`` gives a context manager timing that step (none by default).
    Returns ``(cal, reg, tr, det, det_r1)``: the calibrated frames, the registration, the
    transients (their mask in ``xp``) and the R2−R1 and R1 detections.
    """
    from gpu2mass.framedet import FrameDetWarning, run_frame_detection
    from gpu2mass.frames import run_calibrate_frames
    from gpu2mass.refcat import load_reference_stars
    from gpu2mass.register import run_register
    from gpu2mass.transients import run_transients

    inst = night.instrument
    sb = scan[band]
    with timer("read"):
        r1 = np.asarray(sb.r1[0 : info.nframes], dtype=np.float32)
        r2r1 = np.asarray(sb.r2r1[0 : info.nframes], dtype=np.float32)
        _check_band_data(band, r1, r2r1, night.calib_image("satmap", band))
    with timer("upload"):
        r1, r2r1 = xp.asarray(r1), xp.asarray(r2r1)
        dark = darks[band]
        dark = replace(dark, r1=xp.asarray(dark.r1), r2r1=xp.asarray(dark.r2r1))
        # Hot and noisy pixels found in the night's darks join the library's bad pixels.
        badpix = night.calib_image("badpix", band) | backend.to_host(darks[band].defects).astype(np.uint8)
        calib = {"flat": xp.asarray(night.calib_image("flat", band)),
                 "satmap": xp.asarray(night.calib_image("satmap", band)), "badpix": xp.asarray(badpix)}
    with timer("frames"):
        cal = run_calibrate_frames(r1, r2r1, dark=dark, flat=calib["flat"], satmap=calib["satmap"],
                                   badpix=calib["badpix"], config=cfg.frames)
    with timer("framedet"):
        det = run_frame_detection(cal.r2r1, mask=cal.mask_r2r1, noise=cal.noise_r2r1, config=cfg.framedet)
        # R1 (51 ms) frames hold only the bright stars, too few to measure the seeing:
        # the R2−R1 frames' seeing is used. Frames without any detection are normal there.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FrameDetWarning)
            det_r1 = run_frame_detection(cal.r1, mask=cal.mask_r1, noise=cal.noise_r1,
                                         seeing_fwhm=det.meta["seeing_fwhm"], config=cfg.framedet)
    frames = sb.frames
    with timer("register"):
        pad = 0.25
        dec_lo, dec_hi = float(frames["DEC_CMD"].min()) - pad, float(frames["DEC_CMD"].max()) + pad
        ra0 = float(np.median(frames["RA_CMD"]))
        dra = pad / max(np.cos(np.deg2rad(max(abs(dec_lo), abs(dec_hi)))), 0.05)
        ref = load_reference_stars(night.reference_catalog, epoch_jyear=_scan_epoch_jyear(night, info),
                                   ra_range=((ra0 - dra) % 360, (ra0 + dra) % 360),
                                   dec_range=(dec_lo, dec_hi))
        reg = run_register(det, commanded_ra=frames["RA_CMD"], commanded_dec=frames["DEC_CMD"],
                           reference=ref, nx=inst.nx, ny=inst.ny, config=cfg.register)
    with timer("transients"):
        tr = run_transients(det, geometry=reg.geometry, band=band, nframes=info.nframes,
                            frames=cal.r2r1, frame_mask=cal.mask_r2r1, noise=cal.noise_r2r1,
                            seeing_fwhm=det.meta["seeing_fwhm"], config=cfg.transients)
        # The mask goes where the frames are, once: the coadd and the point-source steps
        # combine it with the frames' own masks there.
        tr = replace(tr, mask=xp.asarray(tr.mask))
    return cal, reg, tr, det, det_r1


def coadd_frames(cal, tr, det, geometry, cfg: RunConfig, xp, timer: Callable = _no_timer):
    """The coadd's own copy of one band's frames: each frame's background structure (OH
    airglow) out (``atlas.frame_background``) and bad pixels under stars filled with the
    frame's PSF model (``starfill``); the point-source fits use the frames as they are.

    ``cal``, ``tr``, ``det``, ``geometry``: the band's calibrated frames, transients, R2−R1
    detections and frame geometry (:func:`calibrate_and_register`). Returns ``(frames,
    mask, noise)`` for :func:`gpu2mass.atlas.run_atlas`: float32 (n, ny, nx) and bool
    (n, ny, nx) in ``xp``, and each frame's pixel noise (n,), DN, on the host.
    """
    from gpu2mass.atlas import flatten_frame_backgrounds, remove_frame_gradients
    from gpu2mass.frames import pixel_noise
    from gpu2mass.starfill import fill_bad_pixels_under_stars

    with timer("atlas"):
        transient = xp.asarray(tr.mask)  # on the device already (calibrate_and_register)
        unusable = (cal.mask_r2r1 != 0) | transient
        frame_noise = backend.to_host(cal.noise_r2r1)
    frames = cal.r2r1
    if cfg.atlas.frame_background != "none":
        with timer("atlas"):
            if cfg.atlas.frame_background == "plane":
                frames, _ = remove_frame_gradients(cal.r2r1, unusable, config=cfg.atlas)
            else:
                frames, _ = flatten_frame_backgrounds(cal.r2r1, unusable, noise=frame_noise,
                                                      config=cfg.atlas)
    with timer("starfill"):
        frames, mask, _ = fill_bad_pixels_under_stars(
            frames, cal.mask_r2r1, transient_mask=transient, detections=det, geometry=geometry,
            seeing_fwhm=det.meta["seeing_fwhm"], noise=frame_noise, config=cfg.starfill,
            copy=frames is cal.r2r1)
    with timer("atlas"):
        noise = pixel_noise(cal.r2r1, unusable)
    return frames, mask, noise


def _process_scan(night: Night, info, darks, cfg: RunConfig, dev: backend.Device, staging: Path,
                  outcome: ScanOutcome, on_step: Callable[[str], None] | None = None) -> dict:
    """All steps of one scan; returns the columns of its frames table."""
    from gpu2mass.atlas import plan_atlas_grids, run_atlas, write_atlas
    from gpu2mass.sim.psf import sampled_fwhm_table

    xp = dev.xp
    timer = _Timer(outcome.seconds, xp, on_step)
    inst = night.instrument
    scan = night.load_scan(info.number)
    per_band = {}
    table = {k: [] for k in ("band", "frame", "mjd", "ra", "dec", "ra_cmd", "dec_cmd", "offset_xi_arcsec",
                             "offset_eta_arcsec", "rot_deg", "scale_arcsec", "sky_dn", "noise_dn", "airmass",
                             "seeing_arcsec", "zp_mag", "n_det", "n_det_r1")}
    for band in inst.bands:
        with _band_context(band):
            cal, reg, tr, det, det_r1 = calibrate_and_register(night, info, scan, band, darks, cfg, xp, timer)
            frames = scan[band].frames
            per_band[band] = (cal, reg, tr, det, det_r1)
            n = info.nframes
            table["band"] += [band] * n
            table["frame"].append(np.arange(n))
            table["mjd"].append(frames["MJD"])
            table["ra"].append(reg.geometry.ra)
            table["dec"].append(reg.geometry.dec)
            table["ra_cmd"].append(frames["RA_CMD"])
            table["dec_cmd"].append(frames["DEC_CMD"])
            table["offset_xi_arcsec"].append(reg.offsets_arcsec[:, 0])
            table["offset_eta_arcsec"].append(reg.offsets_arcsec[:, 1])
            table["rot_deg"].append(np.full(n, reg.geometry.band.rotation_deg))
            table["scale_arcsec"].append(np.full(n, reg.geometry.band.scale_arcsec))
            table["sky_dn"].append(backend.to_host(cal.sky_r2r1))
            table["noise_dn"].append(backend.to_host(cal.noise_r2r1))
            table["airmass"].append(frames["AIRMASS"])
            # Seeing as 2MASS quoted it: the FWHM of stars as the 2" pixels sample them.
            table["seeing_arcsec"].append(sampled_fwhm_table(np.asarray(det.meta["seeing_fwhm"]),
                                                             scale=reg.geometry.band.scale_arcsec))
            table["zp_mag"].append(np.full(n, cfg.transients.zero_point[band]))  # instrumental
            table["n_det"].append(np.bincount(np.asarray(det["frame"], np.int64), minlength=n))
            table["n_det_r1"].append(np.bincount(np.asarray(det_r1["frame"], np.int64), minlength=n))
    images = {b: [] for b in per_band}
    noises = {}
    with ThreadPoolExecutor(1) as writer:
        # Each image is written while the next is computed: the write is mostly waiting on
        # the file system (~15 ms of 28 ms per image), which a second thread hides.
        writes = []
        with timer("atlas"):
            grids = plan_atlas_grids({b: per_band[b][1].geometry for b in per_band}, config=cfg.atlas)
        for band, (cal, reg, tr, det, _det_r1) in per_band.items():
            atlas_frames, atlas_mask, noise = coadd_frames(cal, tr, det, reg.geometry, cfg, xp, timer)
            noises[band] = noise
            with timer("atlas"):
                seeing = float(np.median(sampled_fwhm_table(np.asarray(det.meta["seeing_fwhm"]),
                                                            scale=reg.geometry.band.scale_arcsec)))
                for k, grid in enumerate(grids):
                    img = run_atlas(atlas_frames, mask=atlas_mask, geometry=reg.geometry, noise=noise,
                                    grid=grid, config=cfg.atlas, band=band, scan=info.number,
                                    scan_type=info.type, scan_dir=info.direction or "", sky=cal.sky_r2r1,
                                    zp_mag=np.full(info.nframes, cfg.transients.zero_point[band]),
                                    seeing_arcsec=seeing)
                    path = products.atlas_path(staging, band, info.number, k + 1)
                    writes.append(writer.submit(write_atlas, path, img))
                    outcome.products.append(str(path.relative_to(staging)))
                    images[band].append(img)
            del atlas_frames, atlas_mask
        with timer("atlas"):
            for done in writes:
                done.result()  # a failed write fails the scan here
    mjd_mid = float(np.mean(scan[inst.bands[0]].frames["MJD"]))
    pts = _point_sources(night, info, per_band, images, noises, mjd_mid, cfg, timer)
    # The bands' focal-plane geometry (the frames table has the frame centres, rotation and
    # scale; the distortion is kept here) for the night-level steps' edge distances.
    from gpu2mass.io.rawwrite import write_json

    path = _pts_inst_path(staging, info.number).parent / "geometry.json"
    write_json(path, {b: {"nx": g.band.nx, "ny": g.band.ny, "scale_arcsec": g.band.scale_arcsec,
                          "rotation_deg": g.band.rotation_deg,
                          "distortion": np.asarray(g.band.distortion, float).tolist()}
                      for b, g in ((b, per_band[b][1].geometry) for b in per_band)})
    outcome.products.append(str(path.relative_to(staging)))
    # The bands' PSF photometric scale (normalisation and curve of growth) and its error,
    # for the night's error calibration.
    path = _pts_inst_path(staging, info.number).parent / "photometry.json"
    write_json(path, pts.meta.pop("photometry", {}))
    outcome.products.append(str(path.relative_to(staging)))
    # Instrumental, scan-frame positions: the night-level steps (calibration, PosPts, PSC
    # columns) turn them into scans/<scan>/pts.parquet once every scan is done.
    path = _pts_inst_path(staging, info.number)
    products.write_table(path, pts)
    outcome.products.append(str(path.relative_to(staging)))
    return {k: (np.concatenate(v) if k != "band" else v) for k, v in table.items()}


def _read_scale_errors(root: Path, scan: int) -> dict:
    """Band → the scan's quoted PSF photometric-scale error (fractional; None where the
    scan had no normalisation), from its ``photometry.json`` working file. A scan
    processed before that file existed (resumed) gets none: its cmsig then lacks the
    scale error, which the log says."""
    path = _pts_inst_path(root, scan).parent / "photometry.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        log.warning("scan %d: %s is missing (processed by an older version): its cmsig holds no "
                    "photometric-scale error; re-run the scan without --resume to add it", scan, path)
        return {}
    except (OSError, ValueError) as exc:
        raise StepError(f"night: {path}: cannot read the scan's photometric scale ({exc})") from exc
    return {band: v.get("psf_scale_err") for band, v in info.items()}


def _pts_inst_path(root: Path, scan: int) -> Path:
    """The scan's instrumental point-source rows, a working file of the night phase."""
    return Path(root) / ".work" / "scans" / f"{scan:03d}" / "pts_inst.parquet"


def _own_zone(t, img, overlap_px: float, first: bool, last: bool):
    """Rows of an Atlas image's detections that belong to it: each half of the in-scan
    overlap with a neighbouring image goes to the image it is nearer the middle of."""
    y = np.asarray(t["y"], float)
    keep = np.ones(len(t), bool)
    if not first:
        keep &= y >= overlap_px / 2
    if not last:
        keep &= y < img.grid.ny - overlap_px / 2
    return t[keep]


def _point_sources(night: Night, info, per_band, images, noises, mjd_mid: float, cfg: RunConfig,
                   timer):
    """Atlas detection, PSF model and photometry, aperture and R1 photometry per band, then
    band merging into the scan's point-source rows (composition only: the science is in the
    step modules)."""
    from astropy.table import vstack

    from gpu2mass.aperphot import (
        apply_curve_of_growth,
        curve_of_growth_from_psf,
        fit_curve_of_growth,
        run_aperture_photometry,
        run_r1_photometry,
    )
    from gpu2mass.artifacts import run_artifacts
    from gpu2mass.bandmerge import band_fill_upper_limits, run_bandmerge
    from gpu2mass.brightstars import run_saturated_photometry
    from gpu2mass.catalog import assemble_point_sources, band_photometry
    from gpu2mass.detect import FLAG_WING, DetectWarning, run_detect
    from gpu2mass.frames import MASK_R1_SATURATED, MASK_SATURATED, UNUSABLE_R1
    from gpu2mass.geometry import tan_project
    from gpu2mass.psfmodel import run_psf_model
    from gpu2mass.psfphot import run_psf_photometry

    inst = night.instrument
    # The scan frame of band merging: the gnomonic plane about the scan centre (arcsec).
    ra0 = float(np.median(np.concatenate([per_band[b][1].geometry.ra for b in per_band])))
    dec0 = float(np.median(np.concatenate([per_band[b][1].geometry.dec for b in per_band])))
    bands = {}
    scale = {}  # per band: the PSF photometric scale and its error (photometry.json)
    for band, (cal, reg, tr, det, _det_r1) in per_band.items():
        xp = backend.get_namespace(cal.r2r1)
        geo = reg.geometry
        zp = cfg.transients.zero_point[band]  # instrumental until the night's calibration
        with timer("detect"):
            imgs = images[band]
            # The images are independent and detection is FFTs and array operations that
            # release the GIL: on the CPU, one thread per core (the GPU queues them anyway).
            workers = 1 if xp.__name__ == "cupy" else max(1, min(len(imgs), os.cpu_count() or 1, 4))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DetectWarning)  # an empty image is fine
                with ThreadPoolExecutor(workers) as pool:
                    tables = list(pool.map(lambda img: run_detect(img, config=cfg.detect), imgs))
            found = []
            for k, (img, t) in enumerate(zip(imgs, tables, strict=True)):
                t.meta.clear()  # per-image noise scales: not merged across images
                found.append(_own_zone(t, img, cfg.atlas.overlap_arcsec / cfg.atlas.pixel_arcsec,
                                       k == 0, k == len(imgs) - 1))
            found = vstack(found) if found else None
        if found is None or len(found) == 0:
            continue
        mask = (cal.mask_r2r1 != 0) | xp.asarray(tr.mask)
        noise = noises[band]  # the Atlas step's: the same frames and mask
        with timer("psfmodel"):
            model = run_psf_model(cal.r2r1, mask=mask, noise=noise, detections=det,
                                  config=replace(cfg.psfmodel, pixel_scale_arcsec=geo.band.scale_arcsec,
                                                 gain_e_per_dn=float(inst.gain_e_per_dn[band])))
        with timer("psfphot"):
            psf = run_psf_photometry(cal.r2r1, mask=mask, noise=noise, geometry=geo,
                                     psf_alpha=model.alpha_px, psf_beta=model.beta,
                                     ra=np.asarray(found["ra"]), dec=np.asarray(found["dec"]),
                                     flux=np.asarray(found["flux"]),
                                     wing=(np.asarray(found["flags"]) & FLAG_WING) != 0,
                                     gain_e_per_dn=float(inst.gain_e_per_dn[band]), config=cfg.psfphot)
        with timer("aperphot"):
            acfg = replace(cfg.aperphot, gain_e_per_dn=float(inst.gain_e_per_dn[band]),
                           r1_flux_scale=inst.r2r1_exptime_s / inst.r1_exptime_s)
            sat = (cal.mask_r2r1 & MASK_SATURATED) != 0
            aper = run_aperture_photometry(cal.r2r1, mask=mask, noise=noise, geometry=geo,
                                           ra=np.asarray(psf["ra"]), dec=np.asarray(psf["dec"]),
                                           saturated=sat, config=acfg)
            try:
                cog = fit_curve_of_growth(aper, config=acfg, nframes=geo.nframes)
            except StepError:  # too few bright isolated stars (short calibration scans)
                cog = curve_of_growth_from_psf(model.alpha_px * geo.band.scale_arcsec,
                                               model.beta, config=acfg)
            aper = apply_curve_of_growth(aper, cog, config=acfg)
            r1 = None
            if bool((np.asarray(aper["n_sat"]) > 0).any()):
                r1_mask = ((cal.mask_r1 & UNUSABLE_R1) != 0) | xp.asarray(tr.mask)
                r1 = run_r1_photometry(cal.r1, mask=r1_mask, noise=cal.noise_r1, geometry=geo,
                                       phot=aper, cog=cog,
                                       saturated=(cal.mask_r1 & MASK_R1_SATURATED) != 0, config=acfg)
            sat_fit = None
            if r1 is not None and bool((np.asarray(r1["r1_status"]) == 3).any()):
                rows = np.asarray(r1["index"])[np.asarray(r1["r1_status"]) == 3]
                sat_fit = run_saturated_photometry(
                    cal.r1, mask_r1=cal.mask_r1, noise_r1=cal.noise_r1, geometry=geo,
                    ra=np.asarray(psf["ra"])[rows], dec=np.asarray(psf["dec"])[rows],
                    r1_to_r2r1=inst.r2r1_exptime_s / inst.r1_exptime_s, psf_alpha_px=model.alpha_px,
                    psf_beta=model.beta, config=replace(cfg.brightstars,
                                                        gain_e_per_dn=float(inst.gain_e_per_dn[band])))
                sat_fit["index"] = rows
        bp = band_photometry(psf, aper, r1=r1, saturated_fit=sat_fit, zp=zp, band=band, cog=cog,
                             config=cfg.catalog)
        scale[band] = {k: (float(bp.meta[k]) if np.isfinite(bp.meta[k]) else None)
                       for k in ("psf_norm", "psf_norm_err", "psf_norm_n", "psf_error_floor", "psf_scale_err")}
        scale[band]["cog_correction_mean"] = float(np.mean(cog.correction))
        scale[band]["cog_stars"] = int(np.max(cog.n_stars)) if cog.n_stars.size else 0
        xs, ys = tan_project(np.asarray(bp["ra"]), np.asarray(bp["dec"]), ra0, dec0)
        bp["x_scan"], bp["y_scan"] = xs, ys
        # Position errors: the fit's, with a floor for the registration: frame centres are
        # good to ~0.01" per coordinate and a source averages ~6 frames, so 0.005" (0.01"
        # made the brightest stars' quoted errors twice their scatter).
        bp["sig_x"] = np.hypot(np.nan_to_num(np.asarray(bp["ra_err"]), nan=1.0), 0.005)
        bp["sig_y"] = np.hypot(np.nan_to_num(np.asarray(bp["dec_err"]), nan=1.0), 0.005)
        bp["sig_xy"] = np.zeros(len(bp))
        # Band merging weights positions by SNR: the measurement's, or the Atlas detection's
        # where there is no measurement (rd_flg 9).
        meas = np.asarray(bp["snr"], float)
        bp["snr_meas"] = meas
        bp["snr"] = np.where(np.isfinite(meas) & (meas > 0), meas,
                             np.maximum(np.asarray(found["snr"], float), 0.1))
        bp["x"], bp["y"] = geo.sky_to_pixel(0, np.asarray(bp["ra"]), np.asarray(bp["dec"]))
        bands[band] = bp[~(np.asarray(bp["duplicate"]) | np.asarray(bp["cosmic_ray"]))]
        bands[band].remove_columns(["duplicate", "cosmic_ray"])
    with timer("bandmerge"):
        merged = run_bandmerge(bands, config=cfg.bandmerge)
        limits = {}
        for band, imgs in images.items():
            lost = np.flatnonzero(np.asarray(merged[f"{band.lower()}_idx"]) < 0)
            ra, dec = tan_deproject(np.asarray(merged["x_scan"])[lost], np.asarray(merged["y_scan"])[lost],
                                    ra0, dec0)
            m_ul = np.full(len(merged), np.nan)
            for img in imgs:
                x, y = img.grid.sky_to_pixel(ra, dec)
                on = (x >= 0) & (x < img.grid.nx) & (y >= 0) & (y < img.grid.ny) & ~np.isfinite(m_ul[lost])
                if on.any():
                    ul = band_fill_upper_limits(backend.to_host(img.data), backend.to_host(img.sigma),
                                                x[on], y[on], ncorfac=img.header["NCORFAC"],
                                                zp_mag=cfg.transients.zero_point[band])
                    m_ul[lost[on]] = np.asarray(ul["m_ul"].filled(np.nan), float)
            limits[band] = {"m_ul": np.ma.masked_invalid(m_ul)}
        pts = assemble_point_sources(merged, scan=info.number, ra0=ra0, dec0=dec0,
                                     jdate=2400000.5 + mjd_mid,
                                     upper_limits=limits)
    with timer("artifacts"):
        # Bright-star artifacts: spikes, persistence ghosts, stripes, halos (cc_flg letters;
        # upper case marks detections that are the artifact itself).
        # rd_flg 9 is a saturated star or a detection at the array's edge: which is which.
        saturated = {}
        for b, t in bands.items():
            idx = np.asarray(merged[f"{b.lower()}_idx"], np.int64)
            sat = np.asarray(t["saturated"], bool)
            saturated[b] = np.where(idx >= 0, sat[np.maximum(idx, 0)], False)
        flagged = run_artifacts(pts, geometries={b: per_band[b][1].geometry for b in per_band},
                                saturated=saturated, config=cfg.artifacts)
        pts["cc_flg"] = flagged["cc_flg"]
    pts.meta["photometry"] = scale
    return pts


def _read_geometries(out_dir: Path, scan: int, frames: dict) -> dict | None:
    """Band → :class:`~gpu2mass.geometry.FrameGeometry` of a finished scan (``None`` for a
    scan finished by a version that did not keep the distortion: the steps that use it then
    work from the frames table alone)."""
    import json

    from gpu2mass.geometry import BandGeometry, FrameGeometry

    path = _pts_inst_path(out_dir, scan).parent / "geometry.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    out = {}
    for band, g in saved.items():
        sel = frames["band"] == band
        order = np.argsort(frames["frame"][sel])
        out[band] = FrameGeometry(
            BandGeometry(int(g["nx"]), int(g["ny"]), float(g["scale_arcsec"]), float(g["rotation_deg"]),
                         np.asarray(g["distortion"], float)),
            ra=frames["ra"][sel][order], dec=frames["dec"][sel][order])
    return out


def _atlas_files(out_dir: Path, scan: int) -> list[Path]:
    return sorted((Path(out_dir) / "atlas").glob(f"*_{scan:03d}_*.fits"))


def _scan_products(out_dir: Path, scan: int) -> list[Path]:
    """Everything a scan leaves under ``out_dir`` (removed before it is processed again, so
    a re-run never mixes two runs' files)."""
    return [*_atlas_files(out_dir, scan), products.scan_dir(out_dir, scan),
            _pts_inst_path(out_dir, scan).parent]


def _remove_stale(out_dir: Path) -> None:
    """Temporary files of a run that was killed mid-write (atomic writes rename only
    finished files, so these are never products)."""
    for tmp in Path(out_dir).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _update_atlas_header(path: Path, cards: Callable) -> None:
    """Set primary-header cards of an Atlas Image, atomically.

    ``cards(header, sigma)`` returns key → (value, comment) from the primary header and the
    ``SIGMA`` image (memory-mapped). The new file is the re-serialised primary header
    followed by the old file's bytes from the end of that header on: the data and the
    extensions are copied, never decoded and re-encoded (3x faster than astropy's
    read-modify-write of the whole HDU list).
    """
    from astropy.io import fits

    from gpu2mass.io._atomic import atomic_path

    with fits.open(path, memmap=True) as hdul:
        header = hdul[0].header.copy()
        new = cards(header, hdul["SIGMA"].data)
    with open(path, "rb") as f:
        old = fits.Header.fromfile(f)
        data_start = f.tell()
        rest = f.read()
    if data_start % 2880 or len(old) != len(header):
        raise StepError(f"{path}: unexpected primary header layout (ends at byte {data_start})")
    for key, (value, comment) in new.items():
        header[key] = (value, comment)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tostring(padding=True).encode("ascii"))
        f.write(rest)


def _night_steps(out_dir: Path, night: Night, outcomes: list[ScanOutcome], cfg: RunConfig,
                 seconds: dict, on_step: Callable[[str], None] | None) -> dict:
    """The night-level steps, on the finished scans' working files: photometric calibration
    from the calibration scans, final astrometry (PosPts), the catalog rows, the Atlas
    Images' zero points, QA per scan and the night's report. Everything is recomputed from
    the scans' working files, so a re-run or a resumed run writes the same products.

    Returns what ``run.json`` records of the night phase.
    """
    from gpu2mass.astrometry import solve_night_astrometry
    from gpu2mass.atlas import point_source_m10
    from gpu2mass.epochs import source_epochs
    from gpu2mass.errcal import apply_error_calibration, solve_error_calibration
    from gpu2mass.io.rawwrite import write_json
    from gpu2mass.photcal import (
        apply_calibration,
        atlas_magzp,
        calibration_matches,
        frame_zero_points,
        solve_night_calibration,
    )
    from gpu2mass.psc import finalize_point_sources, resolve_duplicates
    from gpu2mass.qa import failed_scan_qa, scan_qa
    from gpu2mass.refcat import load_reference_stars
    from gpu2mass.report import write_night_report

    timer = _Timer(seconds, np, on_step)
    info = {s.number: s for s in night.scans}
    done = [o.scan for o in outcomes if o.status == "ok"]
    zp_inst = dict(cfg.transients.zero_point)
    with timer("night_read"):
        pts = {s: products.read_table(_pts_inst_path(out_dir, s)) for s in done}
        frames = {s: products.read_columns(products.scan_dir(out_dir, s) / "frames.parquet") for s in done}
        scale_errors = {s: _read_scale_errors(out_dir, s) for s in done}
    with timer("photcal"):
        matches = [calibration_matches(pts[s], frames[s], night.standards, scan=s, field=info[s].field,
                                       zp_inst=zp_inst, config=cfg.photcal)
                   for s in done if info[s].type == "cal" and night.standards is not None]
        calibration = solve_night_calibration(matches, config=cfg.photcal, zp_inst=zp_inst)
        write_json(Path(out_dir) / "night" / "calibration.json", calibration.to_dict())
    with timer("errcal"):
        # rd_flg 2 cmsig from the calibration fields' repeats, on their calibrated magnitudes.
        errors = solve_error_calibration({s: apply_calibration(pts[s], frames[s], calibration)
                                          for s in done if info[s].type == "cal"},
                                         scale_errors=scale_errors, config=cfg.errcal)
        write_json(Path(out_dir) / "night" / "errors.json", errors.to_dict())
    with timer("pospts"):
        def reference(ra_range, dec_range, epoch_jyear):
            return load_reference_stars(night.reference_catalog, epoch_jyear=epoch_jyear,
                                        ra_range=ra_range, dec_range=dec_range)

        astrometry = solve_night_astrometry(pts, frames, reference, config=cfg.astrometry)
        write_json(Path(out_dir) / "night" / "astrometry.json", astrometry.to_dict())
    with timer("catalog"):
        inst = night.instrument
        geometries = {s: _read_geometries(out_dir, s, frames[s]) for s in done}
        rows = {}
        for s in done:
            t = apply_error_calibration(astrometry.apply(s, pts[s]), errors,
                                        systematic_mag=cfg.catalog.systematic_mag,
                                        scale_err=scale_errors[s], scan=s)
            t = apply_calibration(t, frames[s], calibration)
            rows[s] = finalize_point_sources(
                t, scan=s, night_date=night.night.isoformat(), observatory=night.observatory,
                frames=frames[s], atlas_images=_atlas_files(out_dir, s), nx=inst.nx, ny=inst.ny,
                site_lon_deg=night.site.lon_deg, geometries=geometries[s], config=cfg.psc)
            # The scan steps measure flux per R2−R1 frame; the catalog quotes DN/s.
            for b in inst.bands:
                for name in (f"{b.lower()}_flux", f"{b.lower()}_flux_err"):
                    rows[s][name] = rows[s][name] / inst.r2r1_exptime_s
        # One apparition per source: the science scans form the catalog; repeated
        # calibration scans of a field form one of their own.
        for kind in ("sci", "cal"):
            group = [s for s in done if info[s].type == kind]
            rows.update(resolve_duplicates({s: rows[s] for s in group},
                                           frames={s: frames[s] for s in group}, nx=inst.nx,
                                           ny=inst.ny, geometries={s: geometries[s] for s in group},
                                           config=cfg.psc))
        for s in done:
            products.write_table(products.scan_dir(out_dir, s) / "pts.parquet", rows[s])
            # The frames' calibrated zero points (the scan step wrote instrumental ones).
            zp, zp_err = frame_zero_points(frames[s], calibration)
            products.write_frames_table(out_dir, s, {**frames[s], "zp_mag": zp, "zp_err": zp_err})
    # The Atlas and QA steps read and write one file or scan at a time, independently: a
    # thread per core keeps both cores busy (FITS I/O and NumPy release the GIL).
    workers = max(1, min(os.cpu_count() or 1, 4))
    with timer("atlas_zp"):
        def calibrate_atlas(scan: int, path: Path) -> None:
            def cards(h, sigma) -> dict:
                band = h["FILTER"].upper()
                mjd, airmass = source_epochs([h["CRVAL1"]], [h["CRVAL2"]], frames[scan], band)
                magzp, magzperr = atlas_magzp(calibration, band, float(mjd[0]), float(airmass[0]),
                                              zp_inst[band])
                calibrated = calibration.bands[band].status == "calibrated"
                # NCORFAC scales the quadrature sum of SIGMA (the frames' noise) to the noise of
                # a sum; SKYSIG, the image's measured scatter, also holds airglow structure.
                noise = float(np.median(sigma[np.isfinite(sigma) & (sigma > 0)]))
                m10 = point_source_m10(magzp, skysig=noise, ncorfac=h["NCORFAC"],
                                       seeing_arcsec=h.get("SEEING", np.nan),
                                       pixel_arcsec=cfg.atlas.pixel_arcsec)
                return {
                    "MAGZP": (round(float(magzp), 6),
                              f"mag of 1 DN ({'calibrated' if calibrated else 'instrumental'})"),
                    "MAGZPERR": (round(float(magzperr), 6), "uncertainty of MAGZP, mag"),
                    "M10": (round(float(m10), 4), "mag of a point source at SNR 10"),
                    "ORDATE": (night.night.strftime("%y%m%d"), "UT date of the observation"),
                    "STRIP_ID": (int(info[scan].tile), "tile (strip) number"),
                    "SEESH": (float(h.get("SEEING", np.nan)), "seeing FWHM, arcsec"),
                }

            _update_atlas_header(path, cards)

        jobs = [(s, path) for s in done for path in _atlas_files(out_dir, s)]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda job: calibrate_atlas(*job), jobs))
    with timer("qa"):
        def calibration_figures(o) -> dict | None:
            if calibration.status == "instrumental":
                return None
            fr, cal = frames[o.scan], {}
            for b in night.instrument.bands:
                bc = calibration.bands[b]
                if bc.status == "instrumental":
                    continue
                sel = fr["band"] == b
                # Photometricity is graded on the calibration scans' scatter about the
                # nightly fit (2MASS's 0.011 mag), not on the standards' own noise; with a
                # single calibration scan only the latter exists.
                rms = bc.scan_residual_rms if bc.n_scans >= 2 else calibration.residual_rms(b)
                cal[b] = {"zp_residual_rms": rms,
                          "zp_offset": float(np.median(calibration.offset(b, fr["mjd"][sel],
                                                                          fr["airmass"][sel]))),
                          "zp_offset_err": float(np.median(calibration.offset_err(
                              b, fr["mjd"][sel], fr["airmass"][sel])))}
            return cal

        def one_scan_qa(o) -> dict:
            if o.status != "ok":
                return failed_scan_qa(o.scan, o.type, o.reason or "failed")
            return scan_qa(o.scan, o.type, frames=frames[o.scan], pts=rows[o.scan],
                           atlas_images=_atlas_files(out_dir, o.scan),
                           astrometry=astrometry.figures(o.scan),
                           calibration=calibration_figures(o), config=cfg.qa)

        with ThreadPoolExecutor(workers) as pool:
            qa = dict(zip([o.scan for o in outcomes], pool.map(one_scan_qa, outcomes), strict=True))
        for scan, figures in qa.items():
            write_json(products.scan_dir(out_dir, scan) / "qa.json", figures)
        write_night_report(out_dir, night=night.night.isoformat(), scans_qa=list(qa.values()),
                           calibration=calibration.to_dict(), frames=frames,
                           astrometry=astrometry.to_dict())
    return {"calibration": calibration.status, "qa": {s: q.get("status") for s, q in qa.items()}}


def run_night(night_dir: str | Path, out_dir: str | Path, *, device: str = "auto",
              config: RunConfig | None = None, resume: bool = False,
              progress: Callable[[str, int, int], None] | None = None,
              db_path: str | Path | None = None, load_db: bool = True) -> NightResult:
    """Process a night into ``out_dir``; see the module docstring.

    Per scan (science and calibration), then the night-level steps, then ``run.json`` and the
    working database (``db_path``, default ``out_dir/wdb.duckdb``; ``load_db`` False skips it).
    ``resume`` keeps the scans whose products are complete from an earlier run (its
    ``run.json`` timings are carried over) and recomputes the night-level products.

    Raises :class:`~gpu2mass.errors.InputError` for an invalid night (before any
    processing) and :class:`~gpu2mass.errors.DeviceError` for an unusable ``--device gpu``.
    Scan failures do not raise: they are in the result, in ``run.json`` and in the scan's QA.

    BLAS runs on one thread here: the pipeline's parallelism is Numba's ``prange`` and
    thread pools over images, and OpenBLAS's own threads, spinning between the small
    matrix products the steps make, took a core from them (the scan preset's Atlas
    detection of one band: 2.8 s wall with them, 1.8 s without).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _run_night(night_dir, out_dir, device=device, config=config, resume=resume,
                          progress=progress, db_path=db_path, load_db=load_db)


def _run_night(night_dir, out_dir, *, device, config, resume, progress, db_path, load_db) -> NightResult:
    from gpu2mass.darks import run_darks

    t_start = time.perf_counter()
    cfg = config or RunConfig.defaults()
    dev = backend.resolve_device(device)
    night = open_night(night_dir, check_data=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    staging_root = out_dir / ".staging"
    shutil.rmtree(staging_root, ignore_errors=True)
    sky_scans = [s for s in night.scans if s.type in ("sci", "cal")]
    dark_scans = [s for s in night.scans if s.type == "dark"]
    if not dark_scans:
        raise InputError(night.manifest_path, "the night has no dark scans and no dark library was given")
    previous = {}
    if resume and (out_dir / "run.json").exists():
        import json

        try:
            previous = {s["scan"]: s for s in json.loads((out_dir / "run.json").read_text())["scans"]}
        except (ValueError, KeyError, TypeError):
            previous = {}
    total = len(sky_scans) + 1  # the scans, then the night-level steps

    def report(label: str, done: int) -> None:
        if progress:
            progress(label, done, total)

    def finished(number: int) -> bool:
        return (resume and (products.scan_dir(out_dir, number) / "frames.parquet").exists()
                and _pts_inst_path(out_dir, number).exists())

    darks, dark_seconds = None, 0.0
    outcomes: list[ScanOutcome] = []
    for i, info in enumerate(sky_scans):
        outcome = ScanOutcome(info.number, info.type)
        if finished(info.number):
            old = previous.get(info.number, {})
            outcome.seconds = dict(old.get("seconds", {}))
            outcome.products = list(old.get("products", []))
            outcome.resumed = True
            outcomes.append(outcome)
            report(f"scan {info.number} ({info.type}) already done", i + 1)
            continue
        if darks is None:  # only when a scan needs processing
            report("darks", i)
            t0 = time.perf_counter()
            darks = run_darks((night.load_scan(s.number) for s in dark_scans), config=cfg.darks)
            dark_seconds = time.perf_counter() - t0
        for path in _scan_products(out_dir, info.number):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        staging = staging_root / f"{info.number:03d}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            table = _process_scan(night, info, darks, cfg, dev, staging, outcome,
                                  on_step=lambda step, i=i, info=info: report(
                                      f"scan {info.number} ({info.type}): {step}", i))
            # Move the scan's products into place, the completion marker last.
            for rel in outcome.products:
                dst = out_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, dst)
            products.write_frames_table(out_dir, info.number, table)
        except Gpu2MassError as exc:
            outcome.status, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug or a library failure: the night still goes on
            outcome.status = "failed"
            outcome.reason = f"{type(exc).__name__}: {exc}"
            log.error("scan %d failed:\n%s", info.number, traceback.format_exc())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if outcome.status == "failed":  # nothing of a failed scan stays on disk
            for path in _scan_products(out_dir, info.number):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        outcomes.append(outcome)
        report(f"scan {info.number} ({info.type}) {outcome.status}", i + 1)
    shutil.rmtree(staging_root, ignore_errors=True)

    night_seconds: dict[str, float] = {}
    night_error = None
    try:
        night_summary = _night_steps(out_dir, night, outcomes, cfg, night_seconds,
                                     on_step=lambda step: report(f"night: {step}", len(sky_scans)))
    except Exception as exc:  # noqa: BLE001 - the scans' products stand; say what failed
        night_error = f"{type(exc).__name__}: {exc}"
        log.error("the night-level steps failed:\n%s", traceback.format_exc())
        night_summary = {"calibration": None, "qa": {}}
    peak_host_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_dev_mb = None
    if dev.is_gpu:
        peak_dev_mb = dev.xp.get_default_memory_pool().total_bytes() / 2**20
    result = NightResult(out_dir, outcomes, dev.name, time.perf_counter() - t_start,
                         night_error=night_error)

    def write_run_json() -> None:
        products.write_run_json(out_dir, {
            "gpu2mass": products.versions(), "device": dev.name, "night": str(night.root),
            "night_date": night.night.isoformat(), "observatory": night.observatory,
            "manifest_sha256": night.manifest_sha256, "config": cfg.to_dict(),
            "calibration": night_summary["calibration"], "night_error": result.night_error,
            "database_error": result.database_error,
            "seconds": {"total": result.seconds, "darks": dark_seconds, "night": night_seconds},
            "peak_host_memory_mb": peak_host_mb, "peak_device_memory_mb": peak_dev_mb,
            "exit_status": 0 if result.ok else 1,
            "scans": [{"scan": o.scan, "type": o.type, "status": o.status, "reason": o.reason,
                       "resumed": o.resumed, "qa_status": night_summary["qa"].get(o.scan),
                       "seconds": o.seconds, "products": o.products} for o in outcomes],
        })

    write_run_json()
    if load_db and night_error is None:
        from gpu2mass.wdb import load_night

        report("loading the working database", len(sky_scans))
        try:
            load_night(out_dir, db_path)
        except Gpu2MassError as exc:  # e.g. the database is held by another process
            result.database_error = str(exc)
            log.error("the working database was not loaded: %s", exc)
            write_run_json()
    report("done", total)
    return result
