"""The dispatcher: takes queued jobs in queue-policy order from the index in
memory (`scheduler.queue`), asks placement where each should go, and has
the attempts' owner bind each placed job to its GPU. A pass reads nothing
from the database and stops as soon as no GPU can take another job.

It runs as one task, so two passes never race each other; the store's
conditional assign fences it against anything else (a cancel, a second
replica). It wakes when something changes and also on a slow tick, which is
what lets a long wait turn into a reservation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import replace

from scheduler.admission import Admission
from scheduler.attempts import Attempts
from scheduler.batching import BatchPolicy, QueueBatcher
from scheduler.config import RESERVE_AFTER_SECONDS
from scheduler.domain import Job
from scheduler.estimator import EstimateBook, Need
from scheduler.placement import (
    Demand,
    Placed,
    Planner,
    Unplaced,
    Weights,
    demand_for,
    extras_of,
    plan,
    unresolvable,
)
from scheduler.queue_policy import QueuedJob, order
from scheduler.runtime import Runtime, UsesRuntime
from scheduler.states import JobState
from sdmesh.kinds import ModelKind

log = logging.getLogger(__name__)

TICK_SECONDS = 2.0
# How often the index's queued ids are checked against the store's.
RESYNC_SECONDS = 60.0


def queue_demands(
    queued: list[Job],
    weights: Mapping[str, int],
    active_by_owner: Mapping[str, int],
    estimates: EstimateBook,
    now: float,
    extra_weights: Weights | None = None,
) -> list[Demand]:
    """The queue in policy order, as placement demands. `weights` maps a
    base model to its weight size, `extra_weights` a (kind, name) of a LoRA
    or ControlNet to its; `active_by_owner` counts each user's assigned and
    running jobs. Pure: the benchmark's simulation calls it too."""
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
            extra_weights=extra_weights,
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
        batching: BatchPolicy | None = None,
    ) -> None:
        super().__init__(runtime)
        self.batching = batching or BatchPolicy()
        self.attempts = attempts
        self.admission = admission
        self.reserve_after_seconds = reserve_after_seconds
        self.waiting: dict[str, str] = {}  # queued job id -> why the last pass left it
        self.planner: Planner | None = None  # the last pass, for why the others wait
        self._demands: dict[str, tuple[tuple[object, ...], Demand]] = {}
        self._checked: dict[str, tuple[Need, ...]] = {}  # job id -> needs found resolvable
        self._resynced = 0.0

    def reason_for(self, job: Job) -> str:
        """The job's reason, and for a queued job, why it waits."""
        why = self._why(job) if job.state is JobState.QUEUED else None
        if why is None:
            return job.reason
        # Keep why it came back to the queue, if it did, and say why it waits.
        return f"{job.reason}; waiting: {why}" if job.reason else f"waiting: {why}"

    def _why(self, job: Job) -> str | None:
        if job.id in self.waiting:
            return self.waiting[job.id]
        if self.planner is None or job.id not in self.queue:
            return None
        # Not reached by the last pass: no GPU could take any job by then.
        decision = self.planner.why(self._demand(job, self.cluster.weights(), self.clock()))
        if isinstance(decision, Unplaced):
            return decision.reason
        return "every GPU that could take it is taken by jobs ahead of it in the queue"

    async def run(self) -> None:
        while True:
            await self.wake.wait(TICK_SECONDS)
            try:
                await self.dispatch_once()
            except Exception:
                log.exception("dispatch pass failed; retrying on the next wake")

    async def load(self) -> None:
        """Reads the queue, and the jobs out on GPUs, as this replica starts
        leading; from then on the index follows what is committed."""
        queued = await self.db.run(self.db.store.queued_jobs, None, None)
        active = await self.db.run(self.db.store.active_jobs)
        self.queue.load(queued, active)
        self._resynced = self.clock()
        self.waiting.clear()
        self.planner = None

    async def _catch_up(self) -> None:
        """Reads the jobs that came back to the queue without a copy in the
        index, and, once in a while, checks that no queued job is missing."""
        unknown = self.queue.take_unknown()
        now = self.clock()
        if now - self._resynced >= RESYNC_SECONDS:
            self._resynced = now
            missing = await self.db.run(self.db.store.queued_ids) - self.queue.ids()
            if missing:
                log.warning("%d queued job(s) were missing from the index", len(missing))
            unknown |= missing
        if unknown:
            for job in await self.db.run(self.db.store.jobs_by_ids, unknown):
                if job.state is JobState.QUEUED:
                    self.queue.add(job)

    def _demand(self, job: Job, weights: Weights, now: float) -> Demand:
        """What placement weighs for the job, worked out again only when its
        attempt, its models' sizes or the learned estimates changed.
        `weights` maps (kind, name) to the size nodes report."""
        spec = job.spec
        weight = weights.get((ModelKind.BASE, spec.model), 0)
        extras = extras_of(spec, weights) if spec.loras or spec.controlnets else ()
        key = (job.attempt, weight, self.estimates.version, extras)
        cached = self._demands.get(job.id)
        if cached is None or cached[0] != key:
            demand = demand_for(job.id, spec, weight, self.estimates, extra_weights=weights)
            cached = key, demand
            self._demands[job.id] = cached
        # Since it last entered the queue: a retry starts its wait afresh.
        return replace(cached[1], waited_seconds=now - job.updated_at)

    def _forget_gone(self) -> None:
        if len(self._demands) > 2 * len(self.queue) + 64:
            self._demands = {k: v for k, v in self._demands.items() if k in self.queue}
            self._checked = {k: v for k, v in self._checked.items() if k in self.queue}

    async def dispatch_once(self) -> int:
        """One pass over the queue, as far as GPUs can take jobs. Returns
        how many jobs were assigned."""
        await self._catch_up()
        self._forget_gone()
        if not len(self.queue):
            self.waiting, self.planner = {}, None
            return 0
        now = self.clock()
        weights = self.cluster.weights()
        active = self.attempts.by_owner()
        batcher = QueueBatcher(
            self.batching,
            self.queue,
            self.estimates,
            lambda model: weights.get((ModelKind.BASE, model), 0),
            lambda job: self._demand(job, weights, now),
            active,
        )
        planner = Planner(
            self.cluster.gpu_views(now, self.attempts.held_by_node()),
            reserve_after_seconds=self.reserve_after_seconds,
            batcher=batcher,
        )
        jobs: dict[str, Job] = {}

        def demands() -> Iterator[Demand]:
            for job in self.queue.ordered(active):
                jobs[job.id] = job
                yield self._demand(job, weights, now)

        decisions = plan(demands(), (), planner=planner)
        self.planner, self.waiting = planner, {}
        placed: list[tuple[Job, Placed, list[Job]]] = []
        unplaced = []
        for demand, decision in decisions:
            if isinstance(decision, Placed):
                riders = [self.queue.get(partner.job_id) for partner in decision.batch]
                placed.append(
                    (jobs[demand.job_id], decision, [job for job in riders if job is not None])
                )
            else:
                if decision.reason:  # else worked out when someone asks
                    self.waiting[demand.job_id] = decision.reason
                unplaced.append(demand)
        # Together, so that their writes share one transaction.
        bound = await asyncio.gather(
            *(self.attempts.assign(job, d, partners) for job, d, partners in placed)
        )
        assigned = 0
        for (job, _, partners), ids in zip(placed, bound, strict=True):
            assigned += len(ids)
            for member in (job, *partners):
                if member.id not in ids and member.id in self.queue:
                    self.queue.recheck(member.id)  # it moved meanwhile: read it again
        if unplaced:
            await self._fail_impossible(unplaced)
        return assigned

    async def _fail_impossible(self, unplaced: list[Demand]) -> None:
        """Fails queued jobs no GPU seen recently could ever take. A job can
        become one after it ran out of memory and its estimate rose; each
        job is checked once for each estimate it has."""
        fresh = [d for d in unplaced if self._checked.get(d.job_id) != d.needs]
        if not fresh:
            return
        seen = await self.admission.seen_gpus()
        for demand in fresh:
            problem = unresolvable(demand, seen)
            if problem is None:
                self._checked[demand.job_id] = demand.needs
                continue
            events = await self.db.run(self.db.store.fail, demand.job_id, problem.text)
            if events:
                self.waiting.pop(demand.job_id, None)
                self.hub.publish(events)
                log.info("job %s failed: %s", demand.job_id, problem.text)
