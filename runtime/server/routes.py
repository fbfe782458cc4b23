"""The HTTP routes: thin functions that read the request, call the server runtime
(`ServerRuntime`, the one object they reach, from `app.state.runtime`) and shape the answer
in the OpenAI or SGLang form."""

from __future__ import annotations

import time
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from aurora import __version__
from aurora.runtime.server.api import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    check_domain,
    stop_list,
)
from aurora.runtime.server.runtime import ServerRuntime
from aurora.runtime.server.worker import Completion, Job

DOMAIN_HEADER = "X-Aurora-Domain"

router = APIRouter()


def get_runtime(request: Request) -> ServerRuntime:
    runtime: ServerRuntime = request.app.state.runtime
    return runtime


Runtime = Annotated[ServerRuntime, Depends(get_runtime)]


def domain_of(request: Request, body_domain: str | None = None) -> str:
    if body_domain:
        return check_domain(body_domain, "domain")
    return check_domain(request.headers.get(DOMAIN_HEADER), DOMAIN_HEADER)


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def aurora_headers(completion: Completion) -> dict[str, str]:
    return {"X-Aurora-Arm": completion.arm, "X-Aurora-Revision": completion.revision}


def envelope(
    cid: str, obj: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """An OpenAI response object (or stream chunk) around `choices`."""
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }


@router.post("/v1/completions", tags=["openai"])
async def completions(body: CompletionRequest, request: Request, runtime: Runtime) -> Response:
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
    created, cid, model = int(time.time()), f"cmpl-{job.id}", runtime.config.model

    def answer(text: str, finish: str | None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return envelope(cid, "text_completion", created, model, [choice], **extra)

    if body.stream:
        return runtime.stream(
            job,
            lambda delta: answer(delta, None),
            lambda c: [answer("", c.finish_reason, usage=usage(c))],
        )
    c = await runtime.run(job)
    return JSONResponse(answer(c.text, c.finish_reason, usage=usage(c)), headers=aurora_headers(c))


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(
    body: ChatCompletionRequest, request: Request, runtime: Runtime
) -> Response:
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
    created, cid, model = int(time.time()), f"chatcmpl-{job.id}", runtime.config.model

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return envelope(cid, "chat.completion.chunk", created, model, [choice], **extra)

    if body.stream:
        first = True

        def text_chunk(delta: str) -> dict[str, Any]:
            nonlocal first
            message = {"role": "assistant", "content": delta} if first else {"content": delta}
            first = False
            return chunk(message, None)

        return runtime.stream(
            job, text_chunk, lambda c: [chunk({}, c.finish_reason, usage=usage(c))]
        )
    c = await runtime.run(job)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": c.text},
        "finish_reason": c.finish_reason,
        "logprobs": None,
    }
    return JSONResponse(
        envelope(cid, "chat.completion", created, model, [choice], usage=usage(c)),
        headers=aurora_headers(c),
    )


@router.post("/generate", tags=["sglang"])
async def generate(body: GenerateRequest, request: Request, runtime: Runtime) -> Response:
    runtime.require_ready()
    params = body.sampling_params
    prompt_field = "input_ids" if body.input_ids is not None else "text"
    prompt_ids = body.input_ids if body.input_ids is not None else runtime.encode(body.text or "")
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


@router.get("/v1/models", tags=["openai"])
async def models(runtime: Runtime) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": runtime.config.model, "object": "model", "owned_by": "aurora"}],
    }


@router.get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", tags=["ops"])
async def ready(runtime: Runtime) -> JSONResponse:
    if runtime.ready:
        return JSONResponse({"status": "ready"})
    state = "failed" if runtime.load_error else "loading"
    return JSONResponse({"status": state, "error": runtime.load_error}, status_code=503)


@router.get("/metrics", tags=["ops"])
async def metrics(runtime: Runtime) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/server_info", tags=["ops"])
async def server_info(runtime: Runtime) -> dict[str, Any]:
    config = runtime.config
    served = runtime.revisions.snapshot() if runtime.revisions else None
    watcher = runtime.watcher
    cost = runtime.speculation.cost
    return {
        "server_id": config.server_id,
        "version": __version__,
        "model": config.model,
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
        # The verify cost drafts are sized by: measured at start, and as refined since by
        # the forwards served (rows -> tokens per row -> ms).
        "verify_cost_ms": {
            "measured": cost.measured,
            "at_start": cost.milliseconds(observed=False),
            "now": cost.milliseconds(observed=True),
            "forwards_observed": cost.observed(),
        },
        "revision_errors": watcher.failed.errors() if watcher else [],
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
