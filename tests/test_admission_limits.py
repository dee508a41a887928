"""Admission's limits on a real store, without gRPC: the queue bounds per
user and in total (concurrent submits included), a retried request id
answered at the bound, the submit rate on a clock the test moves; and
RESOURCE_EXHAUSTED with its retry-after, as `status_of` gives it and as it
reaches a caller over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from scheduler.admission import QUEUE_FULL_RETRY_SECONDS, Admission
from scheduler.cluster import Cluster
from scheduler.errors import ResourceExhausted, Standby, status_of
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.interceptors import ErrorInterceptor
from scheduler.queue import QueueIndex
from scheduler.runtime import Runtime
from scheduler.store import Database, Store
from sdmesh.errors import InvalidArgument, quote
from sdmesh.spec import SpecRequest
from sdmesh.wire import retry_after
from tests.factories import make_queued_job


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def admission(tmp_path: Path, clock: Clock, **limits: Any) -> AsyncIterator[Admission]:
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}", clock=clock)
    store.migrate()
    db = Database(store)
    runtime = Runtime(db, Cluster(), EventHub(), ImageStore(tmp_path / "images"), clock,
                      EstimateBook())  # fmt: skip
    try:
        yield Admission(runtime, node_window_seconds=60.0, max_attempts=3, **limits)
    finally:
        db.close()


def run(
    scenario: Callable[[Admission, Clock], Coroutine[Any, Any, None]],
    tmp_path: Path,
    **limits: Any,
) -> None:
    async def main() -> None:
        clock = Clock()
        async with admission(tmp_path, clock, **limits) as admitted:
            await scenario(admitted, clock)

    asyncio.run(main())


def spec(request_id: str = "", prompt: str = "a lighthouse") -> SpecRequest:
    return SpecRequest(prompt, width=64, height=64, steps=4, request_id=request_id)


NO_RATE = {"submit_rate": 0.0}


def test_each_user_may_queue_up_to_the_per_user_bound(tmp_path: Path) -> None:
    async def scenario(admitted: Admission, clock: Clock) -> None:
        first, _ = await admitted.submit(spec(), "alice")
        await admitted.submit(spec(), "alice")
        with pytest.raises(ResourceExhausted) as refused:
            await admitted.submit(spec(), "alice")
        assert str(refused.value) == (
            "queue limit: alice already has 2 jobs queued (--max-queued-per-user); "
            "retry after some finish"
        )
        assert refused.value.retry_after_seconds == QUEUE_FULL_RETRY_SECONDS
        # Another user is not held back by alice's backlog.
        await admitted.submit(spec(), "bob")
        # A job that leaves the queue makes room.
        admitted.queue.discard(first.id)
        _, created = await admitted.submit(spec(), "alice")
        assert created
        assert admitted.queue.queued_by("alice") == 2

    run(scenario, tmp_path, max_queued_per_user=2, max_queued=100, **NO_RATE)


def test_the_whole_queue_is_bounded(tmp_path: Path) -> None:
    async def scenario(admitted: Admission, clock: Clock) -> None:
        for owner in ("alice", "alice", "bob"):
            await admitted.submit(spec(), owner)
        with pytest.raises(ResourceExhausted) as refused:
            await admitted.submit(spec(), "carol")
        assert str(refused.value) == (
            "queue full: 3 jobs queued in total (--max-queued); retry after some finish"
        )
        assert len(admitted.queue) == 3

    run(scenario, tmp_path, max_queued_per_user=10, max_queued=3, **NO_RATE)


def test_concurrent_submits_cannot_all_pass_one_bound(tmp_path: Path) -> None:
    async def scenario(admitted: Admission, clock: Clock) -> None:
        outcomes = await asyncio.gather(
            *(admitted.submit(spec(), "alice") for _ in range(5)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
        assert (len(refused), admitted.queue.queued_by("alice")) == (3, 2)

    run(scenario, tmp_path, max_queued_per_user=2, max_queued=100, **NO_RATE)


def test_a_retried_request_id_at_the_bound_gets_its_job_back(tmp_path: Path) -> None:
    async def scenario(admitted: Admission, clock: Clock) -> None:
        first, _ = await admitted.submit(spec("r-1"), "alice")
        await admitted.submit(spec("r-2"), "alice")
        again, created = await admitted.submit(spec("r-1"), "alice")
        assert (again.id, created) == (first.id, False)
        # A new request id, or none, is refused.
        for request_id in ("r-3", ""):
            with pytest.raises(ResourceExhausted, match="queue limit: alice"):
                await admitted.submit(spec(request_id), "alice")
        # Request ids are each user's own: at a full queue, bob's r-1 is a
        # new job, and refused.
        admitted.max_queued = 2
        with pytest.raises(ResourceExhausted, match="queue full"):
            await admitted.submit(spec("r-1"), "bob")

    run(scenario, tmp_path, max_queued_per_user=2, max_queued=100, **NO_RATE)


def test_a_retry_at_the_total_bound_gets_its_job_back(tmp_path: Path) -> None:
    async def scenario(admitted: Admission, clock: Clock) -> None:
        mine, _ = await admitted.submit(spec("r-1"), "bob")
        await admitted.submit(spec(), "alice")
        again, created = await admitted.submit(spec("r-1"), "bob")
        assert (again.id, created) == (mine.id, False)

    run(scenario, tmp_path, max_queued_per_user=10, max_queued=2, **NO_RATE)


def test_submits_past_the_rate_are_refused_with_the_wait(tmp_path: Path) -> None:
    async def scenario(admitted: Admission, clock: Clock) -> None:
        # 5/s: a burst of 2 s worth = 10, then one every 1 / 5 = 0.2 s.
        for _ in range(10):
            await admitted.submit(spec(), "alice")
        with pytest.raises(ResourceExhausted) as refused:
            await admitted.submit(spec(), "alice")
        assert str(refused.value) == (
            "rate limit: 5 submits/s for user alice (--submit-rate); retry in 0.2s"
        )
        assert refused.value.retry_after_seconds == 0.2
        # The caller's own API key is a bucket of its own.
        for _ in range(10):
            await admitted.submit(spec(), "alice", limit_key="key:k1")
        with pytest.raises(ResourceExhausted, match="5 submits/s for this API key"):
            await admitted.submit(spec(), "alice", limit_key="key:k1")
        # Counted before anything else: a bad spec past the rate is refused
        # for the rate, having cost no check and no read.
        with pytest.raises(ResourceExhausted, match="rate limit"):
            await admitted.submit(spec(prompt=""), "alice")
        clock.now += 0.2
        _, created = await admitted.submit(spec(), "alice")
        assert created

    run(scenario, tmp_path, max_queued_per_user=100, max_queued=100, submit_rate=5.0)


def test_queued_by_counts_each_users_queued_jobs() -> None:
    index = QueueIndex()
    for job_id, owner, priority in [("a1", "a", 0), ("a2", "a", 5), ("b1", "b", 0)]:
        index.add(make_queued_job(job_id, owner, priority=priority))
    index.add(make_queued_job("a1", "a"))  # added again: still one job
    assert (index.queued_by("a"), index.queued_by("b"), index.queued_by("c")) == (2, 1, 0)
    index.discard("a2")
    index.discard("b1")
    index.discard("b1")
    assert (index.queued_by("a"), index.queued_by("b")) == (1, 0)
    index.load([make_queued_job("c1", "c")])
    assert (index.queued_by("a"), index.queued_by("c")) == (0, 1)


@pytest.mark.parametrize(
    ("error", "code", "trailing"),
    [
        (ResourceExhausted("rate", 0.02), "RESOURCE_EXHAUSTED", (("retry-after", "0.020"),)),
        (ResourceExhausted("queue full", 5.0), "RESOURCE_EXHAUSTED", (("retry-after", "5.000"),)),
        (ResourceExhausted("rate", 1 / 3), "RESOURCE_EXHAUSTED", (("retry-after", "0.333"),)),
        (InvalidArgument("prompt", "too long"), "INVALID_ARGUMENT", ()),
        (
            Standby("standby", "10.0.0.1:50051"),
            "UNAVAILABLE",
            (("x-sdmesh-role", "standby"), ("x-sdmesh-leader", "10.0.0.1:50051")),
        ),
    ],
)
def test_status_of(error: Exception, code: str, trailing: tuple[tuple[str, str], ...]) -> None:
    assert status_of(error) == (getattr(grpc.StatusCode, code), trailing)


def test_the_status_and_retry_after_reach_the_caller() -> None:
    megabyte = "\x00" * 2**20

    async def refuse(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        if request == b"rate":
            raise ResourceExhausted("rate limit: 5 submits/s (--submit-rate); retry in 0.2s", 0.2)
        raise InvalidArgument("prompt", f"got {quote(megabyte)}")

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Limits", {"Call": grpc.unary_unary_rpc_method_handler(refuse)}
        )
        server = aio.server(interceptors=[ErrorInterceptor()])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Limits/Call", None, None)
                with pytest.raises(aio.AioRpcError) as rate:
                    await call(b"rate")
                with pytest.raises(aio.AioRpcError) as invalid:
                    await call(b"spec")
        finally:
            await server.stop(None)
        assert rate.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rate.value.details() == "rate limit: 5 submits/s (--submit-rate); retry in 0.2s"
        assert retry_after(rate.value) == 0.2
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert invalid.value.details() == f"prompt: got {quote(megabyte)}"
        assert len(invalid.value.details() or "") < 200

    asyncio.run(main())
