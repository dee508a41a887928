"""The chaos suite: real processes, one fault each, on SQLite and
PostgreSQL. Every scenario ends with the ledger's three checks: nothing
lost, one terminal event per watcher, nothing duplicated. Faults fire on
observed conditions (a step reported, a job re-queued), not after sleeps."""

from __future__ import annotations

import io
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from client import Job
from harness.pgserver import ThrowawayPostgres
from harness.pgserver import available as postgres_available
from harness.processes import LocalCluster, Process
from tests.chaos import netns
from tests.chaos.conftest import AGENT_ARGS, Chaos
from tests.chaos.ledger import Ledger, wait_until


def running_on(ledger: Ledger, job_id: str) -> str:
    """Waits for the job to report a step; returns its node's name."""
    assert ledger.progressed[job_id].wait(90), f"job {job_id} never reported a step"
    job = ledger.job(job_id)
    return str(job.node_name)


def agent_named(cluster: LocalCluster, name: str) -> Process:
    return next(p for p in reversed(cluster.processes) if p.name == name and p.alive)


def images(cluster: LocalCluster) -> list[Path]:
    return [cluster.root / "images", cluster.root / "scheduler" / "images"]


def one_job_on_two_agents(
    chaos: Chaos, job: dict[str, Any] | None = None, **options: object
) -> tuple[LocalCluster, Ledger, str]:
    """A scheduler, two agents and one job (`job`: its submit options)."""
    cluster, ledger = chaos(**options)
    cluster.start_scheduler()
    for name in ("agent-a", "agent-b"):
        cluster.start_agent(name, *AGENT_ARGS)
    cluster.wait_for_nodes(2)
    return cluster, ledger, ledger.submit(**(job or {}))


def kill_its_node_and_check_it_completes_on_another(
    cluster: LocalCluster, ledger: Ledger, job_id: str
) -> Job:
    victim = running_on(ledger, job_id)
    agent_named(cluster, victim).kill()
    ledger.check(images(cluster))
    job = ledger.job(job_id)
    assert job.state == "SUCCEEDED"
    assert job.node_name != victim
    assert job.attempts[0].outcome == "lost"
    return job


def test_a_killed_agent_s_job_completes_on_another(chaos: Chaos) -> None:
    cluster, ledger, job_id = one_job_on_two_agents(chaos)
    kill_its_node_and_check_it_completes_on_another(cluster, ledger, job_id)


def test_with_everything_on_a_killed_agent_s_job_completes_on_another(chaos: Chaos) -> None:
    """TLS with client certificates, API keys and enrolled agents: the
    agent that dials back after a kill is still the same enrolled node."""
    cluster, ledger, job_id = one_job_on_two_agents(chaos, secure=True)
    victim = running_on(ledger, job_id)
    killed = agent_named(cluster, victim)
    killed.kill()
    ledger.check(images(cluster))
    job = ledger.job(job_id)
    assert job.state == "SUCCEEDED"
    assert job.node_name != victim
    assert job.attempts[0].outcome == "lost"
    # Restarted from its data dir, it reconnects with its own credential.
    cluster.processes.remove(killed)
    cluster.start_agent(victim, *AGENT_ARGS)
    cluster.wait_for_nodes(2)


def test_a_paused_agent_s_late_result_is_refused(chaos: Chaos) -> None:
    cluster, ledger, job_id = one_job_on_two_agents(chaos)
    victim = agent_named(cluster, running_on(ledger, job_id))
    victim.send(signal.SIGSTOP)
    wait_until(lambda: ledger.job(job_id).attempt >= 2, "the job to move on")
    victim.send(signal.SIGCONT)  # it wakes holding the old attempt and its result
    ledger.check(images(cluster))
    job = ledger.job(job_id)
    assert job.state == "SUCCEEDED"
    assert job.attempts[0].reason.startswith(f"node {victim.name} lost: no heartbeat")
    wait_until(lambda: "stale attempt" in victim.log.read_text(), "the agent to be told")


def test_clients_streams_finish_across_a_killed_scheduler(chaos: Chaos) -> None:
    cluster, ledger = chaos()
    scheduler = cluster.start_scheduler()
    cluster.start_agent("agent-a", *AGENT_ARGS)
    cluster.wait_for_nodes(1)
    jobs = [ledger.submit(f"job {i}") for i in range(2)]
    running_on(ledger, jobs[0])
    scheduler.kill()
    cluster.start_scheduler()
    ledger.check(images(cluster))
    assert all(ledger.job(job_id).state == "SUCCEEDED" for job_id in jobs)
    # The running job was re-attached, not run again.
    assert ledger.job(jobs[0]).attempt == 1


def test_a_poison_job_fails_after_max_attempts_and_the_agents_come_back(chaos: Chaos) -> None:
    cluster, ledger = chaos()
    cluster.start_scheduler()
    names = ("agent-a", "agent-b")
    flags = (*AGENT_ARGS, "--simulate-poison", "POISON")
    for name in names:
        cluster.start_agent(name, *flags)
    cluster.wait_for_nodes(2)
    stop = threading.Event()

    def supervise() -> None:  # restarts a dead agent, as systemd would
        while not stop.wait(0.2):
            for dead in [p for p in cluster.processes if p.name in names and not p.alive]:
                cluster.processes.remove(dead)
                cluster.start_agent(dead.name, *flags)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        poison = ledger.submit("POISON pill")
        wait_until(lambda: ledger.job(poison).state == "FAILED", "the poison job to fail", 150)
        healthy = ledger.submit("a healthy job")
        ledger.check(images(cluster))
    finally:
        stop.set()
        supervisor.join()
    failed = ledger.job(poison)
    assert (failed.failures, failed.attempt) == (3, 3)
    assert failed.reason.startswith("failed 3 times; attempt 1: ")
    assert ledger.job(healthy).state == "SUCCEEDED"
    cluster.wait_for_nodes(2)


