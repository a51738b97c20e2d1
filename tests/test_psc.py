"""PSC columns and duplicate resolution (gpu2mass.psc) on synthetic scans with known answers:
designations of known coordinates, HEALPix and Galactic coordinates, nearest neighbours
against brute force, scan-edge distances against a brute-force walk over the frames'
coverage, catalog rows built by the scan pipeline's own code, and duplicates in the overlap
of two scans."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.table import Table

from gpu2mass.atlas import plan_atlas_grids
from gpu2mass.bandmerge import run_bandmerge
from gpu2mass.catalog import assemble_point_sources, band_photometry
from gpu2mass.config import RunConfig
from gpu2mass.errors import ConfigError, StepError
from gpu2mass.geometry import BandGeometry, FrameGeometry, tan_deproject, tan_project
from gpu2mass.io.products import write_table
from gpu2mass.psc import (
    ADDED_COLUMNS,
    PSC_COLUMNS,
    PscConfig,
    designation,
    extended_association,
    finalize_point_sources,
    nearest_neighbours,
    observation_date,
    psc_selection,
    resolve_duplicates,
    scan_edges,
    scan_key,
)

NX = NY = 256
ROT = {"J": 0.377, "H": 0.441, "K": 0.335}  # array rotations of 1997 (facts sheet 11)
SCALE = {"J": 1.9966, "H": 2.0060, "K": 1.9839}
# Band centres differ by up to ~2 pixels (spec raw-night 3): offsets (ξ, η) arcsec.
BAND_OFFSET = {"J": (0.0, 0.0), "H": (2.5, -1.5), "K": (-3.0, 2.0)}


def _scan(ra0=150.0, dec0=10.0, nframes=24, drift=0.6, step=82.8, mjd0=51619.2):
    """A northward scan: frame centres along Dec with a slow cross-scan drift (arcsec per
    frame), per band geometries (no distortion) and the frames table."""
    k = np.arange(nframes)
    xi0 = drift * k
    eta0 = (k - (nframes - 1) / 2) * step
    geoms, table = {}, {c: [] for c in ("band", "frame", "ra", "dec", "rot_deg", "scale_arcsec", "mjd",
                                        "airmass")}
    for b in ("J", "H", "K"):
        ra, dec = tan_deproject(xi0 + BAND_OFFSET[b][0], eta0 + BAND_OFFSET[b][1], ra0, dec0)
        geoms[b] = FrameGeometry(BandGeometry(NX, NY, SCALE[b], ROT[b], np.zeros((2, 7))), ra, dec)
        table["band"] += [b] * nframes
        table["frame"].append(k)
        table["ra"].append(ra)
        table["dec"].append(dec)
        table["rot_deg"].append(np.full(nframes, ROT[b]))
        table["scale_arcsec"].append(np.full(nframes, SCALE[b]))
        table["mjd"].append(mjd0 + k * 1.4 / 86400)
        table["airmass"].append(1.1 + 0.001 * k)
    frames = {c: (np.array(v) if c == "band" else np.concatenate(v)) for c, v in table.items()}
    return geoms, frames


def _covered(geoms, ra, dec):
    """Inside the three-band coverage (every band has a frame holding the point)?"""
    ok = np.ones(ra.size, bool)
    for g in geoms.values():
        src, *_ = g.frames_holding(ra, dec)
        held = np.zeros(ra.size, bool)
        held[src] = True
        ok &= held
    return ok


def _walk(geoms, ra, dec, direction, limit):
    """Brute force: distance (arcsec) from each point along ``direction`` ((ξ, η) unit
    vector) to where the three-band coverage ends; bisection to 0.01"."""
    lo, hi = np.zeros(ra.size), np.full(ra.size, np.nan)
    steps = np.arange(0.0, limit + 10.0, 10.0)
    for t in steps[1:]:
        r, d = tan_deproject(direction[0] * t, direction[1] * t, ra, dec)
        out = ~_covered(geoms, r, d) & np.isnan(hi)
        hi[out] = t
        lo[np.isnan(hi)] = t
    for _ in range(10):
        mid = 0.5 * (lo + hi)
        r, d = tan_deproject(direction[0] * mid, direction[1] * mid, ra, dec)
        inside = _covered(geoms, r, d)
        lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
    return 0.5 * (lo + hi)


