"""What an agent remembers of its attempts, so that it can keep working while
the scheduler is away and deliver the outcome after it reconnects.

For each attempt the journal keeps only what the scheduler needs to commit a
result: that it started, its finished images and how it ended. Progress and
previews are news, not state; they are sent when connected and dropped
otherwise. The journal is bounded: an ended attempt is forgotten once it
was sent on a live stream and `keep_seconds` have passed (long enough for
a reconnect to ask about it again), and at most `max_ended` ended attempts
are kept in any case.

Pure: the caller passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdmesh.domain import AttemptUpdate, Ended, ImageReady, Started

DEFAULT_MAX_ENDED = 32


@dataclass
class Entry:
    job_id: str
    attempt: int
    gpu_index: int
    started: bool = False
    images: dict[int, ImageReady] = field(default_factory=dict)
    ended: Ended | None = None
    delivered_at: float | None = None  # when its end went out on a live stream

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.attempt)

    def replay(self) -> list[AttemptUpdate]:
        """The durable part of its history, in order."""
        events = []
        if self.started:
            events.append(AttemptUpdate(self.job_id, self.attempt, Started()))
        for index in sorted(self.images):
            events.append(AttemptUpdate(self.job_id, self.attempt, self.images[index]))
        if self.ended is not None:
            events.append(AttemptUpdate(self.job_id, self.attempt, self.ended))
        return events


class Journal:
    def __init__(self, keep_seconds: float, max_ended: int = DEFAULT_MAX_ENDED) -> None:
        self.keep_seconds = keep_seconds
        self.max_ended = max_ended
        self._entries: dict[tuple[str, int], Entry] = {}

    def assigned(self, job_id: str, attempt: int, gpu_index: int) -> None:
        self._entries.setdefault((job_id, attempt), Entry(job_id, attempt, gpu_index))

    def record(self, event: AttemptUpdate, now: float, connected: bool) -> None:
        entry = self._entries.get((event.job_id, event.attempt))
        if entry is None:
            return
        body = event.body
        if isinstance(body, Started):
            entry.started = True
        elif isinstance(body, ImageReady):
            entry.images[body.index] = body
        elif isinstance(body, Ended):
            entry.ended = body
            if connected:
                entry.delivered_at = now
            self._trim()

    def delivered(self, now: float) -> None:
        """Everything ended so far went out on a live stream (a replay)."""
        for entry in self._entries.values():
            if entry.ended is not None and entry.delivered_at is None:
                entry.delivered_at = now

    def forget(self, job_id: str, attempt: int) -> None:
        """The scheduler does not want it: it moved on or has its result."""
        entry = self._entries.get((job_id, attempt))
        if entry is not None and entry.ended is not None:
            del self._entries[(job_id, attempt)]

    def held(self, now: float) -> list[Entry]:
        """Attempts to tell a scheduler about on (re)connecting: the live ones
        and those that ended recently or were never delivered."""
        self._expire(now)
        return list(self._entries.values())

    def live(self) -> list[Entry]:
        return [entry for entry in self._entries.values() if entry.ended is None]

    def _expire(self, now: float) -> None:
        for key, entry in list(self._entries.items()):
            if entry.delivered_at is not None and now - entry.delivered_at > self.keep_seconds:
                del self._entries[key]

    def _trim(self) -> None:
        ended = [entry for entry in self._entries.values() if entry.ended is not None]
        # Delivered ones go first; then the oldest (dicts keep insertion order).
        ended.sort(key=lambda entry: entry.delivered_at is None)
        for entry in ended[: max(0, len(ended) - self.max_ended)]:
            del self._entries[entry.key]
