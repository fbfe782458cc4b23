"""The trace protocol: every Redis key, record and codec that Aurora's parts share.

One Speculator owns the keys under ``aurora:{namespace}:{name}:``. Servers XADD one
trace per finished request (packed token ids, never JSON lists of ints) and one
stats entry per request; the trainer reads traces with a consumer group and offers
candidates; the operator (or local mode) reads stats and candidates and writes the
desired state; servers report what they have loaded.

Standard library, pydantic and redis only: the operator image has no torch or numpy.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_TOKEN_ID = 2**32 - 1  # token ids travel as uint32
MAX_PROPOSAL = 2**16 - 1  # proposal lengths and accepted counts travel as uint16
FLOAT16_MAX = 65504.0

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Builtin(StrEnum):
    """Revision names every process understands without a checkpoint: what servers serve,
    report in stats and loaded reports, and the operator and local mode ask for. A
    StrEnum, so each compares equal to its string on the wire."""

    NONE = "none"  # plain decoding, no draft; as stable after a fallback
    NGRAM = "ngram"  # model-free prompt lookup
    SCRATCH = "scratch"  # an untrained draft head (day 0 for the trainer)
    SUFFIX = "suffix"  # model-free suffix decoding over the prompt and every served output


BUILTIN_REVISIONS: tuple[str, ...] = tuple(Builtin)

HYBRID_PREFIX = "hybrid:"
"""``hybrid:<revision>``: suffix decoding and the draft head ``<revision>`` (a checkpoint's
revision, or scratch), per verify step whichever is expected to be accepted further."""


def hybrid_revision(head_revision: str) -> str:
    """The hybrid revision name over a head revision."""
    if not head_revision or head_revision.startswith(HYBRID_PREFIX):
        raise ValueError(f"{head_revision!r} cannot be a hybrid's head: name a draft head revision")
    return HYBRID_PREFIX + head_revision


def hybrid_head(revision: str) -> str | None:
    """The head revision of a hybrid revision name; None for any other name."""
    if revision.startswith(HYBRID_PREFIX) and len(revision) > len(HYBRID_PREFIX):
        return revision[len(HYBRID_PREFIX) :]
    return None


def head_of(revision: str) -> str:
    """The trainer's revision behind a served one: a hybrid's head (whose checkpoint it is
    served from), else the revision itself."""
    return hybrid_head(revision) or revision


class ProtocolError(ValueError):
    """A record read from Redis is malformed; the message says which and why."""


class TraceDecodeError(ProtocolError):
    """A trace stream entry cannot be decoded; ``reason`` says what is wrong with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- keys


def _check_label(kind: str, value: str) -> None:
    if not (isinstance(value, str) and len(value) <= 63 and _DNS_LABEL.match(value)):
        raise ValueError(
            f"{kind} {value!r} is not a valid Kubernetes name: use a DNS-1123 label "
            "(at most 63 lowercase letters, digits or '-', starting and ending with a "
            "letter or digit), e.g. 'smollm2-chat'"
        )


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one Speculator, all under ``aurora:{namespace}:{name}:``."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        _check_label("namespace", self.namespace)
        _check_label("Speculator name", self.name)

    @property
    def prefix(self) -> str:
        return f"aurora:{self.namespace}:{self.name}"

    @property
    def traces(self) -> str:
        """Stream: one packed trace per finished (sampled) request."""
        return f"{self.prefix}:traces"

    @property
    def dead_letter(self) -> str:
        """Stream: trace entries no consumer could decode, with the reason."""
        return f"{self.prefix}:traces:dead"

    @property
    def stats(self) -> str:
        """Stream: one RequestStats per finished request, every revision and arm."""
        return f"{self.prefix}:stats"

    @property
    def candidates(self) -> str:
        """Hash: revision → JSON CandidateRecord."""
        return f"{self.prefix}:candidates"

    @property
    def desired(self) -> str:
        """String: JSON DesiredState (what the operator wants served)."""
        return f"{self.prefix}:desired"

    @property
    def loaded(self) -> str:
        """Hash: server id → JSON LoadedReport (what each server has loaded)."""
        return f"{self.prefix}:loaded"

    @property
    def rollout(self) -> str:
        """String: JSON rollout state (local mode keeps it here; the operator in status)."""
        return f"{self.prefix}:rollout"

    @property
    def trainer(self) -> str:
        """Hash: trainer status fields."""
        return f"{self.prefix}:trainer"

    def restart_slot(self, index: int) -> str:
        """String (with a TTL): the server restarting its engine into another draft in
        slot ``index``; SGLang servers take a slot before they restart, so only a few
        restart at once."""
        return f"{self.prefix}:restart:{index}"

    def all_patterns(self) -> list[str]:
        """SCAN patterns matching every key of this Speculator (and no other's)."""
        return [f"{self.prefix}:*"]


