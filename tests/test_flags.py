"""PSC flag rules (facts sheet section 13), row by row, and the internal bit registries."""

from __future__ import annotations

import numpy as np
import pytest

from gpu2mass import flags as F

# -- ph_qual: table 13.1, one test per row -----------------------------------------------------

GOOD = {"snr": 50.0, "cmsig": 0.02, "psfchi": 1.0, "frames_good": True}


def q(rd, **kw):
    args = {**GOOD, **kw}
    return str(F.ph_qual_band(rd, **args)[()])


def test_ph_qual_x_no_valid_brightness():
    # rd_flg 9 is X whatever the other quantities say.
    assert q(F.RD_NO_MEASUREMENT) == "X"
    assert q(F.RD_NO_MEASUREMENT, snr=np.nan, cmsig=np.nan) == "X"


def test_ph_qual_u_upper_limits():
    assert q(F.RD_NOT_DETECTED) == "U"
    assert q(F.RD_INCONSISTENT) == "U"
    assert q(F.RD_NOT_DETECTED, snr=np.nan, cmsig=np.nan, psfchi=np.nan, frames_good=False) == "U"


def test_ph_qual_f_no_reliable_error():
    for rd in (F.RD_R1_APERTURE, F.RD_R1_PROFILE):
        assert q(rd, cmsig=np.nan) == "F"
        assert q(rd, cmsig=9.999) == "F"  # 2MASS's flag value > 8
        assert q(rd, cmsig=8.0) != "F"  # exactly 8 is a (huge) uncertainty, not a flag
    # rd_flg 2 without cmsig is not F (the rule names rd_flg 1 and 3 only): D.
    assert q(F.RD_PSF, cmsig=np.nan) == "D"


def test_ph_qual_e_poor_fit_aperture_or_frames():
    assert q(F.RD_PSF, psfchi=10.01) == "E"
    assert q(F.RD_PSF, psfchi=10.0) == "A"  # > 10, not >= 10
    assert q(F.RD_R2_APERTURE) == "E"
    assert q(F.RD_R2_APERTURE, snr=500, cmsig=0.001) == "E"
    assert q(F.RD_PSF, frames_good=False) == "E"
    assert q(F.RD_R1_APERTURE, frames_good=False) == "E"
    # rd_flg 3 is not subject to the frame rule (saturated in every R1 frame).
    assert q(F.RD_R1_PROFILE, frames_good=False) == "A"
    # psfchi only matters for PSF photometry.
    assert q(F.RD_R1_APERTURE, psfchi=50.0) == "A"


@pytest.mark.parametrize("rd", [F.RD_R1_APERTURE, F.RD_PSF, F.RD_R1_PROFILE])
def test_ph_qual_abcd_thresholds(rd):
    # A: snr > 10 and cmsig < 0.10857.
    assert q(rd, snr=10.01, cmsig=0.1085) == "A"
    assert q(rd, snr=10.0, cmsig=0.1085) == "B"  # snr must exceed 10
    assert q(rd, snr=50.0, cmsig=0.10857) == "B"  # cmsig must be below 0.10857
    # B: snr > 7 and cmsig < 0.15510.
    assert q(rd, snr=7.01, cmsig=0.155) == "B"
    assert q(rd, snr=7.0, cmsig=0.155) == "C"
    assert q(rd, snr=50.0, cmsig=0.15510) == "C"
    # C: snr > 5 and cmsig < 0.21714.
    assert q(rd, snr=5.01, cmsig=0.217) == "C"
    assert q(rd, snr=5.0, cmsig=0.217) == "D"
    assert q(rd, snr=50.0, cmsig=0.21714) == "D"
    # D: no requirement.
    assert q(rd, snr=1.0, cmsig=2.0) == "D"
    assert q(rd, snr=np.nan, cmsig=1.0) == "D"


def test_ph_qual_thresholds_are_1_0857_over_snr():
    for snr, c in ((F.SNR_A, F.CMSIG_A), (F.SNR_B, F.CMSIG_B), (F.SNR_C, F.CMSIG_C)):
        assert c == pytest.approx(1.0857 / snr, abs=5e-6)


def test_ph_qual_vectorized_and_three_bands():
    rd = np.array([2, 2, 0, 1, 9, 4, 3])
    snr = np.array([20, 6, np.nan, 30, np.nan, 40, 12])
    cmsig = np.array([0.05, 0.2, np.nan, np.nan, np.nan, 0.03, 0.09])
    got = F.ph_qual_band(rd, snr, cmsig, psfchi=np.array([1, 2, np.nan, np.nan, np.nan, np.nan, np.nan]))
    assert got.tolist() == list("ACUFXEA")
    per = {b: {"rd_flg": np.array([2, 0]), "snr": np.array([20.0, 1.0]),
                   "cmsig": np.array([0.05, np.nan])} for b in F.BANDS}
    per["K"] = {"rd_flg": np.array([2, 2]), "snr": np.array([8.0, 6.0]), "cmsig": np.array([0.13, 0.2])}
    assert F.ph_qual(per).tolist() == ["AAB", "UUC"]
    with pytest.raises(ValueError, match="unknown rd_flg"):
        F.ph_qual_band(5, 10.0, 0.1)


