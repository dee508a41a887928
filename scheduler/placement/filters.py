"""Filters: can this GPU take this job at all, and if not, why not (with
numbers). The memory filter also picks the memory mode: the most preferred
one that fits."""

from __future__ import annotations

from collections.abc import Callable

from scheduler.estimator import Need, format_bytes
from scheduler.placement.views import MAX_ACTIVE_PER_GPU, Demand, GpuView, Rejection

Filter = Callable[[Demand, GpuView], Rejection | None]


def node_usable(_: Demand, gpu: GpuView) -> Rejection | None:
    if not gpu.healthy:
        return Rejection("unhealthy")
    if gpu.draining:
        return Rejection("draining")
    return None


def labels_match(demand: Demand, gpu: GpuView) -> Rejection | None:
    for key, value in sorted(demand.selector.items()):
        if gpu.labels.get(key) != value:
            return Rejection("selector mismatch", f"{key}={value}")
    return None


def model_present(demand: Demand, gpu: GpuView) -> Rejection | None:
    if demand.model not in gpu.models:
        return Rejection("model not on node", demand.model)
    return None


def slot_free(_: Demand, gpu: GpuView) -> Rejection | None:
    if gpu.active_jobs >= MAX_ACTIVE_PER_GPU:
        return Rejection("busy", f"{gpu.active_jobs} jobs")
    return None


def fitting_need(demand: Demand, gpu: GpuView) -> Need | None:
    """The most preferred memory mode that fits when the job's turn on the
    GPU comes (after the work bound there)."""
    for need in demand.needs:
        if need.vram_bytes <= gpu.room_bytes and need.host_bytes <= gpu.host_free_bytes:
            return need
    return None


def memory_fits(demand: Demand, gpu: GpuView) -> Rejection | None:
    if fitting_need(demand, gpu) is not None:
        return None
    smallest = min(demand.needs, key=lambda need: need.vram_bytes)
    if smallest.vram_bytes <= gpu.room_bytes:  # the card would do, the host would not
        return Rejection(
            "insufficient host RAM",
            f"{smallest.mode.value} needs {format_bytes(smallest.host_bytes)}, "
            f"{format_bytes(gpu.host_free_bytes)} free",
        )
    return Rejection(
        "insufficient VRAM",
        f"needs {format_bytes(smallest.vram_bytes)}, {format_bytes(gpu.room_bytes)} free",
    )


# Cheap checks first; the first one that fails names the reason.
STATIC_FILTERS: tuple[Filter, ...] = (node_usable, labels_match, model_present)
FILTERS: tuple[Filter, ...] = (*STATIC_FILTERS, slot_free, memory_fits)


def rejection(
    demand: Demand, gpu: GpuView, filters: tuple[Filter, ...] = FILTERS
) -> Rejection | None:
    for check in filters:
        found = check(demand, gpu)
        if found is not None:
            return found
    return None
