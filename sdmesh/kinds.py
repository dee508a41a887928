"""The kinds of job beyond txt2img: img2img, inpainting, hires fix, LoRA,
ControlNet and several batches in one job (`n_iter`), with A1111's names,
defaults and bounds, and the checks `sdmesh.spec.resolve` makes of them.

Pure code. A job's kind follows from its fields: a mask makes it
inpainting, an init image without one img2img, neither txt2img (with or
without the hires fix's second pass). LoRAs and ControlNets go with any
kind.

Input images (the init image, the mask, each ControlNet's image) are
uploaded before the job is submitted and named by their sha256; `resolve`
is given the ones the caller has uploaded, with their sizes, and refuses a
job naming any other.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sdmesh.errors import InvalidArgument, quote


class Kind(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


class ModelKind(StrEnum):
    """What a model file or folder on a node is."""

    BASE = "base"
    INPAINT = "inpaint"  # a base model trained for inpainting (9-channel UNet)
    CONTROLNET = "controlnet"
    LORA = "lora"


@dataclass(frozen=True)
class LoraWeight:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class ControlNetUnit:
    model: str
    image: str  # sha256 of an uploaded input; a file path on the client before upload
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0


@dataclass(frozen=True)
class InputInfo:
    """An uploaded input image."""

    sha256: str
    size_bytes: int
    width: int
    height: int
    format: str  # "PNG", "JPEG" or "WEBP"


# ---- defaults (A1111's) ------------------------------------------------------

DEFAULT_DENOISING_STRENGTH = 0.75
DEFAULT_HR_DENOISING_STRENGTH = 0.7  # A1111's hires fix default
DEFAULT_RESIZE_MODE = 0
DEFAULT_MASK_BLUR = 4
DEFAULT_INPAINTING_FILL = 1  # original
DEFAULT_INPAINT_PADDING = 32
DEFAULT_HR_SCALE = 2.0
DEFAULT_HR_UPSCALER = "Latent"
DEFAULT_N_ITER = 1

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")
# Latent upscalers resize the first pass's latents (A1111's names and torch
# modes); the others decode, resize the picture and encode again.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)

# ---- bounds ------------------------------------------------------------------
# A1111's where it has them (denoising 0-1, mask blur 0-64, padding 0-256,
# hires scale 1-4, ControlNet weight 0-2 and guidance 0-1); the rest ours:
# - LoRA weights -4..4: A1111 takes any number, but past about 2 a LoRA
#   only burns the picture; 16 LoRAs and 4 ControlNet units a job.
# - n_iter 1..16 and at most 64 images a job (batch_size * n_iter): a job is
#   one attempt on one card, retried whole; more is more jobs.
# - input images: PNG, JPEG or WebP, at most 32 MiB and 16 megapixels
#   (4096x4096), checked from the header before anything is decoded.
MAX_LORAS = 16
MIN_LORA_WEIGHT, MAX_LORA_WEIGHT = -4.0, 4.0
MAX_CONTROLNETS = 4
MAX_CONTROLNET_WEIGHT = 2.0
MAX_MASK_BLUR = 64
MAX_INPAINT_PADDING = 256
MIN_HR_SCALE, MAX_HR_SCALE = 1.0, 4.0
MAX_N_ITER = 16
MAX_IMAGES_PER_JOB = 64
MAX_INPUT_BYTES = 32 * 1024 * 1024
MAX_INPUT_PIXELS = 4096 * 4096
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
SHA256 = re.compile(r"[0-9a-f]{64}")
# What an image file's first bytes say it is: the input formats, and two
# common ones named only to say they are not allowed.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
SIGNATURE_BYTES = 12  # enough for every magic above and WebP's
# <lora:NAME> or <lora:NAME:WEIGHT>, as A1111 writes them in prompts.
LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?(:[^>]*)?>")


def _finite(name: str, value: float) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidArgument(name, "must be a number")


def _between(name: str, value: float, low: float, high: float) -> None:
    _finite(name, value)
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be between {low:g} and {high:g}, got {value:g}")


def image_format(head: bytes) -> str:
    """The format an image file's first SIGNATURE_BYTES bytes announce
    ("WEBP" is a RIFF container with WEBP at offset 8), or "" when none
    known. Only INPUT_FORMATS are allowed as inputs."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return ""


