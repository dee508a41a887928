"""The rows of uploaded input images: one per (sha256, owner), because a
user may name only what they uploaded themselves, and the `job_inputs`
rows that say which jobs name which inputs.

The files themselves are content-addressed under the data dir
(`scheduler.inputs`); a file goes only once no row names its sha256, and
only after the transaction that removed the last row has committed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from scheduler.store.leader import Fence
from scheduler.store.schema import inputs, job_inputs, jobs
from sdmesh.kinds import InputInfo

# Bound parameters per statement stay well under SQLite's limit.
CHUNK = 500


def _chunks(items: Collection[str]) -> Iterable[list[str]]:
    ordered = sorted(items)
    for start in range(0, len(ordered), CHUNK):
        yield ordered[start : start + CHUNK]


def _info(row: sa.Row[tuple[object, ...]]) -> InputInfo:
    return InputInfo(row.sha256, row.size_bytes, row.width, row.height, row.format)


class InputRegistry:
    def __init__(self, engine: sa.Engine, fence: Fence, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.fence = fence
        self.clock = clock

    def record(self, owner: str, info: InputInfo) -> None:
        """Records that `owner` uploaded the input; uploading it again
        only renews its time (so the day an unused upload is kept starts
        again)."""
        values = {
            "size_bytes": info.size_bytes,
            "width": info.width,
            "height": info.height,
            "format": info.format,
            "created_at": self.clock(),
        }
        mine = sa.and_(inputs.c.sha256 == info.sha256, inputs.c.owner == owner)
        for _ in range(2):  # a concurrent first upload of the same bytes may win the insert
            try:
                with self.fence.begin() as conn:
                    if conn.execute(sa.update(inputs).where(mine).values(**values)).rowcount:
                        return
                    conn.execute(
                        sa.insert(inputs).values(sha256=info.sha256, owner=owner, **values)
                    )
                    return
            except IntegrityError:
                continue
        raise RuntimeError(f"input {info.sha256} of {owner} could not be recorded")

    def sizes(self, owner: str, shas: Collection[str]) -> dict[str, InputInfo]:
        """The inputs among `shas` that `owner` uploaded, by sha256: what
        `sdmesh.spec.resolve` may let their job name. Another user's
        upload of the same bytes is not theirs."""
        if not shas:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(inputs).where(inputs.c.owner == owner, inputs.c.sha256.in_(set(shas)))
            ).all()
        return {row.sha256: _info(row) for row in rows}

    def named_by(self, job_id: str) -> list[str]:
        """The sha256 of every input the job names."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(job_inputs.c.sha256).where(job_inputs.c.job_id == job_id)
            ).all()
        return sorted(row.sha256 for row in rows)

    def stored(self, shas: Collection[str]) -> set[str]:
        """Those of `shas` that some upload row or some job still names:
        their files stay. (A job whose owner's upload row went while it was
        submitted still names its input.)"""
        found: set[str] = set()
        with self.engine.connect() as conn:
            for part in _chunks(shas):
                for table in (inputs, job_inputs):
                    rows = conn.execute(
                        sa.select(table.c.sha256).distinct().where(table.c.sha256.in_(part))
                    )
                    found.update(row.sha256 for row in rows)
        return found

    def unused_before(self, cutoff: float, limit: int = 500) -> list[str]:
        """Removes the uploads made before `cutoff` that no job of their
        owner names (never used, or their jobs are gone) and returns their
        sha256: their files may go once no other owner's row names them."""
        unused = (
            sa.select(inputs.c.sha256, inputs.c.owner)
            .where(
                inputs.c.created_at < cutoff,
                ~sa.exists(
                    sa.select(job_inputs.c.job_id)
                    .join(jobs, jobs.c.id == job_inputs.c.job_id)
                    .where(job_inputs.c.sha256 == inputs.c.sha256, jobs.c.owner == inputs.c.owner)
                ),
            )
            .order_by(inputs.c.created_at)
            .limit(limit)
        )
        with self.fence.begin() as conn:
            pairs = [(row.sha256, row.owner) for row in conn.execute(unused)]
            drop_rows(conn, pairs)
        return sorted({sha for sha, _ in pairs})


def drop_rows(conn: sa.Connection, pairs: Collection[tuple[str, str]]) -> None:
    """Deletes the inputs rows of these (sha256, owner) pairs."""
    pairs = sorted(set(pairs))
    for start in range(0, len(pairs), CHUNK // 2):
        part = pairs[start : start + CHUNK // 2]
        conn.execute(
            sa.delete(inputs).where(
                sa.or_(*(sa.and_(inputs.c.sha256 == s, inputs.c.owner == o) for s, o in part))
            )
        )


def release_jobs(conn: sa.Connection, job_ids: Collection[str]) -> list[str]:
    """In a transaction deleting these jobs: removes their job_inputs rows,
    and the inputs rows of their owners that no other job of that owner
    names any more. Returns the sha256 the jobs named: their files go if
    no row names them after the commit (`scheduler.inputs`)."""
    named = [
        (row.sha256, row.owner)
        for part in _chunks(job_ids)
        for row in conn.execute(
            sa.select(job_inputs.c.sha256, jobs.c.owner)
            .join(jobs, jobs.c.id == job_inputs.c.job_id)
            .where(job_inputs.c.job_id.in_(part))
        )
    ]
    if not named:
        return []
    for part in _chunks(job_ids):
        conn.execute(sa.delete(job_inputs).where(job_inputs.c.job_id.in_(part)))
    still_named = {
        (row.sha256, row.owner)
        for part in _chunks({sha for sha, _ in named})
        for row in conn.execute(
            sa.select(job_inputs.c.sha256, jobs.c.owner)
            .join(jobs, jobs.c.id == job_inputs.c.job_id)
            .where(job_inputs.c.sha256.in_(part))
        )
    }
    drop_rows(conn, {pair for pair in named if pair not in still_named})
    return sorted({sha for sha, _ in named})
