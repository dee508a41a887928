"""`sdctl drain`, `undrain` and `health` against real processes, and a
client that follows the leader lease from a killed replica to its standby."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from client import Job
from harness.processes import LocalCluster, free_port, process_env, sdctl_command
from harness.waiting import until

pytestmark = pytest.mark.e2e

SLOW_STEPS = ("--simulate-gpus", "8GiB", "--simulate-step-delay", "0.2")  # 20 steps: about 4 s
JOB = ("--width", "64", "--height", "64", "--steps", "20", "--no-wait", "-o", "json")


def submitted(cluster: LocalCluster, *flags: str) -> str:
    result = cluster.sdctl("submit", "a lighthouse", *JOB, *flags)
    assert result.returncode == 0, result.stderr
    job_id: str = json.loads(result.stdout)["job_id"]
    return job_id


def job(cluster: LocalCluster, job_id: str) -> Job:
    with cluster.client() as client:
        return client.get_job(job_id)


def test_health_names_the_leader_and_the_unreachable(cluster: LocalCluster) -> None:
    cluster.wait_for(lambda c: c.list_jobs() == [], "the scheduler")
    dead = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        sdctl_command("--scheduler", f"{cluster.address},{dead}", "health", "-o", "json"),
        capture_output=True, text=True, env=process_env(), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    leader, unreachable = json.loads(result.stdout)
    assert (leader["address"], leader["role"], leader["reachable"]) == (
        cluster.address,
        "leader",
        True,
    )
    assert leader["epoch"] >= 1
    assert leader["replica_id"]
    assert leader["leader_address"] == cluster.address
    assert (unreachable["role"], unreachable["reachable"]) == ("unreachable", False)


def test_a_drained_node_finishes_its_job_and_takes_no_new_one(cluster: LocalCluster) -> None:
    cluster.start_agent("agent-a", *SLOW_STEPS)
    cluster.wait_for_nodes(1)
    running = submitted(cluster)
    until(lambda: job(cluster, running).state == "RUNNING", "the first job to run")

    drained = cluster.sdctl("drain", "agent-a", "--timeout", "60s")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.startswith("node agent-a draining: takes no new work; 1 running job")
    waiting = submitted(cluster)
    nodes = json.loads(cluster.sdctl("nodes", "-o", "json").stdout)
    assert [(n["name"], n["draining"]) for n in nodes] == [("agent-a", True)]

    ended = until(lambda: job(cluster, running), "the running job", done=lambda j: j.done)
    assert ended.state == "SUCCEEDED"
    queued = until(lambda: job(cluster, waiting), "a reason to wait", done=lambda j: j.reason != "")
    assert queued.state == "QUEUED", queued

    undrained = cluster.sdctl("undrain", "agent-a")
    assert undrained.returncode == 0, undrained.stderr
    assert undrained.stdout == "node agent-a takes work again\n"
    ran = until(lambda: job(cluster, waiting), "the waiting job", done=lambda j: j.done)
    assert ran.state == "SUCCEEDED"


def test_a_drain_timeout_hands_the_job_back_without_a_failure(cluster: LocalCluster) -> None:
    cluster.start_agent("agent-a", "--simulate-gpus", "8GiB", "--simulate-step-delay", "0.3")
    cluster.wait_for_nodes(1)
    job_id = submitted(cluster)
    until(lambda: job(cluster, job_id).state == "RUNNING", "the job to run")
    assert cluster.sdctl("drain", "agent-a", "--timeout", "1s").returncode == 0
    back = until(lambda: job(cluster, job_id), "the hand-back", done=lambda j: j.state == "QUEUED")
    assert (back.failures, back.attempt) == (0, 1)
    assert cluster.sdctl("undrain", "agent-a").returncode == 0
    final = until(lambda: job(cluster, job_id), "the job", done=lambda j: j.done, timeout=120)
    assert (final.state, final.failures, final.attempt) == ("SUCCEEDED", 0, 2)


def test_sdctl_submit_follows_the_lease_to_the_standby(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Two replicas on one database; the leader is killed mid-job, the standby
    takes the lease, the agent and `sdctl submit` move over to it."""
    [fixture_scheduler] = cluster.processes
    fixture_scheduler.stop()
    cluster.processes.remove(fixture_scheduler)
    database = cluster.db_url or f"sqlite:///{cluster.root / 'shared.db'}"
    common = ("--lease", "2s", "--db", database)
    first = cluster.start_scheduler(*common, name="replica-a")
    until(lambda: health(cluster.address)[0]["role"] == "leader", "replica a to lead")
    standby_address = f"127.0.0.1:{free_port()}"
    cluster.start_scheduler(
        *common, "--port", standby_address.rsplit(":", 1)[1],
        "--data-dir", str(cluster.root / "replica-b"), name="replica-b",
    )  # fmt: skip
    both = f"{cluster.address},{standby_address}"
    roles = until(lambda: [r["role"] for r in health(both)] == ["leader", "standby"], "a standby")
    assert roles
    # LocalCluster.start_agent gives the agent one address; this one gets both.
    cluster._spawn(
        "agent-a",
        ["--scheduler", both, "node", "--name", "agent-a",
         "--data-dir", str(cluster.root / "agent-a"), *SLOW_STEPS],
    )  # fmt: skip
    cluster.wait_for_nodes(1)

    with subprocess.Popen(
        sdctl_command("--scheduler", both, "submit", "a lighthouse", *JOB[:6],
                      "--output-dir", str(tmp_path / "out"), "-o", "json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env(),
    ) as submit:  # fmt: skip
        assert submit.stderr is not None
        for line in submit.stderr:
            if " RUNNING on " in line:
                break
        first.stop(signal.SIGKILL)
        out, err = submit.communicate(timeout=120)
    assert submit.returncode == 0, err
    assert json.loads(out)["state"] == "SUCCEEDED"
    after = health(both)
    assert [r["role"] for r in after] == ["unreachable", "leader"]
    assert after[1]["epoch"] > 1


def health(addresses: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        sdctl_command("--scheduler", addresses, "health", "-o", "json"),
        capture_output=True, text=True, env=process_env(), timeout=60, check=False,
    )  # fmt: skip
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows
