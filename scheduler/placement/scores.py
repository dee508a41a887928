"""Scores: how good a GPU that passed the filters is for a job, each on a
fixed 0-100 scale, combined by weights.

- finish: expected finish time (work already bound there, a cold load if
  the model is not resident, and the job's own run at that GPU's measured
  speed in the chosen mode), relative to the best candidate;
- resident: the share of the job's weights already loaded there: its base
  model, and its LoRAs and ControlNets;
- fit: VRAM left after placement, best fit scoring highest, so big cards
  stay free for big jobs;
- utilization: how idle the GPU is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scheduler.estimator import Need
from scheduler.placement.timing import SpeedModel, load_seconds
from scheduler.placement.views import Demand, GpuView

WEIGHTS = {"finish": 5.0, "resident": 2.0, "fit": 1.0, "utilization": 1.0}


@dataclass(frozen=True)
class Candidate:
    gpu: GpuView
    need: Need
    run_seconds: float  # its own run, with a cold load if needed
    finish_seconds: float  # after the work already bound there


def candidate(demand: Demand, gpu: GpuView, need: Need, speeds: SpeedModel) -> Candidate:
    seconds = speeds.run_seconds(gpu.key, demand.model, demand.work, need.mode)
    if demand.model not in gpu.resident:
        seconds += load_seconds(gpu.speeds, demand.model, demand.weight_bytes)
    for extra in demand.extras:
        if (extra.kind, extra.name) not in gpu.resident_extras:
            seconds += load_seconds(gpu.speeds, extra.name, extra.weight_bytes)
    return Candidate(gpu, need, seconds, gpu.busy_seconds + seconds)


def finish_score(candidate: Candidate, best_finish_seconds: float) -> float:
    # the soonest candidate scores 100; one that finishes twice as late, 50
    return 100.0 * max(best_finish_seconds, 1e-9) / max(candidate.finish_seconds, 1e-9)


def resident_score(demand: Demand, gpu: GpuView) -> float:
    # The share of the job's weights already loaded: an SDXL base (6.5 GiB)
    # resident, its ControlNet (2.5 GiB) not: 100 x 6.5 / 9 = 72. With a
    # size unknown (0), each part counts the same.
    parts = [(demand.model in gpu.resident, demand.weight_bytes)]
    parts += [
        ((extra.kind, extra.name) in gpu.resident_extras, extra.weight_bytes)
        for extra in demand.extras
    ]
    if len(parts) == 1:
        return 100.0 if parts[0][0] else 0.0
    if any(weight <= 0 for _, weight in parts):
        return 100.0 * sum(1 for loaded, _ in parts if loaded) / len(parts)
    return 100.0 * sum(weight for loaded, weight in parts if loaded) / demand.all_weight_bytes


def fit_score(gpu: GpuView, need: Need) -> float:
    # 24 GiB card, 14 GiB free, needs 9 GiB: 100 x (1 - 5/24) = 79
    left = max(0, gpu.room_bytes - need.vram_bytes)
    return 100.0 * (1.0 - left / max(gpu.total_bytes, 1))


def utilization_score(gpu: GpuView) -> float:
    return 100.0 - min(100.0, max(0.0, gpu.utilization_percent))


def scores(demand: Demand, option: Candidate, best_finish_seconds: float) -> dict[str, float]:
    return {
        "finish": finish_score(option, best_finish_seconds),
        "resident": resident_score(demand, option.gpu),
        "fit": fit_score(option.gpu, option.need),
        "utilization": utilization_score(option.gpu),
    }


_TOTAL_WEIGHT = sum(WEIGHTS.values())


def combined_score(demand: Demand, option: Candidate, best_finish_seconds: float) -> float:
    """`combine(scores(...))` without building the parts: the same sum in
    the same order, so the same float, at a fraction of the cost."""
    return (
        WEIGHTS["finish"] * finish_score(option, best_finish_seconds)
        + WEIGHTS["resident"] * resident_score(demand, option.gpu)
        + WEIGHTS["fit"] * fit_score(option.gpu, option.need)
        + WEIGHTS["utilization"] * utilization_score(option.gpu)
    ) / _TOTAL_WEIGHT


def combine(parts: Mapping[str, float]) -> float:
    return sum(WEIGHTS[name] * value for name, value in parts.items()) / sum(WEIGHTS.values())
