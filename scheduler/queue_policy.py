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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    owner: str
    priority: int
    created_at: float  # its age: a retried job keeps its place


Lane = Sequence[QueuedJob]  # one user's queued jobs at one priority, oldest first


def iter_order(
    lanes: Mapping[int, Mapping[str, Lane]], active: Mapping[str, int] | None = None
) -> Iterator[QueuedJob]:
    """The queue in the order placement should consider it, lazily: a pass
    that stops after a few jobs pays for those only. `lanes` maps each
    priority to each user's jobs, each lane sorted by (created_at, job_id);
    `active` counts each user's assigned and running jobs."""
    for priority in sorted(lanes, reverse=True):
        users = {user: lane for user, lane in lanes[priority].items() if lane}
        # (jobs this user has been given so far, its next job's age, its name)
        heap = [
            ((active or {}).get(user, 0), lane[0].created_at, user, 0)
            for user, lane in users.items()
        ]
        heapq.heapify(heap)
        while heap:
            served, _, user, position = heapq.heappop(heap)
            lane = users[user]
            yield lane[position]
            if position + 1 < len(lane):
                heapq.heappush(
                    heap, (served + 1, lane[position + 1].created_at, user, position + 1)
                )


def order(jobs: Sequence[QueuedJob], active: Mapping[str, int] | None = None) -> list[QueuedJob]:
    """The queue in the order placement should consider it. `active` counts
    each user's assigned and running jobs."""
    lanes: dict[int, dict[str, list[QueuedJob]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        lanes[job.priority][job.owner].append(job)
    for users in lanes.values():
        for lane in users.values():
            lane.sort(key=lambda job: (job.created_at, job.job_id))
    return list(iter_order(lanes, active))
