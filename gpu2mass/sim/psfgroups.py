"""Seeded synthetic groups of blended point sources on stacks of frames, with their truth.

Inputs for :func:`gpu2mass.kernels.psffit.fit_psf_groups` (and its tests and benchmark),
made the way the PSF-photometry step will cut them (facts sheet 3.3): per group, ``n_frames``
stamps of ``size`` x ``size`` camera pixels around the group, each frame dithered by a
random sub-pixel offset and a small rotation relative to the group's common coordinates
(u, v) (camera pixels, the group's centre at 0), its own Moffat seeing (alpha, beta) and
throughput; point sources rendered with :func:`gpu2mass.kernels.render_psf_stamps` (the
pixel-integrated Moffat, independent of the fitting code); Gaussian background noise of
``noise`` DN per pixel; weights 1/noise^2 on the 2MASS data region (pixels within
``data_radius`` camera pixels of any source's *initial* position), 0 elsewhere.

``make_psf_groups(rng, n_groups, ...)`` returns ``(inputs, truth)``: ``inputs`` the keyword
arguments of ``fit_psf_groups`` (stamps, weights, frame_maps, psf_params, flux_scale, init,
nsrc), ``truth`` a dict with ``params`` (G, K, 3) true flux, u, v (NaN in unused slots),
``model`` (G, F, S, S) float64 noise-free stamps, ``sigma_flux`` (G, K) the ideal flux error
of each source were it alone (Cramér-Rao, weights of the data region), ``noise`` (G, F) DN.
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_psf_groups"]


def _place(rng, n, sep_range):
    """n positions (n, 2) near 0: each next one sep_range px from the previous, no closer
    than sep_range[0] to any other, all within 3.5 px of the first."""
    for _ in range(1000):  # a chain that walks into a corner starts again
        pos = np.zeros((n, 2))
        k = 1
        for _ in range(200):
            if k == n:
                break
            r = rng.uniform(*sep_range)
            th = rng.uniform(0, 2 * np.pi)
            cand = pos[k - 1] + r * np.array([np.cos(th), np.sin(th)])
            if np.all(np.hypot(*(pos[:k] - cand).T) >= sep_range[0]) and np.all(
                    np.abs(cand) < 3.5):
                pos[k] = cand
                k += 1
        if k == n:
            return pos - pos.mean(0) + rng.uniform(-0.5, 0.5, 2)
    raise ValueError(f"could not place {n} sources {sep_range} px apart")


def make_psf_groups(rng: np.random.Generator, n_groups: int, *, nsrc=1, slots: int = 7,
                    n_frames: int = 6, size: int = 15, snr=(10.0, 1000.0),
                    separation=(1.25, 2.5), alpha=(1.0, 1.35), beta=2.5, noise=10.0,
                    data_radius=2.0, init_jitter=0.2, init_flux_jitter=0.3,
                    mask_fraction=0.0, missing_frames=0):
    """Make ``n_groups`` groups (see the module docstring).

    Parameters
    ----------
    rng
        The seeded generator; everything random comes from it.
    nsrc
        Sources per group: an int, or an int array (G,), each in [1, slots].
    slots
        K, source slots per group (the interface's 7).
    n_frames, size
        F frames per group, stamps of size x size pixels.
    snr
        (lo, hi): each source's flux is its ideal single-source SNR (flux / ``sigma_flux``)
        drawn log-uniformly in [lo, hi] (lo == hi: fixed).
    separation
        (lo, hi) px: each source of a blend lies lo..hi from the previous one and >= lo
        from all others (2.5"-5" at 2"/px by default).
    alpha, beta
        Moffat alpha range (px, per frame, uniform) and beta (all frames).
    noise
        Background noise per pixel, DN (all frames).
    data_radius
        Radius (px) of the data region around each source's initial position.
    init_jitter, init_flux_jitter
        Initial (u, v) = truth + N(0, init_jitter) px per axis; initial flux = truth x
        U(1 - j, 1 + j).
    mask_fraction
        Fraction of pixels of the data region given weight 0 (bad pixels) at random.
    missing_frames
        Number of frames (the last ones) absent from every group: weights 0, stamps NaN.
    """
    g_count = int(n_groups)
    n_of = np.broadcast_to(np.asarray(nsrc, dtype=np.int32), (g_count,)).copy()
    if np.any((n_of < 1) | (n_of > slots)):
        raise ValueError(f"nsrc must be in [1, {slots}]")
    nf, s = int(n_frames), int(size)
    centre = (s - 1) / 2.0
    # Frame maps: sub-pixel dither and a rotation of up to 0.2 deg about the stamp centre.
    th = np.deg2rad(rng.uniform(-0.2, 0.2, (g_count, nf)))
    maps = np.zeros((g_count, nf, 2, 3))
    maps[..., 0, 0] = centre + rng.uniform(-0.5, 0.5, (g_count, nf))
    maps[..., 1, 0] = centre + rng.uniform(-0.5, 0.5, (g_count, nf))
    maps[..., 0, 1], maps[..., 0, 2] = np.cos(th), -np.sin(th)
    maps[..., 1, 1], maps[..., 1, 2] = np.sin(th), np.cos(th)
    psf = np.empty((g_count, nf, 2))
    psf[..., 0] = rng.uniform(alpha[0], alpha[1], (g_count, nf))
    psf[..., 1] = beta
    fscale = rng.uniform(0.9, 1.1, (g_count, nf))
    truth = np.full((g_count, slots, 3), np.nan)
    for g in range(g_count):
        truth[g, : n_of[g], 1:] = _place(rng, n_of[g], separation)
    init = truth.copy()
    used = np.arange(slots)[None, :] < n_of[:, None]
    init[..., 1:] += np.where(used[..., None], rng.normal(0, init_jitter, (g_count, slots, 2)),
                              0.0)

    # Unit-flux renders of every (group, frame, source), cut into the stamps.
    gi, fi, ki = (a.ravel() for a in np.meshgrid(np.arange(g_count), np.arange(nf),
                                                 np.arange(slots), indexing="ij"))
    keep = used[gi, ki]
    gi, fi, ki = gi[keep], fi[keep], ki[keep]
    u, v = truth[gi, ki, 1], truth[gi, ki, 2]
    m = maps[gi, fi]
    x = m[:, 0, 0] + m[:, 0, 1] * u + m[:, 0, 2] * v
    y = m[:, 1, 0] + m[:, 1, 1] * u + m[:, 1, 2] * v
    ix, iy = np.rint(x), np.rint(y)
    from gpu2mass.kernels import render_psf_stamps

    h = s  # stamps of 2s+1 centred within the s x s window cover it whole
    unit = render_psf_stamps(x - ix, y - iy, 1.0, psf[gi, fi, 0], psf[gi, fi, 1],
                             half_size=h, target="cpu").astype(np.float64)
    per_src = np.zeros((g_count, nf, slots, s, s))
    a0 = (h - iy).astype(int)  # stamp row that lands on window row 0
    b0 = (h - ix).astype(int)
    for j in range(gi.size):
        per_src[gi[j], fi[j], ki[j]] = unit[j, a0[j]: a0[j] + s, b0[j]: b0[j] + s]

    # Data region and weights (from the initial positions, as the caller would).
    yy, xx = np.mgrid[:s, :s]
    xi = maps[..., 0, 0, None] + maps[..., 0, 1, None] * init[:, None, :, 1] \
        + maps[..., 0, 2, None] * init[:, None, :, 2]
    yi = maps[..., 1, 0, None] + maps[..., 1, 1, None] * init[:, None, :, 1] \
        + maps[..., 1, 2, None] * init[:, None, :, 2]
    d2 = (xx - xi[..., None, None]) ** 2 + (yy - yi[..., None, None]) ** 2  # (G, F, K, s, s)
    region = ((d2 <= data_radius**2) & used[:, None, :, None, None]).any(2)
    noise_f = np.full((g_count, nf), float(noise))
    weights = np.where(region, 1.0 / noise_f[..., None, None] ** 2, 0.0)
    if mask_fraction > 0:
        weights[rng.uniform(size=weights.shape) < mask_fraction] = 0.0
    if missing_frames:
        weights[:, nf - missing_frames:] = 0.0

    # Fluxes from the wanted SNR: sigma_flux of each source alone, on its weights.
    info = np.einsum("gfkyx,gfyx->gk", (fscale[:, :, None, None, None] * per_src) ** 2, weights)
    sigma_flux = np.where(used, 1.0 / np.sqrt(np.where(info > 0, info, np.inf)), np.nan)
    lo, hi = snr
    snr_k = np.exp(rng.uniform(np.log(lo), np.log(hi), (g_count, slots)))
    truth[..., 0] = np.where(used, snr_k * sigma_flux, np.nan)
    init[..., 0] = truth[..., 0] * rng.uniform(1 - init_flux_jitter, 1 + init_flux_jitter,
                                               (g_count, slots))
    flux = np.where(used, truth[..., 0], 0.0)
    model = np.einsum("gfkyx,gk,gf->gfyx", per_src, flux, fscale)
    stamps = model + rng.normal(0.0, 1.0, model.shape) * noise_f[..., None, None]
    if missing_frames:
        stamps[:, nf - missing_frames:] = np.nan
    init = np.where(used[..., None], init, 0.0)
    inputs = {
        "stamps": stamps.astype(np.float32),
        "weights": weights.astype(np.float32),
        "frame_maps": maps,
        "psf_params": psf,
        "flux_scale": fscale,
        "init": init,
        "nsrc": n_of,
    }
    return inputs, {"params": truth, "model": model, "sigma_flux": sigma_flux,
                    "noise": noise_f}
