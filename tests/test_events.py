"""The in-memory event hub: fan-out, coalescing for slow watchers, the
latest preview kept for late watchers of a running job, and the bounds on
previews: their size, their rate, and the memory they hold."""

from __future__ import annotations

import asyncio

from scheduler.domain import JobEvent, StateChange
from scheduler.events import EventHub
from scheduler.states import JobState
from scheduler.uploads import MAX_PREVIEW_BYTES
from sdmesh.domain import Preview, Progress


def progress(step: int, job: str = "j") -> JobEvent:
    return JobEvent(job, 0, 1, 0.0, Progress(step, 10))


def preview(step: int, job: str = "j", *, at: float = 0.0, size: int = 3) -> JobEvent:
    return JobEvent(job, 0, 1, at, Preview(step, 10, 8, 8, b"p" * size))


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


def test_a_finished_job_keeps_its_progress_but_not_its_preview() -> None:
    hub = EventHub(retain_finished=1)
    hub.publish([preview(5), progress(6)])
    latest = hub.latest_preview("j")
    assert latest is not None
    assert isinstance(latest.body, Preview)
    assert latest.body.step == 5
    hub.publish([state(4, JobState.SUCCEEDED)])
    assert hub.latest_preview("j") is None  # a late watcher of a finished job gets none
    assert (hub.previews_kept(), hub.preview_bytes) == (0, 0)
    latest_progress = hub.latest_progress("j")
    assert latest_progress is not None
    assert latest_progress.body == Progress(6, 10)
    # A preview that comes after the end is not kept either, nor sent.
    with hub.subscribe("j") as late:
        hub.publish([preview(7)])
        assert drain(late) == []
    assert hub.latest_preview("j") is None
    # Only a bounded number of finished jobs is remembered.
    hub.publish([progress(1, job="k"), state(4, JobState.FAILED, job="k")])
    assert hub.latest_progress("j") is None
    assert hub.latest_progress("k") is not None


def test_a_re_queued_job_drops_its_old_attempt_s_preview() -> None:
    hub = EventHub()
    hub.publish([preview(3), state(4, JobState.QUEUED)])
    assert hub.latest_preview("j") is None
    assert hub.preview_bytes == 0


def test_an_oversized_preview_goes_nowhere() -> None:
    hub = EventHub()
    with hub.subscribe("j") as watcher:
        hub.publish([preview(1, size=MAX_PREVIEW_BYTES + 1), preview(2, size=MAX_PREVIEW_BYTES)])
        assert [e.body.step for e in drain(watcher)] == [2]  # type: ignore[union-attr]
    assert hub.previews_dropped == 1


def test_previews_beyond_a_job_s_rate_are_dropped() -> None:
    hub = EventHub()
    with hub.subscribe("j") as watcher:
        # 20 at once: a burst of 5 goes through, the rest are dropped.
        for step in range(20):
            hub.publish([preview(step, at=100.0)])
        got = [e.body.step for e in drain(watcher)]  # type: ignore[union-attr]
        assert got == [4]  # the newest of the five the burst let through, the rest coalesced
        assert hub.previews_dropped == 15
        # Half a second later there is room for 10 a second * 0.5 s = 5 more.
        for step in range(20, 30):
            hub.publish([preview(step, at=100.5)])
        assert hub.previews_dropped == 20
        # At 8 a second, the agents' own rate, none is dropped.
        for step in range(40):
            hub.publish([preview(step, at=101.0 + step / 8)])
        assert hub.previews_dropped == 20
    # Each job has its own rate.
    hub.publish([preview(1, job="k", at=100.0)])
    assert hub.previews_dropped == 20


def test_the_previews_kept_are_bounded_in_total() -> None:
    # 100 running jobs with a 100 KiB preview each, 1 MiB kept at most: the
    # least recently updated go first (10 * 100 KiB fit, 11 do not).
    hub = EventHub(max_preview_bytes_kept=2**20)
    for number in range(100):
        hub.publish([preview(1, job=f"j{number}", size=100 * 1024)])
        assert hub.preview_bytes <= 2**20
    assert hub.previews_kept() == 10
    assert hub.latest_preview("j89") is None
    assert hub.latest_preview("j90") is not None
    # A newer preview of a job replaces its old one; it does not add up.
    hub.publish([preview(2, job="j90", size=100 * 1024, at=1.0)])
    assert (hub.previews_kept(), hub.preview_bytes) == (10, 10 * 100 * 1024)
    hub.publish([preview(3, job="j90", size=10, at=2.0)])
    assert hub.preview_bytes == 9 * 100 * 1024 + 10
