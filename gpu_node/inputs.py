"""A job's input images (init image, mask, ControlNet images) on the node:
fetched from the scheduler once, kept in `<data-dir>/inputs/<sha256>`, and
decoded for the device worker.

An assignment names its inputs by sha256. Before the task goes to the
device worker, each one not in the cache is fetched (`FetchInput`, a stream
of chunks) into a temporary file beside the cache, its sha256 checked, and
renamed into place; so a retried attempt on the same node fetches nothing,
and a file in the cache is always whole and what its name says. Fetching
runs on the asyncio loop (the writes in a thread), never on a device
worker, so other jobs run on meanwhile; decoding runs in a thread.

The cache is bounded: at most 2 GiB by default (inputs are at most 32 MiB
each, so that holds at least 64 of the largest), least recently used
removed first; a file is used when a task needs it. Files the running
fetches need are never removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from sdmesh.kinds import INPUT_FORMATS, MAX_INPUT_BYTES, MAX_INPUT_PIXELS, SHA256

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 2 * 1024**3
PART = ".part"

# sha256 -> its chunks, as (offset, data), in order.
Fetch = Callable[[str], AsyncIterator[tuple[int, bytes]]]


class InputFailed(Exception):
    """An input could not be had: the attempt fails with error kind
    "input" and this one line."""


class InputCache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_use: dict[str, int] = {}  # sha256 -> running fetches that need it
        self._serial = itertools.count()

    def path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise InputFailed(f"input {sha256[:70]!r} is not a sha256")
        return self.root / sha256

    async def ensure(self, shas: Collection[str], fetch: Fetch) -> dict[str, Path]:
        """Each input's file in the cache, fetched when it is not there."""
        paths = {sha: self.path(sha) for sha in shas}
        for sha in shas:
            self._in_use[sha] = self._in_use.get(sha, 0) + 1
        try:
            for sha, path in paths.items():
                # One fetch of a file at a time: a second task that needs
                # it waits, then finds it there.
                async with self._locks.setdefault(sha, asyncio.Lock()):
                    if await asyncio.to_thread(_touch, path):
                        continue
                    await self._fetch(sha, path, fetch)
            await asyncio.to_thread(self._trim)
        finally:
            for sha in shas:
                self._in_use[sha] -= 1
                if not self._in_use[sha]:
                    del self._in_use[sha]
                    self._locks.pop(sha, None)
        return paths

    async def _fetch(self, sha: str, path: Path, fetch: Fetch) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        temporary = self.root / f"{sha}.{os.getpid()}.{next(self._serial)}{PART}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(temporary, "wb") as file:  # noqa: ASYNC230 (writes go to a thread)
                async for offset, data in fetch(sha):
                    if offset != size:
                        raise InputFailed(
                            f"input {sha[:12]}…: a chunk at offset {offset}, expected {size}"
                        )
                    size += len(data)
                    if size > MAX_INPUT_BYTES:
                        raise InputFailed(
                            f"input {sha[:12]}…: over {MAX_INPUT_BYTES} bytes; inputs are smaller"
                        )
                    digest.update(data)
                    await asyncio.to_thread(file.write, data)
            got = digest.hexdigest()
            if got != sha:
                raise InputFailed(
                    f"input {sha[:12]}…: the bytes fetched ({size}) have sha256 {got[:12]}…"
                )
            await asyncio.to_thread(os.replace, temporary, path)
            log.info("fetched input %s… (%d bytes)", sha[:12], size)
        finally:
            await asyncio.to_thread(temporary.unlink, missing_ok=True)

    def _trim(self) -> None:
        """Removes the least recently used files until the cache fits,
        and temporary files no fetch is writing (left by a crash)."""
        entries = []
        for entry in os.scandir(self.root):
            sha = entry.name.split(".", 1)[0]
            if entry.name.endswith(PART):
                if sha not in self._in_use:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            stat = entry.stat()
            entries.append((stat.st_mtime_ns, stat.st_size, sha, entry.path))
        total = sum(size for _, size, _, _ in entries)
        for _, size, sha, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if sha in self._in_use:
                continue
            Path(path).unlink(missing_ok=True)
            total -= size


