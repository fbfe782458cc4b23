"""Chaos run: concurrent clients against a real `aurora serve` through hot swaps and
Redis outages, then (optionally) a trainer killed with SIGKILL at random moments.

Everything is real: the default model in an `aurora serve` process, a redis-server
killed with SIGKILL and restarted on the same port, checkpoints written with
`checkpoint.save_checkpoint`, swaps requested through the desired state in Redis and
confirmed by the server's loaded reports. The report says what users felt (requests,
failures, p50/p99 latency) and what the faults cost (trace drops counted in /metrics,
time until traces flow again, traces lost by the trainer).

    python -m aurora.runtime.chaos --duration 300 --clients 8 --swaps 6   # make chaos

tests/reliability/test_load.py runs a one-minute version in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from aurora.runtime import protocol
from aurora.runtime.checkpoint import CheckpointStore, save_checkpoint
from aurora.runtime.embedded_redis import EmbeddedRedis, free_port
from aurora.runtime.models import DEFAULT_MODEL
from aurora.runtime.options import add_options, from_args, knob, option_args, to_args
from aurora.runtime.protocol import Builtin, DesiredState, Keys, RevisionRef
from aurora.runtime.server.config import ServerConfig
from aurora.runtime.trainer.config import TrainerConfig

log = logging.getLogger(__name__)

KEYS = Keys("default", "chaos")
TRAINER_KEYS = Keys("default", "chaos-trainer")
SERVER_ID = "chaos-server"
PROMPTS = (
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n",
    "1, 2, 3, 4,",
    "Once upon a time",
    "class Stack:\n    def push(self, item):",
)


@dataclass
class ChaosConfig:
    """One chaos run. Faults are spread evenly over ``duration_s``, swaps first. The
    defaults are the long run (`make chaos`); each knob is a flag of the command line."""

    workdir: Path = knob(Path("out/chaos"), "logs, checkpoints, Redis data")
    duration_s: float = knob(300.0, "seconds of load", flag="--duration")
    clients: int = knob(8, "concurrent HTTP clients")
    swaps: int = knob(6, "hot swaps under load")
    redis_kills: int = knob(2, "Redis SIGKILL + restart")
    redis_down_s: float = 3.0
    max_new_tokens: int = knob(8, "tokens per request")
    trainer_kills: int = knob(6, "trainer SIGKILLs (0 skips the trainer phase)")
    trainer_traces: int = knob(48, "traces the trainer must incorporate")
    model: str = DEFAULT_MODEL
    seed: int = knob(0, "seed of the swap schedule and the revisions' random heads")
    confirm_timeout_s: float = 90.0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        for name in ("duration_s", "clients", "swaps", "max_new_tokens", "trainer_traces"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.redis_kills < 0 or self.trainer_kills < 0:
            raise ValueError("redis_kills and trainer_kills count faults: 0 or more")


@dataclass
class ChaosReport:
    """What a chaos run measured; ``ok`` when nothing failed and nothing was lost."""

    duration_s: float = 0.0
    clients: int = 0
    requests: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, for the reader
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    latency_max_s: float | None = None
    served_by: dict[str, int] = field(default_factory=dict)  # revision → requests
    swaps_published: int = 0
    swaps_confirmed: int = 0  # loaded reports naming exactly the desired revisions
    swap_confirm_s: list[float] = field(default_factory=list)
    swap_pause_ms: list[float] = field(default_factory=list)
    swap_errors: list[str] = field(default_factory=list)
    redis_kills: int = 0
    redis_recovery_s: list[float] = field(default_factory=list)  # restart → new traces
    dropped: dict[str, float] = field(default_factory=dict)  # "kind/reason" → count
    published: dict[str, float] = field(default_factory=dict)  # kind → count
    trainer_kills: int = 0
    trainer_traces: int = 0
    trainer_traces_lost: int | None = None
    trainer_pending_after: int | None = None

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0
            and self.requests > 0
            and self.swaps_confirmed == self.swaps_published
            and len(self.redis_recovery_s) == self.redis_kills
            and not self.trainer_traces_lost
        )

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def write_revision(target: Any, root: Path, revision: str, seed: int) -> Path:
    """A real checkpoint of a randomly initialised EAGLE head for ``target``."""
    import torch

    from aurora.runtime.draft import DraftConfig, EagleDraftHead

    config = DraftConfig.for_target(target.config, DEFAULT_MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EagleDraftHead(config, target.get_input_embeddings())
    return save_checkpoint(
        root, revision, head.state_dict(), parent=None, step=seed, traces_seen=0,
        evaluation={}, draft_config=config.to_dict(),
    )  # fmt: skip


def scrape(text: str, family: str) -> dict[str, float]:
    """Prometheus samples of ``family`` as {"label=value,...": value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            labels, value = line[len(family) + 1 :].rsplit("} ", 1)
            out[labels.replace('"', "")] = float(value)
    return out


class Load:
    """``clients`` threads posting /generate back to back until stopped, cycling through
    ``prompts`` (tagged with ``domain`` when given)."""

    def __init__(
        self,
        base_url: str,
        clients: int,
        max_new_tokens: int,
        seed: int,
        *,
        prompts: Sequence[str] = PROMPTS,
        domain: str | None = None,
    ) -> None:
        self.base_url, self.clients, self.max_new_tokens = base_url, clients, max_new_tokens
        self.prompts, self.domain = list(prompts), domain
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.served_by: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.rng = random.Random(seed)
        self.threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(300)

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=300) as http:
            n = 0
            while not self.stop.is_set():
                prompt = self.prompts[(index + n) % len(self.prompts)]
                n += 1
                body: dict[str, Any] = {
                    "text": prompt,
                    "sampling_params": {"max_new_tokens": self.max_new_tokens, "temperature": 0},
                }
                if self.domain is not None:
                    body["domain"] = self.domain
                started = time.perf_counter()
                try:
                    reply = http.post("/generate", json=body)
                    failure = (
                        None
                        if reply.status_code == 200
                        else f"{reply.status_code}: {reply.text[:200]}"
                    )
                    revision = (
                        reply.json()["meta_info"]["draft_revision"] if failure is None else ""
                    )
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    failure, revision = f"{type(error).__name__}: {error}", ""
                elapsed = time.perf_counter() - started
                with self.lock:
                    if failure is None:
                        self.latencies.append(elapsed)
                        self.served_by[revision] += 1
                    else:
                        self.failures.append(failure)


