"""Knobs declared once on a config dataclass generate the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import pytest

from aurora.runtime.options import (
    add_options,
    default_of,
    flag_of,
    from_args,
    knob,
    option_args,
    to_args,
)

pytestmark = pytest.mark.unit


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Example:
    port: int = knob(8000, "TCP port")
    rate: float = knob(0.5, "a fraction")
    mode: Literal["Hold", "Rollback"] = knob("Hold", "what to do")
    folder: Path = knob(Path("out"), "where")
    threads: int | None = knob(None, "threads")
    live: bool = knob(True, "live view")
    layers: tuple[int, ...] | None = knob(None, "layers")
    url: str | None = knob(None, "Redis URL", env="EXAMPLE_URL")
    colour: Colour = knob(Colour.RED, "an enumeration")
    drafts: tuple[str, ...] = knob((), "a draft (repeatable)", repeat=True)
    internal: int = 3


def _parse(argv: list[str], **kwargs: object) -> Example:
    parser = argparse.ArgumentParser()
    add_options(parser, Example, **kwargs)  # type: ignore[arg-type]
    return from_args(Example, parser.parse_args(argv))


def test_defaults_come_from_the_dataclass() -> None:
    assert _parse([]) == Example()


def test_every_kind_of_field_parses() -> None:
    parsed = _parse(
        [
            *("--port", "9", "--rate", "0.25", "--mode", "Rollback", "--folder", "x"),
            *("--threads", "2", "--no-live", "--layers", "1,2,3", "--colour", "blue"),
        ]
    )
    assert (parsed.port, parsed.rate, parsed.mode, parsed.folder) == (
        9,
        0.25,
        "Rollback",
        Path("x"),
    )
    assert (parsed.threads, parsed.live, parsed.layers) == (2, False, (1, 2, 3))
    assert parsed.colour is Colour.BLUE


def test_choices_are_enforced() -> None:
    with pytest.raises(SystemExit):
        _parse(["--mode", "Maybe"])
    with pytest.raises(SystemExit):
        _parse(["--colour", "green"])


def test_internal_fields_get_no_flag() -> None:
    with pytest.raises(SystemExit):
        _parse(["--internal", "4"])


def test_a_command_can_override_a_default_and_its_help_says_so() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, Example, defaults={"port": 1})
    assert from_args(Example, parser.parse_args([])).port == 1
    assert "(default: 1)" in parser.format_help()


def test_environment_variable_replaces_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAMPLE_URL", "redis://x:1/0")
    assert _parse([]).url == "redis://x:1/0"


def test_only_and_skip_select_knobs() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, Example, only=["port"])
    assert "--rate" not in parser.format_help()
    with pytest.raises(KeyError):
        add_options(argparse.ArgumentParser(), Example, only=["nope"])


def test_flag_and_default_lookups() -> None:
    assert flag_of(Example, "rate") == "--rate"
    assert default_of(Example, "folder") == Path("out")


def test_to_args_is_the_command_line_that_parses_back_to_the_config() -> None:
    # Given: a config with every kind of knob changed from its default
    config = Example(
        port=9,
        rate=0.25,
        mode="Rollback",
        folder=Path("x"),
        threads=2,
        live=False,
        layers=(1, 2, 3),
        url="redis://y:2/0",
        colour=Colour.BLUE,
        drafts=("a", "b,c"),
    )
    # When: its command line is generated and parsed again, Then: the same config comes back
    assert _parse(to_args(config)) == config


def test_to_args_leaves_defaults_out_but_always_writes_environment_knobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert to_args(Example(port=9)) == ["--port", "9"]
    # a knob the environment can set is written even at its default, so the child's
    # environment cannot change it
    monkeypatch.setenv("EXAMPLE_URL", "redis://from-env:1/0")
    config = Example(url="redis://chosen:1/0")
    assert to_args(config) == ["--url", "redis://chosen:1/0"]
    assert _parse(to_args(config)).url == "redis://chosen:1/0"


def test_option_args_spells_field_names_as_flags_and_refuses_none() -> None:
    assert option_args({"spec_tokens": 3, "live": False, "layers": (1, 2)}) == [
        *("--spec-tokens", "3", "--no-live", "--layers", "1,2"),
    ]
    with pytest.raises(ValueError, match="threads=None"):
        option_args({"threads": None})


def test_a_repeated_knob_takes_its_flag_once_per_item() -> None:
    assert _parse(["--drafts", "a", "--drafts", "b,c"]).drafts == ("a", "b,c")
    assert _parse([]).drafts == ()  # the declared default when the flag is not given
    assert to_args(Example(drafts=("x", "y"))) == ["--drafts", "x", "--drafts", "y"]