def _touch(path: Path) -> bool:
    """Marks a cached file used now; False when it is not there."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def decode(paths: Mapping[str, Path]) -> dict[str, Any]:
    """The images, decoded (PIL), by sha256. Blocking: call it in a thread.
    The scheduler checked each at upload; they are checked again here, from
    the header, before anything is decoded."""
    from PIL import Image

    images = {}
    for sha, path in paths.items():
        try:
            with Image.open(path) as opened:
                image = _checked(sha, opened)
        except InputFailed:
            raise
        except Exception as exc:
            raise InputFailed(f"input {sha[:12]}… does not decode: {exc}") from exc
        images[sha] = image
    return images


def _checked(sha: str, image: Any) -> Any:
    """The image, loaded, once its header is what an input may be."""
    if image.format not in INPUT_FORMATS:
        raise InputFailed(f"input {sha[:12]}… is {image.format}, not PNG, JPEG or WebP")
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise InputFailed(
            f"input {sha[:12]}… is {image.width}x{image.height}, over {MAX_INPUT_PIXELS} pixels"
        )
    image.load()
    return image


def fetch_over(channel: Any, metadata: Any, job_id: str, attempt: int) -> Fetch:
    """`FetchInput` for one attempt on the agent stream's channel, with the
    node's credential metadata, as the stream itself is authenticated."""
    from protos import agent_pb2, agent_pb2_grpc

    stub = agent_pb2_grpc.AgentGatewayStub(channel)

    async def fetch(sha256: str) -> AsyncIterator[tuple[int, bytes]]:
        request = agent_pb2.FetchInputRequest(job_id=job_id, attempt=attempt, sha256=sha256)
        async for chunk in stub.FetchInput(request, metadata=metadata):
            yield chunk.offset, chunk.data

    return fetch


def input_failure(exc: BaseException) -> str:
    """The one line an attempt whose inputs could not be had ends with."""
    import grpc

    if isinstance(exc, InputFailed):
        text = str(exc)
    elif isinstance(exc, grpc.aio.AioRpcError):
        text = f"fetching an input: {exc.code().name}: {exc.details() or 'no details'}"
    else:
        text = f"fetching an input: {type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


async def load(cache: InputCache, shas: Collection[str], fetch: Fetch) -> dict[str, Any]:
    """The inputs, fetched when needed and decoded in a thread."""
    paths = await cache.ensure(shas, fetch)
    return await asyncio.to_thread(decode, paths)


class Waiting:
    """The tasks of one agent waiting for their inputs: each batch is
    fetched (or found in the cache) and decoded on the asyncio loop, then
    handed on with `submit`; a task whose inputs cannot be had ends FAILED
    with error kind "input" and one line, through `fail`. A stop or drain
    finds them here (`tasks`, `find`); the worker reports their end."""

    def __init__(
        self,
        cache: InputCache,
        submit: Callable[[Any, list[Any]], None],
        fail: Callable[[Any, str], None],
    ) -> None:
        self.cache = cache
        self._submit = submit
        self._fail = fail
        self._tasks: dict[tuple[str, int], Any] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.channel: Any = None  # the agent stream's, while connected
        self.metadata: Any = None  # the node's credential, as on the stream

    def start(self, worker: Any, tasks: list[Any]) -> None:
        for task in tasks:
            self._tasks[(task.job_id, task.attempt)] = task
        running = asyncio.create_task(self._prepare(worker, tasks))
        self._running.add(running)
        running.add_done_callback(self._running.discard)

    def tasks(self) -> list[Any]:
        return list(self._tasks.values())

    def find(self, job_id: str, attempt: int) -> Any:
        return self._tasks.get((job_id, attempt))

    async def _prepare(self, worker: Any, tasks: list[Any]) -> None:
        """Each task stays findable here (by a stop, a drain) until the
        worker has it."""
        ready = []
        for task in tasks:
            try:
                if self.channel is None:
                    raise InputFailed("not connected to a scheduler to fetch inputs from")
                fetch = fetch_over(self.channel, self.metadata, task.job_id, task.attempt)
                task.inputs = await load(self.cache, task.spec.inputs, fetch)
                ready.append(task)
            except Exception as exc:  # whatever it was, the attempt must end
                self._tasks.pop((task.job_id, task.attempt), None)
                reason = input_failure(exc)
                log.warning("job %s attempt %d: %s", task.job_id, task.attempt, reason)
                self._fail(task, reason)
        try:
            if ready:
                self._submit(worker, ready)
        finally:
            for task in ready:
                self._tasks.pop((task.job_id, task.attempt), None)
