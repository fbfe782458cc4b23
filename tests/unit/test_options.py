"""Knobs declared once on a config dataclass (or a pydantic model) generate the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from aurora.runtime.options import (
    OptionError,
    add_options,
    default_of,
    flag_of,
    from_args,
    knob,
    option_args,
    to_args,
)
from aurora.runtime.schema import RATIO_PATTERN, DecimalText

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


class Policy(BaseModel):
    """A pydantic model as a config: every described field is a knob."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, frozen=True)

    min_speedup: Annotated[Decimal, DecimalText(RATIO_PATTERN, "1.05")] = Field(
        Decimal("1.05"), description="threshold"
    )
    min_samples: int = Field(30, ge=2, description="requests per arm")
    on_inconclusive: Literal["Hold", "Rollback"] = Field("Hold", description="what then")
    fallback: bool = Field(True, description="fall back")
    seed: int = 0  # no description: internal

    @model_validator(mode="after")
    def _rule(self) -> Policy:
        if self.min_samples > 100 and self.min_speedup < 1:
            raise ValueError("rollout.minSamples above 100 needs rollout.minSpeedup >= 1")
        return self


def _policy(argv: list[str], **kwargs: object) -> Policy:
    parser = argparse.ArgumentParser()
    add_options(parser, Policy, **kwargs)  # type: ignore[arg-type]
    return from_args(Policy, parser.parse_args(argv))  # type: ignore[no-any-return]


def test_a_pydantic_models_described_fields_become_options() -> None:
    assert _policy([]) == Policy()
    parsed = _policy(
        [
            "--min-speedup",
            "1.2",
            "--min-samples",
            "5",
            "--on-inconclusive",
            "Rollback",
            "--no-fallback",
        ]
    )
    assert parsed == Policy(
        min_speedup=Decimal("1.2"), min_samples=5, on_inconclusive="Rollback", fallback=False
    )
    with pytest.raises(SystemExit):
        _policy(["--seed", "3"])
    parser = argparse.ArgumentParser()
    add_options(parser, Policy, defaults={"min_samples": 12})
    help = parser.format_help()
    assert "requests per arm (default: 12)" in help and "threshold (default: 1.05)" in help
    assert (flag_of(Policy, "min_speedup"), default_of(Policy, "min_samples")) == (
        "--min-speedup",
        30,
    )


def test_what_a_pydantic_model_refuses_names_the_flag_and_the_value() -> None:
    with pytest.raises(OptionError) as error:
        _policy(["--min-speedup", "fast"])
    assert str(error.value).startswith("--min-speedup 'fast': ") and "'1.05'" in str(error.value)
    with pytest.raises(OptionError, match=r"^--min-samples 1: .*greater than or equal to 2"):
        _policy(["--min-samples", "1"])
    # A rule across fields names the flags, not the API fields.
    with pytest.raises(OptionError, match=r"^--min-samples above 100 needs --min-speedup >= 1$"):
        _policy(["--min-samples", "200", "--min-speedup", "0.9"])


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
