"""How much VRAM (and host RAM) a job will need, in each memory mode.

The first estimate is model weights (the base model's, and the job's
LoRAs' and ControlNets') + activations (pixels of the larger pass x batch)
+ a margin. After every attempt the agent reports the peak it saw, and the book
keeps the largest per (model, size bucket, batch, mode, variant: the kind
and its extras, see `Shape.variant`), with the pixel count
it came from. From then on the estimate is that peak with a little headroom,
its activations scaled up for a larger image in the same bucket. An
out-of-memory failure raises the figure above what the card had, so the retry
goes to a card with more room or to a lower memory mode.

Pure code: no I/O and no clock. The store persists the learned figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdmesh.spec import MemoryMode

MIB = 2**20
GIB = 2**30

# SD-class models in fp16 with scaled-dot-product attention; the peak at
# large sizes is the VAE decode.
ACTIVATION_BYTES_PER_PIXEL = 3 * 1024
MARGIN_BYTES = 512 * MIB
# The largest module of a pipeline (the UNet or transformer), as a share of
# all its weights: what model CPU offload keeps on the card at once.
LARGEST_MODULE_SHARE = 0.8
# Sequential offload streams layer by layer; a small share stays resident.
SEQUENTIAL_SHARE = 0.1
LEARNED_HEADROOM = 1.05  # the largest peak seen, plus 5%
OOM_GROWTH = 1.25  # after an out-of-memory: 25% above what the card had
# Pixel buckets (width x height), so that 1000x1000 and 1024x1024 share a figure.
SIZE_BUCKETS = tuple(side * side for side in (256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 2048))

MODES = (MemoryMode.FULL, MemoryMode.MODEL_OFFLOAD, MemoryMode.SEQUENTIAL_OFFLOAD)


def size_bucket(width: int, height: int) -> int:
    """The smallest bucket holding this many pixels."""
    pixels = width * height
    for bucket in SIZE_BUCKETS:
        if pixels <= bucket:
            return bucket
    return pixels


EstimateKey = tuple[str, int, int, MemoryMode, str]  # model, size bucket, batch, mode, variant


@dataclass(frozen=True)
class LearnedPeak:
    peak_bytes: int
    pixels: int  # width x height x batch of the job it was measured on


@dataclass(frozen=True)
class Need:
    """What one job needs in one memory mode."""

    mode: MemoryMode
    vram_bytes: int
    host_bytes: int  # host RAM the offloaded weights occupy
    learned: bool = False


@dataclass(frozen=True)
class Shape:
    """What an estimate depends on."""

    model: str
    width: int
    height: int
    batch_size: int
    # The kind and what it adds (a second pass, LoRAs, ControlNets), as
    # `scheduler.placement.demand.variant_of` writes it; "" for plain txt2img.
    variant: str = ""
    # The hires fix's second pass, at a larger size (0x0 without one).
    hires_width: int = 0
    hires_height: int = 0

    @property
    def pixels(self) -> int:
        """Per call, in the larger pass: the activations' peak grows with it."""
        per_image = max(self.width * self.height, self.hires_width * self.hires_height)
        return per_image * self.batch_size

    def key(self, mode: MemoryMode) -> EstimateKey:
        return (
            self.model,
            size_bucket(self.width, self.height),
            self.batch_size,
            mode,
            self.variant,
        )


def weights_on_card(weight_bytes: int, mode: MemoryMode) -> int:
    """How much of the model a memory mode keeps on the card at once."""
    if mode is MemoryMode.MODEL_OFFLOAD:
        return math.ceil(weight_bytes * LARGEST_MODULE_SHARE)
    if mode is MemoryMode.SEQUENTIAL_OFFLOAD:
        return math.ceil(weight_bytes * SEQUENTIAL_SHARE)
    return weight_bytes


