"""The trace protocol against a real redis-server."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import redis

from aurora.runtime.protocol import (
    CandidateRecord,
    DesiredState,
    Keys,
    LoadedReport,
    ProtocolError,
    RequestStats,
    RevisionRef,
    TraceRecord,
    VerifyStep,
    dead_letter,
    decode_entries,
    delete_all,
    encode_trace,
    get_candidate,
    get_desired,
    get_loaded,
    list_candidates,
    offer_candidate,
    publish_stats,
    publish_trace,
    read_stats,
    report_loaded,
    set_desired,
    withdraw_candidate,
)

pytestmark = pytest.mark.integration

KEYS = Keys("team-a", "chat")


def trace(i: int) -> TraceRecord:
    rng = random.Random(i)
    proposed = [rng.randrange(50_000) for _ in range(4)]
    return TraceRecord(
        trace_id=f"trace-{i}",
        revision="r1",
        server="server-0",
        prompt_ids=[rng.randrange(50_000) for _ in range(32)],
        output_ids=[7, *proposed[:2], 11],
        steps=[
            VerifyStep(
                proposed=proposed,
                accepted=2,
                topk_ids=[[1, 2]] * 4,
                topk_logprobs=[[-0.5, -1.5]] * 4,
            )
        ],
        temperature=0.0,
        created=1_767_225_600.0 + i,
    )


def stats(revision: str, arm: str = "stable", tokens_per_s: float = 40.0) -> RequestStats:
    return RequestStats.model_validate(
        dict(
            revision=revision,
            arm=arm,
            server="server-0",
            decode_tokens_per_s=tokens_per_s,
            accept_length=2.0,
            new_tokens=64,
            verify_steps=32,
            latency_s=1.6,
        )
    )


def test_published_traces_read_back_and_the_stream_stays_bounded(redis_client: redis.Redis) -> None:
    # Given a trace stream bounded to about 100 entries
    maxlen = 100
    node = int(redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    # When 1000 traces are published
    ids = [publish_trace(redis_client, KEYS, trace(i), maxlen=maxlen) for i in range(1000)]
    # Then approximate trimming kept it within one stream node of the bound
    assert maxlen <= redis_client.xlen(KEYS.traces) <= maxlen + node
    # And the newest entries decode to what was published
    good, bad = decode_entries(redis_client.xrange(KEYS.traces, min=ids[-3], max="+"))
    assert bad == [] and [record for _, record in good] == [trace(i) for i in (997, 998, 999)]
    assert [entry_id for entry_id, _ in good] == ids[-3:]


def test_dead_letter_keeps_the_original_fields_with_reason_and_source(
    redis_client: redis.Redis,
) -> None:
    # Given a trace entry from a newer writer that this reader cannot decode
    fields = encode_trace(trace(1)) | {"schema": b"2"}
    source_id = redis_client.xadd(KEYS.traces, fields)  # type: ignore[arg-type]
    [(entry_id, entry_fields, reason)] = decode_entries(redis_client.xrange(KEYS.traces))[1]
    # When a consumer dead-letters it
    dead_letter(redis_client, KEYS, entry_id, entry_fields, reason, maxlen=1000)
    # Then the dead-letter stream holds the same bytes plus why and where from
    [(_, dead)] = redis_client.xrange(KEYS.dead_letter)
    assert dead[b"source_id"] == source_id
    assert b"schema version 2 is not supported" in dead[b"reason"]
    assert {k: v for k, v in dead.items() if k not in (b"reason", b"source_id")} == {
        k.encode(): v for k, v in fields.items()
    }


def test_stats_read_in_order_and_continue_after_the_last_id(redis_client: redis.Redis) -> None:
    published = [stats("r1"), stats("r2", "candidate", 52.0), stats("", "baseline", 30.0)]
    for entry in published:
        publish_stats(redis_client, KEYS, entry, maxlen=10_000)
    page = read_stats(redis_client, KEYS)
    assert [s for _, s in page] == published and page.malformed == 0
    # A poller continues from the last id and sees only what came after
    publish_stats(redis_client, KEYS, stats("r2", "candidate", 55.0), maxlen=10_000)
    later = read_stats(redis_client, KEYS, since_id=page.last_id or "-")
    assert [s.decode_tokens_per_s for _, s in later] == [55.0]
    assert [s.revision for _, s in read_stats(redis_client, KEYS, count=2)] == ["r1", "r2"]


def test_malformed_stats_are_skipped_and_counted(redis_client: redis.Redis) -> None:
    publish_stats(redis_client, KEYS, stats("r1"), maxlen=100)
    redis_client.xadd(KEYS.stats, {"revision": "r1", "arm": "stable"})  # fields missing
    dumped = stats("r1").model_dump(mode="json", exclude_none=True)
    redis_client.xadd(KEYS.stats, {**dumped, "accept_length": "NaN"})
    publish_stats(redis_client, KEYS, stats("r1", tokens_per_s=45.0), maxlen=100)
    page = read_stats(redis_client, KEYS)
    assert [s.decode_tokens_per_s for _, s in page] == [40.0, 45.0]
    assert page.malformed == 2 and page.last_id == page[-1][0]


@pytest.fixture
def text_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def test_stats_and_records_work_with_a_text_client(text_client: redis.Redis) -> None:
    published = stats("r1")
    publish_stats(text_client, KEYS, published, maxlen=100)
    report_loaded(text_client, KEYS, LoadedReport(server="s", stable="r1"))
    assert [s for _, s in read_stats(text_client, KEYS)] == [published]
    assert get_loaded(text_client, KEYS)["s"].stable == "r1"


def test_candidates_round_trip_sorted_by_step(redis_client: redis.Redis) -> None:
    later = CandidateRecord(
        revision="r00000020-aaaaaa", path="/c/b", sha256="b" * 64, step=20, traces_seen=2000
    )
    earlier = CandidateRecord(
        revision="r00000010-bbbbbb",
        parent=None,
        path="/c/a",
        sha256="a" * 64,
        step=10,
        traces_seen=1000,
        evaluation={"candidate": 2.4, "stable": 2.1, "per_domain": {"code": 2.8}},
    )
    offer_candidate(redis_client, KEYS, later)
    offer_candidate(redis_client, KEYS, earlier)
    redis_client.hset(KEYS.candidates, "broken", "{not json")
    assert list_candidates(redis_client, KEYS) == [earlier, later]
    assert get_candidate(redis_client, KEYS, earlier.revision) == earlier
    assert withdraw_candidate(redis_client, KEYS, earlier.revision)
    assert get_candidate(redis_client, KEYS, earlier.revision) is None
    with pytest.raises(ProtocolError, match="malformed CandidateRecord"):
        get_candidate(redis_client, KEYS, "broken")


def test_desired_state_round_trips_and_a_corrupt_one_is_an_error(redis_client: redis.Redis) -> None:
    assert get_desired(redis_client, KEYS) is None
    desired = DesiredState(
        stable=RevisionRef(revision="r1", path="/c/r1"),
        candidate=RevisionRef(revision="r2", path="/c/r2"),
        candidate_share=0.1,
        baseline_share=0.02,
        generation=4,
    )
    set_desired(redis_client, KEYS, desired)
    assert get_desired(redis_client, KEYS) == desired
    redis_client.set(KEYS.desired, '{"candidate_share": 2}')
    with pytest.raises(ProtocolError, match=f"in {KEYS.desired}"):
        get_desired(redis_client, KEYS)


def test_loaded_reports_per_server(redis_client: redis.Redis) -> None:
    first = LoadedReport(server="server-0", stable="r1", candidate="r2", pause_ms=4.0)
    second = LoadedReport(server="server-1", stable="r1", error="sha256 mismatch in /c/r2")
    report_loaded(redis_client, KEYS, first)
    report_loaded(redis_client, KEYS, second)
    report_loaded(redis_client, KEYS, first.model_copy(update={"candidate": None}))  # replaces
    redis_client.hset(KEYS.loaded, "server-2", "garbage")
    assert get_loaded(redis_client, KEYS) == {
        "server-0": first.model_copy(update={"candidate": None}),
        "server-1": second,
    }


def test_delete_all_removes_only_this_speculators_keys(redis_client: redis.Redis) -> None:
    # Given keys of this Speculator, of one whose name extends it, of another namespace
    neighbours = [Keys("team-a", "chat-2"), Keys("team-b", "chat")]
    for keys in [KEYS, *neighbours]:
        publish_trace(redis_client, keys, trace(0), maxlen=10)
        publish_stats(redis_client, keys, stats("r1"), maxlen=10)
        set_desired(redis_client, keys, DesiredState())
        redis_client.hset(keys.trainer, "step", 3)
    for i in range(600):  # enough for SCAN to take several rounds
        redis_client.set(f"{KEYS.prefix}:extra:{i}", 1)
    redis_client.set("unrelated", 1)
    # When this Speculator's keys are deleted
    deleted = delete_all(redis_client, KEYS)
    # Then none of its keys remain and every other key does
    assert deleted == 604
    assert list(redis_client.scan_iter(match=f"{KEYS.prefix}:*")) == []
    assert redis_client.dbsize() == 1 + 4 * len(neighbours)
