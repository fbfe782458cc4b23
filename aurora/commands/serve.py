"""`aurora serve`: the inference server (torch engine) with hot-swappable draft revisions."""

from __future__ import annotations

import argparse
import logging
import os

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
    add = parser.add_argument
    add(
        "--model",
        default="smollm2-135m",
        help="model alias, local directory or Hugging Face id (default: smollm2-135m)",
    )
    add("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    add("--port", type=int, default=8000, help="TCP port (default: 8000)")
    add(
        "--draft",
        default="ngram",
        help="initial draft: scratch (untrained EAGLE head), ngram (prompt lookup), none "
        "(no speculation), or a checkpoint directory (default: ngram)",
    )
    add(
        "--spec-tokens",
        type=int,
        default=4,
        metavar="K",
        help="draft tokens per verify step (default: 4; 0 disables speculation)",
    )
    add(
        "--speculator",
        default="default/local",
        metavar="NAMESPACE/NAME",
        help="the Speculator whose Redis keys this server uses (default: default/local)",
    )
    add(
        "--redis-url",
        default=os.environ.get("AURORA_REDIS_URL"),
        help="Redis for traces, stats and the desired revisions (default: $AURORA_REDIS_URL; "
        "password from $AURORA_REDIS_PASSWORD when the URL has none). Without it the server "
        "runs with no traces, stats or hot swaps",
    )
    add(
        "--checkpoint-dir",
        default=None,
        help="where revision directories live (desired revisions whose path does not exist here "
        "are looked up as CHECKPOINT_DIR/REVISION)",
    )
    add(
        "--candidate-share",
        type=float,
        default=0.0,
        help="fraction of requests for the candidate revision until Redis says otherwise (default: 0)",
    )
    add(
        "--baseline-share",
        type=float,
        default=0.05,
        help="fraction of requests served without speculation, the live baseline, until Redis "
        "says otherwise (default: 0.05)",
    )
    add(
        "--trace-sample-rate",
        type=float,
        default=1.0,
        help="fraction of finished requests traced to Redis (default: 1.0)",
    )
    add(
        "--trace-maxlen",
        type=int,
        default=10000,
        help="approximate bound on the trace stream's length (default: 10000)",
    )
    add(
        "--server-id", default=None, help="name in stats and loaded reports (default: HOSTNAME-PID)"
    )
    add("--device", default="cpu", help="torch device (default: cpu)")
    add("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    add(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's default, one per physical core; on a shared "
        "machine fewer threads can be much faster)",
    )
    add(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting beyond this answer 503 with Retry-After (default: 64)",
    )
    add(
        "--max-batch",
        type=int,
        default=4,
        metavar="N",
        help="requests decoded together, continuous batching: they join and leave between "
        "verify steps and one target forward verifies all their drafts (default: 4; 1 = one "
        "request at a time; models other than Llama-family always decode one at a time)",
    )
    add(
        "--max-new-tokens-limit",
        type=int,
        default=2048,
        help="largest max_tokens a request may ask for (default: 2048)",
    )
    add(
        "--seed",
        type=int,
        default=0,
        help="seed for routing, trace sampling and sampling (default: 0)",
    )
    add(
        "--poll-interval",
        type=float,
        default=0.5,
        help="seconds between reads of the desired revisions in Redis (default: 0.5)",
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from aurora.errors import UsageError
    from aurora.runtime.checkpoint import CheckpointError
    from aurora.runtime.models import load_target, resolve_model
    from aurora.runtime.server.app import create_app
    from aurora.runtime.server.config import ServerConfig, default_server_id

    config = ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        draft=args.draft,
        spec_tokens=args.spec_tokens,
        speculator=args.speculator,
        redis_url=args.redis_url,
        checkpoint_dir=args.checkpoint_dir,
        candidate_share=args.candidate_share,
        baseline_share=args.baseline_share,
        trace_sample_rate=args.trace_sample_rate,
        trace_maxlen=args.trace_maxlen,
        server_id=args.server_id or default_server_id(),
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_new_tokens_limit=args.max_new_tokens_limit,
        seed=args.seed,
        poll_interval=args.poll_interval,
    )
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
