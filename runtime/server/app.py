"""The inference server (torch engine): FastAPI routes over one engine worker.

Endpoints: OpenAI ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``;
SGLang ``/generate``; ``/health`` (process alive), ``/ready`` (model loaded, worker
running), ``/metrics`` (Prometheus), ``/server_info``; the schema at ``/openapi.json``.

``create_app(config)`` loads the target in the background (``/ready`` says when);
``create_app(config, target, tokenizer)`` serves an already loaded model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from aurora import __version__
from aurora.runtime.checkpoint import load_checkpoint
from aurora.runtime.cost import VerifyCost
from aurora.runtime.draft import DraftConfig, EagleDraftHead, load_draft_head
from aurora.runtime.models import load_target
from aurora.runtime.protocol import hybrid_head
from aurora.runtime.server.api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    check_domain,
    describe_validation,
    stop_list,
)
from aurora.runtime.server.config import ServerConfig, connect_redis
from aurora.runtime.server.metrics import ServerMetrics
from aurora.runtime.server.revisions import (
    SCRATCH,
    Revision,
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

log = logging.getLogger(__name__)

DOMAIN_HEADER = "X-Aurora-Domain"
TOKEN_LIMITED_FIELDS = (
    ("CompletionRequest", "max_tokens"),
    ("ChatCompletionRequest", "max_tokens"),
    ("ChatCompletionRequest", "max_completion_tokens"),
    ("SamplingParams", "max_new_tokens"),
)


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
        self.speculation = Speculation(
            SuffixCache(int(config.suffix_cache_mb * 2**20)), VerifyCost(), config.adaptive
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
        if draft == SCRATCH:
            config = DraftConfig.for_target(self.target.config, self.config.model)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                head = EagleDraftHead(config, self.target.get_input_embeddings())
            head = head.to(device=self.device, dtype=self.target.dtype).eval().requires_grad_(False)
            return self.speculation.head(head, SCRATCH)
        return self.load_checkpoint_revision(Path(draft))

    def load_checkpoint_revision(self, path: Path) -> Revision:
        """Load and verify a checkpoint (sha256, shapes, dtypes, NaN/Inf, fit to this
        target) and build its draft head; raises naming what is wrong."""
        target_config = self.target.config
        tensors, meta = load_checkpoint(
            path,
            expect_config={
                "hidden_size": int(target_config.hidden_size),
                "target_vocab_size": int(target_config.vocab_size),
            },
        )
        config = DraftConfig.from_dict(meta.draft_config)
        layers = int(target_config.num_hidden_layers)
        if not all(0 <= i < layers for i in config.fuse_layers):
            raise ValueError(
                f"draft fuse_layers {config.fuse_layers} do not exist in the target's {layers} layers"
            )
        d2t = tensors.get("d2t")
        vocab = int(target_config.vocab_size)
        if d2t is not None and d2t.numel() and (int(d2t.min()) < 0 or int(d2t.max()) >= vocab):
            # Would pass every other check and then fail inside a verify step.
            raise ValueError(
                f"the draft vocabulary map d2t holds ids outside the target's vocabulary (0..{vocab - 1})"
            )
        head = load_draft_head(tensors, config, self.target.get_input_embeddings(), self.device)
        head = head.to(dtype=self.target.dtype)
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
            speculation=self.speculation,
        )
        self.worker.start()
        if self.redis is not None:
            loader = RevisionLoader(
                self.build_revision,
                self.load_checkpoint_revision,
                config.checkpoint_dir,
                self.speculation.hybrid,
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
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
                return list(self.tokenizer(text, add_special_tokens=False).input_ids)
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


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def aurora_headers(completion: Completion) -> dict[str, str]:
    return {"X-Aurora-Arm": completion.arm, "X-Aurora-Revision": completion.revision}


def create_app(config: ServerConfig, target: Any = None, tokenizer: Any = None) -> FastAPI:
    """The server as an ASGI app. With ``target`` and ``tokenizer`` it serves them
    (and raises here if ``config.draft`` cannot be built); without, it loads
    ``config.model`` in the background after startup. Threads start in the app's
    lifespan and stop with it."""
    if (target is None) != (tokenizer is None):
        raise ValueError("pass both target and tokenizer, or neither")
    runtime = ServerRuntime(config, target, tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runtime.stop)

    app = FastAPI(
        title="Aurora inference server",
        version=__version__,
        lifespan=lifespan,
        description="Speculative decoding (torch engine) with a draft that keeps learning. "
        "OpenAI-compatible /v1 endpoints and SGLang-compatible /generate.",
    )
    app.state.runtime = runtime
    model_name = config.model
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # The token limit is this server's option, so the schema states it here.
        schema = default_openapi()
        models = schema.get("components", {}).get("schemas", {})
        for model, field in TOKEN_LIMITED_FIELDS:
            if field in models.get(model, {}).get("properties", {}):
                target = models[model]["properties"][field]
                for option in target.get("anyOf", [target]):
                    if option.get("type") == "integer":
                        option["maximum"] = config.max_new_tokens_limit
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # The framework's own refusals (a body that is not JSON, an unknown path or
        # method) answer in the same OpenAI error shape as every other error.
        hints = {
            400: "the request body is not valid JSON: send a UTF-8 encoded JSON object",
            404: f"{request.url.path} is not an endpoint of this server: see /openapi.json",
            405: f"{request.method} is not allowed on {request.url.path}: see /openapi.json",
        }
        message = hints.get(error.status_code, str(error.detail))
        headers = dict(error.headers or {})
        return await _api_error(request, APIError(error.status_code, message, headers=headers))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return await _api_error(request, describe_validation(list(error.errors())))

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "%s %s failed with %s (error id %s):\n%s",
            request.method,
            request.url.path,
            type(error).__name__,
            error_id,
            "".join(traceback.format_tb(error.__traceback__)),
        )
        return await _api_error(
            request,
            APIError(
                500, f"internal error {error_id} ({type(error).__name__})", kind="internal_error"
            ),
        )

    def domain_of(request: Request, body_domain: str | None = None) -> str:
        if body_domain:
            return check_domain(body_domain, "domain")
        return check_domain(request.headers.get(DOMAIN_HEADER), DOMAIN_HEADER)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        runtime.require_ready()
        prompt_ids = body.prompt if isinstance(body.prompt, list) else runtime.encode(body.prompt)
        runtime.check_prompt(
            prompt_ids, body.max_tokens, prompt_field="prompt", tokens_field="max_tokens"
        )
        job = Job(
            prompt_ids,
            body.max_tokens,
            body.temperature,
            stop_list(body.stop),
            body.seed,
            domain_of(request),
        )
        created, cid = int(time.time()), f"cmpl-{job.id}"

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        def envelope(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": choices,
                **extra,
            }

        if body.stream:
            return runtime.stream(
                job,
                lambda delta: envelope([choice(delta, None)]),
                lambda c: [envelope([choice("", c.finish_reason)], usage=usage(c))],
            )
        c = await runtime.run(job)
        return JSONResponse(
            envelope([choice(c.text, c.finish_reason)], usage=usage(c)), headers=aurora_headers(c)
        )

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        runtime.require_ready()
        prompt_ids = runtime.chat_prompt(body)
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        runtime.check_prompt(
            prompt_ids, body.max_new_tokens, prompt_field="messages", tokens_field=field
        )
        job = Job(
            prompt_ids,
            body.max_new_tokens,
            body.temperature,
            stop_list(body.stop),
            body.seed,
            domain_of(request),
        )
        created, cid = int(time.time()), f"chatcmpl-{job.id}"

        def envelope(choices: list[dict[str, Any]], obj: str, **extra: Any) -> dict[str, Any]:
            return {
                "id": cid,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": choices,
                **extra,
            }

        if body.stream:
            first = True

            def chunk(delta: str) -> dict[str, Any]:
                nonlocal first
                message = {"role": "assistant", "content": delta} if first else {"content": delta}
                first = False
                return envelope(
                    [{"index": 0, "delta": message, "finish_reason": None}], "chat.completion.chunk"
                )

            return runtime.stream(
                job,
                chunk,
                lambda c: [
                    envelope(
                        [{"index": 0, "delta": {}, "finish_reason": c.finish_reason}],
                        "chat.completion.chunk",
                        usage=usage(c),
                    )
                ],
            )
        c = await runtime.run(job)
        return JSONResponse(
            envelope(
                [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason,
                        "logprobs": None,
                    }
                ],
                "chat.completion",
                usage=usage(c),
            ),
            headers=aurora_headers(c),
        )

    @app.post("/generate", tags=["sglang"])
    async def generate(body: GenerateRequest, request: Request) -> Response:
        runtime.require_ready()
        params = body.sampling_params
        prompt_field = "input_ids" if body.input_ids is not None else "text"
        prompt_ids = (
            body.input_ids if body.input_ids is not None else runtime.encode(body.text or "")
        )
        runtime.check_prompt(
            prompt_ids,
            params.max_new_tokens,
            prompt_field=prompt_field,
            tokens_field="sampling_params.max_new_tokens",
        )
        job = Job(
            prompt_ids,
            params.max_new_tokens,
            params.temperature,
            stop_list(params.stop),
            params.sampling_seed,
            domain_of(request, body.domain),
            arm=body.arm,
            revision=body.revision,
        )
        c = await runtime.run(job)
        finish: dict[str, Any] = {"type": c.finish_reason}
        if c.finish_reason == "length":
            finish["length"] = c.completion_tokens
        return JSONResponse(
            {
                "text": c.text,
                "output_ids": c.output_ids,
                "meta_info": {
                    "id": body.rid or job.id,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "finish_reason": finish,
                    "spec_verify_ct": c.verify_steps,
                    "spec_accept_length": c.accept_length,
                    "draft_revision": c.revision,
                    "arm": c.arm,
                    "decode_tokens_per_s": c.decode_tokens_per_s,
                    "e2e_latency": c.e2e_latency,
                },
            },
            headers=aurora_headers(c),
        )

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "aurora"}],
        }

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready() -> JSONResponse:
        if runtime.ready:
            return JSONResponse({"status": "ready"})
        state = "failed" if runtime.load_error else "loading"
        return JSONResponse({"status": state, "error": runtime.load_error}, status_code=503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/server_info", tags=["ops"])
    async def server_info() -> dict[str, Any]:
        served = runtime.revisions.snapshot() if runtime.revisions else None
        watcher = runtime.watcher
        return {
            "server_id": config.server_id,
            "version": __version__,
            "model": model_name,
            "engine": "torch",
            "device": config.device,
            "dtype": config.dtype,
            "torch_threads": torch.get_num_threads(),
            "spec_tokens": config.spec_tokens,
            # Requests decoded together at most: 1 with --max-batch 1 or a model the
            # batched forward does not support (then each request decodes alone).
            "max_batch": runtime.worker.max_batch if runtime.worker else config.max_batch,
            "speculator": config.speculator,
            "ready": runtime.ready,
            "revisions": served.roles() if served else {},
            "shares": {"candidate": served.candidate_share, "baseline": served.baseline_share}
            if served
            else {},
            "last_swap_pause_ms": watcher.last_pause_ms if watcher else None,
            "revision_errors": sorted(watcher.failed.values()) if watcher else [],
            "redis": {
                "configured": runtime.redis is not None,
                "publishing": bool(runtime.publisher and runtime.publisher.connected),
            },
            "max_new_tokens_limit": config.max_new_tokens_limit,
            "max_queue": config.max_queue,
            "queue_depth": runtime.worker.depth() if runtime.worker else 0,
            "trace_sample_rate": config.trace_sample_rate,
            "batching": bool(runtime.worker and runtime.worker.max_batch > 1),
        }

    return app
