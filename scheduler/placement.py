"""Where a job runs: pure functions over a snapshot of the GPUs, no I/O.

First filter, then score, as the Kubernetes scheduler does. A filter that
rejects a GPU says why, with numbers ("needs 1.3 GiB, 0.8 GiB free"); a job
that no GPU takes gets a summary of those reasons. Among the GPUs that pass,
the least busy wins, then the one with the most memory left; ties break on
node id and GPU index so that the same snapshot always gives the same answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from scheduler.estimator import format_bytes

# Late binding: one job running and one prefetched per GPU; the rest wait
# in the scheduler's queue, where priority can still reorder them.
MAX_ACTIVE_PER_GPU = 2


@dataclass(frozen=True)
class GpuView:
    node_id: str
    node_name: str
    index: int
    total_bytes: int
    free_bytes: int  # last reported, less the estimates of jobs assigned since
    active_jobs: int
    models: frozenset[str]
    healthy: bool = True
    draining: bool = False


@dataclass(frozen=True)
class Demand:
    job_id: str
    model: str
    vram_bytes: int


@dataclass(frozen=True)
class Rejection:
    kind: str  # groups reasons in the summary: "insufficient memory", "busy", ...
    detail: str = ""


@dataclass(frozen=True)
class Placed:
    gpu: GpuView


@dataclass(frozen=True)
class Unplaced:
    reason: str


Decision = Placed | Unplaced
Filter = Callable[[Demand, GpuView], Rejection | None]


def node_usable(_: Demand, gpu: GpuView) -> Rejection | None:
    if not gpu.healthy:
        return Rejection("unhealthy")
    if gpu.draining:
        return Rejection("draining")
    return None


def model_present(demand: Demand, gpu: GpuView) -> Rejection | None:
    if demand.model not in gpu.models:
        return Rejection("model not on node", demand.model)
    return None


def slot_free(_: Demand, gpu: GpuView) -> Rejection | None:
    if gpu.active_jobs >= MAX_ACTIVE_PER_GPU:
        return Rejection("busy", f"{gpu.active_jobs} jobs")
    return None


def memory_fits(demand: Demand, gpu: GpuView) -> Rejection | None:
    if demand.vram_bytes > gpu.free_bytes:
        return Rejection(
            "insufficient memory",
            f"needs {format_bytes(demand.vram_bytes)}, {format_bytes(gpu.free_bytes)} free",
        )
    return None


FILTERS: tuple[Filter, ...] = (node_usable, model_present, slot_free, memory_fits)


def rejection(demand: Demand, gpu: GpuView) -> Rejection | None:
    for check in FILTERS:
        found = check(demand, gpu)
        if found is not None:
            return found
    return None


def _preference(demand: Demand, gpu: GpuView) -> tuple[int, int, str, int]:
    return (gpu.active_jobs, -(gpu.free_bytes - demand.vram_bytes), gpu.node_id, gpu.index)


def summarize(total: int, rejections: Sequence[Rejection]) -> str:
    """ "0/4 GPUs: 3 insufficient memory (needs 1.3 GiB, 0.8 GiB free), 1 draining" """
    if total == 0:
        return "no GPUs connected"
    counts = Counter(r.kind for r in rejections)
    example = {r.kind: r.detail for r in reversed(rejections)}
    parts = [
        f"{count} {kind}" + (f" ({example[kind]})" if example[kind] else "")
        for kind, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]
    return f"0/{total} GPUs: " + ", ".join(parts)


def place(demand: Demand, gpus: Sequence[GpuView]) -> Decision:
    candidates: list[GpuView] = []
    rejections: list[Rejection] = []
    for gpu in gpus:
        found = rejection(demand, gpu)
        if found is None:
            candidates.append(gpu)
        else:
            rejections.append(found)
    if not candidates:
        return Unplaced(summarize(len(gpus), rejections))
    return Placed(min(candidates, key=lambda gpu: _preference(demand, gpu)))


def plan(demands: Sequence[Demand], gpus: Sequence[GpuView]) -> list[tuple[Demand, Decision]]:
    """Places jobs in queue order, charging each placement to its GPU's view
    before the next job is considered."""
    views = {(gpu.node_id, gpu.index): gpu for gpu in gpus}
    decisions: list[tuple[Demand, Decision]] = []
    for demand in demands:
        decision = place(demand, list(views.values()))
        if isinstance(decision, Placed):
            gpu = decision.gpu
            views[(gpu.node_id, gpu.index)] = replace(
                gpu,
                active_jobs=gpu.active_jobs + 1,
                free_bytes=gpu.free_bytes - demand.vram_bytes,
            )
        decisions.append((demand, decision))
    return decisions
