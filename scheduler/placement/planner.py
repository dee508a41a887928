"""Where each queued job goes in this pass: filter, score, pick; charge the
pick to its GPU before the next job; hold a GPU for a job that has waited
too long.

A pass costs what it can change, not what exists:
- it stops as soon as no GPU can take another job (every slot bound or
  held): the jobs behind cannot be placed this pass, and why each waits is
  worked out when someone asks (`Planner.why`);
- it scores only GPUs with a free slot, and in a large cluster only a
  bounded, rotating sample of them (Kubernetes' `percentageOfNodesToScore`);
- a job that cannot be placed is remembered by its shape until some GPU's
  view changes, so a queue of a thousand alike jobs costs one evaluation;
- speeds are compared through one `SpeedModel` per pass.

A placement may grow into a batch (`Batcher`): alike queued jobs that run
with it in one pipeline call; they are charged with it and skipped after.

Pure code over snapshots: no I/O and no clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from scheduler.config import RESERVE_AFTER_SECONDS
from scheduler.estimator import format_bytes
from scheduler.placement.filters import STATIC_FILTERS, fitting_need, rejection
from scheduler.placement.scores import Candidate, candidate, combine, combined_score, scores
from scheduler.placement.timing import SpeedModel, run_seconds
from scheduler.placement.views import (
    MAX_ACTIVE_PER_GPU,
    Decision,
    Demand,
    GpuView,
    Placed,
    Rejection,
    Reserved,
    Unplaced,
)
from sdmesh.kinds import ModelKind
from sdmesh.spec import MemoryMode

# A job waits for a busy GPU when it would finish there in at most this
# share of the time a free GPU would take.
PATIENCE = 0.8
# In a cluster larger than this, a decision scores a sample of the GPUs that
# can take the job now: at least this many, or SAMPLE_SHARE of them. The
# sample rotates, so every GPU is looked at in turn. bench/scale.py
# measures what it costs in placement quality.
SAMPLE_AT_LEAST = 256
SAMPLE_SHARE = 0.05


def summarize(total: int, rejections: Sequence[Rejection]) -> str:
    """ "0/4 GPUs: 3 insufficient VRAM (needs 9.1 GiB, 7.8 GiB free), 1 draining" """
    if total == 0:
        return "no GPUs connected"
    counts = Counter(r.kind for r in rejections)
    example = {r.kind: r.detail for r in reversed(rejections)}
    parts = [
        f"{count} {kind}" + (f" ({example[kind]})" if example[kind] else "")
        for kind, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]
    return f"0/{total} GPUs: " + ", ".join(parts)


def speed_model(gpus: Iterable[GpuView]) -> SpeedModel:
    return SpeedModel({gpu.key: gpu.speeds for gpu in gpus})


def place(
    demand: Demand,
    gpus: Sequence[GpuView],
    every_gpu: Sequence[GpuView] | None = None,
    *,
    speeds: SpeedModel | None = None,
    total: int | None = None,
) -> Decision:
    """The best GPU among `gpus` for the job. `every_gpu` (default: `gpus`)
    is what speeds are compared across; `total`, how many GPUs the
    explanation says were considered."""
    if speeds is None:
        speeds = speed_model(every_gpu if every_gpu is not None else gpus)
    options: list[Candidate] = []
    rejections: list[Rejection] = []
    for gpu in gpus:
        found = rejection(demand, gpu)
        if found is not None:
            rejections.append(found)
            continue
        need = fitting_need(demand, gpu)
        assert need is not None  # memory_fits passed
        options.append(candidate(demand, gpu, need, speeds))
    if not options:
        return Unplaced(summarize(len(gpus), rejections), tuple(rejections))
    best_finish = min(option.finish_seconds for option in options)
    chosen = min(
        options,
        key=lambda o: (-combined_score(demand, o, best_finish), o.gpu.node_id, o.gpu.index),
    )
    parts = scores(demand, chosen, best_finish)
    score = combine(parts)
    gpu, need = chosen.gpu, chosen.need
    explanation = (
        f"{gpu.name} in {need.mode.value} mode, score {score:.0f} "
        f"(finish {parts['finish']:.0f}, resident {parts['resident']:.0f}, "
        f"fit {parts['fit']:.0f}, utilization {parts['utilization']:.0f}); "
        f"needs {format_bytes(need.vram_bytes)} of {format_bytes(gpu.room_bytes)} free"
        f"{' (learned)' if need.learned else ''}; expected {chosen.run_seconds:.1f}s "
        f"after {gpu.busy_seconds:.1f}s of bound work; "
        f"{len(options)}/{len(gpus) if total is None else total} GPUs fit"
    )
    return Placed(gpu, need, chosen.run_seconds, score, explanation)


def _later(demand: Demand, gpu: GpuView, speeds: SpeedModel) -> Candidate | None:
    """The job on this GPU once the work bound to it is done, if it would
    fit then: finishing after that work, in the best mode that fits."""
    if rejection(demand, gpu, STATIC_FILTERS) is not None:
        return None
    need = fitting_need(demand, gpu)
    return None if need is None else candidate(demand, gpu, need, speeds)


def _soonest_later(
    demand: Demand, gpus: Iterable[GpuView], speeds: SpeedModel, before: float = math.inf
) -> Candidate | None:
    """The GPU that would finish the job soonest after its bound work,
    among those that could finish it within `before` seconds."""
    best: Candidate | None = None
    for gpu in gpus:
        # Its bound work plus the job at full speed, with no load: no GPU
        # finishes sooner than that, so most are ruled out here.
        floor = gpu.busy_seconds + run_seconds(
            demand.work, speeds.speed(gpu.key, demand.model), MemoryMode.FULL
        )
        if floor > before:
            continue
        option = _later(demand, gpu, speeds)
        if option is None or option.finish_seconds > before:
            continue
        if best is None or (option.finish_seconds, gpu.node_id, gpu.index) < (
            best.finish_seconds,
            best.gpu.node_id,
            best.gpu.index,
        ):
            best = option
    return best


def _charge(gpu: GpuView, demand: Demand, placed: Placed) -> GpuView:
    return replace(
        gpu,
        active_jobs=gpu.active_jobs + 1,
        free_bytes=gpu.free_bytes - placed.need.vram_bytes,
        bound_bytes=gpu.bound_bytes + placed.need.vram_bytes,
        busy_seconds=gpu.busy_seconds + placed.expected_seconds,
        # Workers keep several models while they fit: after the bound work,
        # this one (and its ControlNets) too when it runs in full mode.
        resident=gpu.resident | {demand.model}
        if placed.need.mode is MemoryMode.FULL
        else gpu.resident,
        resident_extras=gpu.resident_extras | kept_extras(demand)
        if placed.need.mode is MemoryMode.FULL
        else gpu.resident_extras,
    )


def kept_extras(demand: Demand) -> frozenset[tuple[str, str]]:
    """The job's models a worker keeps loaded after it: its ControlNets.
    LoRAs are unloaded after every job, so none leaks into the next."""
    return frozenset(
        (extra.kind, extra.name) for extra in demand.extras if extra.kind is ModelKind.CONTROLNET
    )


def _takes_now(gpu: GpuView) -> bool:
    return gpu.healthy and not gpu.draining and gpu.active_jobs < MAX_ACTIVE_PER_GPU


def sample_size(count: int) -> int:
    """How many GPUs that can take a job now one decision scores."""
    return max(SAMPLE_AT_LEAST, math.ceil(count * SAMPLE_SHARE))


Shape = tuple[object, ...]

# Grows a placement into a batch: given the job placed, its placement and
# the jobs already taken this pass, the placement with its partners, as it
# was, or Unplaced while the job waits for a partner. See
# scheduler/batching.py.
Batcher = Callable[[Demand, Placed, set[str]], Decision]


def _shape(demand: Demand) -> Shape:
    """What a job's feasibility depends on: alike jobs share one verdict."""
    return (demand.model, demand.needs, tuple(sorted(demand.selector.items())), demand.extras)


