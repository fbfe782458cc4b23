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

from aurora.runtime.rollout.statistics import MIN_CLUSTERS
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
        "double(self.falsePromotionRate) > 0.0 && double(self.falsePromotionRate) < 0.5",
        "rollout.falsePromotionRate must be above 0 and below 0.5, e.g. '0.05' (the share "
        "of candidates no faster than minSpeedup that may still be promoted)",
        lambda r: 0 < r.false_promotion_rate < Decimal("0.5"),
    ),
    Rule(
        "self.maxRollbackBackoffSeconds >= self.rollbackBackoffSeconds",
        "rollout.maxRollbackBackoffSeconds must be at least rollout.rollbackBackoffSeconds, "
        "e.g. 600 with 30",
        lambda r: r.max_rollback_backoff_seconds >= r.rollback_backoff_seconds,
    ),
    Rule(
        f"self.minSamples >= {MIN_CLUSTERS}",
        f"rollout.minSamples must be at least {MIN_CLUSTERS}: the gate's confidence sequence "
        f"needs {MIN_CLUSTERS} requests per arm before its bounds mean anything, e.g. 30",
        lambda r: r.min_samples >= MIN_CLUSTERS,
    ),
    Rule(
        "self.maxCanarySamples >= self.minSamples",
        "rollout.maxCanarySamples must be at least rollout.minSamples",
        lambda r: r.max_canary_samples >= r.min_samples,
    ),
)


# camelCase on the wire (Kubernetes status, Redis), snake_case in Python; immutable.
WIRE_MODEL = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    frozen=True,
)


class RolloutPolicy(BaseModel):
    """`Speculator.spec.rollout`: thresholds, traffic shares and statistics settings."""

    model_config = ConfigDict(
        **WIRE_MODEL,
        extra="forbid",
        json_schema_extra=rules_schema(ROLLOUT_RULES),
    )

    min_speedup: Annotated[Decimal, DecimalText(RATIO_PATTERN, "1.05")] = Field(
        Decimal("1.05"),
        description="Promote when the lower bound of the candidate's time-weighted decode "
        "speedup over stable (a confidence sequence at falsePromotionRate) reaches this.",
    )
    regression_threshold: Annotated[Decimal, DecimalText(RATIO_PATTERN, "0.97")] = Field(
        Decimal("0.97"),
        description="Roll back when the upper bound of that speedup falls below this.",
    )
    min_samples: int = Field(
        30,
        ge=1,
        le=10_000_000,
        description="Requests per arm in the comparison window before deciding.",
    )
    max_canary_samples: int = Field(
        300,
        ge=2,
        le=10_000_000,
        description="Still inconclusive with this many candidate requests in the window: "
        "follow onInconclusive.",
    )
    canary_share: Annotated[Decimal, DecimalText(FRACTION_PATTERN, "0.5")] = Field(
        Decimal("0.5"),
        description="Share of requests (torch) or of replicas (sglang) on the candidate.",
    )
    baseline_share: Annotated[Decimal, DecimalText(FRACTION_PATTERN, "0.1")] = Field(
        Decimal("0.1"),
        description="Share of requests served without speculation (the live baseline).",
    )
    false_promotion_rate: Annotated[Decimal, DecimalText(FRACTION_PATTERN, "0.05")] = Field(
        Decimal("0.05"),
        description="Error rate of the gate: the chance that a candidate no faster than "
        "minSpeedup is promoted (and that one no slower than regressionThreshold is rolled "
        "back), however long the canary runs and however often it is checked.",
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
    hybrid_canaries: bool = Field(
        True,
        description="While stable drafts with suffix decoding (suffix, or hybrid:<head>), "
        "a learned candidate is canaried as hybrid:<candidate>: suffix decoding and its head, "
        "per verify step whichever is expected to be accepted further. A head alone rarely "
        "beats suffix decoding on traffic that suffix decoding wins; with it, it can. torch "
        "servers only: with engine.kind sglang a candidate is always canaried alone.",
    )
    rollback_backoff_seconds: int = Field(
        30,
        ge=0,
        le=86_400,
        description="After a candidate is rolled back, the next canary waits this long, "
        "doubling with each further rollback in a row (up to maxRollbackBackoffSeconds) "
        "until a candidate is promoted; meanwhile the trainer keeps learning and the newest "
        "candidate is canaried when the wait ends. 0: no wait.",
    )
    max_rollback_backoff_seconds: int = Field(
        600,
        ge=0,
        le=86_400,
        description="The longest wait between a rollback and the next canary.",
    )
    gate_initial_draft: bool = Field(
        True,
        description="A model-free day-0 draft (draft.initial suffix or ngram) is canaried "
        "against plain decoding like any candidate: servers start without a draft and it "
        "serves everyone once it passes the gate. False: it serves from the start.",
    )

    @model_validator(mode="after")
    def _rules(self) -> RolloutPolicy:
        check_rules(self, ROLLOUT_RULES)
        return self
