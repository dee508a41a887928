"""`sdctl drain`, `undrain`, `health` and what `nodes` shows of draining
nodes and unhealthy devices: flags, tables and JSON, against scripted
scheduler replicas (tests/test_client_retry.py) rather than the real one."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import UTC, datetime

import pytest
from rich.console import Console

from client import Device, Health, Node, ProgressEvent, StateEvent, UnavailableError
from client.cli import render
from client.cli.commands import Follower
from client.cli.main import build_parser, run
from tests.test_client_retry import STANDBY, FakeScheduler, nowhere, serving

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@contextmanager
def replicas(*servicers: FakeScheduler) -> Iterator[list[str]]:
    """Scripted replicas served from a loop of their own, so that sdctl can
    block on them from this thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = AsyncExitStack()

    async def start() -> list[str]:
        return [await stack.enter_async_context(serving(s)) for s in servicers]

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def device(index: int = 0, *, healthy: bool = True, detail: str = "", jobs: int = 0) -> Device:
    return Device(
        index=index,
        name="Simulated 8GiB",
        uuid=f"SIM-{index}",
        kind="simulated",
        total_bytes=8 * 2**30,
        free_bytes=6 * 2**30,
        used_bytes=2 * 2**30,
        utilization_percent=50.0,
        active_jobs=jobs,
        resident_models=[],
        speeds={},
        healthy=healthy,
        health_detail=detail,
    )


def node(name: str, devices: list[Device], *, draining: bool = False) -> Node:
    return Node(
        id=f"{name}-1a2b",
        name=name,
        hostname="host",
        connected=True,
        devices=devices,
        models=["tiny"],
        labels={},
        agent_version="0.1.0",
        last_seen=NOW,
        draining=draining,
    )


def test_the_new_flags_parse() -> None:
    parser = build_parser()
    drain = parser.parse_args(["drain", "gpu-1", "--timeout", "10m", "-o", "json"])
    assert (drain.command, drain.node, drain.timeout, drain.output) == (
        "drain",
        "gpu-1",
        600,
        "json",
    )
    assert parser.parse_args(["drain", "gpu-1"]).timeout is None
    assert parser.parse_args(["undrain", "gpu-1"]).node == "gpu-1"
    health = parser.parse_args(["--scheduler", "a:1,b:2", "--reconnect-timeout", "5s", "health"])
    assert (health.scheduler, health.reconnect_timeout, health.output) == ("a:1,b:2", 5, "table")
    assert parser.parse_args(["jobs"]).reconnect_timeout == 60


