"""`aurora serve`: the inference server (torch engine) with hot-swappable draft revisions."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model with speculative decoding over HTTP",
        description="Serve a causal LM with speculative decoding: OpenAI-compatible "
        "/v1/completions and /v1/chat/completions, SGLang-compatible /generate, /health, "
        "/ready, /metrics, /server_info. With Redis it publishes traces and per-request "
        "stats and hot-swaps the draft revisions named in the desired state.",
    )
    from aurora.runtime.options import add_options
    from aurora.runtime.server.config import ServerConfig

    add_options(parser, ServerConfig)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from aurora.errors import UsageError
    from aurora.runtime.checkpoint import CheckpointError
    from aurora.runtime.models import load_target, resolve_model
    from aurora.runtime.options import from_args
    from aurora.runtime.server.app import create_app
    from aurora.runtime.server.config import ServerConfig

    config = from_args(ServerConfig, args)
    resolve_model(config.model)  # a wrong --model fails here, with the fix
    log.info("loading %s on %s (%s)", config.model, config.device, config.dtype)
    target, tokenizer = load_target(config.model, device=config.device, dtype=config.dtype)
    try:
        app = create_app(config, target, tokenizer)
    except (CheckpointError, ValueError, RuntimeError) as error:
        raise UsageError(f"--draft={config.draft!r} cannot be served: {error}") from None
    uvicorn.run(
        app, host=config.host, port=config.port, log_level=logging.getLogger().getEffectiveLevel()
    )
    return 0