# ------------------------------------------------------------------------ records

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class VerifyStep(BaseModel):
    """One verify step: the draft proposed ``proposed``, the target accepted the first
    ``accepted`` of them and emitted one more token (its correction, or the bonus
    token when all were accepted). ``topk_*``, when the engine has them, are the
    target's top-K ids and log-probs at each proposed position (len(proposed) × K)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=True)

    proposed: list[TokenId] = Field(max_length=MAX_PROPOSAL)
    accepted: int = Field(ge=0, le=MAX_PROPOSAL)
    topk_ids: list[list[TokenId]] | None = None
    topk_logprobs: list[list[float]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> VerifyStep:
        k = len(self.proposed)
        if self.accepted > k:
            raise ValueError(f"accepted={self.accepted} exceeds the {k} proposed tokens")
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("topk_ids and topk_logprobs must be given together (or neither)")
        if self.topk_ids is None or self.topk_logprobs is None:
            return self
        if len(self.topk_ids) != k or len(self.topk_logprobs) != k:
            raise ValueError(
                f"top-k must have one row per proposed token: {k} proposed, "
                f"{len(self.topk_ids)} topk_ids rows, {len(self.topk_logprobs)} topk_logprobs rows"
            )
        widths = {len(row) for row in self.topk_ids} | {len(row) for row in self.topk_logprobs}
        if len(widths) > 1 or 0 in widths:
            raise ValueError(
                f"top-k rows must all have the same width K ≥ 1, got widths {sorted(widths)}"
            )
        for row in self.topk_logprobs:
            for value in row:
                if math.isnan(value) or value == math.inf:
                    raise ValueError(f"topk_logprobs holds {value}: log-probs are ≤ 0 or -inf")
        return self

    @property
    def topk_width(self) -> int:
        """K, or 0 when this step carries no top-k (or proposed nothing)."""
        return len(self.topk_ids[0]) if self.topk_ids else 0


class TraceRecord(BaseModel):
    """One finished request as the target generated it, with every verify step.

    Alignment rule (enforced): ``output_ids[0]`` is the target's prefill token (both
    engines emit it before any verify step); step i then emits ``accepted + 1`` tokens
    starting at output position ``step_positions()[i]`` (1, then cumulative). The output
    may be cut anywhere by EOS, max tokens or a stop string (a stop string can span
    steps), so the steps may describe more tokens than ``output_ids`` keeps, never
    fewer: ``len(output_ids) <= 1 + Σ(accepted + 1)``. Every accepted proposal that
    survived the cut must equal the output token at its position, and the first rejected
    one must differ from the token the target emitted there. ``steps=[]`` is plain
    decoding (no speculation) and is valid with any output."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    trace_id: str = Field(min_length=1)
    schema_version: int = SCHEMA_VERSION
    revision: str = ""
    server: str
    domain: str = ""
    prompt_ids: list[TokenId]
    output_ids: list[TokenId]
    steps: list[VerifyStep] = Field(default_factory=list)
    temperature: float = Field(ge=0.0)
    created: float = Field(default_factory=time.time, ge=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> TraceRecord:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported (this code speaks {SCHEMA_VERSION})"
            )
        if not self.steps:
            return self
        widths = {s.topk_width for s in self.steps if s.topk_width}
        if len(widths) > 1:
            raise ValueError(f"top-k width K must be the same in every step, got {sorted(widths)}")
        positions = self.step_positions()
        emitted = positions[-1] + self.steps[-1].accepted + 1
        if len(self.output_ids) > emitted:
            raise ValueError(
                f"output_ids has {len(self.output_ids)} tokens but the {len(self.steps)} verify steps "
                f"emitted only {emitted} (1 prefill token + Σ(accepted + 1)): a step is missing"
            )
        for i, (at, step) in enumerate(zip(positions, self.steps, strict=True)):
            kept = self.output_ids[at : at + step.accepted]
            if kept != step.proposed[: len(kept)]:
                raise ValueError(
                    f"steps[{i}] accepted proposed tokens {step.proposed[: len(kept)]} but "
                    f"output_ids[{at}:{at + len(kept)}] is {kept}: steps must start at output "
                    "position 1, after the prefill token"
                )
            fixed = at + step.accepted  # where the target emitted its own token
            rejected = step.proposed[step.accepted : step.accepted + 1]
            if rejected and self.output_ids[fixed : fixed + 1] == rejected:
                raise ValueError(
                    f"steps[{i}] rejected proposed token {rejected[0]} but the target emitted "
                    f"that same token at output position {fixed}: a rejected proposal differs "
                    "from the target's token (greedy and speculative sampling alike); the "
                    "step's accepted count is wrong"
                )
        return self

    def step_positions(self) -> list[int]:
        """Output position of the first token each step emitted (see the class rule).
        Steps at positions beyond ``len(output_ids)`` were cut off with the output."""
        positions, at = [], 1
        for step in self.steps:
            positions.append(at)
            at += step.accepted + 1
        return positions

    @property
    def topk_width(self) -> int:
        """K of the top-k the steps carry, 0 when none do."""
        return max((s.topk_width for s in self.steps), default=0)


