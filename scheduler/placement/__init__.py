"""Placement: which GPU a job runs on, and in which memory mode. Pure code
with no I/O and no clock, in the Kubernetes scheduler's shape: filters that
say why not (with numbers), then weighted 0-100 scores."""

from scheduler.placement.demand import allowed_modes, demand_for, shape_of
from scheduler.placement.filters import FILTERS, fitting_need, rejection, selector_mismatch
from scheduler.placement.planner import Planner, place, plan, summarize
from scheduler.placement.resolvable import SeenGpu, Unresolvable, unresolvable
from scheduler.placement.scores import WEIGHTS
from scheduler.placement.views import (
    DEVICE_RESERVE_BYTES,
    MAX_ACTIVE_PER_GPU,
    Decision,
    Demand,
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
    "GpuView",
    "Placed",
    "Planner",
    "Reason",
    "Rejection",
    "Reserved",
    "SeenGpu",
    "Unplaced",
    "Unresolvable",
    "allowed_modes",
    "demand_for",
    "fitting_need",
    "place",
    "plan",
    "rejection",
    "selector_mismatch",
    "shape_of",
    "summarize",
    "unresolvable",
]
