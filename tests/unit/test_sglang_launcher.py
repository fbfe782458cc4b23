"""The SGLang launcher's command-line half: the operator's command, SGLang's flags for
each launch, and which launch a revision needs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from sglang_support import save_revision

from aurora.runtime.protocol import Builtin, RevisionRef
from aurora.runtime.rollout import RolloutPolicy
from aurora.runtime.sglang.export import export_revision
from aurora.runtime.sglang.launcher import (
    DRAFT_LOADER,
    Launch,
    Speculation,
    initial_launch,
    launch_for,
    running_launch,
    server_command,
    sglang_command,
)

pytestmark = pytest.mark.unit

SPECULATION = Speculation(num_steps=3, eagle_topk=4, num_draft_tokens=8)
BASE = ["--model-path", "m", "--port", "8000", "--mem-fraction-static", "0.85"]


def test_the_operator_command_runs_the_launcher_and_keeps_the_users_args_last() -> None:
    spec = SimpleNamespace(
        target=SimpleNamespace(model="meta/llama", served_name="llama"),
        draft=SimpleNamespace(initial="scratch"),
        engine=SimpleNamespace(tensor_parallel=2, speculative_steps=3, speculative_eagle_topk=4,
                               num_draft_tokens=8, extra_args=["--speculative-num-steps", "5"]),
        rollout=RolloutPolicy(),
    )  # fmt: skip
    command = server_command(spec, port=9000)
    assert command[:5] == [
        "python3",
        "-m",
        "aurora.runtime.sglang.serve",
        "--initial",
        "scratch",
    ]
    sglang = command[command.index("--") + 1 :]
    assert sglang[:6] == [
        "--model-path",
        "meta/llama",
        "--served-model-name",
        "llama",
        "--host",
        "0.0.0.0",
    ]
    assert sglang[-2:] == ["--speculative-num-steps", "5"]  # extraArgs win over ours


@pytest.mark.parametrize(
    ("launch", "flags"),
    [
        (Launch(Builtin.NONE), []),
        (Launch(Builtin.NGRAM, "NGRAM"),
         ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8"]),
        (Launch("r1", "EAGLE3", "/d/r1"),
         ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "/d/r1",
          "--speculative-num-steps", "3", "--speculative-eagle-topk", "4",
          "--speculative-num-draft-tokens", "8", "--custom-weight-loader", DRAFT_LOADER]),
    ],
    ids=["no-draft", "ngram", "eagle3"],
)  # fmt: skip
def test_sglang_gets_the_launch_flags_first_and_the_given_args_after(
    launch: Launch, flags: list[str]
) -> None:
    command = sglang_command(launch, SPECULATION, BASE, python="py")
    assert command == ["py", "-m", "sglang.launch_server", *flags, *BASE]


def test_the_initial_draft_maps_to_a_launch(tmp_path: Path) -> None:
    assert initial_launch("scratch") == Launch(Builtin.NONE)  # day 0: no speculation
    assert initial_launch("ngram") == Launch(Builtin.NGRAM, "NGRAM")
    # suffix decoding has no SGLang engine path: its model-free counterpart, NGRAM, serves it
    assert initial_launch("suffix") == Launch(Builtin.NGRAM, "NGRAM")
    export_revision(save_revision(tmp_path / "c", "r00000001-abcdef"), tmp_path / "d")
    assert initial_launch(str(tmp_path / "d")) == Launch(
        "r00000001-abcdef", "EAGLE3", str(tmp_path / "d")
    )
    assert initial_launch("/specforge/draft") == Launch("", "EAGLE3", "/specforge/draft")
    with pytest.raises(ValueError, match=r"draft\.initial 'relative/path'"):
        initial_launch("relative/path")


def test_a_desired_revision_maps_to_a_launch() -> None:
    exported: list[str] = []

    def draft_dir(ref: RevisionRef) -> Path:
        exported.append(ref.revision)
        return Path("/tmp/drafts") / ref.revision

    initial = Launch(Builtin.NGRAM, "NGRAM")
    assert launch_for(None, initial, draft_dir) is initial
    assert launch_for(RevisionRef(revision="none", path=""), initial, draft_dir) == Launch("none")
    # an untrained head is not served on SGLang: scratch runs without speculation
    assert launch_for(RevisionRef(revision="scratch", path=""), initial, draft_dir) == Launch(
        "none"
    )
    assert launch_for(RevisionRef(revision="ngram", path=""), initial, draft_dir) == initial
    assert launch_for(RevisionRef(revision="r7", path="/c/r7"), initial, draft_dir) == Launch(
        "r7", "EAGLE3", "/tmp/drafts/r7"
    )
    assert exported == ["r7"]


@pytest.mark.parametrize(("gate", "initial"), [(True, "none"), (False, "suffix")])
def test_a_gated_day0_suffix_draft_starts_sglang_without_speculation(
    gate: bool, initial: str
) -> None:
    # Given draft.initial suffix: gated, the stable replicas start without speculation and
    # the canary replicas load it (NGRAM) while it is canaried; ungated, every replica does
    spec = SimpleNamespace(
        target=SimpleNamespace(model="m", served_name=None),
        draft=SimpleNamespace(initial="suffix"),
        engine=SimpleNamespace(tensor_parallel=1, speculative_steps=3, speculative_eagle_topk=1,
                               num_draft_tokens=4, extra_args=[]),
        rollout=RolloutPolicy(gate_initial_draft=gate),
    )  # fmt: skip
    command = server_command(spec)
    assert command[command.index("--initial") + 1] == initial
    assert initial_launch(initial).algorithm == (None if gate else "NGRAM")
    assert launch_for(RevisionRef(revision="suffix", path=""), initial_launch("none"), Path) == (
        Launch("ngram", "NGRAM")
    )


def test_a_running_server_s_launch_is_read_from_its_server_args() -> None:
    def args(algorithm: str | None, path: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(speculative_algorithm=algorithm, speculative_draft_model_path=path)

    assert running_launch(args(None)) == Launch("none")
    assert running_launch(args("NGRAM")) == Launch("ngram", "NGRAM")
    assert running_launch(args("eagle3", "/nowhere")) == Launch("", "EAGLE3", "/nowhere")
