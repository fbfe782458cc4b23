"""A CPU stand-in for an SGLang server running Aurora's plugin, so the CPU half of
scripts/gpu-smoke.sh (staging, export, variants, every check) runs in the test suite.

What is real: SGLang's HookRegistry and MultiprocessingSerializer (from the installed
SGLang wheel, loaded by file path: importing sglang needs CUDA), Aurora's plugin
(register, hooks, capture, watcher, pusher, draft-only loader), Redis, HTTP. What is
stubbed: the models. The target continues token t with a fixed hash of the last two
tokens; the draft proposes the target's own continuation while its weights stay close
to the draft it started with, and wrong tokens otherwise, so a random-weight draft
collapses the accept length as a real one would. Verification is greedy, through the
hooked function at the release's path, like SGLang's.

    python tests/sglang_stub.py --port 30000 --draft DIR --log server.log
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sglang_ranks import serializer

N = 4  # tokens verified per step: the last token and 3 drafts (a chain)


class LlamaForCausalLMEagle3:
    """The draft model: SGLang's class name, its load_weights naming, hot_token_id."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.params: dict[str, torch.Tensor] = {}
        d2t = tensors["d2t"]
        self.hot_token_id = d2t + torch.arange(d2t.numel())
        self.load_weights([(n, t) for n, t in tensors.items() if n not in ("d2t", "t2d")])
        self.initial = self.params["model.fc.weight"].clone()

    def load_weights(self, weights: Any) -> None:
        for name, tensor in weights:
            key = (
                name
                if name == "lm_head.weight"
                else "model." + name.replace("midlayer", "layers.0")
            )
            self.params[key] = tensor.detach().float().cpu()

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any:
        return self.params[name][:truncate_size].tolist() if name in self.params else None

    def good(self) -> bool:
        """Still close to the draft it started with (a further-trained revision is)."""
        fc = self.params["model.fc.weight"].flatten()
        return float(torch.nn.functional.cosine_similarity(fc, self.initial.flatten(), dim=0)) > 0.9


class Req:
    """The fields of SGLang's Req the plugin reads."""

    def __init__(self, prompt: list[int], temperature: float) -> None:
        self.rid, self.origin_input_ids, self.output_ids = uuid.uuid4().hex, prompt, []
        self.sampling_params = SimpleNamespace(
            temperature=temperature, top_k=1 if not temperature else -1
        )
        self.spec_verify_ct, self.retraction_count, self.done = 0, 0, False
        self.time_stats = SimpleNamespace(wait_queue_entry_time=time.perf_counter())

    def finished(self) -> bool:
        return self.done


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = sys.modules.get(name) or types.ModuleType(name)
    module.__path__ = []  # type: ignore[attr-defined]
    for key, value in attributes.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


