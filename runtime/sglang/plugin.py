"""Aurora's SGLang plugin: traces and per-request stats from a running SGLang server.

SGLang (0.5.11+) calls ``register()`` in every server process through the
``sglang.srt.plugins`` entry point. Without ``AURORA_REDIS_URL`` and
``AURORA_SPECULATOR`` it does nothing. Otherwise it wraps (HookType.AROUND/AFTER):

- ``EagleVerifyInput.verify`` (V1 worker) and ``EagleVerifyInputV2Mixin.sample``
  (V2/overlap worker): where the target accepts or rejects the draft tree. The hook
  clones a few small tensors (draft tokens, tree links, accepted indices and, with
  ``AURORA_TRACE_TOPK`` > 0, the target's top-k at every tree node) and records a CUDA
  event: no host sync on the scheduler thread.
- ``SchedulerOutputProcessorMixin.stream_output_generation``: request completion; the
  finished request's prompt and output ids are copied.
- ``SchedulerUpdateWeightsMixin.get_weights_by_name``: names starting ``draft:`` are
  read from the draft model (SGLang 0.5.12 reads only the target), so the weight
  pusher can verify a swap.
- ``http_server._setup_and_run_http_server``: starts the revision watcher (weights.py)
  in the HTTP server's process.

A capture thread turns verify batches into the protocol's verify steps (the tree's
accepted path plus its first-child continuation, so every step reads as a chain, like
the torch engine's) and hands finished requests to the torch server's TracePublisher,
which XADDs them. Both buffers are bounded; what does not fit is dropped and counted.
Nothing here blocks the scheduler or raises into it.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aurora.runtime.protocol import Keys

log = logging.getLogger("aurora.sglang")

MODULE = "aurora.runtime.sglang.plugin"
DRAFT_PREFIX = "draft:"  # get_weights_by_name names read from the draft model


# -------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PluginSettings:
    """What the plugin does in this server, from the AURORA_* environment that the
    operator sets on SGLang pods (operator/pods.py)."""

    redis_url: str
    keys: Keys
    server: str
    role: str = "stable"  # stable | canary (the canary Deployment serves the candidate)
    sample_rate: float = 1.0
    trace_maxlen: int = 10_000
    stats_maxlen: int = 100_000
    topk: int = 8
    buffer: int = 1024
    max_pending: int = 8192  # requests with steps but no completion yet
    watch: bool = True  # run the revision watcher in the HTTP server process

    @property
    def arm(self) -> str:
        return "candidate" if self.role == "canary" else "stable"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PluginSettings | None:
        """None when tracing is off (no AURORA_REDIS_URL or AURORA_SPECULATOR); ValueError
        naming the variable when one is malformed."""
        url, speculator = environ.get("AURORA_REDIS_URL"), environ.get("AURORA_SPECULATOR")
        if not url or not speculator:
            return None
        namespace, _, name = speculator.partition("/")
        if not name:
            raise ValueError(
                f"AURORA_SPECULATOR={speculator!r}: use NAMESPACE/NAME, e.g. default/llama"
            )
        role = environ.get("AURORA_SERVER_ROLE", "stable")
        if role not in ("stable", "canary"):
            raise ValueError(f"AURORA_SERVER_ROLE={role!r}: use 'stable' or 'canary'")

        def number(variable: str, kind: type, default: Any, low: float, high: float) -> Any:
            text = environ.get(variable)
            try:
                value = default if text in (None, "") else kind(text)
            except ValueError:
                raise ValueError(f"{variable}={text!r} is not a {kind.__name__}") from None
            if not low <= value <= high:
                raise ValueError(f"{variable}={value} must be in [{low}, {high}]")
            return value

        return cls(
            redis_url=url,
            keys=Keys(namespace, name),
            server=environ.get("AURORA_SERVER_ID") or environ.get("HOSTNAME") or "sglang",
            role=role,
            sample_rate=number("AURORA_TRACE_SAMPLE_RATE", float, 1.0, 0.0, 1.0),
            trace_maxlen=number("AURORA_TRACE_MAXLEN", int, 10_000, 1, 10**9),
            stats_maxlen=number("AURORA_STATS_MAXLEN", int, 100_000, 1, 10**9),
            topk=number("AURORA_TRACE_TOPK", int, 8, 0, 64),
            buffer=number("AURORA_TRACE_BUFFER", int, 1024, 1, 10**6),
            watch=environ.get("AURORA_SGLANG_WATCH", "1") != "0",
        )


# ------------------------------------------------------------ verify → steps


@dataclass
class VerifyBatch:
    """One verify call, as cloned on the scheduler thread (tensors may live on the GPU
    until ``ready`` fires). Rows are requests; N = draft tokens per request (the tree's
    nodes, node 0 being the last verified token)."""

    rids: list[str]
    candidates: Any  # [bs, N] draft token ids
    next_token: Any  # [bs, N] first child of each node, -1 for none
    accepted: Any  # V2: [bs, steps+1] flat node indices, -1 padded; V1: flat, unpadded
    accepted_counts: list[int] | None  # V1: accepted nodes per request (incl. the root)
    topk_ids: Any = None  # [bs*N, K] target top-k at every node, or None
    topk_logprobs: Any = None
    ready: Any = None  # CUDA event recorded after the clones, or None on CPU
    seen: float = field(default_factory=time.monotonic)


def _as_lists(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def verify_steps(batch: VerifyBatch) -> dict[str, Any]:
    """rid → StepRecord for each request of a verify call (waits for its CUDA event).

    The target verified a draft tree; the trace protocol speaks chains. A step's
    ``proposed`` is the accepted path's draft tokens followed by the first-child chain
    below the last accepted node (with top-k 1 the whole chain, exactly as proposed),
    ``accepted`` the path length, and ``topk_*`` the target's top-k at each proposed
    token's parent node: the distribution that decided that position."""
    from aurora.runtime.engine import StepRecord

    if batch.ready is not None:
        batch.ready.synchronize()
    candidates, next_token = _as_lists(batch.candidates), _as_lists(batch.next_token)
    accepted = _as_lists(batch.accepted)
    if batch.accepted_counts is None:  # V2: padded rows
        rows = [[a for a in row if a >= 0] for row in accepted]
    else:  # V1: one flat list, split by the per-request counts
        rows, at = [], 0
        for count in batch.accepted_counts:
            rows.append(accepted[at : at + count])
            at += count
    topk_ids, topk_logprobs = _as_lists(batch.topk_ids), _as_lists(batch.topk_logprobs)
    steps = {}
    for i, rid in enumerate(batch.rids):
        width = len(candidates[i])
        path = [a - i * width for a in rows[i]] or [0]
        nodes, parents = path[1:], path[:-1]
        node = path[-1]
        child = next_token[i][node]
        while 0 <= child < width and child not in nodes:
            nodes.append(child)
            parents.append(node)
            node, child = child, next_token[i][child]
        record = StepRecord(proposed=[candidates[i][n] for n in nodes], accepted=len(path) - 1)
        if topk_ids is not None and nodes:
            record.topk_ids = [topk_ids[i * width + p] for p in parents]
            record.topk_logprobs = [
                [round(v, 4) for v in topk_logprobs[i * width + p]] for p in parents
            ]
        steps[rid] = record
    return steps


