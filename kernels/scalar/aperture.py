"""Multi-aperture photometry of one position on one frame (facts sheet 3.4) as scalar math.

:func:`measure_position` does all the pixel work for one (frame, x, y):

1. **Sky.** The usable pixels whose *centres* lie between ``r_in`` and ``r_out`` of the
   position (2MASS: annulus pixels included or excluded by centre distance) are collected,
   sorted (:func:`heap_sort`), and averaged after dropping the lowest and the highest
   ``trim`` fraction (:func:`trimmed_mean`): a trimmed mean, between the mean (trim 0) and
   the median (trim 0.5). The noise is half the distance between the 15.87 % and 84.13 %
   quantiles of the same pixels (the 2MASS frame-noise definition, facts sheet 3.2).
   Masked and non-finite pixels are never used.
2. **Apertures.** For every radius, the sum over the pixels that overlap the circle of
   ``(value − sky) × area of the pixel inside the circle``, with the EXACT circle/square
   overlap area (:func:`pixel_overlap`, closed form: no sub-sampling, no interpolation), and
   the total measured area ``npix``. A masked, non-finite or off-frame pixel is replaced by
   the pixel nearest to its mirror image through the position (the point-symmetric
   counterpart, as SExtractor's ``MASK_TYPE CORRECT``; :data:`FLAG_FILLED`); when that one
   is unusable too, the pixel contributes neither flux nor area, so ``npix < pi r**2``
   says that an aperture is incomplete. (A star's light is point-symmetric to within the
   half-pixel of the nearest-pixel mirror; the guard circle keeps the steep core out of
   this: a frame with a masked pixel there is excluded by the caller.)
3. **Flags** (:data:`FLAG_BITS`): masked pixel overlapping the guard circle (2MASS: 4"),
   a saturated one (mask bit :data:`MASK_SATURATED`), guard circle over the frame edge,
   too few sky pixels, an incomplete aperture, position off the frame.

Pixel centres are at integer (x, y); pixel (ix, iy) covers [ix − ½, ix + ½] × [iy − ½, iy + ½].
Everything is computed in float64.
"""

from __future__ import annotations

# int(math.floor(...)): an integer on every target (the CUDA simulator runs this as Python).
# ruff: noqa: RUF046
import math

from gpu2mass.kernels._targets import scalar

__all__ = [
    "FLAG_BITS",
    "FLAG_EDGE",
    "FLAG_FILLED",
    "FLAG_INCOMPLETE",
    "FLAG_MASKED_NEAR",
    "FLAG_OFF_FRAME",
    "FLAG_SATURATED_NEAR",
    "FLAG_SKY",
    "MASK_SATURATED",
    "MAX_SKY_RADIUS_PX",
    "SKY_BUFFER",
    "circle_quadrant_area",
    "heap_sort",
    "measure_position",
    "pixel_overlap",
    "sorted_quantile",
    "trimmed_mean",
]

FLAG_MASKED_NEAR = 1
FLAG_EDGE = 2
FLAG_SKY = 4
FLAG_INCOMPLETE = 8
FLAG_OFF_FRAME = 16
FLAG_SATURATED_NEAR = 32
FLAG_FILLED = 64
#: Bit -> meaning of the per-position ``flags``.
FLAG_BITS = {
    FLAG_MASKED_NEAR: "a masked pixel overlaps the guard circle (2MASS: within 4\")",
    FLAG_EDGE: "the guard circle crosses the frame edge (2MASS: centre < 4\" from the edge)",
    FLAG_SKY: "fewer than min_sky usable sky-annulus pixels (none: sky and fluxes NaN)",
    FLAG_INCOMPLETE: "some aperture lost area to unusable pixels whose mirror is unusable",
    FLAG_OFF_FRAME: "position not finite or outside the frame: nothing measured (NaN)",
    FLAG_SATURATED_NEAR: "a pixel with mask bit MASK_SATURATED overlaps the guard circle",
    FLAG_FILLED: "unusable aperture pixels were replaced by their mirror pixels",
}
#: Mask bit marking a saturated pixel (any non-zero mask value is unusable; this bit also
#: sets FLAG_SATURATED_NEAR when it lies in the guard circle).
MASK_SATURATED = 2
#: Capacity of the per-position sky buffer (pixels).
SKY_BUFFER = 2048
#: Largest sky radius whose annulus always fits the buffer (pi (24 + 0.71)^2 < 2048).
MAX_SKY_RADIUS_PX = 24.0


