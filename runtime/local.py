"""`aurora local`: the whole loop on one machine.

An embedded redis-server (or --redis-url), one or more `aurora serve` processes,
one `aurora train` process, the rollout policy driven through Redis by the same
round function the operator's timer runs, and a traffic generator following a
workload schedule. A live terminal view shows what happens; at the end a report
folder holds JSON, Markdown and a PNG plot.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from aurora.runtime import protocol
from aurora.runtime.embedded_redis import EmbeddedRedis, free_port
from aurora.runtime.rollout import NO_DRAFT, RolloutPolicy, RolloutState
from aurora.runtime.rollout.loop import SampleWindow, run_round, window_size
from aurora.runtime.workloads import Schedule, load_domain

log = logging.getLogger(__name__)


# `aurora local`'s rollout policy where it differs from the policy's defaults (which suit
# a cluster): fewer samples and a larger baseline, so a short CPU demo reaches decisions.
LOCAL_ROLLOUT: dict[str, Any] = {
    "min_samples": 12,
    "canary_share": "0.4",
    "baseline_share": "0.2",
    "max_canary_samples": 60,
    "on_inconclusive": "Rollback",
}


@dataclass
class LocalConfig:
    model: str = "smollm2-135m"
    schedule: str = "code:60,prose:400"
    # The first phase lasts at least its count and until `shift_delay` requests after the
    # `shift_after_promotions`-th promotion (at most `hold_limit` x its count), so the domain
    # shift lands on a draft that has proven itself; 0 promotions: follow the counts.
    shift_after_promotions: int = 2
    shift_delay: int = 16
    hold_limit: float = 3.0
    # Servers decode one request at a time: batches never mix arms, so with batching an
    # arm's per-request throughput would depend on its traffic share (the busier arm batches
    # more and each of its requests decodes slower), which biases the live A/B.
    server_max_batch: int = 1
    distinct_prompts: int | None = 40  # None: every prompt of a domain before any repeats
    seed: int = 0
    minutes: float = 14.0
    redis_url: str | None = None
    servers: int = 1
    clients: int = 2
    max_new_tokens: int = 32
    spec_tokens: int = 3
    initial_draft: str = "none"
    workdir: Path = Path("aurora-local")
    report_dir: Path | None = None
    namespace: str = "default"
    name: str = "local"
    rollout: RolloutPolicy = field(default_factory=lambda: RolloutPolicy(**LOCAL_ROLLOUT))
    first_candidate_after: int = 16
    publish_every: int = 24
    lr: float = 1e-3
    lambda_discard: float = 0.5
    min_accept_length: float = 1.6
    steps_per_trace: float = 6.0
    server_threads: int = 1
    trainer_threads: int = 1
    interval_s: float = 1.0
    live: bool = True
    stop_after_decision: bool = False  # end at the first promotion or rollback (tests)

    @property
    def keys(self) -> protocol.Keys:
        return protocol.Keys(self.namespace, self.name)


@dataclass
class Sample:
    """One point of the timeline, read off the live stats."""

    t: float
    requests: int
    failed: int
    stable: str | None
    candidate: str | None
    accept_length: float | None
    speedup: float | None  # stable's decode throughput over the no-speculation baseline
    speedup_samples: int  # requests behind it: the smaller of the two arms
    candidate_speedup: float | None
    phase: str


@dataclass
class LocalRun:
    config: LocalConfig
    started: float = field(default_factory=time.time)
    requests: int = 0
    failed: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    events: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[Sample] = field(default_factory=list)
    phase: str = ""
    state: RolloutState = field(default_factory=RolloutState)
    trainer: dict[str, str] = field(default_factory=dict)
    last_reason: str = ""
    promotion_requests: list[int] = field(default_factory=list)  # requests done at each
    # per revision: when it was published, decided and confirmed by every server (epoch s)
    swaps: dict[str, dict[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalMode:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.run = LocalRun(config)
        self.stop = threading.Event()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.redis_server: EmbeddedRedis | None = None
        self.ports: list[int] = []
        self.schedule = Schedule.from_string(config.schedule)  # a bad schedule fails here
        self.policy = config.rollout

    # ------------------------------------------------------------------ processes

    def start(self) -> None:
        c = self.config
        self.fresh_workdir()
        if c.redis_url:
            url = c.redis_url
        else:
            self.redis_server = EmbeddedRedis(data_dir=None).start()
            url = self.redis_server.url
        self.url = url
        self.client = redis.Redis.from_url(url)
        protocol.delete_all(self.client, c.keys)  # a fresh run: day 0
        initial = None if c.initial_draft == "none" else c.initial_draft
        self.run.state = RolloutState(stable_revision=initial)
        desired = protocol.DesiredState(
            stable=protocol.RevisionRef(revision=initial, path="") if initial else None,
            candidate_share=0.0,
            baseline_share=float(c.rollout.baseline_share),
            generation=1,
        )
        protocol.set_desired(self.client, c.keys, desired)
        logs = c.workdir / "logs"
        logs.mkdir(exist_ok=True)
        speculator = f"{c.namespace}/{c.name}"
        common = [
            "--model",
            c.model,
            "--speculator",
            speculator,
            "--redis-url",
            url,
            "--checkpoint-dir",
            str(c.workdir / "checkpoints"),
        ]
        for i in range(c.servers):
            port = free_port()
            self.ports.append(port)
            self._spawn(
                [
                    *common,
                    "--port",
                    str(port),
                    "--draft",
                    c.initial_draft,
                    "--spec-tokens",
                    str(c.spec_tokens),
                    "--baseline-share",
                    str(c.rollout.baseline_share),
                    "--threads",
                    str(c.server_threads),
                    "--max-batch",
                    str(c.server_max_batch),
                    "--server-id",
                    f"local-server-{i}",
                    "--seed",
                    str(c.seed + i),
                ],
                "serve",
                logs / f"server-{i}.log",
            )
        self._spawn(
            [
                *common,
                "--spec-tokens",
                str(c.spec_tokens),
                "--first-candidate-after",
                str(c.first_candidate_after),
                "--publish-every",
                str(c.publish_every),
                "--lr",
                str(c.lr),
                "--lambda-discard",
                str(c.lambda_discard),
                "--threads",
                str(c.trainer_threads),
                "--min-accept-length",
                str(c.min_accept_length),
                "--steps-per-trace",
                str(c.steps_per_trace),
            ],
            "train",
            logs / "trainer.log",
        )
        self._wait_ready()

    def fresh_workdir(self) -> None:
        """A run starts at day 0: an earlier run's checkpoints in the workdir are removed,
        or the trainer would resume that run's draft."""
        checkpoints = self.config.workdir / "checkpoints"
        if checkpoints.exists() and any(checkpoints.iterdir()):
            log.info("day 0: removing the previous run's checkpoints in %s", checkpoints)
            shutil.rmtree(checkpoints)
        checkpoints.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], command: str, log_path: Path) -> None:
        out = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "aurora", command, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)

    def _wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while True:
                for p in self.processes:
                    if p.poll() is not None:
                        raise RuntimeError(
                            f"a process exited early with {p.returncode}; see {self.config.workdir / 'logs'}"
                        )
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server on port {port} not ready after {timeout:.0f} s")
                time.sleep(0.5)

    def shutdown(self) -> None:
        self.stop.set()
        for p in self.processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.redis_server:
            self.redis_server.close()

    # ------------------------------------------------------------------ traffic

    def traffic(self) -> None:
        c = self.config
        schedule = self.schedule
        pools = None
        if c.distinct_prompts:  # recurring traffic: each domain draws from a fixed subset
            pools = {
                d: random.Random(f"{c.seed}/{d}").sample(p, min(c.distinct_prompts, len(p)))
                for d in schedule.domains
                for p in [load_domain(d)]
            }
        requests = iter(schedule.requests(c.seed, pools=pools, extend=self._hold_phase))
        lock = threading.Lock()

        def worker(index: int) -> None:
            client = httpx.Client(timeout=300)
            while not self.stop.is_set():
                with lock:
                    item = next(requests, None)
                    if item is None:
                        return
                    if self.run.phase and item.phase != self.run.phase:
                        self._event(
                            time.time(),
                            "TrafficShift",
                            None,
                            f"traffic moves from {self.run.phase} to {item.phase} "
                            f"at request {item.index}",
                        )
                    self.run.phase = item.phase
                port = self.ports[item.index % len(self.ports)]
                body = {
                    "text": item.prompt.text,
                    "domain": item.prompt.domain,
                    "sampling_params": {"max_new_tokens": c.max_new_tokens, "temperature": 0},
                }
                try:
                    response = client.post(f"http://127.0.0.1:{port}/generate", json=body)
                    ok = response.status_code == 200
                    if not ok:
                        self.run.errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as err:
                    ok = False
                    self.run.errors.append(f"{type(err).__name__}: {err}")
                with self.run.lock:
                    self.run.requests += 1
                    self.run.failed += 0 if ok else 1

        threads = [
            threading.Thread(target=worker, args=(i,), daemon=True) for i in range(c.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _hold_phase(self, phase: int) -> bool:
        """The schedule's gate: hold the first phase until `shift_delay` requests after the
        `shift_after_promotions`-th promotion (its count is the minimum, `hold_limit` times
        its count the maximum)."""
        c, run = self.config, self.run
        if c.shift_after_promotions <= 0 or phase != 0 or self.stop.is_set():
            return False
        if run.requests >= c.hold_limit * self.schedule.phases[0].requests:
            return False  # no promotions in sight: shift anyway
        if len(run.promotion_requests) < c.shift_after_promotions:
            return True
        return run.requests - run.promotion_requests[c.shift_after_promotions - 1] < c.shift_delay

    def _event(
        self, at: float, action: str, revision: str | None, reason: str, **figures: Any
    ) -> None:
        self.run.events.append(
            {
                "t": at - self.run.started,
                "action": action,
                "revision": revision,
                "reason": reason,
                **figures,
            }
        )
        log.info("%s %s: %s", action, revision or "", reason)

    # ------------------------------------------------------------------ rollout

    def rollout_loop(self) -> None:
        window = SampleWindow(size=window_size(self.policy))
        while not self.stop.wait(self.config.interval_s):
            self.rollout_tick(window)

    def rollout_tick(self, window: SampleWindow) -> None:
        run = self.run
        now = time.time()
        result = run_round(self.client, self.config.keys, self.policy, run.state, window, now)
        decision = result.decision
        run.state = decision.new_state
        self.client.set(self.config.keys.rollout, run.state.model_dump_json(by_alias=True))
        run.last_reason = decision.reason
        for event in decision.events:
            figures = {}
            gated = decision.measurement
            measured = gated.candidate_speedup_vs_baseline if gated else None
            if event.action == "Promote" and gated and measured:
                # the statistically gated figure: the candidate against no speculation
                figures["speedup_vs_no_speculation"] = {
                    "estimate": measured.estimate,
                    "lower": measured.lower,
                    "upper": measured.upper,
                    "confidence": gated.confidence,
                }
            self._event(event.time, event.action, event.revision, event.reason, **figures)
            self._track_swap(event.action, event.revision, event.time)
        self._confirm_swaps()
        m = decision.measurement or self._measure(window)
        raw: dict[Any, Any] = self.client.hgetall(self.config.keys.trainer)
        run.trainer = {_text(k): _text(v) for k, v in raw.items()}
        run.timeline.append(
            Sample(
                t=now - run.started,
                requests=run.requests,
                failed=run.failed,
                stable=run.state.stable_revision,
                candidate=run.state.candidate_revision,
                accept_length=_recent_accept_length(window, run.state.stable_revision),
                speedup=m.stable_speedup_vs_baseline.estimate
                if m and m.stable_speedup_vs_baseline
                else None,
                speedup_samples=min(m.stable.samples, m.baseline.samples) if m else 0,
                candidate_speedup=(
                    m.candidate_speedup_vs_baseline.estimate
                    if m and m.candidate_speedup_vs_baseline
                    else None
                ),
                phase=run.phase,
            )
        )

    def _track_swap(self, action: str, revision: str | None, at: float) -> None:
        """Remember when a revision was published and sent to the servers."""
        run = self.run
        if action == "Promoted":
            run.promotion_requests.append(run.requests)
        if action == "Fallback":
            revision = NO_DRAFT  # the event names the regressed revision; plain decoding follows
        if revision is None or action not in ("StartCanary", "Promote", "Fallback"):
            return  # ("Promoted" comes once every server confirmed: too late to time from)
        record = run.swaps.setdefault(revision, {})
        if action == "StartCanary":
            candidate = protocol.get_candidate(self.client, self.config.keys, revision)
            if candidate is not None:
                record["published"] = candidate.created
            record["canary_decided"] = at
        else:
            record["stable_decided"] = at

    def _confirm_swaps(self) -> None:
        """Note when every server first reported serving each decided revision (the
        `swapped` time of the slowest server)."""
        pending = [
            (revision, role, record)
            for revision, record in self.run.swaps.items()
            for role in ("canary", "stable")
            if f"{role}_decided" in record and f"{role}_serving" not in record
        ]
        if not pending:
            return
        reports = list(protocol.get_loaded(self.client, self.config.keys).values())
        for revision, role, record in pending:
            field_ = "candidate" if role == "canary" else "stable"
            serving = [r for r in reports if getattr(r, field_) == revision]
            if reports and len(serving) >= self.config.servers:
                times = [r.swapped for r in serving if r.swapped is not None]
                record[f"{role}_serving"] = max(times) if times else time.time()

    def _measure(self, window: SampleWindow) -> Any:
        from aurora.runtime.rollout import measure

        state = self.run.state
        return measure(
            window.samples(),
            state.stable_revision,
            state.candidate_revision,
            self.policy,
            since=state.window_since,
        )

    # ------------------------------------------------------------------ main

    def execute(self) -> Path:
        c = self.config
        started = time.monotonic()
        self.start()
        self.run.started = time.time()
        traffic = threading.Thread(target=self.traffic, daemon=True)
        rollout = threading.Thread(target=self.rollout_loop, daemon=True)
        traffic.start()
        rollout.start()
        try:
            view = LiveView(self) if c.live else None
            while traffic.is_alive() and time.monotonic() - started < c.minutes * 60:
                if c.stop_after_decision and any(
                    e["action"] in ("Promoted", "Rollback", "Reject", "Fallback")
                    for e in self.run.events
                ):
                    break
                if view:
                    view.refresh()
                time.sleep(1.0)
            if view:
                view.close()
        finally:
            self.stop.set()
            rollout.join(timeout=10)
            traffic.join(timeout=120)  # requests in flight finish and are counted
            report = write_report(self.run, c.report_dir or c.workdir / "report")
            self.shutdown()
        return report


def _recent_accept_length(window: SampleWindow, revision: str | None, n: int = 20) -> float | None:
    names = {revision} if revision else {"", "none"}  # no draft: servers say "none"
    values = [
        s.accept_length for s in window.samples() if s.arm == "stable" and s.revision in names
    ]
    return statistics.fmean(values[-n:]) if values else None


class LiveView:
    """A rich live table: traffic, accept length, measured speedup, revisions, events."""

    def __init__(self, mode: LocalMode) -> None:
        from rich.live import Live

        self.mode = mode
        self.live = Live(self._render(), refresh_per_second=2, transient=False)
        self.live.start()

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        run = self.mode.run
        last = run.timeline[-1] if run.timeline else None
        table = Table(title="aurora local", show_header=False, expand=False)
        table.add_row("elapsed", f"{time.time() - run.started:,.0f} s")
        table.add_row("requests", f"{run.requests} ({run.failed} failed), phase {run.phase or '-'}")
        table.add_row("stable", str(run.state.stable_revision))
        table.add_row("candidate", f"{run.state.candidate_revision or '-'} ({run.state.phase})")
        if last:
            table.add_row("accept length (stable)", _fmt(last.accept_length))
            table.add_row(
                "speedup vs no speculation",
                f"stable {_fmt(last.speedup)}x, candidate {_fmt(last.candidate_speedup)}x",
            )
        t = run.trainer
        if t:
            table.add_row(
                "trainer",
                f"step {t.get('step')}, traces {t.get('traces_seen')}, "
                f"loss {_fmt(_float(t.get('loss')))}, lag {t.get('lag')}",
            )
        table.add_row("policy", run.last_reason[:110])
        events = Table(title="rollout events", show_header=True)
        for col in ("t", "action", "revision", "reason"):
            events.add_column(col)
        for e in run.events[-6:]:
            events.add_row(f"{e['t']:.0f}s", e["action"], str(e["revision"]), e["reason"][:80])
        return Group(table, events)

    def refresh(self) -> None:
        self.live.update(self._render())

    def close(self) -> None:
        self.live.stop()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def write_report(run: LocalRun, folder: Path) -> Path:
    """report.json, report.md and timeline.png in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    timeline = [asdict(s) for s in run.timeline]
    # a rolling figure counts once both arms hold minSamples requests (fewer is noise)
    speedups = [
        s.speedup
        for s in run.timeline
        if s.speedup is not None and s.speedup_samples >= run.config.rollout.min_samples
    ]
    gated = [e["speedup_vs_no_speculation"] for e in run.events if "speedup_vs_no_speculation" in e]
    best = max(gated, key=lambda f: f["estimate"]) if gated else None
    promotions = [e for e in run.events if e["action"] == "Promoted"]
    rollbacks = [e for e in run.events if e["action"] in ("Rollback", "Reject")]
    fallbacks = [e for e in run.events if e["action"] == "Fallback"]
    shifts = [e for e in run.events if e["action"] == "TrafficShift"]
    swaps = swap_latencies(run.swaps)
    # a candidate that waited for a running canary to end measures the policy, not the swap
    prompt = 2 * run.config.interval_s
    to_serving = [
        s["publish_to_all_serving_s"]
        for s in swaps
        if "publish_to_all_serving_s" in s and s["waited_for_policy_s"] <= prompt
    ]
    summary = {
        "duration_s": (run.timeline[-1].t if run.timeline else 0.0),
        "requests": run.requests,
        "failed_requests": run.failed,
        "promotions": len(promotions),
        "rollbacks_or_rejections": len(rollbacks),
        "final_stable": run.state.stable_revision,
        "final_speedup_vs_no_speculation": speedups[-1] if speedups else None,
        "max_speedup_vs_no_speculation": max(speedups) if speedups else None,
        "best_promoted_speedup_vs_no_speculation": best,
        "first_promotion_s": promotions[0]["t"] if promotions else None,
        "fallbacks": len(fallbacks),
        "traffic_shift_s": shifts[0]["t"] if shifts else None,
        "max_checkpoint_to_all_servers_s": max(to_serving) if to_serving else None,
        "swaps": swaps,
        "trainer": run.trainer,
        "config": {k: str(v) for k, v in asdict(run.config).items() if k != "rollout"},
        "rollout": run.config.rollout.model_dump(mode="json"),
    }
    (folder / "report.json").write_text(
        json.dumps({"summary": summary, "events": run.events, "timeline": timeline}, indent=2)
    )
    lines = [
        "# aurora local report",
        "",
        f"- requests: {run.requests} ({run.failed} failed)",
        f"- promotions: {len(promotions)}, rollbacks/rejections: {len(rollbacks)}, "
        f"fallbacks to plain decoding: {len(fallbacks)}",
        f"- final stable revision: {run.state.stable_revision}",
        f"- measured speedup over no speculation (stable, last): {_fmt(summary['final_speedup_vs_no_speculation'])}x"
        f" (max {_fmt(summary['max_speedup_vs_no_speculation'])}x; both over at least "
        f"{run.config.rollout.min_samples} requests per arm)",
        "- best measured speedup over no speculation at a promotion: "
        + (
            f"{best['estimate']:.2f}x ({best['confidence']:.0%} bounds "
            f"{best['lower']:.2f}x-{best['upper']:.2f}x)"
            if best
            else "-"
        ),
        f"- traffic shift at: {_fmt(summary['traffic_shift_s'])} s",
        f"- trainer checkpoint to every server serving it: at most "
        f"{_fmt(summary['max_checkpoint_to_all_servers_s'])} s over {len(to_serving)} canaries "
        "that did not wait for another canary to end",
        "",
        "## Swaps (seconds)",
        "",
        "| revision | checkpoint to all servers | of which waiting for the policy | "
        "canary decision to all servers | stable decision to all servers |",
        "|---|---|---|---|---|",
        *[
            f"| {s['revision']} | {_fmt(s.get('publish_to_all_serving_s'))} | "
            f"{_fmt(s.get('waited_for_policy_s'))} | "
            f"{_fmt(s.get('canary_decision_to_all_serving_s'))} | "
            f"{_fmt(s.get('stable_decision_to_all_serving_s'))} |"
            for s in swaps
        ],
        "",
        "## Rollout events",
        "",
        "| t (s) | action | revision | reason |",
        "|---|---|---|---|",
        *[
            f"| {e['t']:.0f} | {e['action']} | {e['revision']} | {e['reason']} |"
            for e in run.events
        ],
        "",
        "![timeline](timeline.png)",
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))
    _plot(run, folder / "timeline.png")
    return folder


def swap_latencies(swaps: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per revision, seconds from publication (canaries) and from each rollout decision to
    the moment every server served it."""
    rows = []
    for revision, record in swaps.items():
        row: dict[str, Any] = {"revision": revision}
        if "published" in record and "canary_serving" in record:
            row["publish_to_all_serving_s"] = record["canary_serving"] - record["published"]
            row["waited_for_policy_s"] = max(0.0, record["canary_decided"] - record["published"])
        for role in ("canary", "stable"):
            if f"{role}_decided" in record and f"{role}_serving" in record:
                row[f"{role}_decision_to_all_serving_s"] = max(
                    0.0, record[f"{role}_serving"] - record[f"{role}_decided"]
                )
        rows.append(row)
    return rows


def _plot(run: LocalRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ts = [s.t for s in run.timeline]
    ax1.plot(
        ts,
        [s.accept_length if s.accept_length is not None else float("nan") for s in run.timeline],
        label="accept length (stable)",
    )
    ax1.set_ylabel("tokens / verify step")
    ax2.plot(
        ts,
        [s.speedup if s.speedup is not None else float("nan") for s in run.timeline],
        label="stable vs no speculation",
    )
    ax2.plot(
        ts,
        [
            s.candidate_speedup if s.candidate_speedup is not None else float("nan")
            for s in run.timeline
        ],
        label="candidate vs no speculation",
        alpha=0.7,
    )
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("measured speedup")
    ax2.set_xlabel("seconds")
    order = {"StartCanary": 0, "Rollback": 1, "Reject": 1, "Fallback": 1, "Promoted": 2}
    for e in sorted(run.events, key=lambda e: order.get(e["action"], 0)):  # promotions on top
        color = {
            "Promoted": "green",
            "Rollback": "red",
            "Reject": "red",
            "Fallback": "purple",
            "StartCanary": "orange",
            "TrafficShift": "blue",
        }.get(e["action"])
        if color:
            for ax in (ax1, ax2):
                ax.axvline(e["t"], color=color, ls="--", lw=0.8)
    phases = [
        (s.t, s.phase)
        for i, s in enumerate(run.timeline)
        if i == 0 or s.phase != run.timeline[i - 1].phase
    ]
    for t, phase in phases:
        ax1.annotate(phase, (t, 1.0), fontsize=8, color="purple")
    ax1.legend(loc="upper left")
    ax2.legend(loc="upper left")
    fig.suptitle(
        "aurora local: green = promoted, red = rolled back/rejected, purple = fallback,\n"
        "orange = canary start, blue = traffic shift"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
