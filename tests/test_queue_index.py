"""The queue in memory: it follows committed state changes, keeps the queue
policy's order, and gives back a job that returns to the queue without a
read; jobs it never had are named for the dispatcher to read."""

from __future__ import annotations

from scheduler.domain import Job, JobEvent, StateChange
from scheduler.queue import QueueIndex
from scheduler.states import JobState
from tests.factories import make_queued_job


def job(job_id: str, owner: str = "a", created_at: float = 0.0, priority: int = 0) -> Job:
    return make_queued_job(job_id, owner, created_at, priority=priority)


def change(job_id: str, state: JobState, attempt: int, at: float = 10.0) -> JobEvent:
    return JobEvent(job_id, 2, attempt, at, StateChange(state, reason=f"to {state.value}"))


def ids(index: QueueIndex, active: dict[str, int] | None = None) -> list[str]:
    return [j.id for j in index.ordered(active or {})]


def test_order_is_priority_then_fair_share_then_age() -> None:
    index = QueueIndex()
    for j in [job("a1", "a", 1), job("a2", "a", 2), job("b1", "b", 3), job("u", "c", 9, 5)]:
        index.add(j)
    assert ids(index) == ["u", "a1", "b1", "a2"]
    assert ids(index, {"a": 2}) == ["u", "b1", "a1", "a2"]
    index.discard("a1")
    assert ids(index) == ["u", "a2", "b1"]
    assert len(index) == 3 and "a1" not in index


def test_it_follows_assignments_requeues_and_ends() -> None:
    index = QueueIndex()
    index.add(job("j1", created_at=1.0))
    index.add(job("j2", created_at=2.0))
    index.observe([change("j1", JobState.ASSIGNED, 1)])
    assert ids(index) == ["j2"]
    index.observe([change("j1", JobState.RUNNING, 1)])
    # Back in the queue: its old place (age), its new attempt, no read needed.
    index.observe([change("j1", JobState.QUEUED, 1, at=20.0)])
    back = index.get("j1")
    assert back is not None
    assert (back.attempt, back.updated_at, back.reason) == (1, 20.0, "to QUEUED")
    assert ids(index) == ["j1", "j2"]
    assert index.take_unknown() == set()
    index.observe([change("j2", JobState.CANCELLED, 0)])
    assert ids(index) == ["j1"]
    # A job it never had that comes back is named for a read, once.
    index.observe([change("other", JobState.QUEUED, 3)])
    assert index.take_unknown() == {"other"}
    assert index.take_unknown() == set()


def test_recheck_drops_a_job_and_asks_for_it_again() -> None:
    index = QueueIndex()
    index.add(job("j1"))
    index.recheck("j1")
    assert "j1" not in index
    assert index.take_unknown() == {"j1"}


def test_load_replaces_everything() -> None:
    index = QueueIndex()
    index.add(job("stale"))
    running = job("out")
    index.load([job("q1")], [running])
    assert ids(index) == ["q1"]
    index.observe([change("out", JobState.QUEUED, 1)])
    assert ids(index) == ["out", "q1"]
