"""The rollout room: which draft revision serves, and when a candidate replaces it.

- `policy`: `RolloutPolicy`, the one policy model (the CRD's `spec.rollout`, the operator's
  validation and `aurora local`'s rollout options are generated from it).
- `decision`: pure, the state machine and the measurement it decides on (`decide`).
- `loop`: the Redis edge (`run_round`), run by the operator's timer and by `aurora local`.

Dependencies point inward: loop -> decision -> policy, protocol. Nothing here imports
the operator, kopf or torch.
"""

from aurora.runtime.rollout.decision import (
    HISTORY_LIMIT,
    NO_DRAFT,
    Action,
    Decision,
    EventAction,
    Measurement,
    Override,
    RolloutEvent,
    RolloutState,
    Speedup,
    day_zero,
    decide,
    gates_day_zero,
    measure,
    server_day_zero,
)
from aurora.runtime.rollout.policy import ROLLOUT_RULES, RolloutPolicy

__all__ = [
    "HISTORY_LIMIT",
    "NO_DRAFT",
    "ROLLOUT_RULES",
    "Action",
    "Decision",
    "EventAction",
    "Measurement",
    "Override",
    "RolloutEvent",
    "RolloutPolicy",
    "RolloutState",
    "Speedup",
    "day_zero",
    "decide",
    "gates_day_zero",
    "measure",
    "server_day_zero",
]
