"""The engine worker: one thread that owns the target and decodes one request at a time.

HTTP handlers tokenize, then ``submit`` a Job to a bounded queue (full → QueueFull,
which the app answers with 503 and Retry-After) and await its future. The worker
routes each job to an arm (stable, candidate or baseline), runs the engine, resolves
the future, then hands stats and a sampled trace to the publisher. Any exception in
one job fails that job only; the worker keeps serving. Batching across requests is
not done: each verify step serves one request.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aurora.runtime.engine import Generation, generate
from aurora.runtime.protocol import RequestStats
from aurora.runtime.server.metrics import ServerMetrics
from aurora.runtime.server.revisions import Arm, RevisionSet, Router, RoutingError
from aurora.runtime.server.tracing import TracePublisher

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """The request cannot be served as asked (answered with 400); names the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class QueueFull(RuntimeError):
    """The request queue is at --max-queue."""


class Cancelled(RuntimeError):
    """The client went away; the job stops at the next decode step."""


class InternalError(RuntimeError):
    """An engine failure inside one request; ``error_id`` is what the log shows."""

    def __init__(self, error_id: str, kind: str) -> None:
        super().__init__(f"internal error {error_id} ({kind}); the server logged it under this id")
        self.error_id = error_id


@dataclass
class Completion:
    """What a finished request returns to the HTTP layer."""

    id: str
    text: str
    output_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    arm: Arm
    revision: str
    verify_steps: int
    accept_length: float
    decode_tokens_per_s: float
    e2e_latency: float

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    domain: str = ""
    arm: Arm | None = None  # pinned by the request, else routed by shares
    revision: str | None = None
    on_text: Callable[[str], None] | None = None  # streaming: text deltas, from the worker thread
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    received: float = field(default_factory=time.perf_counter)
    future: concurrent.futures.Future[Completion] = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"request {self.id} was cancelled by its client")


class TextTracker:
    """Detokenizes as the engine decodes: finds stop strings (returning the engine's
    token cut) and streams text deltas, holding back a possible stop-string prefix
    and incomplete UTF-8 so nothing streamed is ever taken back."""

    def __init__(
        self,
        tokenizer: Any,
        lock: threading.Lock,
        stops: Sequence[str],
        on_text: Callable[[str], None] | None,
    ) -> None:
        self.tokenizer, self.lock, self.stops, self.on_text = tokenizer, lock, list(stops), on_text
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.sent = ""

    @property
    def active(self) -> bool:
        return bool(self.stops) or self.on_text is not None

    def decode(self, ids: Sequence[int]) -> str:
        with self.lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def stop_at(self, text: str) -> int | None:
        """Character index where the earliest stop string starts, or None."""
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def __call__(self, output: list[int]) -> int | None:
        """The engine's stop callback: None to go on, or how many output tokens to keep."""
        text = self.decode(output)
        if self.stops and self.stop_at(text) is not None:
            # The text before this step had no stop string: the cut is in the last few tokens.
            n = len(output)
            while n > 1 and self.stop_at(self.decode(output[: n - 1])) is not None:
                n -= 1
            return n
        self._emit(text, final=False)
        return None

    def finish(self, output_ids: list[int]) -> str:
        """The final text (cut before a stop string); streams what is left of it."""
        text = self.decode(output_ids)
        if (cut := self.stop_at(text)) is not None:
            text = text[:cut]
        self._emit(text, final=True)
        return text

    def _emit(self, text: str, final: bool) -> None:
        if self.on_text is None or not text.startswith(self.sent):
            return
        end = len(text) if final else max(len(self.sent), len(text) - self.holdback)
        safe = text[:end] if final else text[:end].rstrip("\ufffd")
        if len(safe) > len(self.sent):
            self.on_text(safe[len(self.sent) :])
            self.sent = safe


