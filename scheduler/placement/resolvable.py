"""Whether a job could ever run on the GPUs seen recently: checked at
submit, and again when a job's estimate rose after it ran out of memory.

Pure functions: no I/O and no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scheduler.estimator import format_bytes
from scheduler.placement.filters import selector_mismatch
from scheduler.placement.views import DEVICE_RESERVE_BYTES, Demand
from sdmesh.spec import MemoryMode


@dataclass(frozen=True)
class SeenGpu:
    """A GPU some node reported within the node memory window."""

    node_name: str
    index: int
    total_bytes: int
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Unresolvable:
    """A job no GPU seen recently could ever take: it needs `needed_bytes`
    even in its smallest memory mode `mode`, and the biggest GPU that
    matches its selector has `biggest.total_bytes`."""

    needed_bytes: int
    mode: MemoryMode
    allowed: tuple[MemoryMode, ...]
    biggest: SeenGpu

    @property
    def text(self) -> str:
        modes = ", ".join(mode.value for mode in self.allowed)
        gpu = self.biggest
        return (
            f"fits no GPU seen recently: needs at least {format_bytes(self.needed_bytes)} "
            f"({self.mode.value}; allowed modes: {modes}), and the biggest GPU is "
            f"{gpu.node_name} gpu {gpu.index} with {format_bytes(gpu.total_bytes)}"
        )


def unresolvable(demand: Demand, seen: Sequence[SeenGpu]) -> Unresolvable | None:
    """Why the job can never run on any GPU seen recently, or None when some
    GPU could take it (or none has been seen, or none matches its selector
    yet: a dedicated pool may simply not have started)."""
    matching = [gpu for gpu in seen if selector_mismatch(demand.selector, gpu.labels) is None]
    if not matching:
        return None
    smallest = min(demand.needs, key=lambda need: need.vram_bytes)
    if any(smallest.vram_bytes <= gpu.total_bytes - DEVICE_RESERVE_BYTES for gpu in matching):
        return None
    biggest = max(matching, key=lambda gpu: (gpu.total_bytes, gpu.node_name, -gpu.index))
    return Unresolvable(
        smallest.vram_bytes, smallest.mode, tuple(need.mode for need in demand.needs), biggest
    )
