"""How much VRAM (and host RAM) a job will need, in each memory mode.

The first estimate is model weights + activations (pixels x batch) + a
margin. After every attempt the agent reports the peak it saw, and the book
keeps the largest figure per (model, size bucket, batch, mode); from then on
that figure, with a little headroom, is the estimate. An out-of-memory
failure raises the figure above what the card had, so the retry goes to a
card with more room or to a lower memory mode.

Pure code: no I/O and no clock. The store persists the learned figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.spec import MemoryMode

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

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.batch_size

    def key(self, mode: MemoryMode) -> tuple[str, int, int, MemoryMode]:
        return (self.model, size_bucket(self.width, self.height), self.batch_size, mode)


def first_estimate(weight_bytes: int, shape: Shape, mode: MemoryMode) -> Need:
    # Full, 2 GiB of weights at 512x512x1:
    #   2 GiB + 262,144 px x 3 KiB (768 MiB) + 512 MiB margin = 3.25 GiB
    activations = shape.pixels * ACTIVATION_BYTES_PER_PIXEL
    if mode is MemoryMode.MODEL_OFFLOAD:
        on_card, host = math.ceil(weight_bytes * LARGEST_MODULE_SHARE), weight_bytes
    elif mode is MemoryMode.SEQUENTIAL_OFFLOAD:
        on_card, host = math.ceil(weight_bytes * SEQUENTIAL_SHARE), weight_bytes
    else:
        on_card, host = weight_bytes, 0
    return Need(mode, on_card + activations + MARGIN_BYTES, host)


def format_bytes(count: int) -> str:
    """Binary units, as GPUs are sold: "9.1 GiB", "640 MiB"."""
    if abs(count) >= GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / MIB:.0f} MiB"


class EstimateBook:
    """Learned peaks per (model, size bucket, batch, mode)."""

    def __init__(self, learned: dict[tuple[str, int, int, MemoryMode], int] | None = None) -> None:
        self.learned: dict[tuple[str, int, int, MemoryMode], int] = dict(learned or {})

    def need(self, weight_bytes: int, shape: Shape, mode: MemoryMode) -> Need:
        first = first_estimate(weight_bytes, shape, mode)
        peak = self.learned.get(shape.key(mode))
        if peak is None:
            return first
        return Need(mode, math.ceil(peak * LEARNED_HEADROOM), first.host_bytes, learned=True)

    def needs(
        self, weight_bytes: int, shape: Shape, modes: tuple[MemoryMode, ...] = MODES
    ) -> list[Need]:
        return [self.need(weight_bytes, shape, mode) for mode in modes]

    def record_peak(self, shape: Shape, mode: MemoryMode, peak_bytes: int) -> int | None:
        """Keeps a measured peak if it is the largest so far; returns the new
        figure, or None when nothing changed (or nothing was measured)."""
        if peak_bytes <= 0:
            return None
        key = shape.key(mode)
        if peak_bytes <= self.learned.get(key, 0):
            return None
        self.learned[key] = peak_bytes
        return peak_bytes

    def learn(
        self,
        shape: Shape,
        mode: MemoryMode,
        *,
        out_of_memory: bool,
        peak_bytes: int,
        estimate_bytes: int,
    ) -> int | None:
        """Folds one finished attempt in: its measured peak, or, after an
        out-of-memory, the memory it had then. Returns the new learned
        figure, or None when nothing changed."""
        if out_of_memory:
            return self.record_oom(shape, mode, peak_bytes, estimate_bytes)
        return self.record_peak(shape, mode, peak_bytes)

    def record_oom(
        self, shape: Shape, mode: MemoryMode, had_bytes: int, estimate_bytes: int
    ) -> int:
        """After an out-of-memory: the job needs more than the card had, and
        more than it was estimated at. Returns the new learned figure."""
        # e.g. estimated 3.0 GiB, the card had 3.8 GiB: 3.8 x 1.25 = 4.75 GiB
        key = shape.key(mode)
        raised = math.ceil(max(had_bytes, estimate_bytes) * OOM_GROWTH)
        self.learned[key] = max(raised, self.learned.get(key, 0))
        return self.learned[key]
