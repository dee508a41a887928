"""What a job of each kind asks of the diffusers pipelines: its passes, the
call arguments of each, and its input images prepared at the job's size.

A job runs as one or two passes, `n_iter` times over:

- txt2img: one text-to-image pass;
- img2img and inpainting: one pass of the image-to-image (or inpainting)
  pipeline over the init image, which diffusers runs for
  int(steps * denoising_strength) steps;
- the hires fix: a text-to-image pass at the job's size, its latents (for a
  "Latent*" upscaler) or its picture (for "None", "Lanczos", "Nearest")
  resized to the final size, then an image-to-image pass of
  `second_pass_steps` at that size. diffusers' img2img takes 4-channel
  latents as its `image` and does not encode them again.

Input images are prepared as A1111 prepares them:

- resize_mode 0 resizes to the job's size; 1 scales to cover it and crops
  the centre; 2 scales to fit inside it and fills the rest with the picture's
  own edge rows or columns stretched, as A1111 does.
- The mask becomes greyscale, inverted when asked, blurred by `mask_blur`
  (a Gaussian of that radius) and resized like the init image.
- inpainting_fill: 0 (fill) paints the masked area with a strong blur of the
  picture before it is encoded (A1111 blurs only the unmasked colours in; a
  plain blur of the whole picture is the approximation here); 1 (original)
  keeps it; 2 (latent noise) runs at strength 1, where diffusers starts the
  masked latents from pure noise; 3 (latent nothing) paints the masked area
  mid-grey, which SD's VAE encodes to latents near zero (diffusers has no
  argument to zero the latents themselves).
- inpaint_full_res ("only masked"): the mask's bounding box plus padding,
  widened to the job's aspect, is cut out of the prepared picture, resized to
  the job's size and inpainted; the result is resized back and pasted in.
- Every inpainted picture is laid over the prepared original through the
  blurred mask, so what is not masked stays as it was (A1111's overlay).

Outputs are always the job's `output_size`, which the scheduler checks.
The functions here do no I/O: images come in decoded (PIL), by sha256.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdmesh.kinds import LATENT_UPSCALERS, Kind, strip_lora_tags
from sdmesh.spec import JobSpec

Box = tuple[int, int, int, int]  # left, upper, right, lower
FILL_BLUR_SHARE = 1 / 8  # of the picture's larger side: the blur of inpainting_fill 0
LATENT_NOTHING_GREY = 128


@dataclass(frozen=True)
class Pass:
    """One pipeline call of a job: which pipeline (by kind), at what size,
    with how many inference steps, and how many it is expected to run."""

    kind: Kind
    width: int
    height: int
    steps: int
    expected_steps: int
    latent_output: bool = False  # hand latents, not pictures, to the next pass


@dataclass(frozen=True)
class Prepared:
    """One job's inputs at the job's size, ready for its call."""

    init: Any = None  # the picture the call starts from (RGB); the crop when only masked
    mask: Any = None  # the blurred mask the call gets (L); the crop when only masked
    original: Any = None  # the prepared init image the result is laid over
    overlay: Any = None  # the blurred mask at the job's size, for that overlay
    crop: Box | None = None  # the only-masked region of `original`
    controls: tuple[Any, ...] = ()  # each ControlNet unit's image, as given
    strength: float = 1.0


def steps_run(steps: int, strength: float) -> int:
    """The steps diffusers' image-to-image pipelines run for `strength`."""
    return min(int(steps * strength), steps)


def plan(spec: JobSpec) -> list[Pass]:
    """The passes of one iteration of the job."""
    width, height = spec.width, spec.height
    if spec.enable_hr:
        final_width, final_height = spec.output_size
        second = spec.second_pass_steps
        return [
            Pass(
                Kind.TXT2IMG,
                width,
                height,
                spec.steps,
                spec.steps,
                latent_output=spec.hr_upscaler in LATENT_UPSCALERS,
            ),
            Pass(
                Kind.IMG2IMG,
                final_width,
                final_height,
                second,
                steps_run(second, spec.denoising_strength),
            ),
        ]
    if spec.kind is Kind.TXT2IMG:
        return [Pass(Kind.TXT2IMG, width, height, spec.steps, spec.steps)]
    strength = call_strength(spec)
    return [Pass(spec.kind, width, height, spec.steps, steps_run(spec.steps, strength))]


def call_strength(spec: JobSpec) -> float:
    """The strength the pipeline gets: latent noise (fill 2) starts from
    pure noise, which diffusers does at strength 1."""
    if spec.kind is Kind.INPAINT and spec.inpainting_fill == 2:
        return 1.0
    return spec.denoising_strength


# ---- images ----------------------------------------------------------------


