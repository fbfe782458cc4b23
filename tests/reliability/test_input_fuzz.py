"""Bad input never crashes a consumer: arbitrary trace stream entries decode or raise
TraceDecodeError only, and the trainer dead-letters every one it cannot decode (with
the reason) and keeps training; arbitrary Speculator specs are refused with errors
naming the field, or planned into locked-down children. Complements the per-field
corruption fuzz in tests/unit/test_protocol.py."""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from reliability_support import fresh_copies

from aurora.operator.children import desired_children
from aurora.operator.spec import SpeculatorSpec
from aurora.operator.validation import validate_semantics
from aurora.runtime import protocol
from aurora.runtime.protocol import TraceDecodeError, TraceRecord, decode_trace, encode_trace
from aurora.runtime.trainer.config import TrainerConfig
from aurora.runtime.trainer.delivery import GROUP
from aurora.runtime.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
FIELDS = sorted(
    encode_trace(
        TraceRecord(
            trace_id="t", server="s", prompt_ids=[1], output_ids=[2], steps=[], temperature=0
        )
    )
)
values = st.binary(max_size=48) | st.text(max_size=24) | st.integers().map(str)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=len(FIELDS) + 2
    )
)
@pytest.mark.unit
def test_any_stream_entry_decodes_or_raises_trace_decode_error_only(fields: dict[Any, Any]) -> None:
    try:
        record = decode_trace(fields)
    except TraceDecodeError as error:
        assert error.reason  # a reason for the dead-letter stream
    else:
        assert decode_trace(encode_trace(record)) == record


EXAMPLE = yaml.safe_load((ROOT / "manifests/examples/speculator-torch-cpu.yaml").read_text())
EXAMPLE["metadata"].update(namespace="team-a", uid="uid-1", generation=1)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, (*prefix, key))
    return out


SPEC_PATHS = [p for p in paths(EXAMPLE["spec"]) if p]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    changes=st.lists(st.tuples(st.sampled_from(SPEC_PATHS), json_values), min_size=1, max_size=3)
)
@pytest.mark.unit
def test_any_speculator_spec_is_refused_by_field_or_planned_locked_down(
    changes: list[tuple[tuple[Any, ...], Any]],
) -> None:
    # Given the example Speculator with some fields replaced by arbitrary JSON
    body = yaml.safe_load(yaml.safe_dump(EXAMPLE))
    for path, value in changes:
        node = body["spec"]
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                break
            node = node[key]
        else:
            node[path[-1]] = value
    # When the operator validates it, then it gets errors naming spec fields, never a crash
    with contextlib.suppress(ValidationError):  # a clean refusal is fine; anything else fails
        SpeculatorSpec.model_validate(body["spec"])
    errors = validate_semantics(body)
    assert all(e.startswith(("spec.", "metadata.")) for e in errors), errors
    if errors:
        return
    # and a spec it accepts plans children that all run locked down
    for child in desired_children(body):
        if child["kind"] != "Deployment":
            continue
        for container in child["spec"]["template"]["spec"]["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]


def poison(good: dict[Any, Any], rng: random.Random) -> list[dict[Any, Any]]:
    """Entries a bad writer could leave in the stream: each field missing, each field
    garbage, a future schema, and random byte flips."""
    bad = [{k: v for k, v in good.items() if k != name} for name in good]
    bad += [{**good, name: b"\xff\x00garbage"} for name in good if name != "trace_id"]
    bad.append({**good, "schema": b"99"})
    for _ in range(10):
        name = rng.choice(sorted(good))
        data = bytearray(good[name] or b"x")
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        bad.append({**good, name: bytes(data)})
    return bad


@pytest.mark.integration
@pytest.mark.slow
def test_poison_entries_land_in_the_dead_letter_stream_and_training_goes_on(
    model: tuple[Any, Any],
    served_traces: list[TraceRecord],
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    # Given a stream where poison entries are interleaved with real traces
    keys = protocol.Keys("default", "poison")
    rng = random.Random(3)
    entries = poison(encode_trace(served_traces[0]), rng)
    good_records = fresh_copies(served_traces, 1)
    ids = []
    for i, fields in enumerate(entries):
        ids.append(redis_client.xadd(keys.traces, fields).decode())
        if i % 4 == 0 and good_records:
            protocol.publish_trace(redis_client, keys, good_records.pop(), maxlen=10_000)
    for record in good_records:
        protocol.publish_trace(redis_client, keys, record, maxlen=10_000)
    good, bad = protocol.decode_entries(redis_client.xrange(keys.traces))
    expected = {entry_id for entry_id, _, _ in bad}
    assert len(expected) >= len(entries) - 10  # the crafted ones at least; flips may decode
    # a flip may also leave a well-formed trace of token ids the target does not have
    vocab = model[0].get_input_embeddings().num_embeddings
    foreign = {i for i, r in good if max([*r.prompt_ids, *r.output_ids]) >= vocab}
    assert foreign  # seed 3 makes one: it crashed the trainer before it was dead-lettered
    expected |= foreign
    learnable = len(good) - len(foreign)  # real traces, and flips that left a valid one
    # When the trainer reads the stream
    config = TrainerConfig(
        speculator="default/poison", redis_url=redis_url, checkpoint_dir=tmp_path,
        draft_vocab=512, first_candidate_after=10**6, holdout_every=0, block_ms=10,
        steps_per_trace=1,
    )  # fmt: skip
    trainer = Trainer(config, *model)
    trainer.resume()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (
        trainer.traces_seen < learnable or redis_client.xlen(keys.dead_letter) < len(expected)
    ):
        trainer.tick()
    trainer.checkpoint()
    # Then every undecodable entry is in the dead-letter stream once, with its reason
    dead = redis_client.xrange(keys.dead_letter)
    assert sorted(f[b"source_id"].decode() for _, f in dead) == sorted(expected)
    assert all(f[b"reason"] for _, f in dead)
    # and the real traces were all trained on, and nothing is left pending
    assert trainer.traces_seen == learnable
    assert redis_client.xpending(keys.traces, GROUP)["pending"] == 0
