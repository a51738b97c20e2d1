"""Device selection and the array namespace (DESIGN.md section 4).

``--device auto|gpu|cpu``:

- ``cpu``: NumPy/SciPy and Numba ``njit`` kernels.
- ``gpu``: CuPy and Numba CUDA kernels; raises :class:`~gpu2mass.errors.DeviceError`
  with the reason when no GPU is usable.
- ``auto``: the GPU when CuPy imports, a device is present and a tiny allocation
  succeeds; otherwise the CPU. The choice is logged once per process.

Steps never ask this module which device is "current": they take the namespace from
their input arrays with :func:`get_namespace`, so one process can run and compare both
paths. CuPy is imported lazily, only when a GPU is asked for or probed, so
``import gpu2mass`` works anywhere.
"""

from __future__ import annotations

import functools
import logging
import types
from dataclasses import dataclass
from typing import Literal

from gpu2mass.errors import DeviceError

__all__ = [
    "Device",
    "DeviceName",
    "get_namespace",
    "get_ndimage",
    "gpu_status",
    "resolve_device",
    "to_host",
]

log = logging.getLogger(__name__)

DeviceName = Literal["auto", "gpu", "cpu"]


@dataclass(frozen=True)
class Device:
    """A resolved compute device.

    Attributes
    ----------
    kind
        ``"gpu"`` or ``"cpu"``.
    name
        Human-readable name: the GPU model, or ``"cpu"``.
    xp
        The array namespace: ``cupy`` or ``numpy``.
    """

    kind: Literal["gpu", "cpu"]
    name: str
    xp: types.ModuleType

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"


@functools.cache
def gpu_status() -> tuple[bool, str]:
    """Probe for a usable GPU once per process.

    Returns ``(usable, detail)``: the GPU model when usable, else why not (CuPy missing,
    no device, allocation failed). Never raises.
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library load failure
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy found no CUDA device ({exc})"
    if n < 1:
        return False, "CuPy found no CUDA device"
    try:
        a = cupy.arange(4, dtype=cupy.float32)
        float((a * 2).sum())  # a real allocation, kernel launch and copy back
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception as exc:
        return False, f"a tiny allocation on the GPU failed ({exc})"
    return True, name


_logged_auto = False


def resolve_device(device: str = "auto") -> Device:
    """Turn ``auto|gpu|cpu`` into a :class:`Device`.

    Raises
    ------
    DeviceError
        For ``gpu`` when no GPU is usable (the message says why), or for an unknown name.
    """
    global _logged_auto
    import numpy

    if device == "cpu":
        return Device("cpu", "cpu", numpy)
    if device not in ("gpu", "auto"):
        raise DeviceError(f"unknown device {device!r}: use auto, gpu or cpu")
    usable, detail = gpu_status()
    if usable:
        import cupy

        dev = Device("gpu", detail, cupy)
    elif device == "gpu":
        raise DeviceError(f"--device gpu was requested but no GPU is usable: {detail}")
    else:
        dev = Device("cpu", "cpu", numpy)
    if device == "auto" and not _logged_auto:
        why = "" if usable else f" ({detail})"
        log.info("device auto: using %s%s", dev.name if usable else "the CPU", why)
        _logged_auto = True
    return dev


def get_namespace(*arrays) -> types.ModuleType:
    """The array module (``cupy`` or ``numpy``) that owns ``arrays``.

    Mixing host and device arrays is an error: steps must not copy between them.
    """
    import numpy

    mods = set()
    for a in arrays:
        if a is None:
            continue
        mod = type(a).__module__.split(".")[0]
        mods.add("cupy" if mod == "cupy" else "numpy")
    if len(mods) > 1:
        raise TypeError("arrays live on different devices (host and GPU mixed)")
    if mods == {"cupy"}:
        import cupy

        return cupy
    return numpy


def get_ndimage(xp: types.ModuleType) -> types.ModuleType:
    """``cupyx.scipy.ndimage`` for CuPy, ``scipy.ndimage`` for NumPy."""
    if xp.__name__ == "cupy":
        import cupyx.scipy.ndimage as nd

        return nd
    import scipy.ndimage as nd

    return nd


def to_host(a):
    """A NumPy array from a NumPy or CuPy array (the one sanctioned copy, at step ends)."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return a
