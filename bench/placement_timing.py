"""One dispatch pass of `bench.scale`'s placement section, in process and
timed decision by decision, as `Dispatcher.dispatch_once` makes it: the
queue index in policy order turned into demands, the GPU views, a
`Planner`, then `plan` over the demands. Also what scoring only a sample
of the free GPUs costs in placement quality.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import scheduler.placement.planner as planner_module
from gpu_node.profiles import PROFILES
from scheduler.cluster import Cluster
from scheduler.domain import Job
from scheduler.estimator import EstimateBook
from scheduler.placement import Decision, Demand, Placed, Planner, demand_for, plan
from scheduler.queue import QueueIndex
from scheduler.states import JobState
from sdmesh.domain import DeviceInfo, DeviceStats, ModelInfo, NodeInfo
from sdmesh.spec import JobSpec
from sdmesh.speeds import Speed

GIB, MIB = 2**30, 2**20
USERS = [f"user-{n}" for n in range(1, 6)]

CARD_MIX = [(80, 2.0), (24, 1.0), (24, 1.0), (12, 0.5), (12, 0.5)]
CLASSES = [("sd15", 512, 20)] * 6 + [("sdxl", 1024, 30)] * 3 + [("flux", 1024, 28)]
GPUS_PER_NODE = 8
QUEUED = 1000


def placement_cluster(gpus: int, learned: bool) -> Cluster:
    cluster = Cluster()
    models = tuple(ModelInfo(m, PROFILES[m].weight_bytes, "float16") for m in PROFILES)
    for first in range(0, gpus, GPUS_PER_NODE):
        devices, stats = [], []
        for index in range(min(GPUS_PER_NODE, gpus - first)):
            size, speed = CARD_MIX[(first + index) % len(CARD_MIX)]
            total = size * GIB
            devices.append(DeviceInfo(index, f"{size} GiB", f"SIM-{first + index}", "cuda", total))
            speeds = {
                m: Speed(speed / p.seconds_per_megapixel_step, p.load_seconds, 5)
                for m, p in PROFILES.items()
            }
            stats.append(DeviceStats(index, total, total - 400 * MIB, 400 * MIB, 0.0, (),
                                     speeds if learned else {}))  # fmt: skip
        info = NodeInfo(f"n{first}", f"node-{first}", "sim", "bench", tuple(devices), models)
        cluster.connect(info, 0.0)
        cluster.report_stats(info.node_id, stats, 0.0, 256 * GIB)
    return cluster


def queued_jobs() -> list[Job]:
    jobs = []
    for number in range(QUEUED):
        model, size, steps = CLASSES[number % len(CLASSES)]
        spec = JobSpec(prompt="p", negative_prompt="", model=model, width=size, height=size,
                       steps=steps, cfg_scale=7.0, seed=0, sampler_name="Euler a", batch_size=1)  # fmt: skip
        jobs.append(Job(f"j{number:04d}", USERS[number % len(USERS)], spec, JobState.QUEUED,
                        0, 0, 3, created_at=number * 0.01, updated_at=number * 0.01))  # fmt: skip
    return jobs


def stamped(demands: list[Demand], stamps: list[float], budget: float) -> Iterator[Demand]:
    """The demands, noting when each is taken; ends after `budget` s."""
    for demand in demands:
        stamps.append(time.perf_counter())
        if stamps[-1] - stamps[0] > budget:
            return
        yield demand


def time_plan(
    gpus: int, learned: bool, budget: float
) -> tuple[dict[str, Any], list[tuple[Demand, Decision]]]:
    """One dispatch pass as `Dispatcher.dispatch_once` makes it: the queue
    index in policy order turned into demands, the GPU views, a Planner,
    then `plan` over the demands, with each decision timed."""
    cluster, book, now = placement_cluster(gpus, learned), EstimateBook(), 100.0
    queue = QueueIndex()
    queue.load(queued_jobs())
    start = time.perf_counter()
    weights = cluster.models()
    demands = [
        replace(demand_for(job.id, job.spec, weights.get(job.spec.model, 0), book),
                waited_seconds=now - job.updated_at)
        for job in queue.ordered({})
    ]  # fmt: skip
    ordered = time.perf_counter()
    planner = Planner(cluster.gpu_views(now, {}))
    planned = time.perf_counter()
    stamps: list[float] = []
    decisions = plan(stamped(demands, stamps, budget), (), planner=planner)
    end = time.perf_counter()
    cut = len(stamps) > len(decisions) and stamps[-1] - stamps[0] > budget  # by the budget
    stamps = [*stamps[: len(decisions)], end]
    took = sorted(1000 * (b - a) for a, b in itertools.pairwise(stamps)) or [0.0]
    plan_ms = 1000 * (end - planned)
    if cut:  # the rest of the pass, at the mean so far
        plan_ms *= min(len(demands), 2 * gpus) / max(len(decisions), 1)
    stats = {
        "gpus": gpus,
        "decisions": len(decisions),
        "placed": sum(isinstance(d, Placed) for _, d in decisions),
        "p50": took[len(took) // 2],
        "p99": took[int(0.99 * (len(took) - 1))],
        "mean": statistics.mean(took),
        "max": took[-1],
        "demands_ms": 1000 * (ordered - start),
        "planner_ms": 1000 * (planned - ordered),
        "pass_ms": 1000 * (planned - start) + plan_ms,
        "complete": not cut,
    }
    return stats, decisions


def sampling_quality() -> dict[str, Any]:
    """What scoring a sample of the free GPUs costs in placement quality, at
    1,000 GPUs with speeds learned: the pass as it is, and with the sample
    as large as the cluster. finish_s: a placed job's expected finish."""
    out: dict[str, Any] = {}
    at_least = planner_module.SAMPLE_AT_LEAST
    for case, size in (("sampled", at_least), ("every_gpu", 10**9)):
        planner_module.SAMPLE_AT_LEAST = size
        try:
            stats, decisions = time_plan(1000, True, 1e9)
        finally:
            planner_module.SAMPLE_AT_LEAST = at_least
        placed = [d for _, d in decisions if isinstance(d, Placed)]
        finish = [d.gpu.busy_seconds + d.expected_seconds for d in placed]
        out[case] = {"placed": len(placed), "mean_finish_s": statistics.mean(finish),
                     "max_finish_s": max(finish), "mean_score": statistics.mean(d.score for d in placed),
                     "pass_ms": stats["pass_ms"], "p50": stats["p50"]}  # fmt: skip
    out["finish_ratio"] = out["sampled"]["mean_finish_s"] / out["every_gpu"]["mean_finish_s"]
    return out
