"""Placement: which GPU a job runs on, and in which memory mode. Pure code
with no I/O and no clock, in the Kubernetes scheduler's shape: filters that
say why not (with numbers), then weighted 0-100 scores."""

from scheduler.placement.demand import (
    Weights,
    allowed_modes,
    demand_for,
    extras_of,
    shape_of,
    variant_of,
    work_of,
)
from scheduler.placement.filters import FILTERS, fitting_need, rejection, selector_mismatch
from scheduler.placement.planner import Planner, kept_extras, place, plan, summarize
from scheduler.placement.resolvable import (
    MissingTogether,
    Problem,
    SeenGpu,
    Unresolvable,
    unresolvable,
)
from scheduler.placement.scores import WEIGHTS
from scheduler.placement.views import (
    DEVICE_RESERVE_BYTES,
    MAX_ACTIVE_PER_GPU,
    Decision,
    Demand,
    ExtraModel,
    GpuView,
    Placed,
    Reason,
    Rejection,
    Reserved,
    Unplaced,
)

__all__ = [
    "DEVICE_RESERVE_BYTES",
    "FILTERS",
    "MAX_ACTIVE_PER_GPU",
    "WEIGHTS",
    "Decision",
    "Demand",
    "ExtraModel",
    "GpuView",
    "MissingTogether",
    "Placed",
    "Planner",
    "Problem",
    "Reason",
    "Rejection",
    "Reserved",
    "SeenGpu",
    "Unplaced",
    "Unresolvable",
    "Weights",
    "allowed_modes",
    "demand_for",
    "extras_of",
    "fitting_need",
    "kept_extras",
    "place",
    "plan",
    "rejection",
    "selector_mismatch",
    "shape_of",
    "summarize",
    "unresolvable",
    "variant_of",
    "work_of",
]
