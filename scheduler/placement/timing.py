"""How long a job will take on a GPU: measured speeds (`sdmesh.speeds`)
turned into expected seconds, with a guess for a model never run on a
device from how that device compares with the others on the models it has
run, and a cold load when the model is not resident.

Pure code: no I/O and no clock.
"""

from __future__ import annotations

from collections.abc import Mapping

from sdmesh.spec import MemoryMode
from sdmesh.speeds import Speed

# How much slower each memory mode runs than full (weights cross the bus).
MODE_SLOWDOWN = {
    MemoryMode.FULL: 1.0,
    MemoryMode.AUTO: 1.0,
    MemoryMode.MODEL_OFFLOAD: 1.5,
    MemoryMode.SEQUENTIAL_OFFLOAD: 6.0,
}
DEFAULT_SPEED = 1.0  # megapixel-steps/s, when nothing at all is known yet
LOAD_BYTES_PER_SECOND = 1.0 * 2**30  # a cold load's guess: 1 GiB/s from disk


def expected_speed(device: str, model: str, known: Mapping[str, Mapping[str, Speed]]) -> float:
    """Megapixel-steps/s of `model` on `device`. `known` maps each device to
    its measured speeds. Unmeasured: the model's mean over devices, scaled by
    how this device compares with others on models both have run."""
    mine = known.get(device, {})
    if model in mine:
        return mine[model].megapixel_steps_per_second
    others = [
        speeds[model].megapixel_steps_per_second for speeds in known.values() if model in speeds
    ]
    model_mean = sum(others) / len(others) if others else None
    ratios = []
    for name, speed in mine.items():
        peers = [s[name].megapixel_steps_per_second for s in known.values() if name in s]
        ratios.append(speed.megapixel_steps_per_second / (sum(peers) / len(peers)))
    device_factor = sum(ratios) / len(ratios) if ratios else 1.0
    if model_mean is not None:
        return model_mean * device_factor
    return DEFAULT_SPEED * device_factor


def run_seconds(work_megapixel_steps: float, speed: float, mode: MemoryMode) -> float:
    return work_megapixel_steps / max(speed, 1e-9) * MODE_SLOWDOWN[mode]


def load_seconds(device_speeds: Mapping[str, Speed], model: str, weight_bytes: int) -> float:
    """The cold load of `model`: as last measured, or guessed from its size."""
    known = device_speeds.get(model)
    if known is not None and known.load_seconds > 0:
        return known.load_seconds
    return weight_bytes / LOAD_BYTES_PER_SECOND
