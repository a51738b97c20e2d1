"""Sort-based robust statistics through the array namespace: the NumPy reference and the
CuPy path of :mod:`gpu2mass.kernels.robust`."""

from __future__ import annotations

import numpy as np

__all__ = ["frame_quantiles", "trimmed_mean"]


def frame_quantiles(xp, flat, ok, qs):
    """(len(qs), n) float64: quantiles of each row's usable values (like numpy.quantile)."""
    n = flat.shape[0]
    s = xp.where(ok, flat, xp.asarray(np.inf, dtype=flat.dtype))
    s.sort(axis=1)  # in place: the copy is already ours
    count = ok.sum(axis=1)
    last = xp.maximum(count - 1, 0).astype(xp.float64)
    out = xp.empty((qs.size, n), xp.float64)
    for i, q in enumerate(qs.tolist()):
        pos = q * last
        lo = xp.floor(pos).astype(xp.int64)
        hi = xp.minimum(lo + 1, xp.maximum(count - 1, 0))
        frac = pos - lo
        a = xp.take_along_axis(s, lo[:, None], axis=1)[:, 0].astype(xp.float64)
        b = xp.take_along_axis(s, hi[:, None], axis=1)[:, 0].astype(xp.float64)
        with np.errstate(invalid="ignore"):  # inf − inf of an all-masked frame: NaN anyway
            out[i] = xp.where(count > 0, a + frac * (b - a), xp.nan)
    return out


def trimmed_mean(xp, stack, usable, trim):
    """(ny, nx) float32 trimmed mean over axis 0 of the usable values."""
    n = stack.shape[0]
    s = xp.where(usable, stack, xp.asarray(np.inf, dtype=stack.dtype))
    s.sort(axis=0)  # in place: the copy is already ours
    count = usable.sum(axis=0)
    k = xp.floor(trim * count).astype(xp.int64)
    # Prefix sums; only prefixes up to ``count`` (usable, finite values) are used, so the
    # +inf of unusable values at the end of each sorted column never enters a result.
    cs = xp.cumsum(s, axis=0, dtype=xp.float64)
    cs = xp.concatenate([xp.zeros((1,) + s.shape[1:], dtype=xp.float64), cs], axis=0)
    hi = xp.minimum(count - k, n)
    total = (xp.take_along_axis(cs, hi[None], axis=0)[0]
             - xp.take_along_axis(cs, k[None], axis=0)[0])
    kept = count - 2 * k
    return xp.where(kept > 0, total / xp.maximum(kept, 1), 0.0).astype(xp.float32)
