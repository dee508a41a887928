"""What placement works on: snapshots of GPUs, jobs' demands, and decisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from scheduler.estimator import Need, format_bytes
from sdmesh.errors import quote
from sdmesh.kinds import ModelKind
from sdmesh.speeds import Speed

# Late binding: one job running and one prefetched per GPU; the rest wait
# in the scheduler's queue, where priority and fair share can reorder them.
MAX_ACTIVE_PER_GPU = 2
# What a process holds on a card before any model (the CUDA context), which
# no job can have; used to judge whether a job could ever fit a card.
DEVICE_RESERVE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class GpuView:
    node_id: str
    node_name: str
    index: int
    total_bytes: int
    free_bytes: int  # last reported + evictable resident models - estimates not in the report
    active_jobs: int = 0
    bound_bytes: int = 0  # estimates of the jobs bound here, freed as they finish
    busy_seconds: float = 0.0  # expected work bound here and not yet done
    models: frozenset[str] = frozenset()  # base models on the node's disk
    resident: frozenset[str] = frozenset()  # models loaded on this device
    loras: frozenset[str] = frozenset()  # on the node's disk
    controlnets: frozenset[str] = frozenset()  # on the node's disk
    # (kind, name) -> base family ("sd1", "sdxl"...) of the node's models
    # whose family it knows
    families: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # (kind, name) of the LoRAs and ControlNets loaded on this device
    resident_extras: frozenset[tuple[str, str]] = frozenset()
    speeds: Mapping[str, Speed] = field(default_factory=dict)
    utilization_percent: float = 0.0
    host_free_bytes: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    healthy: bool = True
    draining: bool = False

    @property
    def key(self) -> str:
        return f"{self.node_id}/{self.index}"

    @property
    def room_bytes(self) -> int:
        """Free memory once the work bound here is done. A worker runs one
        job at a time, so a job bound behind others gets this much."""
        return self.free_bytes + self.bound_bytes

    @property
    def name(self) -> str:
        return f"{self.node_name} gpu {self.index}"


@dataclass(frozen=True)
class ExtraModel:
    """A LoRA or ControlNet a job loads beside its base model, with its
    weight size (0 when no node reported it)."""

    kind: ModelKind  # LORA or CONTROLNET
    name: str
    weight_bytes: int = 0

    @property
    def label(self) -> str:
        """How messages name it: "LoRA 'detail'", "ControlNet 'canny'"."""
        return f"{KIND_LABELS[self.kind]} {quote(self.name)}"


KIND_LABELS = {ModelKind.LORA: "LoRA", ModelKind.CONTROLNET: "ControlNet"}


@dataclass(frozen=True)
class Demand:
    job_id: str
    model: str
    weight_bytes: int  # the base model's
    work: float  # megapixel-steps
    needs: tuple[Need, ...]  # the allowed memory modes, most preferred first
    selector: Mapping[str, str] = field(default_factory=dict)
    waited_seconds: float = 0.0
    extras: tuple[ExtraModel, ...] = ()  # its LoRAs, then its ControlNets

    @property
    def all_weight_bytes(self) -> int:
        """The base model's weights and every LoRA's and ControlNet's."""
        return self.weight_bytes + sum(extra.weight_bytes for extra in self.extras)


class Reason(StrEnum):
    """Why a GPU cannot take a job; the value is how a summary names it."""

    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    SELECTOR_MISMATCH = "selector mismatch"
    MODEL_MISSING = "model not on node"
    LORA_MISSING = "LoRA not on node"
    CONTROLNET_MISSING = "ControlNet not on node"
    FAMILY_MISMATCH = "family mismatch"
    BUSY = "busy"
    INSUFFICIENT_VRAM = "insufficient VRAM"
    INSUFFICIENT_HOST_RAM = "insufficient host RAM"


@dataclass(frozen=True)
class Rejection:
    """A filter's verdict, with its numbers, as Kubernetes' filters give
    them: what the job needed, what the GPU had available and its capacity
    (bytes; job slots for BUSY), and whether the GPU can never take the job
    as the GPU is (Kubernetes' UnschedulableAndUnresolvable), so that
    waiting for it is pointless. The text people read is rendered from
    these."""

    reason: Reason
    needed: int = 0
    available: int = 0
    capacity: int = 0
    unresolvable: bool = False
    subject: str = ""  # the label, model, memory mode or job count the numbers are about
    # FAMILY_MISMATCH: the extra's kind and family, the base model and its
    # family (the subject is the extra's name)
    families: tuple[str, str, str, str] | None = None

    @property
    def kind(self) -> str:
        return self.reason.value

    @property
    def detail(self) -> str:
        if self.reason is Reason.INSUFFICIENT_VRAM:
            return f"needs {format_bytes(self.needed)}, {format_bytes(self.available)} free"
        if self.reason is Reason.INSUFFICIENT_HOST_RAM:
            return (
                f"{self.subject} needs {format_bytes(self.needed)}, "
                f"{format_bytes(self.available)} free"
            )
        if self.reason is Reason.LORA_MISSING:
            return f"no LoRA {quote(self.subject)} on this node"
        if self.reason is Reason.CONTROLNET_MISSING:
            return f"no ControlNet {quote(self.subject)} on this node"
        if self.reason is Reason.FAMILY_MISMATCH and self.families is not None:
            kind, family, model, model_family = self.families
            label = KIND_LABELS.get(ModelKind(kind), kind)
            return (
                f"{label} {quote(self.subject)} is for {family}, "
                f"model {quote(model)} is {model_family}"
            )
        return self.subject


@dataclass(frozen=True)
class Placed:
    gpu: GpuView
    need: Need  # for the whole batch, when there is one
    expected_seconds: float  # its own run (the batch's), with a cold load if needed
    score: float
    explanation: str
    batch: tuple[Demand, ...] = ()  # queued jobs that run with it, in one pipeline call


@dataclass(frozen=True)
class Unplaced:
    reason: str
    rejections: tuple[Rejection, ...] = ()  # one per GPU that could not take it


@dataclass(frozen=True)
class Reserved:
    """Waited too long: this GPU takes nothing else until the job fits."""

    gpu: GpuView
    reason: str


Decision = Placed | Unplaced | Reserved
