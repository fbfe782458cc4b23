"""Contract tests against the real source of every supported SGLang release (parsed with
ast, never imported: it needs CUDA). Every symbol the plugin hooks (with its
signature), every field it reads, every flag the launcher passes, every endpoint and
field the pusher uses and every weight name the export writes must exist in each
release, with the meaning assumed. A release that moves any of them fails here."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sglang_support import CONFIG, VOCAB, save_revision, sglang_source

from aurora.runtime.rollout import RolloutPolicy
from aurora.runtime.sglang import SUPPORTED_VERSIONS, plugin
from aurora.runtime.sglang.export import PARAM_NAMES, export_revision
from aurora.runtime.sglang.launcher import (
    DRAFT_LOADER,
    Launch,
    Speculation,
    server_command,
    sglang_command,
)
from aurora.runtime.sglang.weights import SWAP_PROTOCOLS, VERIFY_PROBES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Release:
    version: str
    root: Path  # the unpacked wheel's sglang/ folder

    def text(self, relative: str) -> str:
        return (self.root / relative).read_text()

    def parse(self, dotted_module: str) -> ast.Module:
        relative = dotted_module.removeprefix("sglang.").replace(".", "/")
        if (self.root / relative).is_dir():
            return ast.parse(self.text(relative + "/__init__.py"))
        return ast.parse(self.text(relative + ".py"))

    def definition(self, dotted_module: str, qualname: str) -> Any:
        node: Any = self.parse(dotted_module)
        for part in qualname.split("."):
            found = [
                child
                for child in node.body
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and child.name == part
            ]
            assert found, (
                f"{qualname}: {part!r} not found in {dotted_module} of SGLang {self.version}"
            )
            node = found[-1]
        return node


@pytest.fixture(scope="module", params=SUPPORTED_VERSIONS)
def release(request: pytest.FixtureRequest) -> Release:
    return Release(request.param, sglang_source(request.param) / "sglang")


def arguments(function: ast.FunctionDef) -> list[str]:
    return [a.arg for a in function.args.posonlyargs + function.args.args]


def methods(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def fields(cls: ast.ClassDef) -> set[str]:
    """Annotated class attributes (dataclass or msgspec fields) and self.X assignments."""
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


def unparse(release: Release, module: str, qualname: str) -> str:
    return ast.unparse(release.definition(module, qualname))


def test_the_supported_releases_each_have_hooks_a_swap_protocol_and_a_wheel() -> None:
    assert set(SUPPORTED_VERSIONS) == set(plugin.HOOKS) == set(SWAP_PROTOCOLS)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    group = pyproject["project"]["entry-points"]["sglang.srt.plugins"]
    assert group == {"aurora": "aurora.runtime.sglang.plugin:register"}
    installed = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert any(ep.value == group["aurora"] for ep in installed), "reinstall: pip install -e ."


def test_sglang_loads_our_entry_point_group_in_every_server_process(release: Release) -> None:
    plugins = release.text("srt/plugins/__init__.py")
    assert 'GENERAL_PLUGINS_GROUP = "sglang.srt.plugins"' in plugins
    load = unparse(release, "sglang.srt.plugins", "load_plugins")
    assert "func()" in load and "HookRegistry.apply_hooks()" in load
    # a plugin that raises SystemExit stops the server (it is not an Exception)
    assert "except Exception:" in load and "BaseException" not in load
    # in the scheduler process (verify, completion) and in the HTTP server's process
    for module, function in (
        ("sglang.srt.managers.scheduler", "run_scheduler_process"),
        ("sglang.srt.entrypoints.engine", "Engine._launch_subprocesses"),
    ):
        calls = [
            n for n in ast.walk(release.definition(module, function)) if isinstance(n, ast.Call)
        ]
        assert any(getattr(c.func, "id", None) == "load_plugins" for c in calls), function
    assert "load_plugins()" in release.text("launch_server.py")
    # HookRegistry wraps as our hooks expect, and rebinds `from X import f` copies
    registry = release.text("srt/plugins/hook_registry.py")
    assert "return hook(original_fn, *args, **kwargs)" in registry  # AROUND
    assert "modified = hook(result, *args, **kwargs)" in registry  # AFTER
    assert "_propagate_patch(original, wrapped, obj)" in registry
    hook_type = release.definition("sglang.srt.plugins.hook_registry", "HookType")
    members = {t.id for n in hook_type.body if isinstance(n, ast.Assign) for t in n.targets}
    assert {"AROUND", "AFTER"} <= members
    register = release.definition("sglang.srt.plugins.hook_registry", "HookRegistry.register")
    assert arguments(register)[:4] == ["cls", "target", "hook", "hook_type"]


# release → target → the positional parameters the hook is called with (after
# original/result). A renamed, moved or re-signed symbol fails the test below.
SIGNATURES = {
    "0.5.23": {
        "sglang.srt.speculative.eagle_utils.eagle_sample": [
            "verify_input", "batch", "logits_output", "grammar_mask", "uno_target_max_top_k",
        ],
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer._stream_output_generation": [
            "self", "reqs", "return_logprob", "skip_req", "is_idle_batch",
        ],
        "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager.get_weights_by_name": [
            "self", "recv_req",
        ],
        "sglang.srt.entrypoints.http_server._setup_and_run_http_server": [
            "server_args", "tokenizer_manager", "template_manager", "port_args", "scheduler_infos",
            "subprocess_watchdog", "execute_warmup_func", "launch_callback",
        ],
    },
    "0.5.12": {
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
    },
}  # fmt: skip


def _split(target: str, release: Release) -> tuple[str, str]:
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if (release.root / ("/".join(parts[1:cut]) + ".py")).is_file():
            return ".".join(parts[:cut]), ".".join(parts[cut:])
    raise AssertionError(f"no module for {target} in SGLang {release.version}")


def test_every_hooked_symbol_exists_with_the_signature_the_hook_takes(release: Release) -> None:
    assert set(plugin.HOOKS[release.version]) == set(SIGNATURES[release.version])
    for target, (hook, kind) in plugin.HOOKS[release.version].items():
        module, qualname = _split(target, release)
        function = release.definition(module, qualname)
        assert isinstance(function, ast.FunctionDef), target
        assert arguments(function) == SIGNATURES[release.version][target], target
        leading = ["original"] if kind == "AROUND" else ["result"]
        inspect.signature(hook).bind(*leading, *SIGNATURES[release.version][target])


def test_the_hooked_functions_are_the_ones_sglang_calls(release: Release) -> None:
    if release.version == "0.5.23":
        # both verify paths (EAGLE-3 workers and NGRAM) call eagle_sample by a `from`
        # import, which HookRegistry rebinds; its result is (predict, accept_lens,
        # accept_index) everywhere, -1 padded [bs, depth]
        for module in ("eagle_worker_common", "ngram_worker"):
            tree = release.parse(f"sglang.srt.speculative.{module}")
            imports = [
                n for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module == "sglang.srt.speculative.eagle_utils"
            ]  # fmt: skip
            assert any("eagle_sample" in {a.name for a in n.names} for n in imports), module
            assert "eagle_sample(" in ast.unparse(tree), module
        sample = release.definition("sglang.srt.speculative.eagle_utils", "eagle_sample")
        returns = [n.value for n in ast.walk(sample) if isinstance(n, ast.Return)]
        assert returns and all(isinstance(r, ast.Tuple) and len(r.elts) == 3 for r in returns)
        assert {ast.unparse(r.elts[2]) for r in returns} == {"accept_index"}
        assert "torch.full((bs, verify_input.max_tree_depth), -1" in ast.unparse(sample)
        # the streamer and the weight updater the scheduler instantiates
        scheduler = release.definition("sglang.srt.managers.scheduler", "Scheduler")
        assert "return SchedulerOutputStreamer" in ast.unparse(scheduler)
        assert "SchedulerWeightUpdaterManager(" in ast.unparse(scheduler)
        streamer = release.definition(
            "sglang.srt.managers.scheduler_components.output_streamer", "SchedulerOutputStreamer"
        )
        assert "self._stream_output_generation(reqs, return_logprob, skip_req)" in ast.unparse(
            streamer
        )
    else:
        verify_input = release.definition("sglang.srt.speculative.eagle_info", "EagleVerifyInput")
        assert "EagleVerifyInputV2Mixin" in {getattr(b, "id", None) for b in verify_input.bases}
        assert "sample" not in methods(verify_input)
        scheduler = release.definition("sglang.srt.managers.scheduler", "Scheduler")
        assert not methods(scheduler) & {"stream_output_generation", "get_weights_by_name"}
        assert "spec_info.verify(" in release.text("srt/speculative/eagle_worker.py")
        assert "verify_input.sample(batch, logits_output, vocab_mask)" in release.text(
            "srt/speculative/eagle_worker_v2.py"
        )


def test_every_field_the_hooks_read_exists(release: Release) -> None:
    batch_module = "sglang.srt.managers.schedule_batch"
    if release.version == "0.5.23":
        verify_inputs = [
            ("sglang.srt.speculative.eagle_info", "EagleVerifyInput"),
            ("sglang.srt.speculative.ngram_info", "NgramVerifyInput"),
        ]
        batch = release.definition(batch_module, "ScheduleBatch")
        streamer_module = "sglang.srt.managers.scheduler_components.weight_updater"
        assert "draft_worker" in fields(
            release.definition(streamer_module, "SchedulerWeightUpdaterManager")
        )
    else:
        verify_inputs = [("sglang.srt.speculative.eagle_info", "EagleVerifyInput")]
        batch = release.definition(batch_module, "ModelWorkerBatch")
        output = release.definition("sglang.srt.speculative.eagle_info", "EagleVerifyOutput")
        assert {"accept_indices", "num_correct_drafts_per_req_cpu"} <= fields(output)
        sample = release.definition(
            "sglang.srt.speculative.eagle_info_v2", "EagleVerifyInputV2Mixin.sample"
        )
        returns = [n.value for n in ast.walk(sample) if isinstance(n, ast.Return)]
        assert returns and all(isinstance(r, ast.Tuple) and len(r.elts) == 3 for r in returns)
        assert ast.unparse(returns[-1].elts[2]) == "accept_index"
    for module, cls in verify_inputs:
        assert {"draft_token", "retrieve_next_token", "draft_token_num"} <= fields(
            release.definition(module, cls)
        ), cls
    assert {"reqs", "forward_mode"} <= fields(batch)
    req = release.definition(batch_module, "Req")
    assert {"rid", "origin_input_ids", "output_ids", "sampling_params", "spec_verify_ct",
            "retraction_count", "time_stats"} <= fields(req)  # fmt: skip
    assert "finished" in methods(req)
    stats = release.definition("sglang.srt.observability.req_time_stats", "SchedulerReqTimeStats")
    assert "wait_queue_entry_time" in fields(stats)
    sampling = release.text("srt/sampling/sampling_params.py")
    assert "self.temperature = 1.0\n            self.top_k = 1" in sampling  # greedy's encoding
    # the emitting rank: the first rank of each attention data-parallel group
    for function in ("get_attn_tensor_model_parallel_rank", "get_attn_context_model_parallel_rank"):
        release.definition("sglang.srt.distributed.parallel_state", function)
    assert "from sglang.srt.distributed.parallel_state import *" in release.text(
        "srt/distributed/__init__.py"
    )
    io = "sglang.srt.managers.io_struct"
    assert {"name", "truncate_size"} <= fields(release.definition(io, "GetWeightsByNameReqInput"))
    assert fields(release.definition(io, "GetWeightsByNameReqOutput")) == {"parameter"}
    # the draft's model runner, as plugin.draft_model_runner finds it, and its reader
    v2 = "sglang.srt.speculative.eagle_worker_v2"
    assert "draft_runner" in fields(release.definition(v2, "EagleDraftWorker"))
    worker_v2 = release.definition(v2, "EAGLEWorkerV2")
    if release.version == "0.5.23":
        assert {getattr(b, "id", None) for b in worker_v2.bases} == {"BaseSpecWorker"}
        base = release.definition("sglang.srt.speculative.base_spec_worker", "BaseSpecWorker")
        assert "draft_worker" in methods(base)  # the property returning the EagleDraftWorker
        assert "self.draft_worker.draft_runners" in ast.unparse(base)
        exporter = release.definition(
            "sglang.srt.model_executor.model_runner_components.weight_exporter",
            "WeightExporter.get_weights_by_name",
        )
        assert arguments(exporter)[:3] == ["self", "name", "truncate_size"]
        assert "weight_exporter" in release.text("srt/model_executor/model_runner.py")
    else:
        assert "draft_worker" in methods(worker_v2)
    assert arguments(
        release.definition("sglang.srt.models.llama", "LlamaForCausalLM.get_weights_by_name")
    )[:3] == ["self", "name", "truncate_size"]


def test_the_weight_push_uses_endpoints_and_fields_that_exist(release: Release) -> None:
    protocol = SWAP_PROTOCOLS[release.version]
    server = release.text("srt/entrypoints/http_server.py")
    routes = ["/pause_generation", "/continue_generation", "/update_weights_from_tensor",
              "/get_weights_by_name", "/health"]  # fmt: skip
    if protocol.session:
        routes += ["/begin_weight_update", "/end_weight_update"]
    for route in routes:
        assert f'"{route}"' in server, route
    io = "sglang.srt.managers.io_struct"
    update = fields(release.definition(io, "UpdateWeightsFromTensorReqInput"))
    assert {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
            "weight_version"} <= update  # fmt: skip
    assert ("selector" in update) == protocol.selector
    pause = ast.unparse(release.definition(io, "PauseGenerationReqInput"))
    assert f"'{protocol.pause_mode}'" in pause
    # a load_format listed in --custom-weight-loader is imported and called (model, tensors)
    if release.version == "0.5.23":
        loader = unparse(
            release,
            "sglang.srt.model_executor.model_runner_components.weight_updater",
            "WeightUpdater.update_weights_from_tensor",
        )
        assert "load_format in self.custom_weight_loaders" in loader
        assert "custom_loader(self.get_model(), named_tensors)" in loader
        manager = "sglang.srt.managers.scheduler_components.weight_updater"
        # the draft selector and the begin/end session the pusher follows
        tensor = unparse(
            release, manager, "SchedulerWeightUpdaterManager.update_weights_from_tensor"
        )
        assert "must run between begin_weight_update() and end_weight_update()" in tensor
        assert "self._select_runners(recv_req.selector)" in tensor
        assert "self.flush_cache_after_weight_update(" in tensor
        select = unparse(release, manager, "SchedulerWeightUpdaterManager._select_runners")
        assert "self.draft_worker.weight_update_runners()" in select
        begin = release.definition(io, "BeginWeightUpdateReqInput")
        assert "selector" in fields(begin)
        # flushing after the load works while paused: waiting (retracted) requests are ignored
        flush = unparse(release, "sglang.srt.managers.scheduler", "Scheduler.flush_cache")
        assert "self.is_fully_idle(ignore_waiting=self._engine_paused)" in flush
        # retract finishes the batch in flight (overlap) and frees running requests' KV
        pause_impl = unparse(release, "sglang.srt.managers.scheduler", "Scheduler.pause_generation")
        assert "self.result_queue.popleft()" in pause_impl and "retract_all(" in pause_impl
        # each tensor-parallel rank deserializes its own payload, index tp_rank
        own = unparse(release, "sglang.srt.managers.tp_worker", "BaseTpWorker.deserialize_own_rank")
        assert "serialized_named_tensors[get_parallel().tp_rank]" in own
        # and SGLang's Engine serializes once per rank, as the pusher does
        engine = unparse(
            release, "sglang.srt.entrypoints.engine", "Engine._serialize_tensors_per_rank"
        )
        assert "for _ in range(get_parallel().tp_size)" in engine
        # the tokenizer refuses data-parallel replicas: the pusher asks for a restart instead
        mixin = unparse(
            release,
            "sglang.srt.managers.tokenizer_control_mixin",
            "TokenizerControlMixin.update_weights_from_tensor",
        )
        assert "get_parallel().dp_size == 1" in mixin
    else:
        runner = unparse(
            release,
            "sglang.srt.model_executor.model_runner",
            "ModelRunner.update_weights_from_tensor",
        )
        assert "load_format in self.server_args.custom_weight_loader" in runner
        assert "custom_loader(self.model, named_tensors)" in runner
        # why the loader must pick the draft: both workers hand the tensors to the target too
        for module, cls in (("eagle_worker", "EAGLEWorker"), ("eagle_worker_v2", "EAGLEWorkerV2")):
            push = unparse(
                release, f"sglang.srt.speculative.{module}", f"{cls}.update_weights_from_tensor"
            )
            assert "self.target_worker.model_runner.update_weights_from_tensor" in push
            assert "recv_req.serialized_named_tensors[self.tp_rank]" in push
        # why flush_cache is false: flushing asserts when requests wait or run
        mixin = unparse(
            release,
            "sglang.srt.managers.scheduler_update_weights_mixin",
            "SchedulerUpdateWeightsMixin.flush_cache_after_weight_update",
        )
        assert "assert flush_cache_success" in mixin
        assert "len(self.waiting_queue) == 0" in unparse(
            release, "sglang.srt.managers.scheduler", "Scheduler.is_fully_idle"
        )
    serializer = release.definition(
        "sglang.srt.utils.common", "MultiprocessingSerializer.serialize"
    )
    assert arguments(serializer) == ["obj", "output_str"]
    # the probes' names are the draft model's parameter names (see the load_weights test)
    assert {name for name, _ in VERIFY_PROBES} <= set(SGLANG_PARAMS)


def test_a_restart_drains_the_server_the_way_the_launcher_expects(release: Release) -> None:
    # serve.terminate sends SIGTERM to SGLang's HTTP server process: SGLang marks the
    # tokenizer manager as exiting, /health answers 503 (readiness moves traffic away),
    # in-flight requests finish, then the process exits and the container restarts
    handler = unparse(
        release, "sglang.srt.managers.tokenizer_manager", "SignalHandler.sigterm_handler"
    )
    assert "self.tokenizer_manager.gracefully_exit = True" in handler
    health = unparse(release, "sglang.srt.entrypoints.http_server", "health_generate")
    assert "if _global_state.tokenizer_manager.gracefully_exit:" in health
    assert "Response(status_code=503)" in health
    watchdog = unparse(
        release, "sglang.srt.managers.tokenizer_manager", "TokenizerManager.sigterm_watchdog"
    )
    assert (
        "remain_num_req = len(self.rid_to_state)" in watchdog and "kill_process_tree(" in watchdog
    )


def cli_flags(release: Release) -> set[str]:
    """Every command-line flag of sglang.launch_server: add_argument calls in
    server_args.py, and (0.5.23) the generated ones of the arg_groups field records."""
    trees = [release.parse("sglang.srt.server_args")]
    fields_dir = release.root / "srt/arg_groups/fields"
    flags: set[str] = set()
    for tree in trees:
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "add_argument":
                flags |= {
                    a.value for a in call.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)
                }  # fmt: skip
    if fields_dir.is_dir():
        for path in fields_dir.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                    continue
                annotation = ast.unparse(node.annotation)
                if not annotation.startswith("A[") or "no_cli=True" in annotation:
                    continue
                flags.add("--" + node.target.id.replace("_", "-"))
                for call in ast.walk(node.annotation):
                    for keyword in getattr(call, "keywords", []):
                        if keyword.arg == "aliases" and isinstance(keyword.value, ast.List):
                            flags |= {
                                e.value for e in keyword.value.elts if isinstance(e, ast.Constant)
                            }
                        if keyword.arg == "cli_name" and isinstance(keyword.value, ast.Constant):
                            flags.add(keyword.value.value)
    return flags


SPEC = SimpleNamespace(
    target=SimpleNamespace(model="m", served_name=None),
    draft=SimpleNamespace(initial="/drafts/r1"),
    engine=SimpleNamespace(
        tensor_parallel=2, speculative_steps=3, speculative_eagle_topk=1, num_draft_tokens=4,
        extra_args=[],
    ),
    rollout=RolloutPolicy(),
)  # fmt: skip


def test_every_flag_the_launcher_passes_and_every_server_arg_read_exists(release: Release) -> None:
    flags = cli_flags(release)
    command = server_command(SPEC)
    sglang_args = command[command.index("--") + 1 :]
    speculation = Speculation(3, 1, 4)
    used = set()
    for launch in (Launch("none"), Launch("ngram", "NGRAM"), Launch("r1", "EAGLE3", "/d/r1")):
        used |= {a for a in sglang_command(launch, speculation, sglang_args) if a.startswith("--")}
    assert used <= flags, f"flags missing from SGLang {release.version}: {sorted(used - flags)}"
    algorithms = release.definition("sglang.srt.speculative.spec_info", "SpeculativeAlgorithm")
    members = {t.id for n in algorithms.body if isinstance(n, ast.Assign) for t in n.targets}
    assert {"EAGLE3", "NGRAM"} <= members
    assert DRAFT_LOADER == "aurora.runtime.sglang.weights.load_draft_only"
    # what the plugin reads from ServerArgs (launcher.running_launch, weights.start_watcher)
    read = {"host", "port", "tp_size", "dp_size", "speculative_algorithm",
            "speculative_draft_model_path", "custom_weight_loader"}  # fmt: skip
    if release.version == "0.5.23":
        declared = set()
        for path in (release.root / "srt/arg_groups/fields").glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    declared.add(node.target.id)
        assert "ServerArgs = msgspec.defstruct(" in release.text("srt/server_args.py")  # flat
    else:
        declared = fields(release.definition("sglang.srt.server_args", "ServerArgs"))
    assert read <= declared, sorted(read - declared)


def test_the_gpu_smoke_script_passes_only_flags_the_release_has(release: Release) -> None:
    script = (ROOT / "scripts" / "gpu-smoke.sh").read_text()
    launch = script[
        script.index("-m aurora.runtime.sglang.serve") : script.index('> "$out/server.log"')
    ]
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", launch))
    launcher_own = {"--initial", "--speculative-num-steps", "--speculative-eagle-topk",
                    "--speculative-num-draft-tokens"}  # fmt: skip
    assert {"--model-path", "--port", "--mem-fraction-static"} <= flags
    missing = flags - launcher_own - cli_flags(release)
    assert not missing, f"gpu-smoke.sh passes flags SGLang {release.version} lacks: {missing}"


# The EAGLE-3 draft's parameters in SGLang (checked against the source below).
SGLANG_PARAMS = [
    "model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight",
    "model.layers.0.hidden_norm.weight", "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
]  # fmt: skip


def test_sglang_eagle3_modules_define_those_parameters(release: Release) -> None:
    eagle, llama = "sglang.srt.models.llama_eagle3", "sglang.srt.models.llama"
    assert {"fc", "layers", "norm", "embed_tokens"} <= fields(
        release.definition(eagle, "LlamaModel")
    )
    assert "hidden_norm" in fields(release.definition(eagle, "LlamaDecoderLayer"))
    assert "lm_head" in fields(release.definition(eagle, "LlamaForCausalLMEagle3"))
    assert {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"} <= fields(
        release.definition(llama, "LlamaDecoderLayer")
    )
    assert {"qkv_proj", "o_proj"} <= fields(release.definition(llama, "LlamaAttention"))
    assert {"gate_up_proj", "down_proj"} <= fields(release.definition(llama, "LlamaMLP"))
    # the fused layers: SGLang captures the output of layer i, as Aurora's fuse_layers mean
    assert "[val + 1 for val in layer_ids]" in unparse(
        release, llama, "LlamaForCausalLM.set_eagle3_layers_to_capture"
    )
    assert '"eagle_aux_hidden_state_layer_ids"' in release.text(
        "srt/model_executor/model_runner.py"
    ) or "eagle_aux_hidden_state_layer_ids" in release.text("srt/models/llama_eagle3.py")
    model = unparse(release, eagle, "LlamaModel")
    # the next step is fed the pre-norm hidden state, as Aurora's head does; the optional
    # extra norms (0.5.23) stay off for an export that does not ask for them
    assert "aux = hidden_states_to_logits if self.norm_output else hidden_states_to_aux" in model
    assert "getattr(config, 'norm_output', False)" in model
    if release.version == "0.5.23":
        assert "getattr(config, 'use_aux_norm', False)" in model
        assert "getattr(config, 'norm_before_fc', False)" in model


def test_export_names_load_into_every_sglang_parameter_through_its_own_load_weights(
    release: Release, tmp_path: Path
) -> None:
    # given SGLang's real LlamaForCausalLMEagle3.load_weights, compiled from the source
    function = release.definition(
        "sglang.srt.models.llama_eagle3", "LlamaForCausalLMEagle3.load_weights"
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
