"""The server runtime: everything the routes reach (target, tokenizer, engine worker,
revisions, trace publisher, revision watcher), built from a ServerConfig.

Routes (`routes`) hold no state of their own: each takes this object from the app
(`app.state.runtime`) and calls it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch
from fastapi.responses import StreamingResponse

from aurora.runtime.checkpoint import load_draft
from aurora.runtime.cost import VerifyCost
from aurora.runtime.draft import DraftConfig, EagleDraftHead
from aurora.runtime.models import load_target
from aurora.runtime.protocol import Builtin, hybrid_head
from aurora.runtime.server.api import APIError, ChatCompletionRequest
from aurora.runtime.server.config import ServerConfig, connect_redis
from aurora.runtime.server.metrics import ServerMetrics
from aurora.runtime.server.revisions import (
    Revision,
    RevisionFetcher,
    RevisionLoader,
    RevisionSet,
    RevisionWatcher,
    Router,
    Served,
    Speculation,
    SwapEvent,
)
from aurora.runtime.server.tracing import TracePublisher
from aurora.runtime.server.worker import (
    Cancelled,
    Completion,
    EngineWorker,
    InternalError,
    Job,
    QueueFull,
    RequestError,
)
from aurora.runtime.suffix import SuffixCache
from aurora.runtime.workloads import chat_ids

log = logging.getLogger(__name__)


class ServerRuntime:
    """Everything behind the routes: target, worker, revisions, tracing, watcher."""

    def __init__(self, config: ServerConfig, target: Any = None, tokenizer: Any = None) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.keys = config.keys
        self.target, self.tokenizer = target, tokenizer
        self.tokenizer_lock = (
            threading.Lock()
        )  # fast tokenizers are not safe to share across threads
        self.revisions: RevisionSet | None = None
        self.worker: EngineWorker | None = None
        self.publisher: TracePublisher | None = None
        self.watcher: RevisionWatcher | None = None
        self.redis = connect_redis(config.redis_url) if config.redis_url else None
        self.load_error: str | None = None
        self._loader_thread: threading.Thread | None = None
        self._stopped = False
        self._initial: Revision | None = None
        # Shared by every proposer: the suffix tree over served outputs, the verify cost.
        self.speculation = Speculation(
            SuffixCache(int(config.suffix_cache_mb * 2**20)),
            VerifyCost(),
            config.adaptive,
            spec_tokens=config.spec_tokens,
            suffix_tokens=config.suffix_tokens,
        )
        if target is not None:
            # Fail in create_app, not in the background, when the initial draft is unusable.
            self._initial = self.build_revision(config.draft)
        self.metrics.track_queue(lambda: self.worker.depth() if self.worker else 0)

    # -- revisions -----------------------------------------------------------------

    def build_revision(self, draft: str) -> Revision:
        """A built-in draft (scratch, ngram, suffix, none), hybrid:HEAD, or a checkpoint
        directory's revision."""
        if (inner := hybrid_head(draft)) is not None:
            return self.speculation.hybrid(self.build_revision(inner))
        if (builtin := self.speculation.builtin(draft)) is not None:
            return builtin
        if draft == Builtin.SCRATCH:
            config = DraftConfig.for_target(self.target.config, self.config.model)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                head = EagleDraftHead(config, self.target.get_input_embeddings())
            head = head.to(device=self.device, dtype=self.target.dtype).eval().requires_grad_(False)
            return self.speculation.head(head, Builtin.SCRATCH)
        return self.load_checkpoint_revision(Path(draft))

    def load_checkpoint_revision(self, path: Path) -> Revision:
        """Load and verify a checkpoint (sha256, shapes, dtypes, NaN/Inf, fit to this
        target) and build its draft head; raises naming what is wrong."""
        head, meta = load_draft(path, self.target, device=self.device, dtype=self.target.dtype)
        return self.speculation.head(head, meta.revision, str(path))

    @property
    def device(self) -> torch.device:
        return next(self.target.parameters()).device

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.redis is None:
            log.warning(
                "no Redis configured (--redis-url): serving without traces, stats or hot swaps"
            )
        else:
            self.publisher = TracePublisher(
                self.redis,
                self.keys,
                self.metrics,
                server=self.config.server_id,
                trace_maxlen=self.config.trace_maxlen,
                stats_maxlen=self.config.stats_maxlen,
                buffer=self.config.trace_buffer,
            )
            self.publisher.start()
        if self._initial is not None:
            self._start_serving(self._initial)
        else:
            self._loader_thread = threading.Thread(
                target=self._load, name="aurora-model-loader", daemon=True
            )
            self._loader_thread.start()

    def _load(self) -> None:
        try:
            log.info(
                "loading %s on %s (%s)", self.config.model, self.config.device, self.config.dtype
            )
            self.target, self.tokenizer = load_target(
                self.config.model, device=self.config.device, dtype=self.config.dtype
            )
            initial = self.build_revision(self.config.draft)
            if not self._stopped:
                self._start_serving(initial)
        except Exception as error:
            self.load_error = f"{type(error).__name__}: {error}"
            log.error("cannot serve: %s", self.load_error)

    def _start_serving(self, initial: Revision) -> None:
        config = self.config
        self.revisions = RevisionSet(
            Served(
                initial,
                candidate_share=config.candidate_share,
                baseline_share=config.baseline_share,
            )
        )
        self.metrics.set_active(self.revisions.snapshot().roles())
        self.worker = EngineWorker(
            self.target,
            self.tokenizer,
            self.tokenizer_lock,
            self.revisions,
            Router(config.seed),
            self.metrics,
            self.publisher,
            server_id=config.server_id,
            spec_tokens=config.spec_tokens,
            eos_ids=eos_ids(self.target, self.tokenizer),
            max_queue=config.max_queue,
            trace_sample_rate=config.trace_sample_rate,
            trace_topk=config.trace_topk,
            seed=config.seed,
            max_batch=config.max_batch,
            slow_revision=config.slow_revision,
            speculation=self.speculation,
        )
        self.worker.start()
        if self.redis is not None:
            loader = RevisionLoader(
                self.build_revision,
                self.load_checkpoint_revision,
                config.checkpoint_dir,
                fetch=RevisionFetcher(self.redis, self.keys),
                build_hybrid=self.speculation.hybrid,
            )
            self.watcher = RevisionWatcher(
                self.revisions,
                loader,
                self.redis,
                self.keys,
                config.server_id,
                poll_interval=config.poll_interval,
                on_swap=self._on_swap,
            )
            self.watcher.start()
        log.info(
            "serving %s with draft %s (k=%d) as %s",
            config.model,
            initial.name,
            config.spec_tokens,
            config.server_id,
        )

    def _on_swap(self, event: SwapEvent) -> None:
        if event.revisions_changed:  # a share-only change swaps nothing in or out
            self.metrics.swap_pause.observe(event.pause_s)
        self.metrics.set_active(event.served.roles())

    def stop(self) -> None:
        self._stopped = True
        if self.watcher:
            self.watcher.stop()
        if self.worker:
            self.worker.stop()
        if self.publisher:
            self.publisher.stop()
        if self.redis is not None:
            self.redis.close()

    @property
    def ready(self) -> bool:
        return self.worker is not None and self.worker.alive

    # -- requests ------------------------------------------------------------------

    def require_ready(self) -> EngineWorker:
        if self.worker is None or not self.worker.alive:
            why = f"failed to load: {self.load_error}" if self.load_error else "is still loading"
            raise APIError(
                503,
                f"the model {why}; poll /ready",
                kind="unavailable",
                headers={"Retry-After": "5"},
            )
        return self.worker

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            with self.tokenizer_lock:
                return chat_ids(self.tokenizer, messages)
        except Exception as error:  # a template that rejects this conversation
            raise APIError(
                400,
                f"messages: the model's chat template rejects this conversation "
                f"({type(error).__name__}); check the roles and their order",
                param="messages",
            ) from None

    def check_prompt(
        self, prompt_ids: list[int], max_new_tokens: int, *, prompt_field: str, tokens_field: str
    ) -> None:
        limit = self.config.max_new_tokens_limit
        if max_new_tokens > limit:
            raise APIError(
                400,
                f"{tokens_field}={max_new_tokens} exceeds this server's limit of "
                f"{limit} (--max-new-tokens-limit): ask for at most {limit}",
                param=tokens_field,
            )
        if not prompt_ids:
            raise APIError(
                400,
                f"{prompt_field}: the prompt has no tokens; send a non-empty prompt",
                param=prompt_field,
            )
        vocab = int(self.target.get_input_embeddings().num_embeddings)
        if (top := max(prompt_ids)) >= vocab:
            raise APIError(
                400,
                f"{prompt_field}: token id {top} is outside the vocabulary "
                f"(0..{vocab - 1}); send ids of this model's tokenizer",
                param=prompt_field,
            )
        context = int(getattr(self.target.config, "max_position_embeddings", 0) or 0)
        if context and len(prompt_ids) + max_new_tokens > context:
            raise APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens and {tokens_field}="
                f"{max_new_tokens}: together they exceed the model's context of "
                f"{context}; shorten the prompt or lower {tokens_field}",
                param=tokens_field,
            )

    def submit(self, job: Job) -> Job:
        try:
            return self.require_ready().submit(job)
        except QueueFull as error:
            raise APIError(
                503,
                f"the server is busy: {error}; retry shortly",
                kind="overloaded",
                headers={"Retry-After": "1"},
            ) from None

    async def run(self, job: Job) -> Completion:
        """Submit and await one job; maps its failures to API errors."""
        future = asyncio.wrap_future(self.submit(job).future)
        try:
            return await future
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except (RequestError, InternalError, Cancelled) as error:
            raise as_api_error(error) from None

    def stream(
        self,
        job: Job,
        chunk: Callable[[str], dict[str, Any]],
        final: Callable[[Completion], list[dict[str, Any]]],
    ) -> StreamingResponse:
        """Server-sent events: a chunk per text delta (at least one per verify step that
        produced text), the final chunk(s), then ``data: [DONE]``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(delta: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, delta)

        job.on_text = on_text
        self.submit(job)  # a full queue answers 503 before the stream starts
        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))

        async def body() -> AsyncIterator[str]:
            try:
                while (delta := await events.get()) is not None:
                    yield sse(chunk(delta))
                try:
                    completion = job.future.result()
                except (RequestError, InternalError, Cancelled) as error:
                    yield sse(as_api_error(error).body())
                else:
                    for item in final(completion):
                        yield sse(item)
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client left (or we are done): stop decoding

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def as_api_error(error: Exception) -> APIError:
    if isinstance(error, RequestError):
        return APIError(400, str(error), param=error.field)
    if isinstance(error, Cancelled):
        return APIError(499, str(error), kind="cancelled")
    return APIError(500, str(error), kind="internal_error")


def eos_ids(target: Any, tokenizer: Any) -> list[int]:
    ids = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(target, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return sorted(ids)
