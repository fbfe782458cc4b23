"""The trace codec, key naming and record models, without Redis."""

from __future__ import annotations

import json
import math
import random
import struct
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aurora.runtime import protocol
from aurora.runtime.protocol import (
    MAX_TOKEN_ID,
    SCHEMA_VERSION,
    CandidateRecord,
    DesiredState,
    Keys,
    LoadedReport,
    RequestStats,
    RevisionRef,
    TraceDecodeError,
    TraceRecord,
    VerifyStep,
    decode_entries,
    decode_trace,
    encode_trace,
)

pytestmark = pytest.mark.unit

VOCAB = 49152  # SmolLM2's vocabulary size: realistic id widths for the size test


def served(
    rng: random.Random, n_steps: int, k: int, topk: int = 0, cut: int = 0, **extra: object
) -> TraceRecord:
    """A trace as an engine emits it: the prefill token, then per step the accepted
    proposals and the target's next token, the last ``cut`` tokens removed."""
    output = [rng.randrange(VOCAB)]
    steps = []
    for _ in range(n_steps):
        proposed = [rng.randrange(VOCAB) for _ in range(k)]
        accepted = rng.randint(0, k)
        output += [*proposed[:accepted], rng.randrange(VOCAB)]
        top = {}
        if topk:
            top = {
                "topk_ids": [[rng.randrange(VOCAB) for _ in range(topk)] for _ in proposed],
                # multiples of 1/8 are exact in float16, so the round trip compares equal
                "topk_logprobs": [[-rng.randrange(200) / 8 for _ in range(topk)] for _ in proposed],
            }
        steps.append(VerifyStep(proposed=proposed, accepted=accepted, **top))
    fields: dict[str, object] = {
        "trace_id": f"{rng.getrandbits(64):016x}",
        "revision": "r00000012-abcdef",
        "server": "server-0",
        "domain": "code",
        "prompt_ids": [rng.randrange(VOCAB) for _ in range(200)],
        "output_ids": output[: len(output) - cut],
        "steps": steps,
        "temperature": 0.7,
        "created": 1_767_225_600.25,
    }
    fields.update(extra)
    return TraceRecord.model_validate(fields)


# ------------------------------------------------------------------ round trips


def test_trace_with_topk_round_trips_exactly() -> None:
    record = served(random.Random(1), n_steps=30, k=5, topk=8)
    assert decode_trace(encode_trace(record)) == record


def test_plain_decoding_trace_round_trips() -> None:
    record = TraceRecord(
        trace_id="t1", server="s", prompt_ids=[1, 2], output_ids=[3, 4, 5], temperature=0.0
    )
    decoded = decode_trace(encode_trace(record))
    assert decoded == record
    assert decoded.steps == [] and decoded.revision == ""


def test_steps_without_proposals_keep_none_and_empty_topk_apart() -> None:
    # Given a step with no proposal (budget exhausted) that carries an empty top-k,
    # next to one without top-k at all
    record = TraceRecord(
        trace_id="t",
        server="s",
        prompt_ids=[1],
        output_ids=[9, 7, 8, 6],
        temperature=0.0,
        steps=[
            VerifyStep(proposed=[7], accepted=1, topk_ids=[[7, 2]], topk_logprobs=[[-0.5, -2.0]]),
            VerifyStep(proposed=[], accepted=0, topk_ids=[], topk_logprobs=[]),
            VerifyStep(proposed=[], accepted=0),
        ],
    )
    # Then both come back as they were
    decoded = decode_trace(encode_trace(record))
    assert decoded.steps[1].topk_ids == [] and decoded.steps[2].topk_ids is None
    assert decoded == record


