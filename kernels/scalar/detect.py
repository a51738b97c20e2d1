"""Single-frame detection and photometry (2MAPPS IV.4, facts sheet 3.2) as scalar functions.

Two pieces of pixel work, written once and compiled for the CPU and CUDA drivers:

:func:`is_local_peak`
    Whether a pixel of a (filtered) frame is a local maximum of its 3 x 3 neighbourhood
    above a threshold. Ties (plateaus, e.g. clipped cores) are broken by raster order: a
    pixel must be strictly above the neighbours before it and at least equal to those after
    it, so a flat plateau yields exactly one peak.
:func:`measure_source`
    Everything measured for one candidate on the unfiltered frame: 3 x 3 flux and centroid,
    annulus sky (median), Moffat-template fit of (x, y, flux) by iteratively reweighted
    Gauss-Newton, aperture flux at the fitted position, errors and flags. It writes one row
    of the output arrays.

Flag bits (:data:`FLAG_BITS`; ``REJECT_*`` bits are internal: the caller drops those rows):

===========================  ====  ==========================================================
:data:`FLAG_MASKED_NEAR`        1  a masked pixel lies within the aperture (4") of the source
:data:`FLAG_EDGE`               2  the aperture reaches beyond the frame edge (2MASS: centroid
                                   < 4" from the edge)
:data:`FLAG_SATURATED`          4  peak pixel at or above the given saturation level
:data:`FLAG_BLENDED`            8  another candidate peak within the blend radius
:data:`FLAG_FIT_FAILED`        16  PSF fit did not converge or wandered off: x, y = centroid
:data:`FLAG_SKY`               32  fewer than ``MIN_SKY_PIXELS`` usable annulus pixels
:data:`REJECT_MASKED`         256  a 3 x 3 pixel is masked or off the frame (2MASS rule)
:data:`REJECT_LOW_SNR`        512  3 x 3 flux SNR below Tsnr
===========================  ====  ==========================================================

Geometry: frames are indexed ``[f, y, x]``, pixel centres at integers. Everything is
computed in float64.
"""

from __future__ import annotations

import math

from gpu2mass.kernels._targets import scalar
from gpu2mass.kernels.scalar.elementary import pow_positive

__all__ = [
    "APERTURE_SUBSAMPLE",
    "FLAG_BITS",
    "FLAG_BLENDED",
    "FLAG_EDGE",
    "FLAG_FIT_FAILED",
    "FLAG_MASKED_NEAR",
    "FLAG_SATURATED",
    "FLAG_SKY",
    "MEASURE_COLUMNS",
    "MIN_SKY_PIXELS",
    "N_PARAMS",
    "P_BLEND_RADIUS",
    "P_FIT_RADIUS",
    "P_GAIN",
    "P_R_AP",
    "P_R_IN",
    "P_R_OUT",
    "P_SATURATION",
    "P_TSNR",
    "REJECT_LOW_SNR",
    "REJECT_MASKED",
    "SKY_BUFFER",
    "aperture_weight",
    "is_local_peak",
    "measure_source",
    "moffat_pixel_and_gradient",
    "select_kth",
]

FLAG_MASKED_NEAR = 1
FLAG_EDGE = 2
FLAG_SATURATED = 4
FLAG_BLENDED = 8
FLAG_FIT_FAILED = 16
FLAG_SKY = 32
REJECT_MASKED = 256
REJECT_LOW_SNR = 512
#: Bit -> meaning, for the output ``flags`` column.
FLAG_BITS = {
    FLAG_MASKED_NEAR: "masked pixel within the 4\" aperture",
    FLAG_EDGE: "aperture reaches beyond the frame edge",
    FLAG_SATURATED: "peak at or above the saturation level",
    FLAG_BLENDED: "another candidate within the blend radius",
    FLAG_FIT_FAILED: "PSF fit failed; position is the 3x3 centroid",
    FLAG_SKY: "too few usable sky-annulus pixels",
}

