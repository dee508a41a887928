"""Tiny offline variants of the built-in `tiny` model, for testing img2img,
inpainting, LoRA and ControlNet without downloading anything.

- `tiny-inpaint`: the tiny pipeline (same VAE, text encoder, tokenizer and
  scheduler) with a 9-channel UNet (4 latent + 4 masked-image latent + 1
  mask), saved as a `StableDiffusionInpaintPipeline` folder.
- `controlnet/tiny-canny`: a ControlNet made from the tiny UNet.
- `loras/tiny-lora.safetensors`: a LoRA for the tiny UNet's attention
  projections, in the diffusers/PEFT key format.

Like the tiny model, every weight comes from a fixed seed (the same bytes on
every build) and each is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

from gpu_node.tiny import TINY_SEED, build_atomically, tiny_components

# Each variant's own seed, so that its new weights never repeat the tiny
# model's.
INPAINT_SEED = TINY_SEED + 1
CONTROLNET_SEED = TINY_SEED + 2
LORA_SEED = TINY_SEED + 3

# The names the catalog offers them by (--tiny-variants).
INPAINT_NAME = "tiny-inpaint"
CONTROLNET_NAME = "tiny-canny"
LORA_NAME = "tiny-lora"
# kohya's metadata key for the base a LoRA was trained on; the catalog reads it.
# One key only: safetensors writes the metadata in a hash map's order, which
# changes from call to call, and the file must be the same bytes every build
# (its sha256 is in every infotext that names it).
LORA_METADATA = {"ss_base_model_version": "tiny"}

LORA_RANK = 4
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Standard deviations of the LoRA factors: B is small but far from zero, so
# that the LoRA visibly changes the picture.
LORA_A_STD = 0.5
LORA_B_STD = 0.5
# ControlNet's output convolutions start at zero (it has no effect until
# trained); these get small random values so the control image matters.
CONTROLNET_ZERO_CONV_STD = 0.5


def build_tiny_inpaint(destination: Path) -> None:
    """Writes the tiny inpainting pipeline to `destination`."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from gpu_node.pipelines import quiet_libraries

    quiet_libraries()
    components = tiny_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INPAINT_SEED)
        components["unet"] = UNet2DConditionModel.from_config(
            components["unet"].config, in_channels=9
        )
    pipeline = StableDiffusionInpaintPipeline(
        **components,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(destination, safe_serialization=True)


def build_tiny_controlnet(destination: Path) -> None:
    """Writes a ControlNet made from the tiny UNet to `destination`."""
    import torch
    from diffusers import ControlNetModel

    from gpu_node.pipelines import quiet_libraries

    quiet_libraries()
    unet = tiny_components()["unet"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CONTROLNET_SEED)
        controlnet = ControlNetModel.from_unet(unet)
        with torch.no_grad():
            zero_convs = [
                *controlnet.controlnet_down_blocks,
                controlnet.controlnet_mid_block,
                controlnet.controlnet_cond_embedding.conv_out,
            ]
            for conv in zero_convs:
                conv.weight.normal_(0.0, CONTROLNET_ZERO_CONV_STD)
    controlnet.save_pretrained(destination, safe_serialization=True)


def build_tiny_lora(destination: Path) -> None:
    """Writes a LoRA for the tiny UNet's attention projections to the file
    `destination`, keyed `unet.<module>.lora_A.weight` / `.lora_B.weight`.
    """
    import torch
    from safetensors.torch import save_file

    from gpu_node.pipelines import quiet_libraries

    quiet_libraries()
    unet = tiny_components()["unet"]
    generator = torch.Generator().manual_seed(LORA_SEED)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(name.endswith(f".{target}") for target in LORA_TARGETS):
            continue
        down = torch.randn(LORA_RANK, module.in_features, generator=generator) * (
            LORA_A_STD / module.in_features**0.5
        )
        up = torch.randn(module.out_features, LORA_RANK, generator=generator)
        tensors[f"unet.{name}.lora_A.weight"] = down.contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = (up * LORA_B_STD).contiguous()
    save_file(tensors, str(destination), metadata=LORA_METADATA)


def ensure_tiny_inpaint(models_root: Path) -> Path:
    """The `tiny-inpaint` pipeline's folder under `models_root`."""
    return build_atomically(models_root / INPAINT_NAME, build_tiny_inpaint)


def ensure_tiny_controlnet(models_root: Path) -> Path:
    """The tiny ControlNet's folder, `models_root/controlnet/tiny-canny`."""
    return build_atomically(models_root / "controlnet" / CONTROLNET_NAME, build_tiny_controlnet)


def ensure_tiny_lora(models_root: Path) -> Path:
    """The tiny LoRA's file, `models_root/loras/tiny-lora.safetensors`."""
    return build_atomically(models_root / "loras" / f"{LORA_NAME}.safetensors", build_tiny_lora)
