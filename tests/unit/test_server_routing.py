"""The server's pure parts: routing by shares, pinning, swaps of the served snapshot,
checkpoint path resolution, config checks, request validation messages and the
text tracker that finds stop strings and streams text."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from aurora.errors import UsageError
from aurora.runtime.protocol import RevisionRef
from aurora.runtime.server.api import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    describe_validation,
)
from aurora.runtime.server.config import ServerConfig
from aurora.runtime.server.revisions import (
    Revision,
    RevisionLoader,
    RevisionSet,
    Router,
    RoutingError,
    Served,
    choose_arm,
)
from aurora.runtime.server.worker import TextTracker

pytestmark = pytest.mark.unit

STABLE, CANDIDATE = Revision("r1", object()), Revision("r2", object())


# ------------------------------------------------------------------ routing by shares


def test_the_unit_interval_is_split_baseline_then_candidate_then_stable() -> None:
    # given baseline 0.1 and candidate 0.3 with a candidate loaded
    arm = [choose_arm(u, 0.3, 0.1, True) for u in (0.0, 0.099, 0.1, 0.399, 0.4, 0.999)]
    # then the first 10% is baseline, the next 30% candidate, the rest stable
    assert arm == ["baseline", "baseline", "candidate", "candidate", "stable", "stable"]


def test_without_a_candidate_its_share_goes_to_stable_and_the_baseline_stays_exact() -> None:
    assert choose_arm(0.05, 0.5, 0.1, False) == "baseline"
    assert choose_arm(0.2, 0.5, 0.1, False) == "stable"


def test_seeded_routing_is_reproducible_and_follows_the_shares() -> None:
    # given two routers with the same seed and one with another
    served = Served(STABLE, CANDIDATE, candidate_share=0.2, baseline_share=0.05)
    a, b, c = Router(7), Router(7), Router(8)
    arms_a = [served.route(a.draw())[0] for _ in range(4000)]
    arms_b = [served.route(b.draw())[0] for _ in range(4000)]
    arms_c = [served.route(c.draw())[0] for _ in range(4000)]
    # then the same seed routes the same sequence, another seed another one
    assert arms_a == arms_b
    assert arms_a != arms_c
    # and the shares hold (4000 draws: 4 standard deviations of slack)
    counts = Counter(arms_a)
    assert abs(counts["candidate"] / 4000 - 0.2) < 0.026
    assert abs(counts["baseline"] / 4000 - 0.05) < 0.014


def test_a_request_can_pin_a_loaded_revision_or_arm() -> None:
    served = Served(STABLE, CANDIDATE, candidate_share=0.0, baseline_share=0.0)
    assert served.route(0.99, revision="r2") == ("candidate", CANDIDATE)
    assert served.route(0.99, revision="r1") == ("stable", STABLE)
    assert served.route(0.99, arm="baseline") == ("baseline", STABLE)
    assert served.route(0.99, arm="candidate") == ("candidate", CANDIDATE)


def test_pinning_what_is_not_served_names_what_is() -> None:
    served = Served(STABLE)
    with pytest.raises(RoutingError, match=r"revision='r9'.*stable is 'r1'"):
        served.route(0.5, revision="r9")
    with pytest.raises(RoutingError, match="no candidate revision is loaded"):
        served.route(0.5, arm="candidate")
    with pytest.raises(RoutingError, match="arm='candidate'"):
        served.route(0.5, arm="candidate", revision="r1")


def test_a_swap_replaces_the_snapshot_and_reports_how_long_it_held_the_lock() -> None:
    # given a request that took the snapshot before the swap
    revisions = RevisionSet(Served(STABLE))
    before = revisions.snapshot()
    # when a new stable is swapped in
    held = revisions.swap(Served(CANDIDATE))
    # then new requests see it, the old snapshot is untouched, the pause is measured
    assert revisions.snapshot().stable is CANDIDATE
    assert before.stable is STABLE
    assert 0.0 <= held < 1.0
    assert revisions.snapshot().roles() == {"stable": "r2"}


def test_a_swap_waits_for_a_reader_holding_the_lock() -> None:
    revisions = RevisionSet(Served(STABLE))
    done = threading.Event()
    with revisions._lock:  # a decode worker reading the snapshot
        thread = threading.Thread(target=lambda: (revisions.swap(Served(CANDIDATE)), done.set()))
        thread.start()
        assert not done.wait(0.05)
        assert revisions._served.stable is STABLE
    thread.join(5)
    assert revisions.snapshot().stable is CANDIDATE


# ----------------------------------------------------------------- loading revisions


def _loader(tmp_path: Path, checkpoint_dir: str | None) -> tuple[RevisionLoader, list[Path]]:
    loaded: list[Path] = []

    def build_head(path: Path) -> Revision:
        loaded.append(path)
        return Revision(path.name, object(), str(path))

    return RevisionLoader(lambda name: Revision(name, None), build_head, checkpoint_dir), loaded


def test_a_revision_path_falls_back_to_the_checkpoint_dir(tmp_path: Path) -> None:
    (tmp_path / "own" / "r5").mkdir(parents=True)
    loader, loaded = _loader(tmp_path, str(tmp_path / "ckpt"))
    # an existing path is used as is
    assert loader.path_of(RevisionRef(revision="r5", path=str(tmp_path / "own" / "r5"))) == (
        tmp_path / "own" / "r5"
    )
    # a path this server does not see is looked up under --checkpoint-dir
    assert (
        loader.path_of(RevisionRef(revision="r6", path="/elsewhere/r6")) == tmp_path / "ckpt" / "r6"
    )
    loader.load(RevisionRef(revision="r6", path="/elsewhere/r6"))
    assert loaded == [tmp_path / "ckpt" / "r6"]


def test_builtin_revisions_need_no_checkpoint(tmp_path: Path) -> None:
    loader, loaded = _loader(tmp_path, None)
    assert loader.load(RevisionRef(revision="ngram", path="")).name == "ngram"
    assert loader.load(RevisionRef(revision="none", path="")).name == "none"
    assert loaded == []


def test_a_checkpoint_holding_another_revision_is_refused(tmp_path: Path) -> None:
    loader, _ = _loader(tmp_path, None)
    (tmp_path / "r7").mkdir()
    with pytest.raises(ValueError, match=r"holds revision 'r7'.*names 'r8'"):
        loader.load(RevisionRef(revision="r8", path=str(tmp_path / "r7")))


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("candidate_share", 1.5, "--candidate-share"),
        ("baseline_share", -0.1, "--baseline-share"),
        ("trace_sample_rate", 2.0, "--trace-sample-rate"),
        ("spec_tokens", -1, "--spec-tokens"),
        ("max_queue", 0, "--max-queue"),
        ("speculator", "no-slash", "--speculator"),
        ("speculator", "Bad/Name", "--speculator"),
        ("draft", "/no/such/checkpoint", "--draft"),
    ],
)
def test_a_bad_option_names_the_flag(field: str, value: object, flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        ServerConfig(**{field: value})  # type: ignore[arg-type]


def test_shares_that_add_up_past_one_are_refused() -> None:
    with pytest.raises(UsageError, match="add up to at most 1"):
        ServerConfig(candidate_share=0.6, baseline_share=0.5)


# ---------------------------------------------------------------- request checks


def _message(model: type, body: dict) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    error = describe_validation(list(caught.value.errors()))
    assert error.status == 400
    return error.message, error.param


@pytest.mark.parametrize(
    ("model", "body", "field", "words"),
    [
        (CompletionRequest, {}, "prompt", "is required"),
        (CompletionRequest, {"prompt": ""}, "prompt", "empty"),
        (CompletionRequest, {"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        (CompletionRequest, {"prompt": [1, -2]}, "prompt", "negative token id"),
        (CompletionRequest, {"prompt": "x", "max_tokens": -1}, "max_tokens", "got -1"),
        (
            CompletionRequest,
            {"prompt": "x", "temperature": 5},
            "temperature",
            "from 0 (greedy) to 2",
        ),
        (CompletionRequest, {"prompt": "x", "n": 2}, "n", "one completion per request"),
        (
            CompletionRequest,
            {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "at most 4",
        ),
        (CompletionRequest, {"prompt": "x", "top_p": 0.5}, "top_p", "top_p=0.5"),
        (CompletionRequest, {"prompt": "x", "max_token": 3}, "max_token", "not a parameter"),
        (ChatCompletionRequest, {"messages": []}, "messages", "at least 1"),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "wizard", "content": "x"}]},
            "messages.role",
            "role",
        ),
        (
            GenerateRequest,
            {"sampling_params": {"max_new_tokens": 0}},
            "sampling_params.max_new_tokens",
            "≥ 1",
        ),
        (
            GenerateRequest,
            {"text": "x", "sampling_params": {"temperature": 3}},
            "sampling_params.temperature",
            "to 2",
        ),
        (GenerateRequest, {"text": "x", "arm": "canary"}, "arm", "stable"),
    ],
)
def test_an_invalid_request_gets_a_400_naming_the_field(
    model: type, body: dict, field: str, words: str
) -> None:
    message, param = _message(model, body)
    assert param == field
    assert message.startswith(f"{field}: ")
    assert words in message


def test_a_generate_request_needs_exactly_one_prompt() -> None:
    message, _ = _message(GenerateRequest, {"text": "a", "input_ids": [1]})
    assert "exactly one of text or input_ids" in message
    message, _ = _message(GenerateRequest, {})
    assert "exactly one of text or input_ids" in message


def test_validation_messages_never_echo_prompt_text() -> None:
    secret = "my secret prompt"
    message, _ = _message(CompletionRequest, {"prompt": secret, "temperature": 9})
    assert secret not in message


# ------------------------------------------------------------------- text tracker


class CharTokenizer:
    """One character per token id (ord), enough to exercise detokenization."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_a_stop_string_cuts_the_tokens_where_it_first_appears() -> None:
    tracker = TextTracker(CharTokenizer(), threading.Lock(), ["END"], None)
    assert tracker(ids("abc")) is None
    # when a step brings the stop string and more
    cut = tracker(ids("abcxENDyz"))
    # then the engine keeps the tokens up to the end of the stop string
    assert cut == len("abcxEND")
    assert tracker.finish(ids("abcxEND")) == "abcx"


def test_streamed_text_holds_back_a_possible_stop_prefix_and_adds_up_to_the_final_text() -> None:
    deltas: list[str] = []
    tracker = TextTracker(CharTokenizer(), threading.Lock(), ["STOP"], deltas.append)
    for step in ("he", "hello S", "hello ST", "hello STA", "hello STAR"):
        assert tracker(ids(step)) is None
    # nothing that could be the start of "STOP" was streamed
    assert "".join(deltas) == "hello S"[: len("hello STAR") - 3]
    final = tracker.finish(ids("hello STAR"))
    assert "".join(deltas) == final == "hello STAR"


def test_incomplete_characters_are_not_streamed() -> None:
    class Partial(CharTokenizer):
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return super().decode(ids).replace("~", "\ufffd")

    deltas: list[str] = []
    tracker = TextTracker(Partial(), threading.Lock(), [], deltas.append)
    tracker(ids("ab~"))
    assert deltas == ["ab"]
