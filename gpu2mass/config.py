"""The run configuration: every step's frozen config, composed (DESIGN.md section 5).

Built from the defaults (2MASS values), an optional TOML file and ``--set step.name=value``
overrides, in that order; the effective configuration goes into ``run.json``. Steps are
named as in the data flow (:data:`STEP_CONFIGS`): per scan ``darks`` … ``artifacts``,
``catalog``; per night ``photcal``, ``errcal``, ``astrometry``, ``psc``, ``qa``. Unknown steps or fields, and values of the wrong type, raise
:class:`~gpu2mass.errors.ConfigError` naming them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu2mass.errors import ConfigError

__all__ = ["STEP_CONFIGS", "RunConfig", "load_config"]

#: Step name → (module, config class name).
STEP_CONFIGS = {
    "darks": ("gpu2mass.darks", "DarkConfig"),
    "frames": ("gpu2mass.frames", "FrameConfig"),
    "framedet": ("gpu2mass.framedet", "FrameDetConfig"),
    "register": ("gpu2mass.register", "RegisterConfig"),
    "transients": ("gpu2mass.transients", "TransientConfig"),
    "starfill": ("gpu2mass.starfill", "StarFillConfig"),
    "atlas": ("gpu2mass.atlas", "AtlasConfig"),
    "detect": ("gpu2mass.detect", "DetectConfig"),
    "psfmodel": ("gpu2mass.psfmodel", "PsfModelConfig"),
    "psfphot": ("gpu2mass.psfphot", "PsfPhotConfig"),
    "aperphot": ("gpu2mass.aperphot", "AperPhotConfig"),
    "brightstars": ("gpu2mass.brightstars", "BrightStarConfig"),
    "bandmerge": ("gpu2mass.bandmerge", "BandMergeConfig"),
    "artifacts": ("gpu2mass.artifacts", "ArtifactConfig"),
    "catalog": ("gpu2mass.catalog", "CatalogConfig"),
    "astrometry": ("gpu2mass.astrometry", "AstrometryConfig"),
    "psc": ("gpu2mass.psc", "PscConfig"),
    "qa": ("gpu2mass.qa", "QaConfig"),
    "photcal": ("gpu2mass.photcal", "PhotcalConfig"),
    "errcal": ("gpu2mass.errcal", "ErrcalConfig"),
}


def _config_class(step: str):
    if step not in STEP_CONFIGS:
        raise ConfigError(f"unknown step {step!r}: the steps are {', '.join(STEP_CONFIGS)}")
    module, name = STEP_CONFIGS[step]
    return getattr(importlib.import_module(module), name)


def _coerce(step: str, field: dataclasses.Field, current: Any, value: Any) -> Any:
    """Turn a TOML value or a ``--set`` string into the field's type."""
    where = f"{step}.{field.name}"
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{where}: cannot read {value!r} as a value") from None
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(current, dict):
        if not isinstance(value, dict) or set(value) - set(current):
            raise ConfigError(f"{where} must be a table with keys among {sorted(current)}, got {value!r}")
        return {**current, **{k: type(current[k])(v) for k, v in value.items()}}
    if isinstance(current, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class RunConfig:
    """One frozen config per step (attribute names are the step names)."""

    steps: dict

    def __getattr__(self, name):
        steps = self.__dict__.get("steps", {})
        if name in steps:
            return steps[name]
        raise AttributeError(name)

    @classmethod
    def defaults(cls) -> RunConfig:
        return cls({s: _config_class(s)() for s in STEP_CONFIGS})

    def updated(self, table: dict) -> RunConfig:
        """A copy with ``{step: {field: value}}`` applied."""
        steps = dict(self.steps)
        for step, fields in table.items():
            cfg = steps.get(step) if step in steps else _config_class(step)()
            if not isinstance(fields, dict):
                raise ConfigError(f"[{step}] must be a table of settings")
            known = {f.name: f for f in dataclasses.fields(cfg)}
            changes = {}
            for name, value in fields.items():
                if name not in known:
                    raise ConfigError(f"unknown setting {step}.{name}: {step} has {', '.join(known)}")
                changes[name] = _coerce(step, known[name], getattr(cfg, name), value)
            steps[step] = dataclasses.replace(cfg, **changes)
        return RunConfig(steps)

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """Apply ``step.name=value`` strings (the CLI's ``--set``)."""
        table: dict = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            step, dot, name = key.strip().partition(".")
            if not sep or not dot or not name:
                raise ConfigError(f"--set {item!r}: write step.name=value, e.g. register.match_radius_arcsec=1.5")
            table.setdefault(step, {})[name.strip()] = value.strip()
        return self.updated(table)

    def to_dict(self) -> dict:
        """Plain values for ``run.json``; an unbounded limit (``inf``) is written as the
        string ``"inf"`` (JSON has no infinity)."""
        def plain(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [plain(x) for x in v]
            return v

        return {s: plain(dataclasses.asdict(c)) for s, c in self.steps.items()}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides``."""
    cfg = RunConfig.defaults()
    if path is not None:
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the configuration ({exc})") from None
        cfg = cfg.updated(table)
    return cfg.with_overrides(list(overrides))
