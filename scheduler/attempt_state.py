"""What the scheduler keeps of one in-flight attempt (`ActiveAttempt`), of
one whose agent is away (`Orphan`), and how a placement becomes one
(`bound`). Plain data and pure functions; `scheduler.attempts` owns them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scheduler.domain import Job
from scheduler.placement import Placed
from scheduler.placement.timing import seconds_at
from scheduler.uploads import UploadBuffer
from sdmesh.spec import JobSpec, MemoryMode
from sdmesh.speeds import megapixel_steps

if TYPE_CHECKING:
    from scheduler.cluster import NodeSession

# Attempts a node was told are over, remembered so that it is told once,
# not once per message it still sends about them.
TOLD_REMEMBERED = 256


@dataclass
class ActiveAttempt:
    job_id: str
    attempt: int
    gpu_index: int
    owner: str
    spec: JobSpec
    memory_mode: MemoryMode  # the mode it was placed in
    vram_bytes: int  # the estimate placement charged
    expected_seconds: float  # placement's guess at its run, cold load included
    assigned_at: float
    started_at: float | None = None
    last_step_at: float | None = None  # when it last reported a step
    step_seconds: float = 0.0  # the expected time per step; 0 when unknown
    stopping: bool = False  # a stop was sent; its progress is no longer news
    batch: str = ""  # the first job of the batch it runs in, if it runs in one
    refused_reports: int = 0  # progress and previews dropped as malformed; the first is logged
    uploads: UploadBuffer = field(init=False)

    def __post_init__(self) -> None:
        self.uploads = UploadBuffer(self.spec)

    def remaining_seconds(self, now: float) -> float:
        if self.started_at is None:
            return self.expected_seconds
        return max(0.0, self.expected_seconds - (now - self.started_at))


@dataclass
class Orphan:
    """An attempt whose agent is not connected: its stream dropped, or the
    scheduler restarted. It waits for that agent to reconnect and re-attach
    it until `deadline`, then it is re-queued as lost."""

    active: ActiveAttempt
    node_id: str
    node_name: str
    deadline: float
    why: str


def count_by_owner(attempts: Iterable[ActiveAttempt]) -> dict[str, int]:
    """Attempts per user, which fair share counts against them."""
    return dict(Counter(active.owner for active in attempts))


def bound(
    job: Job, attempt: int, placed: Placed, now: float, batch: Sequence[Job] = ()
) -> ActiveAttempt:
    """The attempt placement put on a GPU, with its expected step time. In
    a batch (`batch`: every job in it), each job carries an even share of
    the batch's memory and time, and a step takes the whole batch's."""
    spec = job.spec
    members = batch or (job,)
    images = sum(member.spec.batch_size for member in members)
    work = megapixel_steps(spec.width, spec.height, images, 1)
    measured = seconds_at(placed.gpu.speeds.get(spec.model), work, placed.need.mode)
    step_seconds = measured or 0.0
    return ActiveAttempt(
        job_id=job.id,
        attempt=attempt,
        gpu_index=placed.gpu.index,
        owner=job.owner,
        spec=spec,
        memory_mode=placed.need.mode,
        vram_bytes=placed.need.vram_bytes // len(members),
        expected_seconds=placed.expected_seconds / len(members),
        assigned_at=now,
        step_seconds=step_seconds,
        batch=members[0].id if len(members) > 1 else "",
    )


class Told:
    """The attempts one node was told are over (stopped as stale, fenced,
    refused), the latest `limit` of them: what it still says about them is
    dropped without a word."""

    def __init__(self, limit: int = TOLD_REMEMBERED) -> None:
        self._limit = limit
        self._attempts: OrderedDict[tuple[str, int], None] = OrderedDict()

    def add(self, job_id: str, attempt: int) -> bool:
        """Remembers the attempt; False if it was already."""
        if (job_id, attempt) in self._attempts:
            return False
        self._attempts[(job_id, attempt)] = None
        while len(self._attempts) > self._limit:
            self._attempts.popitem(last=False)
        return True


def holder(
    held: Mapping[NodeSession, Mapping[str, ActiveAttempt]],
    orphans: Mapping[str, Orphan],
    node_id: str,
    job_id: str,
    attempt: int,
) -> str:
    """The name of the node other than `node_id` that attempt `attempt` of
    the job is bound to, connected or away; "" when none is."""
    for session, attempts in held.items():
        active = attempts.get(job_id)
        if session.node_id != node_id and active is not None and active.attempt == attempt:
            return session.name
    orphan = orphans.get(job_id)
    if orphan is not None and orphan.node_id != node_id and orphan.active.attempt == attempt:
        return orphan.node_name
    return ""
