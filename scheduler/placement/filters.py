"""Filters: can this GPU take this job at all, and if not, why not, with the
numbers (see `Rejection`). The memory filter also picks the memory mode:
the most preferred one that fits."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from scheduler.estimator import Need
from scheduler.placement.views import (
    DEVICE_RESERVE_BYTES,
    MAX_ACTIVE_PER_GPU,
    Demand,
    GpuView,
    Reason,
    Rejection,
)
from sdmesh.kinds import ModelKind

Filter = Callable[[Demand, GpuView], Rejection | None]


def selector_mismatch(selector: Mapping[str, str], labels: Mapping[str, str]) -> str | None:
    """The first `key=value` of the selector the labels lack, or None when
    they have them all."""
    for key, value in sorted(selector.items()):
        if labels.get(key) != value:
            return f"{key}={value}"
    return None


def node_usable(_: Demand, gpu: GpuView) -> Rejection | None:
    if not gpu.healthy:
        return Rejection(Reason.UNHEALTHY)
    if gpu.draining:
        return Rejection(Reason.DRAINING)
    return None


def labels_match(demand: Demand, gpu: GpuView) -> Rejection | None:
    missing = selector_mismatch(demand.selector, gpu.labels)
    if missing is not None:
        return Rejection(Reason.SELECTOR_MISMATCH, unresolvable=True, subject=missing)
    return None


def model_present(demand: Demand, gpu: GpuView) -> Rejection | None:
    if demand.model not in gpu.models:
        return Rejection(Reason.MODEL_MISSING, unresolvable=True, subject=demand.model)
    return None


MISSING = {ModelKind.LORA: Reason.LORA_MISSING, ModelKind.CONTROLNET: Reason.CONTROLNET_MISSING}


def extras_present(demand: Demand, gpu: GpuView) -> Rejection | None:
    """Every LoRA and ControlNet the job names is on the node. An inpaint
    job needs only its base model: the node runs it with its inpainting
    model for that base, or the generic inpaint pipeline."""
    for extra in demand.extras:
        have = gpu.loras if extra.kind is ModelKind.LORA else gpu.controlnets
        if extra.name not in have:
            return Rejection(MISSING[extra.kind], unresolvable=True, subject=extra.name)
    return None


def families_match(demand: Demand, gpu: GpuView) -> Rejection | None:
    """A LoRA or ControlNet made for another base family (an SDXL LoRA on
    an SD 1.5 model) would fail to load or draw garbage; checked only when
    the node knows both families."""
    base = gpu.families.get((ModelKind.BASE, demand.model), "")
    if not base:
        return None
    for extra in demand.extras:
        family = gpu.families.get((extra.kind, extra.name), "")
        if family and family != base:
            return Rejection(
                Reason.FAMILY_MISMATCH,
                unresolvable=True,
                subject=extra.name,
                families=(extra.kind.value, family, demand.model, base),
            )
    return None


def slot_free(_: Demand, gpu: GpuView) -> Rejection | None:
    if gpu.active_jobs >= MAX_ACTIVE_PER_GPU:
        free_slots = max(0, MAX_ACTIVE_PER_GPU - gpu.active_jobs)
        return Rejection(
            Reason.BUSY, 1, free_slots, MAX_ACTIVE_PER_GPU, subject=f"{gpu.active_jobs} jobs"
        )
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
    mode = smallest.mode.value
    if smallest.vram_bytes <= gpu.room_bytes:  # the card would do, the host would not
        return Rejection(
            Reason.INSUFFICIENT_HOST_RAM,
            smallest.host_bytes,
            gpu.host_free_bytes,
            subject=mode,
        )
    usable = gpu.total_bytes - DEVICE_RESERVE_BYTES
    return Rejection(
        Reason.INSUFFICIENT_VRAM,
        smallest.vram_bytes,
        gpu.room_bytes,
        gpu.total_bytes,
        unresolvable=smallest.vram_bytes > usable,
        subject=mode,
    )


# Cheap checks first; the first one that fails names the reason.
STATIC_FILTERS: tuple[Filter, ...] = (
    node_usable,
    labels_match,
    model_present,
    extras_present,
    families_match,
)
FILTERS: tuple[Filter, ...] = (*STATIC_FILTERS, slot_free, memory_fits)


def rejection(
    demand: Demand, gpu: GpuView, filters: tuple[Filter, ...] = FILTERS
) -> Rejection | None:
    for check in filters:
        found = check(demand, gpu)
        if found is not None:
            return found
    return None