@scalar
def heap_sort(buf, n):
    """Sort ``buf[:n]`` in place, ascending (heapsort: no recursion, no allocation)."""
    # Build a max-heap.
    start = n // 2 - 1
    while start >= 0:
        root = start
        while True:
            child = 2 * root + 1
            if child >= n:
                break
            if child + 1 < n and buf[child] < buf[child + 1]:
                child += 1
            if buf[root] < buf[child]:
                t = buf[root]
                buf[root] = buf[child]
                buf[child] = t
                root = child
            else:
                break
        start -= 1
    end = n - 1
    while end > 0:
        t = buf[0]
        buf[0] = buf[end]
        buf[end] = t
        root = 0
        while True:
            child = 2 * root + 1
            if child >= end:
                break
            if child + 1 < end and buf[child] < buf[child + 1]:
                child += 1
            if buf[root] < buf[child]:
                t = buf[root]
                buf[root] = buf[child]
                buf[child] = t
                root = child
            else:
                break
        end -= 1


@scalar
def sorted_quantile(buf, n, p):
    """Quantile ``p`` of the sorted ``buf[:n]``, linear interpolation at ``p (n − 1)``
    (NumPy's default ``linear`` method)."""
    pos = p * (n - 1)
    i = int(math.floor(pos))
    if i >= n - 1:
        return buf[n - 1]
    f = pos - i
    return buf[i] + f * (buf[i + 1] - buf[i])


@scalar
def trimmed_mean(buf, n, trim):
    """Mean of the sorted ``buf[:n]`` without its ``floor(trim n)`` lowest and highest
    values; the median when nothing would be left."""
    lo = int(math.floor(trim * n))
    hi = n - lo
    if hi - lo < 1:
        return sorted_quantile(buf, n, 0.5)
    s = 0.0
    for j in range(lo, hi):
        s += buf[j]
    return s / (hi - lo)


@scalar
def _segment_integral(x, r):
    """∫_0^x sqrt(r² − t²) dt for 0 <= x <= r."""
    q = max(r * r - x * x, 0.0)
    u = min(x / r, 1.0)
    return 0.5 * (x * math.sqrt(q) + r * r * math.asin(u))


@scalar
def circle_quadrant_area(x, y, r):
    """Signed area ∫_0^x ∫_0^y [X² + Y² <= r²] dY dX of the disc of radius r about 0.

    Odd in x and in y, so the area of any axis-aligned rectangle inside the disc is the
    alternating sum over its four corners (:func:`pixel_overlap`).
    """
    sx = 1.0 if x >= 0.0 else -1.0
    sy = 1.0 if y >= 0.0 else -1.0
    ax = min(abs(x), r)
    ay = min(abs(y), r)
    # Below Y = ay the disc reaches X = xc; up to there the column height is ay.
    q = r * r - ay * ay
    xc = min(math.sqrt(q) if q > 0.0 else 0.0, ax)
    return sx * sy * (ay * xc + _segment_integral(ax, r) - _segment_integral(xc, r))


@scalar
def pixel_overlap(dx, dy, r):
    """Exact area of the unit pixel centred (dx, dy) from a circle's centre inside the
    circle of radius r (0 … 1)."""
    ax = abs(dx)
    ay = abs(dy)
    nx = max(ax - 0.5, 0.0)
    ny = max(ay - 0.5, 0.0)
    if nx * nx + ny * ny >= r * r:
        return 0.0
    fx = ax + 0.5
    fy = ay + 0.5
    if fx * fx + fy * fy <= r * r:
        return 1.0
    x0 = dx - 0.5
    x1 = dx + 0.5
    y0 = dy - 0.5
    y1 = dy + 0.5
    a = (circle_quadrant_area(x1, y1, r) - circle_quadrant_area(x0, y1, r)
         - circle_quadrant_area(x1, y0, r) + circle_quadrant_area(x0, y0, r))
    return min(max(a, 0.0), 1.0)


