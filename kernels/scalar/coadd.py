"""Scalar math of the Atlas coadd: weighted mean of resampled frames with outlier rejection.

One output (Atlas) pixel. Each contributing frame ``k`` brings a resampled value
``vals[k, r, c]`` (NaN: no contribution), its variance factor ``vfac[k, r, c]`` (output
variance in units of the frame's per-pixel variance, from the resampling kernel), the
frame's background offset ``offsets[k]`` (subtracted) and its weight ``weights[k] = 1/σ_k²``
(σ_k: the frame's per-pixel noise, DN).

Combination: ``m = Σ w x / Σ w`` with ``x = v − offset``; its variance
``Σ w² σ² q / (Σ w)² = Σ w q / (Σ w)²``.

Outlier rejection (cosmic rays, hot pixels that reached the frames unmasked), in two
passes. :func:`find_outlier`: at each pixel the highest contribution ``x_max`` is compared
with the weighted mean ``m_rest`` of the others and is an outlier when

    x_max − m_rest > reject_sigma · sqrt(σ_max² + σ_rest²) + reject_fraction · |m_rest|

(σ_max² = q_max / w_max: the noise of that contribution; σ_rest²: the variance of
``m_rest``). The first term is a significance test against the noise; the second protects
stars, whose resampled value differs from frame to frame with the sub-pixel phase of the
2" sampling and the seeing (tens of per cent near the peak). Only the highest contribution
is tested (the transients that matter hit one frame), and only where at least
``min_frames`` frames contribute. :func:`combine_pixel` then leaves out frame ``k`` at a
pixel when ``k`` was the outlier at that pixel or at any pixel within ``grow`` rows and
columns: the kernel spreads a one-pixel hit in a frame over ~3×3 output pixels, whose
fainter edges fall below the threshold on their own.
"""

from __future__ import annotations

import math

from gpu2mass.kernels._targets import scalar

__all__ = ["combine_pixel", "find_outlier", "outlier_and_mean"]


@scalar
def find_outlier(r, c, vals, vfac, offsets, weights, boxes, reject_sigma, reject_fraction,
                 min_frames):
    """Index of the frame whose contribution at output pixel (r, c) is an outlier, or −1.

    Parameters
    ----------
    r, c
        Output row and column.
    vals, vfac
        float32 (n, H, W): resampled values (DN per output pixel, NaN = no contribution)
        and their variance factors.
    offsets, weights
        float64 (n,): background offset subtracted from each frame, DN; weight 1/σ_k².
    boxes
        int64 (n, 4): (row0, row1, col0, col1) of each frame's resampled values; outside
        its box a frame does not contribute and ``vals`` is not read there (the resampling
        need not fill it).
    reject_sigma, reject_fraction
        Rejection threshold (see the module docstring); ``reject_sigma ≤ 0``: never.
    min_frames
        Least number of contributions for the test (≥ 2).
    """
    k, _m, _s, _n = outlier_and_mean(r, c, vals, vfac, offsets, weights, boxes, reject_sigma,
                                     reject_fraction, min_frames)
    return k


@scalar
def outlier_and_mean(r, c, vals, vfac, offsets, weights, boxes, reject_sigma, reject_fraction,
                     min_frames):
    """:func:`find_outlier` and, from the same sums, the combination of every contributing
    frame (what :func:`combine_pixel` returns where no outlier is near).

    Returns
    -------
    (outlier, value, sigma, count)
        The outlier's frame index or −1; the mean of all contributions (NaN if none), its
        noise (DN) and their number. Arguments as for :func:`find_outlier`.
    """
    num = 0.0
    den = 0.0
    var = 0.0
    count = 0
    k_max = -1
    x_max = -math.inf
    w_max = 0.0
    q_max = 0.0
    for k in range(vals.shape[0]):
        if r < boxes[k, 0] or r >= boxes[k, 1] or c < boxes[k, 2] or c >= boxes[k, 3]:
            continue
        v = vals[k, r, c]
        if math.isnan(v):  # frame k does not reach this pixel
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
            k_max = k
    if count == 0:
        return -1, math.nan, math.nan, 0
    mean = num / den
    sigma = math.sqrt(max(var, 0.0)) / den
    if not (reject_sigma > 0.0) or count < min_frames or count < 2:
        return -1, mean, sigma, count
    den_rest = den - w_max
    m_rest = (num - w_max * x_max) / den_rest
    var_rest = (var - w_max * q_max) / (den_rest * den_rest)
    thr = (reject_sigma * math.sqrt(q_max / w_max + max(var_rest, 0.0))
           + reject_fraction * abs(m_rest))
    if x_max - m_rest > thr:
        return k_max, mean, sigma, count
    return -1, mean, sigma, count


@scalar
def combine_pixel(r, c, vals, vfac, offsets, weights, boxes, outlier, grow):
    """Combine the frames at output pixel (r, c), leaving out the outliers found around it.

    ``outlier`` int32 (H, W): :func:`find_outlier` of every pixel; frame k is left out here
    if it is the outlier of any pixel within ``grow`` rows and columns (clipped at the
    edges). Other arguments as for :func:`find_outlier`.

    Returns
    -------
    (value, sigma, count, dropped)
        Mean (NaN if nothing is left), its noise (DN), the number of frames kept, and the
        number of contributing frames left out.
    """
    h = outlier.shape[0]
    w_ = outlier.shape[1]
    r0 = max(r - grow, 0)
    r1 = min(r + grow + 1, h)
    c0 = max(c - grow, 0)
    c1 = min(c + grow + 1, w_)
    # Most pixels have no outlier around them: look once, test frames only if there is one.
    nearby = False
    for rr in range(r0, r1):
        for cc in range(c0, c1):
            if outlier[rr, cc] >= 0:
                nearby = True
    num = 0.0
    den = 0.0
    var = 0.0
    count = 0
    dropped = 0
    for k in range(vals.shape[0]):
        if r < boxes[k, 0] or r >= boxes[k, 1] or c < boxes[k, 2] or c >= boxes[k, 3]:
            continue
        v = vals[k, r, c]
        if math.isnan(v):
            continue
        out = False
        if nearby:
            for rr in range(r0, r1):
                for cc in range(c0, c1):
                    if outlier[rr, cc] == k:
                        out = True
        if out:
            dropped += 1
            continue
        w = weights[k]
        num += w * (v - offsets[k])
        den += w
        var += w * vfac[k, r, c]
        count += 1
    if count == 0:
        return math.nan, math.nan, 0, dropped
    return num / den, math.sqrt(max(var, 0.0)) / den, count, dropped
