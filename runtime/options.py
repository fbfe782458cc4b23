"""Every knob declared once: a config dataclass field carries its default and its help,
and the command line is generated from it.

    @dataclass
    class ServerConfig:
        port: int = knob(8000, "TCP port")
        draft: str = knob("ngram", "initial draft", metavar="DRAFT")

    add_options(parser, ServerConfig)          # --port, --draft with defaults and help
    config = from_args(ServerConfig, args)     # ServerConfig(port=..., draft=...)

Fields declared without `knob` (or with `cli=False`) are internal: no flag. The CRD is
generated from pydantic models that take their defaults from the same dataclasses
(`aurora.operator.spec`), so a default lives in exactly one place.

A pydantic model works the same way (the rollout policy is one: the CRD's `spec.rollout`
and `aurora local`'s rollout options): every field with `Field(description=...)` is a
knob, its default and description become the option's, and `from_args` validates the
model, raising `OptionError` that names the flags of the refused values.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

_HELP = "aurora.help"
_FLAG = "aurora.flag"
_METAVAR = "aurora.metavar"
_ENV = "aurora.env"
_REPEAT = "aurora.repeat"


def knob(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    env: str | None = None,
    repeat: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option.

    `flag` overrides the generated `--field-name`; `env` names an environment variable
    whose value, when set, replaces the default on the command line (not in Python).
    `repeat` (tuple fields): the flag is given once per item (`--draft A --draft B`)
    instead of once with a comma-separated list.
    """
    metadata = {_HELP: help, _FLAG: flag, _METAVAR: metavar, _ENV: env, _REPEAT: repeat}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class OptionError(ValueError):
    """Options the config refused; the message names each flag, its value and the fix."""


@dataclasses.dataclass(frozen=True)
class _Knob:
    """One command-line option, as a dataclass field or a pydantic field declares it."""

    name: str
    flag: str
    help: str
    annotation: Any
    metavar: str | None = None
    env: str | None = None
    repeat: bool = False


def _is_model(config: type) -> bool:
    return isinstance(config, type) and issubclass(config, BaseModel)


def _all_knobs(config: type) -> list[_Knob]:
    if _is_model(config):
        return [
            _Knob(name, "--" + name.replace("_", "-"), info.description, info.annotation)
            for name, info in config.model_fields.items()  # type: ignore[attr-defined]
            if info.description
        ]
    hints = typing.get_type_hints(config)
    return [
        _Knob(
            f.name,
            f.metadata.get(_FLAG) or "--" + f.name.replace("_", "-"),
            f.metadata[_HELP],
            hints[f.name],
            f.metadata.get(_METAVAR),
            f.metadata.get(_ENV),
            bool(f.metadata.get(_REPEAT)),
        )
        for f in dataclasses.fields(config)
        if _HELP in f.metadata
    ]


def flag_of(config: type, name: str) -> str:
    """The command-line flag of a field (for error messages that name it)."""
    for knob_ in _all_knobs(config):
        if knob_.name == name:
            return knob_.flag
    if not _is_model(config) and name in {f.name for f in dataclasses.fields(config)}:
        return "--" + name.replace("_", "-")
    raise KeyError(name)


def default_of(config: type, name: str) -> Any:
    """A field's declared default (its factory called once, when it has one)."""
    if _is_model(config):
        fields = config.model_fields  # type: ignore[attr-defined]
        if name not in fields:
            raise KeyError(name)
        if fields[name].is_required():
            raise ValueError(f"{config.__name__}.{name} has no default")
        return fields[name].get_default(call_default_factory=True)
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{config.__name__}.{name} has no default")
    raise KeyError(name)


def _knobs(config: type, only: Iterable[str] | None, skip: Iterable[str]) -> list[_Knob]:
    wanted = set(only) if only is not None else None
    knobs = [
        k
        for k in _all_knobs(config)
        if (wanted is None or k.name in wanted) and k.name not in set(skip)
    ]
    if wanted is not None and (missing := wanted - {k.name for k in knobs}):
        raise KeyError(f"{config.__name__} has no knobs {sorted(missing)}")
    return knobs


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _describe(default: Any, help: str, env: str | None) -> str:
    shown = "off" if default is None else default
    if isinstance(default, tuple):
        shown = ",".join(str(item) for item in default) or "empty"
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, Decimal):
        shown = format(default, "f")
    text = f"{help} (default: {shown}" if help else f"(default: {shown}"
    if env:
        text += f"; env {env}"
    return text + ")"