@scalar
def measure_position(frames, mask, k, x, y, radii, r_in, r_out, guard, trim, min_sky,
                     buf, flux, npix, sky_out, sigma_out, nsky_out, flags, i):
    """Measure position ``i`` at (x, y) on frame ``k``; write row ``i`` of the outputs.

    Parameters
    ----------
    frames
        (n, ny, nx) float32/float64 frames, DN.
    mask
        uint8 (m, ny, nx), m = 1 (shared) or n; non-zero = unusable,
        :data:`MASK_SATURATED` bit = saturated.
    radii
        float64 (R,) aperture radii, px, increasing.
    r_in, r_out, guard
        Sky annulus radii and guard radius (flags), px.
    trim
        Fraction of the annulus values dropped at each end before averaging.
    min_sky
        Fewer usable annulus pixels set :data:`FLAG_SKY`.
    buf
        float64 scratch, at least :data:`SKY_BUFFER` elements.
    flux, npix
        (M, R) float64 outputs: sky-subtracted sums (DN) and good areas (px).
    sky_out, sigma_out, nsky_out, flags
        (M,) outputs: sky (DN/px), sky noise (DN/px), annulus pixel count, flag bits.
    """
    ny = frames.shape[1]
    nx = frames.shape[2]
    m = k if mask.shape[0] > 1 else 0
    nr = radii.shape[0]
    flag = 0
    for j in range(nr):
        flux[i, j] = 0.0
        npix[i, j] = 0.0
    if not (x >= -0.5 and x <= nx - 0.5 and y >= -0.5 and y <= ny - 0.5):
        for j in range(nr):
            flux[i, j] = math.nan
        sky_out[i] = math.nan
        sigma_out[i] = math.nan
        nsky_out[i] = 0
        flags[i] = FLAG_OFF_FRAME
        return

    # -- sky: trimmed mean of the annulus pixels (by centre distance) ---------------------
    nsky = 0
    y0 = max(int(math.ceil(y - r_out)), 0)
    y1 = min(int(math.floor(y + r_out)), ny - 1)
    x0 = max(int(math.ceil(x - r_out)), 0)
    x1 = min(int(math.floor(x + r_out)), nx - 1)
    ri2 = r_in * r_in
    ro2 = r_out * r_out
    cap = buf.shape[0]
    for yy in range(y0, y1 + 1):
        ddy = (yy - y) * (yy - y)
        for xx in range(x0, x1 + 1):
            d2 = (xx - x) * (xx - x) + ddy
            if d2 < ri2 or d2 > ro2 or mask[m, yy, xx] != 0:
                continue
            v = float(frames[k, yy, xx])
            if not math.isfinite(v) or nsky >= cap:
                continue
            buf[nsky] = v
            nsky += 1
    sky = math.nan
    sigma = math.nan
    if nsky > 0:
        heap_sort(buf, nsky)
        sky = trimmed_mean(buf, nsky, trim)
        sigma = 0.5 * (sorted_quantile(buf, nsky, 0.8413447460685429)
                       - sorted_quantile(buf, nsky, 0.15865525393145707))
    if nsky < min_sky:
        flag |= FLAG_SKY

    # -- apertures: exact overlap areas ---------------------------------------------------
    rmax = max(radii[nr - 1], guard)
    rap2 = radii[nr - 1] * radii[nr - 1]
    g2 = guard * guard
    ya = int(math.floor(y - rmax - 0.5))
    yb = int(math.ceil(y + rmax + 0.5))
    xa = int(math.floor(x - rmax - 0.5))
    xb = int(math.ceil(x + rmax + 0.5))
    for yy in range(ya, yb + 1):
        dy = yy - y
        ey = max(abs(dy) - 0.5, 0.0)
        for xx in range(xa, xb + 1):
            dx = xx - x
            ex = max(abs(dx) - 0.5, 0.0)
            dn2 = ex * ex + ey * ey
            if dn2 >= rmax * rmax:
                continue
            inside = yy >= 0 and yy < ny and xx >= 0 and xx < nx
            bad = not inside
            v = 0.0
            if inside:
                mv = mask[m, yy, xx]
                v = float(frames[k, yy, xx])
                if mv != 0 or not math.isfinite(v):
                    bad = True
                    if dn2 < g2:
                        flag |= FLAG_MASKED_NEAR
                        if mv & MASK_SATURATED:
                            flag |= FLAG_SATURATED_NEAR
            elif dn2 < g2:
                flag |= FLAG_EDGE
            if bad:
                # The pixel nearest to the mirror image of this one through (x, y).
                mx = int(math.floor(2.0 * x - xx + 0.5))
                my = int(math.floor(2.0 * y - yy + 0.5))
                if my < 0 or my >= ny or mx < 0 or mx >= nx or mask[m, my, mx] != 0:
                    continue
                v = float(frames[k, my, mx])
                if not math.isfinite(v):
                    continue
                if dn2 < rap2:
                    flag |= FLAG_FILLED
            v -= sky
            for j in range(nr):
                r = radii[j]
                if dn2 >= r * r:
                    continue
                w = pixel_overlap(dx, dy, r)
                flux[i, j] += w * v
                npix[i, j] += w
    for j in range(nr):
        r = radii[j]
        if npix[i, j] < math.pi * r * r * (1.0 - 1e-9):
            flag |= FLAG_INCOMPLETE
        if nsky == 0:
            flux[i, j] = math.nan
    sky_out[i] = sky
    sigma_out[i] = sigma
    nsky_out[i] = nsky
    flags[i] = flag
