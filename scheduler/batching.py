"""Cross-request batching: a job placed on a GPU takes alike queued jobs
with it (`sdmesh.spec.batch_key`: same model, size, steps, sampler,
guidance, memory mode and selector, same kind and its settings, LoRAs,
ControlNets and n_iter; jobs of different kinds never share a batch), and
the agent runs them as one
pipeline call with each job's prompts and seeds. On a GPU that is not
saturated by one image, several images in one call cost little more than
one.

- A batch grows only while the estimated VRAM of all its images in one
  call (their batch sizes; n_iter calls run one after another) fits the
  GPU's room in the placed memory mode, up to `max_images` images a call.
- Partners are chosen as the queue policy would: users take turns, the
  one with the fewest jobs on GPUs first, each user's oldest first. A job
  never waits for a partner longer than `wait_seconds` (default 0: only
  what is already queued).
- Each job keeps its own attempt; the batch counts as one job on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from itertools import islice, zip_longest

from scheduler.config import BATCH_MAX_IMAGES
from scheduler.domain import Job
from scheduler.estimator import EstimateBook, Need
from scheduler.placement import Decision, Demand, Placed, Unplaced, shape_of
from scheduler.queue import QueueIndex
from sdmesh.spec import batch_key

# How many of the oldest alike queued jobs a batch is chosen from.
CANDIDATE_WINDOW = 64


@dataclass(frozen=True)
class BatchPolicy:
    max_images: int = BATCH_MAX_IMAGES
    wait_seconds: float = 0.0


class QueueBatcher:
    """The placement planner's `Batcher` over the queue index, for one pass."""

    def __init__(
        self,
        policy: BatchPolicy,
        queue: QueueIndex,
        estimates: EstimateBook,
        weight_of: Callable[[str], int],
        demand_of: Callable[[Job], Demand],
        active: Mapping[str, int] | None = None,
    ) -> None:
        self.policy = policy
        self.active = active or {}  # each user's jobs on GPUs, as fair share counts them
        self.queue = queue
        self.estimates = estimates
        self.weight_of = weight_of
        self.demand_of = demand_of

    def __call__(self, demand: Demand, placed: Placed, taken: set[str]) -> Decision:
        lead = self.queue.get(demand.job_id)
        if lead is None or self.policy.max_images <= 1:
            return placed
        spec = lead.spec
        images, need = spec.batch_size, placed.need
        partners: list[Demand] = []
        for job in self._candidates(lead, taken):
            if images >= self.policy.max_images:
                break
            more = images + job.spec.batch_size
            if more > self.policy.max_images:
                continue
            grown = self._need(demand, lead, more, placed)
            if grown is None:
                break  # a larger batch would not fit this GPU either
            partners.append(self.demand_of(job))
            images, need = more, grown
        if not partners:
            if demand.waited_seconds < self.policy.wait_seconds:
                return Unplaced(
                    f"waiting up to {self.policy.wait_seconds:g}s for an alike job to batch with"
                )
            return placed
        work = demand.work + sum(partner.work for partner in partners)
        return replace(
            placed,
            need=need,
            # The run grows with the work; a cold load does not, so this errs long.
            expected_seconds=placed.expected_seconds * work / max(demand.work, 1e-9),
            batch=tuple(partners),
            explanation=f"{placed.explanation}; batched with {len(partners)} alike "
            f"job(s), {images} images",
        )

    def _candidates(self, lead: Job, taken: set[str]) -> list[Job]:
        """Alike queued jobs, in the queue policy's spirit: users take
        turns, the one with the fewest jobs on GPUs first, each user's
        oldest first. Only the oldest CANDIDATE_WINDOW alike jobs are
        looked at: a batch never costs a scan of the whole queue."""
        by_owner: dict[str, list[Job]] = {}
        for job in islice(self.queue.alike(batch_key(lead.spec)), CANDIDATE_WINDOW):
            if job.id != lead.id and job.id not in taken:
                by_owner.setdefault(job.owner, []).append(job)
        owners = sorted(by_owner, key=lambda o: (self.active.get(o, 0), by_owner[o][0].created_at))
        turns = [by_owner[owner] for owner in owners]
        return [job for row in zip_longest(*turns) for job in row if job is not None]

    def _need(self, demand: Demand, lead: Job, images: int, placed: Placed) -> Need | None:
        """What `images` images of the lead's shape (its kind, LoRAs and
        ControlNets included, as its demand has them) need in the placed
        mode, if the GPU has room for it. One call holds `images` images;
        the batch's n_iter calls run one after another, so n_iter does not
        add to the peak."""
        shape = replace(shape_of(lead.spec), batch_size=images)
        weights = self.weight_of(lead.spec.model) + sum(e.weight_bytes for e in demand.extras)
        need = self.estimates.need(weights, shape, placed.need.mode)
        gpu = placed.gpu
        if need.vram_bytes > gpu.room_bytes or need.host_bytes > gpu.host_free_bytes:
            return None
        return need
