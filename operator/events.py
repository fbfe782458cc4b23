"""What the operator tells people about rollout events, and what a person tells it:
the Kubernetes Event type of each policy event, the revision history records in
status, and the override annotation (a person's Promote or Rollback). Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aurora.operator.spec import MAX_REVISION_HISTORY, fraction_or_none
from aurora.runtime.protocol import Builtin
from aurora.runtime.rollout import Measurement, Override, RolloutEvent

# The Kubernetes Event type of each rollout policy event (Normal otherwise).
EVENT_TYPES = {
    "Rollback": "Warning",
    "Reject": "Warning",
    "Hold": "Warning",
    "Fallback": "Warning",
}


def event_type(action: str) -> str:
    """Normal or Warning: what a person should look at is a Warning."""
    return EVENT_TYPES.get(action, "Normal")


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


OVERRIDE_ANNOTATION = "aurora.dev/override"


def parse_override(annotations: Mapping[str, str]) -> tuple[Override | None, str | None]:
    """A person's decision on the current canary, from the annotation
    `aurora.dev/override: Promote:<revision>` (or `Rollback:<revision>`), like
    `kubectl argo rollouts promote`. Returns (override, None), (None, error) or (None, None)."""
    value = annotations.get(OVERRIDE_ANNOTATION)
    if value is None:
        return None, None
    action, _, revision = value.strip().partition(":")
    if action not in ("Promote", "Rollback") or not revision.strip():
        return None, (
            f"annotation {OVERRIDE_ANNOTATION}={value!r} is not understood: write "
            "'Promote:<revision>' or 'Rollback:<revision>'"
        )
    return Override.model_validate({"action": action, "revision": revision.strip()}), None


_OUTCOMES = {
    "StartCanary": "Canary",
    "Promote": "Promoting",
    "Promoted": "Promoted",
    "Rollback": "RolledBack",
    "Reject": "Rejected",
    "Hold": "Held",
    "Superseded": "Superseded",
    "Fallback": "FellBack",
}


def revision_history(
    previous: Sequence[Mapping[str, Any]], events: Sequence[RolloutEvent],
    measurement: Measurement | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """status.revisionHistory: the newest MAX_REVISION_HISTORY rollout events, newest
    first, with the measured speedup behind this round's events."""
    speedup = None
    if measurement is not None and measurement.speedup_vs_stable is not None:
        speedup = fraction_or_none(measurement.speedup_vs_stable.estimate)
    fresh = []
    for event in events:
        record: dict[str, Any] = {
            "revision": event.revision or Builtin.NONE,
            "outcome": _OUTCOMES.get(event.action, event.action),
            "reason": event.reason[:1024],
            "time": rfc3339(datetime.fromtimestamp(event.time, UTC)),
        }
        if speedup is not None and event.action != "StartCanary":
            record["speedup"] = speedup
            record["samples"] = measurement.candidate.samples if measurement else None
        fresh.append({k: v for k, v in record.items() if v is not None})
    return [*reversed(fresh), *(dict(r) for r in previous)][:MAX_REVISION_HISTORY]
