"""The models an agent offers: tiny, diffusers folders, refusals."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from gpu_node.catalog import Catalog, describe, safetensors_dtype, weight_files

# An SD1.5 model_index.json, as published: the safety checker's library is
# a diffusers pipeline package.
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "requires_safety_checker": True,
}


def write_safetensors(path: Path, dtype: str, size: int) -> None:
    header = json.dumps({"w": {"dtype": dtype, "shape": [size // 2], "data_offsets": [0, size]}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * size)


def test_tiny_is_built_once_and_reported(tiny_data_dir: Path) -> None:
    catalog = Catalog(tiny_data_dir, None)
    [tiny] = catalog.scan()
    assert tiny.name == "tiny"
    assert tiny.dtype == "float32"
    assert 5_000_000 < tiny.weight_bytes < 20_000_000  # about 10 MB
    assert tiny.path is not None
    assert (tiny.path / "model_index.json").exists()
    assert not [p for p in (tiny_data_dir / "models").iterdir() if p.name.startswith(".tiny-")]


def test_models_dir_folders_are_found_and_pickles_refused(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "sd15"
    (good / "model_index.json").parent.mkdir(parents=True)
    (good / "model_index.json").write_text(json.dumps(SD15_INDEX))
    write_safetensors(good / "unet" / "diffusion_pytorch_model.safetensors", "F16", 1000)
    write_safetensors(good / "unet" / "diffusion_pytorch_model.fp16.safetensors", "F16", 500)
    write_safetensors(good / "vae" / "diffusion_pytorch_model.fp16.safetensors", "BF16", 100)
    pickled = tmp_path / "old"
    (pickled / "unet").mkdir(parents=True)
    (pickled / "model_index.json").write_text("{}")
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "v1-5.ckpt").write_bytes(b"pickle")
    (tmp_path / "single.safetensors").write_bytes(b"x")

    catalog = Catalog(tiny_data_dir, tmp_path)
    names = [model.name for model in catalog.scan()]
    assert names == ["tiny", "sd15"]
    sd15 = catalog.get("sd15")
    assert sd15 is not None
    # unet: the plain file (not the fp16 variant); vae: only a variant exists.
    assert sd15.weight_bytes == sum(f.stat().st_size for f in weight_files(good))
    assert [f.name for f in weight_files(good)] == [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    assert sd15.dtype == "float16"
    assert "pickle weights are refused" in caplog.text
    assert "v1-5.ckpt: pickle checkpoints are refused" in caplog.text
    assert "single-file checkpoints are not supported yet" in caplog.text
    with pytest.raises(ValueError, match="pickle weights are refused"):
        describe("old", pickled)


def test_dtype_comes_from_the_header(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a.safetensors", "BF16", 10)
    assert safetensors_dtype(tmp_path / "a.safetensors") == "bfloat16"


def test_a_missing_models_dir_is_an_error(tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        Catalog(tiny_data_dir, tmp_path / "nope").scan()
    shutil.rmtree(tmp_path, ignore_errors=True)
