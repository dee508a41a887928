"""Placement benchmark: sdmesh against the load balancers people use today,
side by side on one fixed, seeded workload, in virtual time.

    python -m bench.placement            # 5 seeds, median of each figure

The workload: 600 jobs, 60% SD1.5 at 512 px / 20 steps, 30% SDXL at 1024 px
/ 30 steps, 10% a FLUX-class model of about 23 GiB at 1024 px / 28 steps;
three users sharing 70/20/10; Poisson arrivals at 90% of the cluster's
capacity with two 5x bursts; cold loads of 3, 8 and 20 s. The cluster: one
80 GiB card at speed 2.0, two 24 GiB at 1.0 and two 12 GiB at 0.5.

- round_robin: the Fooocus multi-instance balancer; an out-of-memory is
  retried on the next card.
- least_busy: SwarmUI's choice of the least busy backend with the model.
- round_robin+offload, least_busy+offload: the same, over backends that
  offload a model that does not fit instead of failing (ComfyUI's and
  Forge's "lowvram" memory management), so they never run out of memory
  but run such jobs slowly.
- sdmesh: the scheduler's own queue policy, placement and estimator, driven
  through the same functions the dispatcher calls. It starts knowing no
  speeds and no memory figures: agents report weight sizes only.

Out-of-memory failures are decided by the simulated cards' true peaks
(gpu_node/profiles.py), which sdmesh never reads.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Protocol

if __package__ in (None, ""):
    # Run as a file (`python bench/NAME.py`): make the repository importable,
    # as `python -m bench.NAME` does.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.simulation import (
    GIB,
    Engine,
    LeastBusy,
    LeastBusyOffload,
    Outcome,
    RoundRobin,
    RoundRobinOffload,
    Run,
    SimGpu,
    SimJob,
)
from gpu_node.profiles import PROFILES, run_seconds
from scheduler.attempt_state import ActiveAttempt, bound, count_by_owner
from scheduler.cluster import Cluster
from scheduler.dispatcher import queue_demands
from scheduler.domain import Job
from scheduler.estimator import EstimateBook, EstimateKey
from scheduler.placement import Placed, plan, shape_of
from scheduler.states import JobState
from sdmesh.domain import DeviceInfo, DeviceStats, ModelInfo, NodeInfo
from sdmesh.spec import JobSpec, MemoryMode

CARDS = [(80, 2.0), (24, 1.0), (24, 1.0), (12, 0.5), (12, 0.5)]
CLASSES = [("sd15", 512, 20, 0.6), ("sdxl", 1024, 30, 0.3), ("flux", 1024, 28, 0.1)]
USERS = [("heavy", 0.7), ("medium", 0.2), ("light", 0.1)]
JOBS = 600
LOAD = 0.9
BURSTS = ((0.25, 0.04), (0.60, 0.04))  # (start, length) as shares of the horizon; 5x rate
MAX_ATTEMPTS = 3
SEEDS = (1, 2, 3, 4, 5)
RESULTS = Path(__file__).resolve().parent / "results" / "placement.json"


def workload(seed: int) -> list[SimJob]:
    rng = random.Random(seed)
    mean_service = sum(
        share * run_seconds(PROFILES[m], size, size, 1, steps, MemoryMode.FULL, 1.0)
        for m, size, steps, share in CLASSES
    )
    rate = LOAD * sum(speed for _, speed in CARDS) / mean_service  # jobs per second
    horizon = JOBS / rate
    jobs, now = [], 0.0
    for number in range(JOBS):
        burst = any(start * horizon <= now < (start + length) * horizon for start, length in BURSTS)
        now += rng.expovariate(rate * (5 if burst else 1))
        pick, user = rng.random(), rng.random()
        model, size, steps, _ = next(c for c in _cumulative(CLASSES) if pick < c[3])
        owner = next(u for u, limit in _cumulative_users() if user < limit)
        jobs.append(SimJob(f"j{number:04d}", owner, model, size, steps, now))
    return jobs


def _cumulative(classes: list[tuple[str, int, int, float]]) -> list[tuple[str, int, int, float]]:
    total, out = 0.0, []
    for model, size, steps, share in classes:
        total += share
        out.append((model, size, steps, total))
    out[-1] = (*out[-1][:3], 1.01)
    return out


def _cumulative_users() -> list[tuple[str, float]]:
    total, out = 0.0, []
    for user, share in USERS:
        total += share
        out.append((user, total))
    out[-1] = (out[-1][0], 1.01)
    return out


class Sdmesh:
    """The scheduler's decisions, from the same functions the dispatcher
    uses: `queue_demands` (queue policy and estimates) and `plan`."""

    name = "sdmesh"
    keeps_several = True  # the agent keeps several models per card while they fit

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.book = EstimateBook()
        self.cluster = Cluster()
        models = tuple(ModelInfo(m, PROFILES[m].weight_bytes, "float16") for m, *_ in CLASSES)
        # What each simulated node holds, as the scheduler's attempts' owner
        # keeps it: node id -> job id -> attempt.
        self.held: dict[str, dict[str, ActiveAttempt]] = {}
        for gpu in engine.gpus:
            info = NodeInfo(
                f"g{gpu.index}",
                f"{gpu.total_bytes // GIB}GiB-{gpu.index}",
                "sim",
                "bench",
                (
                    DeviceInfo(
                        0,
                        f"{gpu.total_bytes // GIB} GiB",
                        f"SIM-{gpu.index}",
                        "cuda",
                        gpu.total_bytes,
                    ),
                ),
                models,
            )
            self.cluster.connect(info, 0.0)
            self.held[info.node_id] = {}
        self.queued: dict[str, Job] = {}
        self.sim_jobs: dict[str, SimJob] = {}
        self.learned_shapes: set[EstimateKey] = set()
        self.oom_after_learning = 0

    def _report(self, gpu: SimGpu) -> None:
        """What the agent's stats message would say now."""
        free = gpu.free_bytes()
        resident = tuple(
            ModelInfo(model, PROFILES[model].weight_bytes, "float16") for model in gpu.resident
        )
        stats = DeviceStats(0, gpu.total_bytes, free, gpu.total_bytes - free, 100.0 if gpu.running else 0.0,
                            resident, dict(gpu.speeds.speeds))  # fmt: skip
        self.cluster.report_stats(f"g{gpu.index}", [stats], self.engine.now, 256 * GIB)

    def _job(self, sim: SimJob) -> Job:
        spec = JobSpec(prompt="p", negative_prompt="", model=sim.model, width=sim.size, height=sim.size,
                       steps=sim.steps, cfg_scale=7.0, seed=0, sampler_name="Euler a", batch_size=1)  # fmt: skip
        now = self.engine.now
        return Job(sim.id, sim.owner, spec, JobState.QUEUED, sim.failures, sim.failures, MAX_ATTEMPTS,
                   created_at=sim.arrival, updated_at=now)  # fmt: skip

    def arrive(self, job: SimJob) -> None:
        self.sim_jobs[job.id] = job
        self.queued[job.id] = self._job(job)
        self.dispatch()

    def dispatch(self) -> None:
        now = self.engine.now
        for gpu in self.engine.gpus:
            self._report(gpu)
        if not self.queued:
            return
        held = {node_id: list(attempts.values()) for node_id, attempts in self.held.items()}
        by_owner = count_by_owner(a for attempts in held.values() for a in attempts)
        decisions = plan(
            queue_demands(
                list(self.queued.values()), self.cluster.models(), by_owner, self.book, now
            ),
            self.cluster.gpu_views(now, held),
        )
        for demand, decision in decisions:
            if not isinstance(decision, Placed):
                continue
            job = self.queued.pop(demand.job_id)
            gpu = self.engine.gpus[int(decision.gpu.node_id[1:])]
            self.held[f"g{gpu.index}"][job.id] = bound(job, job.attempt + 1, decision, now)
            run = Run(self.sim_jobs[job.id], decision.need.mode, decision.need.vram_bytes)
            self.engine.bind(gpu, run)
            self._started(gpu)

    def _started(self, gpu: SimGpu) -> None:
        if gpu.running is not None:
            active = self.held[f"g{gpu.index}"].get(gpu.running.job.id)
            if active is not None and active.started_at is None:
                active.started_at = self.engine.now

    def finished(self, outcome: Outcome) -> None:
        gpu, run = outcome.gpu, outcome.run
        active = self.held[f"g{gpu.index}"].pop(run.job.id)
        key = shape_of(active.spec).key(run.mode)
        if outcome.out_of_memory and key in self.learned_shapes:
            self.oom_after_learning += 1
        self.book.learn(shape_of(active.spec), run.mode, out_of_memory=outcome.out_of_memory,
                        peak_bytes=outcome.peak_bytes, estimate_bytes=run.estimate_bytes)  # fmt: skip
        self.learned_shapes.add(key)
        if outcome.out_of_memory:
            run.job.failures += 1
            if run.job.failures >= MAX_ATTEMPTS:
                run.job.failed = True
            else:
                self.queued[run.job.id] = self._job(run.job)
        self._started(gpu)
        self.dispatch()


