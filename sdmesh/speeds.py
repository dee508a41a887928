"""How fast a model runs on a device, as agents measure it and report it in
every stats message.

Speed is measured in megapixel-steps per second: a 512x512 image is 0.26
megapixels, so 20 steps of it are 5.2 megapixel-steps. Each device worker
folds every finished job into its `SpeedTable`; the scheduler turns speeds
into expected seconds (`scheduler.placement.timing`).

Pure code: no I/O and no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

MEGAPIXEL = 1_000_000
SMOOTHING = 0.3  # weight of the newest measurement


@dataclass(frozen=True)
class Speed:
    megapixel_steps_per_second: float
    load_seconds: float = 0.0  # the last cold load seen; 0 when never measured
    samples: int = 0


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
    ) -> Speed | None:
        """Folds in one finished job, measured in full memory mode."""
        if mean_step_seconds <= 0:
            return None
        measured = megapixel_steps(width, height, batch_size, 1) / mean_step_seconds
        old = self.speeds.get(model)
        if old is None:
            speed = Speed(measured, load_seconds, 1)
        else:
            blended = (1 - SMOOTHING) * old.megapixel_steps_per_second + SMOOTHING * measured
            speed = Speed(blended, load_seconds or old.load_seconds, old.samples + 1)
        self.speeds[model] = speed
        return speed
