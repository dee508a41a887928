"""Where each queued job goes in this pass: filter, score, pick; charge the
pick to its GPU before the next job; hold a GPU for a job that has waited
too long; and tell, at submit, whether a job could ever run at all.

Pure functions over snapshots: no I/O and no clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from scheduler.config import RESERVE_AFTER_SECONDS
from scheduler.estimator import format_bytes
from scheduler.placement.filters import (
    STATIC_FILTERS,
    fitting_need,
    rejection,
    selector_mismatch,
)
from scheduler.placement.scores import Candidate, candidate, combine, scores
from scheduler.placement.views import (
    DEVICE_RESERVE_BYTES,
    Decision,
    Demand,
    GpuView,
    Placed,
    Rejection,
    Reserved,
    Unplaced,
)
from sdmesh.spec import MemoryMode
from sdmesh.speeds import Speed

# A job waits for a busy GPU when it would finish there in at most this
# share of the time a free GPU would take.
PATIENCE = 0.8


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


def _known_speeds(gpus: Iterable[GpuView]) -> dict[str, Mapping[str, Speed]]:
    return {gpu.key: gpu.speeds for gpu in gpus}


def place(
    demand: Demand, gpus: Sequence[GpuView], every_gpu: Sequence[GpuView] | None = None
) -> Decision:
    """The best GPU among `gpus` for the job. `every_gpu` (default: `gpus`)
    is what speeds are compared across."""
    known = _known_speeds(every_gpu if every_gpu is not None else gpus)
    options: list[Candidate] = []
    rejections: list[Rejection] = []
    for gpu in gpus:
        found = rejection(demand, gpu)
        if found is not None:
            rejections.append(found)
            continue
        need = fitting_need(demand, gpu)
        assert need is not None  # memory_fits passed
        options.append(candidate(demand, gpu, need, known))
    if not options:
        return Unplaced(summarize(len(gpus), rejections), tuple(rejections))
    best_finish = min(option.finish_seconds for option in options)
    ranked = sorted(
        ((combine(scores(demand, o, best_finish)), o) for o in options),
        key=lambda pair: (-pair[0], pair[1].gpu.node_id, pair[1].gpu.index),
    )
    score, chosen = ranked[0]
    parts = scores(demand, chosen, best_finish)
    gpu, need = chosen.gpu, chosen.need
    explanation = (
        f"{gpu.name} in {need.mode.value} mode, score {score:.0f} "
        f"(finish {parts['finish']:.0f}, resident {parts['resident']:.0f}, "
        f"fit {parts['fit']:.0f}, utilization {parts['utilization']:.0f}); "
        f"needs {format_bytes(need.vram_bytes)} of {format_bytes(gpu.room_bytes)} free"
        f"{' (learned)' if need.learned else ''}; expected {chosen.run_seconds:.1f}s "
        f"after {gpu.busy_seconds:.1f}s of bound work; {len(options)}/{len(gpus)} GPUs fit"
    )
    return Placed(gpu, need, chosen.run_seconds, score, explanation)


def _later(
    demand: Demand, gpu: GpuView, known: Mapping[str, Mapping[str, Speed]]
) -> Candidate | None:
    """The job on this GPU once the work bound to it is done, if it would
    fit then: finishing after that work, in the best mode that fits."""
    if rejection(demand, gpu, STATIC_FILTERS) is not None:
        return None
    need = fitting_need(demand, gpu)
    return None if need is None else candidate(demand, gpu, need, known)


def _soonest_later(
    demand: Demand, gpus: Iterable[GpuView], known: Mapping[str, Mapping[str, Speed]]
) -> Candidate | None:
    options = [option for gpu in gpus if (option := _later(demand, gpu, known)) is not None]
    return min(
        options,
        key=lambda o: (o.finish_seconds, o.gpu.node_id, o.gpu.index),
        default=None,
    )


def _charge(gpu: GpuView, demand: Demand, placed: Placed) -> GpuView:
    return replace(
        gpu,
        active_jobs=gpu.active_jobs + 1,
        free_bytes=gpu.free_bytes - placed.need.vram_bytes,
        bound_bytes=gpu.bound_bytes + placed.need.vram_bytes,
        busy_seconds=gpu.busy_seconds + placed.expected_seconds,
        # Workers keep one model, and only in full mode: after the bound
        # work, it is this one, or none when this job runs offloaded.
        resident=frozenset({demand.model}) if placed.need.mode is MemoryMode.FULL else frozenset(),
    )


def plan(
    demands: Sequence[Demand],
    gpus: Sequence[GpuView],
    *,
    reserve_after_seconds: float = RESERVE_AFTER_SECONDS,
) -> list[tuple[Demand, Decision]]:
    """Places jobs in queue order, charging each placement to its GPU's view
    before the next job is considered.

    A job also stays queued when a GPU that is busy now would still finish
    it sooner than any free one (an SDXL job waits for the 24 GiB card rather
    than crawl offloaded on a 12 GiB one); its expected run is charged to
    that GPU, so the jobs behind it see the queue forming there.

    A job that fits nowhere does not hold up the ones behind it, unless it
    has waited `reserve_after_seconds`: then the GPU that would finish it
    soonest is held for it."""
    views = {gpu.key: gpu for gpu in gpus}
    held: set[str] = set()
    decisions: list[tuple[Demand, Decision]] = []
    for demand in demands:
        every = list(views.values())
        open_gpus = [view for key, view in views.items() if key not in held]
        decision = place(demand, open_gpus, every)
        known = _known_speeds(every)
        if isinstance(decision, Placed):
            # Only GPUs that cannot take it now: one that can was a candidate.
            busy = (v for v in open_gpus if rejection(demand, v) is not None)
            later = _soonest_later(demand, busy, known)
            now_finish = decision.gpu.busy_seconds + decision.expected_seconds
            if later is not None and later.finish_seconds <= PATIENCE * now_finish:
                gpu = later.gpu
                views[gpu.key] = replace(gpu, busy_seconds=gpu.busy_seconds + later.run_seconds)
                decision = Unplaced(
                    f"waiting for {gpu.name}: expected to finish there in "
                    f"{later.finish_seconds:.0f}s, against {now_finish:.0f}s on "
                    f"{decision.gpu.name} now"
                )
            else:
                views[decision.gpu.key] = _charge(decision.gpu, demand, decision)
        elif demand.waited_seconds >= reserve_after_seconds:
            later = _soonest_later(demand, open_gpus, known)
            if later is not None:
                held.add(later.gpu.key)
                assert isinstance(decision, Unplaced)
                decision = Reserved(
                    later.gpu, f"{decision.reason}; holding {later.gpu.name} for it"
                )
        decisions.append((demand, decision))
    return decisions


@dataclass(frozen=True)
class SeenGpu:
    """A GPU some node reported within the node memory window."""

    node_name: str
    index: int
    total_bytes: int
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Unresolvable:
    """A job no GPU seen recently could ever take: it needs `needed_bytes`
    even in its smallest memory mode `mode`, and the biggest GPU that
    matches its selector has `biggest.total_bytes`."""

    needed_bytes: int
    mode: MemoryMode
    allowed: tuple[MemoryMode, ...]
    biggest: SeenGpu

    @property
    def text(self) -> str:
        modes = ", ".join(mode.value for mode in self.allowed)
        gpu = self.biggest
        return (
            f"fits no GPU seen recently: needs at least {format_bytes(self.needed_bytes)} "
            f"({self.mode.value}; allowed modes: {modes}), and the biggest GPU is "
            f"{gpu.node_name} gpu {gpu.index} with {format_bytes(gpu.total_bytes)}"
        )


def unresolvable(demand: Demand, seen: Sequence[SeenGpu]) -> Unresolvable | None:
    """Why the job can never run on any GPU seen recently, or None when some
    GPU could take it (or none has been seen, or none matches its selector
    yet: a dedicated pool may simply not have started)."""
    matching = [gpu for gpu in seen if selector_mismatch(demand.selector, gpu.labels) is None]
    if not matching:
        return None
    smallest = min(demand.needs, key=lambda need: need.vram_bytes)
    if any(smallest.vram_bytes <= gpu.total_bytes - DEVICE_RESERVE_BYTES for gpu in matching):
        return None
    biggest = max(matching, key=lambda gpu: (gpu.total_bytes, gpu.node_name, -gpu.index))
    return Unresolvable(
        smallest.vram_bytes, smallest.mode, tuple(need.mode for need in demand.needs), biggest
    )
