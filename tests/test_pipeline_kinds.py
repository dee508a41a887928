"""Pipelines for every kind of job on the tiny models and their variants:
txt2img, img2img, inpainting (the node's inpainting model or the generic
pipeline), ControlNets and LoRAs, on a CPU backend."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from gpu_node.backends import TorchBackend
from gpu_node.catalog import Catalog
from gpu_node.pipelines import ModelUnavailable
from sdmesh.kinds import Kind, LoraWeight
from sdmesh.spec import MemoryMode
from tests.factories import seeded_call

SIZE = 64
STEPS = 2
SEED = 7
# The same seeded job on the same weights repeats to within float noise;
# switching LoRA layers off (or a LoRA at weight 0) must not move it further.
SAME_ATOL = 1e-5
# A LoRA at weight 1 moves the picture by far more (about 0.04 on average;
# see tests/test_tiny_variants.py).
LORA_MIN_MEAN_CHANGE = 0.01

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def variants_catalog(variants_data_dir: Path) -> Catalog:
    catalog = Catalog(variants_data_dir, None, tiny_variants=True)
    catalog.scan()
    return catalog


@pytest.fixture
def backend(variants_catalog: Catalog) -> TorchBackend:
    import torch

    torch.set_num_threads(1)
    return TorchBackend("cpu", variants_catalog)


def pictures() -> tuple[Any, Any]:
    from PIL import Image

    image = Image.new("RGB", (SIZE, SIZE), (120, 30, 200))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    return image, mask


def run(pipeline: Any, **kwargs: Any) -> Any:
    return seeded_call(pipeline, size=SIZE, steps=STEPS, seed=SEED, output_type="np", **kwargs)


def txt2img(backend: TorchBackend, loras: tuple[LoraWeight, ...] = ()) -> Any:
    pipeline, _ = backend.pipeline("tiny", "Euler a", MemoryMode.FULL, loras=loras)
    try:
        return run(pipeline)
    finally:
        backend.end_job()


def test_the_catalog_offers_the_variants_by_kind_with_family_and_sha(
    variants_catalog: Catalog,
) -> None:
    kinds = {
        key: (model.family, model.sha256 != "") for key, model in variants_catalog.models.items()
    }
    assert kinds == {
        ("base", "tiny"): ("tiny", False),
        ("inpaint", "tiny-inpaint"): ("tiny", False),
        ("controlnet", "tiny-canny"): ("tiny", True),
        ("lora", "tiny-lora"): ("tiny", True),
    }
    lora = variants_catalog.get("tiny-lora", "lora")
    assert lora is not None and lora.path is not None
    assert lora.sha256 == hashlib.sha256(lora.path.read_bytes()).hexdigest()
    assert lora.info.kind == "lora" and lora.info.sha256 == lora.sha256
    assert variants_catalog.get("tiny-lora") is None  # a pipeline model of that name


def test_each_task_gets_its_diffusers_class_and_runs(backend: TorchBackend) -> None:
    image, mask = pictures()
    cases = [
        (Kind.TXT2IMG, (), "StableDiffusionPipeline", {}),
        (Kind.IMG2IMG, (), "StableDiffusionImg2ImgPipeline", {"image": image, "strength": 0.75}),
        (Kind.INPAINT, (), "StableDiffusionInpaintPipeline", {"image": image, "mask_image": mask}),
        (Kind.TXT2IMG, ("tiny-canny",), "StableDiffusionControlNetPipeline", {"image": image}),
        (
            Kind.IMG2IMG,
            ("tiny-canny",),
            "StableDiffusionControlNetImg2ImgPipeline",
            {"image": image, "control_image": image},
        ),
        (
            Kind.INPAINT,
            ("tiny-canny",),
            "StableDiffusionControlNetInpaintPipeline",
            {"image": image, "mask_image": mask, "control_image": image},
        ),
        (
            Kind.TXT2IMG,
            ("tiny-canny", "tiny-canny"),
            "StableDiffusionControlNetPipeline",
            {"image": [image, image]},
        ),
    ]
    for task, controlnets, class_name, inputs in cases:
        pipeline, _ = backend.pipeline(
            "tiny", "Euler a", MemoryMode.FULL, task=task, controlnets=controlnets
        )
        assert type(pipeline).__name__ == class_name, (task, controlnets)
        (out,) = run(pipeline, **inputs)
        assert out.shape == (SIZE, SIZE, 3), (task, controlnets)
        backend.end_job()


def test_inpainting_uses_the_nodes_inpainting_model_and_else_the_base(
    variants_catalog: Catalog, tmp_path: Path
) -> None:
    backend = TorchBackend("cpu", variants_catalog)
    pipeline, _ = backend.pipeline("tiny", "Euler a", MemoryMode.FULL, task=Kind.INPAINT)
    assert pipeline.unet.config.in_channels == 9  # tiny-inpaint's UNet
    assert {m.name for m in backend.resident()} == {"tiny-inpaint"}

    plain = Catalog(tmp_path, None)  # no variants: the generic pipeline on tiny's UNet
    plain.scan()
    generic, _ = TorchBackend("cpu", plain).pipeline(
        "tiny", "Euler a", MemoryMode.FULL, task=Kind.INPAINT
    )
    assert type(generic).__name__ == "StableDiffusionInpaintPipeline"
    assert generic.unet.config.in_channels == 4


def test_other_kinds_share_the_base_modules_and_are_built_once(backend: TorchBackend) -> None:
    base, _ = backend.pipeline("tiny", "Euler a", MemoryMode.FULL)
    img2img, _ = backend.pipeline("tiny", "Euler a", MemoryMode.FULL, task=Kind.IMG2IMG)
    control, _ = backend.pipeline(
        "tiny", "Euler a", MemoryMode.FULL, task=Kind.IMG2IMG, controlnets=("tiny-canny",)
    )
    for pipeline in (img2img, control):
        assert pipeline.unet is base.unet
        assert pipeline.vae is base.vae
        assert pipeline.text_encoder is base.text_encoder
    again, seconds = backend.pipeline("tiny", "Euler a", MemoryMode.FULL, task=Kind.IMG2IMG)
    assert again is img2img
    assert seconds == 0.0
    # A sampler change reaches the other kinds' pipelines too.
    again, _ = backend.pipeline("tiny", "DDIM", MemoryMode.FULL, task=Kind.IMG2IMG)
    assert type(again.scheduler).__name__ == "DDIMScheduler"
    kinds = {(m.kind, m.name) for m in backend.resident()}
    assert kinds == {("base", "tiny"), ("controlnet", "tiny-canny")}


def test_a_lora_never_leaks_into_the_next_job(backend: TorchBackend) -> None:
    import numpy as np

    before = txt2img(backend)
    with_lora = txt2img(backend, (LoraWeight("tiny-lora", 1.0),))
    after = txt2img(backend)
    at_zero = txt2img(backend, (LoraWeight("tiny-lora", 0.0),))
    assert np.abs(with_lora - before).mean() > LORA_MIN_MEAN_CHANGE
    np.testing.assert_allclose(after, before, rtol=0, atol=0)  # the very same picture
    assert np.abs(at_zero - before).max() <= SAME_ATOL
    # Kept loaded for the next job that asks, and listed as held.
    assert ("lora", "tiny-lora") in {(m.kind, m.name) for m in backend.resident()}
    again = txt2img(backend, (LoraWeight("tiny-lora", 1.0),))
    np.testing.assert_allclose(again, with_lora, rtol=0, atol=SAME_ATOL)


def test_a_lora_that_fails_to_load_leaves_nothing_switched_on(
    variants_data_dir: Path, tmp_path: Path
) -> None:
    """The first LoRA loads, the second's shapes do not fit the UNet and
    its load raises part-way: after the job the next one is the picture
    without any LoRA, and the broken one fails the same way again."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    good = variants_data_dir / "models" / "loras" / "tiny-lora.safetensors"
    broken = {
        key: torch.zeros(value.shape[0], value.shape[1] + 3)
        if key.endswith("lora_A.weight")
        else value
        for key, value in load_file(str(good)).items()
    }
    (tmp_path / "loras").mkdir()
    save_file(broken, str(tmp_path / "loras" / "broken.safetensors"))
    catalog = Catalog(variants_data_dir, tmp_path, tiny_variants=True)
    catalog.scan()
    torch.set_num_threads(1)
    backend = TorchBackend("cpu", catalog)

    before = txt2img(backend)
    loras = (LoraWeight("tiny-lora", 1.0), LoraWeight("broken", 1.0))
    for _ in range(2):  # not "adapter name already in use" the second time
        # diffusers' own clean-up of the failed load raises over the size
        # mismatch (a KeyError from its peft_config), whatever the type.
        with pytest.raises((KeyError, RuntimeError, ValueError)) as caught:
            txt2img(backend, loras)
        assert "already in use" not in str(caught.value)
    np.testing.assert_allclose(txt2img(backend), before, rtol=0, atol=0)


