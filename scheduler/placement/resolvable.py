"""Whether a job could ever run on the GPUs seen recently: checked at
submit, and again when a job's estimate rose after it ran out of memory.

Pure functions: no I/O and no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scheduler.estimator import format_bytes
from scheduler.placement.filters import selector_mismatch
from scheduler.placement.views import DEVICE_RESERVE_BYTES, Demand, ExtraModel
from sdmesh.errors import quote
from sdmesh.kinds import ModelKind
from sdmesh.spec import MemoryMode

ModelKey = tuple[str, str]  # (kind, name)


@dataclass(frozen=True)
class SeenGpu:
    """A GPU some node reported within the node memory window."""

    node_name: str
    index: int
    total_bytes: int
    labels: Mapping[str, str]
    # (kind, name) of every model its node has; None when not known, and
    # then the GPU is not judged by its models
    models: frozenset[ModelKey] | None = None
    families: Mapping[ModelKey, str] = field(default_factory=dict)  # those it knows


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


@dataclass(frozen=True)
class MissingTogether:
    """A job with LoRAs or ControlNets that no node seen recently could run:
    none has its base model and all of them together. `closest` is the
    node that lacks the fewest, and `lacking` what it lacks."""

    model: str
    extras: tuple[ExtraModel, ...]
    closest: str
    lacking: tuple[str, ...]

    @property
    def text(self) -> str:
        wanted = ", ".join((f"model {quote(self.model)}", *(e.label for e in self.extras)))
        return (
            f"no node seen recently has {wanted} together; "
            f"the closest, {self.closest}, lacks {', '.join(self.lacking)}"
        )


Problem = Unresolvable | MissingTogether


def _lacking(demand: Demand, gpu: SeenGpu) -> tuple[str, ...]:
    """What of the job's models the GPU's node lacks (an extra made for
    another family than its base model counts as lacking)."""
    models = gpu.models or frozenset()
    if (ModelKind.BASE, demand.model) not in models:
        return (
            f"model {quote(demand.model)}",
            *(e.label for e in demand.extras if (e.kind, e.name) not in models),
        )
    base_family = gpu.families.get((ModelKind.BASE, demand.model), "")
    lacking = []
    for extra in demand.extras:
        family = gpu.families.get((extra.kind, extra.name), "")
        if (extra.kind, extra.name) not in models:
            lacking.append(extra.label)
        elif base_family and family and family != base_family:
            lacking.append(f"{extra.label} for {base_family} (it has one for {family})")
    return tuple(lacking)


def unresolvable(demand: Demand, seen: Sequence[SeenGpu]) -> Problem | None:
    """Why the job can never run on any GPU seen recently, or None when some
    GPU could take it (or none has been seen, or none matches its selector
    yet: a dedicated pool may simply not have started). A job with LoRAs or
    ControlNets needs one node with its base model and all of them."""
    matching = [gpu for gpu in seen if selector_mismatch(demand.selector, gpu.labels) is None]
    if not matching:
        return None
    if demand.extras:
        holding = [gpu for gpu in matching if gpu.models is None or not _lacking(demand, gpu)]
        if not holding:  # every one is known, and each lacks something
            lacks = {gpu.node_name: _lacking(demand, gpu) for gpu in matching}
            closest = min(lacks, key=lambda name: (len(lacks[name]), name))
            return MissingTogether(demand.model, demand.extras, closest, lacks[closest])
        matching = holding
    smallest = min(demand.needs, key=lambda need: need.vram_bytes)
    if any(smallest.vram_bytes <= gpu.total_bytes - DEVICE_RESERVE_BYTES for gpu in matching):
        return None
    biggest = max(matching, key=lambda gpu: (gpu.total_bytes, gpu.node_name, -gpu.index))
    return Unresolvable(
        smallest.vram_bytes, smallest.mode, tuple(need.mode for need in demand.needs), biggest
    )
