"""SIGTERM to an agent: the running job finishes within the shutdown
timeout, or is handed back without counting as a failure; SIGTERM to the
scheduler hands its lease over and leaves running jobs with their agents."""

from __future__ import annotations

import signal

import pytest

from harness.processes import LocalCluster
from harness.waiting import until
from tests.e2e.test_drain_cli import SLOW_STEPS, job, submitted

pytestmark = pytest.mark.e2e


def running(cluster: LocalCluster, job_id: str) -> bool:
    return job(cluster, job_id).state == "RUNNING"


def test_sigterm_lets_the_running_job_finish(cluster: LocalCluster) -> None:
    agent = cluster.start_agent("agent-a", *SLOW_STEPS, "--shutdown-timeout", "60s")
    cluster.wait_for_nodes(1)
    job_id = submitted(cluster)
    until(lambda: running(cluster, job_id), "the job to run")
    assert agent.stop(signal.SIGTERM, timeout=90) == 0
    final = job(cluster, job_id)
    assert (final.state, final.attempt, final.failures) == ("SUCCEEDED", 1, 0)


def test_sigterm_hands_back_a_job_that_outlasts_the_timeout(cluster: LocalCluster) -> None:
    agent = cluster.start_agent("agent-a", *SLOW_STEPS, "--shutdown-timeout", "0.5s")
    cluster.wait_for_nodes(1)
    job_id = submitted(cluster)
    until(lambda: running(cluster, job_id), "the job to run")
    assert agent.stop(signal.SIGTERM, timeout=90) == 0
    handed_back = until(lambda: job(cluster, job_id), "QUEUED", done=lambda j: j.state == "QUEUED")
    assert (handed_back.failures, handed_back.attempts[0].outcome) == (0, "released")
    cluster.start_agent("agent-b", *SLOW_STEPS)
    final = until(lambda: job(cluster, job_id), "the job", done=lambda j: j.done, timeout=120)
    assert (final.state, final.attempt, final.failures) == ("SUCCEEDED", 2, 0)


def test_sigterm_to_the_scheduler_leaves_the_running_job_with_its_agent(
    cluster: LocalCluster,
) -> None:
    cluster.start_agent("agent-a", *SLOW_STEPS)
    cluster.wait_for_nodes(1)
    job_id = submitted(cluster)
    until(lambda: running(cluster, job_id), "the job to run")
    [scheduler] = [p for p in cluster.processes if p.name == "scheduler"]
    assert scheduler.stop(signal.SIGTERM) == 0
    cluster.processes.remove(scheduler)
    cluster.start_scheduler()
    cluster.wait_for(lambda client: client.get_job(job_id).done, "the job to end")
    final = job(cluster, job_id)
    assert (final.state, final.attempt, final.failures) == ("SUCCEEDED", 1, 0)
