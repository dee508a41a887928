"""The scheduler refuses to listen in a way that leaves its port open by
accident, and `sdctl up` (which runs without keys) stays on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.cli.main import run
from scheduler.config import SchedulerConfig, is_loopback
from scheduler.server import check_exposure


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("10.0.0.5", False),
        ("sched.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plain_text_off_loopback_needs_insecure(tmp_path: Path) -> None:
    exposed = SchedulerConfig(data_dir=tmp_path, host="0.0.0.0")
    with pytest.raises(ValueError, match="--tls-cert") as raised:
        check_exposure(exposed)
    assert "--insecure" in str(raised.value)
    check_exposure(SchedulerConfig(data_dir=tmp_path, host="0.0.0.0", insecure=True))
    check_exposure(SchedulerConfig(data_dir=tmp_path, host="127.0.0.1"))
    tls = SchedulerConfig(
        data_dir=tmp_path, host="0.0.0.0", tls_cert=tmp_path / "c", tls_key=tmp_path / "k"
    )
    check_exposure(tls)


def test_tls_flags_that_contradict_each_other_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        check_exposure(SchedulerConfig(data_dir=tmp_path, tls_cert=tmp_path / "c"))
    with pytest.raises(ValueError, match="needs --tls-cert"):
        check_exposure(SchedulerConfig(data_dir=tmp_path, client_ca=tmp_path / "ca"))


def test_sdctl_scheduler_refuses_plain_text_on_the_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(["scheduler", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host 0.0.0.0") and "--insecure" in err
    assert "\n" not in err


def test_sdctl_up_stays_on_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["up", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "runs without keys" in capsys.readouterr().err
