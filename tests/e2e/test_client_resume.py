"""Clients outlive the scheduler: it is killed with SIGKILL while a job runs
and started again on the same port, and `sdctl submit` and the SDK's watch
carry on where they were. Whether the restarted scheduler re-queues the
running job or takes it back from its agent, the job ends SUCCEEDED, and the
watcher sees each durable event once, in order, with one terminal state."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from client import ProgressEvent, StateEvent, SubmitOptions
from harness.processes import LocalCluster, process_env, sdctl_command

pytestmark = pytest.mark.e2e

# The tiny model on a simulated card, each step slowed to 0.2 s: the job
# runs for about 4 s, so the kill lands while it runs.
AGENT = ("--simulate-gpus", "8GiB", "--simulate-step-delay", "0.2")
JOB: SubmitOptions = {"width": 64, "height": 64, "steps": 20}


def kill_and_restart_scheduler(cluster: LocalCluster) -> None:
    [scheduler] = [p for p in cluster.processes if p.name.startswith("scheduler")]
    scheduler.stop(signal.SIGKILL)
    cluster.processes.remove(scheduler)
    cluster.start_scheduler(name=f"{scheduler.name}-again")  # the same port and data


def test_sdctl_submit_rides_out_a_scheduler_restart(cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.start_agent("agent-a", *AGENT)
    cluster.wait_for_nodes(1)
    flags = [f"--{name}={value}" for name, value in JOB.items()]
    stderr: list[str] = []
    with subprocess.Popen(
        sdctl_command("--scheduler", cluster.address, "submit", "a lighthouse", *flags,
                      "--output-dir", str(tmp_path / "out"), "-o", "json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env(),
    ) as submit:  # fmt: skip
        assert submit.stderr is not None and submit.stdout is not None
        lines: queue.Queue[str] = queue.Queue()

        def read_stderr() -> None:
            assert submit.stderr is not None
            for line in submit.stderr:
                stderr.append(line)
                lines.put(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 120
            while " RUNNING on " not in lines.get(timeout=max(0.1, deadline - time.monotonic())):
                pass
            kill_and_restart_scheduler(cluster)
            assert submit.wait(timeout=180) == 0, "".join(stderr)
        finally:
            if submit.poll() is None:
                submit.kill()
            reader.join(10)
        result = json.loads(submit.stdout.read())
    assert result["state"] == "SUCCEEDED", "".join(stderr)
    [image] = result["images"]
    assert Path(image).is_file()
    said = "".join(stderr)
    assert "reconnecting to the scheduler…" in said
    assert "reconnected to the scheduler" in said
    assert said.count(" SUCCEEDED") == 1


def test_a_watch_yields_every_durable_event_once_across_a_restart(cluster: LocalCluster) -> None:
    cluster.start_agent("agent-a", *AGENT)
    cluster.wait_for_nodes(1)
    retried: list[str] = []
    with cluster.client() as client:
        client.on_retry = lambda address, error: retried.append(str(error))
        handle = client.submit("a lighthouse", **JOB)
        events = []
        for event in handle.events():
            events.append(event)
            if isinstance(event, ProgressEvent) and not retried:
                kill_and_restart_scheduler(cluster)
                retried.append("killed")
        assert len(retried) > 1, "the watch never lost the scheduler"
        durable = [event.seq for event in events if event.seq]
        assert durable == sorted(set(durable)), durable
        terminal = [e for e in events if isinstance(e, StateEvent) and e.terminal]
        assert [e.state for e in terminal] == ["SUCCEEDED"]
        assert events[-1] is terminal[0]
        # No gaps either: a watch from the start replays exactly these.
        assert [event.seq for event in client.watch(handle.id) if event.seq] == durable
        assert handle.refresh().succeeded
