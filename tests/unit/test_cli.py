import subprocess
import sys

import pytest

from aurora.cli import COMMANDS, build_parser, main

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
    assert "Requests per arm before deciding. (default: 12)" in out  # local's own default
