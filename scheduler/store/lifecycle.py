"""Removing jobs: a user's delete, and retention (`--retain`) of finished
jobs. A removed job leaves no row behind: its events, attempts, image
records and the rows naming its input images go in the same transaction as
the job, and so does each of its owner's inputs rows that no other job of
theirs names. The caller then deletes the image files
(`ImageStore.remove_job`) and the input files no row names any more
(`InputFiles.forget`), after the commit."""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa

from scheduler.states import TERMINAL
from scheduler.store.inputs import release_jobs
from scheduler.store.leader import Fence
from scheduler.store.schema import attempts, images, job_events, jobs


@dataclass(frozen=True)
class Removed:
    job_ids: list[str] = field(default_factory=list)
    # The sha256 of the inputs the removed jobs named: each file goes if no
    # inputs row names it any more.
    inputs: list[str] = field(default_factory=list)


class JobRemoval:
    def __init__(self, engine: sa.Engine, fence: Fence) -> None:
        self.engine = engine
        self.fence = fence

    def delete_finished(self, job_ids: list[str]) -> Removed:
        """Deletes those of the jobs that have ended. A job still queued or
        running is left alone (cancel it first)."""
        if not job_ids:
            return Removed()
        done = [state.value for state in TERMINAL]
        with self.fence.begin() as conn:
            found = [
                row.id
                for row in conn.execute(
                    sa.select(jobs.c.id).where(jobs.c.id.in_(job_ids), jobs.c.state.in_(done))
                )
            ]
            named: list[str] = []
            if found:
                named = release_jobs(conn, found)
                for table in (job_events, images, attempts):
                    conn.execute(sa.delete(table).where(table.c.job_id.in_(found)))
                conn.execute(sa.delete(jobs).where(jobs.c.id.in_(found)))
        return Removed(found, named)

    def finished_before(self, cutoff: float, limit: int = 500) -> list[str]:
        """Ids of jobs that ended before `cutoff`, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs.c.id)
                .where(jobs.c.finished_at < cutoff)
                .order_by(jobs.c.finished_at)
                .limit(limit)
            )
            return [row.id for row in rows]
