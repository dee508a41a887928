"""Job events: the in-memory fan-out to watchers, and the watch protocol.

Durable events come from the store after their commit; progress and previews
come straight from agents and live only here. A running job keeps its
latest progress and preview, so that a watcher who attaches late sees the
picture at once; its progress stays for a while after it ends, its preview
goes at once. Memory stays bounded whatever agents send: a preview over
MAX_PREVIEW_BYTES or beyond a job's rate is dropped, all kept previews
together stay under MAX_PREVIEW_BYTES_KEPT (the least recently updated go
first), and a slow watcher's pending progress and previews collapse to the
newest.

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

from scheduler.domain import Job, JobEvent, StateChange
from scheduler.errors import Unavailable
from scheduler.states import JobState
from scheduler.uploads import MAX_PREVIEW_BYTES
from sdmesh.domain import Preview, Progress

if TYPE_CHECKING:
    from scheduler.store import Database

# Agents send at most 8 previews a second, and always the first and last
# step's (gpu_node/preview.py): a burst of a few, then 10 a second, leaves
# them room and holds a rogue to that.
PREVIEWS_PER_SECOND = 10.0
PREVIEW_BURST = 5
MAX_PREVIEW_BYTES_KEPT = 64 * 2**20  # every running job's latest preview, together


@dataclass
class _Latest:
    progress: JobEvent | None = None
    preview: JobEvent | None = None
    # A token bucket for the job's previews, on the events' own clock.
    preview_tokens: float = PREVIEW_BURST
    preview_tokens_at: float | None = None

    def take_preview_token(self, now: float) -> bool:
        if self.preview_tokens_at is not None:
            elapsed = max(0.0, now - self.preview_tokens_at)
            self.preview_tokens = min(
                PREVIEW_BURST, self.preview_tokens + elapsed * PREVIEWS_PER_SECOND
            )
        self.preview_tokens_at = now
        if self.preview_tokens < 1:
            return False
        self.preview_tokens -= 1
        return True


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
    def __init__(
        self, retain_finished: int = 1024, max_preview_bytes_kept: int = MAX_PREVIEW_BYTES_KEPT
    ) -> None:
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._live: dict[str, _Latest] = {}
        self._finished: OrderedDict[str, _Latest] = OrderedDict()  # their progress only
        self._retain_finished = retain_finished
        self._listeners: list[Callable[[Sequence[JobEvent]], None]] = []
        # Jobs with a preview kept, least recently updated first, and its size.
        self._previews: OrderedDict[str, int] = OrderedDict()
        self._max_preview_bytes_kept = max_preview_bytes_kept
        self.preview_bytes = 0  # kept now
        self.previews_dropped = 0

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
        """Fans the events out. A preview that is too big, beyond its job's
        rate, or for a job that has ended goes nowhere."""
        events = [event for event in events if self._admit(event)]
        for listener in self._listeners:
            listener(events)
        for event in events:
            self._remember(event)
            for subscription in self._subscriptions.get(event.job_id, ()):
                subscription.push(event)

    def _admit(self, event: JobEvent) -> bool:
        body = event.body
        if not isinstance(body, Preview):
            return True
        admitted = (
            len(body.png) <= MAX_PREVIEW_BYTES
            and event.job_id not in self._finished
            and self._live.setdefault(event.job_id, _Latest()).take_preview_token(event.time)
        )
        if not admitted:
            self.previews_dropped += 1
        return admitted

    def _remember(self, event: JobEvent) -> None:
        job_id, body = event.job_id, event.body
        if isinstance(body, Progress):
            self._live.setdefault(job_id, _Latest()).progress = event
        elif isinstance(body, Preview):
            self._forget_preview(job_id)
            self._live.setdefault(job_id, _Latest()).preview = event
            self._previews[job_id] = len(body.png)
            self.preview_bytes += len(body.png)
            while self.preview_bytes > self._max_preview_bytes_kept:
                self._forget_preview(next(iter(self._previews)))
        elif event.terminal:
            self._forget_preview(job_id)
            latest = self._live.pop(job_id, None)
            self._finished[job_id] = _Latest(progress=latest.progress if latest else None)
            self._finished.move_to_end(job_id)
            while len(self._finished) > self._retain_finished:
                self._finished.popitem(last=False)
        elif isinstance(body, StateChange) and body.state is JobState.QUEUED:
            self._forget_preview(job_id)  # its attempt is over; the next one sends its own

    def _forget_preview(self, job_id: str) -> None:
        size = self._previews.pop(job_id, None)
        if size is not None:
            self.preview_bytes -= size
            latest = self._live.get(job_id)
            if latest is not None:
                latest.preview = None

    def _latest(self, job_id: str) -> _Latest:
        return self._live.get(job_id) or self._finished.get(job_id) or _Latest()

    def previews_kept(self) -> int:
        return len(self._previews)

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
    until its terminal event. A late watcher of a running job gets the
    latest progress and preview at once (of a finished job, no preview);
    durable events come exactly once and in order, the gaps left by
    commits published out of order filled from the store."""

    async def stored_after(seq: int) -> list[JobEvent]:
        return await db.run(db.store.events_after, job_id, seq)

    with hub.subscribe(job_id) as subscription:
        last = after_seq
        for event in await stored_after(last):
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
