"""The A1111 infotext of every kind of job, written into a PNG as the agent
writes it and read back with `sd-parsers`, a parser other tools use."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image
from sd_parsers import ParserManager

from gpu_node.runner import encode_png
from sdmesh.infotext import infotext
from sdmesh.kinds import ControlNetUnit, LoraWeight
from tests.factories import make_spec

SHA = "ab" * 32
HASHES = {"lora:detail": "0123456789abcdef" * 4, "controlnet:canny": "fedcba9876543210" * 4}

KINDS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "txt2img": ({}, {}),
    "img2img": (
        {"init_image": SHA, "denoising_strength": 0.6, "resize_mode": 1},
        {"Denoising strength": "0.6", "Resize mode": "Crop and resize"},
    ),
    "inpainting": (
        {
            "init_image": SHA,
            "mask": SHA,
            "mask_blur": 8,
            "inpainting_fill": 2,
            "inpaint_full_res": True,
            "inpaint_full_res_padding": 40,
            "inpainting_mask_invert": True,
        },
        {
            "Denoising strength": "0.75",
            "Mask blur": "8",
            "Masked content": "latent noise",
            "Mask mode": "Inpaint not masked",
            "Inpaint area": "Only masked",
            "Masked area padding": "40",
        },
    ),
    "hires fix": (
        {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 10, "denoising_strength": 0.5},
        {
            "Denoising strength": "0.5",
            "Hires upscale": "2",
            "Hires steps": "10",
            "Hires upscaler": "Latent",
        },
    ),
    "hires fix to a size": (
        {"enable_hr": True, "hr_resize_x": 128, "hr_upscaler": "Lanczos"},
        {"Hires resize": "128x128", "Hires upscaler": "Lanczos"},
    ),
}


def parsed(text: str) -> Any:
    png = encode_png(Image.new("RGB", (8, 8)), text)
    info = ParserManager().parse(io.BytesIO(png))
    assert info is not None, text
    return info


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_s_infotext_reads_back(kind: str) -> None:
    fields, expected = KINDS[kind]
    spec = make_spec(prompt="a lighthouse", negative_prompt="fog", **fields)
    info = parsed(infotext(spec, 1234, HASHES))
    [sampler] = info.samplers
    assert sampler.name == "Euler a"
    assert sampler.model.name == "tiny"
    assert sampler.parameters["seed"] == "1234"
    assert sampler.parameters["steps"] == "4"
    assert [p.value for p in sampler.prompts] == ["a lighthouse"]
    assert [p.value for p in sampler.negative_prompts] == ["fog"]
    for key, value in expected.items():
        assert info.metadata.get(key) == value, (key, info.metadata)
    if kind == "txt2img":
        assert "Denoising strength" not in info.metadata


def test_loras_and_controlnets_are_named_with_their_hashes() -> None:
    spec = make_spec(
        prompt="a lantern <lora:detail:0.5>",
        loras=(LoraWeight("detail", 0.5),),
        controlnets=(ControlNetUnit("canny", SHA, 0.8, 0.1, 0.9),),
    )
    text = infotext(spec, 7, HASHES)
    info = parsed(text)
    [sampler] = info.samplers
    assert sampler.prompts[0].value == "a lantern <lora:detail:0.5>"
    # A1111 quotes values that hold commas or colons: the whole unit reads back.
    assert 'Lora hashes: "detail: 0123456789ab"' in text
    assert (
        'ControlNet 0: "Module: none, Model: canny [fedcba987654], Weight: 0.8, '
        "Resize Mode: Crop and Resize, Low Vram: False, Guidance Start: 0.1, "
        'Guidance End: 0.9, Pixel Perfect: False, Control Mode: Balanced"'
    ) in text


def test_loras_given_as_a_list_are_written_into_the_prompt_as_a1111_has_them() -> None:
    spec = make_spec(prompt="a lantern", loras=(LoraWeight("detail", 0.75),))
    info = parsed(infotext(spec, 7, HASHES))
    assert info.samplers[0].prompts[0].value == "a lantern <lora:detail:0.75>"