# ------------------------------------------------------------------- capture


@dataclass(frozen=True)
class FinishedRequest:
    """A finished request as copied on the scheduler thread."""

    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    temperature: float
    retracted: bool
    verify_ct: int
    first_token_at: float  # monotonic: when the capture first saw it streaming
    finished_at: float  # monotonic
    latency_s: float | None = None  # from SGLang's queue entry, when it recorded one


@dataclass
class _Pending:
    steps: list[Any] = field(default_factory=list)
    broken: str | None = None  # why this request's trace cannot be trusted


class TraceCapture:
    """Verify batches and finished requests in; traces and stats out through a
    TracePublisher. ``offer_*`` never block: a full buffer drops and counts."""

    def __init__(
        self,
        settings: PluginSettings,
        publisher: Any,
        metrics: Any,
        *,
        revision: Callable[[], str] = lambda: "",
        rng: random.Random | None = None,
    ) -> None:
        self.settings, self.publisher, self.metrics, self.revision = (
            settings,
            publisher,
            metrics,
            revision,
        )
        self._rng = rng or random.Random()
        self._queue: queue.Queue[VerifyBatch | FinishedRequest | None] = queue.Queue(
            maxsize=settings.buffer
        )
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._thread = threading.Thread(
            target=self._loop, name="aurora-sglang-capture", daemon=True
        )
        self._started = False
        self._lock = threading.Lock()

    # -- scheduler thread ------------------------------------------------------

    def offer(self, item: VerifyBatch | FinishedRequest) -> bool:
        """Queue a verify batch or a finished request; False (counted) when dropped."""
        if not self._started:
            with self._lock:
                if not self._started:
                    self.publisher.start()
                    self._thread.start()
                    self._started = True
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            kind = "step" if isinstance(item, VerifyBatch) else "trace"
            self._drop(kind, "buffer_full")
            return False

    # -- capture thread --------------------------------------------------------

    def _drop(self, kind: str, reason: str) -> None:
        self.metrics.dropped.labels(kind=kind, reason=reason).inc()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.handle(item)
            except Exception:  # a bad batch must not stop the capture thread
                log.exception("aurora: could not process a %s", type(item).__name__)
            finally:
                self._queue.task_done()

    def handle(self, item: VerifyBatch | FinishedRequest) -> None:
        """Process one item (the capture thread does this; tests call it directly)."""
        if isinstance(item, VerifyBatch):
            self._add_steps(item)
        else:
            self._finish(item)

    def _add_steps(self, batch: VerifyBatch) -> None:
        for rid, step in verify_steps(batch).items():
            pending = self._pending.get(rid)
            if pending is None:
                pending = self._pending[rid] = _Pending()
                while len(self._pending) > self.settings.max_pending:
                    self._pending.popitem(last=False)  # aborted without a completion
                    self._drop("trace", "evicted")
            pending.steps.append(step)

    def _finish(self, request: FinishedRequest) -> None:
        from aurora.runtime.engine import Generation
        from aurora.runtime.protocol import RequestStats

        pending = self._pending.pop(request.rid, None) or _Pending()
        steps = _trim(pending.steps, len(request.output_ids))
        decode_s = max(request.finished_at - request.first_token_at, 0.0)
        latency_s = max(request.latency_s or 0.0, decode_s)
        generation = Generation(
            prompt_ids=request.prompt_ids,
            output_ids=request.output_ids,
            steps=steps,
            finish_reason="stop",
            prefill_s=latency_s - decode_s,
            decode_s=decode_s,
        )
        revision = self.revision()
        verify_steps_seen = len(steps) or request.verify_ct
        accept_length = generation.accept_length if steps else _accept_length(request)
        self.publisher.offer_stats(
            RequestStats(
                revision=revision,
                arm=self.settings.arm,  # type: ignore[arg-type]
                server=self.settings.server,
                decode_tokens_per_s=generation.decode_tokens_per_s,
                accept_length=max(accept_length, 1.0),
                new_tokens=len(request.output_ids),
                verify_steps=verify_steps_seen,
                latency_s=latency_s,
            )
        )
        if request.retracted:  # re-prefilled output tokens have no verify step
            self._drop("trace", "retracted")
        elif self._rng.random() < self.settings.sample_rate:
            self.publisher.offer_trace(
                generation, revision=revision, domain="", temperature=request.temperature
            )

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until both buffers are empty (tests, shutdown); True if they emptied."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks and self.publisher.flush(
            max(deadline - time.monotonic(), 0.0)
        )


