"""Turns a job into what placement weighs: its work, and what it needs in
each memory mode it may use. Shared by the dispatcher and the benchmark's
simulation, so both run the same decisions."""

from __future__ import annotations

from scheduler.estimator import MODES, EstimateBook, Shape
from scheduler.placement.views import Demand
from sdmesh.spec import JobSpec, MemoryMode
from sdmesh.speeds import megapixel_steps


def allowed_modes(requested: MemoryMode) -> tuple[MemoryMode, ...]:
    """AUTO tries full, then model offload, then sequential offload: a job
    that fits no GPU fully runs offloaded, slower, rather than not at all."""
    return MODES if requested is MemoryMode.AUTO else (requested,)


def shape_of(spec: JobSpec) -> Shape:
    return Shape(spec.model, spec.width, spec.height, spec.batch_size)


def demand_for(
    job_id: str,
    spec: JobSpec,
    weight_bytes: int,
    book: EstimateBook,
    waited_seconds: float = 0.0,
) -> Demand:
    shape = shape_of(spec)
    return Demand(
        job_id=job_id,
        model=spec.model,
        weight_bytes=weight_bytes,
        work=megapixel_steps(spec.width, spec.height, spec.batch_size, spec.steps),
        needs=tuple(book.needs(weight_bytes, shape, allowed_modes(spec.memory_mode))),
        selector=dict(spec.selector),
        waited_seconds=waited_seconds,
    )
