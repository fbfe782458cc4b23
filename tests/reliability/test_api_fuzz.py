"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): valid and invalid
requests of every operation against the real server with the real model. No input
gets a 5xx; every refusal is a 4xx naming what is wrong."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import LiveServer
from reliability_support import server_config
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def live(model: tuple[Any, Any]) -> Iterator[LiveServer]:
    # A small token limit keeps every generated request to a few decode steps.
    with LiveServer(server_config(max_new_tokens_limit=4, max_queue=512), model) as server:
        yield server


def explains_a_refusal(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx carries an OpenAI-style error whose message says what to change."""
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and len(error["message"]) > 10, error
    return None


def fuzz(operation: Any, mode: GenerationMode, sent: Counter[str]) -> None:
    """Send ``operation`` the requests schemathesis generates in ``mode``; count answers
    by status class in ``sent``."""

    def count(ctx: Any, response: Any, case: Any) -> bool | None:
        sent[f"{operation.label} {response.status_code // 100}xx"] += 1
        return None

    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: Any) -> None:
        # When it is sent, then the answer is no 5xx, and a refusal says why
        case.call_and_validate(checks=[count, not_a_server_error, explains_a_refusal], timeout=120)

    call()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error(live: LiveServer, mode: GenerationMode) -> None:
    # Given the server's own schema: every operation, with valid or invalid requests
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /generate"} <= {
        op.label for op in operations
    }
    sent: Counter[str] = Counter()
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not operation.body and not operation.query:
            continue  # no input, so no invalid input (GET /health, /metrics, ...)
        fuzz(operation, mode, sent)
    # then every generating operation was exercised
    for label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /generate"):
        assert sum(n for key, n in sent.items() if key.startswith(label)) >= 10, (label, sent)


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "hint"),
    [
        ("POST", "/generate", b"\x80", 400, "not valid JSON"),
        ("POST", "/v1/completions", b"{", 400, "not valid JSON"),
        ("GET", "/v2/completions", b"", 404, "/openapi.json"),
        ("PUT", "/generate", b"", 405, "not allowed"),
    ],
)
def test_the_frameworks_own_refusals_have_the_same_error_shape(
    live: LiveServer, method: str, path: str, content: bytes, status: int, hint: str
) -> None:
    headers = {"Content-Type": "application/json"}
    reply = live.client.request(method, path, content=content, headers=headers)
    assert reply.status_code == status
    assert hint in reply.json()["error"]["message"]


texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
sampling = st.fixed_dictionaries(
    {
        "max_tokens": st.integers(1, 4),
        "temperature": st.floats(0, 2),
        "seed": st.none() | st.integers(0, 2**63 - 1),
        "stop": st.none() | texts | st.lists(texts, max_size=4),
    }
)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(prompt=texts, options=sampling, chat=st.booleans())
def test_any_prompt_and_sampling_within_the_limits_is_served(
    live: LiveServer, prompt: str, options: dict[str, Any], chat: bool
) -> None:
    # Given any text prompt and sampling options the server supports
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    # When it is sent, then it is served, never an internal error; the one refusal is
    # a prompt the tokenizer reduces to nothing (it drops some control characters)
    reply = live.client.post(path, json={**body, **options})
    if reply.status_code == 400 and "has no tokens" in reply.text:
        return
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert reply.json()["usage"]["completion_tokens"] <= options["max_tokens"]
