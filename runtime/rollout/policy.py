"""The rollout policy: one pydantic model, the single source of its fields, defaults and
checks. It is `Speculator.spec.rollout` (the operator's `RolloutSpec` adds only how often
the operator runs it; the CRD schema, its defaults and CEL rules are generated from this
model) and `aurora local`'s rollout options (`aurora.runtime.options.add_options`).

Fractions and thresholds are decimal strings ("1.05"), per the Kubernetes API
conventions; numbers are accepted too.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import SkipJsonSchema

from aurora.runtime.schema import (
    FRACTION_PATTERN,
    RATIO_PATTERN,
    DecimalText,
    Rule,
    check_rules,
    rules_schema,
)

ROLLOUT_RULES = (
    Rule(
        "double(self.canaryShare) > 0.0 && double(self.canaryShare) < 1.0",
        "rollout.canaryShare must be above 0 and below 1, e.g. '0.5'",
        lambda r: 0 < r.canary_share < 1,
    ),
    Rule(
        "double(self.canaryShare) + double(self.baselineShare) < 1.0",
        "rollout.canaryShare + rollout.baselineShare must be below 1 (the stable revision "
        "needs traffic), e.g. '0.5' and '0.1'",
        lambda r: r.canary_share + r.baseline_share < 1,
    ),
    Rule(
        "double(self.minSpeedup) >= 1.0",
        "rollout.minSpeedup must be at least 1.0 (a candidate must not be slower than stable), "
        "e.g. '1.05'",
        lambda r: r.min_speedup >= 1,
    ),
    Rule(
        "double(self.regressionThreshold) > 0.0 && "
        "double(self.regressionThreshold) <= double(self.minSpeedup)",
        "rollout.regressionThreshold must not exceed rollout.minSpeedup (and be above 0), "
        "e.g. '0.97' with '1.05'",
        lambda r: 0 < r.regression_threshold <= r.min_speedup,
    ),
    Rule(
        "double(self.confidence) > 0.5 && double(self.confidence) < 1.0",
        "rollout.confidence must be above 0.5 and below 1, e.g. '0.9'",
        lambda r: Decimal("0.5") < r.confidence < 1,
    ),
    Rule(
        "self.maxCanarySamples >= self.minSamples",
        "rollout.maxCanarySamples must be at least rollout.minSamples",
        lambda r: r.max_canary_samples >= r.min_samples,
    ),
)


class RolloutPolicy(BaseModel):
    """`Speculator.spec.rollout`: thresholds, traffic shares and statistics settings."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
        extra="forbid",
        json_schema_extra=rules_schema(ROLLOUT_RULES),
    )

    min_speedup: Annotated[Decimal, DecimalText(RATIO_PATTERN, "1.05")] = Field(
        Decimal("1.05"),
        description="Promote when the lower confidence bound of the measured decode speedup "
        "over stable reaches this.",
    )
    regression_threshold: Annotated[Decimal, DecimalText(RATIO_PATTERN, "0.97")] = Field(
        Decimal("0.97"),
        description="Roll back when the upper confidence bound falls below this.",
    )
    min_samples: int = Field(
        30, ge=2, le=10_000_000, description="Requests per arm before deciding."
    )
    max_canary_samples: int = Field(
        300,
        ge=2,
        le=10_000_000,
        description="Still inconclusive with this many candidate requests: follow onInconclusive.",
    )
    canary_share: Annotated[Decimal, DecimalText(FRACTION_PATTERN, "0.5")] = Field(
        Decimal("0.5"),
        description="Share of requests (torch) or of replicas (sglang) on the candidate.",
    )
    baseline_share: Annotated[Decimal, DecimalText(FRACTION_PATTERN, "0.1")] = Field(
        Decimal("0.1"),
        description="Share of requests served without speculation (the live baseline).",
    )
    confidence: Annotated[Decimal, DecimalText(FRACTION_PATTERN, "0.9")] = Field(
        Decimal("0.9"), description="One-sided confidence of the speedup bounds."
    )
    on_inconclusive: Literal["Hold", "Rollback"] = Field(
        "Hold",
        description="Inconclusive at maxCanarySamples: Hold (a person decides) or Rollback.",
    )
    replace_canary_with_newer: bool = Field(
        False, description="A candidate trained from the canary replaces it at once."
    )
    fallback_on_regression: bool = Field(
        True,
        description="When stable measures slower than no speculation, serve without a draft "
        "until a candidate beats plain decoding.",
    )
    # Internal (not in the API): the bootstrap's resamples and seed.
    bootstrap_resamples: SkipJsonSchema[int] = Field(1000, ge=100, le=100_000, exclude=True)
    seed: SkipJsonSchema[int] = Field(0, exclude=True)

    @model_validator(mode="after")
    def _rules(self) -> RolloutPolicy:
        check_rules(self, ROLLOUT_RULES)
        return self
