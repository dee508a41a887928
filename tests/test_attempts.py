"""The attempts' owner on a real store, without gRPC: what a stream that
ends settles is that stream's own, even when its node has dialled again;
an assignment to a node that began draining during the write comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from scheduler.attempts import Attempts
from scheduler.cluster import Cluster
from scheduler.commands import AssignCommand
from scheduler.domain import Job
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.placement import Placed, place
from scheduler.runtime import Runtime
from scheduler.states import JobState
from scheduler.store import Database, Store
from tests.factories import make_demand, make_gpu, make_node, make_spec

NOW = 1_000.0


@asynccontextmanager
async def owner(tmp_path: Path) -> AsyncIterator[Attempts]:
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}", clock=lambda: NOW)
    store.migrate()
    db = Database(store)
    runtime = Runtime(db, Cluster(), EventHub(), ImageStore(tmp_path / "images"), lambda: NOW,
                      EstimateBook())  # fmt: skip
    try:
        yield Attempts(runtime, lease_seconds=10.0)
    finally:
        db.close()


async def queued_job(attempts: Attempts, job_id: str = "j1") -> Job:
    job, _ = await attempts.db.run(attempts.db.store.submit, job_id, "alice", make_spec(), 3)
    return job


def run(scenario: Callable[[Attempts], Coroutine[Any, Any, None]], tmp_path: Path) -> None:
    async def main() -> None:
        async with owner(tmp_path) as attempts:
            await scenario(attempts)

    asyncio.run(main())


def test_an_old_stream_that_ends_late_leaves_the_new_one_s_attempts_alone(tmp_path: Path) -> None:
    async def scenario(attempts: Attempts) -> None:
        cluster = attempts.cluster
        old = cluster.connect(make_node("n1"), NOW)
        placed = place(make_demand("j1"), [make_gpu("n1")])
        assert isinstance(placed, Placed)
        assert await attempts.assign(await queued_job(attempts), placed) == {"j1"}
        # The node dials again while its old stream looks open but silent:
        # the old stream's attempts wait for it, and the new one takes them.
        cluster.disconnect(old)
        assert attempts.orphan(old, NOW + 10, "node host-n1 reconnected") == 1
        new = cluster.connect(make_node("n1"), NOW)
        await attempts.reattach(new, [("j1", 1)])
        assert [a.job_id for a in attempts.held(new)] == ["j1"]
        # Only now does the old stream's end get settled.
        await attempts.node_gone(old)
        assert [a.job_id for a in attempts.held(new)] == ["j1"]
        assert attempts.orphans() == []
        assert attempts.held_by_node() == {"n1": attempts.held(new)}
        job = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert job is not None
        assert (job.state, job.attempt, job.failures) == (JobState.ASSIGNED, 1, 0)

    run(scenario, tmp_path)


def test_a_node_that_began_draining_during_the_write_gets_no_assignment(tmp_path: Path) -> None:
    async def scenario(attempts: Attempts) -> None:
        session = attempts.cluster.connect(make_node("n1"), NOW)
        job = await queued_job(attempts)
        placed = place(make_demand("j1"), [make_gpu("n1")])
        assert isinstance(placed, Placed)
        session.draining = True  # a Leaving or a drain arrived while placing
        assert not await attempts.assign(job, placed)
        assert attempts.held(session) == []
        assert session.outbox.empty()  # nothing was sent after its Drain
        back = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert back is not None
        # Handed back, not counted as a failure; the next try is attempt 2.
        assert (back.state, back.attempt, back.failures) == (JobState.QUEUED, 1, 0)
        assert "began draining" in back.reason
        # Undrained, it takes the job as its next attempt.
        session.draining = False
        assert await attempts.assign(back, placed)
        command = session.outbox.get_nowait()
        assert isinstance(command, AssignCommand)
        assert (command.job_id, command.attempt) == ("j1", 2)

    run(scenario, tmp_path)


def test_a_batch_goes_out_as_one_assignment_and_takes_one_slot(tmp_path: Path) -> None:
    async def scenario(attempts: Attempts) -> None:
        session = attempts.cluster.connect(make_node("n1"), NOW)
        lead, rider, gone = [await queued_job(attempts, name) for name in ("j1", "j2", "j3")]
        await attempts.db.run(attempts.db.store.cancel, "j3", "cancelled")  # moved meanwhile
        placed = place(make_demand("j1", vram_gib=3), [make_gpu("n1")])
        assert isinstance(placed, Placed)
        assert await attempts.assign(lead, placed, [rider, gone]) == {"j1", "j2"}
        command = session.outbox.get_nowait()
        assert isinstance(command, AssignCommand)
        assert command.job_id == "j1"
        assert [(p.job_id, p.attempt) for p in command.partners] == [("j2", 1)]
        held = {a.job_id: a for a in attempts.held(session)}
        assert {a.batch for a in held.values()} == {"j1"}
        # Each carries an even share of the batch's memory and time.
        assert held["j1"].vram_bytes + held["j2"].vram_bytes == placed.need.vram_bytes
        [view] = attempts.cluster.gpu_views(NOW, attempts.held_by_node())
        assert view.active_jobs == 1
        assert view.bound_bytes == placed.need.vram_bytes

    run(scenario, tmp_path)
