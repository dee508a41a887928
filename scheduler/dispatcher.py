"""The dispatcher: takes queued jobs in queue-policy order, asks placement
where each should go, and has the attempts' owner bind each placed job to
its GPU.

It runs as one task, so two passes never race each other; the store's
conditional assign fences it against anything else (a cancel, a second
replica). It wakes when something changes and also on a slow tick, which is
what lets a long wait turn into a reservation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from scheduler.admission import Admission
from scheduler.attempts import Attempts
from scheduler.config import RESERVE_AFTER_SECONDS
from scheduler.domain import Job
from scheduler.estimator import EstimateBook
from scheduler.placement import (
    Demand,
    Placed,
    demand_for,
    plan,
    unresolvable,
)
from scheduler.queue_policy import QueuedJob, order
from scheduler.runtime import Runtime, UsesRuntime
from scheduler.states import JobState

log = logging.getLogger(__name__)

TICK_SECONDS = 2.0


def queue_demands(
    queued: list[Job],
    weights: Mapping[str, int],
    active_by_owner: Mapping[str, int],
    estimates: EstimateBook,
    now: float,
) -> list[Demand]:
    """The queue in policy order, as placement demands. `weights` maps a
    model to its weight size, `active_by_owner` counts each user's assigned
    and running jobs. Pure: the benchmark's simulation calls it too."""
    by_id = {job.id: job for job in queued}
    ordered = order(
        [QueuedJob(j.id, j.owner, j.spec.priority, j.created_at) for j in queued],
        active_by_owner,
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


class Dispatcher(UsesRuntime):
    def __init__(
        self,
        runtime: Runtime,
        attempts: Attempts,
        admission: Admission,
        *,
        reserve_after_seconds: float = RESERVE_AFTER_SECONDS,
    ) -> None:
        super().__init__(runtime)
        self.attempts = attempts
        self.admission = admission
        self.reserve_after_seconds = reserve_after_seconds
        self.waiting: dict[str, str] = {}  # queued job id -> why it is not placed

    def reason_for(self, job: Job) -> str:
        """The job's reason, and for a queued job, why it waits."""
        why = self.waiting.get(job.id) if job.state is JobState.QUEUED else None
        if why is None:
            return job.reason
        # Keep why it came back to the queue, if it did, and say why it waits.
        return f"{job.reason}; waiting: {why}" if job.reason else f"waiting: {why}"

    async def run(self) -> None:
        while True:
            await self.wake.wait(TICK_SECONDS)
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
            queue_demands(
                queued, self.cluster.models(), self.attempts.by_owner(), self.estimates, now
            ),
            self.cluster.gpu_views(now, self.attempts.held_by_node()),
            reserve_after_seconds=self.reserve_after_seconds,
        )
        assigned = 0
        unplaced = []
        for demand, decision in decisions:
            if not isinstance(decision, Placed):
                self.waiting[demand.job_id] = decision.reason
                unplaced.append(demand)
                continue
            self.waiting.pop(demand.job_id, None)
            if await self.attempts.assign(by_id[demand.job_id], decision):
                assigned += 1
        if unplaced:
            await self._fail_impossible(unplaced)
        return assigned

    async def _fail_impossible(self, unplaced: list[Demand]) -> None:
        """Fails queued jobs no GPU seen recently could ever take. A job can
        become one after it ran out of memory and its estimate rose."""
        seen = await self.admission.seen_gpus()
        for demand in unplaced:
            problem = unresolvable(demand, seen)
            if problem is None:
                continue
            events = await self.db.run(self.db.store.fail, demand.job_id, problem.text)
            if events:
                self.waiting.pop(demand.job_id, None)
                self.hub.publish(events)
                log.info("job %s failed: %s", demand.job_id, problem.text)