def test_the_largest_uint32_token_id_round_trips_and_larger_ones_are_refused() -> None:
    record = TraceRecord(
        trace_id="t",
        server="s",
        prompt_ids=[0, MAX_TOKEN_ID],
        output_ids=[MAX_TOKEN_ID, MAX_TOKEN_ID, 5],
        temperature=1.0,
        steps=[VerifyStep(proposed=[MAX_TOKEN_ID, 4], accepted=1)],
    )
    assert decode_trace(encode_trace(record)) == record
    with pytest.raises(ValidationError, match="prompt_ids"):
        TraceRecord(
            trace_id="t", server="s", prompt_ids=[MAX_TOKEN_ID + 1], output_ids=[], temperature=0
        )
    with pytest.raises(ValidationError, match="proposed"):
        VerifyStep(proposed=[-1], accepted=0)


def test_logprobs_travel_as_float16() -> None:
    # Given log-probs that float16 cannot hold exactly, or at all
    step = VerifyStep(
        proposed=[3], accepted=1, topk_ids=[[3, 4, 5]], topk_logprobs=[[-0.1, -1e6, -math.inf]]
    )
    record = TraceRecord(
        trace_id="t", server="s", prompt_ids=[1], output_ids=[2, 3, 4], temperature=0, steps=[step]
    )
    # When they round-trip
    logprobs = decode_trace(encode_trace(record)).steps[0].topk_logprobs
    # Then they are rounded to float16, and below its range they become -inf
    assert logprobs is not None
    assert logprobs[0][0] == pytest.approx(-0.1, abs=1e-3)
    assert logprobs[0][1:] == [-math.inf, -math.inf]


@st.composite
def traces(draw: st.DrawFn) -> TraceRecord:
    rng = random.Random(draw(st.integers(0, 2**32)))
    n_steps, k = draw(st.integers(0, 12)), draw(st.integers(0, 6))
    record = served(rng, n_steps, k, topk=draw(st.sampled_from([0, 1, 4])))
    emitted = len(record.output_ids)
    cut = draw(st.integers(0, emitted))  # EOS, max tokens or a stop string
    return record.model_copy(update={"output_ids": record.output_ids[: emitted - cut]})


@settings(max_examples=60, deadline=None)
@given(traces())
def test_any_served_trace_round_trips(record: TraceRecord) -> None:
    TraceRecord.model_validate(record.model_dump())  # the cut trace is still valid
    assert decode_trace(encode_trace(record)) == record


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupted_entries_decode_or_raise_trace_decode_error_only(data: st.DataObject) -> None:
    # Given a valid entry with one field's bytes replaced by arbitrary bytes
    fields = encode_trace(served(random.Random(7), n_steps=4, k=3, topk=2))
    name = data.draw(st.sampled_from(sorted(fields)))
    fields[name] = data.draw(st.binary(max_size=64))
    # When it is decoded, then it is a valid record or a TraceDecodeError, never a crash
    try:
        decode_trace(fields)
    except TraceDecodeError as error:
        assert error.reason


def test_packing_is_much_smaller_than_json() -> None:
    # Given traces with realistic ids and log-probs (the torch engine rounds to 4 places)
    rng = random.Random(2)
    plain = served(rng, n_steps=40, k=5)
    with_topk = served(rng, n_steps=40, k=5, topk=8)
    steps = [
        step.model_copy(
            update={
                "topk_logprobs": [
                    [round(-rng.expovariate(0.3), 4) for _ in row] for row in step.topk_ids or []
                ]
            }
        )
        for step in with_topk.steps
    ]
    for record in (plain, with_topk.model_copy(update={"steps": steps})):
        # Then the packed entry, field names included, is under half the JSON
        packed = sum(len(name) + len(value) for name, value in encode_trace(record).items())
        assert packed < 0.5 * len(record.model_dump_json())


# ------------------------------------------------------------ malformed entries


def encoded() -> dict[str, bytes]:
    return encode_trace(served(random.Random(3), n_steps=6, k=4, topk=2))


def u16(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}H", *values)


@pytest.mark.parametrize("name", sorted(encoded()))
def test_a_missing_field_is_named(name: str) -> None:
    fields = encoded()
    del fields[name]
    with pytest.raises(TraceDecodeError, match=f"missing field '{name}'"):
        decode_trace(fields)


