"""Shared fixtures: seeded generators and simulated nights, made once per test session."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)


#: Ks of stars injected into the tiny night: one saturating R1 (artifacts, saturation
#: rule), a ladder of bright unsaturated ones (flux and position truth checks).
TINY_INJECT_K = (3.0, 9.0, 9.2, 9.4, 9.6, 9.8, 10.0)


@pytest.fixture(scope="session")
def tiny_night(tmp_path_factory):
    """A ``tiny`` preset night (seed 7) with :data:`TINY_INJECT_K` stars; read-only."""
    from gpu2mass.sim import SimulationRequest, simulate_night

    out = tmp_path_factory.mktemp("tiny") / "night"
    simulate_night(out, SimulationRequest(preset="tiny", seed=7, inject_k=TINY_INJECT_K))
    return out


@pytest.fixture(scope="session")
def processed_tiny(tiny_night, tmp_path_factory):
    """``gpu2mass night`` on :func:`tiny_night` (CPU), every product of a night: Atlas
    Images, pts/frames/qa per scan, calibration.json, qa.html, wdb.duckdb, run.json.
    Read-only: tests that change products copy it first."""
    from gpu2mass.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("processed_tiny") / "out"
    res = CliRunner().invoke(app, ["night", str(tiny_night), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return out
