"""`aurora serve` end to end: the real default model behind a real uvicorn server on
loopback, a real Redis, real checkpoints. Generation lengths stay tiny (≤ 12 tokens)
so the module runs in a few minutes on two shared cores."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from live_server import LiveServer, live_servers, server_config, wait_for

from aurora.runtime.checkpoint import DRAFT_FILE, save_checkpoint
from aurora.runtime.draft import DraftConfig, EagleDraftHead, NgramProposer
from aurora.runtime.embedded_redis import EmbeddedRedis, free_port
from aurora.runtime.engine import generate
from aurora.runtime.models import load_target
from aurora.runtime.protocol import (
    DesiredState,
    Keys,
    LoadedReport,
    RevisionRef,
    decode_entries,
    get_loaded,
    read_stats,
    set_desired,
)
from aurora.runtime.server.revisions import Revision, Served

pytestmark = pytest.mark.integration

PROMPT = "def fibonacci(n):"
KEYS = Keys("default", "local")
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def model() -> tuple[Any, Any]:
    # One thread: on a shared two-core machine more threads oversubscribe and run slower.
    torch.set_num_threads(1)
    return load_target("smollm2-135m")


@pytest.fixture
def serve(model: tuple[Any, Any]) -> Iterator[Callable[..., LiveServer]]:
    with live_servers(model) as start:
        yield start


def plain_ids(model: tuple[Any, Any], prompt_ids: list[int], n: int) -> list[int]:
    target, tokenizer = model
    return generate(
        target, prompt_ids, max_new_tokens=n, eos_ids=[tokenizer.eos_token_id]
    ).output_ids


def loaded(client: redis.Redis, server_id: str = "test-server") -> LoadedReport | None:
    return get_loaded(client, KEYS).get(server_id)


def save_random_head(model: tuple[Any, Any], root: Path, revision: str, seed: int) -> Path:
    target, _ = model
    config = DraftConfig.for_target(target.config, "smollm2-135m")
    torch.manual_seed(seed)
    head = EagleDraftHead(config, target.get_input_embeddings())
    return save_checkpoint(
        root,
        revision,
        head.state_dict(),
        parent=None,
        step=seed,
        traces_seen=0,
        evaluation={},
        draft_config=config.to_dict(),
    )


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ------------------------------------------------------------------- happy paths


def test_every_endpoint_serves_greedy_output_identical_to_plain_decoding(
    model: tuple[Any, Any], serve: Callable[..., LiveServer]
) -> None:
    # given a server speculating with the n-gram draft, and the target's plain output
    _, tokenizer = model
    server = serve(draft="ngram")
    prompt_ids = tokenizer(PROMPT).input_ids
    expected = plain_ids(model, prompt_ids, 8)
    expected_text = tokenizer.decode(expected, skip_special_tokens=True)

    # when /generate decodes greedily, speculating (stable) and not (baseline)
    for arm in ("stable", "baseline"):
        body = {
            "text": PROMPT,
            "arm": arm,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0},
        }
        reply = server.post("/generate", body)
        assert reply.status_code == 200, reply.text
        result = reply.json()
        # then the output is the target's own greedy output
        assert result["output_ids"] == expected
        assert result["text"] == expected_text
        meta = result["meta_info"]
        assert meta["prompt_tokens"] == len(prompt_ids) and meta["completion_tokens"] == 8
        assert meta["finish_reason"] == {"type": "length", "length": 8}
        assert meta["arm"] == arm and meta["draft_revision"] == "ngram"
        assert (meta["spec_verify_ct"] > 0) == (arm == "stable")
        assert meta["spec_accept_length"] >= 1.0 and meta["decode_tokens_per_s"] > 0
        assert meta["e2e_latency"] > 0

    # and the OpenAI completion, from text or token ids, says the same
    for prompt in (PROMPT, prompt_ids):
        reply = server.post(
            "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0}
        )
        assert reply.status_code == 200, reply.text
        completion = reply.json()
        assert completion["object"] == "text_completion"
        assert completion["choices"][0]["text"] == expected_text
        assert completion["choices"][0]["finish_reason"] == "length"
        assert completion["usage"] == {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": 8,
            "total_tokens": len(prompt_ids) + 8,
        }
        assert reply.headers["X-Aurora-Revision"] == "ngram"

    # and chat completions apply the tokenizer's chat template
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    chat_ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    ).input_ids
    expected_chat = tokenizer.decode(plain_ids(model, chat_ids, 6), skip_special_tokens=True)
    reply = server.post(
        "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert reply.status_code == 200, reply.text
    chat = reply.json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": expected_chat}
    assert chat["usage"]["prompt_tokens"] == len(chat_ids)

    # and the verify cost drafts are sized by was refined by every verify forward served
    # (8 + 8 + 8 + 8 + 6 tokens decoded above, each after at least one forward but the first)
    cost = server.client.get("/server_info").json()["verify_cost_ms"]
    assert cost["forwards_observed"] >= 7 + 7 + 7 + 7 + 5
    assert set(cost["now"]) == set(cost["at_start"]) and cost["now"]["1"]["1"] > 0


def test_streaming_sends_text_as_it_is_decoded_and_ends_with_done(
    model: tuple[Any, Any], serve: Callable[..., LiveServer]
) -> None:
    _, tokenizer = model
    server = serve(draft="ngram")
    expected = tokenizer.decode(
        plain_ids(model, tokenizer(PROMPT).input_ids, 8), skip_special_tokens=True
    )
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with server.client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = sse_events(reply)
    # then several text chunks add up to the completion, then a final chunk, then [DONE]
    assert events[-1] == "[DONE]"
    chunks, final = events[:-2], events[-2]
    assert len(chunks) >= 3
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 8

    chat = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    with server.client.stream("POST", "/v1/chat/completions", json=chat) as reply:
        events = sse_events(reply)
    assert events[-1] == "[DONE]"
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_ends_the_completion_before_it(serve: Callable[..., LiveServer]) -> None:
    server = serve(draft="ngram")
    # the greedy continuation is "\n    if n == 0:\n ..."
    reply = server.post(
        "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [":"]}
    )
    choice = reply.json()["choices"][0]
    assert choice == {
        "index": 0,
        "text": "\n    if n == 0",
        "finish_reason": "stop",
        "logprobs": None,
    }
    reply = server.post(
        "/generate",
        {"text": PROMPT, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "stop": "=="}},
    )
    assert reply.json()["text"] == "\n    if n "
    assert reply.json()["meta_info"]["finish_reason"]["type"] == "stop"


def test_sampling_with_a_seed_is_reproducible(serve: Callable[..., LiveServer]) -> None:
    server = serve(draft="ngram")
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    first, second = (server.post("/v1/completions", body).json() for _ in range(2))
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


# ----------------------------------------------------------------- invalid input


INVALID = [
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": [10**7]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.role"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        "max_tokens",
    ),
    ("/generate", {"sampling_params": {"max_new_tokens": 2}}, "text or input_ids"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
    (
        "/generate",
        {"text": "x", "revision": "r-unknown", "sampling_params": {"max_new_tokens": 2}},
        "revision",
    ),
    (
        "/generate",
        {"text": "x", "arm": "candidate", "sampling_params": {"max_new_tokens": 2}},
        "arm",
    ),
    ("/generate", {"text": "x", "domain": "no spaces allowed"}, "domain"),
    ("/generate", {"text": "x", "stream": True}, "stream"),
]


def test_invalid_requests_get_a_400_naming_the_field_and_never_a_500(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(draft="ngram")
    for path, body, field in INVALID:
        reply = server.post(path, body)
        assert reply.status_code == 400, (path, body, reply.text)
        error = reply.json()["error"]
        assert field in error["message"], (field, error)
        assert error["type"] == "invalid_request_error"
    bad_json = server.client.post(
        "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    bad_header = server.post("/v1/completions", {"prompt": "x"}, headers={"X-Aurora-Domain": "a b"})
    assert (
        bad_header.status_code == 400 and "X-Aurora-Domain" in bad_header.json()["error"]["message"]
    )
    # and the worker still serves
    ok = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200
    assert server.metric('aurora_requests_total{arm="",revision="r-unknown",status="invalid"}') == 1


class BrokenProposer:
    """A draft whose session fails, standing in for any bug inside a decode."""

    revision = "broken"
    needs_features = False

    def start(self, prompt_ids: list[int]) -> Any:
        raise RuntimeError(f"draft crashed on {PROMPT}")


def test_an_engine_failure_answers_500_with_an_error_id_and_the_worker_keeps_serving(
    serve: Callable[..., LiveServer], caplog: pytest.LogCaptureFixture
) -> None:
    # given a candidate revision whose draft fails inside the decode loop
    server = serve(draft="ngram")
    stable = server.runtime.revisions.snapshot().stable
    server.runtime.revisions.swap(Served(stable, Revision("broken", BrokenProposer())))
    caplog.set_level(logging.ERROR)
    # when a request is served by it
    reply = server.post(
        "/generate",
        {"text": PROMPT, "revision": "broken", "sampling_params": {"max_new_tokens": 3}},
    )
    # then it gets a 500 with an error id, the log has the id but not the prompt
    assert reply.status_code == 500
    message = reply.json()["error"]["message"]
    assert message.startswith("internal error ")
    error_id = message.split()[2]
    assert error_id in caplog.text
    assert PROMPT not in caplog.text
    # and the next request is served
    ok = server.post(
        "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    )
    assert ok.status_code == 200
    assert (
        server.metric('aurora_requests_total{arm="candidate",revision="broken",status="error"}')
        == 1
    )


class GatedProposer:
    """The n-gram draft, held at the start of each request until released: keeps the
    worker busy for exactly as long as a test needs."""

    revision = "gated"
    needs_features = False

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def start(self, prompt_ids: list[int]) -> Any:
        self.entered.set()
        self.release.wait(60)
        return NgramProposer().start(prompt_ids)


def test_a_full_queue_answers_503_with_retry_after(serve: Callable[..., LiveServer]) -> None:
    # given a queue of one, a request being decoded and one waiting
    server = serve(draft="ngram", max_queue=1)
    gate = GatedProposer()
    stable = server.runtime.revisions.snapshot().stable
    server.runtime.revisions.swap(Served(stable, Revision("gated", gate)))
    replies: list[httpx.Response] = []
    busy = {"text": PROMPT, "revision": "gated", "sampling_params": {"max_new_tokens": 2}}
    first = threading.Thread(target=lambda: replies.append(server.post("/generate", busy)))
    first.start()
    assert gate.entered.wait(60)
    second = threading.Thread(
        target=lambda: replies.append(
            server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        )
    )
    second.start()
    wait_for(
        lambda: server.client.get("/server_info").json()["queue_depth"] == 2, "a queued request"
    )
    # when a third arrives
    rejected = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    # then it is turned away with a hint when to retry, and the others are served
    assert rejected.status_code == 503
    assert rejected.headers["Retry-After"] == "1"
    assert "--max-queue" in rejected.json()["error"]["message"]
    gate.release.set()
    first.join(120)
    second.join(120)
    assert [r.status_code for r in replies] == [200, 200]
    assert server.metric('aurora_requests_total{arm="",revision="",status="rejected"}') == 1


def test_a_client_that_goes_away_stops_its_decode(serve: Callable[..., LiveServer]) -> None:
    # given a long streaming request
    server = serve(draft="ngram")
    body = {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}
    with server.client.stream("POST", "/v1/completions", json=body) as reply:
        next(reply.iter_lines())  # decoding has started
    # when its client disconnects, the worker stops it at the next step and serves the next
    wait_for(
        lambda: server.metric(
            'aurora_requests_total{arm="stable",revision="ngram",status="cancelled"}'
        ),
        "the decode to be cancelled",
    )
    ok = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200


def test_health_ready_and_schema_while_the_model_cannot_be_loaded(tmp_path: Path) -> None:
    # given a server whose model does not exist (it loads in the background)
    with LiveServer(server_config(model=str(tmp_path / "no-model")), None) as server:
        assert server.client.get("/health").json() == {"status": "ok"}
        ready = wait_for(
            lambda: (r := server.client.get("/ready")).json()["status"] == "failed" and r,
            "the load to fail",
        )
        # then it is alive but not ready, and generation answers 503 naming the cause
        assert ready.status_code == 503 and "no-model" in ready.json()["error"]
        reply = server.post("/v1/completions", {"prompt": "x"})
        assert reply.status_code == 503 and "failed to load" in reply.json()["error"]["message"]
        schema = server.client.get("/openapi.json").json()
        assert {"/v1/completions", "/v1/chat/completions", "/generate", "/metrics"} <= set(
            schema["paths"]
        )
        limits = schema["components"]["schemas"]["CompletionRequest"]["properties"]
        assert limits["max_tokens"]["minimum"] == 1
        assert limits["max_tokens"]["maximum"] == 2048 and limits["temperature"]["maximum"] == 2
        # fields taken only at their default say so, as the validators answer other values 400
        assert limits["n"]["enum"] == [1] and limits["top_p"]["enum"] == [1.0]
        assert limits["presence_penalty"]["enum"] == [0.0]


# ------------------------------------------------------------ metrics and traces


def test_metrics_expose_every_family(serve: Callable[..., LiveServer]) -> None:
    server = serve(draft="ngram")
    assert (
        server.post(
            "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        ).status_code
        == 200
    )
    text = server.client.get("/metrics").text
    for family in (
        "aurora_requests_total",
        "aurora_generated_tokens_total",
        "aurora_accept_length_bucket",
        "aurora_decode_tokens_per_second_bucket",
        "aurora_active_revision_info",
        "aurora_trace_dropped_total",
        "aurora_traces_published_total",
        "aurora_swap_pause_seconds_bucket",
        "aurora_queue_depth",
    ):
        assert (
            f"\n{family}" in text
            or f"# TYPE {family.removesuffix('_total').removesuffix('_bucket')}" in text
        ), family
    assert 'aurora_active_revision_info{revision="ngram",role="stable"} 1.0' in text
    assert server.metric('aurora_generated_tokens_total{arm="stable"}') == 4


def test_traces_and_stats_land_in_redis_and_decode_with_the_protocol(
    serve: Callable[..., LiveServer], redis_url: str, redis_client: redis.Redis
) -> None:
    # given a server with an (untrained) EAGLE draft drafting a fixed k (adaptive, it would
    # doubt every token and propose nothing to trace) and Redis
    server = serve(draft="scratch", redis_url=redis_url, trace_sample_rate=1.0, adaptive=False)
    # when two requests from two workload domains finish
    generated = server.post(
        "/generate",
        {
            "text": PROMPT,
            "domain": "code",
            "sampling_params": {"max_new_tokens": 6, "temperature": 0},
        },
    ).json()
    completion = server.post(
        "/v1/completions",
        {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0.8, "seed": 1},
        headers={"X-Aurora-Domain": "prose"},
    )
    assert completion.status_code == 200
    assert server.runtime.publisher.flush(10)
    # then both traces decode with the shared codec, with steps and top-k
    good, bad = decode_entries(redis_client.xrange(KEYS.traces))
    assert bad == [] and len(good) == 2
    code, prose = (record for _, record in good)
    assert (code.domain, prose.domain) == ("code", "prose")
    assert code.output_ids == generated["output_ids"]
    assert code.revision == "scratch" and code.server == "test-server"
    assert len(code.steps) == generated["meta_info"]["spec_verify_ct"]
    assert code.topk_width == 8 and code.temperature == 0.0
    assert prose.temperature == 0.8
    # and both requests' stats are in the stats stream
    stats = [s for _, s in read_stats(redis_client, KEYS)]
    assert [(s.arm, s.revision, s.domain) for s in stats] == [
        ("stable", "scratch", "code"),
        ("stable", "scratch", "prose"),
    ]
    assert stats[0].new_tokens == 6 and stats[0].verify_steps == len(code.steps)
    # and the server reported what it serves
    assert wait_for(lambda: loaded(redis_client), "a loaded report").stable == "scratch"
    assert server.metric('aurora_traces_published_total{kind="trace"}') == 2


def test_requests_succeed_while_redis_is_down_and_traces_flow_again_after_it_returns(
    serve: Callable[..., LiveServer],
) -> None:
    redis_server = EmbeddedRedis().start()
    try:
        client = redis.Redis.from_url(redis_server.url)
        server = serve(draft="ngram", redis_url=redis_server.url)
        body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        assert server.post("/v1/completions", body).status_code == 200
        wait_for(lambda: client.xlen(KEYS.traces) == 1, "the first trace")
        # when Redis goes away
        redis_server.stop()
        # then requests still succeed and what could not be published is counted
        for _ in range(3):
            assert server.post("/v1/completions", body).status_code == 200
        server.runtime.publisher.flush(10)
        assert (
            server.metric('aurora_trace_dropped_total{kind="trace",reason="redis_unavailable"}')
            >= 1
        )
        assert (
            server.metric('aurora_trace_dropped_total{kind="stats",reason="redis_unavailable"}')
            >= 1
        )
        # when Redis returns, traces flow again without a restart
        redis_server.start()
        before = client.xlen(KEYS.traces)

        def published() -> bool:
            server.post("/v1/completions", body)
            server.runtime.publisher.flush(10)
            return client.xlen(KEYS.traces) > before

        wait_for(published, "traces after Redis returned", timeout=60)
        client.close()
    finally:
        redis_server.close()


# ------------------------------------------------------------------ hot swaps


def test_hot_swaps_under_concurrent_load_fail_no_request(
    model: tuple[Any, Any],
    serve: Callable[..., LiveServer],
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    # given three trained-looking revisions on disk and a server starting on the n-gram draft
    paths = {
        rev: save_random_head(model, tmp_path, rev, seed)
        for seed, rev in enumerate(("r1", "r2", "r3"), 1)
    }
    server = serve(draft="ngram", redis_url=redis_url, checkpoint_dir=str(tmp_path))
    prompts = [PROMPT, "The capital of France is", "import numpy as np\n", "1, 2, 3, 4,"]
    results: list[tuple[int, str, str, list[int]]] = []
    arms: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client_loop(prompt: str) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120) as http:
            while not stop.is_set():
                try:
                    reply = http.post(
                        "/generate",
                        json={
                            "text": prompt,
                            "sampling_params": {"max_new_tokens": 4, "temperature": 0},
                        },
                    )
                    meta = reply.json().get("meta_info", {})
                    arms.append(meta.get("arm", ""))
                    results.append(
                        (
                            reply.status_code,
                            prompt,
                            meta.get("draft_revision", ""),
                            reply.json().get("output_ids", []),
                        )
                    )
                except BaseException as error:
                    errors.append(error)

    clients = [threading.Thread(target=client_loop, args=(p,)) for p in prompts]
    for thread in clients:
        thread.start()

    def served_by(revision: str) -> bool:
        return any(rev == revision for _, _, rev, _ in list(results))

    # when the desired state changes three times under load
    changes = [
        (DesiredState(stable=RevisionRef(revision="r1", path=str(paths["r1"]))), ("r1", None)),
        (
            DesiredState(
                stable=RevisionRef(revision="r1", path=str(paths["r1"])),
                candidate=RevisionRef(revision="r2", path="/not/mounted/here/r2"),
                candidate_share=0.5,
            ),
            ("r1", "r2"),
        ),
        (DesiredState(stable=RevisionRef(revision="r3", path=str(paths["r3"]))), ("r3", None)),
    ]
    pauses = []
    try:
        wait_for(lambda: served_by("ngram"), "requests on the initial draft")
        for generation, (desired, (stable, candidate)) in enumerate(changes, 1):
            asked = time.time()
            set_desired(redis_client, KEYS, desired.model_copy(update={"generation": generation}))
            report = wait_for(
                lambda s=stable, c=candidate: (
                    (r := loaded(redis_client)) and r.stable == s and r.candidate == c and r
                ),
                f"stable={stable} candidate={candidate} loaded",
            )
            assert report.error is None and report.pause_ms is not None
            # the report says when the swap took effect, so rollouts can be timed end to end
            assert report.swapped is not None and asked <= report.swapped <= time.time()
            pauses.append(report.pause_ms)
            # then new requests take the new revision
            for revision in filter(None, (stable, candidate)):
                wait_for(lambda r=revision: served_by(r), f"requests served by {revision}")
        # and once more with the same revision and only a new baseline share
        set_desired(
            redis_client,
            KEYS,
            DesiredState(
                stable=RevisionRef(revision="r3", path=str(paths["r3"])),
                baseline_share=0.5,
                generation=len(changes) + 1,
            ),
        )
        wait_for(lambda: any(arm == "baseline" for arm in list(arms)), "baseline requests")
    finally:
        stop.set()
        for thread in clients:
            thread.join(120)

    # then no request failed, and every revision served greedy output identical to the target's
    assert errors == []
    assert results and all(status == 200 for status, *_ in results), [
        r for r in results if r[0] != 200
    ]
    assert {"ngram", "r1", "r2", "r3"} <= {rev for _, _, rev, _ in results}
    for prompt in prompts:
        outputs = {tuple(ids) for status, p, _, ids in results if p == prompt}
        assert len(outputs) == 1, (prompt, outputs)
    # three swaps of revisions; the share-only change swapped nothing in or out
    assert server.metric("aurora_swap_pause_seconds_count") == 3
    log.warning("swap pauses (ms): %s over %d requests", pauses, len(results))


def test_a_corrupt_checkpoint_is_refused_reported_once_and_the_old_revision_keeps_serving(
    model: tuple[Any, Any],
    serve: Callable[..., LiveServer],
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    good = save_random_head(model, tmp_path, "r-good", 1)
    corrupt = save_random_head(model, tmp_path, "r-corrupt", 2)
    data = bytearray((corrupt / DRAFT_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    (corrupt / DRAFT_FILE).write_bytes(bytes(data))
    server = serve(draft="ngram", redis_url=redis_url)
    set_desired(
        redis_client, KEYS, DesiredState(stable=RevisionRef(revision="r-good", path=str(good)))
    )
    wait_for(lambda: (r := loaded(redis_client)) and r.stable == "r-good", "r-good loaded")
    attempts = []
    build_head = server.runtime.watcher.loader.build_head
    server.runtime.watcher.loader.build_head = lambda path: (
        attempts.append(path),
        build_head(path),
    )[1]
    # when the desired stable becomes the corrupt checkpoint
    set_desired(
        redis_client,
        KEYS,
        DesiredState(stable=RevisionRef(revision="r-corrupt", path=str(corrupt)), generation=2),
    )
    report = wait_for(lambda: (r := loaded(redis_client)) and r.error and r, "the refusal")
    # then it is refused with the reason, and the good revision still serves
    assert report.stable == "r-good" and "sha256" in report.error and "r-corrupt" in report.error
    reply = server.post(
        "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    )
    assert reply.status_code == 200 and reply.json()["meta_info"]["draft_revision"] == "r-good"
    # and it is not retried at every poll
    time.sleep(10 * server.runtime.config.poll_interval)
    assert len(attempts) == 1
    assert "r-corrupt" in server.client.get("/server_info").json()["revision_errors"][0]


def test_a_revision_that_failed_to_load_is_tried_again_and_then_served(
    model: tuple[Any, Any],
    serve: Callable[..., LiveServer],
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    # Given a server told to serve a checkpoint that is not there yet (as when the trainer
    # it downloads from restarts), with its retries made quick for the test
    server = serve(draft="ngram", redis_url=redis_url)
    server.runtime.watcher.failed.first_s = 0.5
    late = tmp_path / "late"
    set_desired(
        redis_client, KEYS, DesiredState(stable=RevisionRef(revision="r-late", path=str(late)))
    )
    report = wait_for(lambda: (r := loaded(redis_client)) and r.error and r, "the failure")
    assert report.stable == "ngram" and "r-late" in report.error
    # When the checkpoint appears, then a later attempt loads it: the server does not stay
    # on the wrong stable revision, and the error is gone from its report
    save_random_head(model, tmp_path, "r-late", 3).rename(late)
    wait_for(
        lambda: (r := loaded(redis_client)) and r.stable == "r-late" and r.error is None,
        "r-late served after a retry",
    )
    assert server.client.get("/server_info").json()["revision_errors"] == []


def test_aurora_serve_runs_the_server_in_its_own_process(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    # given `aurora serve` started as a user would, with Redis
    port = free_port()
    command = [
        sys.executable,
        "-P",
        "-m",
        "aurora",
        "serve",
        "--port",
        str(port),
        "--threads",
        "1",
        "--draft",
        "none",
        "--redis-url",
        redis_url,
        "--server-id",
        "cli-server",
    ]
    log_file = tmp_path / "serve.log"
    with open(log_file, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:

            def ready() -> bool:
                assert process.poll() is None, log_file.read_text()[-2000:]
                try:
                    return http.get("/ready").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, "aurora serve to be ready", timeout=120)
            # when a request arrives
            reply = http.post(
                "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
            )
            # then it is served without speculation, and the server reports itself in Redis
            assert reply.status_code == 200 and reply.headers["X-Aurora-Revision"] == "none"
            assert http.get("/server_info").json()["torch_threads"] == 1
            assert (
                wait_for(lambda: loaded(redis_client, "cli-server"), "a loaded report").stable
                == "none"
            )
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal
        assert process.wait(60) in (0, -signal.SIGTERM)