def test_another_schema_version_is_refused_naming_both_versions() -> None:
    fields = encoded() | {"schema": b"2"}
    with pytest.raises(TraceDecodeError) as error:
        decode_trace(fields)
    assert (
        "schema version 2" in error.value.reason
        and f"supports {SCHEMA_VERSION}" in error.value.reason
    )


@pytest.mark.parametrize("name", ["prompt_ids", "output_ids", "proposed_len", "topk_logprobs"])
def test_truncated_bytes_are_refused(name: str) -> None:
    fields = encoded()
    fields[name] = fields[name][:-1]
    with pytest.raises(TraceDecodeError, match=f"'{name}' has .* bytes, not a whole number"):
        decode_trace(fields)


def test_accepted_beyond_the_proposal_is_refused() -> None:
    record = served(random.Random(4), n_steps=1, k=2, cut=0)
    fields = encode_trace(record) | {"accepted": u16(3)}
    with pytest.raises(TraceDecodeError, match="accepted=3 exceeds the 2 proposed"):
        decode_trace(fields)


def test_output_longer_than_the_steps_emitted_is_refused() -> None:
    record = served(random.Random(5), n_steps=3, k=3)
    fields = encode_trace(record)
    fields["output_ids"] += struct.pack("<I", 42)
    with pytest.raises(TraceDecodeError, match="a step is missing"):
        decode_trace(fields)


def test_steps_counted_from_output_position_zero_are_refused() -> None:
    # Given a producer that forgot the prefill token (steps aligned to position 0)
    with pytest.raises(ValidationError, match="steps must start at output position 1"):
        TraceRecord(
            trace_id="t",
            server="s",
            prompt_ids=[1],
            output_ids=[7, 8, 9],
            temperature=0,
            steps=[VerifyStep(proposed=[7, 8], accepted=2)],
        )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"proposed_len": u16(4, 4, 4, 4, 4, 5)}, "proposal lengths add up to 25"),
        ({"accepted": u16(1, 1)}, "6 proposal lengths but 2 accepted counts"),
        ({"topk_k": b"3"}, "top-k of 24 rows × K=3"),
        ({"topk_steps": bytes([1, 1, 2, 1, 1, 1])}, "one 0/1 flag per step"),
        ({"temperature": b"warm"}, "'temperature' is 'warm', not a float"),
        ({"temperature": b"nan"}, "temperature"),
        ({"trace_id": b""}, "trace_id"),
        ({"server": b"\xff\xfe"}, "'server' is not UTF-8"),
        ({"prompt_ids": "not bytes"}, "decode_responses=False"),
    ],
)
def test_inconsistent_entries_are_refused_with_a_reason(
    change: dict[str, object], reason: str
) -> None:
    fields: dict[str, object] = {**encoded(), **change}
    with pytest.raises(TraceDecodeError) as error:
        decode_trace(fields)  # type: ignore[arg-type]
    assert reason in error.value.reason


def test_str_field_names_decode_like_bytes() -> None:
    record = served(random.Random(6), n_steps=2, k=2)
    assert decode_trace(dict(encode_trace(record).items())) == record
    assert decode_trace({k.encode(): v for k, v in encode_trace(record).items()}) == record


def test_decode_entries_separates_good_from_bad() -> None:
    good_record = served(random.Random(8), n_steps=2, k=2)
    bad_fields = encode_trace(good_record) | {"schema": b"9"}
    good, bad = decode_entries(
        [(b"1-0", encode_trace(good_record)), ("2-0", bad_fields), (b"3-0", None)]
    )
    assert good == [("1-0", good_record)]
    assert [(entry_id, reason.split(" ")[0]) for entry_id, _, reason in bad] == [
        ("2-0", "schema"),
        ("3-0", "entry"),
    ]
    assert bad[0][1] == bad_fields and "trimmed" in bad[1][2]


# ------------------------------------------------------------------- validation


