"""Latent previews: the linear map, sizes, and the rate limit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import pytest
import torch
from PIL import Image

from gpu_node.preview import Previewer, latents_to_png
from sdmesh.domain import Preview


@pytest.mark.parametrize(("side", "expected"), [(8, 8), (64, 64), (128, 128), (256, 128)])
def test_a_preview_is_the_latent_size_capped_at_128(side: int, expected: int) -> None:
    png, width, height = latents_to_png(
        torch.randn(4, side, side, generator=torch.Generator().manual_seed(0))
    )
    image = Image.open(BytesIO(png))
    assert image.size == (width, height) == (expected, expected)
    assert image.mode == "RGB"


def test_the_map_uses_sd15_factors() -> None:
    # Channel 0 alone at +1: RGB = (0.3512, 0.2297, 0.3227) -> (1 + x) * 127.5
    latents = torch.zeros(4, 1, 1)
    latents[0] = 1.0
    png, _, _ = latents_to_png(latents)
    assert Image.open(BytesIO(png)).getpixel((0, 0)) == (172, 156, 168)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_previews_keep_the_rate_but_never_skip_first_and_last() -> None:
    sent: list[Preview] = []
    clock = Clock()
    with ThreadPoolExecutor(1) as executor:
        previewer = Previewer(executor, sent.append, clock=clock, max_per_second=8)
        latents = torch.zeros(1, 4, 8, 8)
        for step in range(1, 11):  # ten steps in the same instant
            previewer.offer(step, 10, latents)
        previewer.flush()
        assert [p.step for p in sent] == [1, 10]
        sent.clear()
        for step in range(1, 11):  # 0.1 s apart: at most one per 0.125 s
            clock.now += 0.1
            previewer.offer(step, 10, latents)
        previewer.flush()
    assert [p.step for p in sent] == [1, 3, 5, 7, 9, 10]


def test_packed_latents_get_no_preview() -> None:
    sent: list[Preview] = []
    with ThreadPoolExecutor(1) as executor:
        previewer = Previewer(executor, sent.append)
        previewer.offer(1, 4, torch.zeros(1, 1024, 64))  # FLUX-style (batch, tokens, channels)
        previewer.flush()
    assert sent == []
