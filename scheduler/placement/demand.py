"""Turns a job into what placement weighs: its work, the LoRAs and
ControlNets it loads, and what it needs in each memory mode it may use.
Shared by the dispatcher, admission and the benchmark's simulation, so all
run the same decisions."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from scheduler.estimator import MODES, EstimateBook, Shape
from scheduler.placement.views import Demand, ExtraModel
from sdmesh.kinds import Kind, ModelKind
from sdmesh.spec import JobSpec, MemoryMode
from sdmesh.speeds import megapixel_steps

# (kind, name) -> weight size, of every model nodes reported
Weights = Mapping[tuple[str, str], int]


def allowed_modes(requested: MemoryMode) -> tuple[MemoryMode, ...]:
    """AUTO tries full, then model offload, then sequential offload: a job
    that fits no GPU fully runs offloaded, slower, rather than not at all."""
    return MODES if requested is MemoryMode.AUTO else (requested,)


# The stored key's column holds 512 characters; 16 LoRA and 4 ControlNet
# names of 128 could make thousands.
MAX_VARIANT_CHARS = 256


def variant_of(spec: JobSpec) -> str:
    """What a job runs beyond plain txt2img, as the learned peaks are keyed:
    "" for plain txt2img (the key older peaks were learned under), else the
    kind, then "+hires:WxH" (the final size), "+lora:a,b", "+cn:x,y" (names
    sorted: the order does not change the memory). LoRA weights, prompts
    and n_iter (batches run one after another) do not change the peak."""
    parts = []
    if spec.enable_hr:
        width, height = spec.output_size
        parts.append(f"hires:{width}x{height}")
    if spec.loras:
        parts.append("lora:" + ",".join(sorted(lora.name for lora in spec.loras)))
    if spec.controlnets:
        parts.append("cn:" + ",".join(sorted(unit.model for unit in spec.controlnets)))
    if spec.kind is Kind.TXT2IMG and not parts:
        return ""
    variant = "+".join((spec.kind.value, *parts))
    if len(variant) > MAX_VARIANT_CHARS:  # many long names: keep the key in its column
        digest = hashlib.sha256(variant.encode()).hexdigest()[:16]
        variant = f"{variant[: MAX_VARIANT_CHARS - 17]}#{digest}"
    return variant


def shape_of(spec: JobSpec) -> Shape:
    """What one pipeline call of the job holds at once: `batch_size` images
    (its n_iter batches run one after another), at the larger pass's size."""
    hires_width, hires_height = spec.output_size if spec.enable_hr else (0, 0)
    return Shape(
        spec.model,
        spec.width,
        spec.height,
        spec.batch_size,
        variant_of(spec),
        hires_width,
        hires_height,
    )


def work_of(spec: JobSpec) -> float:
    """Megapixel-steps of what really runs: img2img and inpainting run
    int(steps x strength) steps, as diffusers does; the hires fix adds its
    second pass at the final size (int(second pass steps x strength));
    n_iter batches one after another."""
    if spec.kind is Kind.TXT2IMG:
        work = megapixel_steps(spec.width, spec.height, spec.batch_size, spec.steps)
    else:
        steps = int(spec.steps * spec.denoising_strength)
        work = megapixel_steps(spec.width, spec.height, spec.batch_size, steps)
    if spec.enable_hr:
        width, height = spec.output_size
        steps = int(spec.second_pass_steps * spec.denoising_strength)
        work += megapixel_steps(width, height, spec.batch_size, steps)
    return work * spec.n_iter


def extras_of(spec: JobSpec, weights: Weights) -> tuple[ExtraModel, ...]:
    """The job's LoRAs, then its ControlNets (each model once), with the
    weight sizes nodes reported for them."""
    loras = [lora.name for lora in spec.loras]
    controlnets = list(dict.fromkeys(unit.model for unit in spec.controlnets))
    return tuple(
        ExtraModel(kind, name, weights.get((kind, name), 0))
        for kind, names in ((ModelKind.LORA, loras), (ModelKind.CONTROLNET, controlnets))
        for name in names
    )


def demand_for(
    job_id: str,
    spec: JobSpec,
    weight_bytes: int,
    book: EstimateBook,
    waited_seconds: float = 0.0,
    *,
    extra_weights: Weights | None = None,
) -> Demand:
    """`weight_bytes` is the base model's size; `extra_weights` gives the
    LoRAs' and ControlNets' (by (kind, name)), which its estimate adds."""
    shape = shape_of(spec)
    extras = extras_of(spec, extra_weights or {})
    all_weights = weight_bytes + sum(extra.weight_bytes for extra in extras)
    return Demand(
        job_id=job_id,
        model=spec.model,
        weight_bytes=weight_bytes,
        work=work_of(spec),
        needs=tuple(book.needs(all_weights, shape, allowed_modes(spec.memory_mode))),
        selector=dict(spec.selector),
        waited_seconds=waited_seconds,
        extras=extras,
    )