class EngineStep(Protocol):
    """One verify step as an engine records it (the torch engine's StepRecord)."""

    @property
    def proposed(self) -> list[int]: ...
    @property
    def accepted(self) -> int: ...
    @property
    def topk_ids(self) -> list[list[int]] | None: ...
    @property
    def topk_logprobs(self) -> list[list[float]] | None: ...


class EngineGeneration(Protocol):
    """A finished generation as an engine records it (the torch engine's Generation)."""

    @property
    def prompt_ids(self) -> list[int]: ...
    @property
    def output_ids(self) -> list[int]: ...
    @property
    def steps(self) -> Sequence[EngineStep]: ...


def build_trace(
    generation: EngineGeneration, *, revision: str, server: str, domain: str, temperature: float
) -> TraceRecord:
    """The TraceRecord of a finished generation, whichever engine decoded it: prompt,
    output, and every verify step with what the draft proposed, how many were accepted
    and, when the engine recorded it, the target's top-k at the proposed positions."""
    return TraceRecord(
        trace_id=uuid.uuid4().hex,
        revision=revision,
        server=server,
        domain=domain,
        prompt_ids=generation.prompt_ids,
        output_ids=generation.output_ids,
        steps=[
            VerifyStep(
                proposed=step.proposed,
                accepted=step.accepted,
                topk_ids=step.topk_ids,
                topk_logprobs=step.topk_logprobs,
            )
            for step in generation.steps
        ],
        temperature=temperature,
    )


# -------------------------------------------------------------------- trace codec

# Entry fields. Small ones are plain strings; token ids and per-step arrays are packed
# little-endian: uint32 ids, uint16 per-step counts, uint8 flags, float16 log-probs.
_PACKED_FIELDS = {
    "prompt_ids": "I",
    "output_ids": "I",
    "proposed_len": "H",  # per step: how many tokens the draft proposed
    "accepted": "H",  # per step: how many the target accepted
    "proposed_ids": "I",  # all steps' proposals, concatenated
    "topk_steps": "B",  # per step: 1 when it carries top-k; empty when no step does
    "topk_ids": "I",  # rows of K ids, for each proposed token of each flagged step
    "topk_logprobs": "e",  # float16, same layout as topk_ids
}


def _pack(code: str, values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}{code}", *values)


def _float16(value: float) -> float:
    # float16 tops out at 65504; anything below is a probability of ~0 anyway.
    return -math.inf if value < -FLOAT16_MAX else min(value, FLOAT16_MAX)


