"""How fast a model runs on a device, as agents measure it and report it in
every stats message.

Speed is measured in megapixel-steps per second: a 512x512 image is 0.26
megapixels, so 20 steps of it are 5.2 megapixel-steps. Each device worker
folds every finished job into its `SpeedTable`; the scheduler turns speeds
into expected seconds (`scheduler.placement.timing`).

Pure code: no I/O and no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sdmesh.spec import MemoryMode

MEGAPIXEL = 1_000_000
SMOOTHING = 0.3  # weight of the newest measurement


@dataclass(frozen=True)
class Speed:
    megapixel_steps_per_second: float  # in full memory mode; 0 when never measured
    load_seconds: float = 0.0  # the last cold load seen; 0 when never measured
    samples: int = 0
    # The offloaded modes, measured like full mode once a job ran so; 0 until then.
    model_offload_megapixel_steps_per_second: float = 0.0
    sequential_offload_megapixel_steps_per_second: float = 0.0

    def in_mode(self, mode: MemoryMode) -> float:
        """Megapixel-steps/s in `mode`; 0 when that mode was never measured."""
        if mode is MemoryMode.MODEL_OFFLOAD:
            return self.model_offload_megapixel_steps_per_second
        if mode is MemoryMode.SEQUENTIAL_OFFLOAD:
            return self.sequential_offload_megapixel_steps_per_second
        return self.megapixel_steps_per_second


def _blend(old: float, measured: float) -> float:
    return measured if old <= 0 else (1 - SMOOTHING) * old + SMOOTHING * measured


def megapixel_steps(width: int, height: int, batch_size: int, steps: int) -> float:
    return width * height * batch_size * steps / MEGAPIXEL


class SpeedTable:
    """One device's measured speeds, per model."""

    def __init__(self) -> None:
        self.speeds: dict[str, Speed] = {}

    def record(
        self,
        model: str,
        width: int,
        height: int,
        batch_size: int,
        mean_step_seconds: float,
        load_seconds: float,
        mode: MemoryMode = MemoryMode.FULL,
    ) -> Speed | None:
        """Folds in one finished job, measured in memory mode `mode`. A
        cold load counts in full mode only: offloaded weights load to host
        memory."""
        if mean_step_seconds <= 0:
            return None
        measured = megapixel_steps(width, height, batch_size, 1) / mean_step_seconds
        old = self.speeds.get(model) or Speed(0.0)
        if mode is MemoryMode.MODEL_OFFLOAD:
            was = old.model_offload_megapixel_steps_per_second
            speed = replace(old, model_offload_megapixel_steps_per_second=_blend(was, measured))
        elif mode is MemoryMode.SEQUENTIAL_OFFLOAD:
            was = old.sequential_offload_megapixel_steps_per_second
            speed = replace(
                old, sequential_offload_megapixel_steps_per_second=_blend(was, measured)
            )
        else:
            speed = replace(
                old,
                megapixel_steps_per_second=_blend(old.megapixel_steps_per_second, measured),
                load_seconds=load_seconds or old.load_seconds,
                samples=old.samples + 1,
            )
        self.speeds[model] = speed
        return speed
