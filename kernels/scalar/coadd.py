"""Scalar math of the Atlas coadd: weighted mean of resampled frames with outlier rejection.

One output (Atlas) pixel. Each contributing frame ``k`` brings a resampled value
``vals[k, r, c]`` (NaN: no contribution), its variance factor ``vfac[k, r, c]`` (output
variance in units of the frame's per-pixel variance, from the resampling kernel), the
frame's background offset ``offsets[k]`` (subtracted) and its weight ``weights[k] = 1/σ_k²``
(σ_k: the frame's per-pixel noise, DN).

Combination: ``m = Σ w x / Σ w`` with ``x = v − offset``; its variance
``Σ w² σ² q / (Σ w)² = Σ w q / (Σ w)²``.

Outlier rejection (cosmic rays, hot pixels that reached the frames unmasked): the highest
contribution ``x_max`` is compared with the weighted mean ``m_rest`` of the others and
dropped when

    x_max − m_rest > reject_sigma · sqrt(σ_max² + σ_rest²) + reject_fraction · |m_rest|

(σ_max² = q_max / w_max: the noise of that contribution; σ_rest²: the variance of
``m_rest``). The first term is a significance test against the noise; the second protects
stars, whose resampled value differs from frame to frame with the sub-pixel phase of the
2" sampling and the seeing (tens of per cent near the peak). Only the single highest
contribution can go (the transients that matter hit one frame), and only when at least
``min_frames`` frames contribute, so that ``m_rest`` is defined by at least one frame.
"""

from __future__ import annotations

import math

from gpu2mass.kernels._targets import scalar

__all__ = ["combine_pixel"]


@scalar
def combine_pixel(r, c, vals, vfac, offsets, weights, reject_sigma, reject_fraction, min_frames):
    """Combine the frames at output pixel (r, c).

    Parameters
    ----------
    r, c
        Output row and column.
    vals, vfac
        float32 (n, H, W): resampled values (DN per output pixel, NaN = no contribution)
        and their variance factors.
    offsets, weights
        float64 (n,): background offset subtracted from each frame, DN; weight 1/σ_k².
    reject_sigma, reject_fraction
        Rejection threshold (see the module docstring); ``reject_sigma ≤ 0`` disables it.
    min_frames
        Least number of contributions for the rejection test.

    Returns
    -------
    (value, sigma, count, rejected)
        Mean (NaN if nothing contributes), its noise (DN), the number of frames kept, and 1
        if the highest contribution was rejected else 0.
    """
    num = 0.0
    den = 0.0
    var = 0.0
    count = 0
    x_max = -math.inf
    w_max = 0.0
    q_max = 0.0
    for k in range(vals.shape[0]):
        v = vals[k, r, c]
        if not (v == v):  # NaN: frame k does not reach this pixel
            continue
        x = v - offsets[k]
        w = weights[k]
        q = vfac[k, r, c]
        num += w * x
        den += w
        var += w * q
        count += 1
        if x > x_max:
            x_max = x
            w_max = w
            q_max = q
    if count == 0:
        return math.nan, math.nan, 0, 0
    rejected = 0
    if reject_sigma > 0.0 and count >= min_frames and count >= 2:
        den_rest = den - w_max
        m_rest = (num - w_max * x_max) / den_rest
        var_rest = (var - w_max * q_max) / (den_rest * den_rest)
        thr = (reject_sigma * math.sqrt(q_max / w_max + max(var_rest, 0.0))
               + reject_fraction * abs(m_rest))
        if x_max - m_rest > thr:
            num -= w_max * x_max
            den = den_rest
            var -= w_max * q_max
            count -= 1
            rejected = 1
    return num / den, math.sqrt(max(var, 0.0)) / den, count, rejected