def resize_image(image: Any, width: int, height: int, resize_mode: int) -> Any:
    """`image` at width x height by A1111's resize modes (see the module)."""
    from PIL import Image

    if resize_mode == 0 or image.size == (width, height):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio = width / height
    source = image.width / image.height
    if resize_mode == 1:  # cover, then crop the centre
        scale = width / image.width if ratio > source else height / image.height
        scaled = image.resize(
            (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
            Image.Resampling.LANCZOS,
        )
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    # Fit inside, then stretch the edge rows or columns into the gaps.
    scale = height / image.height if ratio > source else width / image.width
    fitted = image.resize(
        (
            min(width, max(1, round(image.width * scale))),
            min(height, max(1, round(image.height * scale))),
        ),
        Image.Resampling.LANCZOS,
    )
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - fitted.width) // 2, (height - fitted.height) // 2
    canvas.paste(fitted, (left, top))
    if left > 0:
        canvas.paste(fitted.crop((0, 0, 1, fitted.height)).resize((left, fitted.height)), (0, top))
        right = width - left - fitted.width
        edge = fitted.crop((fitted.width - 1, 0, fitted.width, fitted.height))
        canvas.paste(edge.resize((right, fitted.height)), (left + fitted.width, top))
    if top > 0:
        canvas.paste(fitted.crop((0, 0, fitted.width, 1)).resize((fitted.width, top)), (left, 0))
        bottom = height - top - fitted.height
        edge = fitted.crop((0, fitted.height - 1, fitted.width, fitted.height))
        canvas.paste(edge.resize((fitted.width, bottom)), (left, top + fitted.height))
    return canvas


def prepare_mask(mask: Any, spec: JobSpec) -> Any:
    """The mask the job paints through: L, inverted when asked, blurred,
    at the job's size."""
    from PIL import ImageFilter, ImageOps

    mask = mask.convert("L")
    if spec.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if spec.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(spec.mask_blur))
    return resize_image(mask, spec.width, spec.height, spec.resize_mode)


def fill_masked(image: Any, mask: Any, fill: int) -> Any:
    """The picture the call encodes, for inpainting_fill (see the module)."""
    from PIL import Image, ImageFilter

    if fill == 0:
        radius = max(image.size) * FILL_BLUR_SHARE
        return Image.composite(image.filter(ImageFilter.GaussianBlur(radius)), image, mask)
    if fill == 3:
        grey = Image.new("RGB", image.size, (LATENT_NOTHING_GREY,) * 3)
        return Image.composite(grey, image, mask)
    return image


def crop_region(mask: Any, padding: int, width: int, height: int) -> Box:
    """A1111's only-masked region: the mask's bounding box plus `padding`,
    widened or heightened to the aspect width:height, within the mask."""
    box = mask.point(lambda level: 255 if level > 0 else 0).getbbox()
    if box is None:
        return (0, 0, mask.width, mask.height)
    x1, y1, x2, y2 = box
    x1, y1 = max(0, x1 - padding), max(0, y1 - padding)
    x2, y2 = min(mask.width, x2 + padding), min(mask.height, y2 + padding)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _widen(y1, y2, int((x2 - x1) * height / width) - (y2 - y1), mask.height)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * width / height) - (x2 - x1), mask.width)
    return (x1, y1, x2, y2)


def _widen(low: int, high: int, more: int, limit: int) -> tuple[int, int]:
    low, high = low - more // 2, high + more - more // 2
    if high > limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, min(limit, high - low)
    return low, high


def _input(images: Mapping[str, Any], sha256: str, field: str) -> Any:
    found = images.get(sha256)
    if found is None:
        raise ValueError(f"{field}: input {sha256[:12]}… is not on this node")
    return found


def prepare(spec: JobSpec, images: Mapping[str, Any]) -> Prepared:
    """The job's input images (decoded, by sha256) ready for its call."""
    controls = tuple(
        _input(images, unit.image, f"controlnets[{index}].image").convert("RGB")
        for index, unit in enumerate(spec.controlnets)
    )
    if spec.kind is Kind.TXT2IMG:
        return Prepared(controls=controls, strength=spec.denoising_strength)
    init = resize_image(
        _input(images, spec.init_image, "init_image").convert("RGB"),
        spec.width,
        spec.height,
        spec.resize_mode,
    )
    if spec.kind is Kind.IMG2IMG:
        return Prepared(init=init, controls=controls, strength=spec.denoising_strength)
    overlay = prepare_mask(_input(images, spec.mask, "mask"), spec)
    painted = fill_masked(init, overlay, spec.inpainting_fill)
    strength = call_strength(spec)
    if not spec.inpaint_full_res:
        return Prepared(painted, overlay, init, overlay, None, controls, strength)
    from PIL import Image

    box = crop_region(overlay, spec.inpaint_full_res_padding, spec.width, spec.height)
    size = (spec.width, spec.height)
    return Prepared(
        painted.crop(box).resize(size, Image.Resampling.LANCZOS),
        overlay.crop(box).resize(size, Image.Resampling.LANCZOS),
        init,
        overlay,
        box,
        controls,
        strength,
    )


