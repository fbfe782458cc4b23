"""Tensor parallelism >= 2: a weight push reaches every rank.

SGLang's HTTP server process receives ``serialized_named_tensors`` and forwards it to its
scheduler processes (children it spawned, so they share its multiprocessing authkey);
each rank deserializes only its own entry. Torch pickles a CPU tensor as a file
descriptor the first receiver takes from the sender, so a payload shared by two ranks
fails on the second (EOFError). Here the pusher's real push runs against a stand-in
server whose update endpoint hands the entries to two spawned processes, each reading
its own with SGLang's real MultiprocessingSerializer (from each supported wheel)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.multiprocessing
from sglang_ranks import digest, load_rank, serializer
from sglang_support import VOCAB, save_revision, sglang_source

from aurora.runtime.checkpoint import load_checkpoint
from aurora.runtime.sglang import SUPPORTED_VERSIONS
from aurora.runtime.sglang.export import draft_config_of, to_sglang
from aurora.runtime.sglang.weights import DraftPusher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TP = 2


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_each_tensor_parallel_rank_deserializes_its_own_payload(
    tmp_path: Path, version: str
) -> None:
    common = str(sglang_source(version) / "sglang/srt/utils/common.py")
    revision = save_revision(tmp_path, "r00000009-000000", seed=9)
    tensors, meta = load_checkpoint(revision)
    pushed = to_sglang(tensors, draft_config_of(meta), torch.bfloat16)
    ranks: list[dict[str, str] | str] = []
    context = torch.multiprocessing.get_context("spawn")

    def sglang(request: httpx.Request) -> httpx.Response:
        body: dict[str, Any] = json.loads(request.content or b"{}")
        if request.url.path == "/update_weights_from_tensor":
            payloads = body["serialized_named_tensors"]
            with context.Pool(TP) as pool:  # the scheduler processes, one per rank
                ranks.extend(
                    pool.starmap(load_rank, [(common, payloads, rank) for rank in range(TP)])
                )
            failed = [r for r in ranks if isinstance(r, str)]
            if failed:
                return httpx.Response(400, json={"success": False, "message": failed[0]})
        if request.url.path == "/get_weights_by_name":
            name = body["name"].removeprefix("draft:").removeprefix("model.")
            return httpx.Response(200, json=pushed[name][: body["truncate_size"]].float().tolist())
        return httpx.Response(200, json={"success": True, "message": "ok"})

    pusher = DraftPusher(
        httpx.Client(base_url="http://sglang", transport=httpx.MockTransport(sglang)),
        version=version,
        tp_size=TP,
        served_d2t=VOCAB,
        serialize=lambda named: serializer(common).serialize(named, output_str=True),
    )
    # when the revision is pushed to a server with two tensor-parallel ranks
    result = pusher.push(revision)
    # then both ranks read every tensor, bit for bit what was pushed
    assert result.revision == "r00000009-000000"
    expected = {name: digest(tensor) for name, tensor in pushed.items()}
    assert ranks == [expected] * TP
