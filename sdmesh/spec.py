"""What a job asks for: A1111 defaults and the limits checked at submit (the
kinds beyond txt2img in `sdmesh.kinds`; the infotext in `sdmesh.infotext`).

Pure code, and the one place a job's fields are declared. The SDK builds a
`SpecRequest` (fields the caller may leave unset); the scheduler resolves it
into a `JobSpec` (every field set and checked, the seed fixed) before
anything is queued; agents and clients receive that resolved spec. Adding a
field means: the .proto, these two dataclasses, its check in `resolve`, and
its `sdctl submit` flag; `tests/test_contract.py` fails until all agree.

Every field has a documented bound (the constants below, with why), so
that a submit is small whatever a caller sends; an error quotes at most a
short prefix of the bad input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from sdmesh.errors import InvalidArgument, quote
from sdmesh.flags import option, pairs_option
from sdmesh.kinds import (
    DEFAULT_DENOISING_STRENGTH,
    DEFAULT_HR_SCALE,
    DEFAULT_HR_UPSCALER,
    DEFAULT_INPAINT_PADDING,
    DEFAULT_INPAINTING_FILL,
    DEFAULT_MASK_BLUR,
    ControlNetUnit,
    InputInfo,
    Kind,
    LoraWeight,
    hires_size,
    parse_controlnet_flag,
    parse_lora_flag,
    resolve_kind,
)
from sdmesh.samplers import find_sampler, sampler_names

TINY_MODEL = "tiny"


class MemoryMode(StrEnum):
    AUTO = "auto"
    FULL = "full"
    MODEL_OFFLOAD = "model_offload"
    SEQUENTIAL_OFFLOAD = "sequential_offload"


DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 20
DEFAULT_CFG_SCALE = 7.0
DEFAULT_SAMPLER = "Euler a"
DEFAULT_BATCH_SIZE = 1
RANDOM_SEED = -1

# A1111's own bounds where it has them (steps, size, batch, cfg).
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 150
MAX_BATCH_SIZE = 8
MIN_CFG_SCALE, MAX_CFG_SCALE = 1.0, 30.0
MAX_SEED = 2**32 - 1
MIN_PRIORITY, MAX_PRIORITY = -100, 100

# The rest are ours: far above what anyone types, low enough that one submit
# cannot carry megabytes into the database, the queue in memory, every event
# and every PNG's infotext.
# - prompt and negative prompt: at most 4,000 characters each. A1111 feeds
#   long prompts to CLIP in 75-token chunks, so a prompt of a thousand or two
#   characters is real; 4,000 is some 13 chunks. No control characters but
#   tab and line breaks: PostgreSQL refuses NUL in text, and the others
#   only garble the infotext.
# - model: 1-128 printable characters (then a model nodes reported).
# - sampler_name: one of `sdmesh.samplers` (a bad one is quoted, cut short).
# - request_id: at most 128 printable characters (the store's column).
# - labels, selector (and node labels, `check_labels`): at most 32 pairs;
#   Kubernetes' label rules: a key of 1-63 letters, digits, '-', '_', '.'
#   or '/', a value of at most 63 letters, digits, '-', '_' or '.', each
#   starting and ending with a letter or digit.
MAX_PROMPT_CHARS = 4000
MAX_MODEL_NAME_CHARS = 128
MAX_REQUEST_ID_CHARS = 128
MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 63
LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,61}[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.\-]{0,61}[A-Za-z0-9])?)?")
# C0 control characters but tab, line feed and carriage return (a pasted
# Windows line break).
PROMPT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass(frozen=True)
class SpecRequest:
    """A spec as submitted: None means "use the default". Each field carries
    its `sdctl submit` flag (see `sdmesh.flags`); the prompt is positional."""

    prompt: str = option(help="what to generate")
    negative_prompt: str = option(
        "", flag="--negative", help="negative prompt", group="the picture", metavar="TEXT"
    )
    model: str | None = option(
        None, help=f"model name (default {TINY_MODEL})", group="the picture", metavar="NAME"
    )
    width: int | None = option(
        None,
        parse=int,
        help=f"pixels, a multiple of 8 (default {DEFAULT_WIDTH})",
        group="the picture",
        metavar="PX",
    )
    height: int | None = option(
        None,
        parse=int,
        help=f"pixels, a multiple of 8 (default {DEFAULT_HEIGHT})",
        group="the picture",
        metavar="PX",
    )
    steps: int | None = option(
        None,
        parse=int,
        help=f"denoising steps (default {DEFAULT_STEPS})",
        group="the picture",
        metavar="N",
    )
    cfg_scale: float | None = option(
        None,
        parse=float,
        help=f"guidance scale (default {DEFAULT_CFG_SCALE:g})",
        group="the picture",
        metavar="SCALE",
    )
    seed: int | None = option(
        None, parse=int, help="-1 for random (default)", group="the picture", metavar="SEED"
    )
    sampler_name: str | None = option(
        None,
        flag="--sampler",
        help=f'A1111 sampler name (default "{DEFAULT_SAMPLER}")',
        group="the picture",
        metavar="NAME",
    )
    batch_size: int | None = option(
        None,
        parse=int,
        help=f"images per job (default {DEFAULT_BATCH_SIZE})",
        group="the picture",
        metavar="N",
    )
    priority: int = option(
        0,
        parse=int,
        help=f"{MIN_PRIORITY}..{MAX_PRIORITY}, higher first (default 0)",
        group="scheduling",
        metavar="N",
    )
    memory_mode: MemoryMode = option(
        MemoryMode.AUTO,
        parse=MemoryMode,
        choices=[mode.value for mode in MemoryMode],
        help="where the weights live while it runs (default auto)",
        group="scheduling",
    )
    request_id: str = option(
        "", help="makes a retried submit return the same job", group="scheduling", metavar="ID"
    )
    labels: Mapping[str, str] = pairs_option(
        flag="--label", help="a label recorded on the job; repeatable", group="scheduling"
    )
    selector: Mapping[str, str] = pairs_option(
        help="run only on nodes with this label; repeatable", group="scheduling"
    )
    # img2img and inpainting (sdmesh.kinds). On the wire the images are the
    # sha256 of an upload; the SDK and sdctl take files and upload them.
    init_image: str = option(
        "",
        metavar="PATH",
        help="img2img: the picture to start from",
        group="img2img and inpainting",
    )
    denoising_strength: float | None = option(
        None,
        parse=float,
        help=f"0..1, how much to change the init image (default {DEFAULT_DENOISING_STRENGTH:g}; "
        "0.7 for the hires fix)",
        group="img2img and inpainting",
        metavar="STRENGTH",
    )
    resize_mode: int | None = option(
        None,
        parse=int,
        help="0 just resize (default), 1 crop and resize, 2 resize and fill",
        group="img2img and inpainting",
        metavar="MODE",
    )
    mask: str = option(
        "",
        metavar="PATH",
        help="inpainting: white is repainted, black kept",
        group="img2img and inpainting",
    )
    mask_blur: int | None = option(
        None,
        parse=int,
        help=f"pixels of blur on the mask's edge (default {DEFAULT_MASK_BLUR})",
        group="img2img and inpainting",
        metavar="PX",
    )
    inpainting_fill: int | None = option(
        None,
        parse=int,
        help="masked content: 0 fill, 1 original (default), 2 latent noise, 3 latent nothing",
        group="img2img and inpainting",
        metavar="FILL",
    )
    inpaint_full_res: bool = option(
        False,
        flag="--only-masked",
        help="inpaint a crop around the mask at full resolution",
        group="img2img and inpainting",
    )
    inpaint_full_res_padding: int | None = option(
        None,
        parse=int,
        flag="--only-masked-padding",
        help=f"pixels around the mask's crop (default {DEFAULT_INPAINT_PADDING})",
        group="img2img and inpainting",
        metavar="PX",
    )
    inpainting_mask_invert: bool = option(
        False,
        flag="--invert-mask",
        help="repaint what is black in the mask instead",
        group="img2img and inpainting",
    )
    # Hires fix (txt2img): a second pass at a larger size.
    enable_hr: bool = option(
        False, flag="--hires", help="hires fix (implied by --hires-*)", group="hires fix"
    )
    hr_scale: float | None = option(
        None,
        parse=float,
        flag="--hires-scale",
        help=f"hires fix: scale (default {DEFAULT_HR_SCALE:g})",
        group="hires fix",
        metavar="SCALE",
    )
    hr_resize_x: int | None = option(
        None,
        parse=int,
        flag="--hires-width",
        help="hires fix: final width instead of a scale",
        group="hires fix",
        metavar="PX",
    )
    hr_resize_y: int | None = option(
        None,
        parse=int,
        flag="--hires-height",
        help="hires fix: final height instead of a scale",
        group="hires fix",
        metavar="PX",
    )
    hr_upscaler: str | None = option(
        None,
        flag="--hires-upscaler",
        help=f'hires fix: upscaler (default "{DEFAULT_HR_UPSCALER}")',
        group="hires fix",
        metavar="NAME",
    )
    hr_second_pass_steps: int | None = option(
        None,
        parse=int,
        flag="--hires-steps",
        help="hires fix: steps of the second pass (default: steps)",
        group="hires fix",
        metavar="N",
    )
    loras: tuple[LoraWeight, ...] = option(
        (),
        flag="--lora",
        metavar="NAME[:WEIGHT]",
        parse=parse_lora_flag,
        repeat=True,
        help="a LoRA and its weight (default 1); repeatable; or <lora:NAME:WEIGHT> in the prompt",
        group="LoRA and ControlNet",
    )
    controlnets: tuple[ControlNetUnit, ...] = option(
        (),
        flag="--controlnet",
        metavar="MODEL:IMAGE[:WEIGHT]",
        parse=parse_controlnet_flag,
        repeat=True,
        help="a ControlNet unit: its model, a ready control image and a weight; repeatable",
        group="LoRA and ControlNet",
    )
    n_iter: int | None = option(
        None,
        parse=int,
        help="batches run one after another (default 1)",
        group="the picture",
        metavar="N",
    )


@dataclass(frozen=True)
class JobSpec:
    """A resolved spec: every field set and checked, the seed fixed."""

    prompt: str
    negative_prompt: str
    model: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    sampler_name: str
    batch_size: int
    priority: int = 0
    memory_mode: MemoryMode = MemoryMode.AUTO
    request_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    selector: Mapping[str, str] = field(default_factory=dict)  # node labels it needs
    # The kinds beyond txt2img (sdmesh.kinds); their defaults are a
    # txt2img job's, so specs stored before these fields existed still load.
    init_image: str = ""
    denoising_strength: float = DEFAULT_DENOISING_STRENGTH
    resize_mode: int = 0
    mask: str = ""
    mask_blur: int = DEFAULT_MASK_BLUR
    inpainting_fill: int = DEFAULT_INPAINTING_FILL
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = DEFAULT_INPAINT_PADDING
    inpainting_mask_invert: bool = False
    enable_hr: bool = False
    hr_scale: float = DEFAULT_HR_SCALE
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str = DEFAULT_HR_UPSCALER
    hr_second_pass_steps: int = 0
    loras: tuple[LoraWeight, ...] = ()
    controlnets: tuple[ControlNetUnit, ...] = ()
    n_iter: int = 1

    @property
    def kind(self) -> Kind:
        if self.mask:
            return Kind.INPAINT
        return Kind.IMG2IMG if self.init_image else Kind.TXT2IMG

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def seeds(self) -> list[int]:
        """Image i of the job gets seed + i, as in A1111, across its
        batches: batch b holds images b * batch_size onwards."""
        return [self.seed + i for i in range(self.images)]

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the job's images: the hires fix's final size,
        or the job's size."""
        if self.enable_hr:
            return hires_size(
                self.width, self.height, self.hr_scale, self.hr_resize_x, self.hr_resize_y
            )
        return self.width, self.height

    @property
    def inputs(self) -> tuple[str, ...]:
        """The sha256 of every input image it names, each once."""
        named = [self.init_image, self.mask, *(unit.image for unit in self.controlnets)]
        return tuple(dict.fromkeys(sha for sha in named if sha))

    @property
    def second_pass_steps(self) -> int:
        return self.hr_second_pass_steps or self.steps

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory_mode"] = self.memory_mode.value
        data["labels"] = dict(self.labels)
        data["selector"] = dict(self.selector)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        return cls(
            **{
                **data,
                "memory_mode": MemoryMode(data["memory_mode"]),
                "loras": tuple(LoraWeight(**lora) for lora in data.get("loras", ())),
                "controlnets": tuple(
                    ControlNetUnit(**unit) for unit in data.get("controlnets", ())
                ),
            }
        )


