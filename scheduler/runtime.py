"""What the scheduler's two services share while it runs: the store, the
picture of connected agents, the event hub, the dispatcher, the image files
and the clock. The server builds one; each service takes it whole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler.cluster import Cluster
from scheduler.dispatcher import Dispatcher
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.store import Database


@dataclass(frozen=True)
class Runtime:
    db: Database
    cluster: Cluster
    hub: EventHub
    dispatcher: Dispatcher
    images: ImageStore
    clock: Callable[[], float]
    estimates: EstimateBook


class UsesRuntime:
    """Gives a service the runtime's parts as attributes."""

    def __init__(self, runtime: Runtime) -> None:
        self.db = runtime.db
        self.cluster = runtime.cluster
        self.hub = runtime.hub
        self.dispatcher = runtime.dispatcher
        self.images = runtime.images
        self.clock = runtime.clock
        self.estimates = runtime.estimates
