"""The SGLang plugin's hooks, driven with objects shaped like each supported release's
(tensors and namespaces), publish decodable traces and stats to a real Redis."""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import torch
from sglang_support import sglang_source

from aurora.runtime.protocol import Keys, LoadedReport, decode_entries, read_stats, report_loaded
from aurora.runtime.sglang import SUPPORTED_VERSIONS, plugin
from aurora.runtime.sglang.plugin import PluginSettings, VerifyBatch

pytestmark = pytest.mark.integration

VOCAB, N = 50, 4  # target vocabulary; tree nodes per request (root + 3 chain drafts)
KEYS = Keys("prod", "llama")


class Req:
    """The parts of sglang.srt.managers.schedule_batch.Req the plugin reads."""

    def __init__(
        self, rid: str, prompt: list[int], first: int, temperature: float = 1.0, top_k: int = 1
    ) -> None:
        self.rid, self.origin_input_ids, self.output_ids = rid, prompt, [first]
        self.sampling_params = SimpleNamespace(temperature=temperature, top_k=top_k)
        self.spec_verify_ct, self.retraction_count, self.done = 0, 0, False
        self.time_stats = SimpleNamespace(wait_queue_entry_time=0.0)

    def finished(self) -> bool:
        return self.done


@pytest.fixture
def capture(redis_url: str) -> Iterator[plugin.TraceCapture]:
    settings = PluginSettings.from_env(
        {"AURORA_REDIS_URL": redis_url, "AURORA_SPECULATOR": "prod/llama", "AURORA_SERVER_ID": "pod-1",
         "AURORA_TRACE_TOPK": "3"}
    )  # fmt: skip
    assert settings is not None
    capture = plugin.start_capture(settings)
    plugin._capture, plugin._settings, plugin._emits = capture, settings, True
    yield capture
    plugin._capture = plugin._settings = plugin._emits = None