def encode_trace(record: TraceRecord) -> dict[str, bytes]:
    """Pack a trace into XADD fields (see ``_PACKED_FIELDS`` for the layout)."""
    steps = record.steps
    k = record.topk_width
    with_topk = any(s.topk_ids is not None for s in steps)
    topk_ids: list[int] = []
    topk_logprobs: list[float] = []
    for step in steps:
        for ids, logprobs in zip(step.topk_ids or [], step.topk_logprobs or [], strict=True):
            topk_ids.extend(ids)
            topk_logprobs.extend(_float16(v) for v in logprobs)
    text = {
        "schema": str(record.schema_version),
        "trace_id": record.trace_id,
        "revision": record.revision,
        "server": record.server,
        "domain": record.domain,
        "temperature": repr(record.temperature),
        "created": repr(record.created),
        "topk_k": str(k),
    }
    packed: dict[str, Sequence[float]] = {
        "prompt_ids": record.prompt_ids,
        "output_ids": record.output_ids,
        "proposed_len": [len(s.proposed) for s in steps],
        "accepted": [s.accepted for s in steps],
        "proposed_ids": [t for s in steps for t in s.proposed],
        "topk_steps": [int(s.topk_ids is not None) for s in steps] if with_topk else [],
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
    }
    fields = {name: value.encode() for name, value in text.items()}
    fields.update({name: _pack(_PACKED_FIELDS[name], values) for name, values in packed.items()})
    return fields


def _normalise(fields: Mapping[bytes | str, Any]) -> dict[str, Any]:
    try:
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): v for k, v in (fields or {}).items()
        }
    except UnicodeDecodeError as error:
        raise TraceDecodeError(f"a field name is not UTF-8: {error}") from None


def _text(fields: dict[str, Any], name: str) -> str:
    if name not in fields:
        raise TraceDecodeError(f"missing field {name!r}")
    value = fields[name]
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode()
    except (UnicodeDecodeError, TypeError) as error:
        raise TraceDecodeError(f"field {name!r} is not UTF-8 text: {error}") from None


def _unpack(fields: dict[str, Any], name: str) -> list[Any]:
    if name not in fields:
        raise TraceDecodeError(f"missing field {name!r}")
    raw = fields[name]
    if isinstance(raw, str):
        raise TraceDecodeError(
            f"field {name!r} arrived as text, not bytes: read traces with a Redis client "
            "created with decode_responses=False"
        )
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TraceDecodeError(f"field {name!r} holds {type(raw).__name__}, not packed bytes")
    code = _PACKED_FIELDS[name]
    size = struct.calcsize(f"<{code}")
    if len(raw) % size:
        raise TraceDecodeError(
            f"field {name!r} has {len(raw)} bytes, not a whole number of {size}-byte values (truncated?)"
        )
    return list(struct.unpack(f"<{len(raw) // size}{code}", raw))


def _number(fields: dict[str, Any], name: str, kind: type[int] | type[float]) -> Any:
    text = _text(fields, name)
    try:
        return kind(text)
    except ValueError:
        raise TraceDecodeError(f"field {name!r} is {text!r}, not a {kind.__name__}") from None


def decode_trace(fields: Mapping[bytes | str, Any]) -> TraceRecord:
    """Unpack XADD fields into a validated TraceRecord.

    Raises TraceDecodeError naming what is wrong: a missing field, an unsupported schema
    version, bytes that do not unpack, or a record that fails validation. Never raises
    anything else for malformed input, so a consumer can dead-letter and carry on."""
    try:
        return _decode(_normalise(fields))
    except TraceDecodeError:
        raise
    except ValidationError as error:
        raise TraceDecodeError(f"invalid trace: {_describe(error)}") from None
    except (ValueError, TypeError, struct.error, OverflowError) as error:
        raise TraceDecodeError(f"cannot decode trace: {error}") from None


