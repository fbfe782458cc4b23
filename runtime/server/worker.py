"""The engine worker: one thread that owns the target and decodes the requests.

HTTP handlers tokenize, then ``submit`` a Job to a bounded queue (full → QueueFull,
which the app answers with 503 and Retry-After) and await its future. The worker
routes each job to an arm (stable, candidate or baseline), runs the engine, resolves
the future, then hands stats and a sampled trace to the publisher. Any exception in
one job fails that job only; the worker keeps serving.

With ``max_batch`` > 1 and a Llama-family model, jobs are decoded together
(continuous batching, ``engine.BatchDecoder``): queued jobs join the batch between
verify steps, each step verifies every row's draft in one target forward, and a
finished, cancelled or failed job leaves without disturbing the others. Other
models, or ``max_batch`` 1, decode one job at a time with ``generate``.

Rows of one batch share their arm and revision, and arms are assigned per *cohort*, not
per request: when a batch starts, one routing draw (by the shares) picks the arm for
every request that joins it, up to ``2 x max_batch`` requests; then the batch stops
taking requests, drains, and the next cohort draws again. A request's decode tokens/s is
the rollout's unit of measurement, and two things must not bias it:
- a plain (baseline) row batched with drafted rows would pay for their verify tokens
  and draft steps, and they would share its forward (so arms never share a batch);
- per-request routing would let the busier arm batch more, and each of its requests
  decode slower, so an arm's throughput would depend on its traffic share. Drawn per
  cohort, the arm is independent of how many requests the batch gets, so every arm sees
  the same distribution of batch sizes; the stats carry the cohort id
  (``RequestStats.cohort``), the unit the rollout's statistics cluster on.
A request that pins an arm or revision is routed alone and waits for a cohort of its own
(unpinned requests never join it, so pinned traffic cannot steer their arm).
"""

from __future__ import annotations

import collections
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

from aurora.runtime.cost import measure_batch_cost, measure_generate_cost
from aurora.runtime.engine import BatchDecoder, Generation, Row, draft_length, generate
from aurora.runtime.llama import Llama, UnsupportedModel
from aurora.runtime.protocol import RequestStats
from aurora.runtime.server.metrics import ServerMetrics
from aurora.runtime.server.revisions import Arm, RevisionSet, Router, RoutingError, Speculation
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
    decode_s: float = 0.0
    cohort: str = ""  # the batch cohort it was routed with ("": routed alone)
    batch_rows: float = 1.0  # mean rows per verify step while it decoded

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


@dataclass
class _Request:
    """A job being decoded in the batch: what its answer needs once its row finishes."""

    job: Job
    arm: Arm
    revision: str
    tracker: TextTracker
    traced: bool
    cohort: str = ""
    steps: int = 0  # verify steps it took part in
    rows: int = 0  # rows of those steps, summed

    @property
    def batch_rows(self) -> float:
        return self.rows / self.steps if self.steps else 1.0


@dataclass
class _Routed:
    """A job taken off the queue with its routing, decided once."""

    job: Job
    arm: Arm
    revision: str
    proposer: Any
    traced: bool

    @property
    def batch_key(self) -> tuple[str, str]:
        return self.arm, self.revision


@dataclass
class _Cohort:
    """The requests routed together with one draw: they share a batch, arm and revision."""

    id: str
    key: tuple[str, str]
    pinned: bool  # routed by a pinned request: only requests pinned alike join
    admitted: int = 0


def _pinned(job: Job) -> bool:
    return job.arm is not None or job.revision is not None


