"""Agents outlive the scheduler: after a scheduler restart they dial again,
and the queue that survived in the database is worked off."""

from __future__ import annotations

import pytest

from client import StateEvent
from harness.processes import LocalCluster

pytestmark = pytest.mark.e2e


def test_agents_reconnect_after_a_scheduler_restart(cluster: LocalCluster) -> None:
    cluster.start_agent("agent-a")
    cluster.wait_for_nodes(1)
    with cluster.client() as client:
        before = client.submit("before the restart", width=64, height=64, steps=2).wait()
        assert before.succeeded

    [scheduler] = [p for p in cluster.processes if p.name == "scheduler"]
    assert scheduler.stop() == 0  # SIGTERM: a clean stop
    cluster.processes.remove(scheduler)
    cluster.start_scheduler(name="scheduler-2")
    # Queued while no agent is connected yet: it must survive and then run.
    cluster.wait_for(lambda c: c.list_jobs() != [], "the restarted scheduler")
    with cluster.client() as client:
        handle = client.submit("after the restart", width=64, height=64, steps=2)
        cluster.wait_for_nodes(1)
        states = [e.state for e in handle.events() if isinstance(e, StateEvent)]
        assert states[-1] == "SUCCEEDED"
        job = handle.refresh()
        assert job.node_name == "agent-a"
        assert [j.state for j in client.list_jobs()] == ["SUCCEEDED", "SUCCEEDED"]
        [node] = client.list_nodes()
        assert node.connected
