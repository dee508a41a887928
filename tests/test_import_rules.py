"""The import rules in pyproject.toml hold (`make lint` runs them too), and
each exception in them is needed: without it, the rules fail naming the
import it allows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = (ROOT / "pyproject.toml").read_text()
EXCEPTIONS = sorted(
    set(re.findall(r'^\s*"(client\.cli\.(?:servers|admin) -> [\w.]+)",', CONFIG, re.M))
)


def lint_imports(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--config", str(config), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_the_rules_hold(tmp_path: Path) -> None:
    config = tmp_path / "rules.toml"
    config.write_text(CONFIG)
    result = lint_imports(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_only_sdctl_s_server_commands_are_excepted() -> None:
    assert EXCEPTIONS == [
        "client.cli.admin -> scheduler.admin",
        "client.cli.admin -> scheduler.config",
        "client.cli.servers -> gpu_node.agent",
        "client.cli.servers -> gpu_node.config",
        "client.cli.servers -> scheduler.config",
        "client.cli.servers -> scheduler.server",
    ]


@pytest.mark.parametrize("exception", EXCEPTIONS)
def test_without_an_exception_the_rules_fail(tmp_path: Path, exception: str) -> None:
    config = tmp_path / "rules.toml"
    config.write_text(
        "\n".join(line for line in CONFIG.splitlines() if f'"{exception}"' not in line)
    )
    result = lint_imports(config)
    assert result.returncode != 0
    assert exception in result.stdout
