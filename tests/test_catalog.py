"""The models an agent offers: tiny, diffusers folders, refusals."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from gpu_node.catalog import Catalog, describe
from gpu_node.safe_files import safetensors_dtype, weight_files

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


def write_lora(path: Path, version: str | None = None) -> None:
    """A LoRA file: one tensor, with kohya's base-model metadata if given."""
    header: dict[str, object] = {"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}
    if version is not None:
        header["__metadata__"] = {"ss_base_model_version": version}
    text = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)


def write_controlnet(folder: Path, cross_attention_dim: int, **config: object) -> None:
    folder.mkdir(parents=True)
    config = {
        "_class_name": "ControlNetModel",
        "cross_attention_dim": cross_attention_dim,
        **config,
    }
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", "F16", 64)


def write_pipeline(folder: Path, cross_attention_dim: int, in_channels: int = 4) -> None:
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(SD15_INDEX))
    unet = {"cross_attention_dim": cross_attention_dim, "in_channels": in_channels}
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors", "F16", 100)


def test_models_by_kind_with_family_and_sha256(tiny_data_dir: Path, tmp_path: Path) -> None:
    import hashlib

    models = tmp_path / "models"
    write_pipeline(models / "sd15", 768)
    write_pipeline(models / "sd15-inpainting", 768, in_channels=9)
    write_pipeline(models / "sd21", 1024)
    write_lora(models / "loras" / "detail.v2.safetensors", "sd_v1")
    write_lora(models / "loras" / "xl-style.safetensors", "sdxl_base_v1-0")
    write_lora(models / "loras" / "sd15.safetensors")  # a LoRA may share a model's name
    write_controlnet(models / "controlnet" / "canny", 768)
    write_controlnet(models / "controlnet" / "canny-sdxl", 2048, addition_embed_type="text_time")

    catalog = Catalog(tiny_data_dir, models)
    catalog.scan()
    found = {key: model.family for key, model in catalog.models.items()}
    assert found == {
        ("base", "tiny"): "tiny",
        ("base", "sd15"): "sd1",
        ("inpaint", "sd15-inpainting"): "sd1",
        ("base", "sd21"): "sd2",
        ("lora", "detail.v2"): "sd1",
        ("lora", "xl-style"): "sdxl",
        ("lora", "sd15"): "",
        ("controlnet", "canny"): "sd1",
        ("controlnet", "canny-sdxl"): "sdxl",
    }
    lora = catalog.get("detail.v2", "lora")
    assert lora is not None
    lora_file = models / "loras" / "detail.v2.safetensors"
    assert lora.sha256 == hashlib.sha256(lora_file.read_bytes()).hexdigest()
    assert lora.weight_bytes == lora_file.stat().st_size
    assert (lora.info.kind, lora.info.family, lora.info.sha256) == ("lora", "sd1", lora.sha256)
    canny = catalog.get("canny", "controlnet")
    weights = models / "controlnet" / "canny" / "diffusion_pytorch_model.safetensors"
    assert canny is not None and canny.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    # Without a kind, a name means a pipeline model; the LoRA sd15 is apart.
    sd15 = catalog.get("sd15")
    assert sd15 is not None and sd15.kind == "base"
    assert catalog.get("sd15", "lora") is not None
    assert catalog.get("canny") is None


def test_loras_and_controlnets_are_refused_as_models_are(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models, outside = tmp_path / "models", tmp_path / "outside"
    write_lora(models / "loras" / "good.safetensors")
    (models / "loras" / "old.pt").write_bytes(b"\x80\x02pickle")
    (models / "loras" / "zipped.safetensors").write_bytes(b"PK\x03\x04 a torch.save zip")
    write_lora(outside / "elsewhere.safetensors")
    (models / "loras" / "linked.safetensors").symlink_to(outside / "elsewhere.safetensors")
    write_controlnet(models / "controlnet" / "good", 768)
    write_controlnet(models / "controlnet" / "pickled", 768)
    (models / "controlnet" / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    write_controlnet(models / "controlnet" / "coded", 768)
    (models / "controlnet" / "coded" / "controlnet.py").write_text("import os")
    write_controlnet(outside / "far", 768)
    (models / "controlnet" / "linked").symlink_to(outside / "far")
    write_controlnet(models / "controlnet" / "unet", 768, _class_name="UNet2DConditionModel")

    catalog = Catalog(tiny_data_dir, models)
    catalog.scan()
    assert sorted(catalog.models) == [
        ("base", "tiny"),
        ("controlnet", "good"),
        ("lora", "good"),
    ]
    assert "skipped loras/old.pt: pickle weights are refused" in caplog.text
    assert "LoRA 'zipped'" in caplog.text and "its header length" in caplog.text
    assert "LoRA 'linked'" in caplog.text and "leads outside" in caplog.text
    assert "ControlNet 'pickled'" in caplog.text and "pickle weights are refused" in caplog.text
    assert "ControlNet 'coded'" in caplog.text and "code files are refused" in caplog.text
    assert "ControlNet 'linked'" in caplog.text and "leads outside" in caplog.text
    assert "'UNet2DConditionModel', not a ControlNetModel" in caplog.text


def test_synthetic_models_may_name_their_kind(tiny_data_dir: Path) -> None:
    catalog = Catalog(
        tiny_data_dir, None, {"sdxl": 7 * 2**30, "lora:detail": 2**27, "controlnet:canny": 2**30}
    )
    catalog.scan()
    assert {key: model.synthetic for key, model in catalog.models.items()} == {
        ("base", "tiny"): False,
        ("base", "sdxl"): True,
        ("lora", "detail"): True,
        ("controlnet", "canny"): True,
    }
