"""Admission: what a submit must pass before a job is queued, and the
queuing itself.

A spec is resolved (defaults applied, every field checked, the seed fixed)
against the models nodes reported within the node memory window; a job no
GPU seen within that window could ever take, in any memory mode it allows,
is refused as unresolvable. What passes is stored QUEUED with its first
event in one transaction, and the dispatcher is woken.
"""

from __future__ import annotations

import logging
import secrets

from scheduler.domain import Job
from scheduler.errors import FailedPrecondition
from scheduler.placement import SeenGpu, demand_for, unresolvable
from scheduler.runtime import Runtime, UsesRuntime
from sdmesh.spec import MAX_SEED, SpecRequest, resolve

log = logging.getLogger(__name__)


def new_job_id() -> str:
    return secrets.token_hex(8)


class Admission(UsesRuntime):
    def __init__(self, runtime: Runtime, *, node_window_seconds: float, max_attempts: int) -> None:
        super().__init__(runtime)
        self.node_window_seconds = node_window_seconds
        self.max_attempts = max_attempts

    async def submit(self, request: SpecRequest, owner: str) -> tuple[Job, bool]:
        """Queues the job, or returns the one this owner already submitted
        with the same request id (and False)."""
        known = await self.known_models()
        spec = resolve(
            request, known_models=known, random_seed=lambda: secrets.randbelow(MAX_SEED + 1)
        )
        problem = unresolvable(
            demand_for("", spec, known.get(spec.model, 0), self.estimates), await self.seen_gpus()
        )
        if problem is not None:
            raise FailedPrecondition(problem.text)
        job, created = await self.db.run(
            self.db.store.submit, new_job_id(), owner, spec, self.max_attempts
        )
        if created:
            log.info(
                "job %s submitted by %s: %s %dx%d, %d steps",
                job.id,
                owner,
                spec.model,
                spec.width,
                spec.height,
                spec.steps,
            )
            self.wake()
        return job, created

    async def known_models(self) -> dict[str, int]:
        """Models seen within the node memory window, with their weight size."""
        since = self.clock() - self.node_window_seconds
        remembered = await self.db.run(self.db.store.nodes.models_seen_since, since)
        known = {model.name: model.weight_bytes for model in remembered}
        for name, weight_bytes in self.cluster.models().items():
            known[name] = max(weight_bytes, known.get(name, 0))
        return known

    async def seen_gpus(self) -> list[SeenGpu]:
        """Every GPU a node reported within the node memory window."""
        since = self.clock() - self.node_window_seconds
        records = await self.db.run(self.db.store.nodes.seen_since, since)
        return [
            SeenGpu(record.info.name, device.index, device.total_bytes, record.info.labels)
            for record in records
            for device in record.info.devices
        ]
