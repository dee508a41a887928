"""The queue in memory: every QUEUED job, kept in queue-policy lanes, so
that a dispatch pass reads nothing from the database and orders only as
far as it looks.

The store stays the truth. The index is a cache of it, kept by the same
transitions that write it: a submit adds its job once committed; every
committed state change is published, and the index drops a job that left
QUEUED and takes back one that returned to it (from the copy it kept while
the job was out on a GPU, or, for a job it never had, from the store). A
stale entry cannot do harm: the store's conditional assign refuses a job
that moved, and the dispatcher then drops it. A slow resync of the queued
ids catches anything missed.

Pure code apart from what `refresh` is handed: no I/O and no clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

from scheduler.domain import Job, JobEvent, StateChange
from scheduler.queue_policy import QueuedJob, iter_order
from scheduler.states import JobState
from sdmesh.spec import BatchKey, batch_key


def _entry(job: Job) -> QueuedJob:
    return QueuedJob(job.id, job.owner, job.spec.priority, job.created_at)


def _key(entry: QueuedJob) -> tuple[float, str]:
    return entry.created_at, entry.job_id


class QueueIndex:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        # priority -> owner -> that user's jobs, oldest first
        self._lanes: dict[int, dict[str, list[QueuedJob]]] = {}
        # Jobs out on a GPU, as they were queued: a re-queue puts them back
        # without reading the store.
        self._out: dict[str, Job] = {}
        self._unknown: set[str] = set()  # returned to QUEUED, never seen here
        # Jobs that may run as one batch, by `batch_key`, oldest first.
        self._alike: dict[BatchKey, dict[str, None]] = {}
        self._per_owner: dict[str, int] = {}  # admission's per-user bound reads it

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def ids(self) -> set[str]:
        return set(self._jobs)

    def queued_by(self, owner: str) -> int:
        """How many jobs this user has queued."""
        return self._per_owner.get(owner, 0)

    def load(self, queued: Iterable[Job], out: Iterable[Job] = ()) -> None:
        """Replaces everything: the queued jobs and the active ones, as the
        store holds them when this replica starts leading."""
        self._jobs.clear()
        self._lanes.clear()
        self._unknown.clear()
        self._alike.clear()
        self._per_owner.clear()
        self._out = {job.id: job for job in out}
        for job in queued:
            self.add(job)

    def add(self, job: Job) -> None:
        """A job that is QUEUED in the store now."""
        self.discard(job.id)
        self._out.pop(job.id, None)
        self._jobs[job.id] = job
        lane = self._lanes.setdefault(job.spec.priority, {}).setdefault(job.owner, [])
        bisect.insort(lane, _entry(job), key=_key)
        self._per_owner[job.owner] = self._per_owner.get(job.owner, 0) + 1
        self._alike.setdefault(batch_key(job.spec), {})[job.id] = None

    def discard(self, job_id: str) -> Job | None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        users = self._lanes[job.spec.priority]
        lane = users[job.owner]
        entry = _entry(job)
        at = bisect.bisect_left(lane, _key(entry), key=_key)
        if at < len(lane) and lane[at].job_id == job_id:
            del lane[at]
        left = self._per_owner.pop(job.owner) - 1
        if left:
            self._per_owner[job.owner] = left
        if not lane:
            del users[job.owner]
            if not users:
                del self._lanes[job.spec.priority]
        key = batch_key(job.spec)
        alike = self._alike[key]
        del alike[job_id]
        if not alike:
            del self._alike[key]
        return job

    def observe(self, events: Iterable[JobEvent]) -> None:
        """Follows committed state changes. A job assigned is kept aside;
        one back in the queue returns, with its new attempt number; one
        that ended is forgotten."""
        for event in events:
            change = event.body
            if not isinstance(change, StateChange):
                continue
            if change.state is JobState.QUEUED:
                out = self._out.pop(event.job_id, None)
                if out is not None:
                    self.add(
                        replace(
                            out,
                            state=JobState.QUEUED,
                            attempt=event.attempt,
                            updated_at=event.time,
                            reason=change.reason,
                            node_id="",
                            node_name="",
                            gpu_index=-1,
                        )
                    )
                elif event.job_id not in self._jobs:
                    self._unknown.add(event.job_id)
                continue
            job = self.discard(event.job_id)
            if change.state.terminal:
                self._out.pop(event.job_id, None)
                self._unknown.discard(event.job_id)
            elif job is not None:
                self._out[event.job_id] = job

    def recheck(self, job_id: str) -> None:
        """A job the store says is not where the index thought: dropped,
        and read again before the next pass."""
        self.discard(job_id)
        self._unknown.add(job_id)

    def take_unknown(self) -> set[str]:
        """Jobs that returned to the queue without a copy here, for the
        caller to read from the store and `add`."""
        unknown, self._unknown = self._unknown, set()
        return unknown

    def alike(self, key: BatchKey) -> Iterator[Job]:
        """Queued jobs that may run as one batch, in the order they joined
        the queue. Do not change the index while iterating."""
        for job_id in self._alike.get(key, ()):
            yield self._jobs[job_id]

    def ordered(self, active: Mapping[str, int]) -> Iterator[Job]:
        """Queued jobs in queue-policy order, lazily. Do not change the
        index while iterating."""
        for entry in iter_order(self._lanes, active):
            yield self._jobs[entry.job_id]
