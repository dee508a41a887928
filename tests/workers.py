"""Runs tasks on a real device worker and collects every update it sends,
until each task has ended: the harness of the worker tests."""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence

from gpu_node.backends import Backend
from gpu_node.runner import DeviceWorker, Task
from sdmesh.domain import AttemptUpdate, DeviceInfo, Ended


def run_worker(
    device: DeviceInfo,
    backend: Backend,
    batches: Sequence[Sequence[Task]],
    on_event: Callable[[AttemptUpdate], None] = lambda _: None,
) -> list[AttemptUpdate]:
    """Hands each batch to a fresh worker (a batch of one is a lone job) and
    returns every update in order, `on_event` seeing each as it comes."""
    events: queue.Queue[AttemptUpdate] = queue.Queue()

    def emit(event: AttemptUpdate) -> None:
        on_event(event)
        events.put(event)

    worker = DeviceWorker(device, backend, emit)
    for batch in batches:
        worker.submit_batch(list(batch))
    count = sum(len(batch) for batch in batches)
    got: list[AttemptUpdate] = []
    while sum(isinstance(e.body, Ended) for e in got) < count:
        got.append(events.get(timeout=120))
    worker.close(timeout=60)
    return got
