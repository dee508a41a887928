"""Where each queued job goes in this pass: filter, score, pick; charge the
pick to its GPU before the next job; hold a GPU for a job that has waited
too long; and tell, at submit, whether a job could ever run at all.

Pure functions over snapshots: no I/O and no clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from scheduler.estimator import format_bytes
from scheduler.placement.filters import STATIC_FILTERS, fitting_need, rejection
from scheduler.placement.scores import Candidate, candidate, combine, scores
from scheduler.placement.views import (
    Decision,
    Demand,
    GpuView,
    Placed,
    Rejection,
    Reserved,
    Unplaced,
)
from scheduler.speeds import Speed

# A job that fits nowhere for this long gets a GPU held for it, so a stream
# of small jobs cannot starve it.
RESERVE_AFTER_SECONDS = 120.0


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
        return Unplaced(summarize(len(gpus), rejections))
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
        f"needs {format_bytes(need.vram_bytes)} of {format_bytes(gpu.free_bytes)} free"
        f"{' (learned)' if need.learned else ''}; expected {chosen.run_seconds:.1f}s "
        f"after {gpu.busy_seconds:.1f}s of bound work; {len(options)}/{len(gpus)} GPUs fit"
    )
    return Placed(gpu, need, chosen.run_seconds, score, explanation)


def _capacity_fits(demand: Demand, gpu: GpuView) -> bool:
    """Whether the job would fit once the work bound to the GPU is done."""
    if rejection(demand, gpu, STATIC_FILTERS) is not None:
        return False
    room = gpu.free_bytes + gpu.bound_bytes
    return any(
        need.vram_bytes <= room and need.host_bytes <= gpu.host_free_bytes for need in demand.needs
    )


def plan(
    demands: Sequence[Demand],
    gpus: Sequence[GpuView],
    *,
    reserve_after_seconds: float = RESERVE_AFTER_SECONDS,
) -> list[tuple[Demand, Decision]]:
    """Places jobs in queue order, charging each placement to its GPU's view
    before the next job is considered. A job that fits nowhere does not
    hold up the ones behind it, unless it has waited `reserve_after_seconds`:
    then the GPU that will take it soonest is held for it."""
    views = {gpu.key: gpu for gpu in gpus}
    held: set[str] = set()
    decisions: list[tuple[Demand, Decision]] = []
    for demand in demands:
        open_gpus = [view for key, view in views.items() if key not in held]
        decision = place(demand, open_gpus, list(views.values()))
        if isinstance(decision, Placed):
            gpu = decision.gpu
            views[gpu.key] = replace(
                gpu,
                active_jobs=gpu.active_jobs + 1,
                free_bytes=gpu.free_bytes - decision.need.vram_bytes,
                bound_bytes=gpu.bound_bytes + decision.need.vram_bytes,
                busy_seconds=gpu.busy_seconds + decision.expected_seconds,
                # Workers keep one model: after the bound work, it is this one.
                resident=frozenset({demand.model}),
            )
        elif demand.waited_seconds >= reserve_after_seconds:
            able = [view for view in open_gpus if _capacity_fits(demand, view)]
            if able:
                gpu = min(able, key=lambda view: (view.busy_seconds, view.node_id, view.index))
                held.add(gpu.key)
                assert isinstance(decision, Unplaced)
                decision = Reserved(gpu, f"{decision.reason}; holding {gpu.name} for it")
        decisions.append((demand, decision))
    return decisions


@dataclass(frozen=True)
class SeenGpu:
    """A GPU some node reported within the node memory window."""

    node_name: str
    index: int
    total_bytes: int
    labels: Mapping[str, str]


def unresolvable(demand: Demand, seen: Sequence[SeenGpu]) -> str | None:
    """Why the job can never run on any GPU seen recently, or None when some
    GPU could take it (or none has been seen, or none matches its selector
    yet: a dedicated pool may simply not have started)."""
    matching = [
        gpu
        for gpu in seen
        if all(gpu.labels.get(key) == value for key, value in demand.selector.items())
    ]
    if not matching:
        return None
    smallest = min(demand.needs, key=lambda need: need.vram_bytes)
    if any(smallest.vram_bytes <= gpu.total_bytes for gpu in matching):
        return None
    biggest = max(matching, key=lambda gpu: (gpu.total_bytes, gpu.node_name, -gpu.index))
    modes = ", ".join(need.mode.value for need in demand.needs)
    return (
        f"fits no GPU seen recently: needs at least {format_bytes(smallest.vram_bytes)} "
        f"({smallest.mode.value}; allowed modes: {modes}), and the biggest GPU is "
        f"{biggest.node_name} gpu {biggest.index} with {format_bytes(biggest.total_bytes)}"
    )
