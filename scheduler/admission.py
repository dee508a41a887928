"""Admission: what a submit must pass before a job is queued, and the
queuing itself.

A spec is resolved (defaults applied, every field checked, the seed fixed)
against the models nodes reported within the node memory window, by kind
(a job names a base model; its LoRAs and ControlNets must each be on some
node), and against the input images its owner uploaded; a job no GPU seen
within that window could ever take, in any memory mode it allows, or that
no one node could run (none has its base model, LoRAs and ControlNets
together), is refused as unresolvable. What passes is stored QUEUED with its first
event; concurrent submits share one transaction (`GroupCommit`), and each
caller is answered after it commits. The job joins the queue index and the
dispatcher is woken.

Before any of that, a submit is counted against its caller's rate (a token
bucket per API key or user, `--submit-rate`), and a new job must fit the
queue bounds (`--max-queued-per-user`, `--max-queued`), counted from the
queue index and the submits still being committed. Past either, the submit
is refused as RESOURCE_EXHAUSTED with a time to retry after. A retried
submit whose request id names a job already stored is answered with that
job, never refused by the queue bounds (it counts against the rate like
any other call).
"""

from __future__ import annotations

import logging
import secrets

from scheduler.config import MAX_QUEUED, MAX_QUEUED_PER_USER, SUBMIT_RATE
from scheduler.domain import Job, KnownModel, NodeRecord
from scheduler.errors import FailedPrecondition, ResourceExhausted
from scheduler.limits import TokenBuckets
from scheduler.placement import SeenGpu, demand_for, unresolvable
from scheduler.runtime import Runtime, UsesRuntime
from scheduler.store.group import GroupCommit
from scheduler.store.store import Submission
from sdmesh.kinds import SHA256, InputInfo, ModelKind
from sdmesh.spec import MAX_SEED, SpecRequest, resolve

log = logging.getLogger(__name__)

# How long the remembered nodes and models read from the store are reused.
REMEMBERED_SECONDS = 2.0
# A full queue's retry hint: jobs take seconds to run, so sooner is no use.
QUEUE_FULL_RETRY_SECONDS = 5.0


def new_job_id() -> str:
    return secrets.token_hex(8)


