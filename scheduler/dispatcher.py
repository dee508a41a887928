"""The dispatcher: takes queued jobs in queue-policy order, asks placement
where each should go, records the attempt and sends the assignment down the
agent's stream.

It runs as one task, so two passes never race each other; the store's
conditional assign fences it against anything else (a cancel, a second
replica). It wakes when something changes and also on a slow tick, which is
what lets a long wait turn into a reservation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from scheduler.cluster import AssignCommand, Cluster
from scheduler.domain import AttemptOutcome, Job, NodeRecord
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.placement import (
    RESERVE_AFTER_SECONDS,
    Demand,
    Placed,
    SeenGpu,
    demand_for,
    plan,
    unresolvable,
)
from scheduler.queue_policy import QueuedJob, order
from scheduler.store import Database
from scheduler.waiting import wait_event

log = logging.getLogger(__name__)

TICK_SECONDS = 2.0


def seen_gpus(records: list[NodeRecord]) -> list[SeenGpu]:
    return [
        SeenGpu(record.info.name, device.index, device.total_bytes, record.info.labels)
        for record in records
        for device in record.info.devices
    ]


def queue_demands(
    queued: list[Job], cluster: Cluster, estimates: EstimateBook, now: float
) -> list[Demand]:
    """The queue in policy order, as placement demands. Pure: the benchmark's
    simulation calls it too."""
    weights = cluster.models()
    by_id = {job.id: job for job in queued}
    ordered = order(
        [QueuedJob(j.id, j.owner, j.spec.priority, j.created_at) for j in queued],
        cluster.active_by_owner(),
    )
    return [
        demand_for(
            entry.job_id,
            by_id[entry.job_id].spec,
            weights.get(by_id[entry.job_id].spec.model, 0),
            estimates,
            # Since it last entered the queue: a retry starts its wait afresh.
            waited_seconds=now - by_id[entry.job_id].updated_at,
        )
        for entry in ordered
    ]


class Dispatcher:
    def __init__(
        self,
        db: Database,
        cluster: Cluster,
        hub: EventHub,
        clock: Callable[[], float],
        estimates: EstimateBook,
        *,
        reserve_after_seconds: float = RESERVE_AFTER_SECONDS,
        node_window_seconds: float = 24 * 3600.0,
    ) -> None:
        self.db = db
        self.cluster = cluster
        self.hub = hub
        self.clock = clock
        self.estimates = estimates
        self.reserve_after_seconds = reserve_after_seconds
        self.node_window_seconds = node_window_seconds
        self.waiting: dict[str, str] = {}  # queued job id -> why it is not placed
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            await wait_event(self._wake, TICK_SECONDS)
            self._wake.clear()
            try:
                await self.dispatch_once()
            except Exception:
                log.exception("dispatch pass failed; retrying on the next wake")

    async def dispatch_once(self) -> int:
        """One pass over the queue. Returns how many jobs were assigned."""
        queued = await self.db.run(self.db.store.queued_jobs)
        by_id = {job.id: job for job in queued}
        self.waiting = {k: v for k, v in self.waiting.items() if k in by_id}
        if not queued:
            return 0
        now = self.clock()
        decisions = plan(
            queue_demands(queued, self.cluster, self.estimates, now),
            self.cluster.gpu_views(now),
            reserve_after_seconds=self.reserve_after_seconds,
        )
        assigned = 0
        unplaced = []
        for demand, decision in decisions:
            if not isinstance(decision, Placed):
                self.waiting[demand.job_id] = decision.reason
                unplaced.append(demand)
            elif await self._assign(by_id[demand.job_id], decision):
                assigned += 1
        if unplaced:
            await self._fail_impossible(unplaced, now)
        return assigned

    async def _fail_impossible(self, unplaced: list[Demand], now: float) -> None:
        """Fails queued jobs no GPU seen recently could ever take. A job can
        become one after it ran out of memory and its estimate rose."""
        since = now - self.node_window_seconds
        seen = seen_gpus(await self.db.run(self.db.store.nodes.seen_since, since))
        for demand in unplaced:
            problem = unresolvable(demand, seen)
            if problem is None:
                continue
            events = await self.db.run(self.db.store.fail, demand.job_id, problem)
            if events:
                self.waiting.pop(demand.job_id, None)
                self.hub.publish(events)
                log.info("job %s failed: %s", demand.job_id, problem)

    async def _assign(self, job: Job, decision: Placed) -> bool:
        gpu, need = decision.gpu, decision.need
        session = self.cluster.sessions.get(gpu.node_id)
        if session is None:  # it left while we were planning
            return False
        events = await self.db.run(
            self.db.store.assign,
            job.id,
            expected_attempt=job.attempt,
            node_id=gpu.node_id,
            node_name=gpu.node_name,
            gpu_index=gpu.index,
            memory_mode=need.mode,
            placement=decision.explanation,
            vram_estimate_bytes=need.vram_bytes,
        )
        if events is None:  # cancelled or taken since we read it
            return False
        self.waiting.pop(job.id, None)
        attempt = job.attempt + 1
        if self.cluster.sessions.get(gpu.node_id) is not session:
            # The agent left during the write: its disconnect handler did
            # not see this attempt, so hand it back here.
            requeued = await self.db.run(
                self.db.store.requeue,
                job.id,
                attempt,
                AttemptOutcome.LOST,
                f"node {gpu.node_name} disconnected before the assignment was sent",
                count_failure=False,
            )
            self.hub.publish([*events, *(requeued or [])])
            return False
        session.bind(job, attempt, decision, self.clock())
        self.hub.publish(events)
        session.send(AssignCommand(job.id, attempt, job.spec, gpu.index, need.mode))
        log.info("job %s attempt %d -> %s", job.id, attempt, decision.explanation)
        return True
