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
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

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


def flag_of(config: type, name: str) -> str:
    """The command-line flag of a field (for error messages that name it)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.metadata.get(_FLAG) or "--" + name.replace("_", "-")
    raise KeyError(name)


def default_of(config: type, name: str) -> Any:
    """A field's declared default (its factory called once, when it has one)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{config.__name__}.{name} has no default")
    raise KeyError(name)


def _knobs(config: type, only: Iterable[str] | None, skip: Iterable[str]) -> list[Any]:
    wanted = set(only) if only is not None else None
    fields = [
        f
        for f in dataclasses.fields(config)
        if _HELP in f.metadata and (wanted is None or f.name in wanted) and f.name not in set(skip)
    ]
    if wanted is not None and (missing := wanted - {f.name for f in fields}):
        raise KeyError(f"{config.__name__} has no knobs {sorted(missing)}")
    return fields


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
    """Add one option per knob of the dataclass `config` (`only` some, or all but `skip`).

    `defaults` overrides a declared default for this command only (e.g. `aurora local`
    serving one request at a time), and its help shows the override.
    """
    hints = typing.get_type_hints(config)
    overrides = defaults or {}
    for f in _knobs(config, only, skip):
        flag = f.metadata.get(_FLAG) or "--" + f.name.replace("_", "-")
        env = f.metadata.get(_ENV)
        default = overrides[f.name] if f.name in overrides else default_of(config, f.name)
        if env and os.environ.get(env):
            default = os.environ[env]
        kind, optional = _unwrap_optional(hints[f.name])
        help = _describe(default, f.metadata[_HELP], env)
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help}
        if f.metadata.get(_METAVAR):
            kwargs["metavar"] = f.metadata[_METAVAR]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = help
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            kwargs["choices"] = list(kind)
            kwargs["type"] = kind
        elif get_origin(kind) is Literal:
            kwargs["choices"] = list(get_args(kind))
            kwargs["type"] = type(get_args(kind)[0])
        elif kind in (int, float, str, Path):
            kwargs["type"] = kind
        elif get_origin(kind) is tuple and f.metadata.get(_REPEAT):
            # None until given: argparse would append to a default list in place
            kwargs.update(action="append", type=get_args(kind)[0], default=None)
        elif get_origin(kind) is tuple:
            item = get_args(kind)[0]
            kwargs["type"] = lambda text, item=item: tuple(
                item(part) for part in text.split(",") if part
            )
            kwargs.setdefault("metavar", "A,B,C")
        else:
            raise TypeError(f"{config.__name__}.{f.name}: no command-line form for {kind!r}")
        if optional and kind is not bool and default is None:
            kwargs["help"] = help
        parser.add_argument(flag, **kwargs)


def from_args(config: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass built from the parsed knobs, plus `extra` fields (which win)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config)
        if _HELP in f.metadata and hasattr(args, f.name)
    }
    for f in dataclasses.fields(config):
        if f.metadata.get(_REPEAT) and f.name in values:
            given = values[f.name]
            values[f.name] = default_of(config, f.name) if given is None else tuple(given)
    return config(**{**values, **extra})


def option_args(values: dict[str, Any], config: type | None = None) -> list[str]:
    """Command-line arguments setting each field in `values` (`--field-name VALUE`, or the
    knob's own flag when `config` declares one; booleans as `--x` / `--no-x`, tuples
    comma-joined or, for a repeated knob, one flag per item). None cannot be written on a
    command line: leave the field out instead."""
    fields = dataclasses.fields(config) if config else ()
    flags = {f.name: f.metadata.get(_FLAG) for f in fields}
    repeated = {f.name for f in fields if f.metadata.get(_REPEAT)}
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
    for f in _knobs(kind, None, ()):
        value, default = getattr(config, f.name), default_of(kind, f.name)
        if value is None and default is None:
            continue  # off stays off (None has no command-line form)
        if value != default or f.metadata.get(_ENV):
            values[f.name] = value
    return option_args(values, kind)