class ServeProcess:
    """`aurora serve` in its own process on a free loopback port, logging to a file."""

    def __init__(self, config: ChaosConfig, redis_url: str, checkpoints: Path) -> None:
        self.port = free_port()
        self.log_path = config.workdir / "serve.log"
        server = ServerConfig(
            model=config.model,
            port=self.port,
            threads=1,
            draft=Builtin.NGRAM,
            redis_url=redis_url,
            speculator=f"{KEYS.namespace}/{KEYS.name}",
            server_id=SERVER_ID,
            checkpoint_dir=str(checkpoints),
            baseline_share=0.0,
            poll_interval=0.2,
            seed=config.seed,
        )
        self.command = [
            *(sys.executable, "-P", "-m", "aurora", "--log-level", "INFO", "serve"),
            *to_args(server),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        with open(self.log_path, "ab") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT)
        with httpx.Client(base_url=self.url, timeout=10) as http:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"aurora serve exited: {self.log_path.read_text()[-2000:]}")
                try:
                    if http.get("/ready").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"aurora serve not ready after 300 s: see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text


def wait_until(condition: Callable[[], Any], timeout: float, step: float = 0.1) -> Any:
    """``condition()``'s first truthy value, or None after ``timeout`` seconds. Redis
    errors count as not yet (the condition may read a Redis that is restarting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except (redis.RedisError, OSError):
            pass
        time.sleep(step)
    return None


def swap_plan(paths: list[Path]) -> list[tuple[DesiredState, tuple[str, str | None]]]:
    """Desired states for the swaps and what the server must then report loaded:
    odd swaps make the revision stable, even ones put it on canary beside the last stable."""
    plan: list[tuple[DesiredState, tuple[str, str | None]]] = []
    stable: RevisionRef | None = None
    for i, path in enumerate(paths, 1):
        ref = RevisionRef(revision=path.name, path=str(path))
        if stable is None or i % 2 == 1:
            stable = ref
            state = DesiredState(stable=ref, candidate_share=0.0, baseline_share=0.0, generation=i)
            plan.append((state, (ref.revision, None)))
        else:
            state = DesiredState(
                stable=stable, candidate=ref, candidate_share=0.5, baseline_share=0.0, generation=i
            )
            plan.append((state, (stable.revision, ref.revision)))
    return plan


def run_serving(config: ChaosConfig, target: Any, report: ChaosReport) -> EmbeddedRedis:
    """The load phase: clients, swaps and Redis kills against `aurora serve`. Returns
    the (running) Redis, which holds the traces served."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = config.workdir / "checkpoints"
    paths = [
        write_revision(target, checkpoints, f"r{i}", config.seed + i)
        for i in range(1, config.swaps + 1)
    ]
    plan = swap_plan(paths)
    store = EmbeddedRedis(data_dir=config.workdir / "redis")
    (config.workdir / "redis").mkdir(exist_ok=True)
    store.start()
    client = redis.Redis.from_url(store.url, socket_timeout=5)
    events = ["swap"] * config.swaps
    for k in range(config.redis_kills):  # interleave: swap, redis, swap, redis, swap, ...
        events.insert(min(2 * k + 1, len(events)), "redis")
    with ServeProcess(config, store.url, checkpoints) as server:
        started = time.monotonic()
        with Load(server.url, config.clients, config.max_new_tokens, config.seed) as load:
            for n, event in enumerate(events, 1):
                at = started + config.duration_s * n / (len(events) + 1)
                time.sleep(max(0.0, at - time.monotonic()))
                if event == "swap":
                    desired, expected = plan[report.swaps_published]
                    _swap(client, desired, expected, config, report)
                else:
                    _kill_redis(store, client, config, report)
            time.sleep(max(0.0, started + config.duration_s - time.monotonic()))
        report.duration_s = round(time.monotonic() - started, 1)
        text = server.metrics()
    report.clients = config.clients
    report.requests = len(load.latencies) + len(load.failures)
    report.failed = len(load.failures)
    report.failures = load.failures[:5]
    for name, q in (("latency_p50_s", 50), ("latency_p99_s", 99), ("latency_max_s", 100)):
        value = percentile(load.latencies, q)
        setattr(report, name, None if value is None else round(value, 3))
    report.served_by = dict(sorted(load.served_by.items()))
    report.dropped = {
        k.replace("kind=", "").replace(",reason=", "/"): v
        for k, v in scrape(text, "aurora_trace_dropped_total").items()
    }
    report.published = {
        k.replace("kind=", ""): v for k, v in scrape(text, "aurora_traces_published_total").items()
    }
    client.close()
    return store