def _trim(steps: list[Any], output_len: int) -> list[Any]:
    """Drop steps that start past the output: the overlap scheduler can verify a request
    once more after it finished, and those tokens were never delivered."""
    kept, at = [], 1
    for step in steps:
        if at >= output_len:
            break
        kept.append(step)
        at += step.accepted + 1
    return kept


def _accept_length(request: FinishedRequest) -> float:
    # SGLang's own figure: completion tokens per verify step (bonus token included).
    return len(request.output_ids) / request.verify_ct if request.verify_ct else 1.0


# ---------------------------------------------------------------------- hooks

_capture: TraceCapture | None = None
_settings: PluginSettings | None = None
_emits: bool | None = None


def _emitting() -> TraceCapture | None:
    """The capture, when this process emits: only tensor-parallel rank 0 of each replica
    does (every rank sees the same batch)."""
    global _emits
    if _emits is None:
        try:
            from sglang.srt.distributed import get_tensor_model_parallel_rank

            _emits = get_tensor_model_parallel_rank() == 0
        except Exception:  # not initialised: a single-process engine
            _emits = True
    return _capture if _emits else None


def _clone(tensor: Any) -> Any:
    return None if tensor is None else tensor.detach().clone()


def _topk(logits: Any, k: int) -> tuple[Any, Any]:
    import torch

    values, ids = torch.topk(logits, k, dim=-1)
    logprobs = values.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    return ids, logprobs