#: Columns of the float64 measurement array, in order.
MEASURE_COLUMNS = ("x", "y", "x_err", "y_err", "flux", "flux_err", "peak", "snr", "fpeak",
                   "sky", "fit_flux", "sky_sigma")
#: Indices into the float64 ``params`` array passed to :func:`measure_source`.
P_R_AP, P_R_IN, P_R_OUT, P_FIT_RADIUS, P_BLEND_RADIUS, P_SATURATION, P_GAIN, P_TSNR = range(8)
N_PARAMS = 8
#: Capacity of the per-source sky buffer (annulus pixels); r_out <= 11 px fits.
SKY_BUFFER = 512
#: Fewer usable annulus pixels than this set FLAG_SKY (and below 1 the sky is 0).
MIN_SKY_PIXELS = 20
#: Sub-samples per axis used to measure a pixel's area inside the aperture circle.
APERTURE_SUBSAMPLE = 16
_MAX_ITER = 40
_STEP_LIMIT = 0.5  # px per Gauss-Newton step: keeps a poor start from jumping to a neighbour
_CONVERGED = 1e-5  # px


@scalar
def is_local_peak(img, f, y, x, threshold):
    """1 if ``img[f, y, x]`` exceeds ``threshold`` and is the 3 x 3 local maximum, else 0.

    Neighbours off the frame are ignored. Ties: strictly above the neighbours earlier in
    raster order, at least equal to the later ones (one peak per plateau). NaN never peaks.
    """
    v = img[f, y, x]
    if not (v > threshold):
        return 0
    ny = img.shape[1]
    nx = img.shape[2]
    for dy in range(-1, 2):
        yy = y + dy
        if yy < 0 or yy >= ny:
            continue
        for dx in range(-1, 2):
            xx = x + dx
            if (dx == 0 and dy == 0) or xx < 0 or xx >= nx:
                continue
            w = img[f, yy, xx]
            if dy < 0 or (dy == 0 and dx < 0):
                if w >= v:
                    return 0
            elif w > v:
                return 0
    return 1


