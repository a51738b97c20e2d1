"""Fused per-pixel frame calibration: dark, flat and mask bits in one pass per read type.

Public function -> dispatcher -> core (STYLE.md habit 1). :func:`calibrate_frames` checks
its inputs, takes the array namespace from them and runs one core:

``"cpu"``
    NumPy arrays (their default): the Numba ``prange`` driver,
    :mod:`gpu2mass.kernels.cpu.calibrate`.
``"cuda"``
    CuPy arrays (their default): the Numba CUDA kernel on CuPy's current stream,
    :mod:`gpu2mass.kernels.cuda.calibrate`. Forced with NumPy arrays (tests, the CUDA
    simulator) the inputs are copied to the device and the results back.
``"reference"``
    NumPy only: :mod:`gpu2mass.kernels.reference.calibrate`.

The math and the mask bits are in :mod:`gpu2mass.kernels.scalar.calibrate`. Values are
computed in float64 and stored as float32, so every target agrees with the reference to
float32 rounding (tests: rtol 1e-6, masks identical).
"""

from __future__ import annotations

import numpy as np
from gpu2mass.kernels._targets import CALL_TARGETS as TARGETS
from gpu2mass.kernels._targets import resolve_target
from gpu2mass.kernels.scalar.calibrate import (
    MASK_BAD,
    MASK_BITS,
    MASK_NONFINITE,
    MASK_R1_SATURATED,
    MASK_SATURATED,
    UNUSABLE_R1,
    UNUSABLE_R2R1,
)

from gpu2mass.backend import get_namespace

__all__ = [
    "MASK_BAD",
    "MASK_BITS",
    "MASK_NONFINITE",
    "MASK_R1_SATURATED",
    "MASK_SATURATED",
    "READS",
    "TARGETS",
    "UNUSABLE_R1",
    "UNUSABLE_R2R1",
    "calibrate_frames",
]

#: Values of the ``read`` keyword: which raw cube is calibrated.
READS = ("r2r1", "r1")




def _real(xp, name: str, a, kinds: str = "uif"):
    if a.dtype.kind not in kinds or a.dtype.itemsize > 8:
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return xp.ascontiguousarray(a)


def calibrate_frames(r1, r2r1, dark, flat, satmap, badpix, *, read: str = "r2r1",
                     margin: float = 5.0, target: str | None = None):
    """Dark-subtract, flat-field and flag a stack of frames of one read type.

    Parameters
    ----------
    r1, r2r1
        Raw R1 and R2−R1 stacks (n, ny, nx), DN, any integer or float dtype (both are
        needed for either read type: saturation is decided on read 2 = R1 + R2R1).
    dark
        (ny, nx) dark of the read type calibrated (pedestal + dark current for R1, dark
        current for R2−R1), DN.
    flat
        (ny, nx) relative responsivity (median 1); pixels with ``flat <= 0`` get
        :data:`MASK_NONFINITE`.
    satmap
        (ny, nx) full-well level of read 2, DN.
    badpix
        (ny, nx) integer or boolean map, non-zero bad (:data:`MASK_BAD`).
    read
        ``"r2r1"`` (calibrate ``r2r1``) or ``"r1"``.
    margin
        Saturation margin, DN: saturated when ``R1 + R2R1 >= SAT - margin`` (R1 saturated
        when ``R1 >= SAT - margin``).
    target
        ``None`` (from the arrays: NumPy → ``"cpu"``, CuPy → ``"cuda"``), or one of
        :data:`TARGETS`.

    Returns
    -------
    values, mask
        float32 (n, ny, nx), ``(raw − dark) / flat`` in DN at flat = 1 (0 where
        :data:`MASK_NONFINITE`), and uint8 (n, ny, nx) bits of
        :mod:`gpu2mass.kernels.scalar.calibrate`; in the inputs' namespace.

    Raises
    ------
    ValueError
        Mismatched shapes, wrong dimensions or dtypes, unknown ``read``, non-finite margin.
    """
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, not {read!r}")
    margin = float(margin)
    if not np.isfinite(margin):
        raise ValueError(f"margin must be finite, not {margin!r}")
    xp = get_namespace(r1, r2r1, dark, flat, satmap, badpix)
    tgt = resolve_target(xp, target)
    r1, r2r1 = xp.asarray(r1), xp.asarray(r2r1)
    if r1.ndim != 3 or r1.shape != r2r1.shape:
        raise ValueError(
            f"r1 and r2r1 must be (n, ny, nx) stacks of one shape, got {r1.shape} and {r2r1.shape}"
        )
    images = {}
    for name, a in (("dark", dark), ("flat", flat), ("satmap", satmap), ("badpix", badpix)):
        a = xp.asarray(a)
        if a.shape != r1.shape[1:]:
            raise ValueError(f"{name} must have the frame shape {r1.shape[1:]}, got {a.shape}")
        if name == "badpix" and a.dtype.kind not in "uib":
            raise ValueError(f"badpix must be an integer or boolean map, got dtype {a.dtype}")
        images[name] = _real(xp, name, a, "uib" if name == "badpix" else "uif")
    args = (_real(xp, "r1", r1), _real(xp, "r2r1", r2r1), images["dark"], images["flat"],
            images["satmap"], images["badpix"], margin, read == "r1")
    if tgt == "cpu":
        from gpu2mass.kernels.cpu.calibrate import calibrate_frames as core

        return core(*args)
    if tgt == "reference":
        from gpu2mass.kernels.reference.calibrate import calibrate_frames as core

        return core(*args)
    return _cuda_core(xp, *args)


def _cuda_core(xp, r1, r2r1, dark, flat, sat, badpix, margin, use_r1):
    from gpu2mass.kernels.cuda.calibrate import calibrate_frames as core
    from numba import cuda

    if xp.__name__ == "cupy":
        import cupy

        out = xp.empty(r1.shape, dtype=xp.float32)
        mask = xp.empty(r1.shape, dtype=xp.uint8)
        ptr = cupy.cuda.get_current_stream().ptr
        stream = cuda.external_stream(ptr) if ptr else 0
        # sync=False: the kernel runs on CuPy's current stream, after the producers.
        views = [cuda.as_cuda_array(a, sync=False)
                 for a in (r1, r2r1, dark, flat, sat, badpix, out, mask)]
        core(*views[:6], margin, use_r1, views[6], views[7], stream=stream)
        return out, mask
    # NumPy arrays forced onto the CUDA path (tests, the simulator): copy there and back.
    d_in = [cuda.to_device(a) for a in (r1, r2r1, dark, flat, sat, badpix)]
    d_out = cuda.device_array(r1.shape, dtype=np.float32)
    d_mask = cuda.device_array(r1.shape, dtype=np.uint8)
    core(*d_in, margin, use_r1, d_out, d_mask)
    return d_out.copy_to_host(), d_mask.copy_to_host()
