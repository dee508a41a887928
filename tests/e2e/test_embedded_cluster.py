"""`sdctl up`: the embedded cluster in the foreground, every user-facing
command's JSON against it, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from harness.processes import LocalCluster, alive, free_port, process_env, sdctl_command
from harness.waiting import until

pytestmark = pytest.mark.e2e


def children_of(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(line) for line in found.stdout.split()]


def test_up_runs_a_cluster_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as handle:
        up = subprocess.Popen(
            sdctl_command("up", "--port", str(port), "--data-dir", str(tmp_path / "up")),
            stdout=handle, stderr=subprocess.STDOUT, env=process_env(),
        )  # fmt: skip
    local = LocalCluster(tmp_path, port=port)
    try:
        local.wait_for_nodes(1)
        children = children_of(up.pid)
        assert len(children) == 2  # the scheduler and the agent

        submitted = local.sdctl("submit", "a lighthouse", "--steps", "3", "--width", "64",
                                "--height", "64", "--batch-size", "2", "--no-wait", "-o", "json")  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        created = json.loads(submitted.stdout)
        assert set(created) == {"job_id", "state"}
        job_id = created["job_id"]

        watched = local.sdctl("watch", job_id, "-o", "json")
        assert watched.returncode == 0, watched.stderr
        lines = [json.loads(line) for line in watched.stdout.splitlines()]
        assert lines[-1]["type"] == "state"
        assert lines[-1]["state"] == "SUCCEEDED"
        assert {line["type"] for line in lines} <= {"state", "image", "progress", "preview"}
        assert all(line["job_id"] == job_id for line in lines)

        shown = json.loads(local.sdctl("job", job_id, "-o", "json").stdout)
        assert shown["state"] == "SUCCEEDED"
        assert shown["node"]
        assert shown["attempt"] == 1
        assert [image["seed"] for image in shown["images"]] == shown["spec"]["seeds"]

        downloaded = local.sdctl(
            "images", job_id, "--output-dir", str(tmp_path / "out"), "-o", "json"
        )
        assert downloaded.returncode == 0, downloaded.stderr
        files = json.loads(downloaded.stdout)
        assert [f["index"] for f in files] == [0, 1]
        for entry in files:
            with Image.open(entry["path"]) as picture:
                assert picture.size == (64, 64)

        listed = json.loads(local.sdctl("jobs", "-o", "json").stdout)
        assert [job["job_id"] for job in listed] == [job_id]
        [node] = json.loads(local.sdctl("nodes", "-o", "json").stdout)
        assert node["connected"] is True
        assert node["devices"][0]["kind"] == "cpu"
        assert node["devices"][0]["free_bytes"] > 0
        models = json.loads(local.sdctl("models", "-o", "json").stdout)
        assert [m["name"] for m in models] == ["tiny"]
        assert models[0]["nodes"] == [node["id"]]
        cancelled = local.sdctl("cancel", job_id)
        assert cancelled.stdout.strip() == f"job {job_id} had already ended: SUCCEEDED"

        # Ctrl-C during a job says what it waits for; a second one hands
        # the job back at once instead of waiting for it to finish.
        long_job = local.sdctl("submit", "a long one", "--steps", "150", "--no-wait", "-o", "json")
        assert long_job.returncode == 0, long_job.stderr
        long_id = json.loads(long_job.stdout)["job_id"]
        with local.client() as client:
            until(lambda: client.get_job(long_id).state == "RUNNING", "the long job to run")
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        until(lambda: "press Ctrl-C again" in log.read_text(), "the stop to be explained")
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
        until(lambda: not any(alive(pid) for pid in children), "the children to exit", timeout=10)
        said = log.read_text()
        assert "sdmesh is up" in said
        assert "handing the running job(s) back now" in said
        assert f"job {long_id} attempt 1 released: agent stopped at once" in said
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in children_of(up.pid):
            subprocess.run(["kill", "-9", str(pid)], check=False)


def test_up_killed_outright_takes_its_servers_with_it(tmp_path: Path) -> None:
    """SIGKILL (or a closed terminal) gives `sdctl up` no chance to stop its
    children; they notice it is gone and stop, freeing the port."""
    port = free_port()
    up = subprocess.Popen(
        sdctl_command("up", "--port", str(port), "--data-dir", str(tmp_path / "up")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=process_env(),
    )  # fmt: skip
    children: list[int] = []
    try:
        children = until(lambda: children_of(up.pid), "the scheduler and the agent",
                         done=lambda found: len(found) == 2)  # fmt: skip
        with LocalCluster(tmp_path, port=port).client() as client:
            until(lambda: client.health().leader, "the scheduler to lead")
        up.kill()
        up.wait()
        until(lambda: not any(alive(pid) for pid in children), "the orphans to stop", timeout=30)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # nobody holds the port any more
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in children:
            subprocess.run(["kill", "-9", str(pid)], check=False)
