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

# How much slower each memory mode runs than full (weights cross the bus),
# until a device has measured it for a model.
MODE_SLOWDOWN = {
    MemoryMode.FULL: 1.0,
    MemoryMode.AUTO: 1.0,
    MemoryMode.MODEL_OFFLOAD: 1.5,
    MemoryMode.SEQUENTIAL_OFFLOAD: 6.0,
}
DEFAULT_SPEED = 1.0  # megapixel-steps/s, when nothing at all is known yet
LOAD_BYTES_PER_SECOND = 1.0 * 2**30  # a cold load's guess: 1 GiB/s from disk


class SpeedModel:
    """Expected speeds over one snapshot of the cluster's measured speeds.
    Each model's mean and each device's factor are worked out once, when
    first asked for, so a placement pass costs what it asks, not GPUs x
    GPUs. `known` maps each device to its measured speeds."""

    def __init__(self, known: Mapping[str, Mapping[str, Speed]]) -> None:
        self.known = known
        self._means: dict[str, float | None] = {}
        self._factors: dict[str, float] = {}
        self._fastest: dict[str, float] | None = None
        self._top_factor = 0.0

    def model_mean(self, model: str) -> float | None:
        if model not in self._means:
            found = [
                speeds[model].megapixel_steps_per_second
                for speeds in self.known.values()
                if model in speeds and speeds[model].megapixel_steps_per_second > 0
            ]
            self._means[model] = sum(found) / len(found) if found else None
        return self._means[model]

    def device_factor(self, device: str) -> float:
        """How this device compares with the others, on the models it ran."""
        if device not in self._factors:
            ratios = []
            for name, speed in self.known.get(device, {}).items():
                mean = self.model_mean(name)
                if mean and speed.megapixel_steps_per_second > 0:
                    ratios.append(speed.megapixel_steps_per_second / mean)
            self._factors[device] = sum(ratios) / len(ratios) if ratios else 1.0
        return self._factors[device]

    def prepare(self) -> dict[str, float]:
        """One pass over the table: every device's factor, and each model's
        fastest measured speed. Done once, before any decision needs it."""
        if self._fastest is None:
            top: dict[str, float] = {}
            top_factor = 0.0
            for device, speeds in self.known.items():
                top_factor = max(top_factor, self.device_factor(device))
                for name, speed in speeds.items():
                    top[name] = max(top.get(name, 0.0), speed.megapixel_steps_per_second)
            self._fastest, self._top_factor = top, top_factor
        return self._fastest

    def fastest(self, model: str) -> float:
        """No device runs `model` faster than this, measured or expected."""
        measured = self.prepare().get(model, 0.0)
        mean = self.model_mean(model)
        expected = (DEFAULT_SPEED if mean is None else mean) * self._top_factor
        return max(measured, expected)

    def speed(self, device: str, model: str) -> float:
        """Megapixel-steps/s of `model` on `device`. Unmeasured: the
        model's mean over devices, scaled by how this device compares with
        others on models both have run."""
        mine = self.known.get(device)
        if mine is not None and model in mine and mine[model].megapixel_steps_per_second > 0:
            return mine[model].megapixel_steps_per_second
        mean = self.model_mean(model)
        return (DEFAULT_SPEED if mean is None else mean) * self.device_factor(device)

    def run_seconds(self, device: str, model: str, work: float, mode: MemoryMode) -> float:
        """Seconds `work` megapixel-steps take on `device` in `mode`: at the
        speed measured in that mode there, else at the full-mode speed with
        the mode's default slowdown."""
        return seconds_at((self.known.get(device) or {}).get(model), work, mode) or run_seconds(
            work, self.speed(device, model), mode
        )


def seconds_at(speed: Speed | None, work: float, mode: MemoryMode) -> float | None:
    """Seconds `work` takes at a device's measured `speed` in `mode`, or
    None when that mode (or, offloaded, full mode) was never measured."""
    if speed is None:
        return None
    measured = speed.in_mode(mode)
    if measured > 0:
        return work / measured
    if speed.megapixel_steps_per_second > 0:
        return run_seconds(work, speed.megapixel_steps_per_second, mode)
    return None


def expected_speed(device: str, model: str, known: Mapping[str, Mapping[str, Speed]]) -> float:
    """Megapixel-steps/s of `model` on `device` (see `SpeedModel`)."""
    return SpeedModel(known).speed(device, model)


def run_seconds(work_megapixel_steps: float, speed: float, mode: MemoryMode) -> float:
    return work_megapixel_steps / max(speed, 1e-9) * MODE_SLOWDOWN[mode]


def load_seconds(device_speeds: Mapping[str, Speed], model: str, weight_bytes: int) -> float:
    """The cold load of `model`: as last measured, or guessed from its size."""
    known = device_speeds.get(model)
    if known is not None and known.load_seconds > 0:
        return known.load_seconds
    return weight_bytes / LOAD_BYTES_PER_SECOND
