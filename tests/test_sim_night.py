"""A simulated night against its own truth: every truth quantity is consistent with the
pixels. These are the checks that make the later pipeline figures mean something."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from conftest import TINY_INJECT_K
from scipy.optimize import least_squares

from gpu2mass.geometry import tan_project
from gpu2mass.io import rawformat as rf
from gpu2mass.sim import psf
from gpu2mass.sim.camera import BandOptics

BANDS = ("J", "H", "K")
MAGCOL = {"J": "j_m", "H": "h_m", "K": "k_m"}


def _table(path):
    return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}


class Night:
    """Raw arrays and truth of a simulated night, read straight from the files."""

    def __init__(self, root):
        self.root = root
        self.manifest = json.loads((root / "night.json").read_text())
        self.truth = json.loads((root / "truth" / "night.json").read_text())
        self.sources = _table(root / "truth" / "sources.parquet")
        self.frames = _table(root / "truth" / "frames.parquet")
        self.artifacts = _table(root / "truth" / "artifacts.parquet")
        self.optics = {b: BandOptics(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in o.items()})
                       for b, o in self.truth["camera"]["optics"].items()}
        self.det = self.truth["camera"]["detectors"]

    def scan(self, kind):
        return next(s for s in self.manifest["scans"] if s["type"] == kind)

    def cube(self, scan, band, ext):
        with fits.open(self.root / scan["files"][band]) as h:
            return np.asarray(h[ext].data, dtype=np.float64)

    def calib(self, kind, band):
        return fits.getdata(self.root / "calib" / rf.calib_file(kind, band)).astype(np.float64)

    def dark(self, band):
        return self.cube(self.scan("dark"), band, "R2R1").mean(0)

    def calibrated(self, band):
        """(R2R1 − dark)/flat of the science scan, DN at flat = 1."""
        return (self.cube(self.scan("sci"), band, "R2R1") - self.dark(band)) / self.calib("flat", band)

    def frame_truth(self, scan_no, band):
        sel = (self.frames["scan"] == scan_no) & (self.frames["band"] == band)
        order = np.argsort(self.frames["frame"][sel])
        return {k: v[sel][order] for k, v in self.frames.items()}

    def pixel(self, band, ft, f, ra, dec):
        xi, eta = tan_project(ra, dec, ft["ra"][f], ft["dec"][f])
        u, v = self.optics[band].tangent_to_pixel(xi, eta)
        n = self.manifest["instrument"]["nx"]
        return u + (n - 1) / 2, v + (n - 1) / 2


@pytest.fixture(scope="module")
def night(tiny_night):
    return Night(tiny_night)


def _injected(night, lo=9.0, hi=10.0):
    k = night.sources["k_m"]
    sel = np.isin(np.round(k, 6), np.round([m for m in TINY_INJECT_K if lo <= m <= hi], 6))
    return np.flatnonzero(sel & (night.sources["kind"] == "star"))


def _measurements(night, band, edge=16):
    """(star index, frame, x, y) of every injected ladder star fully inside a frame."""
    sci = night.scan("sci")
    ft = night.frame_truth(sci["scan"], band)
    out = []
    for i in _injected(night):
        for f in range(sci["nframes"]):
            x, y = night.pixel(band, ft, f, night.sources["ra"][i], night.sources["dec"][i])
            if edge <= x <= 255 - edge and edge <= y <= 255 - edge:
                out.append((i, f, float(x), float(y)))
    return ft, out


def test_spec_layout_and_truth_columns(night):
    root = night.root
    assert night.manifest["format"] == rf.FORMAT and night.manifest["format_version"] == 1
    for s in night.manifest["scans"]:
        for b in BANDS:
            assert (root / s["files"][b]).is_file()
    for b in BANDS:
        for kind in ("flat", "satmap", "badpix"):
            assert (root / "calib" / rf.calib_file(kind, b)).is_file()
    assert (root / "calib" / "standards.parquet").is_file() and (root / "refcat.parquet").is_file()
    spec_cols = {
        "sources": {"id", "kind", "ra", "dec", "epoch_mjd", "pmra", "pmdec", "j_m", "h_m", "k_m",
                    "r_eff_arcsec", "sersic_n", "axis_ratio", "pa_deg", "ra_rate", "dec_rate"},
        "frames": {"scan", "band", "frame", "mjd", "ra", "dec", "rot_deg", "fwhm_arcsec", "sky_dn",
                   "zp_mag", "airmass"},
        "artifacts": {"scan", "band", "frame", "kind", "x0", "y0", "x1", "y1", "parent_id"},
    }
    for name, cols in spec_cols.items():
        assert set(getattr(night, name)) == cols, name
    kinds = set(night.sources["kind"])
    assert {"star", "galaxy", "asteroid"} <= kinds
    assert len(np.unique(night.sources["id"])) == len(night.sources["id"])
    # One truth frame row per (sky scan, band, frame), none for darks.
    sky = [s for s in night.manifest["scans"] if s["type"] != "dark"]
    assert len(night.frames["scan"]) == 3 * sum(s["nframes"] for s in sky)
    assert set(night.artifacts["kind"]) >= {"cosmic_ray", "meteor", "persistence", "spike", "stripe"}


def test_reader_accepts_the_simulated_night(night):
    from gpu2mass.io.rawnight import open_night

    n = open_night(night.root, check_data=True)
    assert [s.number for s in n.scans] == [s["scan"] for s in night.manifest["scans"]]


@pytest.mark.parametrize("band", BANDS)
def test_isolated_star_flux_matches_truth(night, band):
    """Aperture flux of bright isolated stars vs 10^(−0.4 (m − zp_truth)) within 0.5 %."""
    ft, meas = _measurements(night, band)
    assert len(meas) >= 15
    cal = night.calibrated(band)
    bad = night.calib("badpix", band) > 0
    opt = night.optics[band]
    yy, xx = np.mgrid[-12:13, -12:13]
    ratios = []
    for i, f, x, y in meas:
        cx, cy = int(round(x)), int(round(y))
        fx, fy = x - cx, y - cy
        cut = cal[f, cy - 12 : cy + 13, cx - 12 : cx + 13]
        badcut = bad[cy - 12 : cy + 13, cx - 12 : cx + 13]
        r = np.hypot(xx - fx, yy - fy)
        ap, ann = r <= 6, (r >= 8) & (r <= 12) & ~badcut
        if badcut[ap].any():
            continue
        frac = psf.pixel_fractions(float(ft["fwhm_arcsec"][f]), scale=opt.scale_arcsec,
                                   phase=(fx, fy), half=12)
        expect = 10 ** (-0.4 * (night.sources[MAGCOL[band]][i] - ft["zp_mag"][f])) * (
            frac[ap].sum() - ap.sum() * np.median(frac[ann]))
        got = cut[ap].sum() - ap.sum() * np.median(cut[ann])
        ratios.append(got / expect)
    ratios = np.array(ratios)
    err = ratios.std(ddof=1) / np.sqrt(len(ratios))
    assert abs(np.mean(ratios) - 1) < 0.005, (np.mean(ratios), err, len(ratios))
    assert ratios.std() < 0.03  # a few % per frame at these magnitudes


@pytest.mark.parametrize("band", BANDS)
def test_star_positions_match_truth_geometry(night, band):
    """Fitted positions vs truth position + truth pointing + camera geometry: < 0.02"."""
    ft, meas = _measurements(night, band)
    cal = night.calibrated(band)
    opt = night.optics[band]
    offsets = []
    yy, xx = np.mgrid[-4:5, -4:5]
    for _i, f, x, y in meas:
        cx, cy = int(round(x)), int(round(y))
        cut = cal[f, cy - 4 : cy + 5, cx - 4 : cx + 5]
        fwhm = float(ft["fwhm_arcsec"][f])

        def model(p, fwhm=fwhm):
            return p[2] * psf.pixel_fractions(fwhm, scale=opt.scale_arcsec, phase=(p[0], p[1]), half=4) + p[3]

        p0 = [x - cx, y - cy, cut.sum(), np.median(cut)]
        fit = least_squares(lambda p, cut=cut, model=model: (model(p) - cut).ravel(), p0, x_scale=[0.1, 0.1, p0[2], 10])
        offsets.append(((fit.x[0] - (x - cx)) * opt.scale_arcsec, (fit.x[1] - (y - cy)) * opt.scale_arcsec))
    off = np.array(offsets)
    assert np.all(np.abs(off.mean(0)) < 0.02), off.mean(0)
    assert np.median(np.hypot(*off.T)) < 0.05


