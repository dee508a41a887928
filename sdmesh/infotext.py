"""The A1111 "parameters" text written into every PNG, for each kind of job,
in the order and with the names A1111 writes (and `sd-parsers` reads):

    PROMPT
    Negative prompt: NEGATIVE
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512,
    Model: NAME, Denoising strength: 0.75, Mask blur: 4, Hires upscale: 2,
    Hires steps: 10, Hires upscaler: Latent, Lora hashes: "a: 0123456789ab",
    ControlNet 0: "Module: none, Model: NAME [hash], Weight: 1, ..."

(on one line). The prompt keeps its <lora:...> tags, as A1111's does, and
LoRAs the job lists are added to it as tags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from sdmesh.kinds import INPAINTING_FILLS, RESIZE_MODES, Kind, parse_lora_tags
from sdmesh.spec import JobSpec

SHORT_HASH = 12  # A1111's short hashes: the first 12 hex digits of a sha256


def quote(text: str) -> str:
    """A1111's own quoting of a value that holds a comma, colon or quote."""
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    return f"{value:g}"


def infotext(spec: JobSpec, seed: int, hashes: Mapping[str, str] | None = None) -> str:
    """The text for one image of the job, made with `seed`. `hashes` gives
    the sha256 of LoRA and ControlNet weights by "lora:NAME" and
    "controlnet:NAME", as the node that ran it knows them."""
    hashes = hashes or {}
    # LoRAs given as a list rather than in the prompt are written into it,
    # as A1111 would have them, so that the text reproduces the job.
    tagged = {lora.name for lora in parse_lora_tags(spec.prompt)}
    extra = " ".join(
        f"<lora:{lora.name}:{_number(lora.weight)}>"
        for lora in spec.loras
        if lora.name not in tagged
    )
    lines = [f"{spec.prompt} {extra}" if extra else spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    params: list[tuple[str, str]] = [
        ("Steps", str(spec.steps)),
        ("Sampler", spec.sampler_name),
        ("CFG scale", _number(spec.cfg_scale)),
        ("Seed", str(seed)),
        ("Size", f"{spec.width}x{spec.height}"),
        ("Model", spec.model),
    ]
    if spec.kind is not Kind.TXT2IMG or spec.enable_hr:
        params.append(("Denoising strength", _number(spec.denoising_strength)))
    if spec.kind is not Kind.TXT2IMG and spec.resize_mode:
        params.append(("Resize mode", RESIZE_MODES[spec.resize_mode]))
    if spec.kind is Kind.INPAINT:
        params.append(("Mask blur", str(spec.mask_blur)))
        params.append(("Masked content", INPAINTING_FILLS[spec.inpainting_fill]))
        if spec.inpainting_mask_invert:
            params.append(("Mask mode", "Inpaint not masked"))
        if spec.inpaint_full_res:
            params.append(("Inpaint area", "Only masked"))
            params.append(("Masked area padding", str(spec.inpaint_full_res_padding)))
    if spec.enable_hr:
        if spec.hr_resize_x or spec.hr_resize_y:
            width, height = spec.output_size
            params.append(("Hires resize", f"{width}x{height}"))
        else:
            params.append(("Hires upscale", _number(spec.hr_scale)))
        if spec.hr_second_pass_steps:
            params.append(("Hires steps", str(spec.hr_second_pass_steps)))
        params.append(("Hires upscaler", spec.hr_upscaler))
    if spec.loras:
        listed = ", ".join(
            f"{lora.name}: {hashes.get('lora:' + lora.name, '')[:SHORT_HASH]}"
            for lora in spec.loras
        )
        params.append(("Lora hashes", json.dumps(listed, ensure_ascii=False)))
    for index, unit in enumerate(spec.controlnets):
        short = hashes.get("controlnet:" + unit.model, "")[:SHORT_HASH]
        model = f"{unit.model} [{short}]" if short else unit.model
        text = (
            f"Module: none, Model: {model}, Weight: {_number(unit.weight)}, "
            "Resize Mode: Crop and Resize, Low Vram: False, "
            f"Guidance Start: {_number(unit.guidance_start)}, "
            f"Guidance End: {_number(unit.guidance_end)}, "
            "Pixel Perfect: False, Control Mode: Balanced"
        )
        params.append((f"ControlNet {index}", json.dumps(text, ensure_ascii=False)))
    lines.append(", ".join(f"{key}: {value}" for key, value in params))
    return "\n".join(lines)
