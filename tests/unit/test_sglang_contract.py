"""Contract tests against the pinned SGLang release's real source (parsed with ast, never
imported: it needs CUDA). Every symbol the plugin hooks, every field it reads, every
flag the launcher passes, every endpoint the pusher calls and every weight name the
export writes must exist there, with the signatures and meaning assumed."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import tomllib
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sglang_support import CONFIG, VOCAB, save_revision, sglang_source

from aurora.runtime.sglang import SGLANG_VERSION, plugin
from aurora.runtime.sglang.export import PARAM_NAMES, export_revision
from aurora.runtime.sglang.launcher import DRAFT_LOADER, server_command
from aurora.runtime.sglang.weights import VERIFY_PROBES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source() -> Path:
    return sglang_source() / "sglang"


def parse(source: Path, dotted_module: str) -> ast.Module:
    relative = dotted_module.removeprefix("sglang.").replace(".", "/") + ".py"
    return ast.parse((source / relative).read_text())


def definition(tree: ast.Module, qualname: str) -> ast.FunctionDef | ast.ClassDef:
    node: Any = tree
    for part in qualname.split("."):
        found = [
            child
            for child in node.body
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and child.name == part
        ]
        assert found, f"{qualname}: {part!r} not found in the pinned SGLang {SGLANG_VERSION}"
        node = found[-1]
    return node


def arguments(function: ast.FunctionDef) -> list[str]:
    return [a.arg for a in function.args.posonlyargs + function.args.args]


def fields(cls: ast.ClassDef) -> set[str]:
    """Annotated class attributes (dataclass fields) and self.X assignments in methods."""
    names = {
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    for node in ast.walk(cls):
        for target in [*getattr(node, "targets", []), getattr(node, "target", None)]:
            if (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            ):
                names.add(target.attr)
    return names


def test_sglang_loads_our_entry_point_group_in_every_server_process(source: Path) -> None:
    # given our distribution registers the plugin under SGLang's general plugin group
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    group = pyproject["project"]["entry-points"]["sglang.srt.plugins"]
    assert group == {"aurora": "aurora.runtime.sglang.plugin:register"}
    installed = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert any(ep.value == group["aurora"] for ep in installed), "reinstall: pip install -e ."
    # then the pinned release defines that group and calls each plugin with no arguments
    plugins = (source / "srt/plugins/__init__.py").read_text()
    assert 'GENERAL_PLUGINS_GROUP = "sglang.srt.plugins"' in plugins
    assert (
        "load_plugins_by_group(\n        GENERAL_PLUGINS_GROUP" in plugins
        and "            func()\n" in plugins
    )
    # in the scheduler process (verify, completion) and in the HTTP server's process
    for module, function in (
        ("sglang.srt.managers.scheduler", "run_scheduler_process"),
        ("sglang.srt.entrypoints.engine", "Engine._launch_subprocesses"),
    ):
        calls = [
            n
            for n in ast.walk(definition(parse(source, module), function))
            if isinstance(n, ast.Call)
        ]
        assert any(getattr(c.func, "id", None) == "load_plugins" for c in calls), (
            f"{function} loads plugins"
        )
    # and HookRegistry wraps as our hooks expect
    registry = (source / "srt/plugins/hook_registry.py").read_text()
    assert "return hook(original_fn, *args, **kwargs)" in registry  # AROUND
    assert "modified = hook(result, *args, **kwargs)" in registry  # AFTER
    hook_type = definition(ast.parse(registry), "HookType")
    assert {"AROUND", "AFTER"} <= fields(hook_type) | {
        t.id
        for n in hook_type.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert arguments(definition(ast.parse(registry), "HookRegistry.register"))[:4] == [
        "cls",
        "target",
        "hook",
        "hook_type",
    ]


# target → the positional parameters the hook is called with (after original/result)
SIGNATURES = {
    "sglang.srt.speculative.eagle_info.EagleVerifyInput.verify": [
        "self", "batch", "logits_output", "token_to_kv_pool_allocator", "page_size", "vocab_mask",
    ],
    "sglang.srt.speculative.eagle_info_v2.EagleVerifyInputV2Mixin.sample": [
        "self", "batch", "logits_output", "vocab_mask",
    ],
    "sglang.srt.managers.scheduler_output_processor_mixin.SchedulerOutputProcessorMixin.stream_output_generation": [
        "self", "reqs", "return_logprob", "skip_req", "is_idle_batch",
    ],
    "sglang.srt.managers.scheduler_update_weights_mixin.SchedulerUpdateWeightsMixin.get_weights_by_name": [
        "self", "recv_req",
    ],
    "sglang.srt.entrypoints.http_server._setup_and_run_http_server": [
        "server_args", "tokenizer_manager", "template_manager", "port_args", "scheduler_infos",
        "subprocess_watchdog", "execute_warmup_func", "launch_callback",
    ],
}  # fmt: skip


def _split(target: str, source: Path) -> tuple[str, str]:
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if (source / ("/".join(parts[1:cut]) + ".py")).is_file():
            return ".".join(parts[:cut]), ".".join(parts[cut:])
    raise AssertionError(f"no module for {target} in the pinned SGLang {SGLANG_VERSION}")


@pytest.mark.parametrize("target", sorted(plugin.HOOKS))
def test_every_hooked_symbol_exists_with_the_signature_the_hook_takes(
    source: Path, target: str
) -> None:
    module, qualname = _split(target, source)
    function = definition(parse(source, module), qualname)
    assert isinstance(function, ast.FunctionDef)
    assert arguments(function) == SIGNATURES[target]
    hook, kind = plugin.HOOKS[target]
    leading = ["original"] if kind == "AROUND" else ["result"]
    inspect.signature(hook).bind(*leading, *SIGNATURES[target])  # accepts every argument


def test_patched_methods_are_the_ones_the_workers_and_scheduler_call(source: Path) -> None:
    # the classes SGLang instantiates inherit the hooked methods rather than override them
    verify_input = definition(
        parse(source, "sglang.srt.speculative.eagle_info"), "EagleVerifyInput"
    )
    assert "EagleVerifyInputV2Mixin" in {getattr(b, "id", None) for b in verify_input.bases}
    assert "sample" not in {n.name for n in verify_input.body if isinstance(n, ast.FunctionDef)}
    scheduler = definition(parse(source, "sglang.srt.managers.scheduler"), "Scheduler")
    own = {n.name for n in scheduler.body if isinstance(n, ast.FunctionDef)}
    assert not own & {"stream_output_generation", "get_weights_by_name"}
    # V1 decides acceptance in verify(), V2 in sample(); both on the decode path
    assert "spec_info.verify(" in (source / "srt/speculative/eagle_worker.py").read_text()
    assert (
        "verify_input.sample(batch, logits_output, vocab_mask)"
        in (source / "srt/speculative/eagle_worker_v2.py").read_text()
    )


def test_every_field_the_hooks_read_exists(source: Path) -> None:
    info = parse(source, "sglang.srt.speculative.eagle_info")
    assert {"draft_token", "retrieve_next_token", "draft_token_num"} <= fields(
        definition(info, "EagleVerifyInput")
    )
    assert {"accept_indices", "num_correct_drafts_per_req_cpu"} <= fields(
        definition(info, "EagleVerifyOutput")
    )
    # V2 sample returns (predict, accept_lens, accept_index): the plugin reads result[2]
    sample = definition(
        parse(source, "sglang.srt.speculative.eagle_info_v2"), "EagleVerifyInputV2Mixin.sample"
    )
    returns = [n.value for n in ast.walk(sample) if isinstance(n, ast.Return)]
    assert returns and all(isinstance(r, ast.Tuple) and len(r.elts) == 3 for r in returns)
    assert ast.unparse(returns[-1].elts[2]) == "accept_index"
    batch = parse(source, "sglang.srt.managers.schedule_batch")
    assert "reqs" in fields(definition(batch, "ModelWorkerBatch"))
    req = definition(batch, "Req")
    assert {"rid", "origin_input_ids", "output_ids", "sampling_params", "spec_verify_ct",
            "retraction_count", "time_stats"} <= fields(req)  # fmt: skip
    assert "finished" in {n.name for n in req.body if isinstance(n, ast.FunctionDef)}
    stats = parse(source, "sglang.srt.observability.req_time_stats")
    assert "wait_queue_entry_time" in fields(definition(stats, "SchedulerReqTimeStats"))
    sampling = (source / "srt/sampling/sampling_params.py").read_text()
    assert "self.temperature = 1.0\n            self.top_k = 1" in sampling  # greedy's encoding
    distributed = parse(source, "sglang.srt.distributed.parallel_state")
    definition(distributed, "get_tensor_model_parallel_rank")
    io = parse(source, "sglang.srt.managers.io_struct")
    assert {"name", "truncate_size"} <= fields(definition(io, "GetWeightsByNameReqInput"))
    assert fields(definition(io, "GetWeightsByNameReqOutput")) == {"parameter"}
    # the draft's model runner, as plugin.draft_model_runner finds it
    assert "draft_worker" in {
        n.name for n in definition(parse(source, "sglang.srt.speculative.eagle_worker_v2"), "EAGLEWorkerV2").body
        if isinstance(n, ast.FunctionDef)
    }  # fmt: skip
    assert "draft_runner" in fields(
        definition(parse(source, "sglang.srt.speculative.eagle_worker_v2"), "EagleDraftWorker")
    )
    assert arguments(definition(parse(source, "sglang.srt.models.llama"), "LlamaForCausalLM.get_weights_by_name"))[:3] == [
        "self", "name", "truncate_size",
    ]  # fmt: skip


def test_the_weight_push_uses_endpoints_and_fields_that_exist(source: Path) -> None:
    server = (source / "srt/entrypoints/http_server.py").read_text()
    for route in ("/pause_generation", "/continue_generation", "/update_weights_from_tensor",
                  "/get_weights_by_name", "/health"):  # fmt: skip
        assert f'"{route}"' in server, route
    io = parse(source, "sglang.srt.managers.io_struct")
    assert {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
            "weight_version"} <= fields(definition(io, "UpdateWeightsFromTensorReqInput"))  # fmt: skip
    assert "'in_place'" in ast.unparse(definition(io, "PauseGenerationReqInput"))
    # a load_format listed in --custom-weight-loader is imported and called (model, tensors)
    runner = ast.unparse(
        definition(
            parse(source, "sglang.srt.model_executor.model_runner"),
            "ModelRunner.update_weights_from_tensor",
        )
    )
    assert "load_format in self.server_args.custom_weight_loader" in runner
    assert "custom_loader(self.model, named_tensors)" in runner
    # why the loader must pick the draft: both workers hand the tensors to the target too
    for module, cls in (("eagle_worker", "EAGLEWorker"), ("eagle_worker_v2", "EAGLEWorkerV2")):
        push = ast.unparse(
            definition(
                parse(source, f"sglang.srt.speculative.{module}"),
                f"{cls}.update_weights_from_tensor",
            )
        )
        assert "self.target_worker.model_runner.update_weights_from_tensor" in push
    # why flush_cache is false: flushing asserts when requests are running
    mixin = ast.unparse(
        definition(
            parse(source, "sglang.srt.managers.scheduler_update_weights_mixin"),
            "SchedulerUpdateWeightsMixin.flush_cache_after_weight_update",
        )
    )
    assert "assert flush_cache_success" in mixin
    serializer = definition(
        parse(source, "sglang.srt.utils.common"), "MultiprocessingSerializer.serialize"
    )
    assert arguments(serializer) == ["obj", "output_str"]
    # the probes' names are the draft model's parameter names (see the load_weights test)
    assert {name for name, _ in VERIFY_PROBES} <= set(SGLANG_PARAMS)


def test_every_launcher_flag_and_algorithm_exists(source: Path) -> None:
    tree = parse(source, "sglang.srt.server_args")
    flags = {
        arg.value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "add_argument"
        for arg in call.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }
    spec = SimpleNamespace(
        target=SimpleNamespace(model="m", served_name=None),
        draft=SimpleNamespace(initial="/drafts/r1"),
        engine=SimpleNamespace(
            tensor_parallel=2,
            speculative_steps=3,
            speculative_eagle_topk=1,
            num_draft_tokens=4,
            extra_args=[],
        ),
    )
    used = {
        a
        for a in server_command(spec) + server_command(spec, draft_path="ngram")
        if a.startswith("--")
    }
    assert used <= flags, f"flags missing from SGLang {SGLANG_VERSION}: {sorted(used - flags)}"
    algorithms = definition(
        parse(source, "sglang.srt.speculative.spec_info"), "SpeculativeAlgorithm"
    )
    members = {
        t.id
        for n in algorithms.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert {"EAGLE3", "NGRAM"} <= members
    assert DRAFT_LOADER == "aurora.runtime.sglang.weights.load_draft_only"
    # what the plugin reads from ServerArgs to start the watcher
    server_args = fields(definition(tree, "ServerArgs"))
    assert {
        "host",
        "port",
        "tp_size",
        "speculative_draft_model_path",
        "custom_weight_loader",
    } <= server_args


# The EAGLE-3 draft's parameters in SGLang (checked against the source below).
SGLANG_PARAMS = [
    "model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight",
    "model.layers.0.hidden_norm.weight", "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
]  # fmt: skip


def test_sglang_eagle3_modules_define_those_parameters(source: Path) -> None:
    eagle = parse(source, "sglang.srt.models.llama_eagle3")
    llama = parse(source, "sglang.srt.models.llama")
    assert {"fc", "layers", "norm", "embed_tokens"} <= fields(definition(eagle, "LlamaModel"))
    assert "hidden_norm" in fields(definition(eagle, "LlamaDecoderLayer"))
    assert "lm_head" in fields(definition(eagle, "LlamaForCausalLMEagle3"))
    assert {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"} <= fields(
        definition(llama, "LlamaDecoderLayer")
    )
    assert {"qkv_proj", "o_proj"} <= fields(definition(llama, "LlamaAttention"))
    assert {"gate_up_proj", "down_proj"} <= fields(definition(llama, "LlamaMLP"))
    # the fused layers: SGLang captures the output of layer i, as Aurora's fuse_layers mean
    assert "[val + 1 for val in layer_ids]" in ast.unparse(
        definition(llama, "LlamaForCausalLM.set_eagle3_layers_to_capture")
    )
    assert (
        '"eagle_aux_hidden_state_layer_ids"'
        in (source / "srt/model_executor/model_runner.py").read_text()
    )


def test_export_names_load_into_every_sglang_parameter_through_its_own_load_weights(
    source: Path, tmp_path: Path
) -> None:
    # given SGLang's real LlamaForCausalLMEagle3.load_weights, compiled from the source
    function = definition(
        parse(source, "sglang.srt.models.llama_eagle3"), "LlamaForCausalLMEagle3.load_weights"
    )
    loaded: list[tuple[str, Any, tuple[int, ...]]] = []

    def loader(name: str) -> Any:
        return lambda param, weight, shard=None: loaded.append((name, shard, tuple(weight.shape)))

    namespace: dict[str, Any] = {"torch": torch, "Iterable": Iterable, "Tuple": tuple,
                                 "default_weight_loader": None}  # fmt: skip
    exec(compile(ast.Module([function], []), "llama_eagle3.py", "exec"), namespace)
    model = SimpleNamespace(
        named_parameters=lambda: [
            (n, SimpleNamespace(weight_loader=loader(n))) for n in SGLANG_PARAMS
        ]
    )
    # when it loads an Aurora export
    draft = export_revision(save_revision(tmp_path / "c", "r1"), tmp_path / "out")
    namespace["load_weights"](model, draft.tensors.items())
    # then every exported weight lands on a parameter, none is skipped silently
    assert sorted((name, shard) for name, shard, _ in loaded) == sorted([
        ("model.fc.weight", None), ("model.norm.weight", None), ("lm_head.weight", None),
        ("model.layers.0.input_layernorm.weight", None), ("model.layers.0.hidden_norm.weight", None),
        ("model.layers.0.post_attention_layernorm.weight", None),
        ("model.layers.0.self_attn.qkv_proj.weight", "q"), ("model.layers.0.self_attn.qkv_proj.weight", "k"),
        ("model.layers.0.self_attn.qkv_proj.weight", "v"), ("model.layers.0.self_attn.o_proj.weight", None),
        ("model.layers.0.mlp.gate_up_proj.weight", 0), ("model.layers.0.mlp.gate_up_proj.weight", 1),
        ("model.layers.0.mlp.down_proj.weight", None),
    ])  # fmt: skip
    assert len(loaded) == len(PARAM_NAMES)
    # and SGLang reads d2t as offsets: its hot_token_id is Aurora's d2t (target ids)
    assert torch.equal(model.hot_token_id, VOCAB)
    assert ("lm_head.weight", None, (CONFIG.draft_vocab_size, CONFIG.hidden_size)) in loaded
