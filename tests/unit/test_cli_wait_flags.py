"""Every command that starts a job takes both --watch and --no-wait: install and upgrade return once accepted
unless told to follow, reset, stop, start and renew-certs follow unless told not to; both at once is a usage
error. (`lifecycle start --watch` after `lifecycle install --watch` was a usage error.)"""

from __future__ import annotations

import pytest

from lifecycle.cli_args import build_parser

FOLLOW_BY_DEFAULT = {"install": False, "upgrade": False, "reset": True, "stop": True, "start": True,
                     "renew-certs": True}


@pytest.mark.parametrize("command", sorted(FOLLOW_BY_DEFAULT))
def test_watch_and_no_wait_are_accepted_with_the_commands_default(command: str) -> None:
    parser = build_parser()
    extra = ["--version", "v1.32.1"] if command == "upgrade" else []
    assert parser.parse_args([command, *extra]).watch is FOLLOW_BY_DEFAULT[command]
    assert parser.parse_args([command, *extra, "--watch"]).watch is True
    assert parser.parse_args([command, *extra, "--no-wait"]).watch is False


def test_watch_with_no_wait_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["start", "--watch", "--no-wait"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