class Admission(UsesRuntime):
    def __init__(
        self,
        runtime: Runtime,
        *,
        node_window_seconds: float,
        max_attempts: int,
        max_queued_per_user: int = MAX_QUEUED_PER_USER,
        max_queued: int = MAX_QUEUED,
        submit_rate: float = SUBMIT_RATE,
    ) -> None:
        super().__init__(runtime)
        self.node_window_seconds = node_window_seconds
        self.max_attempts = max_attempts
        self.max_queued_per_user = max_queued_per_user
        self.max_queued = max_queued
        self.submit_rates = TokenBuckets(submit_rate, clock=self.clock)
        self._submit = GroupCommit(self.db, self.db.store.submit_many)
        # Submits that passed the queue bounds and are not committed yet, by
        # owner: the index counts a job only once it is stored, and without
        # these a burst of concurrent submits would all pass one bound.
        self._committing: dict[str, int] = {}
        self._committing_total = 0
        # (when read, the cluster's version then, models, nodes)
        self._remembered: tuple[float, int, list[KnownModel], list[NodeRecord]] | None = None

    async def submit(
        self, request: SpecRequest, owner: str, *, limit_key: str | None = None
    ) -> tuple[Job, bool]:
        """Queues the job, or returns the one this owner already submitted
        with the same request id (and False). `limit_key` names whose
        submit rate this counts against (default: the owner's)."""
        self._check_rate(limit_key or f"user:{owner}")
        if not _named_inputs(request):
            return await self._admit(request, owner)
        # From the check that its inputs are the owner's uploads to the
        # commit that records them with the job, no input file is removed
        # (`InputFiles.keeping`): a job deleted meanwhile that named the same
        # image may drop the owner's upload row, but not the file.
        async with self.inputs.keeping():
            return await self._admit(request, owner)

    async def _admit(self, request: SpecRequest, owner: str) -> tuple[Job, bool]:
        known = await self.known_weights()
        names = {kind: [n for k, n in known if k == kind] for kind in ModelKind}
        spec = resolve(
            request,
            known_models=names[ModelKind.BASE],
            known_loras=names[ModelKind.LORA],
            known_controlnets=names[ModelKind.CONTROLNET],
            inputs=await self._inputs(request, owner),
            random_seed=lambda: secrets.randbelow(MAX_SEED + 1),
        )
        weight = known.get((ModelKind.BASE, spec.model), 0)
        demand = demand_for("", spec, weight, self.estimates, extra_weights=known)
        problem = unresolvable(demand, await self.seen_gpus())
        if problem is not None:
            raise FailedPrecondition(problem.text)
        refusal = self._past_queue_bounds(owner)
        if refusal is not None:
            earlier = await self._earlier(owner, spec.request_id)
            if earlier is None:
                raise refusal
            return earlier, False
        self._committing[owner] = self._committing.get(owner, 0) + 1
        self._committing_total += 1
        try:
            job, created = await self._submit(
                Submission(new_job_id(), owner, spec, self.max_attempts)
            )
        finally:
            self._committing_total -= 1
            left = self._committing.pop(owner) - 1
            if left:
                self._committing[owner] = left
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

    def _check_rate(self, limit_key: str) -> None:
        wait = self.submit_rates.take(limit_key)
        if wait:
            kind, _, name = limit_key.partition(":")
            whose = {"key": "this API key", "user": f"user {name}"}.get(kind, limit_key)
            raise ResourceExhausted(
                f"rate limit: {self.submit_rates.rate:g} submits/s for {whose} "
                f"(--submit-rate); retry in {wait:.3g}s",
                wait,
            )

    def _past_queue_bounds(self, owner: str) -> ResourceExhausted | None:
        """The refusal for one more job from this owner, if it would pass a
        queue bound."""
        theirs = self.queue.queued_by(owner) + self._committing.get(owner, 0)
        if theirs >= self.max_queued_per_user:
            return ResourceExhausted(
                f"queue limit: {owner} already has {theirs} jobs queued "
                "(--max-queued-per-user); retry after some finish",
                QUEUE_FULL_RETRY_SECONDS,
            )
        everyone = len(self.queue) + self._committing_total
        if everyone >= self.max_queued:
            return ResourceExhausted(
                f"queue full: {everyone} jobs queued in total (--max-queued); "
                "retry after some finish",
                QUEUE_FULL_RETRY_SECONDS,
            )
        return None

    async def _earlier(self, owner: str, request_id: str) -> Job | None:
        """The job this owner already stored with this request id: a retry
        at a queue bound gets it back rather than a refusal."""
        if not request_id:
            return None
        key = (owner, request_id)
        found = await self.db.run(self.db.store._by_request_ids, {key})
        return found.get(key)

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

    async def _inputs(self, request: SpecRequest, owner: str) -> dict[str, InputInfo]:
        """The input images the request names that its owner uploaded, by
        sha256; a name that is no sha256 is left for `resolve` to refuse."""
        shas = _named_inputs(request)
        if not shas:
            return {}
        return await self.db.run(self.db.store.inputs.sizes, owner, shas)

    async def known_weights(self) -> dict[tuple[str, str], int]:
        """(kind, name) -> weight size of every model seen within the node
        memory window, the connected nodes' as they are now."""
        remembered, _ = await self._recent()
        known = {(model.kind, model.name): model.weight_bytes for model in remembered}
        for key, weight_bytes in self.cluster.weights().items():
            known[key] = max(weight_bytes, known.get(key, 0))
        return known

    async def seen_gpus(self) -> list[SeenGpu]:
        """Every GPU a node reported within the node memory window, the
        connected ones as they are now."""
        _, records = await self._recent()
        nodes = {record.info.node_id: record.info for record in records}
        nodes.update({node_id: s.info for node_id, s in self.cluster.sessions.items()})
        seen = []
        for info in nodes.values():
            models = frozenset((model.kind, model.name) for model in info.models)
            families = {(m.kind, m.name): m.family for m in info.models if m.family}
            seen += [
                SeenGpu(info.name, d.index, d.total_bytes, info.labels, models, families)
                for d in info.devices
            ]
        return seen


def _named_inputs(request: SpecRequest) -> list[str]:
    """The sha256 of the input images a request names (a name that is no
    sha256 is left for `resolve` to refuse)."""
    named = [request.init_image, request.mask, *(u.image for u in request.controlnets)]
    return sorted({sha for sha in named if sha and SHA256.fullmatch(sha)})
