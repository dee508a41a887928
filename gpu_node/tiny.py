"""The built-in `tiny` model: a Stable Diffusion 1.x pipeline with random
weights, built offline from configs, so tests and the demo exercise every
real code path without downloading anything.

It keeps SD1.5's latent geometry (four VAE blocks, scale factor 8: a 512 px
image has a 64x64 latent). Its weights come from a fixed seed, so every agent
builds the same model and a retry on another node gives the same picture.
It is built in a temporary folder and renamed into place, so two agents
sharing a models folder never see half a model.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_SEED = 0


def _tokenizer_vocab() -> dict[str, int]:
    # transformers 5 builds CLIP tokenizers with the `tokenizers` library
    # only. A byte-level alphabet with no merges is a complete vocabulary.
    from tokenizers.pre_tokenizers import ByteLevel

    vocab: dict[str, int] = {}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab


def tiny_components() -> dict[str, Any]:
    """The tiny pipeline's unet, vae, text_encoder, tokenizer and scheduler.

    The weights come from `TINY_SEED` in this one order (UNet, VAE, text
    encoder), so the variants in `gpu_node.tiny_variants` share the same VAE
    and text encoder as the tiny model.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
        )
        vocab = _tokenizer_vocab()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=5,
                vocab_size=len(vocab),
                max_position_embeddings=77,
            )
        )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    # SD1.5's noise schedule; steps_offset=1 as its scheduler configs have.
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def build_tiny(destination: Path) -> None:
    """Writes the tiny pipeline to `destination` as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    from gpu_node.pipelines import quiet_libraries

    quiet_libraries()
    pipeline = StableDiffusionPipeline(
        **tiny_components(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(destination, safe_serialization=True)


def build_atomically(
    final: Path,
    build: Callable[[Path], None],
    *,
    done: Callable[[Path], bool] = Path.exists,
) -> Path:
    """Builds `final` (a folder or a file) unless `done(final)`: `build`
    gets a path in a temporary folder beside it, which is then renamed into
    place, so two agents sharing a models folder never see half a model."""
    if done(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        built = staging / final.name
        build(built)
        try:
            built.rename(final)
        except OSError:
            if not done(final):
                raise
            # Another agent finished first; its copy is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def ensure_tiny(models_root: Path) -> Path:
    """The tiny model's folder under `models_root`, built on first use."""
    return build_atomically(
        models_root / "tiny", build_tiny, done=lambda final: (final / "model_index.json").exists()
    )
