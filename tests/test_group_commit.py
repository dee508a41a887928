"""Group commit: concurrent submits share one transaction, each caller is
answered after it commits, and a failing item fails only its own caller."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from scheduler.store import Database, Store
from scheduler.store.group import GroupCommit
from scheduler.store.store import Submission
from sdmesh.spec import MemoryMode
from tests.factories import make_spec


def store(tmp_path: Path) -> Store:
    created = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    created.migrate()
    return created


def test_concurrent_submits_share_transactions_and_are_all_durable(tmp_path: Path) -> None:
    db = Database(store(tmp_path))

    async def main() -> list[tuple[str, bool]]:
        submit = GroupCommit(db, db.store.submit_many)
        results = await asyncio.gather(
            *(
                submit(Submission(f"j{n}", "alice", make_spec(request_id=f"r{n % 40}"), 3))
                for n in range(50)
            )
        )
        assert submit.batches < 10  # 50 callers, a handful of transactions
        return [(job.id, created) for job, created in results]

    results = asyncio.run(main())
    # Request ids r0..r9 came twice: the second of each gets the first's job.
    assert sum(created for _, created in results) == 40
    assert results[45] == ("j5", False)
    stored = db.store.queued_jobs(None, None)
    assert sorted(j.id for j in stored) == sorted(f"j{n}" for n in range(40))
    db.close()


def test_a_bad_item_fails_alone(tmp_path: Path) -> None:
    db = Database(store(tmp_path))

    def write_many(items: Sequence[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    async def main() -> list[object]:
        write = GroupCommit(db, write_many)
        return await asyncio.gather(*(write(i) for i in ["a", "bad", "c"]), return_exceptions=True)

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("A", "C")
    assert isinstance(bad, ValueError)
    db.close()


def test_a_request_id_used_before_returns_the_stored_job(tmp_path: Path) -> None:
    jobs = store(tmp_path)
    _, created = jobs.submit("j1", "alice", make_spec(request_id="same"), 3)
    assert created
    again = jobs.submit_many(
        [
            Submission("j2", "alice", make_spec(request_id="same"), 3),
            Submission("j3", "bob", make_spec(request_id="same"), 3),
        ]
    )
    assert [(j.id, c) for j, c in again] == [("j1", False), ("j3", True)]
    with pytest.raises(Exception):  # noqa: B017, PT011 - the same id twice is refused
        jobs.submit_many([Submission("j1", "carol", make_spec(), 3)])
    jobs.close()


def test_state_changes_that_arrive_together_share_one_transaction(tmp_path: Path) -> None:
    db = Database(store(tmp_path))
    for n in range(3):
        db.store.submit(f"j{n}", "alice", make_spec(), 3)

    async def main() -> list[object]:
        assigns = [
            db.write(
                db.store.assign,
                f"j{n}",
                expected_attempt=0,
                node_id="n1",
                node_name="host",
                gpu_index=0,
                memory_mode=MemoryMode.FULL,
            )
            for n in range(3)
        ]
        # j9 does not exist: its write changes nothing and the others stand.
        return await asyncio.gather(*assigns, db.write(db.store.start, "j9", 1))

    *assigned, missing = asyncio.run(main())
    assert all(events for events in assigned)
    assert missing is None
    assert db._writes.batches == 1
    assert {job.state.value for job in db.store.active_jobs()} == {"ASSIGNED"}
    db.close()