def test_verify_step_shapes_are_validated() -> None:
    with pytest.raises(ValidationError, match="one row per proposed token"):
        VerifyStep(proposed=[1, 2], accepted=0, topk_ids=[[1]], topk_logprobs=[[-1.0]])
    with pytest.raises(ValidationError, match="same width"):
        VerifyStep(
            proposed=[1, 2],
            accepted=0,
            topk_ids=[[1], [1, 2]],
            topk_logprobs=[[-1.0], [-1.0, -2.0]],
        )
    with pytest.raises(ValidationError, match="together"):
        VerifyStep(proposed=[1], accepted=0, topk_ids=[[1]])
    with pytest.raises(ValidationError, match="log-probs"):
        VerifyStep(proposed=[1], accepted=0, topk_ids=[[1]], topk_logprobs=[[math.nan]])


def test_topk_width_must_agree_across_steps() -> None:
    with pytest.raises(ValidationError, match="same in every step"):
        TraceRecord(
            trace_id="t",
            server="s",
            prompt_ids=[1],
            output_ids=[5],
            temperature=0,
            steps=[
                VerifyStep(proposed=[1], accepted=0, topk_ids=[[1]], topk_logprobs=[[-1.0]]),
                VerifyStep(
                    proposed=[1], accepted=0, topk_ids=[[1, 2]], topk_logprobs=[[-1.0, -2.0]]
                ),
            ],
        )


def test_step_positions_follow_the_prefill_token() -> None:
    record = TraceRecord(
        trace_id="t",
        server="s",
        prompt_ids=[1],
        output_ids=[10, 11, 12, 13, 14],
        temperature=0,
        steps=[
            VerifyStep(proposed=[11, 99], accepted=1),
            VerifyStep(proposed=[13, 14, 15], accepted=3),
        ],
    )
    # The last step emitted 4 tokens, the output kept 2 of them (EOS)
    assert record.step_positions() == [1, 3]


# ------------------------------------------------------------------------ keys


def test_keys_live_under_the_speculator_prefix() -> None:
    keys = Keys("team-a", "smollm2-chat")
    assert keys.prefix == "aurora:team-a:smollm2-chat"
    assert (keys.traces, keys.dead_letter, keys.stats) == (
        "aurora:team-a:smollm2-chat:traces",
        "aurora:team-a:smollm2-chat:traces:dead",
        "aurora:team-a:smollm2-chat:stats",
    )
    assert {keys.candidates, keys.desired, keys.loaded, keys.rollout, keys.trainer} == {
        f"aurora:team-a:smollm2-chat:{suffix}"
        for suffix in ("candidates", "desired", "loaded", "rollout", "trainer")
    }
    assert keys.all_patterns() == ["aurora:team-a:smollm2-chat:*"]


@pytest.mark.parametrize("bad", ["", "Chat", "my_model", "-chat", "chat-", "a:b", "x" * 64, "a*"])
def test_names_that_are_not_dns_labels_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="DNS-1123 label"):
        Keys("default", bad)
    with pytest.raises(ValueError, match="namespace"):
        Keys(bad, "chat")


# ------------------------------------------------------------------- JSON records


def test_records_round_trip_through_json() -> None:
    records = [
        RequestStats(
            revision="r1",
            arm="candidate",
            server="s",
            decode_tokens_per_s=41.5,
            accept_length=2.5,
            new_tokens=64,
            verify_steps=26,
            latency_s=1.9,
            domain="code",
        ),
        CandidateRecord(
            revision="r2",
            parent="r1",
            path="/ckpt/r2",
            sha256="0" * 64,
            step=12,
            traces_seen=900,
            evaluation={"candidate": 2.4, "stable": 2.1, "per_domain": {"code": 2.9}},
        ),
        DesiredState(
            stable=RevisionRef(revision="r1", path="/ckpt/r1"),
            candidate=RevisionRef(revision="r2", path="/ckpt/r2"),
            candidate_share=0.2,
            baseline_share=0.02,
            generation=3,
        ),
        LoadedReport(
            server="s", stable="r1", candidate=None, error="sha256 mismatch", pause_ms=3.5
        ),
    ]
    for record in records:
        assert type(record).model_validate_json(record.model_dump_json()) == record


