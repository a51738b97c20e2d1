"""Slow NumPy versions of single-frame peak finding and source measurement (host only).

Share only the definitions (flag bits, parameter layout, the aperture sub-sampling and
the Moffat density of :mod:`gpu2mass.kernels.reference.psf`) with the fast paths.
The PSF fit is an independent Gauss-Newton with numerical derivatives and the same
weights at convergence, so it reaches the same optimum (tests: 1e-4 px, 1e-5 relative).
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels.reference.psf import moffat_density
from gpu2mass.kernels.scalar.detect import (
    APERTURE_SUBSAMPLE,
    FLAG_BLENDED,
    FLAG_EDGE,
    FLAG_FIT_FAILED,
    FLAG_MASKED_NEAR,
    FLAG_SATURATED,
    FLAG_SKY,
    MEASURE_COLUMNS,
    MIN_SKY_PIXELS,
    P_BLEND_RADIUS,
    P_FIT_RADIUS,
    P_GAIN,
    P_R_AP,
    P_R_IN,
    P_R_OUT,
    P_SATURATION,
    P_TSNR,
    REJECT_LOW_SNR,
    REJECT_MASKED,
)

__all__ = ["aperture_weights", "find_peaks", "measure_sources", "moffat_pixel_integral_8"]


def moffat_pixel_integral_8(cx, cy, alpha, beta):
    """Unit-flux Moffat integrated over pixels at offsets (cx, cy) px by the 8 x 8
    Gauss-Legendre rule (the fit's template at every distance); broadcasts."""
    t, w = np.polynomial.legendre.leggauss(8)
    cx, cy = np.broadcast_arrays(np.asarray(cx, float), np.asarray(cy, float))
    x = cx[..., None, None] + 0.5 * t[None, :]
    y = cy[..., None, None] + 0.5 * t[:, None]
    return 0.25 * np.einsum("...ji,j,i->...", moffat_density(x, y, alpha, beta), w, w)


def find_peaks(img, mask, threshold):
    """Reference of the peak map: shifted comparisons over the padded stack."""
    img = np.asarray(img, dtype=np.float64)
    _n, ny, nx = img.shape
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ok = img > np.asarray(threshold, dtype=np.float64)[:, None, None]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx == 0 and dy == 0:
                continue
            nb = pad[:, 1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
            before = dy < 0 or (dy == 0 and dx < 0)
            ok &= (img > nb) if before else (img >= nb)
    return (ok & (np.asarray(mask) == 0)).astype(np.uint8)


def aperture_weights(cx, cy, radius):
    """Area fraction of unit pixels at offsets (cx, cy) px inside a circle; broadcasts."""
    cx, cy = np.broadcast_arrays(np.asarray(cx, float), np.asarray(cy, float))
    s = APERTURE_SUBSAMPLE
    sub = (np.arange(s) + 0.5) / s - 0.5
    xx = cx[..., None, None] + sub[None, :]
    yy = cy[..., None, None] + sub[:, None]
    frac = (xx**2 + yy**2 <= radius**2).mean(axis=(-2, -1))
    near = np.hypot(np.maximum(np.abs(cx) - 0.5, 0), np.maximum(np.abs(cy) - 0.5, 0))
    far = np.hypot(np.abs(cx) + 0.5, np.abs(cy) + 0.5)
    return np.where(near >= radius, 0.0, np.where(far <= radius, 1.0, frac))


def _fit(img, use, px, py, sky, var0, gain, x, y, flux, alpha, beta):
    """Gauss-Newton on (x, y, flux), numerical Jacobian; returns x, y, flux, cov or None."""
    d = img[use] - sky
    ex, ey = px[use], py[use]
    h = 1e-5

    def tmpl(xs, ys):
        return moffat_pixel_integral_8(ex - xs, ey - ys, alpha, beta)

    cov = None
    for _ in range(40):
        p = tmpl(x, y)
        model = flux * p
        var = var0 + (np.where(model > 0, model, 0.0) / gain if gain > 0 else np.zeros_like(p))
        jx = flux * (tmpl(x + h, y) - tmpl(x - h, y)) / (2 * h)
        jy = flux * (tmpl(x, y + h) - tmpl(x, y - h)) / (2 * h)
        jac = np.stack([jx, jy, p], axis=1)
        a = jac.T @ (jac / var[:, None])
        b = jac.T @ ((d - model) / var)
        if not np.linalg.det(a) > 0 or not flux > 0:
            return None
        step = np.linalg.solve(a, b)
        big = max(abs(step[0]), abs(step[1]))
        if big > 0.5:
            step[:2] *= 0.5 / big
        x, y, flux = x + step[0], y + step[1], flux + step[2]
        cov = np.linalg.inv(a)
        if big < 1e-7:
            return x, y, flux, cov
    return None


def measure_sources(data, mask, peaks, fi, yi, xi, noise, alpha, beta, params):
    """Reference of the measurement: float64 (N, n_columns) and int32 flags (N,)."""
    data = np.asarray(data, dtype=np.float64)
    _, ny, nx = data.shape
    r_ap, r_in, r_out = params[P_R_AP], params[P_R_IN], params[P_R_OUT]
    gain = params[P_GAIN]
    gy, gx = np.mgrid[0:ny, 0:nx]
    out = np.empty((len(fi), len(MEASURE_COLUMNS)))
    flags = np.zeros(len(fi), dtype=np.int32)
    for i, (f, y0, x0) in enumerate(zip(fi, yi, xi, strict=True)):
        img, bad = data[f], np.asarray(mask[f]) != 0
        var0 = noise[f] ** 2
        flag = 0
        ya, yb, xa, xb = y0 - 1, y0 + 2, x0 - 1, x0 + 2
        if ya < 0 or xa < 0 or yb > ny or xb > nx or bad[ya:yb, xa:xb].any():
            flag |= REJECT_MASKED
        box = np.zeros((3, 3))
        sl = (slice(max(ya, 0), min(yb, ny)), slice(max(xa, 0), min(xb, nx)))
        sub = np.where(bad[sl], 0.0, img[sl])
        box[sl[0].start - ya : sl[0].stop - ya, sl[1].start - xa : sl[1].stop - xa] = sub
        s = box.sum()
        off = np.arange(-1, 2)
        cxo = np.clip((box * off[None, :]).sum() / s, -1, 1) if s > 0 else 0.0
        cyo = np.clip((box * off[:, None]).sum() / s, -1, 1) if s > 0 else 0.0
        xc, yc = x0 + cxo, y0 + cyo
        d2 = (gx - xc) ** 2 + (gy - yc) ** 2
        ann = (d2 >= r_in**2) & (d2 <= r_out**2) & ~bad
        nsky = int(ann.sum())
        sky = float(np.median(img[ann])) if nsky else 0.0
        if nsky < MIN_SKY_PIXELS:
            flag |= FLAG_SKY
        sky_sigma = noise[f]
        if nsky >= MIN_SKY_PIXELS:
            mad = float(np.median(np.abs(img[ann] - sky)))
            if mad > 0:
                sky_sigma = 1.4826 * mad
        var0 = sky_sigma**2
        var_sky = 0.5 * np.pi * var0 / nsky if nsky else 0.0
        if not (s - 9 * sky) / (3 * noise[f]) >= params[P_TSNR]:
            flag |= REJECT_LOW_SNR
        peak = img[y0, x0]
        if flag & (REJECT_MASKED | REJECT_LOW_SNR):
            out[i] = np.nan
            out[i, [0, 1, 6, 9, 11]] = (xc, yc, peak, sky, sky_sigma)
            flags[i] = flag
            continue
        fr = params[P_FIT_RADIUS]
        use = ((gx - x0) ** 2 + (gy - y0) ** 2 <= fr * fr) & ~bad
        frac3 = moffat_pixel_integral_8(gx[ya:yb, xa:xb] - xc, gy[ya:yb, xa:xb] - yc,
                                      alpha[f], beta[f]).sum() if not flag & REJECT_MASKED else 1.0
        res = _fit(img, use, gx, gy, sky, var0, gain, xc, yc, (s - 9 * sky) / frac3,
                   alpha[f], beta[f])
        if res is not None and (abs(res[0] - x0) > 1.5 or abs(res[1] - y0) > 1.5):
            res = None
        if res is None:
            flag |= FLAG_FIT_FAILED
            xs, ys, fit_flux, x_err, y_err = xc, yc, np.nan, np.nan, np.nan
        else:
            xs, ys, fit_flux, cov = res
            x_err, y_err = np.sqrt(cov[0, 0]), np.sqrt(cov[1, 1])
        ra = int(np.ceil(r_ap)) + 1
        ixs, iys = int(np.floor(xs + 0.5)), int(np.floor(ys + 0.5))
        py, px = np.mgrid[iys - ra : iys + ra + 1, ixs - ra : ixs + ra + 1]
        w = aperture_weights(px - xs, py - ys, r_ap)
        inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        if (w[~inside] > 0).any():
            flag |= FLAG_EDGE
        pyc, pxc = np.clip(py, 0, ny - 1), np.clip(px, 0, nx - 1)
        masked = bad[pyc, pxc] & inside
        if (w[masked] > 0).any():
            flag |= FLAG_MASKED_NEAR
        good = inside & ~masked
        ap = float((w[good] * (img[pyc, pxc][good] - sky)).sum())
        area = float(w[good].sum())
        var_ap = area * var0 + area**2 * var_sky + (ap / gain if gain > 0 and ap > 0 else 0.0)
        flux_err = np.sqrt(var_ap)
        rb = params[P_BLEND_RADIUS]
        near = ((gx - x0) ** 2 + (gy - y0) ** 2 <= rb * rb) & (np.asarray(peaks[f]) != 0)
        near[y0, x0] = False
        if near.any():
            flag |= FLAG_BLENDED
        peak = img[y0, x0]
        if peak >= params[P_SATURATION]:
            flag |= FLAG_SATURATED
        total = fit_flux if res is not None else ap
        out[i] = (xs, ys, x_err, y_err, ap, flux_err, peak, ap / flux_err,
                  (peak - sky) / total, sky, fit_flux, sky_sigma)
        flags[i] = flag
    return out, flags