def _decode(fields: dict[str, Any]) -> TraceRecord:
    schema = _number(fields, "schema", int)
    if schema != SCHEMA_VERSION:
        raise TraceDecodeError(
            f"schema version {schema} is not supported (this reader supports {SCHEMA_VERSION}): "
            "run the same Aurora version in servers and trainer"
        )
    k = _number(fields, "topk_k", int)
    proposed_len = _unpack(fields, "proposed_len")
    accepted = _unpack(fields, "accepted")
    proposed_ids = _unpack(fields, "proposed_ids")
    flags = _unpack(fields, "topk_steps")
    topk_ids = _unpack(fields, "topk_ids")
    topk_logprobs = _unpack(fields, "topk_logprobs")
    n_steps = len(proposed_len)
    if len(accepted) != n_steps:
        raise TraceDecodeError(f"{n_steps} proposal lengths but {len(accepted)} accepted counts")
    if sum(proposed_len) != len(proposed_ids):
        raise TraceDecodeError(
            f"proposal lengths add up to {sum(proposed_len)} tokens but proposed_ids holds {len(proposed_ids)}"
        )
    if flags and (len(flags) != n_steps or set(flags) - {0, 1}):
        raise TraceDecodeError(
            f"topk_steps must hold one 0/1 flag per step ({n_steps}), got {flags[:8]}…"
        )
    rows = sum(n for n, flag in zip(proposed_len, flags, strict=True) if flag) if flags else 0
    if k < 0 or (rows and k == 0) or len(topk_ids) != rows * k or len(topk_logprobs) != rows * k:
        raise TraceDecodeError(
            f"top-k of {rows} rows × K={k} needs {rows * k} values, got {len(topk_ids)} ids and "
            f"{len(topk_logprobs)} log-probs"
        )
    steps, at, row = [], 0, 0
    for i, (n, acc) in enumerate(zip(proposed_len, accepted, strict=True)):
        step: dict[str, Any] = {"proposed": proposed_ids[at : at + n], "accepted": acc}
        at += n
        if flags and flags[i]:
            span = range(row * k, (row + n) * k, k or 1)  # k = 0 only with n = 0
            step["topk_ids"] = [topk_ids[j : j + k] for j in span]
            step["topk_logprobs"] = [topk_logprobs[j : j + k] for j in span]
            row += n
        steps.append(step)
    return TraceRecord.model_validate(
        {
            "trace_id": _text(fields, "trace_id"),
            "schema_version": schema,
            "revision": _text(fields, "revision"),
            "server": _text(fields, "server"),
            "domain": _text(fields, "domain"),
            "prompt_ids": _unpack(fields, "prompt_ids"),
            "output_ids": _unpack(fields, "output_ids"),
            "steps": steps,
            "temperature": _number(fields, "temperature", float),
            "created": _number(fields, "created", float),
        }
    )


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_maxlen(maxlen: int | None) -> None:
    if maxlen is not None and maxlen < 1:
        raise ValueError(
            f"maxlen={maxlen}: a stream bound must be at least 1 (or None for unbounded)"
        )