def first_estimate(weight_bytes: int, shape: Shape, mode: MemoryMode) -> Need:
    # Full, 2 GiB of weights at 512x512x1:
    #   2 GiB + 262,144 px x 3 KiB (768 MiB) + 512 MiB margin = 3.25 GiB
    activations = shape.pixels * ACTIVATION_BYTES_PER_PIXEL
    host = 0 if mode in (MemoryMode.FULL, MemoryMode.AUTO) else weight_bytes
    return Need(mode, weights_on_card(weight_bytes, mode) + activations + MARGIN_BYTES, host)


def format_bytes(count: int) -> str:
    """Binary units, as GPUs are sold: "9.1 GiB", "640 MiB"."""
    if abs(count) >= GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / MIB:.0f} MiB"


class EstimateBook:
    """Learned peaks per (model, size bucket, batch, mode, variant)."""

    def __init__(self, learned: dict[EstimateKey, LearnedPeak] | None = None) -> None:
        self.learned: dict[EstimateKey, LearnedPeak] = dict(learned or {})
        self.version = 0  # moves on whenever a figure changes

    def replace(self, learned: dict[EstimateKey, LearnedPeak]) -> None:
        """Takes the figures the database holds, which every replica saved to."""
        self.learned = dict(learned)
        self.version += 1

    def need(self, weight_bytes: int, shape: Shape, mode: MemoryMode) -> Need:
        first = first_estimate(weight_bytes, shape, mode)
        learned = self.learned.get(shape.key(mode))
        if learned is None:
            return first
        # A 1536x1536 job after a peak measured at 1288x1288 in the same
        # bucket: the activations grow with the pixels, the weights do not.
        activations = max(0, learned.peak_bytes - weights_on_card(weight_bytes, mode))
        growth = max(0.0, shape.pixels / max(learned.pixels, 1) - 1.0)
        vram = math.ceil((learned.peak_bytes + activations * growth) * LEARNED_HEADROOM)
        return Need(mode, vram, first.host_bytes, learned=True)

    def needs(
        self, weight_bytes: int, shape: Shape, modes: tuple[MemoryMode, ...] = MODES
    ) -> list[Need]:
        return [self.need(weight_bytes, shape, mode) for mode in modes]

    def record_peak(self, shape: Shape, mode: MemoryMode, peak_bytes: int) -> LearnedPeak | None:
        """Keeps a measured peak if it is the largest so far; returns the new
        figure, or None when nothing changed (or nothing was measured)."""
        if peak_bytes <= 0:
            return None
        key = shape.key(mode)
        old = self.learned.get(key)
        if old is not None and peak_bytes <= old.peak_bytes:
            return None
        self.learned[key] = LearnedPeak(peak_bytes, shape.pixels)
        self.version += 1
        return self.learned[key]

    def learn(
        self,
        shape: Shape,
        mode: MemoryMode,
        *,
        out_of_memory: bool,
        peak_bytes: int,
        estimate_bytes: int,
    ) -> LearnedPeak | None:
        """Folds one finished attempt in: its measured peak, or, after an
        out-of-memory, the memory it had then. Returns the new learned
        figure, or None when nothing changed."""
        if out_of_memory:
            return self.record_oom(shape, mode, peak_bytes, estimate_bytes)
        return self.record_peak(shape, mode, peak_bytes)

    def record_oom(
        self, shape: Shape, mode: MemoryMode, had_bytes: int, estimate_bytes: int
    ) -> LearnedPeak:
        """After an out-of-memory: the job needs more than the card had, and
        more than it was estimated at. Returns the new learned figure."""
        # e.g. estimated 3.0 GiB, the card had 3.8 GiB: 3.8 x 1.25 = 4.75 GiB
        key = shape.key(mode)
        raised = LearnedPeak(math.ceil(max(had_bytes, estimate_bytes) * OOM_GROWTH), shape.pixels)
        old = self.learned.get(key)
        if old is None or raised.peak_bytes > old.peak_bytes:
            self.learned[key] = raised
            self.version += 1
        return self.learned[key]
