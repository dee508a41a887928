"""Plain dataclasses the scheduler works on inside its boundary.

Protobuf types stop at `convert`; everything past it uses these. Agents use
the device and model types too, so both sides describe a GPU the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from scheduler.spec import JobSpec, MemoryMode
from scheduler.speeds import Speed
from scheduler.states import JobState


@dataclass(frozen=True)
class ImageMeta:
    index: int
    seed: int
    sha256: str
    size_bytes: int
    width: int
    height: int


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
    images: tuple[ImageMeta, ...] = ()


class AttemptOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the agent reported an error (out of memory, a crash in the pipeline)
    STOPPED = "stopped"  # the job was cancelled, or the attempt was fenced off
    RELEASED = "released"  # handed back unfinished; not a failure
    LOST = "lost"  # its node went away


@dataclass(frozen=True)
class AttemptProfile:
    """What one attempt cost, as Forge's --profile reports it."""

    load_seconds: float = 0.0
    mean_step_seconds: float = 0.0
    peak_vram_bytes: int = 0  # 0 when the device cannot tell


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


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int


@dataclass(frozen=True)
class Preview:
    step: int
    total_steps: int
    width: int
    height: int
    png: bytes


EventBody = StateChange | ImageMeta | Progress | Preview


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
class DeviceInfo:
    index: int
    name: str
    uuid: str
    kind: str  # "cuda" or "cpu"
    total_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    weight_bytes: int
    dtype: str


@dataclass(frozen=True)
class DeviceStats:
    index: int
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization_percent: float
    resident_models: tuple[ModelInfo, ...] = ()
    speeds: Mapping[str, Speed] = field(default_factory=dict)  # measured, per model

    @property
    def resident_bytes(self) -> int:
        return sum(model.weight_bytes for model in self.resident_models)


@dataclass(frozen=True)
class NodeInfo:
    """What an agent says about itself in its hello."""

    node_id: str
    name: str
    hostname: str
    agent_version: str
    devices: tuple[DeviceInfo, ...]
    models: tuple[ModelInfo, ...]
    labels: Mapping[str, str] = field(default_factory=dict)


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