def test_health_asks_every_address_and_shows_the_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = nowhere()
    with replicas(FakeScheduler("a"), FakeScheduler("b", standby=True)) as (leader, standby):
        code = run(["--scheduler", f"{leader},{standby},{dead}", "health", "-o", "json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["address"], r["role"], r["reachable"]) for r in rows] == [
        (leader, "leader", True),
        (standby, "standby", True),
        (dead, "unreachable", False),
    ]
    assert rows[0] == {
        "address": leader,
        "reachable": True,
        "role": "leader",
        "epoch": 7,
        "replica_id": "a",
        "leader_address": None,
        "version": "0.1.0",
        "error": None,
    }
    assert rows[2]["error"] == f"scheduler {dead} unreachable: connection refused"


def test_health_without_a_leader_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    dead = nowhere()
    with replicas(FakeScheduler("b", standby=True)) as (standby,):
        code = run(["--scheduler", f"{standby},{dead}", "health"])
    assert code == UnavailableError.exit_code == 3
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["ADDRESS", "ROLE", "EPOCH", "REPLICA", "LEADER", "ERROR"]
    assert [line.split() for line in lines[2:]] == [
        [standby, "standby", "7", "b", "-"],
        [dead, "unreachable", "-", "-", "-", "connection", "refused"],  # and why
    ]
    assert err == f"error: no leader among {standby}, {dead}\n"


def test_sdctl_says_once_that_it_waits_for_a_scheduler(capsys: pytest.CaptureFixture[str]) -> None:
    with replicas(FakeScheduler("b", standby=True)) as (standby,):
        code = run(["--scheduler", standby, "--reconnect-timeout", "0.5", "jobs"])
    assert code == 3
    gone = f"scheduler {standby} unreachable: {STANDBY}"
    note, error = capsys.readouterr().err.splitlines()
    assert note == f"{gone}; retrying for up to 0.5s"
    assert error.startswith(f"error: {gone} (retried for 0.")


def test_drain_and_undrain_say_what_happened(capsys: pytest.CaptureFixture[str]) -> None:
    servicer = FakeScheduler()
    with replicas(servicer) as (address,):
        assert run(["--scheduler", address, "drain", "gpu-1", "--timeout", "90s"]) == 0
        assert run(["--scheduler", address, "undrain", "gpu-1", "-o", "json"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first == "node gpu-1 draining: takes no new work, nothing running"
    assert json.loads(rest)["draining"] is False
    drained, undrained = servicer.requests["DrainNode"]
    assert (drained.node, drained.timeout_seconds, drained.undo) == ("gpu-1", 90.0, False)
    assert undrained.undo


def test_drained_lines() -> None:
    busy = node("gpu-1", [device(0, jobs=2), device(1, jobs=1)], draining=True)
    assert render.drained_line(busy, 600) == (
        "node gpu-1 draining: takes no new work; 3 running jobs finish within 600s "
        "or go back to the queue"
    )
    one = node("gpu-1", [device(0, jobs=1)], draining=True)
    assert render.drained_line(one, None).endswith(
        "1 running job finish within the agent's shutdown timeout or go back to the queue"
    )
    assert render.drained_line(node("gpu-1", []), None) == "node gpu-1 takes work again"


def test_nodes_show_draining_and_unhealthy_devices(capsys: pytest.CaptureFixture[str]) -> None:
    nodes = [
        node("gpu-1", [device(0), device(1, healthy=False, detail="missed its progress deadline")], draining=True),
        node("gpu-2", [device(0)]),
    ]  # fmt: skip
    render.nodes_table(nodes)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["NAME", "ID", "STATUS", "DEVICE", "HEALTH", "FREE/TOTAL"]
    assert "Ready,Draining" in lines[2]
    assert " ok " in lines[2]
    assert "Ready,Draining" in lines[3]
    assert "unhealthy: missed its progress deadline" in lines[3]
    assert "Ready " in lines[4]
    assert "Draining" not in lines[4]

    shown = render.node_json(nodes[0])
    assert shown["draining"] is True
    assert [(d["healthy"], d["health_detail"]) for d in shown["devices"]] == [
        (True, ""),
        (False, "missed its progress deadline"),
    ]


def test_health_rows_render_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    leader = Health("a:1", "leader", 4, "replica-a", "a:1", "0.1.0")
    rows = [
        render.HealthRow("a:1", leader),
        render.HealthRow("b:2", None, "scheduler b:2: method not implemented"),
        render.HealthRow("c:3", None, "scheduler c:3 unreachable: timeout", reachable=False),
    ]
    render.health_table(rows)
    table = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert table == [
        ["a:1", "leader", "4", "replica-a", "a:1"],
        ["b:2", "error", "-", "-", "-", "method", "not", "implemented"],
        ["c:3", "unreachable", "-", "-", "-", "timeout"],
    ]
    assert [render.health_json(row)["role"] for row in rows] == ["leader", "error", "unreachable"]
    assert render.health_json(rows[1])["reachable"] is True


def test_the_follower_says_when_it_lost_the_scheduler_and_when_it_is_back() -> None:
    out = io.StringIO()
    follower = Follower("j1", Console(file=out, highlight=False))
    lost = UnavailableError("scheduler a:1 unreachable: connection refused")

    def events() -> Iterator[StateEvent | ProgressEvent]:
        yield StateEvent("j1", 3, 1, NOW, "RUNNING", "", "n1", "gpu-1", 0)
        follower.reconnecting("a:1", lost)
        follower.reconnecting("a:1", lost)  # a second failed try says nothing new
        yield ProgressEvent("j1", 0, 1, NOW, 3, 4)
        yield StateEvent("j1", 4, 1, NOW, "SUCCEEDED", "", "n1", "gpu-1", 0)

    assert follower.follow(events()).state == "SUCCEEDED"
    assert out.getvalue().splitlines() == [
        "j1 RUNNING on gpu-1 gpu 0 (attempt 1)",
        "j1 lost the scheduler (scheduler a:1 unreachable: connection refused); "
        "reconnecting to the scheduler…",
        "j1 reconnected to the scheduler",
        "j1 SUCCEEDED",
    ]


@pytest.mark.timeout(60)  # without the fix, the second call waits for ever
def test_an_on_retry_that_exits_reaches_the_caller_and_the_client_still_closes() -> None:
    """rich raises SystemExit from a print to a closed pipe; from an
    on_retry callback that runs on the client's loop. It must reach the
    caller, and leave the loop able to close, not end the loop's thread
    with every later call waiting for ever."""
    from client import Client

    def exits(address: str, error: Exception) -> None:
        raise SystemExit(1)

    with replicas(FakeScheduler("b", standby=True)) as (standby,):
        client = Client(standby, reconnect_timeout=5, on_retry=exits)
        for call in (client.list_jobs, lambda: list(client.watch("j1"))):
            with pytest.raises(SystemExit):
                call()
        client.close()
