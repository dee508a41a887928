"""Every kind of job through the device worker on the tiny model: img2img,
inpainting (the generic pipeline and an inpainting model), the hires fix's
two passes with a latent and an image upscaler, ControlNet, LoRA and
n_iter; and the pure image preparation they rest on."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy
import pytest
from PIL import Image

from gpu_node.backends import TorchBackend
from gpu_node.catalog import Catalog
from gpu_node.passes import crop_region, plan, resize_image
from gpu_node.runner import StepCounter, Task
from sdmesh.domain import AttemptOutcome, AttemptUpdate, Ended, ImageReady, Progress
from sdmesh.kinds import ControlNetUnit, Kind, LoraWeight
from sdmesh.spec import MemoryMode
from tests.factories import make_spec
from tests.test_runner import CPU, MAX_LEVEL_DIFFERENCE, MAX_SHARE_DIFFERING, pixels
from tests.workers import run_worker

INIT, MASK, CONTROL, OTHER = "a" * 64, "b" * 64, "c" * 64, "d" * 64


class KindsBackend(TorchBackend):
    """The backend interface for every kind, built here from the tiny
    model with diffusers' own mechanisms (from_pipe, load_lora_weights,
    set_adapters, unload_lora_weights)."""

    def __init__(self, catalog: Catalog, variants: Path, *, inpaint_model: bool = False) -> None:
        super().__init__("cpu", catalog)
        self.variants = variants
        self.inpaint_model = inpaint_model
        self.calls: list[tuple[Kind, tuple[str, ...], tuple[LoraWeight, ...]]] = []
        self.ended = 0
        self._lora_pipeline: Any = None
        self._controlnets: dict[str, Any] = {}

    def pipeline(
        self,
        model: str,
        sampler: str,
        mode: MemoryMode,
        *,
        task: Kind = Kind.TXT2IMG,
        controlnets: tuple[str, ...] = (),
        loras: tuple[LoraWeight, ...] = (),
    ) -> tuple[Any, float]:
        from diffusers import (
            AutoPipelineForImage2Image,
            AutoPipelineForInpainting,
            ControlNetModel,
            StableDiffusionControlNetPipeline,
            StableDiffusionInpaintPipeline,
        )

        self.calls.append((task, controlnets, loras))
        base, seconds = super().pipeline(model, sampler, mode)
        if loras:
            for lora in loras:
                if lora.name not in base.get_list_adapters().get("unet", ()):
                    path = self.variants / "loras" / f"{lora.name}.safetensors"
                    base.load_lora_weights(str(path), adapter_name=lora.name)
            base.set_adapters([lora.name for lora in loras], [lora.weight for lora in loras])
            self._lora_pipeline = base
        nets = [
            self._controlnets.setdefault(
                name, ControlNetModel.from_pretrained(self.variants / "controlnet" / name)
            )
            for name in controlnets
        ]
        extra: dict[str, Any] = {"controlnet": nets[0] if len(nets) == 1 else nets} if nets else {}
        if task is Kind.IMG2IMG:
            return AutoPipelineForImage2Image.from_pipe(base, **extra), seconds
        if task is Kind.INPAINT:
            if self.inpaint_model:
                inpaint = StableDiffusionInpaintPipeline.from_pretrained(
                    self.variants / "tiny-inpaint", scheduler=base.scheduler
                )
                return inpaint, seconds
            return AutoPipelineForInpainting.from_pipe(base, **extra), seconds
        if nets:
            return StableDiffusionControlNetPipeline.from_pipe(base, **extra), seconds
        return base, seconds

    def end_job(self) -> None:
        self.ended += 1
        if self._lora_pipeline is not None:
            self._lora_pipeline.unload_lora_weights()
            self._lora_pipeline = None

    def hashes(self) -> dict[str, str]:
        return {"lora:tiny-lora": "0123456789ab" * 5 + "cdef"}


@pytest.fixture(scope="module")
def variants(variants_data_dir: Path) -> Path:
    return variants_data_dir / "models"


@pytest.fixture
def catalog(tiny_data_dir: Path) -> Catalog:
    catalog = Catalog(tiny_data_dir, None)
    catalog.scan()
    return catalog


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    noise = numpy.random.default_rng(seed).integers(
        0, 256, (size[1], size[0], 3), dtype=numpy.uint8
    )
    return Image.fromarray(noise, "RGB")


def square_mask(size: int = 64, low: int = 16, high: int = 40) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (low, low, high, high))
    return mask


INPUTS = {INIT: picture(1), MASK: square_mask(), CONTROL: picture(2), OTHER: picture(3)}


def task(job_id: str = "j", **spec: Any) -> Task:
    return Task(job_id, 1, make_spec(**{"steps": 4, **spec}), MemoryMode.AUTO, inputs=INPUTS)


def run(backend: TorchBackend, *batches: list[Task]) -> list[AttemptUpdate]:
    return run_worker(CPU, backend, list(batches))


def of(events: list[AttemptUpdate], kind: type, job_id: str = "j") -> list[Any]:
    return [e.body for e in events if e.job_id == job_id and isinstance(e.body, kind)]


def succeeded(events: list[AttemptUpdate], job_id: str = "j") -> list[ImageReady]:
    [ended] = of(events, Ended, job_id)
    assert ended.outcome is AttemptOutcome.SUCCEEDED, ended.reason
    return of(events, ImageReady, job_id)


def rgb(image: ImageReady) -> numpy.ndarray[Any, Any]:
    return numpy.asarray(Image.open(BytesIO(image.png)).convert("RGB"), dtype=numpy.int16)


# ---- the pure preparation ------------------------------------------------------


def test_resize_modes() -> None:
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    assert resize_image(wide, 32, 32, 0).size == (32, 32)
    # Crop and resize: scaled to cover (64x32), the centre 32x32 kept.
    cropped = resize_image(wide, 32, 32, 1)
    assert cropped.size == (32, 32)
    assert cropped.getpixel((2, 16))[2] > 200  # blue on the left
    assert cropped.getpixel((30, 16))[0] > 200  # red on the right
    # Resize and fill: scaled to fit (32x16) in the middle; above and below
    # are the edge rows stretched, so the colours go on to the border.
    filled = resize_image(wide, 32, 32, 2)
    assert filled.size == (32, 32)
    assert filled.getpixel((2, 0))[2] > 200
    assert filled.getpixel((30, 31))[0] > 200


def test_crop_region_pads_and_takes_the_job_s_aspect() -> None:
    # The square 16..40 plus 4 padding is 12..44 (32x32); a 2:1 job widens
    # it to 64x32, centred: 12 - 16 = -4 moves right to 0..64.
    assert crop_region(square_mask(), 4, 64, 64) == (12, 12, 44, 44)
    assert crop_region(square_mask(), 4, 128, 64) == (0, 12, 64, 44)
    assert crop_region(Image.new("L", (64, 64), 0), 4, 64, 64) == (0, 0, 64, 64)


def test_plan_counts_the_steps_diffusers_runs() -> None:
    # img2img runs int(steps * strength): int(10 * 0.75) = 7.
    [only] = plan(make_spec(steps=10, init_image=INIT, denoising_strength=0.75))
    assert (only.kind, only.expected_steps) == (Kind.IMG2IMG, 7)
    # Latent noise starts from noise: strength 1, every step.
    [painted] = plan(make_spec(steps=10, init_image=INIT, mask=MASK, inpainting_fill=2))
    assert (painted.kind, painted.expected_steps) == (Kind.INPAINT, 10)
    first, second = plan(
        make_spec(steps=10, enable_hr=True, hr_second_pass_steps=6, denoising_strength=0.5)
    )
    assert (first.kind, first.expected_steps, first.latent_output) == (Kind.TXT2IMG, 10, True)
    assert (second.kind, second.width, second.steps, second.expected_steps) == (
        Kind.IMG2IMG,
        128,
        6,
        3,
    )


def test_one_step_count_spans_every_pass() -> None:
    counter = StepCounter([3, 2])  # planned: 3 steps, then 2
    assert [counter.step(i, 3) for i in range(3)] == [(1, 5), (2, 5), (3, 5)]
    counter.end_pass()
    # The second pass says it runs 3 (a second-order sampler, say): the
    # total follows it, and the count goes on from 3.
    assert [counter.step(i, 3) for i in range(3)] == [(4, 6), (5, 6), (6, 6)]
    counter.end_pass()
    assert counter.done == 6


# ---- through the worker ------------------------------------------------------


def test_img2img_is_deterministic_and_changes_its_input(catalog: Catalog, variants: Path) -> None:
    backend = KindsBackend(catalog, variants)
    spec: dict[str, Any] = {"init_image": INIT, "denoising_strength": 0.5, "seed": 3}
    first = run(backend, [task(**spec)])
    [image] = succeeded(first)
    # int(4 * 0.5) steps run.
    assert [(p.step, p.total_steps) for p in of(first, Progress)] == [(1, 2), (2, 2)]
    [again] = succeeded(run(backend, [task(**spec)]))
    assert image.png == again.png
    assert (image.width, image.height) == (64, 64)
    assert numpy.abs(rgb(image) - numpy.asarray(INPUTS[INIT], dtype=numpy.int16)).mean() > 10
    assert backend.calls[0][0] is Kind.IMG2IMG
    assert backend.ended == 2
    assert "Denoising strength: 0.5" in Image.open(BytesIO(image.png)).info["parameters"]


def test_a_batch_of_img2img_jobs_is_each_as_if_alone(catalog: Catalog, variants: Path) -> None:
    backend = KindsBackend(catalog, variants)
    [alone] = succeeded(run(backend, [task("a", init_image=INIT, seed=5)]), "a")
    batched = run(
        backend,
        [task("b", init_image=OTHER, batch_size=2, seed=50), task("a", init_image=INIT, seed=5)],
    )
    [same] = succeeded(batched, "a")
    # The tolerance of tests/test_runner.py: batched kernels sum in another order.
    difference = numpy.abs(pixels(alone) - pixels(same))
    assert difference.max() <= MAX_LEVEL_DIFFERENCE
    assert (difference > 0).mean() <= MAX_SHARE_DIFFERING
    b0, _ = succeeded(batched, "b")
    assert (numpy.abs(pixels(b0) - pixels(alone)) > MAX_LEVEL_DIFFERENCE).mean() > 0.5


@pytest.mark.parametrize("inpaint_model", [False, True], ids=["generic", "inpaint-model"])
@pytest.mark.parametrize("only_masked", [False, True], ids=["whole", "only-masked"])
def test_inpainting_repaints_only_the_mask(
    catalog: Catalog, variants: Path, inpaint_model: bool, only_masked: bool
) -> None:
    backend = KindsBackend(catalog, variants, inpaint_model=inpaint_model)
    job = task(
        init_image=INIT,
        mask=MASK,
        mask_blur=0,
        inpaint_full_res=only_masked,
        inpaint_full_res_padding=4,
        denoising_strength=1.0,
    )
    [image] = succeeded(run(backend, [job]))
    out, original = rgb(image), numpy.asarray(INPUTS[INIT], dtype=numpy.int16)
    inside = numpy.asarray(square_mask()) > 0
    # Outside the mask the original, exactly (the overlay); inside, new.
    assert numpy.array_equal(out[~inside], original[~inside])
    assert numpy.abs(out[inside] - original[inside]).mean() > 10
    assert backend.calls[0][0] is Kind.INPAINT


def test_an_inverted_mask_keeps_what_the_mask_covers(catalog: Catalog, variants: Path) -> None:
    backend = KindsBackend(catalog, variants)
    job = task(
        init_image=INIT, mask=MASK, mask_blur=0, inpainting_mask_invert=True, inpainting_fill=0
    )
    [image] = succeeded(run(backend, [job]))
    inside = numpy.asarray(square_mask()) > 0
    original = numpy.asarray(INPUTS[INIT], dtype=numpy.int16)
    assert numpy.array_equal(rgb(image)[inside], original[inside])


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos"])
def test_hires_fix_runs_two_passes_as_one_count(
    catalog: Catalog, variants: Path, upscaler: str
) -> None:
    backend = KindsBackend(catalog, variants)
    job = task(
        steps=3,
        enable_hr=True,
        hr_scale=2.0,
        hr_upscaler=upscaler,
        hr_second_pass_steps=4,
        denoising_strength=0.5,
    )
    events = run(backend, [job])
    [image] = succeeded(events)
    assert (image.width, image.height) == (128, 128)
    # 3 steps, then int(4 * 0.5) = 2 at 128x128: one count to 5.
    assert [(p.step, p.total_steps) for p in of(events, Progress)] == [(s, 5) for s in range(1, 6)]
    assert [call[0] for call in backend.calls] == [Kind.TXT2IMG, Kind.IMG2IMG]


def test_n_iter_runs_batches_one_after_another(catalog: Catalog, variants: Path) -> None:
    backend = KindsBackend(catalog, variants)
    events = run(backend, [task(steps=2, batch_size=2, n_iter=2, seed=40)])
    images = succeeded(events)
    assert [(i.index, i.seed) for i in images] == [(0, 40), (1, 41), (2, 42), (3, 43)]
    assert [(p.step, p.total_steps) for p in of(events, Progress)] == [(s, 4) for s in range(1, 5)]
    # Iteration 1's first image is seed 42's picture: a job with that seed.
    [single] = succeeded(run(backend, [task(steps=2, seed=42)]))
    difference = numpy.abs(pixels(images[2]) - pixels(single))
    assert difference.max() <= MAX_LEVEL_DIFFERENCE
    assert (difference > 0).mean() <= MAX_SHARE_DIFFERING


@pytest.mark.parametrize("units", [1, 2])
@pytest.mark.parametrize("init", [False, True], ids=["txt2img", "img2img"])
def test_controlnet_units_steer_the_picture(
    catalog: Catalog, variants: Path, units: int, init: bool
) -> None:
    backend = KindsBackend(catalog, variants)
    kind = {"init_image": INIT} if init else {}
    plain = succeeded(run(backend, [task(seed=8, **kind)]))
    controls = tuple(
        ControlNetUnit("tiny-canny", image, 1.0, 0.0, 1.0) for image in (CONTROL, OTHER)[:units]
    )
    [steered] = succeeded(run(backend, [task(seed=8, controlnets=controls, **kind)]))
    assert backend.calls[-1][1] == ("tiny-canny",) * units
    assert numpy.abs(pixels(steered) - pixels(plain[0])).mean() > 1


def test_loras_apply_to_their_job_only(catalog: Catalog, variants: Path) -> None:
    backend = KindsBackend(catalog, variants)
    [plain] = succeeded(run(backend, [task(seed=9, prompt="a cat")]))
    lora = (LoraWeight("tiny-lora", 1.0),)
    events = run(
        backend,
        [task("with", seed=9, prompt="a cat <lora:tiny-lora:1>", loras=lora)],
        [task("after", seed=9, prompt="a cat")],
    )
    [with_lora] = succeeded(events, "with")
    [after] = succeeded(events, "after")
    assert numpy.abs(pixels(with_lora) - pixels(plain)).mean() > 1
    assert after.png == plain.png  # nothing leaked into the next job
    assert backend.calls[1][2] == lora
    assert "tiny-lora" in Image.open(BytesIO(with_lora.png)).info["parameters"]


def test_a_missing_input_fails_the_attempt_as_input(catalog: Catalog, variants: Path) -> None:
    backend = KindsBackend(catalog, variants)
    job = Task("j", 1, make_spec(steps=2, init_image="e" * 64), MemoryMode.AUTO)
    [ended] = of(run(backend, [job]), Ended)
    assert (ended.outcome, ended.error_kind) == (AttemptOutcome.FAILED, "input")


# ---- the node's real backend -------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "size", "steps"),
    [
        ({"init_image": INIT}, 64, [1, 2]),  # int(3 * 0.75) = 2
        ({"init_image": INIT, "mask": MASK, "inpaint_full_res": True}, 64, [1, 2]),
        ({"enable_hr": True, "hr_second_pass_steps": 2}, 128, [1, 2, 3, 4]),  # 3 + int(2 * 0.75)
        ({"loras": (LoraWeight("tiny-lora", 0.5),)}, 64, [1, 2, 3]),
        ({"init_image": INIT, "controlnets": (ControlNetUnit("tiny-canny", CONTROL),)}, 64, [1, 2]),
    ],
    ids=["img2img", "inpaint", "hires", "lora", "controlnet-img2img"],
)
def test_every_kind_runs_on_the_real_backend(
    tiny_data_dir: Path, variants: Path, kind: dict[str, Any], size: int, steps: list[int]
) -> None:
    catalog = Catalog(tiny_data_dir, variants)
    catalog.scan()
    events = run(TorchBackend("cpu", catalog), [task(steps=3, **kind)])
    [image] = succeeded(events)
    assert (image.width, image.height) == (size, size)
    assert [p.step for p in of(events, Progress)] == steps
    assert {p.total_steps for p in of(events, Progress)} == {steps[-1]}
