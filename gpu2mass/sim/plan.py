"""Presets and the night's schedule: which scans, where, when.

A night starts when the Sun is 12° below the horizon. Dark scans come first (and last, in
the ``night`` preset); a calibration observation — six consecutive 1° scans of one
calibration field, alternating direction, each offset ~5" in RA (facts sheet 7.2) — is
taken about every hour; science scans (6° tiles, 273 frames) fill the rest. Every sky scan
is placed near the meridian at the time it is taken.

Calibration fields follow 2MASS's layout: a grid every 2 h in RA at Dec −30°, 0°, +30°,
named ``calHHpDD``/``calHHmDD``, tile numbers 90001+.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from gpu2mass.sim.observing import Site, airmass, galactic_to_radec, gmst_deg, radec_to_galactic

__all__ = ["CAL_FIELDS", "PRESETS", "Preset", "ScanPlan", "field_for_glat", "schedule"]


@dataclass(frozen=True)
class ScanPlan:
    """One scan of the night as planned: what the manifest and FRAMES will say.

    ``ra0``/``dec_start`` give the commanded track: RA constant (a meridian arc), Dec of
    frame 0; frames step by the camera's frame step north or south. ``glat`` is the
    Galactic latitude of the scan centre (the sky model's density follows it).
    ``pointing_offset_arcsec`` is an extra constant error of the commanded position
    (ξ east, η north), for testing a pipeline's robustness.
    """

    number: int
    type: str
    nframes: int
    start_mjd: float
    tile: int | None = None
    field: str | None = None
    direction: str | None = None
    ra0: float = 0.0
    dec_start: float = 0.0
    glat: float = 90.0
    pointing_offset_arcsec: tuple[float, float] = (0.0, 0.0)

    @property
    def is_sky(self) -> bool:
        return self.type in ("sci", "cal", "flat")

    def frame_mjd(self, period_s: float) -> np.ndarray:
        return self.start_mjd + np.arange(self.nframes) * period_s / 86400.0

    def commanded(self, step_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
        sign = 1.0 if self.direction == "n" else -1.0
        dec = self.dec_start + sign * np.arange(self.nframes) * step_arcsec / 3600.0
        return np.full(self.nframes, self.ra0 % 360.0), dec


@dataclass(frozen=True)
class Preset:
    """What a preset simulates.

    Attributes
    ----------
    dark_scans, dark_frames
        Number of dark scans at the start of the night and their frames (the ``night``
        preset adds one more at the end).
    cal_observations, cal_scans_per_observation, cal_frames
        Calibration observations (each ``cal_scans_per_observation`` scans of
        ``cal_frames`` frames; 44 frames is 1°).
    sci_scans, sci_frames
        Science scans and their frames (273 frames is a full 6° tile). ``sci_scans`` 0
        with ``fill_hours`` set fills that many hours instead.
    glat
        Galactic latitude of each science scan (cycled); ``None`` for a Dec strip at the
        site's latitude following the meridian.
    inject_k
        Ks magnitudes of stars injected into the first science scan, to guarantee stars
        saturated in R2−R1 (Ks < 8) and in R1 (Ks < 3.5).
    meteors
        Expected meteors per night beyond the one guaranteed edge-to-edge trail.
    """

    name: str
    dark_scans: int
    dark_frames: int
    cal_observations: int
    cal_scans_per_observation: int
    cal_frames: int
    sci_scans: int
    sci_frames: int
    glat: tuple[float, ...] | None
    inject_k: tuple[float, ...] = ()
    fill_hours: float | None = None
    meteors: float = 2.0


PRESETS = {
    "tiny": Preset("tiny", 1, 8, 1, 1, 30, 1, 30, (40.0,), meteors=0.0),
    # The ci preset's calibration scans are 16 frames (0.37°) instead of 44 (1°) so that
    # the suites of later steps can simulate it in ~25 s instead of ~55 s; everything else
    # is a real 2MASS observation (``--cal-frames 44`` gives the full one).
    "ci": Preset("ci", 1, 16, 2, 6, 16, 2, 60, (45.0, 22.0), inject_k=(7.0,)),
    "scan": Preset("scan", 1, 24, 1, 6, 44, 1, 273, (35.0,), inject_k=(3.0, 5.5, 7.5)),
    "night": Preset("night", 1, 24, 0, 6, 44, 0, 273, None, inject_k=(3.0, 5.5, 7.5),
                    fill_hours=8.0, meteors=3.0),
}

#: Calibration fields: name → (ra, dec) deg.
CAL_FIELDS = {
    f"cal{h:02d}{'p' if d >= 0 else 'm'}{abs(d):02d}": (15.0 * h + 7.5, float(d))
    for h in range(0, 24, 2) for d in (-30, 0, 30)
}
_CAL_TILE = {name: 90001 + i for i, name in enumerate(CAL_FIELDS)}

_SLEW_S = 45.0
_CAL_OFFSET_ARCSEC = 5.0


def _lst(mjd: float, site: Site) -> float:
    return float(np.mod(gmst_deg(mjd) + site.lon_deg, 360.0))


def field_for_glat(glat: float, mjd: float, site: Site) -> tuple[float, float]:
    """The point of Galactic latitude ``glat`` with the lowest airmass at ``mjd``."""
    l = np.arange(0.0, 360.0, 0.25)
    ra, dec = galactic_to_radec(l, np.full_like(l, glat))
    x = airmass(ra, dec, mjd, site)
    i = int(np.argmin(x))
    if not np.isfinite(x[i]) or x[i] > 2.5:
        raise ValueError(f"no point at Galactic latitude {glat}° is observable at MJD {mjd:.3f}")
    return float(ra[i]), float(dec[i])


def _cal_field(mjd: float, site: Site) -> str:
    names = list(CAL_FIELDS)
    ra = np.array([CAL_FIELDS[n][0] for n in names])
    dec = np.array([CAL_FIELDS[n][1] for n in names])
    return names[int(np.argmin(airmass(ra, dec, mjd, site)))]


def _scan_duration_days(nframes: int, period_s: float) -> float:
    return (nframes * period_s + _SLEW_S) / 86400.0


def schedule(preset: Preset, *, night_start_mjd: float, night_end_mjd: float, site: Site,
             frame_period_s: float, frame_step_arcsec: float, field: tuple[float, float] | None,
             glat: float | None, sci_scans: int | None, sci_frames: int | None,
             rng: np.random.Generator, cal_frames: int | None = None) -> list[ScanPlan]:
    """Plan the scans of a night (see the module docstring). Returns them in time order."""
    n_sci = preset.sci_scans if sci_scans is None else sci_scans
    nfr = preset.sci_frames if sci_frames is None else sci_frames
    if cal_frames is not None:
        preset = replace(preset, cal_frames=cal_frames)
    t = night_start_mjd + 5 / 1440
    plans: list[ScanPlan] = []

    def add(plan: ScanPlan) -> None:
        nonlocal t
        plans.append(replace(plan, number=len(plans) + 1, start_mjd=t))
        t += _scan_duration_days(plan.nframes, frame_period_s)

    for _ in range(preset.dark_scans):
        add(ScanPlan(0, "dark", preset.dark_frames, 0.0))

    def cal_observation() -> None:
        name = _cal_field(t, site)
        ra, dec = CAL_FIELDS[name]
        half = (preset.cal_frames - 1) / 2 * frame_step_arcsec / 3600
        for k in range(preset.cal_scans_per_observation):
            direction = "n" if k % 2 == 0 else "s"
            dra = (k - (preset.cal_scans_per_observation - 1) / 2) * _CAL_OFFSET_ARCSEC
            ra_k = ra + dra / 3600 / np.cos(np.deg2rad(dec))
            add(ScanPlan(0, "cal", preset.cal_frames, 0.0, tile=_CAL_TILE[name], field=name,
                         direction=direction, ra0=ra_k,
                         dec_start=dec - half if direction == "n" else dec + half,
                         glat=float(radec_to_galactic(ra, dec)[1])))

    def sci_scan(i: int) -> None:
        mid = t + nfr * frame_period_s / 2 / 86400
        if field is not None:
            ra, dec = field
        elif glat is not None:
            ra, dec = field_for_glat(glat, mid, site)
        elif preset.glat is not None:
            ra, dec = field_for_glat(preset.glat[i % len(preset.glat)], mid, site)
        else:  # a strip at the site's latitude following the meridian
            ra, dec = _lst(mid, site), float(np.clip(site.lat_deg, -85, 85))
        half = (nfr - 1) / 2 * frame_step_arcsec / 3600
        direction = "n" if i % 2 == 0 else "s"
        tile = 1 + int(np.floor(ra * 4)) + 1440 * int(np.floor(dec + 90))  # a 0.25° RA grid
        add(ScanPlan(0, "sci", nfr, 0.0, tile=tile, direction=direction, ra0=ra,
                     dec_start=dec - half if direction == "n" else dec + half,
                     glat=float(radec_to_galactic(ra, dec)[1]),
                     pointing_offset_arcsec=tuple(rng.normal(0, 2.0, 2))))

    if preset.fill_hours is None:
        for _ in range(preset.cal_observations):
            cal_observation()
        for i in range(n_sci):
            sci_scan(i)
    else:
        end = min(night_end_mjd, night_start_mjd + preset.fill_hours / 24)
        last_cal, i = -1.0, 0
        while True:
            if t - last_cal >= 1 / 24:
                cal_observation()
                last_cal = t
                continue
            if sci_scans is not None and i >= sci_scans:
                break
            if t + _scan_duration_days(nfr, frame_period_s) > end:
                break
            sci_scan(i)
            i += 1
        for _ in range(preset.dark_scans):
            add(ScanPlan(0, "dark", preset.dark_frames, 0.0))
    if t > night_end_mjd + 0.5 / 24:
        raise ValueError("the planned scans do not fit in the night; ask for fewer scans")
    return plans