def test_designations_are_truncated_not_rounded(rng):
    # 05h55m10.289s +07°24'25.57": rounding would give ...1029+0724256.
    ra = (5 + 55 / 60 + 10.289 / 3600) * 15
    dec = 7 + 24 / 60 + 25.57 / 3600
    # −12°34'56.78": rounding would give −1234568; RA 23h59m59.999s just below 24 h.
    ra2, dec2 = (23 + 59 / 60 + 59.999 / 3600) * 15, -(12 + 34 / 60 + 56.78 / 3600)
    # Exactly representable in decimal but not in binary: 12.00 s must stay 1200.
    ra3, dec3 = (1 + 2 / 60 + 12.00 / 3600) * 15, -0.01 / 3600
    got = designation([ra, ra2, ra3, 0.0], [dec, dec2, dec3, 90.0])
    assert list(got) == ["05551028+0724255", "23595999-1234567", "01021200-0000000",
                         "00000000+9000000"]
    # Random positions: a name's coordinates lie below the source by less than one unit of
    # its last digit (0.01 s of RA, 0.1" of |Dec|), the PSC's stated bounds.
    ra, dec = rng.uniform(0, 360, 2000), rng.uniform(-90, 90, 2000)
    names = designation(ra, dec)
    assert all(len(s) == 16 for s in names)
    h, m, s = (np.array([int(x[i:j]) for x in names]) for i, j in ((0, 2), (2, 4), (4, 8)))
    ra_name = (h + m / 60 + s / 360000) * 15
    sign = np.array([-1 if x[8] == "-" else 1 for x in names])
    d, am, asec = (np.array([int(x[i:j]) for x in names]) for i, j in ((9, 11), (11, 13), (13, 16)))
    dec_name = d + am / 60 + asec / 36000
    dra = (ra - ra_name) * 3600 / 15  # seconds of time
    ddec = (np.abs(dec) - dec_name) * 3600
    assert np.all((dra >= 0) & (dra < 0.01 + 1e-9)) and np.all((ddec >= 0) & (ddec < 0.1 + 1e-9))
    assert np.all(sign == np.where(dec < 0, -1, 1))


def test_observation_date_is_the_ut_date_at_sunrise():
    # Mt. Hopkins (UT = local + 7.4 h): sunset and sunrise fall on one UT date.
    assert observation_date("2000-03-15", -110.878) == "2000-03-15"
    # CTIO (UT = local + 4.7 h): the sunset's UT date is the evening's; sunrise is a day on.
    assert observation_date("2000-03-15", -70.805) == "2000-03-16"
    assert observation_date("2000-12-31", -70.805) == "2001-01-01"
    # Far east (UT = local − 10 h): sunset 08 h UT and sunrise 20 h UT of one date.
    assert observation_date("2000-03-15", 150.0) == "2000-03-15"
    with pytest.raises(StepError):
        observation_date("15/03/2000", 0.0)
    assert scan_key("2000-03-15", "n", 14) == 200003150014
    assert scan_key("2000-03-16", "s", 7) == 200003161007


def test_nearest_neighbours_against_brute_force(rng):
    # A cluster straddling RA = 0 and a few far apart.
    ra = np.mod(rng.normal(0.0, 0.01, 300), 360.0)
    dec = rng.normal(-30.0, 0.01, 300)
    keys = np.arange(300, dtype=np.int64) * 7 + 11
    sep, pa, key = nearest_neighbours(ra, dec, keys)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    cosd = (np.sin(d)[:, None] * np.sin(d)[None, :]
            + np.cos(d)[:, None] * np.cos(d)[None, :] * np.cos(a[:, None] - a[None, :]))
    ang = np.rad2deg(np.arccos(np.clip(cosd, -1, 1))) * 3600
    np.fill_diagonal(ang, np.inf)
    j = np.argmin(ang, axis=1)
    assert np.array_equal(key, keys[j])
    np.testing.assert_allclose(sep, ang[np.arange(300), j], atol=2e-3)  # arccos precision
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra, dec, unit="deg")
    ref = c.position_angle(c[j]).deg
    dpa = np.mod(pa - ref + 180, 360) - 180
    assert np.max(np.abs(dpa)) < 1e-6
    s1, p1, k1 = nearest_neighbours([10.0], [0.0], [5])
    assert np.isnan(s1[0]) and np.isnan(p1[0]) and k1[0] == -1