def finish(prepared: Prepared, image: Any) -> Any:
    """An inpainted picture laid over the original through the blurred
    mask (pasted back into its region when only the mask was painted);
    other kinds' pictures as they are."""
    if prepared.original is None or prepared.overlay is None:
        return image
    from PIL import Image

    generated = image
    if prepared.crop is not None:
        x1, y1, x2, y2 = prepared.crop
        generated = prepared.original.copy()
        generated.paste(image.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
    return Image.composite(generated.convert("RGB"), prepared.original, prepared.overlay)


def upscale(images: Any, spec: JobSpec) -> Any:
    """The first pass's output at the hires fix's final size: latents
    interpolated as the upscaler says, or pictures resized."""
    width, height = spec.output_size
    if spec.hr_upscaler in LATENT_UPSCALERS:
        import torch

        mode, antialias = LATENT_UPSCALERS[spec.hr_upscaler]
        return torch.nn.functional.interpolate(
            images, size=(height // 8, width // 8), mode=mode, antialias=antialias
        )
    from PIL import Image

    resample = (
        Image.Resampling.NEAREST if spec.hr_upscaler == "Nearest" else Image.Resampling.LANCZOS
    )
    return [image.resize((width, height), resample) for image in images]


# ---- call arguments ----------------------------------------------------------


def accepts(pipeline: Any, name: str) -> bool:
    """Whether the pipeline's call takes the argument `name`. A call of
    nothing but **kwargs (a wrapper, such as a simulated card's) takes
    every one; diffusers' calls name theirs (their **kwargs are for
    deprecated arguments)."""
    parameters = inspect.signature(pipeline.__call__).parameters
    loose = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return name in parameters or all(p.kind in loose for p in parameters.values())


def _per_image(specs: Sequence[JobSpec], values: Sequence[Any]) -> Any:
    """One value per job, as the call takes it: the job's own for a lone
    job (the pipeline repeats it for each image), else one per image."""
    if len(specs) == 1:
        return values[0]
    return [
        value for spec, value in zip(specs, values, strict=True) for _ in range(spec.batch_size)
    ]


def arguments(
    pipeline: Any,
    step: Pass,
    specs: Sequence[JobSpec],
    prepared: Sequence[Prepared],
    iteration: int,
    on_step_end: Callable[..., Any],
    carried: Any = None,
) -> dict[str, Any]:
    """The diffusers call of one pass of one iteration, for a job or alike
    jobs run as one batch: each job's prompts, inputs and seeds, in order.
    `carried` is the hires fix's first pass, upscaled, for its second."""
    import torch

    lead = specs[0]
    prompts = [strip_lora_tags(spec.prompt) for spec in specs]
    negatives = [strip_lora_tags(spec.negative_prompt) for spec in specs]
    call: dict[str, Any] = {
        "prompt": _per_image(specs, prompts),
        "negative_prompt": _per_image(specs, negatives) if any(negatives) else None,
        "num_inference_steps": step.steps,
        "guidance_scale": lead.cfg_scale,
        "num_images_per_prompt": lead.batch_size if len(specs) == 1 else 1,
        # Noise from a CPU generator per image: the same seed gives the same
        # picture on any card, alone or in a batch; image i of iteration k
        # uses seed + k * batch_size + i.
        "generator": [
            torch.Generator("cpu").manual_seed(seed)
            for spec in specs
            for seed in spec.seeds[iteration * spec.batch_size : (iteration + 1) * spec.batch_size]
        ],
        "callback_on_step_end": on_step_end,
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    if accepts(pipeline, "width"):
        call["width"], call["height"] = step.width, step.height
    if step.latent_output:
        call["output_type"] = "latent"
    if carried is not None:  # the hires fix's second pass
        call["image"] = carried
        call["strength"] = lead.denoising_strength
    elif step.kind is not Kind.TXT2IMG:
        call["image"] = _per_image(specs, [job.init for job in prepared])
        call["strength"] = prepared[0].strength
        if step.kind is Kind.INPAINT:
            call["mask_image"] = _per_image(specs, [job.mask for job in prepared])
    if lead.controlnets:
        call.update(_control(pipeline, step, specs, prepared))
    return call


def _control(
    pipeline: Any, step: Pass, specs: Sequence[JobSpec], prepared: Sequence[Prepared]
) -> dict[str, Any]:
    """ControlNet arguments: the control images at the pass's size (as
    `image` on text-to-image pipelines, `control_image` on the others), and
    each unit's weight and guidance span, as lists for several units."""
    from PIL import Image

    units = specs[0].controlnets
    size = (step.width, step.height)
    per_job = [
        [image.resize(size, Image.Resampling.LANCZOS) for image in job.controls] for job in prepared
    ]
    if len(units) == 1:
        images: Any = _per_image(specs, [controls[0] for controls in per_job])
    elif len(specs) == 1:
        images = per_job[0]  # one image per unit
    else:  # per image, each a list of one image per unit
        images = _per_image(specs, per_job)

    def each(values: list[float]) -> Any:
        return values[0] if len(values) == 1 else values

    name = "control_image" if accepts(pipeline, "control_image") else "image"
    return {
        name: images,
        "controlnet_conditioning_scale": each([unit.weight for unit in units]),
        "control_guidance_start": each([unit.guidance_start for unit in units]),
        "control_guidance_end": each([unit.guidance_end for unit in units]),
    }
