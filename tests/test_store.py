"""The fenced job store, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scheduler.domain import StateChange
from scheduler.estimator import LearnedPeak
from scheduler.states import JobState
from scheduler.store import Store
from sdmesh.domain import AttemptOutcome, AttemptProfile, ImageInfo
from sdmesh.spec import MemoryMode
from tests.factories import make_node, make_spec


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url, clock=Clock())
    store.migrate()
    yield store
    store.close()


def submit(store: Store, job_id: str = "job1", **spec_overrides: object) -> None:
    _, created = store.submit(job_id, "alice", make_spec(**spec_overrides), max_attempts=3)
    assert created


def assign(store: Store, job_id: str = "job1", expected_attempt: int = 0) -> None:
    events = store.assign(
        job_id,
        expected_attempt=expected_attempt,
        node_id="n1",
        node_name="host-n1",
        gpu_index=0,
        memory_mode=MemoryMode.FULL,
    )
    assert events is not None


IMAGE = ImageInfo(index=0, seed=1234, sha256="ab" * 32, size_bytes=100, width=64, height=64)


def states(store: Store, job_id: str = "job1") -> list[JobState]:
    return [e.body.state for e in store.events_after(job_id, 0) if isinstance(e.body, StateChange)]


def test_submit_stores_a_queued_job_with_its_first_event(store: Store) -> None:
    submit(store)
    job = store.get_job("job1")
    assert job is not None
    assert (job.state, job.attempt, job.failures, job.owner) == (JobState.QUEUED, 0, 0, "alice")
    assert job.spec == make_spec()
    [event] = store.events_after("job1", 0)
    assert (event.seq, event.body) == (1, StateChange(JobState.QUEUED))


def test_a_repeated_request_id_returns_the_first_job(store: Store) -> None:
    first, created = store.submit("job1", "alice", make_spec(request_id="r-1"), max_attempts=3)
    again, created_again = store.submit("job2", "alice", make_spec(request_id="r-1"), 3)
    other_user, created_other = store.submit("job3", "bob", make_spec(request_id="r-1"), 3)
    assert (created, created_again, created_other) == (True, False, True)
    assert again.id == first.id == "job1"
    assert other_user.id == "job3"
    assert store.get_job("job2") is None


def test_the_happy_path_writes_consecutive_events(store: Store) -> None:
    submit(store)
    assign(store)
    assert store.start("job1", 1) is not None
    events = store.succeed("job1", 1, [(IMAGE, "job1/0.png")], AttemptProfile(0.5, 0.1, 123))
    assert events is not None
    assert [e.seq for e in store.events_after("job1", 0)] == [1, 2, 3, 4, 5]
    assert states(store) == [
        JobState.QUEUED,
        JobState.ASSIGNED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
    assert store.events_after("job1", 3)[0].body == IMAGE
    job = store.get_job("job1")
    assert job is not None
    assert (job.state, job.attempt, job.node_id, job.gpu_index) == (JobState.SUCCEEDED, 1, "n1", 0)
    assert job.images == (IMAGE,)
    assert job.finished_at is not None and job.started_at is not None
    assert store.image("job1", 0) == (IMAGE, "job1/0.png")


def test_a_job_is_assigned_once_per_read(store: Store) -> None:
    submit(store)
    assign(store)
    # A second dispatcher that read the job at attempt 0 loses.
    again = store.assign(
        "job1",
        expected_attempt=0,
        node_id="n2",
        node_name="x",
        gpu_index=0,
        memory_mode=MemoryMode.FULL,
    )
    assert again is None
    job = store.get_job("job1")
    assert job is not None and (job.node_id, job.attempt) == ("n1", 1)


def test_a_stale_attempt_changes_nothing(store: Store) -> None:
    submit(store)
    assign(store)
    store.start("job1", 1)
    assert store.requeue("job1", 1, AttemptOutcome.LOST, "node n1 lost", count_failure=True)
    assign(store, expected_attempt=1)
    before = store.get_job("job1")
    seqs_before = [e.seq for e in store.events_after("job1", 0)]

    # Attempt 1's agent comes back and reports as if nothing happened.
    assert store.start("job1", 1) is None
    assert store.succeed("job1", 1, [(IMAGE, "stale.png")], AttemptProfile()) is None
    assert store.requeue("job1", 1, AttemptOutcome.FAILED, "late", count_failure=True) is None

    assert store.get_job("job1") == before
    assert [e.seq for e in store.events_after("job1", 0)] == seqs_before
    assert store.image("job1", 0) is None


def test_failures_up_to_max_attempts_fail_the_job_with_every_reason(store: Store) -> None:
    submit(store)
    for attempt in (1, 2, 3):
        assign(store, expected_attempt=attempt - 1)
        store.start("job1", attempt)
        events = store.requeue(
            "job1", attempt, AttemptOutcome.FAILED, f"out of memory #{attempt}", count_failure=True
        )
        assert events is not None
    job = store.get_job("job1")
    assert job is not None
    assert (job.state, job.failures, job.attempt) == (JobState.FAILED, 3, 3)
    assert job.reason == (
        "failed 3 times; attempt 1: out of memory #1; attempt 2: out of memory #2; "
        "attempt 3: out of memory #3"
    )
    assert states(store)[-1] == JobState.FAILED


def test_a_release_requeues_without_counting_a_failure(store: Store) -> None:
    submit(store)
    for attempt in (1, 2, 3, 4):
        assign(store, expected_attempt=attempt - 1)
        assert store.requeue(
            "job1", attempt, AttemptOutcome.RELEASED, "agent stopping", count_failure=False
        )
    job = store.get_job("job1")
    assert job is not None
    assert (job.state, job.failures, job.attempt) == (JobState.QUEUED, 0, 4)
    assert [a.outcome for a in store.attempts("job1")] == ["released"] * 4


def test_cancel_wins_over_a_later_result(store: Store) -> None:
    submit(store)
    assign(store)
    store.start("job1", 1)
    result = store.cancel("job1", "cancelled by alice")
    assert result is not None
    before, events = result
    assert before.state == JobState.RUNNING
    assert events is not None and events[-1].terminal
    assert store.succeed("job1", 1, [(IMAGE, "late.png")], AttemptProfile()) is None
    job = store.get_job("job1")
    assert job is not None and job.state == JobState.CANCELLED and job.images == ()
    assert [(a.attempt, a.outcome, a.reason) for a in store.attempts("job1")] == [
        (1, "stopped", "cancelled by alice")
    ]
    # Cancelling again reports the job as it is and writes nothing.
    again = store.cancel("job1", "again")
    assert again is not None and again[1] is None
    assert states(store).count(JobState.CANCELLED) == 1


def test_cancel_of_an_unknown_job(store: Store) -> None:
    assert store.cancel("nope", "x") is None


def test_a_queued_job_can_fail_but_an_assigned_one_cannot_fail_that_way(store: Store) -> None:
    submit(store, "a")
    submit(store, "b")
    assign(store, "b")
    assert store.fail("a", "fits no GPU") is not None
    assert store.fail("b", "fits no GPU") is None


def test_list_jobs_pages_newest_first_and_filters(store: Store) -> None:
    for n in range(5):
        submit(store, f"job{n}")
    assign(store, "job2")
    page = store.list_jobs(limit=2)
    assert [j.id for j in page] == ["job4", "job3"]
    rest = store.list_jobs(limit=10, before=(page[-1].created_at, page[-1].id))
    assert [j.id for j in rest] == ["job2", "job1", "job0"]
    assert [j.id for j in store.list_jobs(states=[JobState.ASSIGNED])] == ["job2"]
    assert store.list_jobs(owner="bob") == []
    assert [j.id for j in store.queued_jobs()] == ["job0", "job1", "job3", "job4"]
    assert [j.id for j in store.active_jobs()] == ["job2"]


def test_queued_jobs_come_by_priority_then_age(store: Store) -> None:
    submit(store, "low", priority=-5)
    submit(store, "old")
    submit(store, "high", priority=10)
    submit(store, "new")
    assert [j.id for j in store.queued_jobs()] == ["high", "old", "new", "low"]


def test_nodes_and_models_are_remembered(store: Store) -> None:
    store.nodes.upsert(make_node("n1", models=("tiny", "sdxl")))
    store.nodes.upsert(make_node("n2", models=("tiny",)))
    assert [r.info.node_id for r in store.nodes.seen_since(0)] == ["n1", "n2"]
    known = {m.name: m.node_ids for m in store.nodes.models_seen_since(0)}
    assert known == {"sdxl": ("n1",), "tiny": ("n1", "n2")}
    # A later hello replaces the node's model list.
    store.nodes.upsert(make_node("n1", models=("tiny",)))
    assert {m.name for m in store.nodes.models_seen_since(0)} == {"tiny"}
    record = store.nodes.seen_since(0)[0]
    assert record.info == make_node("n1", models=("tiny",))
    cutoff = store.clock()
    store.nodes.touch(["n2"])
    assert [r.info.node_id for r in store.nodes.seen_since(cutoff)] == ["n2"]


def test_a_learned_estimate_is_kept_only_when_larger(store: Store) -> None:
    key = ("sdxl", 1024 * 1024, 1, MemoryMode.FULL, "")
    store.estimates.save(key, LearnedPeak(11 * 2**30, 1024 * 1024))
    store.estimates.save(key, LearnedPeak(10 * 2**30, 1000 * 1000))  # smaller: ignored
    assert store.estimates.load() == {key: LearnedPeak(11 * 2**30, 1024 * 1024)}
    store.estimates.save(key, LearnedPeak(12 * 2**30, 1000 * 1000))
    other = ("sdxl", 1024 * 1024, 2, MemoryMode.MODEL_OFFLOAD, "img2img")
    store.estimates.save(other, LearnedPeak(9 * 2**30, 2 * 1024 * 1024))
    assert store.estimates.load() == {
        key: LearnedPeak(12 * 2**30, 1000 * 1000),
        other: LearnedPeak(9 * 2**30, 2 * 1024 * 1024),
    }