def parse_lora_tags(prompt: str) -> list[LoraWeight]:
    """The LoRAs a prompt names with <lora:NAME:WEIGHT>, in order."""
    found = []
    for match in LORA_TAG.finditer(prompt):
        name, weight, extra = match.groups()
        if extra is not None or not name.strip():
            raise InvalidArgument(
                "prompt",
                f"{quote(match.group())} must be <lora:NAME> or <lora:NAME:WEIGHT>",
            )
        try:
            value = 1.0 if weight is None else float(weight)
        except ValueError:
            raise InvalidArgument(
                "prompt", f"the weight in {quote(match.group())} must be a number"
            ) from None
        found.append(LoraWeight(name.strip(), value))
    return found


def strip_lora_tags(prompt: str) -> str:
    """The prompt the text encoder sees: A1111 removes LoRA tags from it."""
    return LORA_TAG.sub("", prompt)


def parse_lora_flag(texts: Collection[str]) -> tuple[LoraWeight, ...]:
    """`--lora NAME[:WEIGHT]`, once per use."""
    loras = []
    for text in texts:
        name, sep, weight = text.rpartition(":")
        if not sep:
            name, weight = text, "1"
        try:
            loras.append(LoraWeight(name, float(weight)))
        except ValueError:
            raise ValueError(f"expected NAME or NAME:WEIGHT, got {text!r}") from None
    return tuple(loras)


def parse_controlnet_flag(texts: Collection[str]) -> tuple[ControlNetUnit, ...]:
    """`--controlnet MODEL:IMAGE[:WEIGHT]`, once per use; IMAGE is a file."""
    units = []
    for text in texts:
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            raise ValueError(f"expected MODEL:IMAGE or MODEL:IMAGE:WEIGHT, got {text!r}")
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            raise ValueError(f"the weight in {text!r} must be a number") from None
        units.append(ControlNetUnit(parts[0], parts[1], weight))
    return tuple(units)


def hires_size(
    width: int, height: int, scale: float, resize_x: int, resize_y: int
) -> tuple[int, int]:
    """The hires fix's final size, as A1111 computes it: hr_resize_x/y when
    given (one of them alone keeps the aspect), else the size times
    hr_scale; rounded to a multiple of 8."""
    target_x: float
    target_y: float
    if resize_x and resize_y:
        target_x, target_y = resize_x, resize_y
    elif resize_x:
        target_x, target_y = resize_x, height * resize_x / width
    elif resize_y:
        target_x, target_y = width * resize_y / height, resize_y
    else:
        target_x, target_y = width * scale, height * scale
    return round(target_x / 8) * 8, round(target_y / 8) * 8


def check_input(name: str, sha256: str, inputs: Mapping[str, InputInfo]) -> InputInfo:
    if not SHA256.fullmatch(sha256):
        raise InvalidArgument(name, f"must be the sha256 of an uploaded input, got {quote(sha256)}")
    found = inputs.get(sha256)
    if found is None:
        raise InvalidArgument(
            name, f"no uploaded input has sha256 {sha256[:12]}…; upload it first (UploadInput)"
        )
    return found


