"""Follows a job's events on stderr: a progress bar with step, ETA and node
on a terminal, and one line per state change everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from client._errors import SdmeshError
from client._models import Event, ImageEvent, PreviewEvent, ProgressEvent, StateEvent


@dataclass
class Followed:
    state: str = "QUEUED"
    reason: str = ""
    node: str = ""
    attempt: int = 0
    previews: int = 0
    last_step: int = 0
    steps_seen: list[int] | None = None


class Follower:
    def __init__(self, job_id: str, console: Console | None = None) -> None:
        self.job_id = job_id
        self.console = console or Console(stderr=True, highlight=False)
        self.result = Followed(steps_seen=[])
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
            transient=False,
        )
        self._task: TaskID | None = None
        self._lost = False  # the scheduler was lost and no event has come since

    def _describe(self) -> str:
        if self._lost:
            return f"{self.job_id} reconnecting to the scheduler…"
        where = f" on {self.result.node}" if self.result.node else ""
        return f"{self.job_id} {self.result.state.lower()}{where}"

    def reconnecting(self, address: str, error: SdmeshError) -> None:
        """The client's on_retry hook (called on its own thread): says once
        per outage that the scheduler was lost, and shows it on the bar."""
        if not self._lost:
            self.console.print(
                f"{self.job_id} lost the scheduler ({error}); reconnecting to the scheduler…",
                markup=False,
                soft_wrap=True,  # one line in logs, however long the error
            )
        self._lost = True
        if self._task is not None:
            self._progress.update(self._task, description=self._describe())

    def _reconnected(self) -> None:
        self._lost = False
        self.console.print(f"{self.job_id} reconnected to the scheduler", markup=False)

    def _on_state(self, event: StateEvent) -> None:
        result = self.result
        result.state, result.reason = event.state, event.reason
        if event.node_name:
            result.node = event.node_name
        if event.attempt != result.attempt:
            result.attempt = event.attempt
            if self._task is not None:  # a retry starts over
                self._progress.reset(self._task)
        message = f"{self.job_id} {event.state}"
        if event.state in ("ASSIGNED", "RUNNING") and event.node_name:
            message += f" on {event.node_name} gpu {event.gpu_index} (attempt {event.attempt})"
        if event.reason:
            message += f": {event.reason}"
        self.console.print(message, markup=False)

    def follow(self, events: Iterator[Event]) -> Followed:
        with self._progress:
            self._task = self._progress.add_task(self._describe(), total=None)
            for event in events:
                if self._lost:
                    self._reconnected()
                if isinstance(event, StateEvent):
                    self._on_state(event)
                elif isinstance(event, ProgressEvent):
                    self.result.last_step = event.step
                    assert self.result.steps_seen is not None
                    self.result.steps_seen.append(event.step)
                    self._progress.update(self._task, total=event.total_steps, completed=event.step)
                elif isinstance(event, PreviewEvent):
                    self.result.previews += 1
                elif isinstance(event, ImageEvent):
                    self.console.print(
                        f"{self.job_id} image {event.image.index} stored (seed {event.image.seed})",
                        markup=False,
                    )
                self._progress.update(self._task, description=self._describe())
                if isinstance(event, StateEvent) and event.terminal:
                    break
        return self.result
