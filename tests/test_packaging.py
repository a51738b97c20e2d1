"""The wheel holds every module of gpu2mass/, kernels/ and cli/ (DESIGN.md section 2)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source trees and where they land in the wheel.
TREES = {"gpu2mass": "gpu2mass", "kernels": "gpu2mass/kernels", "cli": "gpu2mass/cli"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-isolation: build with the installed setuptools, no network needed.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("gpu2mass-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_contains_every_source_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for tree, dest in TREES.items():
        for path in (ROOT / tree).rglob("*"):
            if path.suffix in (".py", ".cu") and "__pycache__" not in path.parts:
                expected.add(f"{dest}/{path.relative_to(ROOT / tree).as_posix()}")
    assert expected, "found no source files: is the test looking in the right place?"
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel: {missing}"


def test_wheel_declares_the_cli_and_extras(wheel):
    zf = zipfile.ZipFile(wheel)
    meta = next(n for n in zf.namelist() if n.endswith("METADATA"))
    text = zf.read(meta).decode()
    for extra in ("cuda12", "cuda13", "test", "dev"):
        assert f"Provides-Extra: {extra}" in text
    assert "cupy" not in "".join(line for line in text.splitlines()
                                 if line.startswith("Requires-Dist") and "extra ==" not in line)
    ep = next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
    assert "gpu2mass = gpu2mass.cli.main:main" in zf.read(ep).decode()
