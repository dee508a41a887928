"""What placement works on: snapshots of GPUs, jobs' demands, and decisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from scheduler.estimator import Need
from scheduler.speeds import Speed

# Late binding: one job running and one prefetched per GPU; the rest wait
# in the scheduler's queue, where priority and fair share can reorder them.
MAX_ACTIVE_PER_GPU = 2


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
    models: frozenset[str] = frozenset()  # on the node's disk
    resident: frozenset[str] = frozenset()  # loaded on this device
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
class Demand:
    job_id: str
    model: str
    weight_bytes: int
    work: float  # megapixel-steps
    needs: tuple[Need, ...]  # the allowed memory modes, most preferred first
    selector: Mapping[str, str] = field(default_factory=dict)
    waited_seconds: float = 0.0


@dataclass(frozen=True)
class Rejection:
    kind: str  # groups reasons in the summary: "insufficient VRAM", "busy", ...
    detail: str = ""


@dataclass(frozen=True)
class Placed:
    gpu: GpuView
    need: Need
    expected_seconds: float  # its own run, with a cold load if needed
    score: float
    explanation: str


@dataclass(frozen=True)
class Unplaced:
    reason: str


@dataclass(frozen=True)
class Reserved:
    """Waited too long: this GPU takes nothing else until the job fits."""

    gpu: GpuView
    reason: str


Decision = Placed | Unplaced | Reserved
