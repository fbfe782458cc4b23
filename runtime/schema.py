"""Kubernetes API conventions shared by the models the CRD is generated from
(`aurora.operator.spec`) and the rollout policy (`aurora.runtime.rollout.policy`), which
is both `Speculator.spec.rollout` and `aurora local`'s rollout options.

- Numbers that are fractions or ratios travel as decimal strings ("1.05"), per the
  Kubernetes API conventions. A field `Annotated[Decimal, DecimalText(...)]` holds one as
  a `Decimal`, accepts a decimal string (or a Decimal) and writes a string (JSON), with
  the pattern in the schema.
- A rule spanning fields is written once, as a `Rule`: a CEL expression (the API server
  enforces it through `x-kubernetes-validations`) and the same check in Python (enforced
  by the model, so callers without an API server get the same refusal).

Pure: pydantic and the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

# A fraction is a share: 0 to 1 inclusive. A ratio is a positive decimal such as 1.05.
FRACTION_PATTERN = r"^(0(\.[0-9]{1,6})?|1(\.0{1,6})?)$"
RATIO_PATTERN = r"^[0-9]{1,3}(\.[0-9]{1,6})?$"


@dataclass(frozen=True)
class DecimalText:
    """`Annotated[Decimal, DecimalText(pattern, example)]`: a Decimal that the API carries
    as a string matching `pattern`; a refusal quotes `example`."""

    pattern: str
    example: str

    def parse(self, value: object) -> Decimal:
        # A number is refused as the API server's schema refuses it (type: string).
        text = format(value, "f") if isinstance(value, Decimal) else value
        if not isinstance(text, str) or not re.match(self.pattern, text.strip()):
            raise ValueError(
                f"{value!r} is not a decimal string: write it quoted, such as {self.example!r}"
            )
        return Decimal(text.strip())

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(
            self.parse,
            handler(source),
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda value: format(value, "f"),
                when_used="json",
                return_schema=core_schema.str_schema(),
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        return {"type": "string", "pattern": self.pattern, "maxLength": 16}


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, written once: `cel` for the API server, `check` for Python."""

    cel: str
    message: str
    check: Callable[[Any], bool]

    def as_schema(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message}


def rules_schema(rules: tuple[Rule, ...]) -> dict[str, Any]:
    """The `x-kubernetes-validations` of a model (its `json_schema_extra`)."""
    return {"x-kubernetes-validations": [rule.as_schema() for rule in rules]}


def check_rules(model: BaseModel, rules: tuple[Rule, ...]) -> None:
    """Raise ValueError naming every rule `model` breaks."""
    failed = [rule.message for rule in rules if not rule.check(model)]
    if failed:
        raise ValueError("; ".join(failed))
