"""The first VRAM estimate for a job, before anything has been measured:
model weights, plus activations that grow with pixels x batch, plus a margin.

The constants are for SD-class UNets in fp16 with scaled-dot-product
attention, whose peak is dominated by the VAE decode at large sizes.
"""

from __future__ import annotations

MIB = 2**20
GIB = 2**30

ACTIVATION_BYTES_PER_PIXEL = 3 * 1024
MARGIN_BYTES = 512 * MIB


def estimate_vram_bytes(weight_bytes: int, width: int, height: int, batch_size: int) -> int:
    # 512x512x1: 262,144 px x 3 KiB = 768 MiB of activations, + 512 MiB margin
    return weight_bytes + width * height * batch_size * ACTIVATION_BYTES_PER_PIXEL + MARGIN_BYTES


def format_bytes(count: int) -> str:
    """Binary units, as GPUs are sold: "9.1 GiB", "640 MiB"."""
    if abs(count) >= GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / MIB:.0f} MiB"
