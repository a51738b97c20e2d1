"""The command line, run in process."""

from __future__ import annotations

import json
import re

import pytest
from gpu2mass.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_the_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("simulate", "inspect"):
        assert cmd in res.output


def test_simulate_help_documents_every_option():
    res = runner.invoke(app, ["simulate", "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = _plain(res.output)
    for opt in ("--preset", "--seed", "--field", "--glat", "--scans", "--frames", "--bands",
                "--cal-frames", "--night", "--observatory", "--inject-k", "--pointing-offset", "--refcat",
                "--cosmic-rays", "--overwrite"):
        assert opt in text, opt
    for preset in ("tiny", "ci", "scan", "night"):
        assert preset in text


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "huge"], "unknown preset"),
    (["--bands", "J,X"], "subset of J, H, K"),
    (["--field", "10"], "needs 2"),
    (["--inject-k", "a,b"], "comma-separated numbers"),
])
def test_simulate_rejects_bad_options(tmp_path, args, message):
    res = runner.invoke(app, ["simulate", str(tmp_path / "n"), *args])
    assert res.exit_code == 2
    assert message in _plain(res.output)


def test_simulate_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    res = runner.invoke(app, ["simulate", str(tmp_path)])
    assert res.exit_code == 2 and "not empty" in res.output
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_inspect_summarises_a_valid_night(tiny_night):
    res = runner.invoke(app, ["inspect", str(tiny_night)])
    assert res.exit_code == 0, res.output
    assert "scan   1 dark" in res.output and "sci" in res.output and "truth sources" in res.output


def test_inspect_names_the_broken_file(tiny_night, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_night, bad)
    manifest = json.loads((bad / "night.json").read_text())
    manifest["scans"][1]["scan"] = manifest["scans"][0]["scan"]
    (bad / "night.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["inspect", str(bad), "--no-check-data"])
    assert res.exit_code == 2
    assert "night.json" in res.output and "unique" in res.output.lower()
