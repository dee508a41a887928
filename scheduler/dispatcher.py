"""The dispatcher: takes queued jobs in queue order, asks placement for a
GPU, records the attempt and sends the assignment down the agent's stream.

It runs as one task, so two passes never race each other; the store's
conditional assign fences it against anything else (a cancel, a second
replica). It wakes when something changes and also on a slow tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from scheduler.cluster import ActiveAttempt, AssignCommand, Cluster
from scheduler.domain import AttemptOutcome, Job
from scheduler.estimator import estimate_vram_bytes
from scheduler.events import EventHub
from scheduler.placement import Demand, Placed, plan
from scheduler.spec import MemoryMode
from scheduler.store import Database

log = logging.getLogger(__name__)

TICK_SECONDS = 2.0


class Dispatcher:
    def __init__(
        self, db: Database, cluster: Cluster, hub: EventHub, clock: Callable[[], float]
    ) -> None:
        self.db = db
        self.cluster = cluster
        self.hub = hub
        self.clock = clock
        self.waiting: dict[str, str] = {}  # queued job id -> why it is not placed
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.dispatch_once()
            except Exception:
                log.exception("dispatch pass failed; retrying on the next wake")

    def demand(self, job: Job, model_sizes: dict[str, int]) -> Demand:
        spec = job.spec
        weights = model_sizes.get(spec.model, 0)
        return Demand(
            job.id,
            spec.model,
            estimate_vram_bytes(weights, spec.width, spec.height, spec.batch_size),
        )

    async def dispatch_once(self) -> int:
        """One pass over the queue. Returns how many jobs were assigned."""
        queued = await self.db.run(self.db.store.queued_jobs)
        by_id = {job.id: job for job in queued}
        self.waiting = {k: v for k, v in self.waiting.items() if k in by_id}
        if not queued:
            return 0
        model_sizes = self.cluster.models()
        decisions = plan(
            [self.demand(job, model_sizes) for job in queued], self.cluster.gpu_views()
        )
        assigned = 0
        for demand, decision in decisions:
            if not isinstance(decision, Placed):
                self.waiting[demand.job_id] = decision.reason
                continue
            job = by_id[demand.job_id]
            gpu = decision.gpu
            session = self.cluster.sessions.get(gpu.node_id)
            if session is None:  # it left while we were planning
                continue
            # A pinned mode is honoured; choosing one for AUTO jobs is the
            # placement's job once it knows each mode's needs.
            pinned = job.spec.memory_mode
            memory_mode = MemoryMode.FULL if pinned is MemoryMode.AUTO else pinned
            events = await self.db.run(
                self.db.store.assign,
                job.id,
                expected_attempt=job.attempt,
                node_id=gpu.node_id,
                node_name=gpu.node_name,
                gpu_index=gpu.index,
                memory_mode=memory_mode,
            )
            if events is None:  # cancelled or taken since we read it
                continue
            self.waiting.pop(job.id, None)
            attempt = job.attempt + 1
            if self.cluster.sessions.get(gpu.node_id) is not session:
                # The agent left during the write: its disconnect handler
                # did not see this attempt, so hand it back here.
                requeued = await self.db.run(
                    self.db.store.requeue,
                    job.id,
                    attempt,
                    AttemptOutcome.LOST,
                    f"node {gpu.node_name} disconnected before the assignment was sent",
                    count_failure=False,
                )
                self.hub.publish([*events, *(requeued or [])])
                continue
            session.attempts[job.id] = ActiveAttempt(
                job.id,
                attempt,
                gpu.index,
                demand.vram_bytes,
                assigned_at=self.clock(),
                expected_images=job.spec.batch_size,
            )
            self.hub.publish(events)
            session.send(AssignCommand(job.id, attempt, job.spec, gpu.index, memory_mode))
            assigned += 1
            log.info("job %s attempt %d -> %s gpu %d", job.id, attempt, gpu.node_name, gpu.index)
        return assigned