def test_a_lora_applies_to_the_other_kinds_and_is_switched_off_after(
    backend: TorchBackend,
) -> None:
    import numpy as np

    image, _ = pictures()

    def img2img(loras: tuple[LoraWeight, ...]) -> Any:
        pipeline, _ = backend.pipeline(
            "tiny", "Euler a", MemoryMode.FULL, task=Kind.IMG2IMG, loras=loras
        )
        try:
            return run(pipeline, image=image, strength=1.0)
        finally:
            backend.end_job()

    plain = img2img(())
    with_lora = img2img((LoraWeight("tiny-lora", 1.0),))
    assert np.abs(with_lora - plain).mean() > LORA_MIN_MEAN_CHANGE
    np.testing.assert_allclose(img2img(()), plain, rtol=0, atol=0)


def test_what_the_node_lacks_is_named(backend: TorchBackend) -> None:
    with pytest.raises(ModelUnavailable, match="no LoRA 'nope' on this node"):
        backend.pipeline("tiny", "Euler a", MemoryMode.FULL, loras=(LoraWeight("nope"),))
    with pytest.raises(ModelUnavailable, match="no ControlNet 'edges' on this node"):
        backend.pipeline("tiny", "Euler a", MemoryMode.FULL, controlnets=("edges",))
    with pytest.raises(ModelUnavailable, match="model 'sdxl' is not on this node"):
        backend.pipeline("sdxl", "Euler a", MemoryMode.FULL)
    with pytest.raises(ModelUnavailable, match="inpainting jobs only"):
        backend.pipeline("tiny-inpaint", "Euler a", MemoryMode.FULL)
    # A missing one costs nothing: nothing was loaded for it.
    assert backend.resident() == ()


