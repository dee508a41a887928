"""The whole path, for real: a scheduler and two agents as separate OS
processes, jobs through the SDK and through `sdctl submit`, previews, PNGs
with infotext, cancel, and input checks. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image as PILImage

from client import (
    Client,
    Event,
    JobHandle,
    NotFoundError,
    PreviewEvent,
    ProgressEvent,
    StateEvent,
)
from harness.processes import LocalCluster
from scheduler.store import Store

pytestmark = pytest.mark.e2e


def collect(handle: JobHandle) -> list[Event]:
    return list(handle.events())


def check_png(data: bytes, width: int, height: int, seed: int, prompt: str) -> None:
    image = PILImage.open(BytesIO(data))
    image.load()
    assert image.format == "PNG"
    assert image.size == (width, height)
    parameters = image.info["parameters"]
    assert parameters.startswith(prompt + "\n")
    assert f"Seed: {seed}," in parameters
    assert f"Size: {width}x{height}" in parameters
    assert "Sampler: Euler a" in parameters
    assert "Model: tiny" in parameters


def test_jobs_run_end_to_end_on_two_agents(cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.start_agent("agent-a")
    cluster.start_agent("agent-b")
    cluster.wait_for_nodes(2)

    with cluster.client("alice") as client:
        specs = [
            {"width": 64 + 8 * (i % 4), "height": 64, "steps": 6, "batch_size": 2 if i == 3 else 1}
            for i in range(8)
        ]
        handles = [
            client.submit(
                f"a lighthouse, take {i}",
                width=spec["width"],
                height=spec["height"],
                steps=spec["steps"],
                batch_size=spec["batch_size"],
            )
            for i, spec in enumerate(specs)
        ]
        with ThreadPoolExecutor(len(handles)) as pool:
            streams = list(pool.map(collect, handles))

        # The ninth job goes through the CLI, as a user would send it.
        done = cluster.sdctl(
            "submit",
            "a lighthouse from sdctl",
            "--steps",
            "4",
            "--width",
            "64",
            "--height",
            "64",
            "--output-dir",
            str(tmp_path / "cli"),
            "-o",
            "json",
        )
        assert done.returncode == 0, done.stderr
        cli_result = json.loads(done.stdout)

        nodes_used = set()
        for handle, spec, events in zip(handles, specs, streams, strict=True):
            job = handle.refresh()
            assert job.state == "SUCCEEDED", job.reason
            nodes_used.add(job.node_name)
            states = [e.state for e in events if isinstance(e, StateEvent)]
            assert states == ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]
            assert [e.seq for e in events if e.seq] == list(
                range(1, len(states) + spec["batch_size"] + 1)
            )
            previews = [e.step for e in events if isinstance(e, PreviewEvent)]
            assert previews, f"no preview for {job.id}"
            assert previews == sorted(set(previews)), previews
            steps = [e.step for e in events if isinstance(e, ProgressEvent)]
            assert steps == sorted(steps)

            assert len(job.images) == spec["batch_size"]
            for image in handle.images():
                assert image.info.seed == job.spec.seed + image.info.index
                check_png(
                    image.data, spec["width"], spec["height"], image.info.seed, job.spec.prompt
                )
        assert nodes_used == {"agent-a", "agent-b"}

        assert cli_result["state"] == "SUCCEEDED"
        assert cli_result["previews"] >= 1
        assert cli_result["node"] in {"agent-a", "agent-b"}
        assert cli_result["attempts"] == 1
        [path] = cli_result["images"]
        assert Path(path).is_absolute()
        cli_job = client.get_job(cli_result["job_id"])
        assert cli_job.owner == "tester"
        assert cli_result["seeds"] == [cli_job.spec.seed]
        check_png(Path(path).read_bytes(), 64, 64, cli_job.spec.seed, "a lighthouse from sdctl")


def test_cancel_stops_a_running_job_and_stores_nothing(cluster: LocalCluster) -> None:
    cluster.start_agent("agent-a")
    cluster.wait_for_nodes(1)
    with cluster.client() as client:
        handle = client.submit("a slow lighthouse", width=512, height=512, steps=50)
        steps: list[int] = []
        final = None
        for event in handle.events():
            if isinstance(event, ProgressEvent):
                if not steps:
                    client.cancel(handle.id)
                steps.append(event.step)
            if isinstance(event, StateEvent) and event.terminal:
                final = event.state
        assert final == "CANCELLED"
        assert steps
        assert max(steps) < 50
        job = handle.refresh()
        assert job.state == "CANCELLED"
        assert job.images == []
        with pytest.raises(NotFoundError):
            client.download_image(job.id, 0)
        # The agent is free again: the next job runs.
        assert client.submit("after the cancel", width=64, height=64, steps=2).wait().succeeded

    store = Store(cluster.db_url or f"sqlite:///{cluster.root / 'scheduler' / 'sdmesh.db'}")
    try:
        assert store.image(job.id, 0) is None
    finally:
        store.close()
    assert not list((cluster.root / "scheduler" / "images").glob(f"*/{job.id}/*"))


INVALID = [
    (["--steps", "0"], "steps"),
    (["--width", "100"], "width"),
    (["--height", "30"], "height"),
    (["--model", "no-such-model"], "model"),
    (["--sampler", "Not A Sampler"], "sampler_name"),
    (["--priority", "101"], "priority"),
    (["--batch-size", "0"], "batch_size"),
]


def test_invalid_input_exits_2_and_leaves_no_job(cluster: LocalCluster) -> None:
    cluster.wait_for(lambda c: c.list_jobs() == [], "the scheduler")
    cases = [(["a prompt", *flags], field) for flags, field in INVALID]
    cases += [([""], "prompt"), (["   "], "prompt"), (["x" * 5000], "prompt")]
    for args, field in cases:
        result = cluster.sdctl("submit", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(f"error: {field}:"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    with Client(cluster.address) as client:
        assert client.list_jobs() == []