def test_ph_qual_codes_documented_in_rule_order():
    assert list(F.PH_QUAL_CODES) == list("XUFEABCD")


# -- frame statistics (section 10 rule 6) ------------------------------------------------------


def test_frames_ok_bright_and_faint():
    # Bright J (< 14.5): >= 3 measurable frames and >= 41 % detected.
    n = np.array([3, 2, 6, 2, 0, 0])
    m = np.array([6, 6, 6, 2, 6, 1])
    mag = np.array([12.0, 12.0, 14.49, 12.0, 16.0, 16.0])
    assert F.frames_ok(n, m, mag, "J").tolist() == [True, False, True, False, True, True]
    # 2 of 5 = 40 % < 41 %: poor; 3 of 7 = 43 %: fine.
    assert F.frames_ok([2, 3], [5, 7], [10.0, 10.0], "K").tolist() == [False, True]
    # Faint (Ks >= 13.5) needs only one measurable frame.
    assert F.frames_ok([0, 0], [1, 0], [13.5, 14.0], "K").tolist() == [True, False]
    # Band limits: H 14.0.
    assert F.frames_ok([1], [6], [13.99], "H").tolist() == [False]
    assert F.frames_ok([1], [6], [14.0], "H").tolist() == [True]


# -- rd_flg, bl_flg ----------------------------------------------------------------------------


def test_rd_flg_constants():
    assert (F.RD_NOT_DETECTED, F.RD_R1_APERTURE, F.RD_PSF, F.RD_R1_PROFILE, F.RD_R2_APERTURE,
            F.RD_INCONSISTENT, F.RD_NO_MEASUREMENT) == (0, 1, 2, 3, 4, 6, 9)
    assert set(F.RD_FLG_CODES) == {0, 1, 2, 3, 4, 6, 9}


def test_bl_flg_rules():
    rd = np.array([0, 6, 9, 1, 3, 4, 2, 2, 2, 2])
    nc = np.array([5, 5, 5, 5, 5, 5, 1, 3, 7, 12])
    assert F.bl_flg_band(rd, nc).tolist() == list("0001111377")
    assert F.bl_flg_band(2, 0).tolist() == "1"  # a fit has at least one component
    per = {"J": {"rd_flg": 2, "n_components": 2}, "H": {"rd_flg": 0}, "K": {"rd_flg": 1}}
    assert str(F.bl_flg(per)) == "201"
    with pytest.raises(ValueError):
        F.bl_flg_band(7)


# -- cc_flg ------------------------------------------------------------------------------------


def test_cc_flg_letters_and_priority():
    assert set(F.CC_LETTERS) == set("pcdsb0")
    assert F.cc_flg_band(True).tolist() == "0"
    assert F.cc_flg_band(True, bandmerge=True).tolist() == "b"
    assert F.cc_flg_band(False, bandmerge=True, persistence=True).tolist() == "0"
    # Priority p > c > d > s > b.
    assert F.cc_flg_band(True, stripe=True, bandmerge=True).tolist() == "s"
    assert F.cc_flg_band(True, diffraction=True, stripe=True).tolist() == "d"
    assert F.cc_flg_band(True, confusion=True, diffraction=True).tolist() == "c"
    assert F.cc_flg_band(True, persistence=True, confusion=True).tolist() == "p"
    per = {"J": {"detected": True, "bandmerge": True}, "H": {"detected": True},
           "K": {"detected": np.array([True, False]), "diffraction": True}}
    assert F.cc_flg(per).tolist() == ["b0d", "b00"]


# -- ndet --------------------------------------------------------------------------------------


def test_ndet_string_and_caps():
    n = {"J": np.array([6, 12, 0]), "H": np.array([5, 3, -1]), "K": np.array([6, 7, 0])}
    m = {"J": np.array([6, 14, 0]), "H": np.array([6, 6, 2]), "K": np.array([6, 7, 0])}
    assert F.ndet(n, m).tolist() == ["665666", "993677", "000200"]
    assert F.ndet(np.array([[6], [6], [6]]), np.array([[6], [6], [6]])).tolist() == ["666666"]
    with pytest.raises(ValueError):
        F.ndet(np.zeros((2, 1)), np.zeros((2, 1)))


# -- registries --------------------------------------------------------------------------------


def test_registries_decode():
    assert F.BANDMERGE_BITS.describe(F.BM_CONFUSED | F.BM_HIERARCHICAL) == ["confused", "hierarchical"]
    assert F.BANDFILL_BITS.describe(F.BF_NEGATIVE | 64) == ["negative", "bit 6"]
    assert "few_pixels" in F.BANDFILL_BITS
    assert F.DETECTION_BITS.describe(1 | 8)[0].startswith("masked pixel")
    bits = [*F.BANDMERGE_BITS.bits, *F.BANDFILL_BITS.bits]
    assert all(b & (b - 1) == 0 for b in bits)
    with pytest.raises(ValueError):
        F.FlagRegistry("x", {3: ("a", "b")})


def test_join_bands():
    assert F.join_bands(["A", "U"], "B", np.array(["C", "D"])).tolist() == ["ABC", "UBD"]
