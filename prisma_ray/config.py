"""Job configs: YAML in, `--set key=value` overrides, pydantic validation, clear errors out."""

from __future__ import annotations

import difflib
import json
import shutil
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from .errors import InvalidRequest, PrismaRayError

C = TypeVar("C", bound=BaseModel)
T = TypeVar("T")


class ConfigError(PrismaRayError, ValueError):
    """A config file or override that cannot be used; the message names the input."""


def require_distinct(values: list[T], what: str) -> list[T]:
    """`values` unchanged; a repeated one raises `InvalidRequest` naming `what` (for list-field validators)."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise InvalidRequest(f"{what} must be distinct; repeated: {', '.join(repeated)}")
    return values


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


def with_section_defaults(
    cls: type[BaseModel], data: dict[str, Any], default: BaseModel | None = None
) -> dict[str, Any]:
    """`data` (a config of `cls`, as parsed) with every section it gives filled in from that section's default, so
    that `--set dataset.generator.n_images=8` changes the default dataset's generator instead of replacing the
    dataset with one that has nothing else. A section that switches a discriminated union to another member (a
    different `type`, say) is taken as given: the default's other fields belong to the other member."""
    out = {**(default.model_dump(mode="json") if default is not None else {}), **data}
    for name, field in cls.model_fields.items():
        given = data.get(name)
        if not isinstance(given, dict):
            continue
        section = getattr(default, name, None) if default is not None else _default_of(field)
        if not isinstance(section, BaseModel):
            continue
        key = field.discriminator if isinstance(field.discriminator, str) else None
        if key is not None and given.get(key, getattr(section, key, None)) != getattr(section, key, None):
            continue
        out[name] = with_section_defaults(type(section), given, section)
    return out


def _default_of(field: FieldInfo) -> Any:
    """The field's default value (None where there is none, or where it depends on the other fields)."""
    try:
        return field.get_default(call_default_factory=True)
    except ValueError:  # a default factory that reads the validated data
        return None


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
        return cls.model_validate(with_section_defaults(cls, data))
    except ValidationError as exc:
        raise ConfigError(
            f"Invalid {_source(path, overrides, exc, cls)} for {cls.__name__}: {describe_errors(cls, exc)}"
        ) from exc


def _source(path: Path | None, overrides: list[str] | None, exc: ValidationError, cls: type[BaseModel]) -> str:
    """Where the invalid values came from: the `--set` overrides whose keys the errors name, else the file."""
    keys = {".".join(str(part) for part in loc) for loc, _, _ in _config_errors(cls, exc)}
    blamed = [a for a in overrides or [] if "=" in a and any(_covers(a.split("=", 1)[0].strip(), k) for k in keys)]
    if blamed:
        return "--set " + ", --set ".join(blamed)
    return f"config {str(path)!r}" if path else "config"


def _covers(set_key: str, error_key: str) -> bool:
    """True if the override of `set_key` wrote the value at `error_key` (the same key, or a section above it)."""
    return error_key == set_key or error_key.startswith(set_key + ".") or set_key.startswith(error_key + ".")


def describe_errors(cls: type[BaseModel], exc: ValidationError) -> str:
    """The validation errors of `cls` on one line: `dotted.key: what is wrong (got VALUE)`, joined by `; `;
    an unknown key names the closest known ones."""
    parts: list[str] = []
    for loc, error, parents in _config_errors(cls, exc):
        key = ".".join(str(part) for part in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _suggest(parents, str(loc[-1]))
        else:
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] != "missing" and "input" in error:
                shown = repr(error["input"])
                message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        if f"{key}: {message}" not in parts:
            parts.append(f"{key}: {message}")
    return "; ".join(parts)


def _suggest(models: list[type[BaseModel]], key: str) -> str:
    """`; did you mean ...?` with the fields of `models` (the section holding `key`) closest to `key`."""
    fields = list(dict.fromkeys(name for model in models for name in model.model_fields))
    if not fields:
        return ""
    close = difflib.get_close_matches(key, fields, n=3)
    return f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(fields)}"


# Errors that only follow from others: a default computed from fields that failed validation.
_CONSEQUENCES = {"default_factory_not_called"}


