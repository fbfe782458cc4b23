import argparse
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from aurora.cli import COMMANDS, build_parser, main
from aurora.runtime.protocol import Builtin

pytestmark = pytest.mark.unit


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    names = [a for a in parser._subparsers._group_actions[0].choices]  # type: ignore[union-attr]
    assert len(names) == len(COMMANDS)
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: aurora" in capsys.readouterr().out


def test_help_does_not_import_torch() -> None:
    # The operator image has no torch: the CLI must start without it.
    code = "import sys; from aurora.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def _options(*command: str) -> set[str]:
    parser = build_parser()
    for name in command:
        parser = next(
            a.choices[name]
            for a in parser._actions
            if isinstance(a, argparse._SubParsersAction)  # type: ignore[attr-defined]
        )
    return {flag for action in parser._actions for flag in action.option_strings}


def test_generated_flags_keep_their_names() -> None:
    assert {
        *("--model", "--schedule", "--shift-after-promotions", "--max-batch", "--seed"),
        *("--distinct-prompts", "--minutes", "--redis-url", "--servers", "--clients"),
        *("--max-new-tokens", "--spec-tokens", "--initial-draft", "--min-speedup"),
        *("--min-samples", "--workdir", "--report-dir", "--no-live"),
    } <= _options("local")
    shared = {"--model", "--domain", "--prompts", "--max-new-tokens", "--spec-tokens"}
    assert shared | {"--seed", "--threads", "--json", "--draft", "--heldout"} <= _options(
        "bench", "decode"
    )
    assert shared | {"--seed", "--threads", "--json", "--batch", "--repeats"} <= _options(
        "bench", "batch"
    )


def test_flags_left_out_give_each_configs_declared_defaults() -> None:
    from aurora.commands.local import local_config
    from aurora.runtime.bench_config import BatchBenchConfig, DecodeBenchConfig
    from aurora.runtime.chaos import ChaosConfig
    from aurora.runtime.local.config import LocalConfig
    from aurora.runtime.options import add_options, from_args

    assert local_config(build_parser().parse_args(["local"])) == LocalConfig()
    decode = build_parser().parse_args(["bench", "decode"])
    assert from_args(DecodeBenchConfig, decode) == DecodeBenchConfig()
    batch = build_parser().parse_args(["bench", "batch"])
    assert from_args(BatchBenchConfig, batch) == BatchBenchConfig()
    chaos = argparse.ArgumentParser()
    add_options(chaos, ChaosConfig)
    assert from_args(ChaosConfig, chaos.parse_args([])) == ChaosConfig()


def test_local_flags_reach_the_config() -> None:
    from aurora.commands.local import local_config

    args = build_parser().parse_args(
        [
            *("local", "--max-batch", "2", "--distinct-prompts", "0", "--no-live"),
            *("--initial-draft", "ngram", "--min-speedup", "1.2", "--shift-after-promotions", "0"),
        ]
    )
    config = local_config(args)
    assert (config.server_max_batch, config.distinct_prompts, config.live) == (2, 0, False)
    assert config.initial_draft is Builtin.NGRAM and config.rollout.min_speedup == Decimal("1.2")
    assert config.shift_after_promotions == 0


def test_bench_batch_takes_repeated_batch_sizes() -> None:
    from aurora.runtime.bench_config import BatchBenchConfig
    from aurora.runtime.options import from_args

    args = build_parser().parse_args(["bench", "batch", "--batch", "4", "--batch", "1"])
    assert from_args(BatchBenchConfig, args).batch == (1, 4)


def test_local_rollout_flags_come_from_the_policy_and_refuse_what_the_crd_refuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The CRD refuses minSpeedup below 1.0; `aurora local` refuses it too, before starting.
    assert main(["local", "--min-speedup", "0.9", "--no-live"]) == 2
    err = capsys.readouterr().err
    assert "--min-speedup must be at least 1.0" in err
    with pytest.raises(SystemExit):
        main(["local", "--help"])
    out = capsys.readouterr().out
    assert "--regression-threshold" in out and "--min-samples" in out
    help_of_min_samples = out.split("--min-samples MIN_SAMPLES")[-1].split("--")[0]
    assert "(default: 12)" in help_of_min_samples  # local mode's own default