def resolve_kind(
    values: Mapping[str, Any],
    *,
    steps: int,
    width: int,
    height: int,
    batch_size: int,
    inputs: Mapping[str, InputInfo],
    known_loras: Collection[str],
    known_controlnets: Collection[str],
) -> dict[str, Any]:
    """Checks the kind's fields of a SpecRequest (`values`, by field name,
    None for unset) and returns them resolved, defaults applied."""
    init_image, mask = values["init_image"] or "", values["mask"] or ""
    if init_image:
        check_input("init_image", init_image, inputs)
    if mask:
        if not init_image:
            raise InvalidArgument("mask", "needs an init_image to paint into")
        found, base = check_input("mask", mask, inputs), inputs[init_image]
        if (found.width, found.height) != (base.width, base.height):
            raise InvalidArgument(
                "mask",
                f"must be the init image's size {base.width}x{base.height}, "
                f"got {found.width}x{found.height}",
            )
    enable_hr = bool(values["enable_hr"])
    if enable_hr and init_image:
        raise InvalidArgument(
            "enable_hr", "the hires fix is for txt2img; img2img has no second pass"
        )

    default_strength = DEFAULT_HR_DENOISING_STRENGTH if enable_hr else DEFAULT_DENOISING_STRENGTH
    strength = values["denoising_strength"]
    strength = default_strength if strength is None else float(strength)
    _between("denoising_strength", strength, 0.0, 1.0)
    resize_mode = DEFAULT_RESIZE_MODE if values["resize_mode"] is None else values["resize_mode"]
    if not 0 <= resize_mode < len(RESIZE_MODES):
        allowed = ", ".join(f"{i} ({name})" for i, name in enumerate(RESIZE_MODES))
        raise InvalidArgument("resize_mode", f"must be one of {allowed}; got {resize_mode}")
    mask_blur = DEFAULT_MASK_BLUR if values["mask_blur"] is None else values["mask_blur"]
    if not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise InvalidArgument(
            "mask_blur", f"must be between 0 and {MAX_MASK_BLUR}, got {mask_blur}"
        )
    fill = (
        DEFAULT_INPAINTING_FILL if values["inpainting_fill"] is None else values["inpainting_fill"]
    )
    if not 0 <= fill < len(INPAINTING_FILLS):
        allowed = ", ".join(f"{i} ({name})" for i, name in enumerate(INPAINTING_FILLS))
        raise InvalidArgument("inpainting_fill", f"must be one of {allowed}; got {fill}")
    padding = values["inpaint_full_res_padding"]
    padding = DEFAULT_INPAINT_PADDING if padding is None else padding
    if not 0 <= padding <= MAX_INPAINT_PADDING:
        raise InvalidArgument(
            "inpaint_full_res_padding",
            f"must be between 0 and {MAX_INPAINT_PADDING}, got {padding}",
        )

    hr_scale = DEFAULT_HR_SCALE if values["hr_scale"] is None else float(values["hr_scale"])
    _between("hr_scale", hr_scale, MIN_HR_SCALE, MAX_HR_SCALE)
    resize_x = values["hr_resize_x"] or 0
    resize_y = values["hr_resize_y"] or 0
    from sdmesh.spec import MAX_SIZE, MAX_STEPS, MIN_SIZE  # one place for sizes

    for name, side in (("hr_resize_x", resize_x), ("hr_resize_y", resize_y)):
        if side and (not MIN_SIZE <= side <= MAX_SIZE or side % 8):
            raise InvalidArgument(
                name, f"must be 0 or a multiple of 8 between {MIN_SIZE} and {MAX_SIZE}, got {side}"
            )
    upscaler = DEFAULT_HR_UPSCALER if values["hr_upscaler"] is None else values["hr_upscaler"]
    if upscaler not in UPSCALERS:
        raise InvalidArgument(
            "hr_upscaler", f"unknown upscaler {quote(upscaler)}; allowed: {', '.join(UPSCALERS)}"
        )
    hr_steps = values["hr_second_pass_steps"] or 0
    if not 0 <= hr_steps <= MAX_STEPS:
        raise InvalidArgument(
            "hr_second_pass_steps", f"must be between 0 (as steps) and {MAX_STEPS}, got {hr_steps}"
        )
    if enable_hr:
        final = hires_size(width, height, hr_scale, resize_x, resize_y)
        if not all(MIN_SIZE <= side <= MAX_SIZE for side in final):
            raise InvalidArgument(
                "hr_scale",
                f"the hires size {final[0]}x{final[1]} must be between {MIN_SIZE} and {MAX_SIZE} a side",
            )
    if init_image or enable_hr:
        second = (hr_steps or steps) if enable_hr else steps
        if int(second * strength) < 1:
            raise InvalidArgument(
                "denoising_strength",
                f"{strength:g} of {second} steps runs no step; use at least {1 / second:.3g}",
            )

    loras = _resolve_loras(values, known_loras)
    controlnets = _resolve_controlnets(values["controlnets"] or (), inputs, known_controlnets)

    n_iter = DEFAULT_N_ITER if values["n_iter"] is None else values["n_iter"]
    if not 1 <= n_iter <= MAX_N_ITER:
        raise InvalidArgument("n_iter", f"must be between 1 and {MAX_N_ITER}, got {n_iter}")
    if batch_size * n_iter > MAX_IMAGES_PER_JOB:
        raise InvalidArgument(
            "n_iter",
            f"batch_size * n_iter must be at most {MAX_IMAGES_PER_JOB} images, got {batch_size * n_iter}",
        )
    return {
        "init_image": init_image,
        "denoising_strength": strength,
        "resize_mode": resize_mode,
        "mask": mask,
        "mask_blur": mask_blur,
        "inpainting_fill": fill,
        "inpaint_full_res": bool(values["inpaint_full_res"]),
        "inpaint_full_res_padding": padding,
        "inpainting_mask_invert": bool(values["inpainting_mask_invert"]),
        "enable_hr": enable_hr,
        "hr_scale": hr_scale,
        "hr_resize_x": resize_x,
        "hr_resize_y": resize_y,
        "hr_upscaler": upscaler,
        "hr_second_pass_steps": hr_steps,
        "loras": loras,
        "controlnets": controlnets,
        "n_iter": n_iter,
    }


