"""The run configuration: defaults, TOML, --set overrides and their errors."""

from __future__ import annotations

import pytest

from gpu2mass.config import STEP_CONFIGS, RunConfig, load_config
from gpu2mass.errors import ConfigError


def test_defaults_hold_every_step():
    cfg = RunConfig.defaults()
    assert set(cfg.steps) == set(STEP_CONFIGS)
    assert cfg.register.match_radius_arcsec == 2.0
    assert cfg.transients.solo_mask_mag == {"J": 15.0, "H": 14.5, "K": 14.0}
    d = cfg.to_dict()
    assert d["register"]["min_snr"] == 10.0


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[register]\nmatch_radius_arcsec = 1.5\niterations = 9\n'
                    '[transients]\nsolo_mask_mag = { K = 13.5 }\n')
    cfg = load_config(path, ["register.iterations=5", "transients.confirm_radius_arcsec=2.5"])
    assert cfg.register.match_radius_arcsec == 1.5 and cfg.register.iterations == 5
    assert cfg.transients.solo_mask_mag == {"J": 15.0, "H": 14.5, "K": 13.5}
    assert cfg.transients.confirm_radius_arcsec == 2.5
    assert RunConfig.defaults().register.iterations != 5  # defaults untouched (frozen)


@pytest.mark.parametrize(("overrides", "message"), [
    (["nosuchstep.x=1"], "unknown step"),
    (["register.nosuch=1"], "unknown setting register.nosuch"),
    (["register.iterations=2.5"], "must be an integer"),
    (["register.match_radius_arcsec=fast"], "cannot read"),
    (["register"], "step.name=value"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unreadable_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[register\n")
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(path)
