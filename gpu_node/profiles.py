"""How much memory and time jobs really take on simulated GPUs.

This table is the "true" behaviour of simulated cards, used by the agent's
simulated GPUs and by the placement benchmark. The scheduler never reads it:
its estimator must learn these figures from the peaks agents report. The
activation figures differ from the estimator's first guess on purpose, as
real models do.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

from sdmesh.spec import MemoryMode

MIB = 2**20
GIB = 2**30
KIB = 1024
CUDA_CONTEXT_BYTES = 400 * MIB  # what a process holds on a card before any model
NOISE = 0.05  # true peaks vary by up to 5% either way, fixed per job shape


@dataclass(frozen=True)
class ModelProfile:
    name: str
    weight_bytes: int
    activation_bytes_per_pixel: float  # per pixel of width x height x batch
    largest_module_share: float  # the UNet or transformer, as a share of all weights
    seconds_per_megapixel_step: float  # on a speed-1.0 card, in full mode
    load_seconds: float  # a cold load from disk


PROFILES = {
    "tiny": ModelProfile("tiny", 10 * MIB, 0.3 * KIB, 0.5, 0.35, 0.2),
    "sd15": ModelProfile("sd15", 2 * GIB, 2.6 * KIB, 0.8, 0.19, 3.0),
    "sdxl": ModelProfile("sdxl", int(6.9 * GIB), 4.2 * KIB, 0.75, 0.27, 8.0),
    "flux": ModelProfile("flux", 23 * GIB, 5.6 * KIB, 0.72, 0.86, 20.0),
}

# True slowdowns of the offloaded modes (the scheduler assumes its own).
MODE_SLOWDOWN = {
    MemoryMode.FULL: 1.0,
    MemoryMode.MODEL_OFFLOAD: 1.6,
    MemoryMode.SEQUENTIAL_OFFLOAD: 7.0,
}


def profile_for(name: str, weight_bytes: int | None = None) -> ModelProfile:
    """The profile of a model by name, sized to `weight_bytes` when given.
    Unknown names take the profile of the nearest known size."""
    known = PROFILES.get(name)
    if known is None:
        size = weight_bytes or GIB
        nearest = min(PROFILES.values(), key=lambda p: abs(math.log(p.weight_bytes / size)))
        known = replace(nearest, name=name)
    if weight_bytes is not None:
        known = replace(known, weight_bytes=weight_bytes)
    return known


def _noise(*parts: object) -> float:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2**64  # 0..1, fixed per shape
    return 1.0 + NOISE * (2 * unit - 1)


def true_peak(
    profile: ModelProfile, width: int, height: int, batch_size: int, mode: MemoryMode
) -> int:
    """Bytes a job really allocates on the card, as torch's
    max_memory_allocated counts them (without the CUDA context)."""
    activations = width * height * batch_size * profile.activation_bytes_per_pixel
    if mode is MemoryMode.MODEL_OFFLOAD:
        weights = profile.weight_bytes * profile.largest_module_share
    elif mode is MemoryMode.SEQUENTIAL_OFFLOAD:
        weights = profile.weight_bytes * 0.05
    else:
        weights = profile.weight_bytes
    noise = _noise(profile.name, width, height, batch_size, mode.value)
    return int((weights + activations) * noise)


def run_seconds(
    profile: ModelProfile,
    width: int,
    height: int,
    batch_size: int,
    steps: int,
    mode: MemoryMode,
    card_speed: float,
) -> float:
    """The denoising time on a card of `card_speed`, without a cold load."""
    megapixel_steps = width * height * batch_size * steps / 1e6
    seconds = megapixel_steps * profile.seconds_per_megapixel_step / card_speed
    return seconds * MODE_SLOWDOWN.get(mode, 1.0)