def _swap(
    client: redis.Redis,
    desired: DesiredState,
    expected: tuple[str, str | None],
    config: ChaosConfig,
    report: ChaosReport,
) -> None:
    published = time.monotonic()
    protocol.set_desired(client, KEYS, desired)
    report.swaps_published += 1

    def loaded() -> protocol.LoadedReport | None:
        now = protocol.get_loaded(client, KEYS).get(SERVER_ID)
        return now if now and (now.stable, now.candidate) == expected else None

    confirmed = wait_until(loaded, config.confirm_timeout_s)
    if confirmed is None:
        now = protocol.get_loaded(client, KEYS).get(SERVER_ID)
        report.swap_errors.append(
            f"swap {report.swaps_published} to {expected} not confirmed: {now}"
        )
        return
    report.swaps_confirmed += 1
    report.swap_confirm_s.append(round(time.monotonic() - published, 2))
    if confirmed.pause_ms is not None:
        report.swap_pause_ms.append(round(confirmed.pause_ms, 3))
    if confirmed.error:
        report.swap_errors.append(confirmed.error)
    log.info("swap %d confirmed: %s", report.swaps_published, expected)


def _kill_redis(
    store: EmbeddedRedis, client: redis.Redis, config: ChaosConfig, report: ChaosReport
) -> None:
    time.sleep(1.2)  # appendfsync everysec: what was written a second ago is on disk
    store.stop(kill=True)
    report.redis_kills += 1
    time.sleep(config.redis_down_s)
    store.start()
    restarted = time.monotonic()
    (baseline,) = wait_until(lambda: (int(client.xlen(KEYS.traces)),), config.confirm_timeout_s)
    if wait_until(lambda: int(client.xlen(KEYS.traces)) > baseline, config.confirm_timeout_s, 0.05):
        report.redis_recovery_s.append(round(time.monotonic() - restarted, 2))
    log.info("redis kill %d: recovered in %s s", report.redis_kills, report.redis_recovery_s[-1:])


