"""The in-memory event hub: fan-out, coalescing for slow watchers, and the
latest preview kept for late watchers."""

from __future__ import annotations

import asyncio

from scheduler.domain import JobEvent, StateChange
from scheduler.events import EventHub
from scheduler.states import JobState
from sdmesh.domain import Preview, Progress


def progress(step: int, job: str = "j") -> JobEvent:
    return JobEvent(job, 0, 1, 0.0, Progress(step, 10))


def preview(step: int, job: str = "j") -> JobEvent:
    return JobEvent(job, 0, 1, 0.0, Preview(step, 10, 8, 8, b"png"))


def state(seq: int, value: JobState, job: str = "j") -> JobEvent:
    return JobEvent(job, seq, 1, 0.0, StateChange(value))


def drain(hub_subscription: object) -> list[JobEvent]:
    async def take() -> list[JobEvent]:
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(hub_subscription.get(), 0.01))  # type: ignore[attr-defined]
            except TimeoutError:
                return got

    return asyncio.run(take())


def test_subscribers_get_events_for_their_job_only() -> None:
    hub = EventHub()
    mine, other = hub.subscribe("j"), hub.subscribe("k")
    hub.publish([state(2, JobState.RUNNING), progress(1), state(1, JobState.QUEUED, job="k")])
    assert [e.body for e in drain(mine)] == [StateChange(JobState.RUNNING), Progress(1, 10)]
    assert [e.seq for e in drain(other)] == [1]
    mine.close()
    assert hub.watcher_count("j") == 0


def test_a_slow_watcher_keeps_only_the_newest_progress_and_preview() -> None:
    hub = EventHub()
    with hub.subscribe("j") as subscription:
        hub.publish([progress(1), preview(1), progress(2), preview(2), progress(3)])
        hub.publish([state(3, JobState.SUCCEEDED), progress(4)])
        got = drain(subscription)
    # Durable events are never dropped, and order around them is kept.
    assert [(type(e.body).__name__, getattr(e.body, "step", e.seq)) for e in got] == [
        ("Preview", 2),
        ("Progress", 3),
        ("StateChange", 3),
        ("Progress", 4),
    ]


def test_the_latest_preview_outlives_the_job_for_late_watchers() -> None:
    hub = EventHub(retain_finished=1)
    hub.publish([preview(5), progress(6), state(4, JobState.SUCCEEDED)])
    latest = hub.latest_preview("j")
    assert latest is not None
    assert isinstance(latest.body, Preview)
    assert latest.body.step == 5
    latest_progress = hub.latest_progress("j")
    assert latest_progress is not None
    assert latest_progress.body == Progress(6, 10)
    # Only a bounded number of finished jobs is remembered.
    hub.publish([preview(1, job="k"), state(4, JobState.FAILED, job="k")])
    assert hub.latest_preview("j") is None
    assert hub.latest_preview("k") is not None