class EngineWorker:
    """Owns the target model; decodes queued jobs one at a time on its own thread."""

    def __init__(
        self,
        target: Any,
        tokenizer: Any,
        tokenizer_lock: threading.Lock,
        revisions: RevisionSet,
        router: Router,
        metrics: ServerMetrics,
        publisher: TracePublisher | None,
        *,
        server_id: str,
        spec_tokens: int,
        eos_ids: Sequence[int],
        max_queue: int,
        trace_sample_rate: float,
        trace_topk: int,
        seed: int,
    ) -> None:
        self.target, self.tokenizer, self.tokenizer_lock = target, tokenizer, tokenizer_lock
        self.revisions, self.router, self.metrics, self.publisher = (
            revisions,
            router,
            metrics,
            publisher,
        )
        self.server_id, self.k, self.eos_ids = server_id, spec_tokens, list(eos_ids)
        self.trace_sample_rate, self.trace_topk = trace_sample_rate, trace_topk
        self._rng = random.Random(seed + 1)  # trace sampling and per-request sampling seeds
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._busy = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aurora-engine-worker", daemon=True)
        self.device = next(target.parameters()).device

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the job in progress; queued jobs are cancelled."""
        self._stop.set()
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.future.cancel()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def depth(self) -> int:
        """Jobs waiting plus the one being decoded."""
        return self._queue.qsize() + int(self._busy)

    def submit(self, job: Job) -> Job:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.requests.labels(arm="", revision="", status="rejected").inc()
            raise QueueFull(f"{self._queue.maxsize} requests are queued (--max-queue)") from None
        return job

    # -- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if not job.future.set_running_or_notify_cancel():
                self.metrics.requests.labels(arm="", revision="", status="cancelled").inc()
                continue
            self._busy = True
            try:
                self._serve(job)
            finally:
                self._busy = False

    def _serve(self, job: Job) -> None:
        arm, revision = "", job.revision or ""
        try:
            arm, rev = self.revisions.snapshot().route(
                self.router.draw(), arm=job.arm, revision=job.revision
            )
            revision = rev.name
            proposer = rev.proposer if arm != "baseline" else None
            traced = self.publisher is not None and self._rng.random() < self.trace_sample_rate
            generation, completion = self._decode(job, arm, revision, proposer, traced)
        except RoutingError as error:
            self.metrics.requests.labels(
                arm=job.arm or "", revision=revision, status="invalid"
            ).inc()
            job.future.set_exception(
                RequestError(str(error), "revision" if job.revision else "arm")
            )
            return
        except Cancelled as error:
            self.metrics.requests.labels(arm=arm, revision=revision, status="cancelled").inc()
            job.future.set_exception(error)
            return
        except Exception as error:
            # Log the failure without the exception message: it could quote the prompt.
            error_id = uuid.uuid4().hex[:12]
            frames = "".join(traceback.format_tb(error.__traceback__))
            log.error(
                "request %s failed with %s (error id %s):\n%s",
                job.id,
                type(error).__name__,
                error_id,
                frames,
            )
            self.metrics.requests.labels(arm=arm, revision=revision, status="error").inc()
            job.future.set_exception(InternalError(error_id, type(error).__name__))
            return
        # Metrics and stats first: once a client has its answer, they include it.
        self._record(job, completion, generation, traced)
        job.future.set_result(completion)

    def _decode(
        self, job: Job, arm: Arm, revision: str, proposer: Any, traced: bool
    ) -> tuple[Generation, Completion]:
        generator = None
        if job.temperature > 0:
            seed = job.seed if job.seed is not None else self._rng.getrandbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        tracker = TextTracker(self.tokenizer, self.tokenizer_lock, job.stop, job.on_text)
        speculate = proposer is not None and self.k > 0
        generation = generate(
            self.target,
            job.prompt_ids,
            proposer=proposer if speculate else None,
            k=self.k if speculate else 0,
            max_new_tokens=job.max_new_tokens,
            temperature=job.temperature,
            eos_ids=self.eos_ids,
            stop=tracker if tracker.active else None,
            generator=generator,
            trace_topk=self.trace_topk if traced and speculate else 0,
            before_step=job.check_cancelled,
        )
        text = tracker.finish(generation.output_ids)
        completion = Completion(
            id=job.id,
            text=text,
            output_ids=generation.output_ids,
            prompt_tokens=len(job.prompt_ids),
            finish_reason=generation.finish_reason,
            arm=arm,
            revision=revision,
            verify_steps=len(generation.steps),
            accept_length=generation.accept_length,
            decode_tokens_per_s=generation.decode_tokens_per_s,
            e2e_latency=time.perf_counter() - job.received,
        )
        return generation, completion

    def _record(
        self, job: Job, completion: Completion, generation: Generation, traced: bool
    ) -> None:
        """Metrics, and stats and the trace offered to the publisher (never blocks)."""
        m, arm = self.metrics, completion.arm
        m.requests.labels(arm=arm, revision=completion.revision, status="ok").inc()
        m.generated_tokens.labels(arm=arm).inc(completion.completion_tokens)
        if completion.verify_steps:
            m.accept_length.labels(arm=arm).observe(completion.accept_length)
        if completion.completion_tokens > 1:
            m.decode_tokens_per_s.labels(arm=arm).observe(completion.decode_tokens_per_s)
        if self.publisher is None:
            return
        self.publisher.offer_stats(
            RequestStats(
                revision=completion.revision,
                arm=arm,
                server=self.server_id,
                decode_tokens_per_s=completion.decode_tokens_per_s,
                accept_length=max(1.0, completion.accept_length),
                new_tokens=completion.completion_tokens,
                verify_steps=completion.verify_steps,
                latency_s=completion.e2e_latency,
                domain=job.domain,
            )
        )
        if traced:
            self.publisher.offer_trace(
                generation,
                revision=completion.revision,
                domain=job.domain,
                temperature=job.temperature,
            )