def test_scan_edges_against_a_walk_over_the_coverage(rng):
    geoms, frames = _scan()
    # Sources over the scan, many near its edges and ends, some just outside the coverage.
    xi = np.concatenate([rng.uniform(-300, 320, 60), rng.uniform(-262, -240, 20), rng.uniform(250, 280, 20)])
    eta = np.concatenate([rng.uniform(-1200, 1200, 60), rng.uniform(-1200, 1200, 40)])
    eta[:10] = rng.uniform(-1080, -1020, 10)  # near the south end
    eta[10:20] = rng.uniform(1040, 1110, 10)  # near the north end
    ra, dec = tan_deproject(xi, eta, 150.0, 10.0)
    north, south, east, west, x_scan = scan_edges(ra, dec, frames, nx=NX, ny=NY)
    inside = _covered(geoms, ra, dec)
    assert inside.sum() >= 50 and (~inside).sum() >= 10
    # Inside: the distance to the first point leaving the coverage along E, W, N, S (the
    # arrays are rotated by < 0.5°: the edges are crossed almost at right angles). Walking
    # north or south, a source near a side leaves through the side (the track drifts 14"
    # cross-scan): those are not end distances.
    side = np.minimum(east, west) > 20
    for dist, direction, limit, use in ((east, (1, 0), 600, inside), (west, (-1, 0), 600, inside),
                                        (north, (0, 1), 2500, inside & side),
                                        (south, (0, -1), 2500, inside & side)):
        ref = _walk(geoms, ra[use], dec[use], direction, limit)
        err = dist[use] - ref
        assert np.max(np.abs(err)) < 0.3, (direction, np.max(np.abs(err)))
    # Outside: negative distance to the edge it is beyond.
    assert np.all(np.minimum(np.minimum(north, south), np.minimum(east, west))[~inside] < 0.5)
    # x_scan: the mean +x focal-plane offset (arcsec) over every frame holding the source.
    xs, n = np.zeros(ra.size), np.zeros(ra.size)
    for b, g in geoms.items():
        src, _frm, x, _y = g.frames_holding(ra, dec)
        np.add.at(xs, src, (x - (NX - 1) / 2) * SCALE[b])
        np.add.at(n, src, 1)
    held = n > 0
    np.testing.assert_allclose(x_scan[held], xs[held] / n[held], atol=0.05)
    # +x is west (ξ is east): a source east of the track has a negative x_scan.
    assert np.all(x_scan[(xi > 100) & held] < 0) and np.all(x_scan[(xi < -100) & held] > 0)


def test_scan_edges_follow_the_distorted_outline_when_given_the_geometry(rng):
    geoms, frames = _scan(nframes=10)
    # Radial and second-order terms pushing the array's sides out by ~0.5 px (the tiny and
    # ci nights' camera): the frames table alone misses them.
    dist = np.zeros((2, 7))
    dist[0, [0, 2, 3, 5]] = [0.15, -0.15, 0.35, 0.35]
    dist[1, [1, 4, 6]] = [-0.2, 0.35, 0.35]
    geoms = {b: FrameGeometry(BandGeometry(NX, NY, SCALE[b], ROT[b], dist), g.ra, g.dec)
             for b, g in geoms.items()}
    xi, eta = rng.uniform(-250, 250, 40), rng.uniform(-300, 300, 40)
    ra, dec = tan_deproject(xi, eta, 150.0, 10.0)
    inside = _covered(geoms, ra, dec)
    for given, tol in ((geoms, 0.3), (None, 1.5)):
        _n, _s, east, west, _ = scan_edges(ra, dec, frames, nx=NX, ny=NY, geometries=given)
        for d, direction in ((east, (1, 0)), (west, (-1, 0))):
            err = d[inside] - _walk(geoms, ra[inside], dec[inside], direction, 600)
            assert np.max(np.abs(err)) < tol, (given is None, np.max(np.abs(err)))
            if given is None:  # the undistorted outline is short on both sides
                assert np.median(err) < -0.3


