"""Workloads: built-in prompt domains, user JSONL files, schedules and `aurora workload`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from aurora.cli import main
from aurora.errors import UsageError
from aurora.runtime import workloads
from aurora.runtime.workloads import Prompt, Schedule, load_jsonl, split_prompts

pytestmark = pytest.mark.unit


def ids(schedule: Schedule, seed: int) -> list[str]:
    return [request.prompt.id for request in schedule.requests(seed)]


# --------------------------------------------------------------------------- domains


@pytest.mark.parametrize("domain", list(workloads.BUILTIN_DOMAINS))
def test_each_builtin_domain_has_distinct_prompts_of_sane_length(domain: str) -> None:
    prompts = workloads.load_domain(domain)
    assert len(prompts) >= 100
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    assert all(p.domain == domain and p.id.startswith(f"{domain}/") for p in prompts)
    assert all(30 <= len(p.text) <= 2000 for p in prompts)


def test_code_domain_is_the_164_humaneval_prompts() -> None:
    prompts = workloads.code_prompts()
    assert len(prompts) == 164
    assert all("def " in p.text for p in prompts)
    by_id = {p.id: p for p in prompts}
    assert "def longest(strings: List[str]) -> Optional[str]:" in by_id["code/HumanEval-12"].text
    assert by_id["code/HumanEval-12"].messages is None  # raw completion


def test_prose_prompts_are_sorted_documentation_within_bounds() -> None:
    prompts = workloads.prose_prompts()
    assert len(prompts) >= 200
    assert [p.id for p in prompts] == sorted(p.id for p in prompts)
    assert all(100 <= len(p.text) <= 600 for p in prompts)
    assert all(p.text.startswith("Continue the documentation of Python's `") for p in prompts)
    assert any(p.id == "prose/json.dumps" for p in prompts)


def test_math_and_chat_prompts_are_identical_on_every_call() -> None:
    assert [p.text for p in workloads.math_prompts()] == [p.text for p in workloads.math_prompts()]
    assert workloads.math_prompts()[0].text.endswith(
        ("step by step.", "Show your work.", "final answer.")
    )
    chat = workloads.chat_prompts()
    assert chat[0].as_chat() == [{"role": "user", "content": chat[0].text}]


def test_domain_lists_are_copies_so_callers_cannot_corrupt_the_cache() -> None:
    workloads.math_prompts().clear()
    chat = workloads.chat_prompts()[0]
    chat.as_chat()[0]["content"] = "changed"
    assert len(workloads.math_prompts()) == workloads.MATH_PROBLEMS
    assert workloads.chat_prompts()[0].as_chat()[0]["content"] != "changed"


def test_domains_lists_counts_in_a_fixed_order() -> None:
    counts = workloads.domains()
    assert list(counts) == ["code", "prose", "math", "chat"]
    assert counts["code"] == 164
    assert counts["math"] == len(workloads.math_prompts())


def test_as_chat_wraps_raw_text_as_one_user_turn() -> None:
    prompt = Prompt(domain="code", text="def f():", id="code/x")
    assert prompt.as_chat() == [{"role": "user", "content": "def f():"}]
    assert hash(
        Prompt(domain="chat", text="hi", id="c/1", messages=[{"role": "user", "content": "hi"}])
    )


def test_unknown_domain_names_the_choices() -> None:
    with pytest.raises(
        UsageError, match=r"unknown domain 'poetry'.*code, prose, math, chat.*file:PATH"
    ):
        workloads.load_domain("poetry")


# --------------------------------------------------------------------------- JSONL files


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_prompt_and_messages_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "support.jsonl",
        json.dumps({"prompt": "Reset my password"}),
        "",
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],
                "domain": "helpdesk",
                "id": "h-1",
            }
        ),
    )
    first, second = load_jsonl(path)
    assert (first.domain, first.id, first.text, first.messages) == (
        "support",
        "support/1",
        "Reset my password",
        None,
    )
    assert (second.domain, second.id) == ("helpdesk", "h-1")
    assert second.as_chat()[0] == {"role": "system", "content": "Be brief."}
    assert "Hi" in second.text
    assert load_jsonl(path, domain="tickets")[0].domain == "tickets"


@pytest.mark.parametrize(
    ("bad_line", "complaint"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "not an object"),
        ('{"text": "x"}', "unknown field"),
        ('{"prompt": "x", "messages": []}', "exactly one of 'prompt' or 'messages'"),
        ('{"prompt": 3}', "'prompt' must be a non-empty string"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages\\[0\\]"),
    ],
)
def test_jsonl_bad_line_names_file_line_and_fix(
    tmp_path: Path, bad_line: str, complaint: str
) -> None:
    path = write_lines(tmp_path / "p.jsonl", '{"prompt": "fine"}', bad_line)
    with pytest.raises(UsageError, match=rf"p\.jsonl:2: .*{complaint}") as error:
        load_jsonl(path)
    assert "p.jsonl:2" in str(error.value)


def test_jsonl_missing_or_empty_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read it"):
        load_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(UsageError, match="no prompts"):
        load_jsonl(write_lines(tmp_path / "empty.jsonl", ""))


def test_split_is_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    prompts = workloads.math_prompts()
    train, held = split_prompts(prompts, 0.2, seed=3)
    assert len(held) == 60 and len(train) == 240
    assert not {p.id for p in train} & {p.id for p in held}
    assert split_prompts(prompts, 0.2, seed=3) == (train, held)
    assert split_prompts(prompts, 0.2, seed=4)[1] != held
    with pytest.raises(UsageError, match=r"holdout fraction 1\.0"):
        split_prompts(prompts, 1.0, seed=0)


# --------------------------------------------------------------------------- schedules


def test_sequential_phases_run_in_order_with_boundaries() -> None:
    schedule = Schedule.from_string("code:5,prose:7,code:2")
    requests = list(schedule.requests(seed=0))
    assert [r.index for r in requests] == list(range(14))
    assert [r.phase for r in requests] == ["code"] * 5 + ["prose"] * 7 + ["code"] * 2
    assert [r.prompt.domain for r in requests] == ["code"] * 5 + ["prose"] * 7 + ["code"] * 2
    assert schedule.phase_boundaries() == [0, 5, 12]
    assert len(schedule) == 14
    assert str(schedule) == "code:5,prose:7,code:2"


def test_same_seed_same_sequence_other_seed_other_order() -> None:
    schedule = Schedule.from_string("code=0.5+chat=0.5:40,math:20")
    assert ids(schedule, 7) == ids(schedule, 7)
    assert ids(schedule, 7) != ids(schedule, 8)


def test_mixture_draws_the_requested_proportions() -> None:
    schedule = Schedule.from_string("code=0.8+prose=0.2:1000")
    requests = list(schedule.requests(seed=1))
    counts = Counter(r.prompt.domain for r in requests)
    assert counts == {"code": 800, "prose": 200}
    assert {r.phase for r in requests} == {"code+prose"}
    # interleaved, not 800 code then 200 prose
    assert {r.prompt.domain for r in requests[:100]} == {"code", "prose"}


def test_a_gated_phase_goes_on_until_extend_says_stop() -> None:
    # Given: a gate that holds phase 0 until 4 extra requests were drawn, and asks only there
    schedule = Schedule.from_string("code=0.5+math=0.5:6,prose:3")
    asked: list[int] = []

    def extend(phase: int) -> bool:
        asked.append(phase)
        return len(asked) <= 4

    # When: the whole schedule is drawn
    requests = list(schedule.requests(seed=0, extend=extend))
    # Then: phase 0 served 6 + 4 requests from its own mixture, then the last phase in full
    assert [r.phase for r in requests] == ["code+math"] * 10 + ["prose"] * 3
    assert {r.prompt.domain for r in requests[:10]} <= {"code", "math"}
    assert [r.index for r in requests] == list(range(13))
    assert asked == [0] * 5  # never asked about the last phase


def test_an_ungated_schedule_ignores_extend_answering_no() -> None:
    schedule = Schedule.from_string("code:5,prose:7")
    assert ids(schedule, 3) == [
        r.prompt.id for r in schedule.requests(3, extend=lambda phase: False)
    ]


def test_unweighted_mixture_is_an_even_split() -> None:
    counts = Counter(r.prompt.domain for r in Schedule.from_string("math+chat:9").requests(0))
    assert sorted(counts.values()) == [4, 5]


def test_prompts_are_drawn_without_replacement_until_exhausted() -> None:
    requests = list(Schedule.from_string("code:328").requests(seed=2))
    first, second = [r.prompt.id for r in requests[:164]], [r.prompt.id for r in requests[164:]]
    assert len(set(first)) == 164 and len(set(second)) == 164
    assert first != second  # reshuffled for the second pass


def test_a_domain_continues_without_replacement_across_phases() -> None:
    requests = list(Schedule.from_string("code:100,math:10,code:64").requests(seed=0))
    code_ids = [r.prompt.id for r in requests if r.prompt.domain == "code"]
    assert len(set(code_ids)) == 164


def test_pools_replace_a_domain_with_a_held_out_split() -> None:
    _, held = split_prompts(workloads.code_prompts(), 0.25, seed=0)
    schedule = Schedule.from_string("code:41,math:3")
    drawn = [r.prompt for r in schedule.requests(seed=0, pools={"code": held})]
    assert {p.id for p in drawn if p.domain == "code"} == {p.id for p in held}


@pytest.mark.parametrize(
    ("spec", "segment", "complaint"),
    [
        ("code:10,prose", "'prose'", "missing ':COUNT'"),
        ("code:10,poetry:5", "'poetry:5'", "unknown domain 'poetry'"),
        ("code:ten", "'code:ten'", "request count 'ten'"),
        ("code:0", "'code:0'", "positive integer"),
        ("code=0.8+prose=x:10", "'code=0.8\\+prose=x:10'", "weight 'x' of 'prose'"),
        ("code=-1+prose=1:10", "'code=-1\\+prose=1:10'", "weight '-1'"),
        ("code+code:10", "'code\\+code:10'", "appears twice"),
        ("code:5,,prose:5", "''", "missing ':COUNT'"),
        ("file:/no/such/prompts.jsonl:5", "'file:/no/such/prompts.jsonl:5'", "does not exist"),
    ],
)
def test_bad_schedule_strings_name_the_segment(spec: str, segment: str, complaint: str) -> None:
    with pytest.raises(UsageError, match=rf"schedule segment {segment}: .*{complaint}"):
        Schedule.from_string(spec)


def test_empty_schedule_string_is_rejected() -> None:
    with pytest.raises(UsageError, match="schedule is empty"):
        Schedule.from_string("  ")


def test_file_domain_in_a_schedule_string(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "mine.jsonl", *(json.dumps({"prompt": f"question {i}"}) for i in range(3))
    )
    schedule = Schedule.from_string(f"file:{path}:6,code:1")
    requests = list(schedule.requests(seed=0))
    assert [r.phase for r in requests] == ["mine"] * 6 + ["code"]
    assert Counter(r.prompt.id for r in requests[:6]) == {"mine/1": 2, "mine/2": 2, "mine/3": 2}


def test_schedule_file_with_named_phases_and_mixtures(tmp_path: Path) -> None:
    write_lines(tmp_path / "mine.jsonl", json.dumps({"prompt": "hello"}))
    path = write_lines(
        tmp_path / "shift.yaml",
        "- {name: day0, requests: 10, domain: code}",
        "- name: shifted",
        "  requests: 20",
        "  mix: {prose: 3, math: 1, 'file:mine.jsonl': 1}",
    )
    schedule = Schedule.from_file(path)
    assert [p.name for p in schedule.phases] == ["day0", "shifted"]
    assert schedule.phase_boundaries() == [0, 10]
    counts = Counter(r.prompt.domain for r in schedule.requests(seed=0) if r.phase == "shifted")
    assert counts == {
        "prose": 12,
        "math": 4,
        "mine": 4,
    }  # relative file: resolved next to the schedule


def test_schedule_file_as_json(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"phases": [{"requests": 3, "domain": "chat"}]}))
    assert str(Schedule.from_file(path)) == "chat:3"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("- {requests: 3}", "phase 1: needs exactly one of 'domain' or 'mix'"),
        ("- {requests: 3, domain: code}\n- {domain: code}", "phase 2: 'requests' is missing"),
        ("- {requests: 3, domain: code, speed: 2}", "unknown field.*speed"),
        ("- {requests: 3, mix: {code: 0}}", "weight '0' of 'code'"),
        ("- {requests: -1, domain: code}", "request count '-1'"),
        ("phases: 3", "expected a non-empty list of phases"),
        ("- [unclosed", "not valid YAML/JSON"),
    ],
)
def test_bad_schedule_files_name_the_phase_and_fix(
    tmp_path: Path, text: str, complaint: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=rf"schedule file .*bad\.yaml.*{complaint}"):
        Schedule.from_file(path)


def test_default_schedule_shifts_between_two_domains() -> None:
    schedule = Schedule.from_string(workloads.DEFAULT_SCHEDULE)
    assert len(schedule.phases) == 2 and schedule.phases[0].mix != schedule.phases[1].mix


# --------------------------------------------------------------------------- CLI


def test_cli_show_prints_requests_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workload", "show", "--schedule", "code:3,prose:2", "--seed", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = list(Schedule.from_string("code:3,prose:2").requests(0))
    rows = lines[1:6]
    for row, request in zip(rows, expected, strict=True):
        assert row.split()[:4] == [
            str(request.index),
            request.phase,
            request.prompt.domain,
            request.prompt.id,
        ]
        assert (
            "\\n" in row or "\n" not in request.prompt.text[:60]
        )  # newlines escaped, one line each
    assert "5 requests" in "\n".join(lines)
    assert any("'prose' from request 3: 2 requests (prose 2)" in line for line in lines)


def test_cli_show_json_and_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "workload",
                "show",
                "--schedule",
                "math=0.5+chat=0.5:10",
                "--seed",
                "4",
                "--limit",
                "4",
                "--json",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = list(Schedule.from_string("math=0.5+chat=0.5:10").requests(4))[:4]
    assert [r["id"] for r in records] == [e.prompt.id for e in expected]
    assert [r["text"] for r in records] == [e.prompt.text for e in expected]


def test_cli_show_bad_schedule_exits_2_naming_the_segment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["workload", "show", "--schedule", "code:5,prose:x"]) == 2
    assert "schedule segment 'prose:x'" in capsys.readouterr().err


def test_cli_domains_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workload", "domains", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["domain"] for r in rows] == ["code", "prose", "math", "chat"]
    assert rows[0]["prompts"] == 164 and "def " in rows[0]["example"]


def test_cli_domains_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workload", "domains"]) == 0
    out = capsys.readouterr().out
    assert "164" in out and "HumanEval-0" in out and "chat/0" in out


# --------------------------------------------------------------------------- encoding


class RecordingTokenizer:
    """Tokenises text as one id per character; the chat template wraps the turns."""

    def __init__(self) -> None:
        self.templated: list[tuple[list[dict[str, str]], bool]] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> object:
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool, tokenize: bool
    ) -> str:
        assert tokenize is False
        self.templated.append((messages, add_generation_prompt))
        return "<user>" + "".join(m["content"] for m in messages) + "<assistant>"


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_text_to_continue_is_encoded_raw(domain: str) -> None:
    tokenizer = RecordingTokenizer()
    ids = workloads.prompt_ids(tokenizer, Prompt(domain, "def f(", f"{domain}/0"))
    assert ids == [ord(c) for c in "def f("] and tokenizer.templated == []


@pytest.mark.parametrize("domain", ["math", "chat"])
def test_instructions_go_through_the_chat_template(domain: str) -> None:
    tokenizer = RecordingTokenizer()
    ids = workloads.prompt_ids(tokenizer, Prompt(domain, "How many?", f"{domain}/0"))
    assert ids == [ord(c) for c in "<user>How many?<assistant>"]
    assert tokenizer.templated == [([{"role": "user", "content": "How many?"}], True)]


def test_a_prompt_given_as_messages_is_an_instruction_in_any_domain() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = Prompt("support", "Be brief.\n\nHi", "support/0", messages)
    tokenizer = RecordingTokenizer()
    assert workloads.prompt_ids(tokenizer, prompt) == [
        ord(c) for c in "<user>Be brief.Hi<assistant>"
    ]
    assert tokenizer.templated == [(messages, True)]


def test_local_mode_sends_instructions_to_chat_completions_and_text_to_generate() -> None:
    from aurora.runtime.local.run import request_body
    from aurora.runtime.server.routes import DOMAIN_HEADER

    path, body, headers = request_body(Prompt("math", "2 + 2?", "math/0"), 16)
    assert path == "/v1/chat/completions" and headers == {DOMAIN_HEADER: "math"}
    assert body == {
        "messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 16, "temperature": 0
    }  # fmt: skip
    path, body, headers = request_body(Prompt("code", "def f(", "code/0"), 16)
    assert (path, headers) == ("/generate", {})
    assert body == {
        "text": "def f(", "domain": "code",
        "sampling_params": {"max_new_tokens": 16, "temperature": 0},
    }  # fmt: skip
