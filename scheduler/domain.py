"""Plain dataclasses the scheduler works on inside its boundary: jobs,
their attempts and events, and what it remembers of nodes and models.

Protobuf types stop at `scheduler.convert` and `sdmesh.convert`; everything
past them uses these and the contract's types in `sdmesh.domain`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.states import JobState
from sdmesh.domain import AttemptProfile, ImageInfo, NodeInfo, Preview, Progress
from sdmesh.spec import JobSpec, MemoryMode


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    spec: JobSpec
    state: JobState
    attempt: int
    failures: int
    max_attempts: int
    created_at: float
    updated_at: float
    node_id: str = ""
    node_name: str = ""
    gpu_index: int = -1
    memory_mode: MemoryMode = MemoryMode.AUTO
    reason: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    images: tuple[ImageInfo, ...] = ()


@dataclass(frozen=True)
class AttemptRecord:
    """One dispatch of a job, with why it went where it did and its profile."""

    attempt: int
    node_id: str
    node_name: str
    gpu_index: int
    memory_mode: MemoryMode
    assigned_at: float
    outcome: str = ""  # "" while it runs; an AttemptOutcome value after
    reason: str = ""
    placement: str = ""
    vram_estimate_bytes: int = 0
    queued_seconds: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    profile: AttemptProfile = field(default_factory=AttemptProfile)


@dataclass(frozen=True)
class StateChange:
    state: JobState
    reason: str = ""
    node_id: str = ""
    node_name: str = ""
    gpu_index: int = -1


EventBody = StateChange | ImageInfo | Progress | Preview


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's history. seq > 0 marks a durable event; progress
    and previews are kept in memory only and have seq 0."""

    job_id: str
    seq: int
    attempt: int
    time: float
    body: EventBody

    @property
    def durable(self) -> bool:
        return self.seq > 0

    @property
    def terminal(self) -> bool:
        return isinstance(self.body, StateChange) and self.body.state.terminal


@dataclass(frozen=True)
class NodeRecord:
    """A node as the store remembers it."""

    info: NodeInfo
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class KnownModel:
    name: str
    weight_bytes: int
    dtype: str
    node_ids: tuple[str, ...]
    last_seen: float
    kind: str = "base"  # sdmesh.kinds.ModelKind
    family: str = ""