class Stub:
    """The server: one scheduler lock (SGLang's scheduler is one thread), pause and
    weight-update sessions as the release has them."""

    def __init__(self, version: str, draft_dir: Path, sglang_root: Path) -> None:
        from aurora.runtime.sglang.export import load_export

        self.version, self.lock, self.unpaused = version, threading.Lock(), threading.Event()
        self.unpaused.set()
        exported = load_export(draft_dir)
        self.vocab = int(exported.config["vocab_size"])
        self.draft = LlamaForCausalLMEagle3(exported.tensors)
        self.target_norm = torch.linspace(-1, 1, 64)
        self.session: str | None = None
        self.serializer = serializer(sglang_root / "srt/utils/common.py")
        self.weight_version = exported.revision or "default"
        self._install_modules()

    # -- SGLang's modules at the hooked paths ------------------------------------------

    def _install_modules(self) -> None:
        stub = self

        class GetWeightsByNameReqOutput:
            def __init__(self, *, parameter: Any) -> None:
                self.parameter = parameter

        def sample(verify_input: Any, batch: Any, logits_output: Any, *args: Any, **kw: Any) -> Any:
            """Greedy chain verification (SGLang's verify_tree_greedy for top-k 1)."""
            candidates = verify_input.draft_token.reshape(-1, N)
            target = logits_output.next_token_logits.argmax(-1).reshape(-1, N)
            accept_index = torch.full((candidates.shape[0], N), -1, dtype=torch.int32)
            for i, req in enumerate(batch.reqs):
                node, path = 0, [0]
                while node + 1 < N and int(candidates[i, node + 1]) == int(target[i, node]):
                    node += 1
                    path.append(node)
                accept_index[i, : len(path)] = torch.tensor(path, dtype=torch.int32) + i * N
                req.output_ids += [int(target[i, n]) for n in path]
            return torch.zeros(1), (accept_index >= 0).sum(-1), accept_index

        for package in ("sglang", "sglang.srt", "sglang.srt.plugins", "sglang.srt.speculative",
                        "sglang.srt.managers", "sglang.srt.managers.scheduler_components",
                        "sglang.srt.entrypoints", "sglang.srt.distributed"):  # fmt: skip
            _module(package)
        _module("sglang.srt.utils", MultiprocessingSerializer=self.serializer)
        _module(
            "sglang.srt.managers.io_struct", GetWeightsByNameReqOutput=GetWeightsByNameReqOutput
        )
        _module("sglang.srt.distributed.parallel_state",
                get_attn_tensor_model_parallel_rank=lambda: 0,
                get_attn_context_model_parallel_rank=lambda: 0)  # fmt: skip
        sys.modules["sglang.srt.distributed"].parallel_state = sys.modules[  # type: ignore[attr-defined]
            "sglang.srt.distributed.parallel_state"
        ]
        _module("sglang.srt.entrypoints.http_server",
                _setup_and_run_http_server=lambda server_args, *a: self.serve(server_args))  # fmt: skip

        class Weights:  # the scheduler's weight reader
            draft_worker = SimpleNamespace(
                draft_worker=SimpleNamespace(
                    draft_runner=SimpleNamespace(
                        model=stub.draft,
                        weight_exporter=stub.draft,
                        get_weights_by_name=stub.draft.get_weights_by_name,
                    )
                )
            )

            def get_weights_by_name(self, recv_req: Any) -> Any:
                rows = recv_req.truncate_size
                parameter = (
                    stub.target_norm[:rows].tolist()
                    if recv_req.name == "model.norm.weight"
                    else None
                )
                return GetWeightsByNameReqOutput(parameter=parameter)

        class Streamer:
            def stream(self, reqs: list[Any], return_logprob: bool, skip_req: Any = None,
                       is_idle_batch: bool = False) -> None:  # fmt: skip
                return None

        if self.version == "0.5.23":
            Streamer._stream_output_generation = Streamer.stream  # type: ignore[attr-defined]
            Weights.__name__ = "SchedulerWeightUpdaterManager"
            _module("sglang.srt.speculative.eagle_utils", eagle_sample=sample)
            _module("sglang.srt.managers.scheduler_components.output_streamer",
                    SchedulerOutputStreamer=Streamer)  # fmt: skip
            _module("sglang.srt.managers.scheduler_components.weight_updater",
                    SchedulerWeightUpdaterManager=Weights)  # fmt: skip
            self.verify = lambda spec, batch, out: sys.modules[
                "sglang.srt.speculative.eagle_utils"
            ].eagle_sample(spec, batch, out, None)
            self.stream = lambda reqs: Streamer()._stream_output_generation(reqs, False)  # type: ignore[attr-defined]
        else:

            class Mixin:
                def sample(self, batch: Any, logits_output: Any, vocab_mask: Any = None) -> Any:
                    return sample(self, batch, logits_output)

            class EagleVerifyInput(Mixin):
                def verify(self, *args: Any) -> Any:
                    raise AssertionError("the stub runs the V2 path")

            Streamer.stream_output_generation = Streamer.stream  # type: ignore[attr-defined]
            _module("sglang.srt.speculative.eagle_info_v2", EagleVerifyInputV2Mixin=Mixin)
            _module("sglang.srt.speculative.eagle_info", EagleVerifyInput=EagleVerifyInput)
            _module("sglang.srt.managers.scheduler_output_processor_mixin",
                    SchedulerOutputProcessorMixin=Streamer)  # fmt: skip
            _module("sglang.srt.managers.scheduler_update_weights_mixin",
                    SchedulerUpdateWeightsMixin=Weights)  # fmt: skip

            def verify(spec: Any, batch: Any, out: Any) -> Any:
                verify_input = EagleVerifyInput()
                verify_input.__dict__.update(vars(spec))
                return verify_input.sample(batch, out)

            self.verify = verify
            self.stream = lambda reqs: Streamer().stream_output_generation(reqs, False)  # type: ignore[attr-defined]
        self.weights = Weights()

    # -- the models --------------------------------------------------------------------

    def next_token(self, context: list[int]) -> int:
        a, b = (context[-2] if len(context) > 1 else 0), context[-1]
        return (a * 131 + b * 7 + 3) % self.vocab

    def generate(self, text: str, max_new_tokens: int, temperature: float) -> dict[str, Any]:
        started = time.perf_counter()
        req = Req([ord(c) % self.vocab for c in text] or [1], temperature)
        with self.lock:
            req.output_ids.append(self.next_token(req.origin_input_ids))  # prefill
            self.stream([req])
        while len(req.output_ids) < max_new_tokens:
            self.unpaused.wait()
            with self.lock:
                context = [*req.origin_input_ids, *req.output_ids]
                good, proposals = self.draft.good(), []
                for _ in range(N - 1):
                    token = self.next_token(context + proposals)
                    proposals.append(token if good else (token + 1) % self.vocab)
                logits = torch.zeros(N, self.vocab)
                for node in range(N):
                    logits[node, self.next_token(context + proposals[:node])] = 10.0
                spec = SimpleNamespace(
                    draft_token=torch.tensor([req.output_ids[-1], *proposals]),
                    retrieve_next_token=torch.tensor([[1, 2, 3, -1]]), draft_token_num=N,
                )  # fmt: skip
                batch = SimpleNamespace(
                    forward_mode=SimpleNamespace(is_idle=lambda: False), reqs=[req]
                )
                self.verify(spec, batch, SimpleNamespace(next_token_logits=logits))
                req.spec_verify_ct += 1
                self.stream([req])
        with self.lock:
            del req.output_ids[max_new_tokens:]
            req.done = True
            self.stream([req])
        drafts = len(req.output_ids) - 1 - req.spec_verify_ct
        meta = {"prompt_tokens": len(req.origin_input_ids), "completion_tokens": len(req.output_ids),
                "spec_verify_ct": req.spec_verify_ct, "spec_num_correct_drafts": max(drafts, 0),
                "e2e_latency": time.perf_counter() - started, "weight_version": self.weight_version}  # fmt: skip
        return {"text": "", "output_ids": list(req.output_ids), "meta_info": meta}

    # -- HTTP ----------------------------------------------------------------------------

    def update(self, body: dict[str, Any]) -> tuple[bool, str]:
        from aurora.runtime.sglang.weights import load_draft_only

        if self.version != "0.5.12" and self.session is None:
            return False, ("update_weights_from_tensor must run between begin_weight_update() "
                           "and end_weight_update()")  # fmt: skip
        if body["load_format"] != "aurora.runtime.sglang.weights.load_draft_only":
            return False, f"Unknown load_format={body['load_format']}"
        named = self.serializer.deserialize(body["serialized_named_tensors"][0])  # rank 0
        with self.lock:
            load_draft_only(self.draft, named)
            if body.get("weight_version"):
                self.weight_version = body["weight_version"]
        return True, "Success"

    def serve(self, server_args: Any) -> None:
        app = FastAPI()

        def answer(ok: bool, message: str) -> JSONResponse:
            return JSONResponse({"success": ok, "message": message}, status_code=200 if ok else 400)

        @app.get("/health")
        def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.post("/generate")
        async def generate(request: Request) -> Any:
            body = await request.json()
            params = body.get("sampling_params", {})
            import anyio

            return await anyio.to_thread.run_sync(
                self.generate, body["text"], int(params.get("max_new_tokens", 32)),
                float(params.get("temperature", 0.0)),
            )  # fmt: skip

        @app.post("/pause_generation")
        async def pause(request: Request) -> Any:
            self.unpaused.clear()
            with self.lock:  # the step in flight finishes first
                pass
            return {"status": "ok"}

        @app.post("/continue_generation")
        def resume() -> Any:
            self.unpaused.set()
            return {"status": "ok"}

        @app.post("/begin_weight_update")
        async def begin(request: Request) -> Any:
            if self.session is not None:
                return answer(False, "a weight-update session is already open")
            self.session = (await request.json()).get("selector", "all")
            return answer(True, "Success")

        @app.post("/end_weight_update")
        def end() -> Any:
            if self.session is None:
                return answer(False, "no weight-update session is open")
            self.session = None
            return answer(True, "Success")

        @app.post("/update_weights_from_tensor")
        async def update(request: Request) -> Any:
            return answer(*self.update(await request.json()))

        @app.post("/get_weights_by_name")
        async def weights(request: Request) -> Any:
            body = await request.json()
            with self.lock:
                out = self.weights.get_weights_by_name(SimpleNamespace(**body))
            return JSONResponse(out.parameter)

        uvicorn.run(app, host=server_args.host, port=server_args.port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--draft", type=Path, required=True, help="SGLang EAGLE-3 draft dir")
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(
        filename=args.log, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    # SGLang's own wheel, installed but never imported (it needs CUDA)
    distribution = importlib.metadata.distribution("sglang")
    root = Path(str(distribution.locate_file("sglang")))
    Stub(distribution.version, args.draft, root)  # installs SGLang's modules at the hooked paths
    spec = importlib.util.spec_from_file_location(
        "sglang.srt.plugins.hook_registry", root / "srt/plugins/hook_registry.py"
    )
    assert spec is not None and spec.loader is not None
    registry = importlib.util.module_from_spec(spec)
    sys.modules["sglang.srt.plugins.hook_registry"] = registry
    spec.loader.exec_module(registry)
    from aurora.runtime.sglang import plugin

    plugin.register()  # what load_plugins does in every SGLang process
    registry.HookRegistry.apply_hooks()
    server_args = SimpleNamespace(
        host="127.0.0.1", port=args.port, tp_size=1, dp_size=1,
        speculative_algorithm="EAGLE3", speculative_draft_model_path=str(args.draft),
    )  # fmt: skip
    sys.modules["sglang.srt.entrypoints.http_server"]._setup_and_run_http_server(
        server_args, None, None, None, [{}], None
    )


if __name__ == "__main__":
    main()
