"""NumPy reference of the Atlas coadd (slow, host only), written independently of the
scalar code: whole-array weighted sums, the highest contribution found with ``nanargmax``."""

from __future__ import annotations

import numpy as np

__all__ = ["combine_frames"]


def combine_frames(vals, vfac, offsets, weights, reject_sigma, reject_fraction, min_frames):
    """Reference of :func:`gpu2mass.kernels.coadd.combine_frames`."""
    v = vals.astype(np.float64) - offsets[:, None, None]
    q = vfac.astype(np.float64)
    ok = np.isfinite(v)
    w = np.where(ok, weights[:, None, None], 0.0)
    x = np.where(ok, v, 0.0)
    num = (w * x).sum(axis=0)
    den = w.sum(axis=0)
    var = (w * np.where(ok, q, 0.0)).sum(axis=0)
    count = ok.sum(axis=0)
    has = count > 0
    kmax = np.argmax(np.where(ok, v, -np.inf), axis=0)
    x_max = np.take_along_axis(x, kmax[None], 0)[0]
    w_max = np.take_along_axis(w, kmax[None], 0)[0]
    q_max = np.take_along_axis(np.where(ok, q, 0.0), kmax[None], 0)[0]
    rejected = np.zeros(count.shape, bool)
    if reject_sigma > 0:
        test = has & (count >= max(min_frames, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            den_rest = den - w_max
            m_rest = (num - w_max * x_max) / den_rest
            var_rest = np.maximum((var - w_max * q_max) / den_rest**2, 0.0)
            thr = reject_sigma * np.sqrt(q_max / w_max + var_rest) + reject_fraction * np.abs(m_rest)
            rejected = test & (x_max - m_rest > thr)
    num = np.where(rejected, num - w_max * x_max, num)
    den = np.where(rejected, den - w_max, den)
    var = np.where(rejected, var - w_max * q_max, var)
    count = count - rejected
    with np.errstate(invalid="ignore", divide="ignore"):
        data = np.where(has, num / den, np.nan)
        sigma = np.where(has, np.sqrt(np.maximum(var, 0.0)) / den, np.nan)
    return (data.astype(np.float32), sigma.astype(np.float32), count.astype(np.int32),
            rejected.astype(np.uint8))
