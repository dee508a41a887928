"""What the scheduler's parts share while it runs: the store, the picture
of connected agents, the event hub, the image files, the learned estimates,
the input images clients uploaded, the clock, the wake-up call that starts
a dispatch pass, and the queue in memory. The server builds one; each part
takes it whole."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.cluster import Cluster
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.inputs import InputFiles
from scheduler.queue import QueueIndex
from scheduler.store import Database
from sdmesh.waiting import wait_event


class Wakeup:
    """Tells the dispatcher that the queue or the cluster changed: a submit,
    an attempt that ended, a node that came or went."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        """Until woken, or `seconds` at most."""
        await wait_event(self._event, seconds)
        self._event.clear()


@dataclass(frozen=True)
class Runtime:
    db: Database
    cluster: Cluster
    hub: EventHub
    images: ImageStore
    clock: Callable[[], float]
    estimates: EstimateBook
    wake: Wakeup = field(default_factory=Wakeup)
    queue: QueueIndex = field(default_factory=QueueIndex)
    # Where uploaded input images go; default: inputs/ beside the images.
    inputs_dir: Path | None = None
    inputs: InputFiles = field(init=False)

    def __post_init__(self) -> None:
        self.hub.listen(self.queue.observe)
        root = self.inputs_dir or self.images.root.parent / "inputs"
        object.__setattr__(self, "inputs", InputFiles(root))


class UsesRuntime:
    """Gives a part the runtime's parts as attributes."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.db = runtime.db
        self.cluster = runtime.cluster
        self.hub = runtime.hub
        self.images = runtime.images
        self.clock = runtime.clock
        self.estimates = runtime.estimates
        self.wake = runtime.wake
        self.queue = runtime.queue
        self.inputs = runtime.inputs
