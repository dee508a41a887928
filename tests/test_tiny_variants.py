"""The tiny offline variants: inpainting, ControlNet and LoRA, on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from gpu_node.tiny_variants import (
    ensure_tiny_controlnet,
    ensure_tiny_inpaint,
    ensure_tiny_lora,
)
from tests.factories import seeded_call

SIZE = 64
STEPS = 2
SEED = 5
# The same seeded job on the same weights repeats to within float noise.
SAME_ATOL = 1e-5
# The LoRA at weight 1 moves the picture by far more than that (measured: a
# mean of about 0.04 and a largest pixel change of about 0.3, of 1).
LORA_MIN_MEAN_CHANGE = 0.01
# The control image's effect on the random ControlNet is small but well
# above float noise (measured: about 7e-4 at the largest pixel).
CONTROL_MIN_MAX_CHANGE = 1e-4


@pytest.fixture(scope="module")
def models_root(variants_data_dir: Path) -> Path:
    return variants_data_dir / "models"


def _hashes(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    return {
        str(file.relative_to(path.parent)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in files
        if file.is_file()
    }


def _run(pipeline: Any, **kwargs: Any) -> Any:
    return seeded_call(pipeline, size=SIZE, steps=STEPS, seed=SEED, **kwargs)


def _pictures() -> tuple[Any, Any]:
    from PIL import Image

    image = Image.new("RGB", (SIZE, SIZE), (120, 30, 200))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    return image, mask


def test_builds_are_deterministic_and_leave_no_staging(models_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "models"
    ensure_tiny_inpaint(again)
    ensure_tiny_controlnet(again)
    ensure_tiny_lora(again)
    for relative in (
        "tiny-inpaint",
        "controlnet/tiny-canny",
        "loras/tiny-lora.safetensors",
    ):
        first, second = _hashes(models_root / relative), _hashes(again / relative)
        assert first == second
        assert any(name.endswith(".safetensors") for name in first)
    leftovers = [p for p in again.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_ensure_keeps_what_is_there(models_root: Path) -> None:
    lora = models_root / "loras" / "tiny-lora.safetensors"
    before = lora.stat().st_mtime_ns
    assert ensure_tiny_lora(models_root) == lora
    assert lora.stat().st_mtime_ns == before


def test_inpaint_shares_the_tiny_models_parts(models_root: Path) -> None:
    tiny = _hashes(models_root / "tiny")
    inpaint = _hashes(models_root / "tiny-inpaint")
    for part in (
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ):
        assert tiny[f"tiny/{part}"] == inpaint[f"tiny-inpaint/{part}"]
    unet = json.loads((models_root / "tiny-inpaint/unet/config.json").read_text())
    assert unet["in_channels"] == 9
    assert unet["out_channels"] == 4
    index = json.loads((models_root / "tiny-inpaint/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"


def test_inpaint_pipeline_runs(models_root: Path) -> None:
    from diffusers import AutoPipelineForInpainting

    pipeline = AutoPipelineForInpainting.from_pretrained(
        models_root / "tiny-inpaint", use_safetensors=True
    )
    assert type(pipeline).__name__ == "StableDiffusionInpaintPipeline"
    image, mask = _pictures()
    (out,) = _run(pipeline, image=image, mask_image=mask)
    assert out.size == (SIZE, SIZE)


def test_controlnet_runs_and_the_control_image_matters(
    models_root: Path,
) -> None:
    import numpy as np
    from diffusers import (
        AutoPipelineForText2Image,
        ControlNetModel,
        StableDiffusionControlNetPipeline,
    )
    from PIL import Image

    folder = models_root / "controlnet" / "tiny-canny"
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
    }
    controlnet = ControlNetModel.from_pretrained(folder, use_safetensors=True)
    tiny = AutoPipelineForText2Image.from_pretrained(models_root / "tiny", use_safetensors=True)
    pipeline = StableDiffusionControlNetPipeline.from_pipe(tiny, controlnet=controlnet)
    black = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    edges = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    edges.paste((255, 255, 255), (8, 8, 56, 12))
    first = _run(pipeline, image=black, output_type="np")
    again = _run(pipeline, image=black, output_type="np")
    other = _run(pipeline, image=edges, output_type="np")
    assert first.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(first, again, rtol=0, atol=SAME_ATOL)
    assert np.abs(first - other).max() > CONTROL_MIN_MAX_CHANGE


def test_lora_changes_the_picture_and_unloads_without_a_trace(
    models_root: Path,
) -> None:
    import numpy as np
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(models_root / "tiny", use_safetensors=True)
    plain = _run(pipeline, output_type="np")

    pipeline.load_lora_weights(
        str(models_root / "loras" / "tiny-lora.safetensors"), adapter_name="x"
    )
    pipeline.set_adapters(["x"], [1.0])
    with_lora = _run(pipeline, output_type="np")
    assert np.abs(with_lora - plain).mean() > LORA_MIN_MEAN_CHANGE

    pipeline.set_adapters(["x"], [0.0])
    np.testing.assert_allclose(_run(pipeline, output_type="np"), plain, rtol=0, atol=SAME_ATOL)

    pipeline.unload_lora_weights()
    np.testing.assert_allclose(_run(pipeline, output_type="np"), plain, rtol=0, atol=SAME_ATOL)


def test_lora_keys_cover_every_attention_projection(models_root: Path) -> None:
    from safetensors import safe_open

    path = models_root / "loras" / "tiny-lora.safetensors"
    with safe_open(str(path), framework="pt") as lora:
        keys = set(lora.keys())
        tensors = {key: lora.get_tensor(key) for key in keys}
    modules = {key.rsplit(".lora_", 1)[0] for key in keys}
    projections = {module.rsplit(".", 1)[-1] for module in modules}
    assert projections == {"to_q", "to_k", "to_v", "0"}
    for module in modules:
        assert module.startswith("unet.")
        assert {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} <= keys
        assert tensors[f"{module}.lora_B.weight"].abs().max() > 0


def test_the_lora_names_its_base_as_kohya_does(models_root: Path) -> None:
    from gpu_node.catalog import lora_family
    from gpu_node.safe_files import safetensors_header

    header = safetensors_header(models_root / "loras" / "tiny-lora.safetensors")
    assert header["__metadata__"]["ss_base_model_version"] == "tiny"
    assert lora_family(header) == "tiny"