@pytest.mark.parametrize("band", BANDS)
def test_sky_level_and_noise_budget(night, band):
    """Frame sky matches truth sky_dn; the measured noise gives SNR 10 at the 10σ limit."""
    from gpu2mass.sim.camera import BandDetector
    from gpu2mass.sim.sensitivity import LIMIT_10SIGMA, point_source_snr

    sci = night.scan("sci")
    ft = night.frame_truth(sci["scan"], band)
    cal = night.calibrated(band)
    good = night.calib("badpix", band) == 0
    med = np.array([np.median(c[good]) for c in cal])
    assert np.allclose(med / ft["sky_dn"], 1, atol=0.01)
    # Pixel noise from differences of horizontal neighbours (blind to the smooth airglow
    # waves), robust against stars and cosmic rays.
    pair = good[:, 1:] & good[:, :-1]
    diffs = np.concatenate([(c[:, 1:] - c[:, :-1])[pair] for c in cal])
    q = np.percentile(diffs, [15.87, 84.13])
    sigma = (q[1] - q[0]) / 2 / np.sqrt(2)
    d = night.det[band]
    g, rn = d["gain_e_per_dn"], d["read_noise_e"]
    # Predicted: sky shot noise and read noise through the flat, plus the noise of the
    # mean dark of the dark scan subtracted above.
    flat = night.calib("flat", band)[good]
    n_dark = night.scan("dark")["nframes"]
    var = ((ft["sky_dn"].mean() * flat) / g + (rn / g) ** 2 * (1 + 1 / n_dark)) / flat**2
    predicted = np.sqrt(np.median(var))
    assert sigma == pytest.approx(predicted, rel=0.05)
    # SNR at the limit with the *measured* sky noise, at this night's zero point and seeing.
    det = BandDetector(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
    sky_eff = (sigma**2 - (rn / g) ** 2) * g
    snr = point_source_snr(LIMIT_10SIGMA[band], det, zp_mag=float(np.median(ft["zp_mag"])),
                           fwhm_arcsec=float(np.median(ft["fwhm_arcsec"])), sky_dn=sky_eff)
    assert snr == pytest.approx(10, rel=0.25)


def test_saturation_rule_and_r1_saturated_star(night):
    sci = night.scan("sci")
    star = np.flatnonzero(np.isclose(night.sources["k_m"], 3.0))
    assert star.size == 1
    for band in BANDS:
        r1, r21 = night.cube(sci, band, "R1"), night.cube(sci, band, "R2R1")
        sat = night.calib("satmap", band)
        good = night.calib("badpix", band) == 0
        assert np.all(r1 + r21 <= np.ceil(sat) + 1)
        ft = night.frame_truth(sci["scan"], band)
        hits = 0
        for f in range(sci["nframes"]):
            x, y = night.pixel(band, ft, f, night.sources["ra"][star[0]], night.sources["dec"][star[0]])
            if 3 <= x <= 252 and 3 <= y <= 252:
                ix, iy = int(round(x)), int(round(y))
                if not good[iy, ix]:  # bad pixels carry no usable signal
                    continue
                # The pixel nearest the centre holds ≥ 18 % of the flux, ≥ 40,000 DN even in
                # the 51 ms R1: R1 sits at SAT and nothing is left for R2−R1.
                assert r1[f, iy, ix] >= np.floor(sat[iy, ix]) - 1, band
                assert abs(r21[f, iy, ix]) <= 1, band
                hits += 1
        assert hits >= 3


def test_artifacts_are_where_truth_says(night):
    sci = night.scan("sci")
    art = night.artifacts
    for band in BANDS:
        cal = night.calibrated(band)
        sigma = np.sqrt(night.det[band]["read_noise_e"] ** 2 / night.det[band]["gain_e_per_dn"] ** 2
                        + 700 / night.det[band]["gain_e_per_dn"])
        sel = (art["scan"] == sci["scan"]) & (art["band"] == band)
        cr = sel & (art["kind"] == "cosmic_ray")
        assert cr.sum() >= 30
        excess = [max(cal[f, int(y0), int(x0)], cal[f, int(y1), int(x1)]) - np.median(cal[f])
                  for f, x0, y0, x1, y1 in zip(art["frame"][cr], art["x0"][cr], art["y0"][cr],
                                               art["x1"][cr], art["y1"][cr], strict=True)]
        assert np.mean(np.array(excess) > 3 * sigma) > 0.8
        met = np.flatnonzero(sel & (art["kind"] == "meteor"))
        assert met.size >= 1
        for k in met:
            f = art["frame"][k]
            t = np.linspace(0.1, 0.9, 50)
            xs = np.rint(art["x0"][k] + t * (art["x1"][k] - art["x0"][k])).astype(int)
            ys = np.rint(art["y0"][k] + t * (art["y1"][k] - art["y0"][k])).astype(int)
            assert np.median(cal[f, ys, xs]) - np.median(cal[f]) > 5 * sigma
        # A persistence ghost sits at the parent's pixel in later frames.
        pers = np.flatnonzero(sel & (art["kind"] == "persistence"))
        assert pers.size >= 1
        f, x, y = art["frame"][pers[0]], int(art["x0"][pers[0]]), int(art["y0"][pers[0]])
        assert cal[f, y, x] - np.median(cal[f]) > 3 * sigma


def test_same_seed_same_night(tiny_night, tmp_path):
    from conftest import TINY_INJECT_K as K

    from gpu2mass.sim import SimulationRequest, simulate_night

    simulate_night(tmp_path / "again", SimulationRequest(preset="tiny", seed=7, inject_k=K))
    for rel in ("truth/sources.parquet", "truth/frames.parquet", "truth/artifacts.parquet"):
        a, b = _table(tiny_night / rel), _table(tmp_path / "again" / rel)
        assert a.keys() == b.keys()
        for k in a:  # NaN-aware (pyarrow's Table.equals treats NaN != NaN)
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel}: {k}")
    a = fits.getdata(tiny_night / "scans" / "s003_H.fits", "R2R1")
    b = fits.getdata(tmp_path / "again" / "scans" / "s003_H.fits", "R2R1")
    assert np.array_equal(a, b)