def add_options(
    parser: argparse.ArgumentParser | Any,
    config: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one option per knob of `config`, a dataclass or a pydantic model (`only`
    some, or all but `skip`).

    `defaults` overrides a declared default for this command only (e.g. `aurora local`
    serving one request at a time), and its help shows the override.
    """
    overrides = defaults or {}
    for k in _knobs(config, only, skip):
        default = overrides[k.name] if k.name in overrides else default_of(config, k.name)
        if k.env and os.environ.get(k.env):
            default = os.environ[k.env]
        kind, _ = _unwrap_optional(k.annotation)
        help = _describe(default, k.help, k.env)
        kwargs: dict[str, Any] = {"dest": k.name, "default": default, "help": help}
        if k.metavar:
            kwargs["metavar"] = k.metavar
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            kwargs["choices"] = list(kind)
            kwargs["type"] = kind
        elif get_origin(kind) is Literal:
            kwargs["choices"] = list(get_args(kind))
            kwargs["type"] = type(get_args(kind)[0])
        elif kind in (int, float, str, Path):
            kwargs["type"] = kind
        elif kind is Decimal:
            kwargs["type"] = str  # the model parses it and names the flag when it refuses
            kwargs.setdefault("metavar", "DECIMAL")
        elif get_origin(kind) is tuple and k.repeat:
            # None until given: argparse would append to a default list in place
            kwargs.update(action="append", type=get_args(kind)[0], default=None)
        elif get_origin(kind) is tuple:
            item = get_args(kind)[0]
            kwargs["type"] = lambda text, item=item: tuple(
                item(part) for part in text.split(",") if part
            )
            kwargs.setdefault("metavar", "A,B,C")
        else:
            raise TypeError(f"{config.__name__}.{k.name}: no command-line form for {kind!r}")
        parser.add_argument(k.flag, **kwargs)


def from_args(config: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The config built from the parsed knobs, plus `extra` fields (which win). A pydantic
    model is validated: what it refuses raises OptionError naming the flags."""
    knobs = {k.name: k for k in _all_knobs(config)}
    values = {name: getattr(args, name) for name in knobs if hasattr(args, name)}
    for name, given in values.items():
        if knobs[name].repeat:  # None: the flag was not given
            values[name] = default_of(config, name) if given is None else tuple(given)
    if not _is_model(config):
        return config(**{**values, **extra})
    try:
        return config.model_validate({**values, **extra})  # type: ignore[attr-defined]
    except ValidationError as error:
        raise OptionError(_refusals(config, knobs, error)) from None


def _refusals(config: type, knobs: dict[str, _Knob], error: ValidationError) -> str:
    """One line per refusal, naming the flag (and the value) instead of the field."""
    aliases = {
        info.alias or name: knobs[name].flag
        for name, info in config.model_fields.items()  # type: ignore[attr-defined]
        if name in knobs
    }
    lines = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        field = str(item["loc"][0]) if item["loc"] else ""
        if field in knobs or field in aliases:
            flag = knobs[field].flag if field in knobs else aliases[field]
            lines.append(f"{flag} {item['input']!r}: {message}")
        else:  # a rule across fields names them by alias (rollout.minSpeedup): name the flags
            for alias, flag in aliases.items():
                message = re.sub(rf"\b(\w+\.)?{alias}\b", flag, message)
            lines.append(message)
    return "; ".join(lines)


def option_args(values: dict[str, Any], config: type | None = None) -> list[str]:
    """Command-line arguments setting each field in `values` (`--field-name VALUE`, or the
    knob's own flag when `config` declares one; booleans as `--x` / `--no-x`, tuples
    comma-joined or, for a repeated knob, one flag per item). None cannot be written on a
    command line: leave the field out instead."""
    knobs = _all_knobs(config) if config else []
    flags = {k.name: k.flag for k in knobs}
    repeated = {k.name for k in knobs if k.repeat}
    args: list[str] = []
    for name, value in values.items():
        flag = flags.get(name) or "--" + name.replace("_", "-")
        if value is None:
            raise ValueError(f"{name}=None has no command-line form: leave the field out")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, tuple) and name in repeated:
            args += [part for item in value for part in (flag, str(item))]
        elif isinstance(value, tuple):
            args += [flag, ",".join(str(item) for item in value)]
        elif isinstance(value, enum.Enum):
            args += [flag, str(value.value)]
        else:
            args += [flag, str(value)]
    return args


def to_args(config: Any) -> list[str]:
    """The command line that `add_options` + `from_args` turn back into `config`: one
    argument per knob whose value differs from its declared default, and per knob read from
    an environment variable (the child's environment must not override it)."""
    kind = type(config)
    values = {}
    for k in _all_knobs(kind):
        value, default = getattr(config, k.name), default_of(kind, k.name)
        if value is None and default is None:
            continue  # off stays off (None has no command-line form)
        if value != default or k.env:
            values[k.name] = value
    return option_args(values, kind)