class Policy(Protocol):
    name: str

    def arrive(self, job: SimJob) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...


def simulate(policy_type: type[Policy], seed: int) -> dict[str, float | None]:
    engine = Engine(CARDS, keeps_several=getattr(policy_type, "keeps_several", False))
    policy = policy_type(engine)  # type: ignore[call-arg]
    engine.on_finish = policy.finished
    jobs = workload(seed)
    for job in jobs:
        engine.at(job.arrival, lambda job=job: policy.arrive(job))  # type: ignore[misc]
    engine.run()
    lost = [job.id for job in jobs if job.finished is None and not job.failed]
    if lost:
        raise RuntimeError(f"{policy_type.name}: {len(lost)} jobs never ended, e.g. {lost[0]}")
    done = [job for job in jobs if job.finished is not None]
    waits = sorted(job.started - job.arrival for job in done if job.started is not None)
    makespan = max(job.finished for job in done if job.finished is not None)
    by_user = {
        user: statistics.mean(
            j.started - j.arrival for j in done if j.owner == user and j.started is not None
        )
        for user, _ in USERS
    }
    return {
        "makespan_s": makespan,
        "p50_wait_s": statistics.median(waits),
        "p95_wait_s": waits[int(0.95 * (len(waits) - 1))],
        "oom_failures": engine.oom_failures,
        # Only sdmesh learns: out-of-memory failures on a job shape it had
        # already seen run or fail.
        "oom_after_learning": getattr(policy, "oom_after_learning", None),
        "failed_jobs": sum(job.failed for job in jobs),
        "model_loads": engine.model_loads,
        "gpu_utilization": sum(g.busy_seconds for g in engine.gpus) / (makespan * len(engine.gpus)),
        # The light user's mean wait over the heavy user's: about 1 when
        # everyone waits in one line, lower when a light user is not stuck
        # behind a heavy user's backlog.
        "fairness_ratio": by_user["light"] / by_user["heavy"],
    }


