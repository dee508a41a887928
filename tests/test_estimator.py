"""The VRAM estimator: first guesses per memory mode, learning from
measured peaks and out-of-memory failures, and converging on the simulated
cards' true profile without ever reading it."""

from __future__ import annotations

import pytest

from gpu_node.profiles import PROFILES, true_peak
from scheduler.estimator import (
    GIB,
    MIB,
    EstimateBook,
    LearnedPeak,
    Shape,
    first_estimate,
    size_bucket,
)
from sdmesh.spec import MemoryMode

FULL, OFFLOAD, SEQUENTIAL = MemoryMode.FULL, MemoryMode.MODEL_OFFLOAD, MemoryMode.SEQUENTIAL_OFFLOAD
SD15 = Shape("sd15", 512, 512, 1)


@pytest.mark.parametrize(
    ("mode", "vram", "host"),
    [
        # 2 GiB + 512 x 512 x 1 x 3 KiB (768 MiB) + 512 MiB margin = 3.25 GiB
        (FULL, 2 * GIB + 768 * MIB + 512 * MIB, 0),
        # the largest module (0.8 x 2 GiB = 1.6 GiB) + 768 MiB + 512 MiB; all weights in host RAM
        (OFFLOAD, int(0.8 * 2 * GIB) + 1 + 768 * MIB + 512 * MIB, 2 * GIB),
        # a tenth of the weights (205 MiB) + 768 MiB + 512 MiB
        (SEQUENTIAL, int(0.1 * 2 * GIB) + 1 + 768 * MIB + 512 * MIB, 2 * GIB),
    ],
)
def test_first_estimate_per_mode(mode: MemoryMode, vram: int, host: int) -> None:
    need = first_estimate(2 * GIB, SD15, mode)
    assert need.vram_bytes == pytest.approx(vram, abs=1)
    assert need.host_bytes == host
    assert not need.learned


def test_batch_and_size_scale_the_activations() -> None:
    # batch 4 at 1024 px: 4 x 1024 x 1024 x 3 KiB = 12 GiB of activations
    assert first_estimate(0, Shape("m", 1024, 1024, 4), FULL).vram_bytes == 12 * GIB + 512 * MIB


@pytest.mark.parametrize(
    ("width", "height", "bucket"),
    [
        (512, 512, 512 * 512),
        (500, 500, 512 * 512),
        (513, 512, 640 * 640),
        (1024, 1024, 1024 * 1024),
        (4096, 64, 512 * 512),
    ],  # by pixel count, not shape,
)
def test_size_buckets(width: int, height: int, bucket: int) -> None:
    assert size_bucket(width, height) == bucket


def test_a_measured_peak_replaces_the_guess_with_headroom() -> None:
    book = EstimateBook()
    assert book.record_peak(SD15, FULL, 3 * GIB) == LearnedPeak(3 * GIB, 512 * 512)
    assert book.record_peak(SD15, FULL, 2 * GIB) is None  # the largest peak is kept
    assert book.record_peak(SD15, FULL, 0) is None  # nothing measured (a CPU device)
    need = book.need(2 * GIB, SD15, FULL)
    assert need.learned
    # 3 GiB x 1.05 = 3.15 GiB
    assert need.vram_bytes == pytest.approx(3.15 * GIB, abs=1)
    # The same bucket and batch share the figure (a smaller image keeps the
    # whole peak); another batch does not.
    smaller = book.need(2 * GIB, Shape("sd15", 500, 500, 1), FULL)
    assert smaller.learned
    assert smaller.vram_bytes == need.vram_bytes
    assert not book.need(2 * GIB, Shape("sd15", 512, 512, 2), FULL).learned
    assert not book.need(2 * GIB, SD15, OFFLOAD).learned


def test_out_of_memory_raises_the_figure_above_what_the_card_had() -> None:
    book = EstimateBook()
    # estimated 3.0 GiB, the card had 3.8 GiB: max(3.8, 3.0) x 1.25 = 4.75 GiB
    raised = book.record_oom(SD15, FULL, int(3.8 * GIB), 3 * GIB)
    assert raised.peak_bytes == pytest.approx(4.75 * GIB, abs=1)
    # a second failure on a card that had less does not lower it
    assert book.record_oom(SD15, FULL, 2 * GIB, 3 * GIB) == raised


def test_a_larger_image_in_the_bucket_scales_the_learned_activations() -> None:
    # Peak 12 GiB measured at 1288x1288 (1.66 MP) for 7 GiB of weights: 5 GiB
    # of activations. At 1536x1536 (2.36 MP, same bucket) they scale to
    # 5 x 2.36 / 1.66 = 7.11 GiB: 7 + 7.11 = 14.11 GiB, x 1.05 = 14.8 GiB.
    book = EstimateBook()
    measured = Shape("sdxl", 1288, 1288, 1)
    book.record_peak(measured, FULL, 12 * GIB)
    bigger = Shape("sdxl", 1536, 1536, 1)
    assert size_bucket(1288, 1288) == size_bucket(1536, 1536)
    expected = (7 * GIB + 5 * GIB * (1536 * 1536) / (1288 * 1288)) * 1.05
    assert book.need(7 * GIB, bigger, FULL).vram_bytes == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("model", ["sd15", "sdxl", "flux"])
@pytest.mark.parametrize("mode", [FULL, OFFLOAD])
def test_the_estimate_converges_on_the_simulated_profile(model: str, mode: MemoryMode) -> None:
    """A card with 80 GiB free runs jobs of every shape and reports each
    peak, as an agent does; the estimator never sees the profile itself."""
    profile = PROFILES[model]
    book = EstimateBook()
    shapes = [
        Shape(model, w, h, b) for w, h in ((512, 512), (768, 768), (1024, 1024)) for b in (1, 2)
    ]
    for _ in range(3):
        for shape in shapes:
            book.record_peak(
                shape, mode, true_peak(profile, shape.width, shape.height, shape.batch_size, mode)
            )
    for shape in shapes:
        truth = true_peak(profile, shape.width, shape.height, shape.batch_size, mode)
        estimate = book.need(profile.weight_bytes, shape, mode).vram_bytes
        assert truth <= estimate <= truth * 1.06  # covers the peak, with 5% headroom


def test_out_of_memory_retries_reach_a_figure_that_fits() -> None:
    """The first guess is too low for SDXL at 1024 px; each failure on a card
    that was too small raises it until it covers the true peak."""
    profile = PROFILES["sdxl"]
    shape = Shape("sdxl", 1024, 1024, 1)
    truth = true_peak(profile, 1024, 1024, 1, FULL)
    book = EstimateBook()
    estimate = book.need(profile.weight_bytes, shape, FULL).vram_bytes
    assert estimate < truth  # the guess is wrong, as first guesses are
    for _ in range(5):
        if estimate >= truth:
            break
        # the job went to a card with just the estimate free, and failed
        book.record_oom(shape, FULL, estimate, estimate)
        estimate = book.need(profile.weight_bytes, shape, FULL).vram_bytes
    assert estimate >= truth
