"""The queue policy: priority, then fair share between users, then age."""

from __future__ import annotations

from scheduler.queue_policy import QueuedJob, order


def job(job_id: str, owner: str, created_at: float, priority: int = 0) -> QueuedJob:
    return QueuedJob(job_id, owner, priority, created_at)


def ids(jobs: list[QueuedJob]) -> list[str]:
    return [j.job_id for j in jobs]


def test_priority_comes_first_then_age() -> None:
    queue = [
        job("old", "a", 1),
        job("urgent", "a", 5, priority=10),
        job("low", "a", 0, priority=-1),
    ]
    assert ids(order(queue)) == ["urgent", "old", "low"]


def test_users_take_turns_at_equal_priority() -> None:
    # a queued 4 jobs before b's 2: a1 (oldest head), b1, a2, b2, a3, a4
    queue = [job(f"a{i}", "a", i) for i in range(1, 5)] + [job("b1", "b", 10), job("b2", "b", 11)]
    assert ids(order(queue)) == ["a1", "b1", "a2", "b2", "a3", "a4"]


def test_jobs_already_running_count_against_their_user() -> None:
    # a has 3 jobs on GPUs already, b none: b's single job goes first, and
    # a's queue resumes after it.
    queue = [job(f"a{i}", "a", i) for i in range(1, 51)] + [job("b1", "b", 100)]
    ordered = ids(order(queue, active={"a": 3}))
    assert ordered[0] == "b1"
    assert ordered[1:4] == ["a1", "a2", "a3"]
    # With nothing running, b still waits at most one of a's jobs.
    assert ids(order(queue))[:2] == ["a1", "b1"]


def test_fair_share_works_within_each_priority() -> None:
    queue = [job("a-high", "a", 5, priority=1), job("b-low", "b", 0), job("a-low", "a", 1)]
    assert ids(order(queue, active={"a": 10})) == ["a-high", "b-low", "a-low"]
