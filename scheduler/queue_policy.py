"""The order queued jobs are considered in: priority first; then fair share
between users at equal priority, round-robin; then age.

Round-robin counts the jobs a user already has assigned or running, so a
user with one job waiting goes ahead of a user with 500: the second user
waits at most for the jobs already bound to GPUs (one running and one
prefetched per GPU), never for the other user's queue.

Pure code: no I/O and no clock.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    owner: str
    priority: int
    created_at: float  # its age: a retried job keeps its place


def order(jobs: Sequence[QueuedJob], active: Mapping[str, int] | None = None) -> list[QueuedJob]:
    """The queue in the order placement should consider it. `active` counts
    each user's assigned and running jobs."""
    by_priority: dict[int, dict[str, list[QueuedJob]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        by_priority[job.priority][job.owner].append(job)
    ordered: list[QueuedJob] = []
    for priority in sorted(by_priority, reverse=True):
        users = by_priority[priority]
        for queue in users.values():
            queue.sort(key=lambda job: (job.created_at, job.job_id))
        # (jobs this user has been given so far, its next job's age, its name)
        heap = [
            ((active or {}).get(user, 0), queue[0].created_at, user, 0)
            for user, queue in users.items()
        ]
        heapq.heapify(heap)
        while heap:
            served, _, user, position = heapq.heappop(heap)
            queue = users[user]
            ordered.append(queue[position])
            if position + 1 < len(queue):
                heapq.heappush(
                    heap, (served + 1, queue[position + 1].created_at, user, position + 1)
                )
    return ordered