class Planner:
    """One pass: places jobs in queue order against one snapshot, charging
    each placement to its GPU's view before the next job is considered.

    A job also stays queued when a GPU that is busy now would still finish
    it sooner than any free one (an SDXL job waits for the 24 GiB card rather
    than crawl offloaded on a 12 GiB one); its expected run is charged to
    that GPU, so the jobs behind it see the queue forming there.

    A job that fits nowhere does not hold up the ones behind it, unless it
    has waited `reserve_after_seconds`: then the GPU that would finish it
    soonest is held for it."""

    def __init__(
        self,
        gpus: Sequence[GpuView],
        *,
        reserve_after_seconds: float = RESERVE_AFTER_SECONDS,
        batcher: Batcher | None = None,
    ) -> None:
        self.reserve_after_seconds = reserve_after_seconds
        self.batcher = batcher
        self.taken: set[str] = set()  # jobs placed this pass, leading a batch or in one
        self.views = {gpu.key: gpu for gpu in gpus}
        self.speeds = speed_model(gpus)
        self.speeds.prepare()
        self.held: set[str] = set()
        self._taking = [key for key, gpu in self.views.items() if _takes_now(gpu)]
        self._cursor = 0  # where the next sample starts
        self._later_cursor = 0
        # Shapes no GPU can take now. Views only lose room and slots as a
        # pass goes on, so a shape stays unplaceable for the rest of it.
        self._unplaced: dict[Shape, Unplaced] = {}
        self._why: dict[Shape, Decision] = {}  # likewise
        self._busy = {key: None for key, gpu in self.views.items() if self._is_busy(gpu)}
        # No busy GPU has less bound work than this; it only grows in a
        # pass, so an old floor is still a floor.
        self._busy_floor = min((self.views[key].busy_seconds for key in self._busy), default=0.0)

    @property
    def open(self) -> bool:
        """Whether any GPU could take a job now."""
        return bool(self._taking)

    def _update(self, gpu: GpuView) -> None:
        self.views[gpu.key] = gpu
        if self._is_busy(gpu) and gpu.key not in self._busy:
            self._busy[gpu.key] = None
            self._busy_floor = min(self._busy_floor, gpu.busy_seconds)
        self._why.clear()
        if not _takes_now(gpu) and gpu.key in self._taking:
            self._taking.remove(gpu.key)

    def _hold(self, gpu: GpuView) -> None:
        self.held.add(gpu.key)
        self._busy.pop(gpu.key, None)
        self._why.clear()
        if gpu.key in self._taking:
            self._taking.remove(gpu.key)

    def _sample(self) -> list[GpuView]:
        """The GPUs with a free slot this decision scores."""
        keys, size = self._taking, sample_size(len(self._taking))
        if len(keys) <= size:
            return [self.views[key] for key in keys]
        start = self._cursor % len(keys)
        self._cursor = start + size
        picked = keys[start : start + size] + keys[: max(0, start + size - len(keys))]
        return [self.views[key] for key in picked]

    def _is_busy(self, gpu: GpuView) -> bool:
        """Cannot take a job now but will: its slots are bound, not held."""
        return gpu.key not in self.held and gpu.healthy and not gpu.draining and not _takes_now(gpu)

    def _busy_sample(self, demand: Demand, before: float) -> list[GpuView]:
        """Busy GPUs worth asking whether waiting for one would be better:
        none when even the least busy one at the fastest speed any GPU has
        for the model could not finish within `before` (in a cluster of
        alike cards, the usual case); else all of them, or a rotating
        sample in a large cluster."""
        if not self._busy:
            return []
        fastest = self.speeds.fastest(demand.model)
        if self._busy_floor + run_seconds(demand.work, fastest, MemoryMode.FULL) > before:
            return []
        busy = [self.views[key] for key in self._busy]
        size = sample_size(len(busy))
        if len(busy) <= size:
            return busy
        start = self._later_cursor % len(busy)
        self._later_cursor = start + size
        return busy[start : start + size] + busy[: max(0, start + size - len(busy))]

    def why(self, demand: Demand) -> Decision:
        """Why a job waits, against the views as the pass left them; for a
        job the pass did not reach."""
        shape = _shape(demand)
        if shape not in self._why:
            unheld = [gpu for key, gpu in self.views.items() if key not in self.held]
            self._why[shape] = place(demand, unheld, speeds=self.speeds)
        return self._why[shape]

    def decide(self, demand: Demand) -> Decision:
        remembered = self._unplaced.get(_shape(demand))
        if remembered is not None:
            return self._unplaced_or_held(demand, remembered)
        sample = self._sample()
        decision = place(demand, sample, speeds=self.speeds, total=len(self.views))
        if not isinstance(decision, Placed) and len(sample) < len(self._taking):
            # Nothing in the sample fits: look at every GPU that could.
            taking = [self.views[key] for key in self._taking]
            decision = place(demand, taking, speeds=self.speeds, total=len(self.views))
        if isinstance(decision, Placed):
            now_finish = decision.gpu.busy_seconds + decision.expected_seconds
            before = PATIENCE * now_finish
            later = _soonest_later(
                demand, self._busy_sample(demand, before), self.speeds, before=before
            )
            if later is not None:
                gpu = later.gpu
                self._update(replace(gpu, busy_seconds=gpu.busy_seconds + later.run_seconds))
                return Unplaced(
                    f"waiting for {gpu.name}: expected to finish there in "
                    f"{later.finish_seconds:.0f}s, against {now_finish:.0f}s on "
                    f"{decision.gpu.name} now"
                )
            if self.batcher is not None:
                grown = self.batcher(demand, decision, self.taken)
                if not isinstance(grown, Placed):
                    return grown
                decision = grown
                self.taken.add(demand.job_id)
                self.taken.update(partner.job_id for partner in decision.batch)
            self._update(_charge(decision.gpu, demand, decision))
            return decision
        # Why it waits, against every GPU, costs what the whole cluster is,
        # and most waiting jobs are never asked about: `why` works it out
        # when someone asks. The reason stays empty until then.
        unplaced = Unplaced("")
        self._unplaced[_shape(demand)] = unplaced
        return self._unplaced_or_held(demand, unplaced)

    def _unplaced_or_held(self, demand: Demand, unplaced: Unplaced) -> Decision:
        if demand.waited_seconds >= self.reserve_after_seconds:
            open_gpus = [gpu for key, gpu in self.views.items() if key not in self.held]
            later = _soonest_later(demand, open_gpus, self.speeds)
            if later is not None:
                why = self.why(demand)
                reason = why.reason if isinstance(why, Unplaced) else "fits no GPU now"
                self._hold(later.gpu)
                return Reserved(later.gpu, f"{reason}; holding {later.gpu.name} for it")
        return unplaced


def plan(
    demands: Iterable[Demand],
    gpus: Sequence[GpuView],
    *,
    reserve_after_seconds: float = RESERVE_AFTER_SECONDS,
    planner: Planner | None = None,
) -> list[tuple[Demand, Decision]]:
    """Decides jobs in queue order until no GPU can take another (see
    `Planner`); the jobs after that get no decision this pass."""
    if planner is None:
        planner = Planner(gpus, reserve_after_seconds=reserve_after_seconds)
    decisions: list[tuple[Demand, Decision]] = []
    for demand in demands:
        if not planner.open:
            break
        if demand.job_id in planner.taken:
            continue  # it rides in a batch placed earlier in this pass
        decisions.append((demand, planner.decide(demand)))
    return decisions