class SdmeshOneModel(Sdmesh):
    """sdmesh on cards that keep one model each: what keeping several saves."""

    name = "sdmesh, one model per card"
    keeps_several = False


POLICIES: list[type[Any]] = [
    RoundRobin,
    LeastBusy,
    RoundRobinOffload,
    LeastBusyOffload,
    SdmeshOneModel,
    Sdmesh,
]


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _cell(column: str, value: float | None) -> str:
    if value is None:  # not measured for this policy
        return "-"
    if column in ("gpu_utilization", "fairness_ratio"):
        return f"{value:.2f}"
    if column.endswith("_s"):
        return f"{value:.0f}"
    return f"{value:.0f}"


def table(medians: dict[str, dict[str, float | None]]) -> str:
    """A Markdown table, for the terminal and for BENCHMARKS.md alike."""
    lines = ["| policy | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in medians.items():
        lines.append(f"| {name} | " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


COLUMNS = ["makespan_s", "p50_wait_s", "p95_wait_s", "oom_failures", "oom_after_learning",
           "failed_jobs", "model_loads", "gpu_utilization", "fairness_ratio"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    medians: dict[str, dict[str, float | None]] = {}
    for policy in POLICIES:
        runs = []
        for seed in args.seeds:
            runs.append(simulate(policy, seed))
            print(f"  {policy.name} seed {seed}: done", file=sys.stderr)
        medians[policy.name] = {c: _median([r[c] for r in runs]) for c in COLUMNS}
    print(f"median of {len(args.seeds)} seeds; {JOBS} jobs; cards (GiB, speed) {CARDS}")
    print(table(medians))

    def ratio(column: str, baseline: str) -> float:
        ours, theirs = medians["sdmesh"][column], medians[baseline][column]
        assert ours is not None
        assert theirs is not None
        return ours / theirs

    targets = {
        "makespan <= 0.7x round_robin": ratio("makespan_s", "round_robin") <= 0.7,
        "makespan <= 0.9x least_busy": ratio("makespan_s", "least_busy") <= 0.9,
        "p95 wait <= 0.7x round_robin": ratio("p95_wait_s", "round_robin") <= 0.7,
        "p95 wait <= 0.9x least_busy": ratio("p95_wait_s", "least_busy") <= 0.9,
        "no OOM after learning": medians["sdmesh"]["oom_after_learning"] == 0,
    }
    for baseline in ("round_robin", "least_busy"):
        print(
            f"sdmesh / {baseline}: makespan {ratio('makespan_s', baseline):.2f}x, "
            f"p95 wait {ratio('p95_wait_s', baseline):.2f}x"
        )
    for target, met in targets.items():
        print(f"  {'met' if met else 'MISSED'}: {target}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"seeds": args.seeds, "policies": medians, "targets": targets}, indent=2) + "\n"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
