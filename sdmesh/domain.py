"""The types agents and the scheduler (and, for images, the client) exchange,
as plain dataclasses: devices, models, nodes, images, and what an agent
reports about an attempt, from its start to how it ended.

Protobuf stops at `sdmesh.convert`; everything past it uses these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from sdmesh.speeds import Speed

# ---- devices, models and nodes ---------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    uuid: str
    kind: str  # "cuda" or "cpu"
    total_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """A model a node has (or holds on a device): a base model, an
    inpainting model, a ControlNet or a LoRA (`sdmesh.kinds.ModelKind`), the
    base family it fits ("sd1", "sdxl", "tiny"...; "" when unknown) and,
    for LoRAs and ControlNets, the sha256 of its weights (for infotexts)."""

    name: str
    weight_bytes: int
    dtype: str
    kind: str = "base"
    family: str = ""
    sha256: str = ""


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


# ---- images, progress and previews -----------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """A stored PNG of a job: image `index` of its batch, made with `seed`."""

    index: int
    seed: int
    sha256: str
    size_bytes: int
    width: int
    height: int


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int


@dataclass(frozen=True)
class Preview:
    """A small picture of the latents, made without the VAE."""

    step: int
    total_steps: int
    width: int
    height: int
    png: bytes = field(repr=False)


# ---- what an agent reports about an attempt --------------------------------


class AttemptOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the agent reported an error (out of memory, a crash in the pipeline)
    STOPPED = "stopped"  # the job was cancelled, or the attempt was fenced off
    RELEASED = "released"  # handed back unfinished; not a failure
    LOST = "lost"  # its node went away (the scheduler's verdict; agents never send it)


@dataclass(frozen=True)
class AttemptProfile:
    """What one attempt cost, as Forge's --profile reports it."""

    load_seconds: float = 0.0
    mean_step_seconds: float = 0.0
    peak_vram_bytes: int = 0  # 0 when the device cannot tell


@dataclass(frozen=True)
class Started:
    """The device's worker picked the attempt up: ASSIGNED -> RUNNING."""


@dataclass(frozen=True)
class ImageReady:
    """One finished PNG, as the agent has it. It travels in chunks."""

    index: int
    seed: int
    width: int
    height: int
    png: bytes = field(repr=False)


@dataclass(frozen=True)
class ImageChunk:
    """One piece of one PNG, as the scheduler receives it; the last piece
    carries the digest and size of the whole."""

    index: int
    offset: int
    data: bytes = field(repr=False)
    seed: int
    width: int
    height: int
    last: bool = False
    sha256: str = ""
    size_bytes: int = 0


@dataclass(frozen=True)
class Ended:
    """The attempt is over and its GPU slot is free."""

    outcome: AttemptOutcome
    reason: str = ""  # one line
    error_kind: str = ""  # "oom", "error", "model", ... when FAILED
    profile: AttemptProfile = field(default_factory=AttemptProfile)


UpdateBody = Started | Progress | Preview | ImageReady | ImageChunk | Ended


@dataclass(frozen=True)
class AttemptUpdate:
    """One thing an agent says about attempt `attempt` of job `job_id`. The
    pair is the fencing token: an update from a stale attempt changes
    nothing on the scheduler."""

    job_id: str
    attempt: int
    body: UpdateBody
