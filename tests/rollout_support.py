"""Records the rollout decision reads, built with test defaults: a finished request's
stats and a trainer's candidate record (the protocol's own types)."""

from __future__ import annotations

from typing import Any

from aurora.runtime.protocol import CandidateRecord, RequestStats


def request_stats(
    revision: str, arm: str, tokens_per_s: float, *, created: float, **fields: Any
) -> RequestStats:
    """One finished request: `new_tokens` (default 64) decoded at `tokens_per_s`."""
    values: dict[str, Any] = {
        "server": "server-1",
        "accept_length": 1.0 if arm == "baseline" else 2.5,
        "new_tokens": 64,
        "latency_s": 1.0,
        **fields,
    }
    values.setdefault("verify_steps", values["new_tokens"])
    return RequestStats(
        revision=revision,
        arm=arm,  # type: ignore[arg-type]
        decode_tokens_per_s=tokens_per_s,
        created=created,
        **values,
    )


def candidate_record(
    revision: str, created: float, parent: str | None = None, **evaluation: Any
) -> CandidateRecord:
    """A checkpoint the trainer offers, at /ckpt/<revision>; `evaluation` as it reports it
    (e.g. candidate=2.4, stable=2.1, loadable=False)."""
    return CandidateRecord(
        revision=revision,
        parent=parent,
        created=created,
        path=f"/ckpt/{revision}",
        sha256="0" * 64,
        step=int(created),
        traces_seen=0,
        evaluation=evaluation,
    )
