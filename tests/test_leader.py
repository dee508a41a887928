"""The leader lease and the epoch fence, on SQLite and PostgreSQL: one
replica leads at a time, a takeover raises the epoch, and a replica whose
epoch is stale writes nothing. Also: claims (assignments) are safe when
several writers race for the same job."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from scheduler.store import Store
from scheduler.store.leader import LeaderLease, NotLeader
from scheduler.store.schema import attempts, jobs
from sdmesh.spec import MemoryMode
from tests.factories import make_spec


@pytest.fixture
def store(db_url: str) -> Store:
    store = Store(db_url)
    store.migrate()
    return store


def expire(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE leader SET expires_at = 0"))


def test_one_replica_leads_and_a_takeover_raises_the_epoch(store: Store) -> None:
    a = LeaderLease(store.engine, "replica-a", "a:1")
    b = LeaderLease(store.engine, "replica-b", "b:1")
    assert a.acquire(30.0, None) == 1
    assert b.acquire(30.0, None) is None  # a holds it
    assert a.acquire(30.0, 1) == 1  # a renewal keeps the epoch
    record = a.read()
    assert (record.holder, record.address, record.expired) == ("replica-a", "a:1", False)
    expire(store)  # a was paused past its lease
    assert b.acquire(30.0, None) == 2
    assert a.acquire(30.0, 1) is None  # a woke up: it is not the leader any more
    b.release(2)
    assert a.read().expired
    assert a.acquire(30.0, None) == 3
    store.close()


def test_a_restarted_replica_with_the_same_id_takes_its_lease_back_at_once(store: Store) -> None:
    lease = LeaderLease(store.engine, "replica-a", "a:1")
    assert lease.acquire(30.0, None) == 1
    # The same id can only be a new run of that replica (its data dir is locked).
    assert lease.acquire(30.0, None) == 2
    store.close()


def test_a_replica_with_a_stale_epoch_commits_nothing(store: Store) -> None:
    a = LeaderLease(store.engine, "replica-a", "a:1")
    epoch = a.acquire(30.0, None)
    store.fence.epoch = epoch
    lost: list[bool] = []
    store.fence.on_lost = lambda: lost.append(True)
    job, _ = store.submit("j1", "alice", make_spec(), 3)
    expire(store)
    assert LeaderLease(store.engine, "replica-b", "b:1").acquire(30.0, None) == 2
    with pytest.raises(NotLeader, match="lost the leader lease"):
        store.submit("j2", "alice", make_spec(), 3)
    with pytest.raises(NotLeader):
        store.assign(
            job.id,
            expected_attempt=0,
            node_id="n",
            node_name="n",
            gpu_index=0,
            memory_mode=MemoryMode.FULL,
        )
    with pytest.raises(NotLeader):
        store.cancel(job.id, "cancelled")
    assert lost
    assert store.get_job("j2") is None
    unchanged = store.get_job(job.id)
    assert unchanged is not None
    assert (unchanged.state, unchanged.attempt) == ("QUEUED", 0)
    store.close()


def test_racing_claims_on_one_job_give_exactly_one_attempt(db_url: str, store: Store) -> None:
    """Eight writers, each with its own engine (as replicas have), claim the
    same queued job at once. The conditional UPDATE lets exactly one win."""
    job, _ = store.submit("race", "alice", make_spec(), 3)
    writers = [Store(db_url) for _ in range(8)]
    start = threading.Barrier(len(writers))
    results: list[object] = [None] * len(writers)

    def claim(index: int) -> None:
        start.wait()
        results[index] = writers[index].assign(
            job.id,
            expected_attempt=0,
            node_id=f"n{index}",
            node_name=f"n{index}",
            gpu_index=0,
            memory_mode=MemoryMode.FULL,
        )

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [index for index, result in enumerate(results) if result is not None]
    assert len(winners) == 1
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(attempts.c.node_id)).scalars().all()
        state, attempt = conn.execute(sa.select(jobs.c.state, jobs.c.attempt)).one()
    assert rows == [f"n{winners[0]}"]
    assert (state, attempt) == ("ASSIGNED", 1)
    for writer in writers:
        writer.close()
    store.close()
