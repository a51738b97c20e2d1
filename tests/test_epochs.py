"""Per-source epochs and airmasses from a scan's frames table."""

from __future__ import annotations

import numpy as np
import pytest

from gpu2mass.epochs import source_epochs


def _frames(direction: str):
    # A northward (or southward) scan at RA 150°: 50 frames, 57" apart, 1.3 s apart.
    n = 50
    dec = 10.0 + np.arange(n) * 57.0 / 3600 * (1 if direction == "n" else -1)
    mjd = 51604.2 + np.arange(n) * 1.3 / 86400
    rows = {"band": np.repeat(["J", "K"], n), "ra": np.full(2 * n, 150.0), "dec": np.tile(dec, 2),
            "mjd": np.tile(mjd, 2), "airmass": np.tile(1.2 + 0.001 * np.arange(n), 2)}
    return rows, dec, mjd


@pytest.mark.parametrize("direction", ["n", "s"])
def test_sources_take_the_time_the_array_centre_crossed_them(direction):
    frames, dec, mjd = _frames(direction)
    # Sources at frame 10 and halfway between frames 30 and 31, a little off the centre line.
    src_dec = np.array([dec[10], 0.5 * (dec[30] + dec[31])])
    t, x = source_epochs(np.array([150.01, 149.99]), src_dec, frames, "K")
    np.testing.assert_allclose(t, [mjd[10], 0.5 * (mjd[30] + mjd[31])], atol=0.02 / 86400)
    np.testing.assert_allclose(x, [1.21, 1.2305], atol=2e-5)


def test_beyond_the_scan_ends_the_end_frames_values_hold():
    frames, dec, mjd = _frames("n")
    t, _ = source_epochs(np.array([150.0, 150.0]), np.array([dec[0] - 0.1, dec[-1] + 0.1]), frames, "J")
    np.testing.assert_allclose(t, [mjd[0], mjd[-1]])
    with pytest.raises(ValueError, match="band H"):
        source_epochs(np.array([150.0]), np.array([10.0]), frames, "H")
