"""Robust frame statistics: CPU (Numba) against the sort-based reference and NumPy itself."""

from __future__ import annotations

import numpy as np
import pytest
from gpu2mass.kernels.robust import frame_quantiles, trimmed_mean

QS = (0.0, 0.1587, 0.5, 0.8413, 1.0)


def test_quantiles_match_numpy(rng):
    values = rng.normal(100.0, 15.0, (7, 30, 40)).astype(np.float32)
    values[:, 3, :5] = 1e6  # outliers: masked
    usable = rng.uniform(size=values.shape) > 0.1
    usable[:, 3, :5] = False
    usable[4] = False  # an all-masked frame gives NaN
    usable[5] = False
    usable[5, 0, :3] = True  # three values
    usable[6] = False
    usable[6, 2, 2] = True  # one value
    got = frame_quantiles(values, usable, QS)
    ref = frame_quantiles(values, usable, QS, target="reference")
    assert got.shape == (len(QS), 7) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-12, equal_nan=True)
    for f in (0, 1, 2, 3, 5, 6):
        want = np.quantile(values[f][usable[f]].astype(np.float64), QS)
        np.testing.assert_allclose(got[:, f], want, rtol=1e-12)
    assert np.all(np.isnan(got[:, 4]))


@pytest.mark.parametrize("trim", [0.0, 0.2, 0.45])
def test_trimmed_mean_matches_a_direct_computation(rng, trim):
    stack = rng.normal(0.0, 10.0, (42, 9, 11)).astype(np.float32)
    stack[5, 2, 2] = 1e5  # trimmed away when trim > 0
    usable = rng.uniform(size=stack.shape) > 0.15
    usable[:, 0, 0] = False  # nothing usable: 0
    usable[:, 0, 1] = False
    usable[7, 0, 1] = True  # one value
    got = trimmed_mean(stack, usable, trim, target="cpu")
    ref = trimmed_mean(stack, usable, trim, target="reference")
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    want = np.zeros(stack.shape[1:])
    for y in range(stack.shape[1]):
        for x in range(stack.shape[2]):
            v = np.sort(stack[usable[:, y, x], y, x].astype(np.float64))
            k = int(np.floor(trim * v.size))
            if v.size - 2 * k > 0:
                want[y, x] = v[k:v.size - k].mean()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got[0, 0] == 0.0 and got[0, 1] == stack[7, 0, 1]


def test_bad_arguments(rng):
    v = rng.normal(size=(3, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="quantiles"):
        frame_quantiles(v, v > -10, (1.5,))
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(v, v > -10, 0.5)
    with pytest.raises(ValueError, match="usable"):
        trimmed_mean(v, (v > 0)[:2], 0.2)
