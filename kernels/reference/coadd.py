"""NumPy reference of the Atlas coadd (slow, host only), written independently of the
scalar code: whole-array weighted sums, the highest contribution found with ``argmax``,
the outliers grown with a maximum filter per frame."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter

__all__ = ["combine_frames"]


def combine_frames(vals, vfac, offsets, weights, boxes, reject_sigma, reject_fraction, min_frames,
                   grow):
    """Reference of :func:`gpu2mass.kernels.coadd.combine_frames`."""
    n, h, w_ = vals.shape
    rr, cc = np.mgrid[0:h, 0:w_]
    inside = np.stack([(rr >= b[0]) & (rr < b[1]) & (cc >= b[2]) & (cc < b[3]) for b in boxes])
    v = np.where(inside, vals.astype(np.float64), np.nan) - offsets[:, None, None]
    q = vfac.astype(np.float64)
    ok = np.isfinite(v)
    w = np.where(ok, weights[:, None, None], 0.0)
    x = np.where(ok, v, 0.0)
    qq = np.where(ok, q, 0.0)
    outlier = np.zeros(ok.shape, bool)
    if reject_sigma > 0:
        num, den, var = (w * x).sum(0), w.sum(0), (w * qq).sum(0)
        count = ok.sum(0)
        kmax = np.argmax(np.where(ok, v, -np.inf), axis=0)
        x_max, w_max, q_max = (np.take_along_axis(a, kmax[None], 0)[0] for a in (x, w, qq))
        with np.errstate(invalid="ignore", divide="ignore"):
            den_rest = den - w_max
            m_rest = (num - w_max * x_max) / den_rest
            var_rest = np.maximum((var - w_max * q_max) / den_rest**2, 0.0)
            thr = reject_sigma * np.sqrt(q_max / w_max + var_rest) + reject_fraction * np.abs(m_rest)
            hit = (count >= max(min_frames, 2)) & (x_max - m_rest > thr)
        outlier[kmax[hit], *np.nonzero(hit)] = True
    size = 2 * int(grow) + 1
    drop = np.stack([maximum_filter(outlier[k], size=size, mode="constant") for k in range(n)]) & ok
    keep = ok & ~drop
    w = np.where(keep, w, 0.0)
    num, den, var = (w * x).sum(0), w.sum(0), (w * qq).sum(0)
    count = keep.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        data = np.where(count > 0, num / den, np.nan)
        sigma = np.where(count > 0, np.sqrt(np.maximum(var, 0.0)) / den, np.nan)
    return (data.astype(np.float32), sigma.astype(np.float32), count.astype(np.int32),
            drop.sum(0).astype(np.uint8))