def greedy_chain_verify(
    candidates: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """What SGLang's verify_tree_greedy_func computes for top-k 1: (accept_index
    [bs, N] flat, -1 padded; the tokens each request emits)."""
    bs = candidates.shape[0]
    target = logits.argmax(-1).reshape(bs, N)
    accept_index = torch.full((bs, N), -1)
    emitted = []
    for i in range(bs):
        node, path = 0, [0]
        while node + 1 < N and int(candidates[i, node + 1]) == int(target[i, node]):
            node += 1
            path.append(node)
        accept_index[i, : len(path)] = torch.tensor(path) + i * N
        emitted.append([int(target[i, n]) for n in path])
    return accept_index, emitted


def test_v1_and_v2_verify_hooks_publish_the_same_trace_records_as_the_engine(
    capture: plugin.TraceCapture, redis_client: redis.Redis
) -> None:
    # given this server reported revision r7 loaded, and two greedy requests
    report_loaded(redis_client, KEYS, LoadedReport(server="pod-1", stable="r7"))
    reqs = [Req("a", [1, 2, 3], first=10), Req("b", [4, 5], first=20)]
    scheduler = SimpleNamespace()
    plugin.after_stream_output(None, scheduler, reqs, False)  # first tokens stream
    torch.manual_seed(0)
    for step, hook in enumerate([plugin.around_sample, plugin.around_verify, plugin.around_sample]):
        # the draft proposes a chain per request; the target agrees with some of it
        candidates = torch.tensor(
            [[r.output_ids[-1], *torch.randint(0, VOCAB, (N - 1,)).tolist()] for r in reqs]
        )
        logits = torch.randn(len(reqs) * N, VOCAB)
        agree = [1 + step, 3 - step]  # accepted drafts per request this step
        for i, count in enumerate(agree):
            for node in range(count):
                logits[i * N + node, candidates[i, node + 1]] = 50.0
        spec = SimpleNamespace(
            draft_token=candidates.reshape(-1),
            retrieve_next_token=torch.tensor([[1, 2, 3, -1]] * len(reqs)),
            draft_token_num=N,
        )
        batch = SimpleNamespace(forward_mode=SimpleNamespace(is_idle=lambda: False), reqs=reqs)
        output = SimpleNamespace(next_token_logits=logits)

        def sample(
            self, batch, logits_output, vocab_mask=None, candidates=candidates
        ):  # EagleVerifyInputV2Mixin.sample
            accept_index, emitted = greedy_chain_verify(candidates, logits_output.next_token_logits)
            for req, tokens in zip(batch.reqs, emitted, strict=True):
                req.output_ids += tokens  # the scheduler's process_batch_result
            return torch.zeros(1), torch.tensor([len(t) for t in emitted]), accept_index

        def verify(
            self, batch, logits_output, allocator, page_size, vocab_mask=None, candidates=candidates
        ):  # V1
            accept_index, emitted = greedy_chain_verify(candidates, logits_output.next_token_logits)
            for req, tokens in zip(batch.reqs, emitted, strict=True):
                req.output_ids += tokens
                req.spec_verify_ct += 1
            return SimpleNamespace(
                accept_indices=accept_index[accept_index >= 0],
                num_correct_drafts_per_req_cpu=[len(t) - 1 for t in emitted],
            )

        if hook is plugin.around_verify:
            result = hook(verify, spec, batch, output, object(), 1, None)
        else:
            result = hook(sample, spec, batch, output, None)
        assert result is not None
        plugin.after_stream_output(None, scheduler, reqs, False)
    for req in reqs:
        req.done = True
    plugin.after_stream_output(None, scheduler, reqs, False)
    plugin.after_stream_output(None, scheduler, reqs, False)  # finished twice: traced once
    assert capture.flush(30.0)

    # then each request has one decodable trace, every step aligned with the output
    good, bad = decode_entries(redis_client.xrange(KEYS.traces))
    assert bad == []
    records = {record.prompt_ids[0]: record for _, record in good}
    assert sorted(records) == [1, 4]
    for record, agreed in ((records[1], [1, 2, 3]), (records[4], [3, 2, 1])):
        assert [s.accepted for s in record.steps] == agreed
        assert all(len(s.proposed) == N - 1 for s in record.steps)
        assert record.revision == "r7" and record.server == "pod-1" and record.temperature == 0.0
        assert record.topk_width == 3
        # top-k at the first proposed position is the target's argmax there
        assert record.steps[0].topk_ids[0][0] == record.output_ids[1]
    assert len(records[1].output_ids) == 1 + sum(a + 1 for a in [1, 2, 3])
    # and each request's stats carry the same accept length the steps imply
    stats = read_stats(redis_client, KEYS)
    assert sorted(s.accept_length for _, s in stats) == [3.0, 3.0]
    assert {(s.revision, s.arm, s.verify_steps) for _, s in stats} == {("r7", "stable", 3)}


def test_a_failing_hook_never_breaks_verification_and_a_full_buffer_drops_and_counts(
    capture: plugin.TraceCapture,
) -> None:
    # a spec without the fields the plugin reads: verification still runs and returns
    broken = SimpleNamespace(draft_token_num=N)
    batch = SimpleNamespace(
        forward_mode=SimpleNamespace(is_idle=lambda: False), reqs=[Req("x", [1], 2)]
    )
    result = plugin.around_sample(
        lambda self, b, o, m=None: "verified", broken, batch, SimpleNamespace(), None
    )
    assert result == "verified"
    # a capture thread stuck on a batch (its CUDA event not yet reached) fills the buffer
    release = threading.Event()
    stuck = VerifyBatch(
        rids=[], candidates=[], next_token=[], accepted=[], accepted_counts=None,
        ready=SimpleNamespace(synchronize=release.wait),
    )  # fmt: skip
    assert capture.offer(stuck)
    offered = [capture.offer(stuck) for _ in range(capture.settings.buffer + 5)]
    assert offered.count(False) >= 5
    dropped = capture.metrics.dropped.labels(kind="step", reason="buffer_full")._value.get()
    assert dropped == offered.count(False)
    release.set()
    assert capture.flush(30.0)


def _module(monkeypatch: pytest.MonkeyPatch, name: str, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # type: ignore[attr-defined]
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


class LlamaForCausalLMEagle3:
    """SGLang's EAGLE-3 draft model class, by name: what draft: reads look for."""


def _draft_worker(version: str) -> SimpleNamespace:
    """A scheduler's draft worker holding an EAGLE-3 draft runner (V2 layout, both
    releases); the 0.5.23 runner reads weights through its weight_exporter."""
    read = SimpleNamespace(get_weights_by_name=lambda name, truncate: [name, truncate])
    runner = SimpleNamespace(model=LlamaForCausalLMEagle3())
    if version == "0.5.23":
        runner.weight_exporter = read
    else:
        runner.get_weights_by_name = read.get_weights_by_name
    return SimpleNamespace(draft_worker=SimpleNamespace(draft_runner=runner))


def _sglang_modules(monkeypatch: pytest.MonkeyPatch, version: str) -> dict[str, Any]:
    """Modules shaped like the release's own at the hooked paths, with greedy chain
    verification; returns the objects a test drives."""
    for package in ("sglang", "sglang.srt", "sglang.srt.plugins", "sglang.srt.speculative",
                    "sglang.srt.managers", "sglang.srt.managers.scheduler_components",
                    "sglang.srt.entrypoints"):  # fmt: skip
        _module(monkeypatch, package)

    def greedy_sample(verify_input, batch, logits_output):  # type: ignore[no-untyped-def]
        accept_index, emitted = greedy_chain_verify(
            verify_input.draft_token.reshape(-1, N), logits_output.next_token_logits
        )
        for req, tokens in zip(batch.reqs, emitted, strict=True):
            req.output_ids += tokens
        return torch.zeros(1), torch.tensor([len(t) for t in emitted]), accept_index

    class GetWeightsByNameReqOutput:
        def __init__(self, *, parameter: Any) -> None:  # msgspec kw_only in 0.5.23
            self.parameter = parameter

    _module(monkeypatch, "sglang.srt.managers.io_struct",
            GetWeightsByNameReqOutput=GetWeightsByNameReqOutput)  # fmt: skip
    _module(monkeypatch, "sglang.srt.entrypoints.http_server",
            _setup_and_run_http_server=lambda server_args, *a: "served")  # fmt: skip

    class VerifyInput:
        def __init__(self, draft_token: torch.Tensor) -> None:
            self.draft_token, self.draft_token_num = draft_token, N
            self.retrieve_next_token = torch.tensor([[1, 2, 3, -1]])

    if version == "0.5.23":

        def eagle_sample(verify_input, batch, logits_output, grammar_mask=None, uno=None):  # type: ignore[no-untyped-def]
            return greedy_sample(verify_input, batch, logits_output)

        eagle_utils = _module(monkeypatch, "sglang.srt.speculative.eagle_utils",
                              eagle_sample=eagle_sample)  # fmt: skip
        # imported `from eagle_utils import eagle_sample` before the hooks are applied,
        # as SGLang's ngram worker does: HookRegistry must rebind this copy too
        ngram_worker = _module(monkeypatch, "sglang.srt.speculative.ngram_worker",
                               eagle_sample=eagle_utils.eagle_sample)  # fmt: skip

        class SchedulerOutputStreamer:
            def _stream_output_generation(
                self, reqs, return_logprob, skip_req=None, is_idle_batch=False
            ):  # type: ignore[no-untyped-def]
                return "streamed"

        class SchedulerWeightUpdaterManager:
            draft_worker: Any = None

            def get_weights_by_name(self, recv_req):  # type: ignore[no-untyped-def]
                return SimpleNamespace(parameter="target")

        _module(monkeypatch, "sglang.srt.managers.scheduler_components.output_streamer",
                SchedulerOutputStreamer=SchedulerOutputStreamer)  # fmt: skip
        _module(monkeypatch, "sglang.srt.managers.scheduler_components.weight_updater",
                SchedulerWeightUpdaterManager=SchedulerWeightUpdaterManager)  # fmt: skip
        return {
            "verify": lambda verify_input, batch, output: ngram_worker.eagle_sample(
                verify_input, batch, output, None
            ),
            "stream": lambda reqs: SchedulerOutputStreamer()._stream_output_generation(reqs, False),
            "weights": SchedulerWeightUpdaterManager(),
            "VerifyInput": VerifyInput,
        }

    class EagleVerifyInputV2Mixin:
        def sample(self, batch, logits_output, vocab_mask=None):  # type: ignore[no-untyped-def]
            return greedy_sample(self, batch, logits_output)

    class EagleVerifyInput(EagleVerifyInputV2Mixin):
        def __init__(self, draft_token: torch.Tensor) -> None:
            self.draft_token, self.draft_token_num = draft_token, N
            self.retrieve_next_token = torch.tensor([[1, 2, 3, -1]])

        def verify(self, batch, logits_output, allocator, page_size, vocab_mask=None):  # type: ignore[no-untyped-def]
            raise AssertionError("V1 is not used in this test")

    class SchedulerOutputProcessorMixin:
        def stream_output_generation(
            self, reqs, return_logprob, skip_req=None, is_idle_batch=False
        ):  # type: ignore[no-untyped-def]
            return "streamed"

    class SchedulerUpdateWeightsMixin:
        def get_weights_by_name(self, recv_req):  # type: ignore[no-untyped-def]
            return SimpleNamespace(parameter="target")

    class Scheduler(SchedulerOutputProcessorMixin, SchedulerUpdateWeightsMixin):
        draft_worker: Any = None

    _module(monkeypatch, "sglang.srt.speculative.eagle_info", EagleVerifyInput=EagleVerifyInput)
    _module(monkeypatch, "sglang.srt.speculative.eagle_info_v2",
            EagleVerifyInputV2Mixin=EagleVerifyInputV2Mixin)  # fmt: skip
    _module(monkeypatch, "sglang.srt.managers.scheduler_output_processor_mixin",
            SchedulerOutputProcessorMixin=SchedulerOutputProcessorMixin)  # fmt: skip
    _module(monkeypatch, "sglang.srt.managers.scheduler_update_weights_mixin",
            SchedulerUpdateWeightsMixin=SchedulerUpdateWeightsMixin)  # fmt: skip
    scheduler = Scheduler()
    return {
        "verify": lambda verify_input, batch, output: verify_input.sample(batch, output, None),
        "stream": lambda reqs: scheduler.stream_output_generation(reqs, False),
        "weights": scheduler,
        "VerifyInput": EagleVerifyInput,
    }


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_register_with_sglangs_real_hook_registry_patches_the_release_targets(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis, version: str
) -> None:
    # given SGLang's real HookRegistry (from the release's wheel) and modules shaped like its own
    source = sglang_source(version) / "sglang"
    sglang = _sglang_modules(monkeypatch, version)
    spec = importlib.util.spec_from_file_location(
        "sglang.srt.plugins.hook_registry", source / "srt/plugins/hook_registry.py"
    )
    assert spec is not None and spec.loader is not None
    registry = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", registry)
    spec.loader.exec_module(registry)
    for name, value in {"AURORA_REDIS_URL": redis_url, "AURORA_SPECULATOR": "prod/llama",
                        "AURORA_SERVER_ID": "pod-9", "AURORA_SGLANG_WATCH": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("aurora.runtime.sglang.installed_version", lambda: version)
    monkeypatch.setattr(plugin, "_emits", True)
    registry.HookRegistry.reset()
    try:
        # when SGLang's load_plugins runs our entry point and applies the hooks
        plugin.register()
        registry.HookRegistry.apply_hooks()
        assert set(registry.HookRegistry._patched) == set(plugin.HOOKS[version])
        # then a verification and a completion through the patched code publish a trace
        req = Req("z", [7, 8], first=9)
        assert sglang["stream"]([req]) == "streamed"
        logits = torch.zeros(N, VOCAB)
        logits[0, 1] = logits[1, 2] = logits[2, 5] = 10.0  # accepts 1 and 2, corrects to 5
        batch = SimpleNamespace(forward_mode=SimpleNamespace(is_idle=lambda: False), reqs=[req])
        verify_input = sglang["VerifyInput"](torch.tensor([9, 1, 2, 3]))
        sglang["verify"](verify_input, batch, SimpleNamespace(next_token_logits=logits))
        req.done = True
        sglang["stream"]([req])
        assert plugin._capture is not None and plugin._capture.flush(30.0)
        ((_, record),) = decode_entries(redis_client.xrange(KEYS.traces))[0]
        assert (record.output_ids, record.server) == ([9, 1, 2, 5], "pod-9")
        assert [(s.proposed, s.accepted) for s in record.steps] == [([1, 2, 3], 2)]
        # and draft: names are read from the EAGLE-3 draft model, others from the target
        weights = sglang["weights"]
        ask = SimpleNamespace(name="draft:model.fc.weight", truncate_size=2)
        assert weights.get_weights_by_name(ask).parameter is None  # no draft (e.g. NGRAM)
        weights.draft_worker = _draft_worker(version)
        assert weights.get_weights_by_name(ask).parameter == ["model.fc.weight", 2]
        target = SimpleNamespace(name="lm_head.weight", truncate_size=2)
        assert weights.get_weights_by_name(target).parameter == "target"
    finally:
        registry.HookRegistry.reset()
        plugin._capture = plugin._settings = None


def test_a_request_running_across_a_draft_swap_gives_no_stats_and_no_trace(
    capture: plugin.TraceCapture, redis_client: redis.Redis
) -> None:
    # given one request that streams before the swap and one that starts after it
    before, after = Req("old", [1, 2], first=3), Req("new", [4, 5], first=6)
    plugin.after_stream_output(None, object(), [before], False)
    plugin.note_draft_loaded()  # what load_draft_only does in the scheduler process
    plugin.after_stream_output(None, object(), [after], False)
    before.done = after.done = True
    plugin.after_stream_output(None, object(), [before, after], False)
    assert capture.flush(30.0)
    # then only the request served wholly by the new draft is measured and traced
    good, _ = decode_entries(redis_client.xrange(KEYS.traces))
    assert [record.prompt_ids for _, record in good] == [[4, 5]]
    assert len(read_stats(redis_client, KEYS)) == 1
    swapped = capture.metrics.dropped.labels(kind="stats", reason="swapped")._value.get()
    assert swapped == 1


def test_a_prompt_still_prefilling_in_chunks_is_not_stamped_as_streaming(
    capture: plugin.TraceCapture,
) -> None:
    # SGLang passes the chunked-prefill request as skip_req: it streams nothing yet, so
    # its first token (the start of its decode time) has not happened
    chunked, running = Req("chunked", [1, 2], first=3), Req("running", [4], first=5)
    plugin.after_stream_output(None, object(), [chunked, running], False, chunked)
    assert not hasattr(chunked, "_aurora_first") and hasattr(running, "_aurora_first")
    plugin.after_stream_output(None, object(), [chunked], False, skip_req=None)
    assert hasattr(chunked, "_aurora_first")