BatchKey = tuple[object, ...]


def batch_key(spec: JobSpec) -> BatchKey:
    """What jobs must share to run as one batch, in one pipeline call: the
    same model, size, steps, sampler, guidance, memory mode and node
    selector, the same kind and its settings (an img2img job batches only
    with img2img jobs of its strength and resize mode), the same LoRAs at
    the same weights, the same ControlNet models, weights and guidance
    span, and the same number of batches. Prompts, seeds, image counts and
    the input images themselves (init image, mask, control images) may
    differ."""
    return (
        spec.model,
        spec.width,
        spec.height,
        spec.steps,
        spec.sampler_name,
        spec.cfg_scale,
        spec.memory_mode,
        tuple(sorted(spec.selector.items())),
        spec.kind,
        spec.denoising_strength if spec.kind is not Kind.TXT2IMG or spec.enable_hr else None,
        spec.resize_mode if spec.kind is not Kind.TXT2IMG else None,
        (
            spec.mask_blur,
            spec.inpainting_fill,
            spec.inpaint_full_res,
            spec.inpaint_full_res_padding,
            spec.inpainting_mask_invert,
        )
        if spec.kind is Kind.INPAINT
        else None,
        (
            spec.hr_scale,
            spec.hr_resize_x,
            spec.hr_resize_y,
            spec.hr_upscaler,
            spec.hr_second_pass_steps,
        )
        if spec.enable_hr
        else None,
        tuple(sorted((lora.name, lora.weight) for lora in spec.loras)),
        tuple((u.model, u.weight, u.guidance_start, u.guidance_end) for u in spec.controlnets),
        spec.n_iter,
    )