def test_local_modes_command_lines_parse_back_to_the_configs_it_means() -> None:
    from dataclasses import replace

    from aurora.runtime.local.config import LocalConfig
    from aurora.runtime.local.processes import server_config, trainer_args, trainer_config
    from aurora.runtime.options import from_args, to_args
    from aurora.runtime.server.config import ServerConfig
    from aurora.runtime.trainer.config import TrainerConfig

    # Given a local run's configuration with knobs away from the servers' and trainer's
    local = LocalConfig(initial_draft=Builtin.NGRAM, spec_tokens=2, server_max_batch=3, seed=5)
    url = "redis://127.0.0.1:6390/0"
    # When `aurora serve` and `aurora train` parse the command lines local mode spawns
    server = server_config(local, 1, 8123, url)
    served = from_args(ServerConfig, build_parser().parse_args(["serve", *to_args(server)]))
    trained = build_parser().parse_args(["train", *trainer_args(local, url)])
    # Then they run with exactly those configurations
    assert served == server
    assert (served.draft, served.max_batch, served.seed, served.port) == ("none", 3, 6, 8123)
    # (plain decoding: the ngram day-0 draft is canaried against it; trusted, it serves at once)
    ungated = local.rollout.model_copy(update={"gate_initial_draft": False})
    trusted = server_config(replace(local, rollout=ungated), 1, 8123, url)
    assert trusted.draft == "ngram"
    meant = trainer_config(local, url)
    assert replace(from_args(TrainerConfig, trained), consumer=meant.consumer) == meant
    assert trained.threads == local.trainer_threads


def test_the_chaos_runs_trainer_command_line_parses_with_the_real_cli(tmp_path: Path) -> None:
    from aurora.runtime.chaos import ChaosConfig, trainer_command
    from aurora.runtime.options import from_args
    from aurora.runtime.trainer.config import TrainerConfig

    command = trainer_command(ChaosConfig(workdir=tmp_path), "redis://127.0.0.1:6390/0", tmp_path)
    args = build_parser().parse_args(command[command.index("train") - 2 :])
    trainer = from_args(TrainerConfig, args)
    assert (trainer.draft_vocab, trainer.keep, trainer.checkpoint_dir) == (512, 1000000, tmp_path)
    assert (trainer.speculator, args.threads) == ("default/chaos-trainer", 1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--false-promotion-rate", "0.5"], "--false-promotion-rate must be above 0 and below 0.5"),
        (["--false-promotion-rate", "0"], "--false-promotion-rate must be above 0 and below 0.5"),
        (["--min-samples", "5"], "--min-samples must be at least 10"),
    ],
)
def test_local_refuses_a_gate_it_cannot_keep(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # An error rate outside (0, 0.5), or fewer samples than the confidence sequence needs,
    # is refused before anything starts, as the CRD refuses it.
    assert main(["local", *flags, "--no-live"]) == 2
    assert message in capsys.readouterr().err


def test_suffix_tokens_are_checked_where_they_are_given(capsys: pytest.CaptureFixture[str]) -> None:
    # `aurora serve` and `aurora bench decode` take the reach of suffix drafts, 0 to 64
    assert "--suffix-tokens" in _options("serve")
    assert {"--suffix-tokens", "--recurring"} <= _options("bench", "decode")
    assert main(["serve", "--suffix-tokens", "65"]) == 2
    assert "--suffix-tokens" in capsys.readouterr().err
    assert main(["bench", "decode", "--unseen", "--suffix-tokens", "-1"]) == 2
    assert "--suffix-tokens -1: use 0 to 64" in capsys.readouterr().err


def test_benchmark_progress_is_printed_as_lines_when_not_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from aurora.commands.bench import _progress

    out = io.StringIO()
    console = Console(file=out, width=200)  # not a terminal: a log file, CI
    with _progress(console, every_s=3600) as update:
        update("code prompt 1/8")
        update("code prompt 2/8")  # within the interval: not printed
    with _progress(console, every_s=0) as update:
        update("chat prompt 8/8")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("] code prompt 1/8") and lines[1].endswith("] chat prompt 8/8")


def test_bench_adapt_progress_is_printed_as_lines_when_not_on_a_terminal() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from aurora.commands.bench import _adapt_progress

    out = io.StringIO()
    console = Console(file=out, width=200)
    online = SimpleNamespace(served=[{"verify_steps": 4, "step_tokens": 10}])
    with _adapt_progress(console, rolling=8) as progress:
        progress("fit", {"stage": "generate", "done": 3, "total": 48})
        progress("seed", {"seed": 1})
        progress("request", {"index": 39, "shift": 24, "total": 88, "arms": {"online": online}})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the request line falls within 10 s of the fitting line
    assert lines[0].endswith("] fit static draft: generate 3/48")
    assert lines[1].endswith("] seed 1")
    out = io.StringIO()
    with _adapt_progress(Console(file=out, width=200), rolling=8) as progress:
        progress("request", {"index": 39, "shift": 24, "total": 88, "arms": {"online": online}})
    assert out.getvalue().rstrip().endswith("] request 40/88 after shift: online 2.50")
