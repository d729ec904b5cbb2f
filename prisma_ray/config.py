"""Job configs: YAML in, `--set key=value` overrides, pydantic validation, clear errors out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import PrismaRayError

C = TypeVar("C", bound=BaseModel)


class ConfigError(PrismaRayError, ValueError):
    """A config file or override that cannot be used; the message names the input."""


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"Override {assignment!r} must look like key=value (e.g. model.name=prisma-toy-vit-shapes)")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read `path` (YAML; optional), apply `overrides`, and validate into `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping at the top level")
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = f"config {str(path)!r}" if path else "config"
        raise ConfigError(f"Invalid {where} for {cls.__name__}:\n{exc}") from exc
