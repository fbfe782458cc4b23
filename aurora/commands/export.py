"""`aurora export --to sglang REVISION_DIR OUT_DIR`: a draft revision in another
engine's format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a draft revision in another engine's format (SGLang EAGLE-3)",
        description="Verify an Aurora checkpoint directory and write it as an SGLang "
        "EAGLE-3 draft (config.json with LlamaForCausalLMEagle3, model.safetensors with "
        "fc, midlayer.*, norm, lm_head, d2t and t2d), then validate what was written. "
        "Serve it with --speculative-draft-model-path OUT_DIR.",
    )
    parser.add_argument("--to", required=True, choices=["sglang"], help="target format")
    parser.add_argument("revision_dir", metavar="REVISION_DIR", help="Aurora checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weight dtype written (default: bfloat16)",
    )
    parser.add_argument(
        "--max-position-embeddings",
        type=int,
        default=131072,
        help="config.json max_position_embeddings (default: 131072)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from aurora.errors import UsageError
    from aurora.runtime.checkpoint import CheckpointError
    from aurora.runtime.sglang.export import ExportError, export_revision

    if args.max_position_embeddings < 1:
        raise UsageError(
            f"--max-position-embeddings {args.max_position_embeddings}: use a positive length"
        )
    try:
        draft = export_revision(
            args.revision_dir,
            args.out_dir,
            dtype=args.dtype,
            max_position_embeddings=args.max_position_embeddings,
            overwrite=args.overwrite,
        )
    except (ExportError, CheckpointError) as error:
        raise UsageError(f"cannot export {args.revision_dir}: {error}") from None
    print(
        f"exported revision {draft.revision} to {args.out_dir} "
        f"({len(draft.tensors)} tensors, {args.dtype}); serve it with "
        f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {args.out_dir}"
    )
    return 0
