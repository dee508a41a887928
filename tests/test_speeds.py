"""Measured speeds and expected run times."""

from __future__ import annotations

import pytest

from scheduler.placement.timing import (
    MODE_SLOWDOWN,
    SpeedModel,
    expected_speed,
    load_seconds,
    run_seconds,
)
from sdmesh.spec import MemoryMode
from sdmesh.speeds import Speed, SpeedTable, megapixel_steps


def test_a_job_is_measured_in_megapixel_steps_per_second() -> None:
    table = SpeedTable()
    # 512 x 512 x 1 = 0.262 MP; 0.1 s a step -> 2.62 MP-steps/s
    speed = table.record("sd15", 512, 512, 1, 0.1, 3.0)
    assert speed is not None
    assert speed.megapixel_steps_per_second == pytest.approx(2.62144)
    assert (speed.load_seconds, speed.samples) == (3.0, 1)
    # The next measurement is blended in: 0.7 x 2.62 + 0.3 x 5.24 = 3.41
    again = table.record("sd15", 512, 512, 1, 0.05, 0.0)
    assert again is not None
    assert again.megapixel_steps_per_second == pytest.approx(0.7 * 2.62144 + 0.3 * 5.24288)
    assert again.load_seconds == 3.0  # kept: this run was warm
    assert table.record("sd15", 512, 512, 1, 0.0, 0.0) is None


def test_run_time_by_mode() -> None:
    work = megapixel_steps(1024, 1024, 1, 30)  # 31.5 MP-steps
    assert work == pytest.approx(31.45728)
    assert run_seconds(work, 2.0, MemoryMode.FULL) == pytest.approx(15.72864)
    assert run_seconds(work, 2.0, MemoryMode.MODEL_OFFLOAD) == pytest.approx(15.72864 * 1.5)


def test_unmeasured_speeds_are_guessed_from_the_others() -> None:
    known = {
        "a": {"sd15": Speed(2.0), "sdxl": Speed(1.0)},
        "b": {"sd15": Speed(4.0)},
        "c": {},
    }
    assert expected_speed("a", "sd15", known) == 2.0  # measured
    # b is 4 / mean(2, 4) = 1.33x on sd15; sdxl's mean is 1.0 -> 1.33
    assert expected_speed("b", "sdxl", known) == pytest.approx(4 / 3)
    # c has run nothing: the model's mean, 1.0
    assert expected_speed("c", "sdxl", known) == 1.0
    # nobody has run flux: 1.0, scaled by a's factor on its models (2/3 and 1/1)
    assert expected_speed("a", "flux", known) == pytest.approx((2 / 3 + 1.0) / 2)


def test_cold_loads_as_measured_or_guessed_from_size() -> None:
    assert load_seconds({"sdxl": Speed(1.0, 8.0, 1)}, "sdxl", 7 * 2**30) == 8.0
    assert load_seconds({}, "sdxl", 7 * 2**30) == 7.0  # 1 GiB/s


def test_offloaded_modes_are_measured_and_used_once_known() -> None:
    table = SpeedTable()
    # 512x512 is 0.262 MP: 0.5 s a step in full mode, 2 s model-offloaded.
    table.record("sdxl", 512, 512, 1, 0.5, 3.0)
    speed = table.record("sdxl", 512, 512, 1, 2.0, 0.0, MemoryMode.MODEL_OFFLOAD)
    assert speed is not None
    assert speed.megapixel_steps_per_second == pytest.approx(0.262144 / 0.5)
    assert speed.model_offload_megapixel_steps_per_second == pytest.approx(0.262144 / 2.0)
    assert (speed.load_seconds, speed.samples) == (3.0, 1)  # offloaded runs leave these
    assert speed.sequential_offload_megapixel_steps_per_second == 0.0
    model = SpeedModel({"gpu": table.speeds})
    work = 0.262144 * 20
    # Measured: 4x slower than full here, not the 1.5x default.
    assert model.run_seconds("gpu", "sdxl", work, MemoryMode.MODEL_OFFLOAD) == pytest.approx(40.0)
    # Not measured: full speed with the mode's default slowdown.
    assert model.run_seconds("gpu", "sdxl", work, MemoryMode.SEQUENTIAL_OFFLOAD) == pytest.approx(
        10.0 * MODE_SLOWDOWN[MemoryMode.SEQUENTIAL_OFFLOAD]
    )
    # A device that ran the model only offloaded has no full speed to share.
    only = SpeedTable()
    only.record("sdxl", 512, 512, 1, 2.0, 0.0, MemoryMode.MODEL_OFFLOAD)
    assert SpeedModel({"a": only.speeds}).model_mean("sdxl") is None
