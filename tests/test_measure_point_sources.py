"""profiling/measure_point_sources.py's yardstick for the Δm / cmsig spread of one night."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "profiling"))
from measure_point_sources import honest_spread


def test_honest_spread_of_stars_with_their_own_errors_is_one():
    """250 stars, no shared error: the spread is 1 within the sampling of 250 (5-95 %:
    0.87-1.12, the robust spread of 250 values)."""
    cmsig = np.geomspace(0.003, 0.03, 250)
    med, p5, p95, out = honest_spread(cmsig, np.zeros(250), np.repeat([1, 2], 125), draws=500)
    assert abs(med - 1.0) < 0.03 and 0.85 < p5 < 1.0 < p95 < 1.15 and out < 0.08


def test_a_shared_scale_error_makes_one_nights_spread_wide():
    """Two scans whose scale error is most of the bright stars' error (ci J: 2-4 mmag of
    2.4-4.4): a night's spread ranges widely, though every error is honest."""
    cmsig = np.geomspace(0.0025, 0.03, 250)
    scale = np.full(250, 0.002)
    _, p5, p95, out = honest_spread(cmsig, scale, np.repeat([1, 2], 125), draws=500)
    assert p95 - p5 > 0.25 and out > 0.05
    # And the draws are what they say: data drawn that way fall inside [p5, p95] ~90 % of the time.
    rng = np.random.default_rng(1)
    inside = 0
    for _ in range(200):
        z = (np.repeat(rng.normal(0, 1, 2), 125) * scale
             + rng.normal(0, 1, 250) * np.sqrt(cmsig**2 - scale**2)) / cmsig
        s = 1.4826 * np.median(np.abs(z - np.median(z)))
        inside += p5 <= s <= p95
    assert 0.82 <= inside / 200 <= 0.97
