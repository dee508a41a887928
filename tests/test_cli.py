"""sdctl as a user runs it: exit codes, errors on one line, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from client.cli.main import build_parser
from client.cli.servers import parse_duration
from tests.processes import free_port, process_env, sdctl_command


def sdctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sdctl_command(*args), capture_output=True, text=True, env=process_env(), timeout=60,
        check=False,
    )  # fmt: skip


def test_an_unreachable_scheduler_exits_3_with_one_line() -> None:
    result = sdctl("--scheduler", f"127.0.0.1:{free_port()}", "jobs")
    assert result.returncode == 3
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: scheduler 127.0.0.1:")
    assert "unreachable: connection refused" in line


def test_user_facing_commands_never_import_torch() -> None:
    probe = (
        "import sys\n"
        "from client.cli.main import run\n"
        f"code = run(['--scheduler', '127.0.0.1:{free_port()}', 'jobs', '-o', 'json'])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'sqlalchemy') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "3 []"


def test_bad_flags_exit_2() -> None:
    assert sdctl("submit", "p", "--steps", "many").returncode == 2
    assert sdctl("submit", "p", "--memory-mode", "half").returncode == 2
    result = sdctl("--scheduler", f"127.0.0.1:{free_port()}", "submit", "p", "--label", "nokey")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --label: expected KEY=VALUE, got 'nokey'"


def test_every_printing_command_takes_output() -> None:
    parser = build_parser()
    for command in ("submit", "watch", "jobs", "job", "images", "cancel", "nodes", "models"):
        args = [command] + (
            ["x"] if command in ("submit", "watch", "job", "images", "cancel") else []
        )
        assert parser.parse_args([*args, "-o", "json"]).output == "json"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400), ("2d", 172800), ("5", 5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_help_lists_the_commands() -> None:
    result = sdctl("--help")
    assert result.returncode == 0
    for command in ("submit", "watch", "jobs", "job", "images", "cancel", "nodes", "models", "up"):
        assert command in result.stdout