def _config_errors(
    cls: type[BaseModel], exc: ValidationError
) -> list[tuple[tuple[Any, ...], Any, list[type[BaseModel]]]]:
    """`exc`'s errors as `(loc, error, models)`: `loc` the YAML keys (pydantic's union member tags, such as
    `str`, `ModelEntry`, `images` or `function-after[...]`, left out), `models` the sections that can hold the
    last key. A value that fails every member of a union is reported by the members it came closest to: a type
    mismatch (`Input should be a valid string`) is left out where the same key or a key inside it has other errors,
    as are errors that only follow from others."""
    found = []
    for error in exc.errors():
        if error["type"] in _CONSEQUENCES:
            continue
        loc, models, parents = [], [cls], [cls]
        for i, part in enumerate(error["loc"]):
            last = i == len(error["loc"]) - 1
            if isinstance(part, int):
                loc.append(part)
                continue
            fields = [m.model_fields[part] for m in models if part in m.model_fields]
            if fields or (last and error["type"] == "extra_forbidden"):
                loc.append(part)
                parents = models
                models = [m for f in fields for m in models_in(f.annotation)]
            else:  # a union member's tag: not a key the user wrote; narrow to that member where it is a model
                models = [m for m in models if m.__name__ == part] or models
        found.append((tuple(loc), error, parents))
    other = {loc[:n] for loc, error, _ in found if not error["type"].endswith("_type") for n in range(len(loc) + 1)}
    return [(loc, e, parents) for loc, e, parents in found if not (e["type"].endswith("_type") and loc in other)]


def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation holds: itself, or those inside its unions, lists, dicts, ..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for inner in get_args(annotation):
        yield from models_in(inner)


def config_models(cls: type[BaseModel]) -> list[type[BaseModel]]:
    """`cls` and every model reachable through its fields, recursively, each once, in order of first use."""
    found: dict[type[BaseModel], None] = {}

    def walk(model: type[BaseModel]) -> None:
        if model not in found:
            found[model] = None
            for info in model.model_fields.values():
                for inner in models_in(info.annotation):
                    walk(inner)

    walk(cls)
    return list(found)


def type_name(annotation: Any) -> str:
    """A short readable name of a field type: `int`, `str | null`, `all|cls|patches`, `list[str]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list[{type_name(args[0])}]"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The one model a field holds (`Model`, `Model | None`, `list[Model]` or `dict[str, Model]`) and the suffix
    its children get (`.`, `[].` or `.<name>.`); `(None, "")` for any other field."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "."
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return _nested(args[0])
    if get_origin(annotation) is list and len(args) == 1 and isinstance(args[0], type):
        return (args[0], "[].") if issubclass(args[0], BaseModel) else (None, "")
    if get_origin(annotation) is dict and len(args) == 2 and isinstance(args[1], type):
        return (args[1], ".<name>.") if issubclass(args[1], BaseModel) else (None, "")
    return None, ""


def _plain(value: Any) -> Any:
    """`value` as JSON data; a model keeps only its fields that differ from their defaults, and its tags."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        tags = {k: getattr(value, k) for k, f in fields.items() if len(get_args(f.annotation)) == 1}
        return {**tags, **value.model_dump(mode="json", exclude_defaults=True)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return to_jsonable_python(value)


def config_fields(cls: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str | None, str]]:
    """`(dotted name, type, default, description)` of every field of `cls`, each nested model's fields after its
    own line (`a.b` for a model field, `a[].b` for a list of models, `a.<name>.b` for a dict of them). `default` is JSON, `"required"`, or `""`
    for a nested model (its fields give theirs). A config whose defaults come from elsewhere (the quickstart's
    shipped campaign) says so with a classmethod `shown_defaults() -> {field: shown default}` of its top-level
    fields."""
    shown = getattr(cls, "shown_defaults", None)
    overrides = shown() if callable(shown) and not prefix else {}
    for name, info in cls.model_fields.items():
        nested, suffix = _nested(info.annotation)
        if name in overrides:
            default = overrides[name]
        elif info.is_required():
            default = "required"
        elif nested is not None and suffix == ".":
            default = ""
        elif info.default_factory is not None:
            default = json.dumps(_plain(info.get_default(call_default_factory=True, validated_data={})))
        else:
            default = json.dumps(_plain(info.default))
        yield f"{prefix}{name}", type_name(info.annotation), default, info.description or ""
        if nested is not None:
            yield from config_fields(nested, f"{prefix}{name}{suffix}")


def fields_help(cls: type[BaseModel], width: int | None = None) -> str:
    """The `--help` section listing every field of the config `cls` (see `config_fields`)."""
    width = width or max(shutil.get_terminal_size().columns - 2, 60)
    lines = [f"config fields ({cls.__name__}; YAML keys, or --set KEY=VALUE with dotted keys):"]
    for name, kind, default, description in config_fields(cls):
        shown = ", required" if default == "required" else f", default {default}" if default else ""
        lines.append(f"  {name} ({kind}{shown})")
        lines += textwrap.wrap(
            description, width, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False
        )
    return "\n".join(lines) + "\n"
