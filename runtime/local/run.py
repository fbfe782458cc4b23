"""`aurora local`: the whole loop on one machine.

An embedded redis-server (or --redis-url), one or more `aurora serve` processes,
one `aurora train` process (`processes`), the rollout policy driven through Redis by the
same round function the operator's timer runs, and a traffic generator following a
workload schedule. A live terminal view shows what happens (`live`); at the end a report
folder holds JSON, Markdown and a PNG plot (`report`).
"""

from __future__ import annotations

import logging
import random
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from aurora.runtime import protocol
from aurora.runtime.embedded_redis import EmbeddedRedis, free_port
from aurora.runtime.local.config import LocalConfig
from aurora.runtime.local.live import LiveView
from aurora.runtime.local.processes import Processes, server_config, trainer_args
from aurora.runtime.local.report import (
    LocalRun,
    Sample,
    decision_figures,
    longest_window,
    stable_figure,
    write_report,
)
from aurora.runtime.options import to_args
from aurora.runtime.rollout import NO_DRAFT, day_zero
from aurora.runtime.rollout.loop import SampleWindow, run_round, window_size
from aurora.runtime.server.routes import DOMAIN_HEADER
from aurora.runtime.workloads import Prompt, Schedule, is_instruction, load_domain

log = logging.getLogger(__name__)


class LocalMode:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.run = LocalRun(config)
        self.stop = threading.Event()
        self.processes = Processes(config.workdir / "logs")
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
        self.run.state, desired = day_zero(c.initial_draft, c.rollout, time.time())
        protocol.set_desired(self.client, c.keys, desired)
        for i in range(c.servers):
            port = free_port()
            self.ports.append(port)
            args = to_args(server_config(c, i, port, url))
            self.processes.spawn("serve", args, f"server-{i}.log")
        self.processes.spawn("train", trainer_args(c, url), "trainer.log")
        self.processes.wait_ready(self.ports)

    def fresh_workdir(self) -> None:
        """A run starts at day 0: an earlier run's checkpoints in the workdir are removed,
        or the trainer would resume that run's draft."""
        checkpoints = self.config.workdir / "checkpoints"
        if checkpoints.exists() and any(checkpoints.iterdir()):
            log.info("day 0: removing the previous run's checkpoints in %s", checkpoints)
            shutil.rmtree(checkpoints)
        checkpoints.mkdir(parents=True, exist_ok=True)

    def shutdown(self) -> None:
        self.stop.set()
        self.processes.stop()
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
                path, body, headers = request_body(item.prompt, c.max_new_tokens)
                try:
                    response = client.post(
                        f"http://127.0.0.1:{port}{path}", json=body, headers=headers
                    )
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
            figures = decision_figures(event.action, decision.measurement)
            self._event(event.time, event.action, event.revision, event.reason, **figures)
            self._track_swap(event.action, event.revision, event.time)
        self._confirm_swaps()
        m = decision.measurement or self._measure(window)
        run.final = longest_window(run.final, stable_figure(m))
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
            # (a hybrid canary was published as its head)
            candidate = protocol.get_candidate(
                self.client, self.config.keys, protocol.head_of(revision)
            )
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
        for event in self.run.state.history:  # the day-0 draft's canary, when gated
            at = max(event.time, self.run.started)  # (decided while the servers started)
            self._event(at, event.action, event.revision, event.reason)
            self._track_swap(event.action, event.revision, at)
        traffic = threading.Thread(target=self.traffic, daemon=True)
        rollout = threading.Thread(target=self.rollout_loop, daemon=True)
        traffic.start()
        rollout.start()
        try:
            view = LiveView(self.run) if c.live else None
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


def request_body(prompt: Prompt, max_new_tokens: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The path, JSON body and headers that send a workload prompt as a user would: text to
    continue (code, prose) to /generate; an instruction (chat, math, messages) to
    /v1/chat/completions, so the server applies the chat template (sent as raw text, an
    instruct model often ends the turn at once). Greedy either way, the domain tagged."""
    if is_instruction(prompt):
        body = {"messages": prompt.as_chat(), "max_tokens": max_new_tokens, "temperature": 0}
        return "/v1/chat/completions", body, {DOMAIN_HEADER: prompt.domain}
    body = {
        "text": prompt.text,
        "domain": prompt.domain,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0},
    }
    return "/generate", body, {}


def _recent_accept_length(window: SampleWindow, revision: str | None, n: int = 20) -> float | None:
    names = {revision} if revision else {"", protocol.Builtin.NONE}  # as servers say it
    values = [
        s.accept_length for s in window.samples() if s.arm == "stable" and s.revision in names
    ]
    return statistics.fmean(values[-n:]) if values else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