def _resolve_loras(values: Mapping[str, Any], known: Collection[str]) -> tuple[LoraWeight, ...]:
    """The explicit list, then the prompt's tags; a LoRA named twice is
    refused (A1111 would apply it twice, which nobody means)."""
    from sdmesh.spec import MAX_MODEL_NAME_CHARS, printable

    loras = [*(values["loras"] or ()), *parse_lora_tags(values["prompt"])]
    if len(loras) > MAX_LORAS:
        raise InvalidArgument("loras", f"at most {MAX_LORAS} LoRAs, got {len(loras)}")
    seen: set[str] = set()
    for index, lora in enumerate(loras):
        field = f"loras[{index}]"
        printable(f"{field}.name", lora.name, MAX_MODEL_NAME_CHARS, least=1)
        _between(f"{field}.weight", float(lora.weight), MIN_LORA_WEIGHT, MAX_LORA_WEIGHT)
        if lora.name in seen:
            raise InvalidArgument(field, f"LoRA {quote(lora.name)} is named twice")
        seen.add(lora.name)
        if lora.name not in known:
            have = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(
                f"{field}.name",
                f"no node in the window has LoRA {quote(lora.name)}; LoRAs seen: {have}",
            )
    return tuple(LoraWeight(lora.name, float(lora.weight)) for lora in loras)


def _resolve_controlnets(
    units: Collection[ControlNetUnit], inputs: Mapping[str, InputInfo], known: Collection[str]
) -> tuple[ControlNetUnit, ...]:
    from sdmesh.spec import MAX_MODEL_NAME_CHARS, printable

    if len(units) > MAX_CONTROLNETS:
        raise InvalidArgument(
            "controlnets", f"at most {MAX_CONTROLNETS} ControlNet units, got {len(units)}"
        )
    resolved = []
    for index, unit in enumerate(units):
        field = f"controlnets[{index}]"
        printable(f"{field}.model", unit.model, MAX_MODEL_NAME_CHARS, least=1)
        if unit.model not in known:
            have = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(
                f"{field}.model",
                f"no node in the window has ControlNet {quote(unit.model)}; ControlNets seen: {have}",
            )
        check_input(f"{field}.image", unit.image, inputs)
        _between(f"{field}.weight", float(unit.weight), 0.0, MAX_CONTROLNET_WEIGHT)
        _between(f"{field}.guidance_start", float(unit.guidance_start), 0.0, 1.0)
        _between(f"{field}.guidance_end", float(unit.guidance_end), 0.0, 1.0)
        if unit.guidance_start >= unit.guidance_end:
            raise InvalidArgument(
                f"{field}.guidance_end",
                f"must be above guidance_start {unit.guidance_start:g}, got {unit.guidance_end:g}",
            )
        resolved.append(
            ControlNetUnit(
                unit.model,
                unit.image,
                float(unit.weight),
                float(unit.guidance_start),
                float(unit.guidance_end),
            )
        )
    return tuple(resolved)