def test_records_from_newer_writers_with_extra_fields_still_parse() -> None:
    text = json.dumps({"server": "s", "stable": "r1", "updated": 1.0, "gpu": "h200"})
    assert LoadedReport.model_validate_json(text).stable == "r1"


def test_desired_state_refuses_impossible_shares() -> None:
    with pytest.raises(ValidationError, match="needs a candidate"):
        DesiredState(candidate_share=0.1)
    with pytest.raises(ValidationError, match="exceeds 1"):
        DesiredState(
            candidate=RevisionRef(revision="r", path="/p"), candidate_share=0.9, baseline_share=0.2
        )


def test_stats_refuse_non_finite_and_impossible_values() -> None:
    base = dict(
        revision="r",
        arm="stable",
        server="s",
        decode_tokens_per_s=1.0,
        accept_length=1.0,
        new_tokens=1,
        verify_steps=1,
        latency_s=0.1,
    )
    RequestStats.model_validate(base)
    for change in ({"decode_tokens_per_s": math.inf}, {"accept_length": 0.5}, {"arm": "canary"}):
        with pytest.raises(ValidationError):
            RequestStats.model_validate(base | change)


def test_connect_takes_the_password_from_url_then_argument_then_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def password(client: Any) -> Any:
        return client.connection_pool.connection_kwargs.get("password")

    monkeypatch.setenv("AURORA_REDIS_PASSWORD", "from-secret")
    assert password(protocol.connect("redis://:in-url@h:6379/0")) == "in-url"
    assert password(protocol.connect("redis://h:6379/0", "explicit")) == "explicit"
    assert password(protocol.connect("redis://h:6379/0")) == "from-secret"
    monkeypatch.delenv("AURORA_REDIS_PASSWORD")
    assert password(protocol.connect("redis://h:6379/0")) is None
    # Fail-fast clients time out; blocking readers (the trainer) keep redis-py's defaults.
    fast = protocol.connect("redis://h:6379/0", timeout=1.5)
    assert fast.connection_pool.connection_kwargs["socket_timeout"] == 1.5
    blocking = protocol.connect("redis://h:6379/0", timeout=None)
    assert blocking.connection_pool.connection_kwargs.get("socket_timeout") is None


def test_connect_refuses_a_malformed_url_without_echoing_the_password() -> None:
    with pytest.raises(ValueError, match="redis://HOST:PORT/DB") as error:
        protocol.connect("http://:secret@h:6379")
    assert "secret" not in str(error.value)


def test_any_engines_generation_becomes_a_trace_record() -> None:
    # Given: a finished generation as any engine records it (here a plain object, no torch)
    @dataclass
    class Step:
        proposed: list[int]
        accepted: int
        topk_ids: list[list[int]] | None = None
        topk_logprobs: list[list[float]] | None = None

    @dataclass
    class Generation:
        prompt_ids: list[int]
        output_ids: list[int]
        steps: list[Step]

    generation = Generation(
        [1, 2], [7, 8, 9, 4], [Step([8, 9, 5], 2, [[8], [9], [4]], [[0.0]] * 3)]
    )
    # When: it is built into a trace
    record = protocol.build_trace(
        generation, revision="r1", server="s1", domain="code", temperature=0.0
    )
    # Then: the record carries the prompt, the output and the step as recorded, and travels
    assert (record.prompt_ids, record.output_ids) == ([1, 2], [7, 8, 9, 4])
    assert [(s.proposed, s.accepted, s.topk_ids) for s in record.steps] == [
        ([8, 9, 5], 2, [[8], [9], [4]])
    ]
    assert (record.revision, record.server, record.domain) == ("r1", "s1", "code")
    assert decode_trace(encode_trace(record)) == record
    assert (
        record.trace_id
        != protocol.build_trace(
            generation, revision="r1", server="s1", domain="code", temperature=0.0
        ).trace_id
    )  # a fresh id per trace
