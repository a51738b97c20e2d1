"""The exceptions of gpu2mass.

Every error a user can cause names what was wrong and where. Library code raises
these, never bare ``ValueError``/``RuntimeError``, so the CLI and the night runner can
tell bad input (reject, name the file) from a step that could not do its job (fail the
scan, go on with the night).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "DeviceError", "Gpu2MassError", "InputError", "StepError"]


class Gpu2MassError(Exception):
    """Base class of every gpu2mass exception."""


class InputError(Gpu2MassError):
    """Input that breaks a contract of ``shared/spec``: names the file and the rule.

    Parameters
    ----------
    path
        The offending file or directory (``None`` when the input is not a file).
    rule
        What the spec requires and what was found instead, in words a person can act on.
    """

    def __init__(self, path: str | Path | None, rule: str):
        self.path = None if path is None else Path(path)
        self.rule = rule
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{rule}")


class DeviceError(Gpu2MassError):
    """The requested compute device cannot be used (e.g. ``--device gpu`` without a GPU)."""


class StepError(Gpu2MassError):
    """A processing step could not do its job on otherwise valid input."""


class ConfigError(Gpu2MassError):
    """An invalid configuration value (unknown key, wrong type, out of range)."""
