"""Device selection (DESIGN.md section 4) on this CPU-only machine, and the namespace seam."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from gpu2mass import backend
from gpu2mass.errors import DeviceError

HAS_GPU = backend.gpu_status()[0]


def test_cpu_is_always_numpy():
    dev = backend.resolve_device("cpu")
    assert dev.kind == "cpu" and dev.xp is np and not dev.is_gpu


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU behaviour")
def test_gpu_fails_clearly_without_a_gpu():
    with pytest.raises(DeviceError, match="no GPU is usable"):
        backend.resolve_device("gpu")


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU behaviour")
def test_auto_falls_back_to_cpu_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(backend, "_logged_auto", False)
    with caplog.at_level(logging.INFO, logger="gpu2mass.backend"):
        assert backend.resolve_device("auto").kind == "cpu"
        assert backend.resolve_device("auto").kind == "cpu"
    msgs = [r.getMessage() for r in caplog.records if "device auto" in r.getMessage()]
    assert len(msgs) == 1 and "CPU" in msgs[0]


def test_auto_uses_the_gpu_when_the_probe_succeeds(monkeypatch):
    """Simulate a usable GPU: auto must choose it (the probe itself is tested on a GPU)."""
    fake_cupy = type(sys)("cupy")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(backend, "gpu_status", lambda: (True, "Fake GPU"))
    dev = backend.resolve_device("auto")
    assert dev.kind == "gpu" and dev.name == "Fake GPU" and dev.xp is fake_cupy


def test_unknown_device_name():
    with pytest.raises(DeviceError, match="unknown device"):
        backend.resolve_device("tpu")


def test_probe_reports_why_without_cupy():
    usable, detail = backend.gpu_status()
    if not usable:
        assert detail  # a reason a person can act on


def test_namespace_from_arrays():
    assert backend.get_namespace(np.zeros(3), None, np.ones(2)) is np
    assert backend.get_ndimage(np).__name__ == "scipy.ndimage"
    a = np.arange(3)
    assert backend.to_host(a) is a


def test_import_gpu2mass_does_not_import_cupy_or_numba_cuda():
    code = ("import sys, gpu2mass, gpu2mass.backend, gpu2mass.kernels; "
            "print('cupy' in sys.modules, 'numba.cuda' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device with CuPy")
def test_gpu_probe_on_a_real_device():
    dev = backend.resolve_device("gpu")
    assert dev.is_gpu and dev.xp.__name__ == "cupy"
    a = dev.xp.arange(10)
    assert backend.get_namespace(a) is dev.xp
    assert backend.to_host(a).sum() == 45
