"""Input images on the scheduler, on SQLite and PostgreSQL: uploaded over
real gRPC and checked (format, bytes, pixels, whether it decodes) with
nothing left on disk when refused; stored once per content; named only by
their owner; fetched by the node running their job; removed with their
last job, or after a day unused."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from PIL import Image

from protos import agent_pb2, agent_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.cluster import Cluster
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.inputs import STALE_PARTIAL_SECONDS, InputFiles
from scheduler.retention import UNUSED_INPUT_SECONDS, Retention
from scheduler.runtime import Runtime
from scheduler.server import SchedulerServer
from scheduler.store import Database, Store
from sdmesh.errors import InvalidArgument
from sdmesh.kinds import MAX_INPUT_BYTES, InputInfo
from sdmesh.spec import SpecRequest, resolve
from sdmesh.wire import IMAGE_CHUNK_BYTES, INPUT_CHUNK_BYTES
from tests.factories import png_chunk, png_header
from tests.scripted import ScriptedAgent, running_scheduler

FAILED = agent_pb2.ATTEMPT_OUTCOME_FAILED


def picture(fmt: str, width: int = 40, height: int = 24, *, noise: bool = False) -> bytes:
    image = Image.new("RGB", (width, height), (200, 80, 20))
    if noise:  # does not compress: a file of several pieces
        rng = random.Random(7)
        image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def pieces(data: bytes, size: int = 1000) -> list[common_pb2.InputChunk]:
    return [
        common_pb2.InputChunk(offset=offset, data=data[offset : offset + size])
        for offset in range(0, max(len(data), 1), size)
    ]


async def stream_of(chunks: Iterable[common_pb2.InputChunk]) -> AsyncIterator[Any]:
    for chunk in chunks:
        yield chunk


def stored_files(root: Path) -> list[Path]:
    """Every file under the inputs folder, partial ones included."""
    return sorted(path for path in root.rglob("*") if path.is_file())


def inputs_root(server: SchedulerServer) -> Path:
    return server.runtime.inputs.root


async def upload(stub: Any, data: bytes, user: str = "alice", size: int = 1000) -> InputInfo:
    answer = await stub.UploadInput(
        stream_of(pieces(data, size)), metadata=(("x-sdmesh-user", user),)
    )
    return InputInfo(answer.sha256, answer.size_bytes, answer.width, answer.height, answer.format)


def run_scheduler(tmp_path: Path, db_url: str, scenario: Any) -> None:
    async def main() -> None:
        async with (
            running_scheduler(tmp_path / "scheduler", db_url) as server,
            aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            await scenario(server, scheduler_pb2_grpc.SchedulerStub(channel), channel)

    asyncio.run(main())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_an_upload_is_checked_and_stored_under_its_sha256(
    tmp_path: Path, db_url: str, fmt: str
) -> None:
    data = picture(fmt)

    async def scenario(server: SchedulerServer, stub: Any, _: Any) -> None:
        info = await upload(stub, data, size=100)
        assert info == InputInfo(hashlib.sha256(data).hexdigest(), len(data), 40, 24, fmt)
        path = inputs_root(server) / info.sha256[:2] / info.sha256
        assert path.read_bytes() == data
        assert stored_files(inputs_root(server)) == [path]  # no partial file left
        rows = server.db.store.inputs.sizes("alice", [info.sha256])
        assert rows == {info.sha256: info}

    run_scheduler(tmp_path, db_url, scenario)


def test_the_same_bytes_twice_are_one_file_with_a_row_per_owner(
    tmp_path: Path, db_url: str
) -> None:
    data = picture("PNG")

    async def scenario(server: SchedulerServer, stub: Any, _: Any) -> None:
        first = await upload(stub, data)
        again = await upload(stub, data)
        bobs = await upload(stub, data, user="bob")
        assert first == again == bobs
        assert len(stored_files(inputs_root(server))) == 1
        for user in ("alice", "bob"):
            assert server.db.store.inputs.sizes(user, [first.sha256]) == {first.sha256: first}
        assert server.db.store.inputs.sizes("carol", [first.sha256]) == {}

    run_scheduler(tmp_path, db_url, scenario)


def bomb_png() -> bytes:
    """A PNG whose header claims 10000x10000 (100 megapixels), with a
    tiny IDAT: refused from the header, before anything is decoded."""
    return (
        png_header(10_000, 10_000)
        + png_chunk(b"IDAT", b"\x78\x9c\x03\x00")
        + png_chunk(b"IEND", b"")
    )


def over_size() -> list[common_pb2.InputChunk]:
    """A PNG signature and then more than MAX_INPUT_BYTES, in full chunks."""
    head = picture("PNG")
    block = head + bytes(INPUT_CHUNK_BYTES - len(head))
    count = MAX_INPUT_BYTES // INPUT_CHUNK_BYTES + 1
    return [
        common_pb2.InputChunk(offset=i * INPUT_CHUNK_BYTES, data=block if i == 0 else bytes(block))
        for i in range(count)
    ]


GOOD = picture("PNG")
REFUSED = {
    "corrupt": pieces(GOOD[:40] + bytes(range(256)) * 4 + GOOD[-12:]),
    "truncated PNG": pieces(picture("PNG", 300, 300, noise=True)[:5000]),
    "GIF": pieces(picture("GIF")),
    "100-megapixel PNG": pieces(bomb_png()),
    "text": pieces(b"hello, this is not a picture at all"),
    "empty": [],
    "offset out of order": [common_pb2.InputChunk(offset=5, data=GOOD)],
    "chunk over 1 MiB": [common_pb2.InputChunk(offset=0, data=GOOD + bytes(INPUT_CHUNK_BYTES))],
}


@pytest.mark.parametrize("what", [*REFUSED, "over-size stream"])
def test_a_bad_upload_is_invalid_argument_naming_image_and_leaves_nothing(
    tmp_path: Path, db_url: str, what: str
) -> None:
    chunks = over_size() if what == "over-size stream" else REFUSED[what]

    async def scenario(server: SchedulerServer, stub: Any, _: Any) -> None:
        with pytest.raises(aio.AioRpcError) as raised:
            await stub.UploadInput(stream_of(chunks))
        error = raised.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, error.details())
        assert (error.details() or "").startswith("image: "), error.details()
        assert len(error.details() or "") < 300
        assert stored_files(inputs_root(server)) == []  # no partial file, no stored file
        sha = hashlib.sha256(b"".join(chunk.data for chunk in chunks)).hexdigest()
        assert server.db.store.inputs.sizes("anonymous", [sha]) == {}

    run_scheduler(tmp_path, db_url, scenario)


def img2img(info: InputInfo, inputs: dict[str, InputInfo], **values: Any) -> Any:
    request = SpecRequest(
        prompt="a lighthouse", width=64, height=64, steps=4, init_image=info.sha256, **values
    )
    return resolve(request, known_models=(), random_seed=lambda: 7, inputs=inputs)


def test_only_the_owner_may_name_an_upload(tmp_path: Path, db_url: str) -> None:
    data = picture("PNG")

    async def scenario(server: SchedulerServer, stub: Any, _: Any) -> None:
        info = await upload(stub, data)
        inputs = server.db.store.inputs
        assert img2img(info, inputs.sizes("alice", [info.sha256])).init_image == info.sha256
        with pytest.raises(InvalidArgument) as raised:
            img2img(info, inputs.sizes("bob", [info.sha256]))
        assert raised.value.field == "init_image"

    run_scheduler(tmp_path, db_url, scenario)


async def queue_job(server: SchedulerServer, job_id: str, owner: str, spec: Any) -> None:
    """Stores a job as admission would, and lets the dispatcher see it."""
    job, _ = await server.db.run(server.db.store.submit, job_id, owner, spec, 3)
    server.runtime.queue.add(job)
    server.runtime.wake()


async def fetched(channel: Any, job_id: str, attempt: int, sha: str) -> list[bytes]:
    stub = agent_pb2_grpc.AgentGatewayStub(channel)
    request = agent_pb2.FetchInputRequest(job_id=job_id, attempt=attempt, sha256=sha)
    chunks = [chunk async for chunk in stub.FetchInput(request)]
    assert [chunk.offset for chunk in chunks] == [
        sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))
    ]
    return [chunk.data for chunk in chunks]


async def fetch_code(channel: Any, job_id: str, attempt: int, sha: str) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as raised:
        await fetched(channel, job_id, attempt, sha)
    return raised.value.code()


def test_the_node_running_the_job_fetches_its_input_in_pieces(tmp_path: Path, db_url: str) -> None:
    data = picture("PNG", 400, 400, noise=True)  # ~480 KB: two pieces and a bit
    other = picture("PNG", 8, 8)

    async def scenario(server: SchedulerServer, stub: Any, channel: Any) -> None:
        info = await upload(stub, data, size=INPUT_CHUNK_BYTES)
        unnamed = await upload(stub, other)
        agent = ScriptedAgent(server.port, "n1")
        await agent.connect()
        try:
            spec = img2img(info, {info.sha256: info})
            await queue_job(server, "job1", "alice", spec)
            job = await agent.assignment()
            got = await fetched(channel, job.job_id, job.attempt, info.sha256)
            assert b"".join(got) == data
            assert all(len(piece) <= IMAGE_CHUNK_BYTES for piece in got)
            assert len(got) >= 2  # streamed from disk, not as one message

            # A sha the job does not name, an attempt that is not this one.
            assert await fetch_code(channel, "job1", job.attempt, unnamed.sha256) == (
                grpc.StatusCode.NOT_FOUND
            )
            assert await fetch_code(channel, "job1", job.attempt + 1, info.sha256) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            assert await fetch_code(channel, "nojob", 1, info.sha256) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            assert await fetch_code(channel, "job1", job.attempt, "../" * 20) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
            # Once the attempt has ended it fetches nothing.
            agent.ended(job, FAILED, "boom")
            again = await agent.assignment()  # the retry, on the same node
            assert again.attempt == job.attempt + 1
            assert await fetch_code(channel, "job1", job.attempt, info.sha256) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            got = await fetched(channel, "job1", again.attempt, info.sha256)
            assert b"".join(got) == data
        finally:
            await agent.close()

    run_scheduler(tmp_path, db_url, scenario)


# ---- removal, on the store without gRPC ------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def upload_file(files: InputFiles, db: Database, owner: str, data: bytes) -> InputInfo:
    async def chunks() -> AsyncIterator[tuple[int, bytes]]:
        yield 0, data

    return await files.upload(db, owner, chunks())


def run_store(tmp_path: Path, db_url: str, scenario: Any) -> None:
    async def main() -> None:
        clock = Clock()
        store = Store(db_url, clock=clock)
        store.migrate()
        db = Database(store)
        runtime = Runtime(db, Cluster(), EventHub(), ImageStore(tmp_path / "images"), clock,
                          EstimateBook())  # fmt: skip
        try:
            await scenario(runtime, clock)
        finally:
            db.close()

    asyncio.run(main())


async def delete_job(runtime: Runtime, job_id: str) -> None:
    """As DeleteJob does once the job has ended."""
    store = runtime.db.store
    await runtime.db.run(store.cancel, job_id, "test")
    removed = await runtime.db.run(store.removal.delete_finished, [job_id])
    assert removed.job_ids == [job_id]
    await runtime.inputs.forget(runtime.db, removed.inputs)


def test_an_input_goes_with_the_last_job_of_its_owner_that_names_it(
    tmp_path: Path, db_url: str
) -> None:
    async def scenario(runtime: Runtime, clock: Clock) -> None:
        db, files, store = runtime.db, runtime.inputs, runtime.db.store
        info = await upload_file(files, db, "alice", picture("PNG"))
        mask = await upload_file(files, db, "alice", picture("PNG", noise=True))
        known = {info.sha256: info, mask.sha256: mask}
        await db.run(store.submit, "j1", "alice", img2img(info, known, mask=mask.sha256), 3)
        await db.run(store.submit, "j2", "alice", img2img(info, known), 3)
        assert await db.run(store.inputs.named_by, "j1") == sorted([info.sha256, mask.sha256])

        await delete_job(runtime, "j1")
        assert files.path(info.sha256).is_file()  # j2 still names it
        assert not files.path(mask.sha256).exists()  # no job names it any more
        assert await db.run(store.inputs.sizes, "alice", [info.sha256, mask.sha256]) == {
            info.sha256: info
        }
        # Bob uploaded the same bytes: alice's last job goes, bob's copy stays.
        await upload_file(files, db, "bob", picture("PNG"))
        await delete_job(runtime, "j2")
        assert await db.run(store.inputs.named_by, "j2") == []
        assert await db.run(store.inputs.sizes, "alice", [info.sha256]) == {}
        assert files.path(info.sha256).is_file()
        assert await db.run(store.inputs.sizes, "bob", [info.sha256]) == {info.sha256: info}

    run_store(tmp_path, db_url, scenario)


def test_an_upload_never_used_goes_after_a_day(tmp_path: Path, db_url: str) -> None:
    async def scenario(runtime: Runtime, clock: Clock) -> None:
        db, files, store = runtime.db, runtime.inputs, runtime.db.store
        unused = await upload_file(files, db, "alice", picture("PNG"))
        used = await upload_file(files, db, "alice", picture("JPEG"))
        await db.run(store.submit, "j1", "alice", img2img(used, {used.sha256: used}), 3)
        retention = Retention(runtime, retain_seconds=0)

        clock.now += UNUSED_INPUT_SECONDS - 1
        assert await retention.sweep_inputs() == 0
        assert files.path(unused.sha256).is_file()

        clock.now += 2
        assert await retention.sweep_inputs() == 1
        assert not files.path(unused.sha256).exists()
        assert await db.run(store.inputs.sizes, "alice", [unused.sha256]) == {}
        assert files.path(used.sha256).is_file()  # its job still names it
        assert await db.run(store.inputs.sizes, "alice", [used.sha256]) == {used.sha256: used}

    run_store(tmp_path, db_url, scenario)


def test_a_partial_file_left_by_a_dead_scheduler_is_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    (root / "partial").mkdir(parents=True)
    dead, live = root / "partial" / "dead.part", root / "partial" / "live.part"
    dead.write_bytes(b"half")
    live.write_bytes(b"in flight")  # another replica's upload, written just now
    old = time.time() - STALE_PARTIAL_SECONDS - 60
    os.utime(dead, (old, old))
    InputFiles(root)
    assert stored_files(root) == [live]


def test_delete_job_removes_an_input_its_owner_no_longer_names(tmp_path: Path, db_url: str) -> None:
    data = picture("WEBP")

    async def scenario(server: SchedulerServer, stub: Any, _: Any) -> None:
        info = await upload(stub, data)
        request = scheduler_pb2.SubmitJobRequest()
        request.spec.prompt = "a lighthouse"
        request.spec.width = request.spec.height = 64
        request.spec.init_image = info.sha256
        user = (("x-sdmesh-user", "alice"),)
        job = (await stub.SubmitJob(request, metadata=user)).job
        assert await server.db.run(server.db.store.inputs.named_by, job.id) == [info.sha256]
        await stub.DeleteJob(scheduler_pb2.DeleteJobRequest(job_id=job.id), metadata=user)
        assert await server.db.run(server.db.store.inputs.named_by, job.id) == []
        assert await server.db.run(server.db.store.inputs.sizes, "alice", [info.sha256]) == {}
        assert stored_files(inputs_root(server)) == []

    run_scheduler(tmp_path, db_url, scenario)


def test_retention_of_finished_jobs_removes_their_inputs(tmp_path: Path, db_url: str) -> None:
    async def scenario(runtime: Runtime, clock: Clock) -> None:
        db, files, store = runtime.db, runtime.inputs, runtime.db.store
        info = await upload_file(files, db, "alice", picture("PNG"))
        await db.run(store.submit, "j1", "alice", img2img(info, {info.sha256: info}), 3)
        await db.run(store.cancel, "j1", "test")
        retention = Retention(runtime, retain_seconds=60)
        assert await retention.sweep() == 0
        assert files.path(info.sha256).is_file()
        clock.now += 61
        assert await retention.sweep() == 1
        assert not files.path(info.sha256).exists()
        assert await db.run(store.inputs.sizes, "alice", [info.sha256]) == {}

    run_store(tmp_path, db_url, scenario)


def test_a_job_submitted_while_its_input_s_row_goes_keeps_the_file(
    tmp_path: Path, db_url: str
) -> None:
    """A submit checked alice's upload; meanwhile her last other job naming
    it was deleted, which dropped her upload row. The new job still names
    the input, so its file stays, and no file goes while a submit naming
    inputs is between its check and its commit."""

    async def scenario(runtime: Runtime, clock: Clock) -> None:
        db, files, store = runtime.db, runtime.inputs, runtime.db.store
        info = await upload_file(files, db, "alice", picture("PNG"))
        known = {info.sha256: info}
        await db.run(store.submit, "old", "alice", img2img(info, known), 3)
        async with files.keeping():  # a submit between its check and its commit
            await db.run(store.cancel, "old", "test")
            removed = await db.run(store.removal.delete_finished, ["old"])
            removal = asyncio.create_task(files.forget(db, removed.inputs))
            await asyncio.sleep(0.05)
            assert not removal.done()  # waits for the submit
            await db.run(store.submit, "new", "alice", img2img(info, known), 3)
        assert await removal == 0
        assert files.path(info.sha256).is_file()
        assert await db.run(store.inputs.sizes, "alice", [info.sha256]) == {}  # row gone
        await delete_job(runtime, "new")
        assert not files.path(info.sha256).exists()  # its last job went

    run_store(tmp_path, db_url, scenario)


def test_an_upload_that_stops_sending_is_refused_and_frees_its_slot(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import scheduler.service

    monkeypatch.setattr(scheduler.service, "UPLOAD_IDLE_SECONDS", 0.2)

    async def scenario(server: SchedulerServer, stub: Any, _channel: Any) -> None:
        data = picture("PNG")

        async def stalls() -> AsyncIterator[Any]:
            yield common_pb2.InputChunk(offset=0, data=data[:100])
            await asyncio.sleep(5)

        with pytest.raises(aio.AioRpcError) as caught:
            await stub.UploadInput(stalls(), metadata=(("x-sdmesh-user", "alice"),))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "image: no chunk came for 0.2s" in (caught.value.details() or "")
        assert stored_files(inputs_root(server)) == []
        assert (await upload(stub, data)).format == "PNG"  # the slot is free again

    run_scheduler(tmp_path, db_url, scenario)