def _number(value: int | float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_range(
    name: str, value: int | float, low: int | float, high: int | float, *, also: str = ""
) -> None:
    if not low <= value <= high:
        raise InvalidArgument(
            name, f"must be {also}between {_number(low)} and {_number(high)}, got {_number(value)}"
        )


def _check_size(name: str, value: int) -> None:
    _check_range(name, value, MIN_SIZE, MAX_SIZE)
    if value % 8:
        raise InvalidArgument(name, f"must be a multiple of 8, got {value}")


def _check_prompt(name: str, text: str, *, required: bool) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidArgument(
            name, f"must be at most {MAX_PROMPT_CHARS} characters, got {len(text)}"
        )
    if required and not text.strip():
        raise InvalidArgument(name, "must not be empty")
    control = PROMPT_CONTROL.search(text)
    if control is not None:
        raise InvalidArgument(
            name,
            "must not contain NUL or other control characters (tab and line breaks are "
            f"fine); found {control.group()!r} at offset {control.start()}",
        )


def printable(name: str, value: str, most: int, *, least: int = 0) -> None:
    """A name-like field: printable characters, `least` to `most` of them
    (node and model names in a hello, too)."""
    if not least <= len(value) <= most or not value.isprintable():
        allowed = f"{least}-{most}" if least else f"at most {most}"
        raise InvalidArgument(name, f"must be {allowed} printable characters, got {quote(value)}")


def check_labels(labels: Mapping[str, str], field: str = "labels") -> None:
    """Kubernetes-style label names and values, at most MAX_LABELS of them;
    used for job labels, job selectors and node labels."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field, f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if len(key) > MAX_LABEL_KEY_CHARS or not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                field,
                f"key {quote(key)} must be 1-{MAX_LABEL_KEY_CHARS} letters, digits, "
                "'-', '_', '.' or '/', starting and ending with a letter or digit",
            )
        if len(value) > MAX_LABEL_VALUE_CHARS or not LABEL_VALUE.fullmatch(value):
            raise InvalidArgument(
                f"{field}[{key}]",
                f"value {quote(value)} must be at most {MAX_LABEL_VALUE_CHARS} letters, "
                "digits, '-', '_' or '.', starting and ending with a letter or digit",
            )


def resolve(
    request: SpecRequest,
    *,
    known_models: Collection[str],
    random_seed: Callable[[], int],
    known_loras: Collection[str] = (),
    known_controlnets: Collection[str] = (),
    inputs: Mapping[str, InputInfo] | None = None,
) -> JobSpec:
    """Applies the defaults and checks every field, raising InvalidArgument
    for the first field that is out of range. `known_*` are what nodes
    reported within the node window; `inputs` the input images the caller
    uploaded, by sha256."""
    _check_prompt("prompt", request.prompt, required=True)
    _check_prompt("negative_prompt", request.negative_prompt, required=False)

    model = TINY_MODEL if request.model is None else request.model.strip()
    printable("model", model, MAX_MODEL_NAME_CHARS, least=1)
    if model != TINY_MODEL and model not in known_models:
        known = ", ".join(sorted({TINY_MODEL, *known_models}))
        raise InvalidArgument(
            "model", f"unknown model {quote(model)}; models seen on nodes recently: {known}"
        )

    width = DEFAULT_WIDTH if request.width is None else request.width
    height = DEFAULT_HEIGHT if request.height is None else request.height
    _check_size("width", width)
    _check_size("height", height)

    steps = DEFAULT_STEPS if request.steps is None else request.steps
    _check_range("steps", steps, 1, MAX_STEPS)

    cfg_scale = DEFAULT_CFG_SCALE if request.cfg_scale is None else request.cfg_scale
    if cfg_scale != cfg_scale:  # NaN compares unequal to itself
        raise InvalidArgument("cfg_scale", "must be a number")
    _check_range("cfg_scale", cfg_scale, MIN_CFG_SCALE, MAX_CFG_SCALE)

    batch_size = DEFAULT_BATCH_SIZE if request.batch_size is None else request.batch_size
    _check_range("batch_size", batch_size, 1, MAX_BATCH_SIZE)

    seed = RANDOM_SEED if request.seed is None else request.seed
    if seed != RANDOM_SEED:
        _check_range("seed", seed, 0, MAX_SEED, also="-1 (random) or ")
    else:
        seed = random_seed()

    sampler = find_sampler(request.sampler_name or DEFAULT_SAMPLER)
    if sampler is None:
        raise InvalidArgument(
            "sampler_name",
            f"unknown sampler {quote(request.sampler_name or '')}; allowed: {', '.join(sampler_names())}",
        )

    _check_range("priority", request.priority, MIN_PRIORITY, MAX_PRIORITY)
    printable("request_id", request.request_id, MAX_REQUEST_ID_CHARS)
    check_labels(request.labels)
    check_labels(request.selector, "selector")
    kind_fields = resolve_kind(
        {f.name: getattr(request, f.name) for f in fields(request)},
        steps=steps,
        width=width,
        height=height,
        batch_size=batch_size,
        inputs=inputs or {},
        known_loras=known_loras,
        known_controlnets=known_controlnets,
    )

    return JobSpec(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        model=model,
        width=width,
        height=height,
        steps=steps,
        cfg_scale=float(cfg_scale),
        seed=seed,
        sampler_name=sampler.name,
        batch_size=batch_size,
        priority=request.priority,
        memory_mode=request.memory_mode,
        request_id=request.request_id,
        labels=dict(request.labels),
        selector=dict(request.selector),
        **kind_fields,
    )