def test_hashes_are_the_weights_sha256(backend: TorchBackend, variants_catalog: Catalog) -> None:
    lora = variants_catalog.get("tiny-lora", "lora")
    controlnet = variants_catalog.get("tiny-canny", "controlnet")
    assert lora is not None and lora.path is not None
    assert controlnet is not None and controlnet.path is not None
    weights = controlnet.path / "diffusion_pytorch_model.safetensors"
    assert backend.hashes() == {
        "lora:tiny-lora": hashlib.sha256(lora.path.read_bytes()).hexdigest(),
        "controlnet:tiny-canny": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def test_first_use_load_times(variants_catalog: Catalog) -> None:
    """Measures (and logs) what each first use costs on this machine; only
    checks that a second use of each costs nothing."""
    backend = TorchBackend("cpu", variants_catalog)
    lora = (LoraWeight("tiny-lora", 1.0),)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("tiny", {}),
        ("img2img", {"task": Kind.IMG2IMG}),
        ("inpaint (tiny-inpaint)", {"task": Kind.INPAINT}),
        ("tiny-lora", {"loras": lora}),
        ("tiny-canny", {"controlnets": ("tiny-canny",)}),
    ]
    for label, options in steps:
        started = time.monotonic()
        _, seconds = backend.pipeline("tiny", "Euler a", MemoryMode.FULL, **options)
        log.warning(
            "first use of %s: %.3fs reported, %.3fs in all",
            label,
            seconds,
            time.monotonic() - started,
        )
        _, again = backend.pipeline("tiny", "Euler a", MemoryMode.FULL, **options)
        assert again == 0.0, label
        backend.end_job()


def test_offloaded_the_pipeline_handed_out_is_the_one_placed_last(
    variants_catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offload hooks sit on the modules a model and its other kinds share:
    each pipeline is placed again when another one was placed since. (A CPU
    device runs every mode full; here it is made to keep the mode, and
    placing is recorded instead of done.)"""
    import gpu_node.pipelines
    from gpu_node.pipelines import PipelineCache

    placed: list[str] = []

    def record(pipeline: Any, device: str, mode: MemoryMode) -> Any:
        placed.append(f"{type(pipeline).__name__} {mode.value}")
        return pipeline

    monkeypatch.setattr(gpu_node.pipelines, "place", record)
    monkeypatch.setattr(PipelineCache, "mode_on_device", lambda self, mode: mode)
    cache = PipelineCache("cpu", variants_catalog)
    offload = MemoryMode.MODEL_OFFLOAD
    cache.get("tiny", "Euler a", offload)
    cache.get("tiny", "Euler a", offload, task=Kind.IMG2IMG)
    cache.get("tiny", "Euler a", offload, task=Kind.IMG2IMG)
    cache.get("tiny", "Euler a", offload, controlnets=("tiny-canny",))
    cache.get("tiny", "Euler a", offload)
    mode = offload.value
    assert placed == [
        f"StableDiffusionPipeline {mode}",
        f"StableDiffusionImg2ImgPipeline {mode}",
        f"StableDiffusionControlNetPipeline {mode}",
        f"StableDiffusionPipeline {mode}",
    ]
    # Offloaded weights live in host memory: nothing is listed as held.
    assert cache.resident() == ()
