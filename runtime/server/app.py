"""The inference server (torch engine) as an ASGI app: the routes (`routes`) over one
server runtime (`runtime.ServerRuntime`).

Endpoints: OpenAI ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``;
SGLang ``/generate``; ``/health`` (process alive), ``/ready`` (model loaded, worker
running), ``/metrics`` (Prometheus), ``/server_info``; the schema at ``/openapi.json``.

``create_app(config)`` loads the target in the background (``/ready`` says when);
``create_app(config, target, tokenizer)`` serves an already loaded model.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aurora import __version__
from aurora.runtime.server.api import APIError, describe_validation
from aurora.runtime.server.config import ServerConfig
from aurora.runtime.server.routes import router
from aurora.runtime.server.runtime import ServerRuntime

log = logging.getLogger(__name__)

TOKEN_LIMITED_FIELDS = (
    ("CompletionRequest", "max_tokens"),
    ("ChatCompletionRequest", "max_tokens"),
    ("ChatCompletionRequest", "max_completion_tokens"),
    ("SamplingParams", "max_new_tokens"),
)


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
    app.include_router(router)
    _state_the_token_limit(app, config.max_new_tokens_limit)
    _answer_errors_as_openai(app)
    return app


def _state_the_token_limit(app: FastAPI, limit: int) -> None:
    """The token limit is this server's option, so its schema states it."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = default_openapi()
        models = schema.get("components", {}).get("schemas", {})
        for model, field in TOKEN_LIMITED_FIELDS:
            if field in models.get(model, {}).get("properties", {}):
                target = models[model]["properties"][field]
                for option in target.get("anyOf", [target]):
                    if option.get("type") == "integer":
                        option["maximum"] = limit
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _answer_errors_as_openai(app: FastAPI) -> None:
    """Every error, ours or the framework's, answers in the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # The framework's own refusals: a body that is not JSON, an unknown path or method.
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
