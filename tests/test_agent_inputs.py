"""Input images on the node: fetched once into the cache (checked against
their sha256, renamed into place), found there by a retried attempt,
removed least recently used first when the cache is full, decoded; and
the agent hands a task to its worker only with its inputs, failing the
attempt with error kind "input" when they cannot be had."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gpu_node import inputs as inputs_module
from gpu_node.agent import Agent
from gpu_node.config import AgentConfig
from gpu_node.inputs import Fetch, InputCache, InputFailed, decode, load
from gpu_node.runner import Task
from protos import agent_pb2
from sdmesh.convert import spec_to_proto
from sdmesh.domain import AttemptOutcome, AttemptUpdate, Ended
from tests.factories import make_spec

CHUNK = 1000


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeScheduler:
    """FetchInput at the boundary: serves `files` by sha256 in chunks,
    counting the fetches."""

    def __init__(self, *files: bytes, lie: bytes = b"") -> None:
        self.files = {sha(data): data for data in files}
        self.lie = lie  # sent instead of what was asked for, when set
        self.fetched: list[str] = []

    async def fetch(self, sha256: str) -> AsyncIterator[tuple[int, bytes]]:
        self.fetched.append(sha256)
        data = self.lie or self.files[sha256]
        for offset in range(0, len(data), CHUNK):
            yield offset, data[offset : offset + CHUNK]


class IdleWorker:
    """Stands in for a device worker that runs nothing."""

    def tasks(self) -> list[Task]:
        return []

    def find(self, _job_id: str, _attempt: int) -> None:
        return None


def ensure(cache: InputCache, shas: list[str], fetch: Fetch) -> dict[str, Path]:
    return asyncio.run(cache.ensure(shas, fetch))


def test_an_input_is_fetched_once_and_found_after(tmp_path: Path) -> None:
    red = png((255, 0, 0))
    scheduler = FakeScheduler(red)
    cache = InputCache(tmp_path / "inputs")
    [path] = ensure(cache, [sha(red)], scheduler.fetch).values()
    assert path == tmp_path / "inputs" / sha(red)
    assert path.read_bytes() == red
    # A retried attempt on this node fetches nothing.
    ensure(cache, [sha(red)], scheduler.fetch)
    assert scheduler.fetched == [sha(red)]
    assert sorted(p.name for p in (tmp_path / "inputs").iterdir()) == [sha(red)]


def test_bytes_that_are_not_what_their_sha256_says_are_refused(tmp_path: Path) -> None:
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    scheduler = FakeScheduler(red, lie=blue)
    cache = InputCache(tmp_path / "inputs")
    with pytest.raises(InputFailed, match=f"input {sha(red)[:12]}….*have sha256 {sha(blue)[:12]}"):
        ensure(cache, [sha(red)], scheduler.fetch)
    assert list((tmp_path / "inputs").iterdir()) == []  # nothing kept, no temporary left


def test_chunks_out_of_order_are_refused(tmp_path: Path) -> None:
    red = png((255, 0, 0))

    async def gap(_: str) -> AsyncIterator[tuple[int, bytes]]:
        yield 0, red[:10]
        yield 20, red[20:]

    with pytest.raises(InputFailed, match="offset 20, expected 10"):
        ensure(InputCache(tmp_path / "inputs"), [sha(red)], gap)


def test_the_cache_removes_the_least_recently_used_first(tmp_path: Path) -> None:
    files = [png((level, 0, 0)) for level in (10, 20, 30)]
    scheduler = FakeScheduler(*files)
    # Room for two of them (each the same size, a few hundred bytes).
    cache = InputCache(tmp_path / "inputs", max_bytes=2 * max(len(f) for f in files))
    first, second, third = (sha(f) for f in files)
    ensure(cache, [first], scheduler.fetch)
    ensure(cache, [second], scheduler.fetch)
    ensure(cache, [first], scheduler.fetch)  # used again: now the newest
    ensure(cache, [third], scheduler.fetch)
    assert sorted(p.name for p in (tmp_path / "inputs").iterdir()) == sorted([first, third])


def test_inputs_decode_and_are_checked(tmp_path: Path) -> None:
    red = png((255, 0, 0))
    gif = BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    scheduler = FakeScheduler(red, gif.getvalue())
    cache = InputCache(tmp_path / "inputs")
    images = asyncio.run(load(cache, [sha(red)], scheduler.fetch))
    assert images[sha(red)].size == (64, 48)
    paths = ensure(cache, [sha(gif.getvalue())], scheduler.fetch)
    with pytest.raises(InputFailed, match="is GIF, not PNG, JPEG or WebP"):
        decode(paths)


def test_the_agent_hands_over_tasks_with_their_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    scheduler = FakeScheduler(red, blue)
    liar = FakeScheduler(lie=red)
    requests: list[tuple[str, int]] = []

    def fetch_over(_channel: Any, _metadata: Any, job_id: str, attempt: int) -> Fetch:
        requests.append((job_id, attempt))
        return liar.fetch if job_id == "lied" else scheduler.fetch

    monkeypatch.setattr(inputs_module, "fetch_over", fetch_over)

    async def scenario() -> tuple[list[list[Task]], list[AttemptUpdate]]:
        agent = Agent(AgentConfig(scheduler="unused:1", data_dir=tmp_path / "agent"))
        submitted: list[list[Task]] = []
        emitted: list[AttemptUpdate] = []
        agent.workers = {0: IdleWorker()}  # type: ignore[dict-item]
        agent.waiting._submit = lambda _worker, tasks: submitted.append(tasks)
        agent._emit = emitted.append  # type: ignore[method-assign,assignment]
        agent.waiting.channel = object()

        def assign(job_id: str, attempt: int, **spec: Any) -> None:
            proto = spec_to_proto(make_spec(**spec))
            job = agent_pb2.AssignedJob(job_id=job_id, attempt=attempt, spec=proto)
            agent._assign(agent_pb2.Assignment(gpu_index=0, jobs=[job]))

        for attempt in (1, 2):  # the second attempt finds its inputs cached
            assign("painted", attempt, init_image=sha(red), mask=sha(blue))
            assert agent._tasks()  # waiting for its inputs, it can be stopped
            await asyncio.gather(*agent.waiting._running)
        assign("lied", 1, init_image="0" * 64)
        await asyncio.gather(*agent.waiting._running)
        assert not agent.waiting.tasks()
        return submitted, emitted

    submitted, emitted = asyncio.run(scenario())
    assert [[t.attempt for t in tasks] for tasks in submitted] == [[1], [2]]
    for [task] in submitted:
        assert task.inputs[sha(red)].getpixel((0, 0)) == (255, 0, 0)
        assert task.inputs[sha(blue)].size == (64, 48)
    assert scheduler.fetched == [sha(red), sha(blue)]  # once each, for attempt 1
    [failed] = emitted
    assert isinstance(failed.body, Ended)
    assert (failed.job_id, failed.body.outcome, failed.body.error_kind) == (
        "lied",
        AttemptOutcome.FAILED,
        "input",
    )
    assert "have sha256" in failed.body.reason