def _prepare(spec: Any, reqs: Sequence[Any] | None, logits_output: Any) -> dict[str, Any] | None:
    """Before verification mutates the logits: clone what the trace needs."""
    if not reqs or _capture is None:
        return None
    bs = len(reqs)
    n = int(spec.draft_token_num)
    prepared: dict[str, Any] = {
        "rids": [req.rid for req in reqs],
        "candidates": _clone(spec.draft_token.reshape(bs, n)),
        "next_token": _clone(spec.retrieve_next_token.reshape(bs, n)),
    }
    k = _capture.settings.topk
    logits = getattr(logits_output, "next_token_logits", None)
    if k > 0 and logits is not None:
        prepared["topk_ids"], prepared["topk_logprobs"] = _topk(logits, min(k, logits.shape[-1]))
    return prepared


def _ready_event(device: Any) -> Any:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        event = torch.cuda.Event()
        event.record()
        return event
    return None


def _safely(what: str, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Exception:  # never raise into SGLang's scheduler
        log.exception("aurora: %s failed; tracing skips it", what)
        return None


def _verified(
    what: str,
    accepted_of: Callable[[Any], tuple[Any, list[int] | None]],
    original: Callable[..., Any],
    self: Any,
    batch: Any,
    logits_output: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run SGLang's verification untouched; around it, clone what a trace needs."""
    capture = _emitting()
    prepared = None
    if capture is not None and not batch.forward_mode.is_idle():
        prepared = _safely(
            f"preparing a {what} trace", lambda: _prepare(self, batch.reqs, logits_output)
        )
    result = original(self, batch, logits_output, *args, **kwargs)
    if capture is not None and prepared:

        def offer() -> None:
            accepted, counts = accepted_of(result)
            ready = _ready_event(accepted.device)
            capture.offer(
                VerifyBatch(accepted=accepted, accepted_counts=counts, ready=ready, **prepared)
            )

        _safely(f"capturing a {what} step", offer)
    return result


def around_verify(
    original: Callable[..., Any],
    self: Any,
    batch: Any,
    logits_output: Any,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """V1 worker: EagleVerifyInput.verify(batch, logits_output, allocator, page_size,
    vocab_mask) → EagleVerifyOutput (accept_indices flat, num_correct_drafts_per_req_cpu)."""
    return _verified(
        "V1 verify",
        lambda out: (_clone(out.accept_indices), [int(c) + 1 for c in out.num_correct_drafts_per_req_cpu]),
        original, self, batch, logits_output, args, kwargs,
    )  # fmt: skip


def around_sample(
    original: Callable[..., Any],
    self: Any,
    batch: Any,
    logits_output: Any,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """V2 worker: EagleVerifyInputV2Mixin.sample(batch, logits_output, vocab_mask) →
    (predict, accept_lens, accept_index [bs, steps+1], -1 padded)."""
    return _verified(
        "V2 verify",
        lambda out: (_clone(out[2]), None),
        original,
        self,
        batch,
        logits_output,
        args,
        kwargs,
    )


def after_stream_output(
    result: Any, self: Any, reqs: Sequence[Any], *args: Any, **kwargs: Any
) -> None:
    """Scheduler.stream_output_generation(reqs, …): stamp each request's first token and
    hand finished ones to the capture (once)."""
    capture = _emitting()
    if capture is not None:
        _safely("capturing finished requests", lambda: _observe(capture, reqs))


def _observe(capture: TraceCapture, reqs: Sequence[Any]) -> None:
    now = time.monotonic()
    for req in reqs:
        if getattr(req, "_aurora_done", False):
            continue
        if not hasattr(req, "_aurora_first"):
            req._aurora_first = now
        if not req.finished():
            continue
        req._aurora_done = True
        # SGLang stamps queue entry with perf_counter; 0.0 when it did not.
        entered = getattr(getattr(req, "time_stats", None), "wait_queue_entry_time", 0.0) or 0.0
        params = req.sampling_params
        # SGLang turns temperature 0 into top_k=1 with temperature 1: that is greedy.
        greedy = getattr(params, "top_k", None) == 1 or not getattr(params, "temperature", 0.0)
        capture.offer(
            FinishedRequest(
                rid=req.rid,
                prompt_ids=list(req.origin_input_ids),
                output_ids=list(req.output_ids),
                temperature=0.0 if greedy else float(params.temperature),
                retracted=bool(getattr(req, "retraction_count", 0)),
                verify_ct=int(getattr(req, "spec_verify_ct", 0) or 0),
                first_token_at=req._aurora_first,
                finished_at=now,
                latency_s=time.perf_counter() - entered if entered else None,
            )
        )


def around_get_weights_by_name(
    original: Callable[..., Any], self: Any, recv_req: Any, *args: Any, **kwargs: Any
) -> Any:
    """Scheduler.get_weights_by_name: ``draft:NAME`` reads NAME from the draft model."""
    name = getattr(recv_req, "name", "")
    if not name.startswith(DRAFT_PREFIX) or getattr(self, "draft_worker", None) is None:
        return original(self, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import GetWeightsByNameReqOutput

    runner = draft_model_runner(self.draft_worker)
    parameter = runner.get_weights_by_name(name[len(DRAFT_PREFIX) :], recv_req.truncate_size)
    return GetWeightsByNameReqOutput(parameter)


def draft_model_runner(draft_worker: Any) -> Any:
    """The draft's ModelRunner: V1 EAGLEWorker is itself the draft's TpModelWorker;
    V2 EAGLEWorkerV2 keeps it at draft_worker.draft_runner."""
    inner = getattr(draft_worker, "draft_worker", None)
    if inner is not None and hasattr(inner, "draft_runner"):
        return inner.draft_runner
    return draft_worker.model_runner


def around_http_server(
    original: Callable[..., Any], server_args: Any, *args: Any, **kwargs: Any
) -> Any:
    """_setup_and_run_http_server(server_args, …) runs the HTTP server until shutdown;
    start the revision watcher beside it, in this process."""
    if _settings is not None and _settings.watch:
        _safely("starting the revision watcher", lambda: _start_watcher(server_args))
    return original(server_args, *args, **kwargs)


def _start_watcher(server_args: Any) -> None:
    from aurora.runtime.sglang.weights import start_watcher

    host = server_args.host if server_args.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    start_watcher(
        _settings,
        f"http://{host}:{server_args.port}",
        server_args.speculative_draft_model_path,
        int(server_args.tp_size),
    )


# SGLang dotted path → (hook, HookType name). A contract test checks every target and
# its signature in the pinned release.
HOOKS: dict[str, tuple[Callable[..., Any], str]] = {
    "sglang.srt.speculative.eagle_info.EagleVerifyInput.verify": (around_verify, "AROUND"),
    "sglang.srt.speculative.eagle_info_v2.EagleVerifyInputV2Mixin.sample": (
        around_sample,
        "AROUND",
    ),
    "sglang.srt.managers.scheduler_output_processor_mixin.SchedulerOutputProcessorMixin.stream_output_generation": (
        after_stream_output,
        "AFTER",
    ),
    "sglang.srt.managers.scheduler_update_weights_mixin.SchedulerUpdateWeightsMixin.get_weights_by_name": (
        around_get_weights_by_name,
        "AROUND",
    ),
    "sglang.srt.entrypoints.http_server._setup_and_run_http_server": (around_http_server, "AROUND"),
}


def start_capture(settings: PluginSettings) -> TraceCapture:
    """The process's TraceCapture: the torch server's TracePublisher on a fail-fast
    Redis client; the revision label is what this server reported loaded."""
    from aurora.runtime.protocol import connect
    from aurora.runtime.server.metrics import ServerMetrics
    from aurora.runtime.server.tracing import TracePublisher
    from aurora.runtime.sglang.weights import LoadedRevision

    client = connect(settings.redis_url)
    metrics = ServerMetrics()
    publisher = TracePublisher(
        client,
        settings.keys,
        metrics,
        server=settings.server,
        trace_maxlen=settings.trace_maxlen,
        stats_maxlen=settings.stats_maxlen,
        buffer=settings.buffer,
    )
    loaded = LoadedRevision(client, settings.keys, settings.server, settings.role)
    return TraceCapture(settings, publisher, metrics, revision=loaded.get)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register the hooks when the AURORA_*
    environment asks for tracing; otherwise do nothing."""
    global _capture, _settings
    try:
        settings = PluginSettings.from_env(os.environ)
    except ValueError as error:
        log.error("aurora: SGLang plugin disabled: %s", error)
        return
    if settings is None:
        log.info("aurora: SGLang plugin idle (set AURORA_REDIS_URL and AURORA_SPECULATOR to trace)")
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _settings = settings
    _capture = start_capture(settings)  # threads start on the first offer
    for target, (hook, kind) in HOOKS.items():
        HookRegistry.register(target, hook, HookType[kind])
    log.info(
        "aurora: tracing to %s as server %s (%s)",
        settings.keys.prefix,
        settings.server,
        settings.role,
    )