class EngineWorker:
    """Owns the target model and decodes queued jobs on its own thread: up to
    ``max_batch`` of them together (continuous batching, when the model has a
    batched forward), else one at a time."""

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
        max_batch: int = 1,
        slow_revision: tuple[str, float] | None = None,
        speculation: Speculation | None = None,
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
        self._held = 0  # jobs taken off the queue and not answered yet
        # Jobs taken off the queue that wait for the next cohort (see the module doc).
        self._deferred: collections.deque[Job] = collections.deque()
        self._cohorts = 0
        # Tests of the rollout gate only: (revision, seconds) added to each of its verify steps.
        self.slow_revision = slow_revision
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aurora-engine-worker", daemon=True)
        # The global suffix cache learns every finished request; the verify cost is
        # measured on this thread before the first request (see _measure_cost) and
        # refined by every verify forward after it (VerifyCost.observe).
        self.speculation = speculation
        self.device = next(target.parameters()).device
        self.decoder: BatchDecoder | None = None
        if max_batch > 1:
            try:
                self.decoder = BatchDecoder(
                    Llama(target, rows=max_batch),
                    eos_ids=self.eos_ids,
                    cost=speculation.cost if speculation is not None else None,
                )
            except UnsupportedModel as error:
                log.warning("%s; decoding one request at a time", error)

    @property
    def max_batch(self) -> int:
        """Requests decoded together at most (1 when the model has no batched forward)."""
        return self.decoder.model.rows if self.decoder is not None else 1

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the jobs in progress; queued jobs are cancelled."""
        self._stop.set()
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.future.cancel()
        while self._deferred:  # taken, never started: answered as cancelled
            job = self._deferred.popleft()
            self._fail(job, job.arm or "", job.revision or "", Cancelled("the server is stopping"))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def depth(self) -> int:
        """Jobs waiting plus the ones being decoded."""
        return self._queue.qsize() + self._held

    def submit(self, job: Job) -> Job:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.requests.labels(arm="", revision="", status="rejected").inc()
            raise QueueFull(f"{self._queue.maxsize} requests are queued (--max-queue)") from None
        return job

    # -- the loop ----------------------------------------------------------------

    def _measure_cost(self) -> None:
        """Time verify forwards on this engine path, so adaptive drafts know what pays."""
        speculation = self.speculation
        if speculation is None or not speculation.adaptive or self.k <= 0:
            return
        try:
            started = time.perf_counter()
            tokens = max(self.k, speculation.suffix_tokens or 0) + 1
            if self.decoder is not None:
                table = measure_batch_cost(self.decoder.model, tokens, repeats=2)
            else:
                table = measure_generate_cost(self.target, tokens, repeats=2)
            speculation.cost.update(table)
            log.info(
                "verify cost measured in %.1f s: %s",
                time.perf_counter() - started,
                {r: {t: round(s * 1000, 1) for t, s in row.items()} for r, row in table.items()},
            )
        except Exception as error:  # keep the prior: drafting stays lossless either way
            log.warning("could not measure the verify cost (%s); using the prior", error)

    def _learn(self, generation: Generation) -> None:
        """The global suffix tree learns a finished request's output."""
        if self.speculation is None:
            return
        try:
            self.speculation.cache.add(generation.output_ids)
        except Exception as error:  # never fail a request over it; the cache is unchanged
            log.error("the suffix cache refused an output (%s)", type(error).__name__)

    def _loop(self) -> None:
        self._measure_cost()
        while not self._stop.is_set():
            job = self._deferred.popleft() if self._deferred else self._take(timeout=0.2)
            if job is None:
                continue
            if self.decoder is None:
                self._serve(job)
            else:
                self._serve_cohort(job)

    def _take(self, timeout: float | None) -> Job | None:
        """The next queued job whose client still waits (None when the queue is empty)."""
        while True:
            try:
                job = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
            except queue.Empty:
                return None
            if job.future.set_running_or_notify_cancel():
                self._held += 1
                return job
            self.metrics.requests.labels(arm="", revision="", status="cancelled").inc()

    def _route(self, job: Job, draw: float | None = None) -> tuple[Arm, str, Any, bool]:
        """(arm, revision, proposer or None, traced) for a job, from `draw` (a cohort's)
        or a draw of its own; RoutingError if it pins what is not served. The job keeps
        this draft to its end, across swaps."""
        arm, rev = self.revisions.snapshot().route(
            self.router.draw() if draw is None else draw, arm=job.arm, revision=job.revision
        )
        proposer = rev.proposer if arm != "baseline" and self.k > 0 else None
        traced = self.publisher is not None and self._rng.random() < self.trace_sample_rate
        return arm, rev.name, proposer, traced

    def _slow_step(self, revision: str) -> None:
        """The test-only delay per verify step (`--test-slow-revision`)."""
        if self.slow_revision is not None and revision == self.slow_revision[0]:
            time.sleep(self.slow_revision[1])

    def _decode_options(self, job: Job, proposer: Any, traced: bool) -> dict[str, Any]:
        """The engine's per-request arguments (generate's and BatchDecoder.add's)."""
        generator = None
        if job.temperature > 0:
            seed = job.seed if job.seed is not None else self._rng.getrandbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return dict(
            proposer=proposer,
            k=draft_length(proposer, self.k),
            max_new_tokens=job.max_new_tokens,
            temperature=job.temperature,
            generator=generator,
            trace_topk=self.trace_topk if traced and proposer is not None else 0,
        )

    def _serve(self, job: Job) -> None:
        """One job, alone, through ``generate`` (any causal LM)."""
        arm: Arm | str = job.arm or ""
        revision = job.revision or ""
        try:
            arm, revision, proposer, traced = self._route(job)
            tracker = TextTracker(self.tokenizer, self.tokenizer_lock, job.stop, job.on_text)
            served = revision

            def before_step() -> None:
                job.check_cancelled()
                self._slow_step(served)

            generation = generate(
                self.target,
                job.prompt_ids,
                eos_ids=self.eos_ids,
                stop=tracker if tracker.active else None,
                before_step=before_step,
                cost=self.speculation.cost if self.speculation is not None else None,
                **self._decode_options(job, proposer, traced),
            )
        except Exception as error:
            self._fail(job, arm, revision, error)
            return
        self._complete(_Request(job, arm, revision, tracker, traced), generation)

    def _routed(self, job: Job, draw: float | None = None) -> _Routed | None:
        """The job with its routing, or None when it was answered already (cancelled,
        or it pins an arm or revision that is not served)."""
        try:
            job.check_cancelled()
            return _Routed(job, *self._route(job, draw))
        except Exception as error:
            self._fail(job, job.arm or "", job.revision or "", error)
            return None

    def _serve_cohort(self, first: Job) -> None:
        """Route `first` with a fresh draw and decode it together with the requests that
        join its cohort while it runs (see the module doc) until the batch is empty.
        Routing and cancellation happen between steps, as ``before_step`` does for one
        job."""
        decoder = self.decoder
        assert decoder is not None
        draw = self.router.draw()
        if (routed := self._routed(first, draw)) is None:
            return
        self._cohorts += 1
        cohort = _Cohort(f"{self.server_id}:{self._cohorts}", routed.batch_key, _pinned(first))
        self._admit(decoder, routed, cohort)
        while True:
            # Join while the cohort is open; other jobs wait for the next cohort. Once a
            # full batch of them waits, this batch only drains, so no job starves.
            while (
                decoder.capacity
                and cohort.admitted < 2 * self.max_batch
                and len(self._deferred) < self.max_batch
                and not self._stop.is_set()
            ):
                job = self._take(timeout=None)
                if job is None:
                    break
                if _pinned(job) != cohort.pinned:
                    self._deferred.append(job)
                elif (routed := self._routed(job, draw)) is None:
                    continue
                elif routed.batch_key == cohort.key:
                    self._admit(decoder, routed, cohort)
                else:  # pinned elsewhere, or the served revisions changed since the draw
                    self._deferred.append(job)
            if not decoder.rows:
                return
            for row in list(decoder.rows):
                request: _Request = row.owner
                if request.job.cancelled.is_set():
                    decoder.remove(row)
                    self._fail(
                        request.job,
                        request.arm,
                        request.revision,
                        Cancelled(f"request {request.job.id} was cancelled by its client"),
                    )
            self._slow_step(cohort.key[1])
            for row in decoder.rows:
                request = row.owner
                request.steps, request.rows = request.steps + 1, request.rows + len(decoder.rows)
            try:
                finished = decoder.step()
            except Exception as error:  # outside any one row: fail this batch, keep serving
                finished = list(decoder.rows)
                for row in finished:
                    decoder.remove(row)
                    row.error = error
            for row in finished:
                self._settle(row)

    def _admit(self, decoder: BatchDecoder, routed: _Routed, cohort: _Cohort) -> None:
        job, arm, revision, traced = routed.job, routed.arm, routed.revision, routed.traced
        cohort.admitted += 1
        try:
            job.check_cancelled()  # it may have waited for a cohort
            tracker = TextTracker(self.tokenizer, self.tokenizer_lock, job.stop, job.on_text)
            row = decoder.add(
                job.prompt_ids,
                stop=tracker if tracker.active else None,
                owner=_Request(job, arm, revision, tracker, traced, cohort.id),
                **self._decode_options(job, routed.proposer, traced),
            )
        except Exception as error:
            self._fail(job, arm, revision, error)
            return
        if row.done:
            self._settle(row)

    def _settle(self, row: Row) -> None:
        request: _Request = row.owner
        if row.generation is None:
            self._fail(request.job, request.arm, request.revision, row.error or RuntimeError())
        else:
            self._complete(request, row.generation)

    def _fail(self, job: Job, arm: str, revision: str, error: Exception) -> None:
        """Answer a job with its error: 400 for routing, cancelled, else a 500 with an id."""
        self._held -= 1
        if isinstance(error, RoutingError):
            self.metrics.requests.labels(
                arm=job.arm or "", revision=revision, status="invalid"
            ).inc()
            job.future.set_exception(
                RequestError(str(error), "revision" if job.revision else "arm")
            )
            return
        if isinstance(error, Cancelled):
            self.metrics.requests.labels(arm=arm, revision=revision, status="cancelled").inc()
            job.future.set_exception(error)
            return
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

    def _complete(self, request: _Request, generation: Generation) -> None:
        job = request.job
        try:
            text = request.tracker.finish(generation.output_ids)
        except Exception as error:
            self._fail(job, request.arm, request.revision, error)
            return
        completion = Completion(
            id=job.id,
            text=text,
            output_ids=generation.output_ids,
            prompt_tokens=len(job.prompt_ids),
            finish_reason=generation.finish_reason,
            arm=request.arm,
            revision=request.revision,
            verify_steps=len(generation.steps),
            accept_length=generation.accept_length,
            decode_tokens_per_s=generation.decode_tokens_per_s,
            e2e_latency=time.perf_counter() - job.received,
            decode_s=generation.decode_s,
            cohort=request.cohort,
            batch_rows=request.batch_rows,
        )
        self._held -= 1
        # Metrics, stats and the suffix tree first: once a client has its answer, they include it.
        self._record(job, completion, generation, request.traced)
        self._learn(generation)
        job.future.set_result(completion)

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
                decode_s=completion.decode_s,
                prompt_tokens=completion.prompt_tokens,
                cohort=completion.cohort,
                batch_rows=completion.batch_rows,
            )
        )
        if traced:
            self.publisher.offer_trace(
                generation,
                revision=completion.revision,
                domain=job.domain,
                temperature=job.temperature,
            )