def test_a_hung_card_s_job_moves_and_the_card_recovers(chaos: Chaos) -> None:
    cluster, ledger = chaos()
    cluster.start_scheduler()
    cluster.start_agent("hung", "--simulate-gpus", "8GiB", "--simulate-hang", "2:8")
    cluster.wait_for_nodes(1)
    job_id = ledger.submit()
    wait_until(lambda: ledger.job(job_id).attempt >= 2 or ledger.job(job_id).failures > 0, "fenced")
    nodes = {node.name: node for node in ledger.client.list_nodes()}
    assert not nodes["hung"].devices[0].healthy
    cluster.start_agent("spare", *AGENT_ARGS)
    ledger.check(images(cluster))
    job = ledger.job(job_id)
    assert job.state == "SUCCEEDED"
    assert "no progress for" in job.attempts[0].reason
    wait_until(
        lambda: all(d.healthy for n in ledger.client.list_nodes() for d in n.devices),
        "the hung card to pass its health probe",
    )


def two_replicas(chaos: Chaos) -> tuple[LocalCluster, Ledger, Process, str]:
    """A leader, a standby on the same database, and one agent. Returns the
    leader's process and the standby's address."""
    cluster, ledger = chaos(replicas=2)
    leader = cluster.start_scheduler()
    cluster.wait_for(lambda c: c.health(cluster.address).role == "leader", "a leader")
    cluster.start_scheduler(name="standby", replica=1)
    cluster.start_agent("agent-a", *AGENT_ARGS)
    cluster.wait_for_nodes(1)
    return cluster, ledger, leader, f"{cluster.connect_host}:{cluster.ports[1]}"


def test_the_standby_takes_over_from_a_killed_leader(chaos: Chaos) -> None:
    cluster, ledger, leader, standby = two_replicas(chaos)
    job_id = ledger.submit()
    running_on(ledger, job_id)
    leader.kill()
    wait_until(lambda: ledger.client.health(standby).role == "leader", "the standby to lead")
    second = ledger.submit("after the failover")
    ledger.check(images(cluster))
    assert ledger.job(second).state == "SUCCEEDED"


def test_a_leader_paused_past_its_lease_commits_nothing(chaos: Chaos) -> None:
    cluster, ledger, leader, standby = two_replicas(chaos)
    job_id = ledger.submit()
    running_on(ledger, job_id)
    epoch = ledger.client.health(cluster.address).epoch
    leader.send(signal.SIGSTOP)
    wait_until(lambda: ledger.client.health(standby).role == "leader", "the standby to lead")
    leader.send(signal.SIGCONT)
    wait_until(lambda: ledger.client.health(cluster.address).role == "standby", "a step-down")
    assert ledger.client.health(standby).epoch == epoch + 1
    ledger.check(images(cluster))
    log = leader.log.read_text()
    assert "stepping down" in log
    after_wake = log[log.index("stepping down") :]
    assert "job " not in after_wake or "->" not in after_wake  # no assignment after waking


def test_a_partitioned_agent_behaves_as_a_paused_one(chaos: Chaos) -> None:
    reason = netns.available()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with netns.NetworkNamespace() as space:
        cluster, ledger = chaos(host="0.0.0.0", connect_host=space.host_ip)
        cluster.start_scheduler()
        cluster.start_agent("inside", *AGENT_ARGS, wrap=space.command([]))
        cluster.wait_for_nodes(1)
        job_id = ledger.submit()
        running_on(ledger, job_id)
        cluster.start_agent("outside", *AGENT_ARGS)
        space.partition()
        wait_until(lambda: ledger.job(job_id).attempt >= 2, "the job to move on")
        space.heal()
        ledger.check(images(cluster))
        job = ledger.job(job_id)
        assert (job.state, job.node_name) == ("SUCCEEDED", "outside")
        assert job.attempts[0].reason.startswith("node inside lost: no heartbeat")


@pytest.mark.skipif(bool(postgres_available()), reason=f"{postgres_available()}")
def test_a_postgres_restart_mid_run_loses_no_job(tmp_path: Path) -> None:
    with ThrowawayPostgres() as postgres:
        cluster = LocalCluster(tmp_path, db_url=postgres.url, scheduler_args=("--lease", "3s"))
        ledger = Ledger(cluster)
        try:
            cluster.start_scheduler()
            cluster.start_agent("agent-a", *AGENT_ARGS)
            cluster.wait_for_nodes(1)
            jobs = [ledger.submit(f"job {i}") for i in range(3)]
            running_on(ledger, jobs[0])
            postgres.restart()
            jobs.append(ledger.submit("after the restart"))
            ledger.check(images(cluster))
            assert all(ledger.job(job_id).state == "SUCCEEDED" for job_id in jobs)
        finally:
            ledger.close()
            cluster.stop()


def test_a_killed_agent_s_img2img_job_reruns_elsewhere_from_its_stored_input(
    chaos: Chaos,
) -> None:
    """The input image was uploaded once, before the submit: the second
    node fetches it from the scheduler, and the job ends with one result."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(buffer, format="PNG")
    img2img = {"init_image": buffer.getvalue(), "denoising_strength": 1.0}
    cluster, ledger, job_id = one_job_on_two_agents(chaos, job=img2img)
    job = kill_its_node_and_check_it_completes_on_another(cluster, ledger, job_id)
    assert job.spec.kind == "img2img"
    assert len(job.images) == 1