def incorporated(checkpoints: Path) -> set[str]:
    """Trace ids that some checkpoint under ``checkpoints`` lists as incorporated."""
    ids: set[str] = set()
    for meta in CheckpointStore(checkpoints, keep=10**6).list():
        state = checkpoints / meta.revision / "trainer-state.json"
        if state.is_file():
            ids.update(json.loads(state.read_text()).get("incorporated_ids", []))
    return ids


def trainer_command(config: ChaosConfig, redis_url: str, checkpoints: Path) -> list[str]:
    trainer = TrainerConfig(
        model=config.model,
        speculator=f"{TRAINER_KEYS.namespace}/{TRAINER_KEYS.name}",
        redis_url=redis_url,
        checkpoint_dir=checkpoints,
        draft_vocab=512,
        checkpoint_every=2,
        keep=1000000,
        first_candidate_after=1000000,
    )
    return [
        *(sys.executable, "-P", "-m", "aurora", "--log-level", "WARNING", "train"),
        *to_args(trainer),
        *option_args({"threads": 1}),  # `aurora train --threads`
    ]


def run_trainer_kills(config: ChaosConfig, store: EmbeddedRedis, report: ChaosReport) -> None:
    """Copy ``trainer_traces`` served traces to a fresh stream, SIGKILL the trainer at
    random moments ``trainer_kills`` times, let a last run finish, and count the traces
    that no checkpoint incorporated (must be 0) and those still pending."""
    client = redis.Redis.from_url(store.url, socket_timeout=10)
    entries: list[Any] = client.xrange(KEYS.traces, count=config.trainer_traces) or []
    good, _ = protocol.decode_entries(entries)
    for _, fields in entries:
        client.xadd(TRAINER_KEYS.traces, fields)
    trace_ids = {record.trace_id for _, record in good}
    report.trainer_traces = len(trace_ids)
    checkpoints = config.workdir / "trainer-checkpoints"
    command = trainer_command(config, store.url, checkpoints)
    rng = random.Random(config.seed)
    log_file = open(config.workdir / "trainer.log", "ab")  # noqa: SIM115 (shared by every run)
    try:
        for _ in range(config.trainer_kills):
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            time.sleep(rng.uniform(5, 25))
            process.kill()
            process.wait()
            report.trainer_kills += 1
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)

        def drained() -> bool:
            groups = client.xinfo_groups(TRAINER_KEYS.traces)
            if not groups:
                return False
            pending = int(client.xpending(TRAINER_KEYS.traces, "trainer")["pending"])
            last = groups[0]["last-delivered-id"]
            undelivered = client.xrange(TRAINER_KEYS.traces, b"(" + last, "+", count=1)
            return pending == 0 and not undelivered

        wait_until(drained, 900, 1.0)
        process.send_signal(signal.SIGTERM)
        process.wait(300)
    finally:
        log_file.close()
    report.trainer_pending_after = int(client.xpending(TRAINER_KEYS.traces, "trainer")["pending"])
    report.trainer_traces_lost = len(trace_ids - incorporated(checkpoints))
    client.close()


def run(config: ChaosConfig, target: Any = None) -> ChaosReport:
    """The whole chaos run; ``target`` (the loaded model) only writes the revisions'
    random heads, and is loaded here when not given."""
    if target is None:
        import torch

        from aurora.runtime.models import load_target

        torch.set_num_threads(1)
        target, _ = load_target(config.model)
    report = ChaosReport()
    store = run_serving(config, target, report)
    try:
        if config.trainer_kills:
            run_trainer_kills(config, store, report)
    finally:
        store.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aurora.runtime.chaos", description=__doc__.split("\n\n")[0]
    )
    add_options(parser, ChaosConfig)
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else one line per request
    config = from_args(ChaosConfig, args)
    report = run(config)
    print(report.to_json())
    if args.report:
        args.report.write_text(report.to_json() + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