def publish_trace(client: redis.Redis, keys: Keys, record: TraceRecord, maxlen: int | None) -> str:
    """XADD one trace; the stream is trimmed to about ``maxlen`` entries (approximate
    MAXLEN, so Redis trims whole nodes cheaply). Returns the entry id."""
    _check_maxlen(maxlen)
    entry_id = client.xadd(keys.traces, encode_trace(record), maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return _str(entry_id)


def dead_letter(
    client: redis.Redis,
    keys: Keys,
    entry_id: bytes | str,
    fields: Mapping[bytes | str, Any] | None,
    reason: str,
    maxlen: int | None,
) -> str:
    """Copy a malformed trace entry to the dead-letter stream with ``reason`` and
    ``source_id`` (its id in the trace stream). Returns the dead-letter entry id."""
    _check_maxlen(maxlen)
    copy: dict[Any, Any] = dict(fields or {})
    copy["reason"] = reason
    copy["source_id"] = _str(entry_id)
    return _str(client.xadd(keys.dead_letter, copy, maxlen=maxlen, approximate=True))


def decode_entries(
    entries: Iterable[tuple[bytes | str, Mapping[bytes | str, Any] | None]],
) -> tuple[list[tuple[str, TraceRecord]], list[tuple[str, dict[Any, Any], str]]]:
    """Decode stream entries (as XRANGE, XREADGROUP or XAUTOCLAIM return them) into
    (good: [(id, record)], bad: [(id, fields, reason)]). An entry whose fields are
    None was trimmed away while pending; it is bad, with a reason saying so."""
    good: list[tuple[str, TraceRecord]] = []
    bad: list[tuple[str, dict[Any, Any], str]] = []
    for raw_id, fields in entries:
        entry_id = _str(raw_id)
        if not fields:
            bad.append((entry_id, {}, "entry has no fields: trimmed by MAXLEN before it was read"))
            continue
        try:
            good.append((entry_id, decode_trace(fields)))
        except TraceDecodeError as error:
            bad.append((entry_id, dict(fields), error.reason))
    return good, bad


# -------------------------------------------------------------------------- stats

_M = TypeVar("_M", bound=BaseModel)
_RECORD = ConfigDict(
    frozen=True, extra="ignore", allow_inf_nan=False
)  # newer writers may add fields


class RequestStats(BaseModel):
    """What one finished request measured. ``arm`` says how it was served: by the
    stable revision, by the candidate (canary), or without speculation (baseline)."""

    model_config = _RECORD

    revision: str
    arm: Literal["stable", "candidate", "baseline"]
    server: str
    decode_tokens_per_s: float = Field(ge=0.0)
    accept_length: float = Field(ge=1.0)  # tokens per verify step incl. the bonus; 1.0 plain
    new_tokens: int = Field(ge=0)
    verify_steps: int = Field(ge=0)
    latency_s: float = Field(ge=0.0)
    domain: str = ""
    created: float = Field(default_factory=time.time)
    # Added later; entries from older writers decode with these defaults.
    decode_s: float | None = Field(default=None, ge=0.0)  # after the first token; None: derived
    prompt_tokens: int = Field(default=0, ge=0)  # 0: unknown
    cohort: str = ""  # batch cohort routed to its arm as one; "": routed alone
    batch_rows: float = Field(default=1.0, ge=0.0)  # mean rows per verify step it decoded with

    @property
    def decode_tokens(self) -> int:
        """Tokens decoded after the first (the first comes with the prefill)."""
        return max(0, self.new_tokens - 1)

    @property
    def decode_seconds(self) -> float:
        """Decode time: as written, or from tokens and rate for entries without it."""
        if self.decode_s is not None:
            return self.decode_s
        rate = self.decode_tokens_per_s
        return self.decode_tokens / rate if rate > 0 else 0.0


class StatsPage(list[tuple[str, RequestStats]]):
    """read_stats' answer: the well-formed (id, stats) entries in stream order, plus
    ``malformed`` (entries skipped) and ``last_id`` (the last id read, malformed or
    not: pass it as ``since_id`` to continue)."""

    malformed: int = 0
    last_id: str | None = None


def publish_stats(client: redis.Redis, keys: Keys, stats: RequestStats, maxlen: int | None) -> str:
    """XADD one request's stats (fields as plain strings); returns the entry id."""
    _check_maxlen(maxlen)
    dumped = stats.model_dump(mode="json", exclude_none=True)
    fields = {name: str(value) for name, value in dumped.items()}
    return _str(client.xadd(keys.stats, fields, maxlen=maxlen, approximate=True))  # type: ignore[arg-type]


def read_stats(
    client: redis.Redis, keys: Keys, since_id: str = "-", count: int | None = None
) -> StatsPage:
    """Stats entries after ``since_id`` (exclusive; "-" reads from the start), oldest
    first, at most ``count`` entries read. Malformed entries are skipped, counted in
    ``malformed`` and logged, not dead-lettered: stats are re-read by every poller, and
    one bad writer must not stop a rollout decision."""
    start = since_id if since_id == "-" else f"({since_id}"
    page = StatsPage()
    for raw_id, fields in client.xrange(keys.stats, min=start, max="+", count=count):  # type: ignore[union-attr]
        page.last_id = _str(raw_id)
        try:
            values = {_str(k): _str(v) for k, v in (fields or {}).items()}
            page.append((page.last_id, RequestStats.model_validate(values)))
        except (ValidationError, UnicodeDecodeError) as error:
            page.malformed += 1
            log.warning(
                "skipping malformed stats entry %s in %s: %s", page.last_id, keys.stats, error
            )
    return page


# ------------------------------------------------- candidates, desired and loaded


class CandidateRecord(BaseModel):
    """A draft revision the trainer offers for rollout: its checkpoint and evaluation
    (offline accept lengths, e.g. {"candidate": 2.4, "stable": 2.1, "per_domain": {…}})."""

    model_config = _RECORD

    revision: str = Field(min_length=1)
    parent: str | None = None
    path: str  # checkpoint directory, as servers see it (on a shared volume)
    sha256: str  # of draft.safetensors
    # Where servers download it when they share no volume with the trainer
    # (aurora.runtime.fetch checks the sha256 above before anything loads it).
    url: str | None = None
    created: float = Field(default_factory=time.time)
    step: int = Field(ge=0)
    traces_seen: int = Field(ge=0)
    evaluation: dict[str, Any] = Field(default_factory=dict)

    def _evaluated(self, key: str) -> float | None:
        value = self.evaluation.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None

    @property
    def offline_accept_length(self) -> float | None:
        """The candidate's accept length in the trainer's offline evaluation."""
        return self._evaluated("candidate")

    @property
    def stable_offline_accept_length(self) -> float | None:
        """The stable revision's accept length in the same evaluation."""
        return self._evaluated("stable")

    @property
    def loadable(self) -> bool:
        """False when the trainer knows the checkpoint to be broken ("loadable": false)."""
        return self.evaluation.get("loadable", True) is not False


class RevisionRef(BaseModel):
    """A draft revision and where its checkpoint lives."""

    model_config = _RECORD

    revision: str = Field(min_length=1)
    path: str


class DesiredState(BaseModel):
    """What the operator (or local mode) wants served: the stable revision, the
    candidate on canary with its share of requests, and the baseline share served
    without speculation. ``generation`` increases with every change."""

    model_config = _RECORD

    stable: RevisionRef | None = None
    candidate: RevisionRef | None = None
    candidate_share: float = Field(0.0, ge=0.0, le=1.0)
    baseline_share: float = Field(0.0, ge=0.0, le=1.0)
    generation: int = Field(0, ge=0)
    updated: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _consistent(self) -> DesiredState:
        if self.candidate is None and self.candidate_share > 0:
            raise ValueError(
                f"candidate_share={self.candidate_share} needs a candidate revision (or share 0)"
            )
        if self.candidate_share + self.baseline_share > 1.0:
            raise ValueError(
                f"candidate_share {self.candidate_share} + baseline_share {self.baseline_share} exceeds 1"
            )
        return self


class LoadedReport(BaseModel):
    """What one server has loaded; ``error`` says why a desired revision is not;
    ``pause_ms`` is how long the last swap paused decoding and ``swapped`` when (wall clock)
    that swap took effect, so a reader can time a rollout from checkpoint to server."""

    model_config = _RECORD

    server: str = Field(min_length=1)
    stable: str | None = None
    candidate: str | None = None
    error: str | None = None
    # the revision `error` is about; absent, it counts against any desired revision the
    # server has not loaded
    error_revision: str | None = None
    pause_ms: float | None = Field(None, ge=0.0)
    swapped: float | None = Field(None, ge=0.0)
    updated: float = Field(default_factory=time.time)


def offer_candidate(client: redis.Redis, keys: Keys, record: CandidateRecord) -> None:
    """Publish (or replace) a candidate under its revision."""
    client.hset(keys.candidates, record.revision, record.model_dump_json())


def list_candidates(client: redis.Redis, keys: Keys) -> list[CandidateRecord]:
    """Every offered candidate, oldest (lowest step) first; malformed ones are logged and skipped."""
    records = []
    for revision, value in client.hgetall(keys.candidates).items():
        try:
            records.append(CandidateRecord.model_validate_json(value))
        except ValidationError as error:
            log.warning(
                "skipping malformed candidate %r in %s: %s", revision, keys.candidates, error
            )
    return sorted(records, key=lambda r: (r.step, r.created, r.revision))


def get_candidate(client: redis.Redis, keys: Keys, revision: str) -> CandidateRecord | None:
    """One candidate, or None when it was never offered (or was withdrawn)."""
    value = client.hget(keys.candidates, revision)
    return (
        None if value is None else _parse(CandidateRecord, value, f"{keys.candidates}[{revision}]")
    )


def withdraw_candidate(client: redis.Redis, keys: Keys, revision: str) -> bool:
    """Remove a candidate (e.g. once rejected or its checkpoint pruned); True if it existed."""
    return bool(client.hdel(keys.candidates, revision))


def set_desired(client: redis.Redis, keys: Keys, state: DesiredState) -> None:
    client.set(keys.desired, state.model_dump_json())


def get_desired(client: redis.Redis, keys: Keys) -> DesiredState | None:
    """The desired state, or None when none was set. Raises ProtocolError when the
    stored value is malformed: servers must keep what they serve rather than guess."""
    value = client.get(keys.desired)
    return None if value is None else _parse(DesiredState, value, keys.desired)


def report_loaded(client: redis.Redis, keys: Keys, report: LoadedReport) -> None:
    client.hset(keys.loaded, report.server, report.model_dump_json())


def get_loaded(client: redis.Redis, keys: Keys) -> dict[str, LoadedReport]:
    """server id → its last report; malformed reports are logged and skipped."""
    reports = {}
    for server, value in client.hgetall(keys.loaded).items():
        try:
            reports[_str(server)] = LoadedReport.model_validate_json(value)
        except ValidationError as error:
            log.warning("skipping malformed loaded report %r in %s: %s", server, keys.loaded, error)
    return reports


def _parse(model: type[_M], value: bytes | str, where: str) -> _M:
    try:
        return model.model_validate_json(value)
    except ValidationError as error:
        raise ProtocolError(f"malformed {model.__name__} in {where}: {_describe(error)}") from None


def connect(url: str, password: str | None = None, *, timeout: float | None = 2.0) -> redis.Redis:
    """A Redis client for ``url`` (connects lazily). The password comes from the URL,
    else ``password``, else $AURORA_REDIS_PASSWORD (from a Secret in Kubernetes).

    With a ``timeout`` the client fails fast: short socket timeouts and no hidden
    retries, for callers that retry with their own backoff (servers, the operator's
    timer). ``timeout=None`` keeps redis-py's defaults, for blocking stream reads (the
    trainer). ``rediss://`` is TLS, verified against the system CAs or the bundle in
    $AURORA_REDIS_CA_FILE. A user in the URL (``redis://USER@host``) authenticates as
    that ACL user. A malformed URL raises ValueError naming it."""
    password = password or os.environ.get("AURORA_REDIS_PASSWORD") or None
    options: dict[str, Any] = {}
    ca_file = os.environ.get("AURORA_REDIS_CA_FILE")
    if ca_file and url.startswith("rediss://"):
        options["ssl_ca_certs"] = ca_file
    if timeout is not None:
        options.update(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=10,
        )
    try:
        if password and not redis.connection.parse_url(url).get("password"):
            options["password"] = password
        return redis.Redis.from_url(url, **options)
    except ValueError as error:
        raise ValueError(
            f"{url.split('@')[-1]!r} is not a Redis URL ({error}): use redis://HOST:PORT/DB"
        ) from None


_MAX_LAG_SCAN = 1_000  # Redis < 7 only: the never-delivered count stops there


def trace_lag(client: redis.Redis, keys: Keys) -> int:
    """Traces published but not yet incorporated by the trainer: for the slowest
    consumer group, entries never delivered plus entries delivered but not acked.
    Without a group (no trainer yet) every trace in the stream is lag. The operator's
    status, its metric and the trainer's own status all report this figure."""
    if not client.exists(keys.traces):
        return 0
    groups = client.xinfo_groups(keys.traces)
    if not groups:
        return int(client.xlen(keys.traces))
    worst = 0
    for group in groups:
        pending = int(group.get("pending") or 0)
        lag = group.get("lag")
        if lag is None:  # Redis < 7: count what was never delivered, bounded
            last = group.get("last-delivered-id") or b"0-0"
            last = last.decode() if isinstance(last, bytes) else str(last)
            lag = len(
                client.xrange(keys.traces, min=f"({last}", max="+", count=_MAX_LAG_SCAN) or []
            )
        worst = max(worst, int(lag) + pending)
    return worst


def delete_all(client: redis.Redis, keys: Keys) -> int:
    """Delete every key of this Speculator (SCAN, never KEYS); returns how many."""
    deleted = 0
    for pattern in keys.all_patterns():
        batch: list[Any] = []
        for key in client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch = []
        if batch:
            deleted += int(client.delete(*batch))
    return deleted