@scalar
def select_kth(buf, n, k):
    """The k-th smallest (0-based) of ``buf[:n]`` by Hoare's quickselect; reorders buf."""
    lo = 0
    hi = n - 1
    while lo < hi:
        pivot = buf[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                t = buf[i]
                buf[i] = buf[j]
                buf[j] = t
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return buf[k]
    return buf[k]


@scalar
def aperture_weight(cx, cy, radius):
    """Fraction of the unit pixel centred (cx, cy) px from the aperture centre inside it.

    1 or 0 when the pixel is wholly inside or outside; otherwise the fraction of
    ``APERTURE_SUBSAMPLE**2`` sub-pixel centres inside the circle (the partial pixels that
    2MASS interpolated; the sub-sampling error of the 4" aperture area is < 0.1 %).
    """
    ax = abs(cx)
    ay = abs(cy)
    near_x = max(ax - 0.5, 0.0)
    near_y = max(ay - 0.5, 0.0)
    if near_x * near_x + near_y * near_y >= radius * radius:
        return 0.0
    far_x = ax + 0.5
    far_y = ay + 0.5
    if far_x * far_x + far_y * far_y <= radius * radius:
        return 1.0
    s = APERTURE_SUBSAMPLE
    r2 = radius * radius
    inside = 0
    for j in range(s):
        yy = cy - 0.5 + (j + 0.5) / s
        for i in range(s):
            xx = cx - 0.5 + (i + 0.5) / s
            if xx * xx + yy * yy <= r2:
                inside += 1
    return inside / (s * s)


@scalar
def moffat_pixel_and_gradient(cx, cy, alpha, beta, rule_dx, rule_dy, rule_w, grad):
    """Unit-flux Moffat pixel integral at pixel-minus-source offset (cx, cy) px, and its
    derivatives with respect to the *source* position, stored in ``grad[0]`` (d/dx_src)
    and ``grad[1]`` (d/dy_src). Always the 8 x 8 Gauss-Legendre rule (fit pixels are within
    ~3 px of the centre, where :mod:`.moffat` uses it too)."""
    n = 8
    inv_a2 = 1.0 / (alpha * alpha)
    norm = (beta - 1.0) / (math.pi * alpha * alpha)
    total = 0.0
    gx = 0.0
    gy = 0.0
    for m in range(n * n):
        x = cx + rule_dx[n, m]
        y = cy + rule_dy[n, m]
        q = 1.0 + (x * x + y * y) * inv_a2
        p = pow_positive(q, -beta)
        w = rule_w[n, m]
        total += w * p
        # d p / d x_pix = -2 beta x / alpha^2 * p / q; the source derivative is its negative.
        d = w * 2.0 * beta * inv_a2 * p / q
        gx += d * x
        gy += d * y
    grad[0] = norm * gx
    grad[1] = norm * gy
    return norm * total


@scalar
def measure_source(data, mask, peaks, f, y0, x0, noise, alpha, beta, params,
                   rule_dx, rule_dy, rule_w, buf, grad, out, flags, i):
    """Measure the candidate at peak pixel (f, y0, x0); write row ``i`` of out and flags.

    Parameters
    ----------
    data
        (n, ny, nx) calibrated, sky-subtracted frames, DN.
    mask
        (n, ny, nx) uint8, non-zero = unusable.
    peaks
        (n, ny, nx) uint8 candidate map (1 at candidate peaks), for the blend test.
    noise, alpha, beta
        The frame's pixel noise (DN) and its Moffat width (px) and index.
    params
        float64 (N_PARAMS,): see the ``P_*`` indices (radii in px, saturation in DN,
        gain in e-/DN, 0 for none; Tsnr).
    rule_dx, rule_dy, rule_w
        The Gauss-Legendre tables of :mod:`gpu2mass.kernels.scalar.moffat`.
    buf
        float64 scratch of at least SKY_BUFFER elements; ``grad`` float64 scratch of 2.
    out, flags
        (N, len(MEASURE_COLUMNS)) float64 and (N,) int32 outputs.
    """
    ny = data.shape[1]
    nx = data.shape[2]
    r_ap = params[P_R_AP]
    r_in = params[P_R_IN]
    r_out = params[P_R_OUT]
    gain = params[P_GAIN]
    var0 = noise * noise
    flag = 0

    # -- 3 x 3 flux and centroid (2MASS: reject if any 3 x 3 pixel is masked) ------------
    s = 0.0
    sx = 0.0
    sy = 0.0
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            yy = y0 + dy
            xx = x0 + dx
            if yy < 0 or yy >= ny or xx < 0 or xx >= nx or mask[f, yy, xx] != 0:
                flag |= REJECT_MASKED
                continue
            v = float(data[f, yy, xx])  # float64 sums on every target (and simulator)
            s += v
            sx += dx * v
            sy += dy * v
    peak = float(data[f, y0, x0])
    cxo = 0.0
    cyo = 0.0
    if s > 0.0:
        cxo = min(max(sx / s, -1.0), 1.0)
        cyo = min(max(sy / s, -1.0), 1.0)
    xc = x0 + cxo
    yc = y0 + cyo

    # -- sky: median of the annulus pixels (by centre distance from the centroid) ---------
    nsky = 0
    ro = math.ceil(r_out) + 1
    for yy in range(y0 - ro, y0 + ro + 1):
        if yy < 0 or yy >= ny:
            continue
        for xx in range(x0 - ro, x0 + ro + 1):
            if xx < 0 or xx >= nx or mask[f, yy, xx] != 0:
                continue
            d2 = (xx - xc) * (xx - xc) + (yy - yc) * (yy - yc)
            if d2 >= r_in * r_in and d2 <= r_out * r_out and nsky < SKY_BUFFER:
                buf[nsky] = data[f, yy, xx]
                nsky += 1
    sky = 0.0
    if nsky > 0:
        half = nsky // 2
        sky = select_kth(buf, nsky, half)
        if nsky % 2 == 0:
            sky = 0.5 * (sky + select_kth(buf, nsky, half - 1))
    if nsky < MIN_SKY_PIXELS:
        flag |= FLAG_SKY
    # Local pixel noise: 1.4826 x the annulus pixels' median absolute deviation. The
    # frame noise (histogram quantiles) also holds large-scale sky structure that the
    # local sky removes, so errors and fit weights use the local value when it is reliable;
    # the detection rules (Tpk, Tsnr) keep the frame noise, as 2MASS did.
    sky_sigma = noise
    if nsky >= MIN_SKY_PIXELS:
        for k in range(nsky):
            buf[k] = abs(buf[k] - sky)
        half = nsky // 2
        mad = select_kth(buf, nsky, half)
        if nsky % 2 == 0:
            mad = 0.5 * (mad + select_kth(buf, nsky, half - 1))
        if mad > 0.0:
            sky_sigma = 1.4826 * mad
    var_sky = 0.0
    if nsky > 0:
        var_sky = 0.5 * math.pi * sky_sigma * sky_sigma / nsky  # variance of a median

    snr3 = (s - 9.0 * sky) / (3.0 * noise)
    if not (snr3 >= params[P_TSNR]):
        flag |= REJECT_LOW_SNR
    var0 = sky_sigma * sky_sigma
    if flag & (REJECT_MASKED | REJECT_LOW_SNR):
        # Dropped by a 2MASS rule: skip the fit and the aperture (most candidates of a
        # 4-sigma matched-filter threshold end here, so this is most of the speed).
        for c in range(out.shape[1]):
            out[i, c] = math.nan
        out[i, 0] = xc
        out[i, 1] = yc
        out[i, 6] = peak
        out[i, 9] = sky
        out[i, 11] = sky_sigma
        flags[i] = flag
        return

    # -- PSF-template fit of (x, y, flux), sky fixed: iteratively reweighted Gauss-Newton --
    fr = params[P_FIT_RADIUS]
    rf = math.floor(fr)
    xs = xc
    ys = yc
    # Start: the 3 x 3 flux over the template's 3 x 3 fraction at the centroid.
    frac3 = 0.0
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            frac3 += moffat_pixel_and_gradient(x0 + dx - xs, y0 + dy - ys, alpha, beta,
                                               rule_dx, rule_dy, rule_w, grad)
    flux = (s - 9.0 * sky) / frac3
    converged = False
    a00 = 1.0
    a01 = 0.0
    a02 = 0.0
    a11 = 1.0
    a12 = 0.0
    a22 = 1.0
    for _ in range(_MAX_ITER):
        a00 = 0.0
        a01 = 0.0
        a02 = 0.0
        a11 = 0.0
        a12 = 0.0
        a22 = 0.0
        b0 = 0.0
        b1 = 0.0
        b2 = 0.0
        for yy in range(y0 - rf, y0 + rf + 1):
            if yy < 0 or yy >= ny:
                continue
            for xx in range(x0 - rf, x0 + rf + 1):
                if xx < 0 or xx >= nx or mask[f, yy, xx] != 0:
                    continue
                if (xx - x0) * (xx - x0) + (yy - y0) * (yy - y0) > fr * fr:
                    continue
                p = moffat_pixel_and_gradient(xx - xs, yy - ys, alpha, beta,
                                              rule_dx, rule_dy, rule_w, grad)
                model = flux * p
                var = var0
                if gain > 0.0 and model > 0.0:
                    var += model / gain
                w = 1.0 / var
                r = data[f, yy, xx] - sky - model
                j0 = flux * grad[0]
                j1 = flux * grad[1]
                j2 = p
                a00 += w * j0 * j0
                a01 += w * j0 * j1
                a02 += w * j0 * j2
                a11 += w * j1 * j1
                a12 += w * j1 * j2
                a22 += w * j2 * j2
                b0 += w * j0 * r
                b1 += w * j1 * r
                b2 += w * j2 * r
        # Solve the symmetric 3 x 3 system by Cramer's rule.
        c00 = a11 * a22 - a12 * a12
        c01 = a02 * a12 - a01 * a22
        c02 = a01 * a12 - a02 * a11
        det = a00 * c00 + a01 * c01 + a02 * c02
        if not (det > 0.0) or not (flux > 0.0):
            break
        c11 = a00 * a22 - a02 * a02
        c12 = a01 * a02 - a00 * a12
        c22 = a00 * a11 - a01 * a01
        d0 = (c00 * b0 + c01 * b1 + c02 * b2) / det
        d1 = (c01 * b0 + c11 * b1 + c12 * b2) / det
        d2 = (c02 * b0 + c12 * b1 + c22 * b2) / det
        step = max(abs(d0), abs(d1))
        if step > _STEP_LIMIT:
            d0 *= _STEP_LIMIT / step
            d1 *= _STEP_LIMIT / step
        xs += d0
        ys += d1
        flux += d2
        if abs(xs - x0) > 1.5 or abs(ys - y0) > 1.5:
            break
        if step < _CONVERGED:
            converged = True
            break
    fit_flux = flux
    x_err = math.nan
    y_err = math.nan
    if converged:
        c00 = a11 * a22 - a12 * a12
        c11 = a00 * a22 - a02 * a02
        det = a00 * c00 + a01 * (a02 * a12 - a01 * a22) + a02 * (a01 * a12 - a02 * a11)
        x_err = math.sqrt(c00 / det)
        y_err = math.sqrt(c11 / det)
    else:
        flag |= FLAG_FIT_FAILED
        xs = xc
        ys = yc
        fit_flux = math.nan

    # -- aperture photometry at the fitted position --------------------------------------
    ra = math.ceil(r_ap) + 1
    ixs = math.floor(xs + 0.5)
    iys = math.floor(ys + 0.5)
    ap = 0.0
    area = 0.0
    for yy in range(iys - ra, iys + ra + 1):
        for xx in range(ixs - ra, ixs + ra + 1):
            wgt = aperture_weight(xx - xs, yy - ys, r_ap)
            if wgt == 0.0:
                continue
            if yy < 0 or yy >= ny or xx < 0 or xx >= nx:
                flag |= FLAG_EDGE
                continue
            if mask[f, yy, xx] != 0:
                flag |= FLAG_MASKED_NEAR
                continue
            ap += wgt * (data[f, yy, xx] - sky)
            area += wgt
    var_ap = area * var0 + area * area * var_sky
    if gain > 0.0 and ap > 0.0:
        var_ap += ap / gain
    flux_err = math.sqrt(var_ap)

    # -- blends: another candidate peak within the blend radius ---------------------------
    rb = params[P_BLEND_RADIUS]
    irb = math.floor(rb)
    for yy in range(y0 - irb, y0 + irb + 1):
        if yy < 0 or yy >= ny:
            continue
        for xx in range(x0 - irb, x0 + irb + 1):
            if xx < 0 or xx >= nx or (xx == x0 and yy == y0):
                continue
            if peaks[f, yy, xx] != 0 and (xx - x0) * (xx - x0) + (yy - y0) * (yy - y0) <= rb * rb:
                flag |= FLAG_BLENDED
    if peak >= params[P_SATURATION]:
        flag |= FLAG_SATURATED

    total = fit_flux if converged else ap
    out[i, 0] = xs
    out[i, 1] = ys
    out[i, 2] = x_err
    out[i, 3] = y_err
    out[i, 4] = ap
    out[i, 5] = flux_err
    out[i, 6] = peak
    out[i, 7] = ap / flux_err
    out[i, 8] = (peak - sky) / total
    out[i, 9] = sky
    out[i, 10] = fit_flux
    out[i, 11] = sky_sigma
    flags[i] = flag
