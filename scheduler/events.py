"""Job events: the in-memory fan-out to watchers, and the watch protocol.

Durable events come from the store after their commit; progress and previews
come straight from agents and live only here. Each job keeps its latest
progress and preview, also for a while after it ends, so that a watcher who
attaches late sees the picture at once. A slow watcher never holds memory
without bound: its pending progress and previews collapse to the newest.

`watch` is what a WatchJob stream follows: the stored events after a
sequence number, then the live ones, with no gap and no repeat between the
two, ending at the job's terminal event.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scheduler.domain import Job, JobEvent
from scheduler.errors import Unavailable
from scheduler.states import JobState
from sdmesh.domain import Preview, Progress

if TYPE_CHECKING:
    from scheduler.store import Database


@dataclass
class _Latest:
    progress: JobEvent | None = None
    preview: JobEvent | None = None


class Subscription:
    def __init__(self, hub: EventHub, job_id: str) -> None:
        self._hub = hub
        self.job_id = job_id
        self._queue: deque[JobEvent] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    def push(self, event: JobEvent) -> None:
        if not event.durable:
            # Drop an undelivered event of the same kind queued after the
            # last durable one: the newer progress or preview replaces it.
            for position in range(len(self._queue) - 1, -1, -1):
                queued = self._queue[position]
                if queued.durable:
                    break
                if type(queued.body) is type(event.body):
                    del self._queue[position]
                    break
        self._queue.append(event)
        self._ready.set()

    async def get(self) -> JobEvent:
        while not self._queue:
            if self._closed:
                raise Unavailable("the scheduler is shutting down; watch again to resume")
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def shut(self) -> None:
        self._closed = True
        self._ready.set()

    def close(self) -> None:
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class EventHub:
    def __init__(self, retain_finished: int = 1024) -> None:
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._live: dict[str, _Latest] = {}
        self._finished: OrderedDict[str, _Latest] = OrderedDict()
        self._retain_finished = retain_finished
        self._listeners: list[Callable[[Sequence[JobEvent]], None]] = []

    def subscribe(self, job_id: str) -> Subscription:
        subscription = Subscription(self, job_id)
        self._subscriptions.setdefault(job_id, set()).add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscriptions.get(subscription.job_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscriptions[subscription.job_id]

    def listen(self, listener: Callable[[Sequence[JobEvent]], None]) -> None:
        """Calls `listener` with every batch of events published, before any
        watcher sees them (the queue index follows state changes so)."""
        self._listeners.append(listener)

    def publish(self, events: Iterable[JobEvent]) -> None:
        events = list(events)
        for listener in self._listeners:
            listener(events)
        for event in events:
            self._remember(event)
            for subscription in self._subscriptions.get(event.job_id, ()):
                subscription.push(event)

    def _remember(self, event: JobEvent) -> None:
        if isinstance(event.body, Progress):
            self._live.setdefault(event.job_id, _Latest()).progress = event
        elif isinstance(event.body, Preview):
            self._live.setdefault(event.job_id, _Latest()).preview = event
        elif event.terminal:
            latest = self._live.pop(event.job_id, None)
            if latest is not None:
                self._finished[event.job_id] = latest
                while len(self._finished) > self._retain_finished:
                    self._finished.popitem(last=False)

    def _latest(self, job_id: str) -> _Latest:
        return self._live.get(job_id) or self._finished.get(job_id) or _Latest()

    def latest_progress(self, job_id: str) -> JobEvent | None:
        return self._latest(job_id).progress

    def latest_preview(self, job_id: str) -> JobEvent | None:
        return self._latest(job_id).preview

    def progress_of(self, job: Job) -> Progress | None:
        """The running job's latest step, if it is of its current attempt."""
        latest = self.latest_progress(job.id)
        if job.state is not JobState.RUNNING or latest is None or latest.attempt != job.attempt:
            return None
        return latest.body if isinstance(latest.body, Progress) else None

    def close(self) -> None:
        """Ends every watch stream: the scheduler is stopping."""
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.shut()

    def watcher_count(self, job_id: str) -> int:
        return len(self._subscriptions.get(job_id, ()))


async def watch(
    hub: EventHub, db: Database, job_id: str, after_seq: int
) -> AsyncIterator[JobEvent]:
    """A job's events after `after_seq`: those stored, then the live ones,
    until its terminal event. A late watcher gets the latest progress and
    preview at once; durable events come exactly once and in order, the
    gaps left by commits published out of order filled from the store."""

    async def stored_after(seq: int) -> list[JobEvent]:
        return await db.run(db.store.events_after, job_id, seq)

    with hub.subscribe(job_id) as subscription:
        last = after_seq
        for event in await stored_after(last):
            if event.terminal:
                # A late watcher still gets the last picture first.
                preview = hub.latest_preview(job_id)
                if preview is not None:
                    yield preview
            last = event.seq
            yield event
            if event.terminal:
                return
        job = await db.run(db.store.get_job, job_id)
        if job is None or job.state.terminal:
            # It ended after the read above, or the caller has seen the end.
            for event in await stored_after(last):
                yield event
            return
        sent_live = [
            live
            for live in (hub.latest_progress(job_id), hub.latest_preview(job_id))
            if live is not None
        ]
        for live in sent_live:
            yield live
        while True:
            event = await subscription.get()
            if any(event is sent for sent in sent_live):
                continue  # already sent as the latest one
            if event.durable:
                if event.seq <= last:
                    if event.terminal:
                        return  # the caller asked to resume past the end
                    continue  # already replayed from the store
                if event.seq > last + 1:
                    # Commits can be published out of order; fill the gap.
                    for missing in await stored_after(last):
                        if missing.seq >= event.seq:
                            break
                        yield missing
                last = event.seq
            yield event
            if event.terminal:
                return
