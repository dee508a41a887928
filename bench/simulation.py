"""A discrete-event simulation of GPUs running Stable Diffusion jobs, in
virtual time, for the placement benchmark.

Cards behave as the agent's simulated GPUs do (`gpu_node.profiles`): a job
is charged its true peak memory, runs out of memory at its first step when
the peak does not fit, and takes steps x per-step time scaled by pixels and
card speed, plus a cold load when its model is not resident. Policies decide
which card a job goes to; the engine does the rest and keeps the books.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gpu_node.profiles import CUDA_CONTEXT_BYTES, PROFILES, run_seconds, true_peak
from scheduler.estimator import MODES
from sdmesh.spec import MemoryMode
from sdmesh.speeds import SpeedTable

GIB = 2**30


@dataclass
class SimJob:
    id: str
    owner: str
    model: str
    size: int  # width = height
    steps: int
    arrival: float
    failures: int = 0
    tried: set[int] = field(default_factory=set)  # cards it ran out of memory on
    started: float | None = None  # the start of the attempt that succeeded
    finished: float | None = None
    failed: bool = False


@dataclass
class Run:
    """One attempt bound to a card."""

    job: SimJob
    mode: MemoryMode = MemoryMode.FULL
    estimate_bytes: int = 0
    started: float | None = None
    # The backend manages memory itself, as ComfyUI's and Forge's "lowvram"
    # do: a model that does not fit fully runs offloaded instead of failing.
    backend_offloads: bool = False


@dataclass
class SimGpu:
    index: int
    total_bytes: int
    speed: float
    # Models whose weights are on the card, least recently used first. A
    # card keeps several while they fit beside the job that runs
    # (`keeps_several`, as sdmesh's agent does), or one, as a web UI does.
    resident: list[str] = field(default_factory=list)
    keeps_several: bool = False
    waiting: deque[Run] = field(default_factory=deque)  # bound, not started
    running: Run | None = None
    busy_seconds: float = 0.0
    speeds: SpeedTable = field(default_factory=SpeedTable)

    @property
    def usable_bytes(self) -> int:
        return self.total_bytes - CUDA_CONTEXT_BYTES

    @property
    def load(self) -> int:
        return len(self.waiting) + (self.running is not None)

    def free_bytes(self) -> int:
        """What NVML would report: the resident weights and the running
        job's allocations are in use."""
        weights = {model: PROFILES[model].weight_bytes for model in self.resident}
        used = sum(weights.values())
        if self.running is not None and self.running.started is not None:
            run = self.running
            # Its peak holds its own weights when they are resident.
            peak = true_peak(PROFILES[run.job.model], run.job.size, run.job.size, 1, run.mode)
            used += peak - weights.get(run.job.model, 0)
        return self.usable_bytes - used


@dataclass
class Outcome:
    gpu: SimGpu
    run: Run
    out_of_memory: bool
    peak_bytes: int  # the peak, or what the card had when it ran out
    load_seconds: float
    step_seconds: float


class Engine:
    def __init__(self, cards: list[tuple[int, float]], *, keeps_several: bool = False) -> None:
        self.gpus = [
            SimGpu(i, size * GIB, speed, keeps_several=keeps_several)
            for i, (size, speed) in enumerate(cards)
        ]
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = 0
        self.model_loads = 0
        self.oom_failures = 0
        self.on_finish: Callable[[Outcome], None] = lambda outcome: None

    def at(self, time: float, action: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (time, self._sequence, action))

    def run(self) -> None:
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()

    def bind(self, gpu: SimGpu, run: Run) -> None:
        gpu.waiting.append(run)
        self.start_next(gpu)

    def start_next(self, gpu: SimGpu) -> None:
        if gpu.running is not None or not gpu.waiting:
            return
        run = gpu.running = gpu.waiting.popleft()
        job, profile = run.job, PROFILES[run.job.model]
        if run.backend_offloads:
            run.mode = next(
                (
                    mode
                    for mode in MODES
                    if true_peak(profile, job.size, job.size, 1, mode) <= gpu.usable_bytes
                ),
                MemoryMode.FULL,
            )
        full = run.mode is MemoryMode.FULL
        load = 0.0
        if not (full and job.model in gpu.resident):
            load = profile.load_seconds
            self.model_loads += 1
        run.started = self.now + load
        peak = true_peak(profile, job.size, job.size, 1, run.mode)
        # Idle models give way, least recently used first, while the job
        # would not fit beside them.
        others = (
            [model for model in gpu.resident if model != job.model] if gpu.keeps_several else []
        )
        while others and sum(PROFILES[m].weight_bytes for m in others) + peak > gpu.usable_bytes:
            others.pop(0)
        gpu.resident = others + ([job.model] if full else [])
        work = run_seconds(profile, job.size, job.size, 1, job.steps, run.mode, gpu.speed)
        step = work / job.steps
        out_of_memory = peak > gpu.usable_bytes
        duration = load + (step if out_of_memory else work)
        gpu.busy_seconds += duration
        outcome = Outcome(
            gpu, run, out_of_memory, gpu.usable_bytes if out_of_memory else peak, load, step
        )
        self.at(self.now + duration, lambda: self._finish(outcome))

    def _finish(self, outcome: Outcome) -> None:
        gpu, run = outcome.gpu, outcome.run
        gpu.running = None
        if outcome.out_of_memory:
            self.oom_failures += 1
            run.job.tried.add(gpu.index)
        else:
            run.job.started = run.started
            run.job.finished = self.now
            if run.mode is MemoryMode.FULL:
                size = run.job.size
                gpu.speeds.record(
                    run.job.model, size, size, 1, outcome.step_seconds, outcome.load_seconds
                )
        self.on_finish(outcome)
        self.start_next(gpu)


class RoundRobin:
    """The Fooocus multi-instance load balancer: each job goes to the next
    backend in turn, and an out-of-memory is retried on the next one."""

    name = "round_robin"
    backend_offloads = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.turn = 0

    def run(self, job: SimJob) -> Run:
        return Run(job, backend_offloads=self.backend_offloads)

    def arrive(self, job: SimJob) -> None:
        gpu = self.engine.gpus[self.turn % len(self.engine.gpus)]
        self.turn += 1
        self.engine.bind(gpu, self.run(job))

    def finished(self, outcome: Outcome) -> None:
        if outcome.out_of_memory:
            gpus = self.engine.gpus
            self.engine.bind(gpus[(outcome.gpu.index + 1) % len(gpus)], self.run(outcome.run.job))


class LeastBusy:
    """SwarmUI's way: skip backends without the model and take the least
    busy one; an out-of-memory goes to the least busy card not yet tried."""

    name = "least_busy"
    backend_offloads = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _pick(self, job: SimJob) -> SimGpu:
        untried = [g for g in self.engine.gpus if g.index not in job.tried] or self.engine.gpus
        return min(untried, key=lambda g: (g.load, g.index))

    def arrive(self, job: SimJob) -> None:
        self.engine.bind(self._pick(job), Run(job, backend_offloads=self.backend_offloads))

    def finished(self, outcome: Outcome) -> None:
        if outcome.out_of_memory:
            job = outcome.run.job
            self.engine.bind(self._pick(job), Run(job, backend_offloads=self.backend_offloads))


class RoundRobinOffload(RoundRobin):
    """Round-robin over backends that offload a model that does not fit, as
    Fooocus's and ComfyUI's "lowvram" memory management does."""

    name = "round_robin+offload"
    backend_offloads = True


class LeastBusyOffload(LeastBusy):
    """Least-busy over ComfyUI backends that offload a model that does not fit."""

    name = "least_busy+offload"
    backend_offloads = True
