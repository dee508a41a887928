"""Admission: what a submit must pass before a job is queued, and the
queuing itself.

A spec is resolved (defaults applied, every field checked, the seed fixed)
against the models nodes reported within the node memory window; a job no
GPU seen within that window could ever take, in any memory mode it allows,
is refused as unresolvable. What passes is stored QUEUED with its first
event; concurrent submits share one transaction (`GroupCommit`), and each
caller is answered after it commits. The job joins the queue index and the
dispatcher is woken.
"""

from __future__ import annotations

import logging
import secrets

from scheduler.domain import Job, KnownModel, NodeRecord
from scheduler.errors import FailedPrecondition
from scheduler.placement import SeenGpu, demand_for, unresolvable
from scheduler.runtime import Runtime, UsesRuntime
from scheduler.store.group import GroupCommit
from scheduler.store.store import Submission
from sdmesh.spec import MAX_SEED, SpecRequest, resolve

log = logging.getLogger(__name__)

# How long the remembered nodes and models read from the store are reused.
REMEMBERED_SECONDS = 2.0


def new_job_id() -> str:
    return secrets.token_hex(8)


class Admission(UsesRuntime):
    def __init__(self, runtime: Runtime, *, node_window_seconds: float, max_attempts: int) -> None:
        super().__init__(runtime)
        self.node_window_seconds = node_window_seconds
        self.max_attempts = max_attempts
        self._submit = GroupCommit(self.db, self.db.store.submit_many)
        # (when read, the cluster's version then, models, nodes)
        self._remembered: tuple[float, int, list[KnownModel], list[NodeRecord]] | None = None

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
        job, created = await self._submit(Submission(new_job_id(), owner, spec, self.max_attempts))
        if created:
            self.queue.add(job)
            log.debug(
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

    async def _recent(self) -> tuple[list[KnownModel], list[NodeRecord]]:
        """The models and nodes the store remembers from within the node
        window, read again after REMEMBERED_SECONDS or when a node came or
        went: a submit must not cost two reads. Connected nodes are added
        live by the callers."""
        now, version = self.clock(), self.cluster.version
        cached = self._remembered
        if cached is None or now - cached[0] >= REMEMBERED_SECONDS or cached[1] != version:
            since = now - self.node_window_seconds
            models = await self.db.run(self.db.store.nodes.models_seen_since, since)
            nodes = await self.db.run(self.db.store.nodes.seen_since, since)
            cached = self._remembered = (now, version, models, nodes)
        return cached[2], cached[3]

    async def known_models(self) -> dict[str, int]:
        """Models seen within the node memory window, with their weight size."""
        remembered, _ = await self._recent()
        known = {model.name: model.weight_bytes for model in remembered}
        for name, weight_bytes in self.cluster.models().items():
            known[name] = max(weight_bytes, known.get(name, 0))
        return known

    async def seen_gpus(self) -> list[SeenGpu]:
        """Every GPU a node reported within the node memory window, the
        connected ones as they are now."""
        _, records = await self._recent()
        nodes = {record.info.node_id: record.info for record in records}
        nodes.update({node_id: s.info for node_id, s in self.cluster.sessions.items()})
        return [
            SeenGpu(info.name, device.index, device.total_bytes, info.labels)
            for info in nodes.values()
            for device in info.devices
        ]