def _pipeline_rows(rng, ra, dec, ra0, dec0):
    """Point-source rows made by the scan pipeline's own code (band photometry, band merge,
    assembly), one per position, the last two without a Ks detection (band-filled)."""
    n = ra.size
    x, y = tan_project(ra, dec, ra0, dec0)
    flux = np.geomspace(200.0, 2e5, n)
    bands = {}
    for b in ("J", "H", "K"):
        psf = Table({"ra": ra, "dec": dec, "ra_err": np.full(n, 0.05), "dec_err": np.full(n, 0.05),
                     "flux": flux * 0.9, "flux_err": 0.01 * flux + 20, "psfchi": np.ones(n),
                     "bl_flg": np.ones(n, int), "status": np.zeros(n, int)})
        ap = flux * (1 + rng.normal(0, 0.002, n))
        aper = Table({"flux_stdap": ap, "flux_stdap_err": 0.003 * ap + 20, "n_sat": np.zeros(n, int),
                      "n_det": np.full(n, 6), "n_meas": np.full(n, 6), "ndet": np.full(n, "66")})
        t = band_photometry(psf, aper, zp=20.0, band=b)
        t["x_scan"], t["y_scan"] = x, y
        t["sig_x"], t["sig_y"], t["sig_xy"] = np.full(n, 0.1), np.full(n, 0.1), np.zeros(n)
        t["x"], t["y"] = rng.uniform(0, 255, n), rng.uniform(0, 255, n)
        bands[b] = t[: n - 2] if b == "K" else t
    merged = run_bandmerge(bands)
    lim = {"K": {"m_ul": np.ma.masked_invalid(np.full(len(merged), 16.5))}}
    return assemble_point_sources(merged, scan=5, ra0=ra0, dec0=dec0, jdate=2451619.7,
                                  upper_limits=lim)


