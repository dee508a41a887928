"""What the store's prebuilt statements record, on SQLite and PostgreSQL:
an attempt's times and profile, the time it queued, the first start kept
across retries, and images read back for one job and for several. Also that
a job's writes reuse statements built once, that event payloads are the
bodies' fields, and that an SQLite read is one transaction."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import sqlalchemy as sa

from scheduler.domain import StateChange
from scheduler.states import JobState
from scheduler.store import Store, statements
from scheduler.store.rows import event_row
from sdmesh.domain import AttemptOutcome, AttemptProfile, ImageInfo
from sdmesh.spec import MemoryMode
from tests.factories import make_spec

T = 1_700_000_000.0


class Clock:
    """Each reading is one second after the last: T + 1, T + 2, ..."""

    def __init__(self) -> None:
        self.now = T

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url, clock=Clock())
    store.migrate()
    yield store
    store.close()


def image(index: int) -> ImageInfo:
    return ImageInfo(index, 1234 + index, f"{index:02d}" * 32, 100 + index, 64, 64)


def assign(store: Store, job_id: str, expected_attempt: int) -> None:
    events = store.assign(
        job_id,
        expected_attempt=expected_attempt,
        node_id="n1",
        node_name="host-n1",
        gpu_index=1,
        memory_mode=MemoryMode.FULL,
        placement="fits: 2.1 of 24 GiB",
        vram_estimate_bytes=2_000,
    )
    assert events is not None


def test_an_attempt_records_its_times_and_profile(store: Store) -> None:
    store.submit("job1", "alice", make_spec(), 3)  # T+1: created, first event
    assign(store, "job1", 0)  # T+2: assigned_at; T+3: the ASSIGNED event
    assert store.start("job1", 1)  # T+4: started; T+5: the RUNNING event
    profile = AttemptProfile(load_seconds=0.5, mean_step_seconds=0.1, peak_vram_bytes=1_500)
    # T+6: the image stored; T+7: SUCCEEDED (finished_at); T+8: the attempt ended
    assert store.succeed("job1", 1, [(image(0), "job1/0.png")], profile)
    [record] = store.attempts("job1")
    assert (record.attempt, record.node_id, record.node_name, record.gpu_index) == (
        1,
        "n1",
        "host-n1",
        1,
    )
    assert (record.memory_mode, record.placement, record.vram_estimate_bytes) == (
        MemoryMode.FULL,
        "fits: 2.1 of 24 GiB",
        2_000,
    )
    assert (record.outcome, record.reason, record.profile) == ("succeeded", "", profile)
    # queued: assigned at T+2 - the QUEUED event at T+1 = 1 s
    assert record.queued_seconds == 1.0
    assert (record.assigned_at, record.started_at, record.ended_at) == (T + 2, T + 4, T + 8)
    job = store.get_job("job1")
    assert job is not None
    assert (job.started_at, job.finished_at, job.updated_at) == (T + 4, T + 7, T + 7)


def test_a_retry_queues_from_its_requeue_and_keeps_the_first_start(store: Store) -> None:
    store.submit("job1", "alice", make_spec(), 3)  # T+1
    assign(store, "job1", 0)  # T+2, T+3
    assert store.start("job1", 1)  # T+4, T+5
    # T+6: the move to FAILED (not the last failure: no row); T+7: QUEUED; T+8: ended
    assert store.requeue("job1", 1, AttemptOutcome.FAILED, "out of memory", count_failure=True)
    assign(store, "job1", 1)  # T+9: assigned_at; T+10
    assert store.start("job1", 2)  # T+11; T+12
    first, second = store.attempts("job1")
    assert (first.outcome, first.reason, first.ended_at) == ("failed", "out of memory", T + 8)
    assert first.profile == AttemptProfile()  # none was reported
    # queued again: assigned at T+9 - the QUEUED event at T+7 = 2 s
    assert (second.queued_seconds, second.started_at, second.outcome) == (2.0, T + 11, "")
    job = store.get_job("job1")
    assert job is not None
    assert (job.state, job.failures, job.attempt) == (JobState.RUNNING, 1, 2)
    assert job.started_at == T + 4  # the first start, kept


def test_jobs_read_together_get_their_own_images(store: Store) -> None:
    for job_id, count in (("a", 2), ("b", 1)):
        store.submit(job_id, "alice", make_spec(), 3)
        assign(store, job_id, 0)
        stored = [(image(index), f"{job_id}/{index}.png") for index in range(count)]
        assert store.succeed(job_id, 1, stored, AttemptProfile())
    store.submit("c", "alice", make_spec(), 3)  # still queued: no images
    expected = {"a": (image(0), image(1)), "b": (image(0),), "c": ()}
    assert {job.id: job.images for job in store.list_jobs()} == expected
    assert {job.id: job.images for job in store.jobs_by_ids(["a", "c"])} == {
        "a": expected["a"],
        "c": (),
    }
    for job_id, images in expected.items():
        job = store.get_job(job_id)
        assert job is not None and job.images == images
    assert store.image("a", 1) == (image(1), "a/1.png")


def test_a_jobs_writes_reuse_statements_built_once(store: Store) -> None:
    def run(job_id: str) -> None:
        store.submit(job_id, "alice", make_spec(), 3)
        assign(store, job_id, 0)
        assert store.start(job_id, 1)
        assert store.requeue(job_id, 1, AttemptOutcome.LOST, "node lost", count_failure=True)
        assign(store, job_id, 1)
        assert store.succeed(job_id, 2, [(image(0), f"{job_id}/0.png")], AttemptProfile())

    run("warm")
    built = statements.transition.cache_info().misses
    run("job1")
    assert statements.transition.cache_info().misses == built


def test_a_state_change_names_only_real_columns() -> None:
    with pytest.raises(ValueError, match="no column"):
        statements.transition(JobState.QUEUED, frozenset(), False, (), (("colour", None),))


@pytest.mark.parametrize(
    "body",
    [
        StateChange(JobState.RUNNING, "why", "n1", "host-n1", 2),
        StateChange(JobState.QUEUED),
        ImageInfo(1, 99, "ab" * 32, 100, 64, 32),
    ],
)
def test_an_event_payload_is_its_bodys_fields(body: StateChange | ImageInfo) -> None:
    payload = event_row("job1", 3, 1, T, body)["payload"]
    expected = asdict(body)
    if isinstance(body, StateChange):
        expected["state"] = body.state.value
    assert payload == expected
    assert payload is not vars(body)


def test_an_sqlite_read_sees_one_snapshot(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'sdmesh.db'}")
    store.migrate()
    with store.engine.connect() as conn:
        conn.execute(sa.select(sa.literal(1)))
        # BEGIN came first: the read's statements share one transaction.
        assert conn.connection.driver_connection.in_transaction  # type: ignore[union-attr]
    with store.engine.begin() as conn:
        assert conn.connection.driver_connection.in_transaction  # type: ignore[union-attr]
    store.close()