def test_catalog_rows_of_a_scan(rng, tmp_path):
    geoms, frames = _scan()
    xi, eta = rng.uniform(-240, 240, 120), rng.uniform(-1000, 1000, 120)
    xi[:3] = [-255.0, 0.0, 0.0]  # beyond the west edge of the H coverage; two stars 1.0" apart
    eta[:3] = [0.0, 300.0, 301.0]
    ra, dec = tan_deproject(xi, eta, 150.0, 10.0)
    pts = _pipeline_rows(rng, ra, dec, 150.0, 10.0)
    grids = plan_atlas_grids(geoms)
    images = [(g.index + 1, g) for g in grids]
    t = finalize_point_sources(pts, scan=5, night_date="2000-03-15", observatory="s",
                               frames=frames, atlas_images=images)
    assert t.colnames == list(PSC_COLUMNS + ADDED_COLUMNS) and len(t) == len(pts)
    assert set(t["hemis"]) == {"s"} and set(t["date"]) == {"2000-03-16"}
    skey = scan_key("2000-03-16", "s", 5)
    keys = np.asarray(t["pts_key"])
    assert np.unique(keys).size == len(t) and np.all(keys // 10**6 == skey)
    # Keys follow Dec: the same sources in another order get the same keys.
    perm = rng.permutation(len(pts))
    t2 = finalize_point_sources(pts[perm], scan=5, night_date="2000-03-15", observatory="s",
                                frames=frames, atlas_images=images)
    assert np.array_equal(np.asarray(t2["pts_key"]), keys[perm])
    assert np.all(np.diff(keys[np.argsort(np.asarray(t["dec"]))]) > 0)
    # The close pair are each other's neighbours.
    r = [int(np.argmin(np.hypot(*tan_project(t["ra"], t["dec"], *tan_deproject(0.0, e, 150.0, 10.0)))))
         for e in (300.0, 301.0)]
    assert t["pxcntr"][r[0]] == keys[r[1]] and t["pxcntr"][r[1]] == keys[r[0]]
    assert abs(t["prox"][r[0]] - 1.0) < 0.01 and t["pxpa"][r[0]] == 0 and t["pxpa"][r[1]] == 180
    # The star at ξ = −255" (west) is just beyond the west edge of the H coverage: rule 1 fails.
    e = int(np.argmin(np.hypot(*tan_project(t["ra"], t["dec"], *tan_deproject(-255.0, 0.0, 150.0, 10.0)))))
    assert t["dist_edge_flg"][e][1] == "w" and t["dist_edge_ew"][e] == 0 and t["use_src"][e] == 0
    # Everything else is bright, clean and far from the edges: selected.
    far = (np.asarray(t["dist_edge_ns"]) > 10) & (np.asarray(t["dist_edge_ew"]) > 10)
    assert np.all(t["use_src"][far] == 1) and far.sum() >= 100
    # jdate: the frames' mid-times where the array centre crossed the source.
    k = (np.asarray(t["dec"]) - frames["dec"][0]) / (frames["dec"][1] - frames["dec"][0])
    np.testing.assert_allclose(t["jdate"] - 2400000.5, 51619.2 + k * 1.4 / 86400, atol=0.5 / 86400)
    # coadd: the Atlas Image holding the source, by the grid's own mapping.
    for i in range(len(t)):
        holding = [img for img, g in images
                   if -0.5 <= g.sky_to_pixel(t["ra"][i], t["dec"][i])[1] <= g.ny - 0.5
                   and -0.5 <= g.sky_to_pixel(t["ra"][i], t["dec"][i])[0] <= g.nx - 0.5]
        if holding:
            assert t["coadd"][i] in holding and t["coadd_key"][i] == skey * 1000 + int(t["coadd"][i])
        else:  # beyond the coverage (the star at the west edge): no image
            assert t["coadd"].mask[i] and t["coadd_key"].mask[i]
    assert np.sum(t["coadd"].mask) <= 2 and len(set(t["coadd"].compressed())) == len(images)
    # HEALPix order 29 nested: the pixel's centre is within a pixel (~0.4 mas) of the source.
    import astropy.units as u
    from astropy_healpix import HEALPix

    lon, lat = HEALPix(nside=2**29, order="nested").healpix_to_lonlat(np.asarray(t["healpix_29"]))
    dxi, deta = tan_project(lon.to_value(u.deg), lat.to_value(u.deg), np.asarray(t["ra"]), np.asarray(t["dec"]))
    assert t["healpix_29"].dtype == np.int64 and np.max(np.hypot(dxi, deta)) < 1e-3
    # Galactic coordinates against the Hipparcos ICRS → Galactic matrix (ESA 1997, vol. 1,
    # 1.5.3); astropy's Galactic frame is tied to FK5, ~0.02" from ICRS, hence 1e-4°.
    ag = np.array([[-0.0548755604, -0.8734370902, -0.4838350155],
                   [0.4941094279, -0.4448296300, 0.7469822445],
                   [-0.8676661490, -0.1980763734, 0.4559837762]])
    a, d = np.deg2rad(np.asarray(t["ra"])), np.deg2rad(np.asarray(t["dec"]))
    g = ag @ np.array([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
    np.testing.assert_allclose(t["glat"], np.rad2deg(np.arcsin(g[2])), atol=1e-4)
    np.testing.assert_allclose(t["glon"], np.mod(np.rad2deg(np.arctan2(g[1], g[0])), 360), atol=1e-4)
    # Written as Parquet: typed columns, nulls where there is no value, never sentinels.
    write_table(tmp_path / "pts.parquet", t)
    p = pq.read_table(tmp_path / "pts.parquet")
    assert p.column_names == list(PSC_COLUMNS + ADDED_COLUMNS)
    types = {f.name: str(f.type) for f in p.schema}
    assert types["pts_key"] == types["scan_key"] == types["healpix_29"] == types["pxcntr"] == "int64"
    assert types["designation"] == types["date"] == types["dist_edge_flg"] == "string"
    assert types["dist_edge_ns"] == "int32" and types["use_src"] == types["dup_src"] == "int16"
    for c in ("gal_contam", "mp_flg", "ext_key"):
        assert p.column(c).null_count == len(t)
    no_k = np.array([s[2] == "0" for s in t["rd_flg"]])
    assert no_k.sum() == 2 and p.column("k_snr").null_count == 2 and p.column("k_m").null_count == 0
    for c in p.column_names:
        v = p.column(c).to_numpy(zero_copy_only=False)
        if v.dtype.kind == "f":
            sentinel = np.isin(np.round(v, 3), (-99.0, -99.99, -99.999, -999.0, 99.999, 999.0))
            assert np.all(np.isfinite(v[~np.isnan(v)])) and not sentinel.any(), c
    # The Atlas Image files instead of their grids: the same images.
    from astropy.io import fits

    paths = []
    for img, g in images:
        hdu = fits.PrimaryHDU(np.zeros((g.ny, g.nx), np.uint8))
        hdu.header.update(g.header())
        paths.append(tmp_path / f"k_005_{img:03d}.fits")
        hdu.writeto(paths[-1])
    tf = finalize_point_sources(pts, scan=5, night_date="2000-03-15", observatory="s", frames=frames,
                                atlas_images=paths)
    assert np.array_equal(tf["coadd"].filled(0), t["coadd"].filled(0))
    # With the scan's extended sources: gal_contam known (0 or more), ext_key where matched.
    xsc = Table({"ext_key": np.array([9], np.int64), "ra": [t["ra"][5]], "dec": [t["dec"][5]],
                 "r_k20fe": [12.0], "k_ba": [1.0], "k_phi": [0.0]})
    tx = finalize_point_sources(pts, scan=5, night_date="2000-03-15", observatory="s", frames=frames,
                                atlas_images=images, extended=xsc)
    assert not np.any(tx["gal_contam"].mask) and tx["gal_contam"][5] == 1
    assert tx["ext_key"][5] == 9 and np.sum(~tx["ext_key"].mask) == 1


def _rows(scan, xi, eta, ew, ns, ra0=150.0, dec0=10.0):
    """Minimal catalog rows that pass rules 2-6, at tangent positions about (ra0, dec0)."""
    n = len(xi)
    ra, dec = tan_deproject(np.asarray(xi, float), np.asarray(eta, float), ra0, dec0)
    t = Table({"ra": ra, "dec": dec, "designation": designation(ra, dec),
               "rd_flg": np.full(n, "222"), "ndet": np.full(n, "666666"), "cc_flg": np.full(n, "000"),
               "dist_edge_ns": np.asarray(ns, np.int32), "dist_edge_ew": np.asarray(ew, np.int32),
               "pts_key": scan * 10**6 + np.arange(1, n + 1, dtype=np.int64),
               "dup_src": np.zeros(n, np.int16), "use_src": np.zeros(n, np.int16)})
    for p in "jhk":
        t[f"{p}_m"], t[f"{p}_snr"] = np.full(n, 12.0), np.full(n, 50.0)
        t[f"{p}_cmsig"], t[f"{p}_psfchi"] = np.full(n, 0.02), np.full(n, 1.0)
    return t


def test_selection_rules_one_by_one():
    t = _rows(1, np.zeros(9), np.arange(9) * 60.0, ew=np.full(9, 100), ns=np.full(9, 100))
    t["dist_edge_ew"][1] = 10  # rule 1: not more than 10"
    t["cc_flg"][2] = "0D0"  # rule 2: the artifact itself
    t["rd_flg"][3] = "044"  # rule 3: no rd_flg 1/2/3
    for p in "jhk":  # rule 4: SNR 6 everywhere, and only two bands
        t[f"{p}_snr"][4], t[f"{p}_cmsig"][4] = 6.0, 1.0857 / 6
    t["rd_flg"][4] = "220"
    t["j_psfchi"][5] = t["h_psfchi"][5] = t["k_psfchi"][5] = 12.0  # rule 5
    t["ndet"][6] = "161616"  # rule 6: bright, detected on 1 of 6 frames
    t["rd_flg"][7] = "111"  # saturated: no PSF fit, no frame statistics asked
    t["j_psfchi"][7] = t["h_psfchi"][7] = t["k_psfchi"][7] = np.nan
    t["ndet"][7] = "000000"
    t["ndet"][8] = "222222"  # bright, 2 frames only, detected on both in all bands: fallback
    assert list(psc_selection(t).astype(int)) == [1, 0, 0, 0, 0, 0, 0, 1, 1]
    # The same row with SNR 6 in three bands passes the three-band clause of rule 4.
    t["rd_flg"][4] = "222"
    assert psc_selection(t)[4]


def test_duplicates_in_the_overlap_of_two_scans(rng):
    # Scan 1 and scan 2 are adjacent tiles overlapping in a 60"-wide strip at ξ in [0, 60];
    # scan 1's east edge is at ξ = 0 (dist_ew = ξ), scan 2's west edge at ξ = 60.
    def ew1(x):
        return np.asarray(x)

    def ew2(x):
        return 60 - np.asarray(x)

    # Clean pairs at ξ = 15 (deeper in scan 2) and 45 (deeper in scan 1); a triangle (scan 2
    # split), a 2×2, a chain over three scans, and a lone source in the overlap.
    x1 = [15.0, 45.0, 30.0, 20.0, 20.0, 40.0, 40.0]
    y1 = [0.0, 100.0, 200.0, 300.0, 301.8, 400.0, 401.9]
    x2 = [15.2, 45.0, 30.0, 30.0, 20.3, 20.3, 40.3, 45.0]
    y2 = [0.1, 100.2, 199.4, 200.6, 300.0, 301.9, 401.0, 500.0]
    t1 = _rows(1, x1, y1, ew1(x1), np.full(7, 500))
    t2 = _rows(2, x2, y2, ew2(x2), np.full(8, 500))
    t3 = _rows(3, [40.0], [402.9], [30], [500])  # links the chain through scan 3
    far = _rows(4, [5000.0], [0.0], [100], [500])  # another scan, far away
    out = resolve_duplicates({1: t1, 2: t2, 3: t3, 4: far}, config=PscConfig())
    d1, d2 = list(out[1]["dup_src"]), list(out[2]["dup_src"])
    u1, u2 = list(out[1]["use_src"]), list(out[2]["use_src"])
    assert d1 == [1, 1, 3, 4, 4, 5, 5] and d2 == [1, 1, 3, 3, 4, 4, 5, 0]
    assert list(out[3]["dup_src"]) == [5] and list(out[4]["dup_src"]) == [0]
    # Clean pairs: the apparition farther from its edge (ξ=15 → scan 2, ξ=45 → scan 1).
    assert (u1[0], u2[0]) == (0, 1) and (u1[1], u2[1]) == (1, 0)
    # Triangle at ξ=30: 30" from both edges, so the larger sum (scan 2's split pair) wins.
    assert (u1[2], u2[2], u2[3]) == (0, 1, 1)
    # 2×2 at ξ≈20: scan 2 (40") beats scan 1 (20"): both of scan 2's apparitions kept.
    assert (u1[3], u1[4], u2[4], u2[5]) == (0, 0, 1, 1)
    # Chain at ξ≈40: scan 3's member is 30" from its edge, scan 1's 40", scan 2's 19.7":
    # scan 1's two apparitions are the source(s).
    assert (u1[5], u1[6], u2[6], out[3]["use_src"][0]) == (1, 1, 0, 0)
    # The lone source and the far one stand alone.
    assert u2[7] == 1 and out[4]["use_src"][0] == 1
    # Inputs are not modified.
    assert not np.any(t1["use_src"]) and not np.any(t1["dup_src"])
    # Only rows passing rules 1-6 take part: an artifact's apparition (scan 2, deeper) does
    # not take the source from scan 1, and stays out with dup_src 0.
    t1b = _rows(1, [15.0], [600.0], [15], [500])
    t2b = _rows(2, [15.2], [600.1], [44], [500])
    t2b["cc_flg"][0] = "D00"
    out = resolve_duplicates({1: t1b, 2: t2b})
    assert (out[1]["use_src"][0], out[1]["dup_src"][0]) == (1, 0)
    assert (out[2]["use_src"][0], out[2]["dup_src"][0]) == (0, 0)


def test_a_source_seen_once_loses_to_a_deeper_pseudo_apparition():
    # Two adjacent scans 450" apart in RA overlap in a ~60" strip.
    ra_b = 150.0 + 450.0 / 3600 / np.cos(np.deg2rad(10.0))
    _, fa = _scan()
    _, fb = _scan(ra0=ra_b)
    xi = np.array([232.0, 212.0, 0.0])  # deeper in scan 2, deeper in scan 1, not in scan 2
    ra, dec = tan_deproject(xi, np.zeros(3), 150.0, 10.0)
    north, south, east, west, _ = scan_edges(ra, dec, fa, nx=NX, ny=NY)
    ta = _rows(1, xi, np.zeros(3), np.floor(np.minimum(east, west)), np.floor(np.minimum(north, south)))
    *_, wb, _ = scan_edges(ra, dec, fb, nx=NX, ny=NY)
    assert ta["dist_edge_ew"][0] < np.floor(wb[0]) and ta["dist_edge_ew"][1] > np.floor(wb[1])
    assert np.all(ta["dist_edge_ew"] > 10) and np.floor(wb[0]) > 10
    tb = _rows(2, [-450.0], [500.0], [100], [100], ra0=ra_b)
    with_pseudo = resolve_duplicates({1: ta, 2: tb}, frames={1: fa, 2: fb}, nx=NX, ny=NY)
    assert list(with_pseudo[1]["use_src"]) == [0, 1, 1] and not any(with_pseudo[1]["dup_src"])
    assert list(resolve_duplicates({1: ta, 2: tb})[1]["use_src"]) == [1, 1, 1]
    # Seen in both scans: a clean match, and the deeper real apparition (scan 2) is kept (a
    # scan of the group holds no pseudo-apparition).
    tb2 = _rows(2, [232.0 - 450.0], [0.0], [np.floor(wb[0])], [100], ra0=ra_b)
    both = resolve_duplicates({1: ta, 2: tb2}, frames={1: fa, 2: fb}, nx=NX, ny=NY)
    assert (both[1]["dup_src"][0], both[2]["dup_src"][0]) == (1, 1)
    assert (both[1]["use_src"][0], both[2]["use_src"][0]) == (0, 1)


def test_equal_designations_of_selected_sources_get_letters():
    # Two selected sources 0.03" apart in different scans: one name (the RA digit is 0.15"),
    # two sources when the match radius is 0.01", one source at 2".
    t1 = _rows(1, [0.0], [0.0], [100], [100])
    t2 = _rows(2, [0.03], [0.0], [100], [100])
    assert t1["designation"][0] == t2["designation"][0] == "10000000+1000000"
    out = resolve_duplicates({1: t1, 2: t2}, config=PscConfig(duplicate_radius_arcsec=0.01))
    names = [out[1]["designation"][0], out[2]["designation"][0]]
    assert names == [t1["designation"][0] + "A", t1["designation"][0] + "B"]
    out = resolve_duplicates({1: t1, 2: t2}, config=PscConfig())  # now one source
    assert [out[1]["designation"][0], out[2]["designation"][0]] == [t1["designation"][0]] * 2


def test_extended_source_association():
    # A 30" galaxy elongated along PA 45° with axis ratio 0.5, and a 6" one.
    xsc = Table({"ext_key": np.array([71, 72], np.int64), "ra": [150.0, 150.05], "dec": [10.0, 10.0],
                 "r_k20fe": [30.0, 6.0], "k_ba": [0.5, 0.9], "k_phi": [45.0, 0.0]})
    pa = np.deg2rad(45.0)
    xi = [0.5, 25 * np.sin(pa), 25 * np.cos(pa), 0.0, 0.0, 40.0]  # centre; 25" along major, minor
    eta = [0.3, 25 * np.cos(pa), -25 * np.sin(pa), 0.0, 0.0, 0.0]
    ra, dec = tan_deproject(np.array(xi), np.array(eta), 150.0, 10.0)
    ra[3], dec[3] = 150.05, 10.0 + 1.0 / 3600  # 1" from the small one's centre
    ra[4], dec[4] = 150.05, 10.0 + 3.0 / 3600  # 3" from it: no counterpart
    gal, key = extended_association(ra, dec, xsc)
    assert list(gal) == [1, 2, 0, 0, 0, 0] and list(key) == [71, -1, -1, 72, -1, -1]
    assert list(extended_association(ra, dec, None)[0]) == [0] * 6


def test_config_is_registered_and_checked():
    assert RunConfig.defaults().psc == PscConfig()
    with pytest.raises(ConfigError, match="duplicate_radius"):
        PscConfig(duplicate_radius_arcsec=0.0)
