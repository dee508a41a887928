"""Placement tables: filters with their reasons, the preference order, and
planning several jobs against one snapshot."""

from __future__ import annotations

import pytest

from scheduler.estimator import GIB, MIB, estimate_vram_bytes, format_bytes
from scheduler.placement import Placed, Unplaced, place, plan, rejection
from tests.factories import make_demand, make_gpu


@pytest.mark.parametrize(
    ("gpu", "kind", "detail"),
    [
        (make_gpu(healthy=False), "unhealthy", ""),
        (make_gpu(draining=True), "draining", ""),
        (make_gpu(models=("sdxl",)), "model not on node", "tiny"),
        (make_gpu(active=2), "busy", "2 jobs"),
        # needs 9.1 GiB, 7.8 free
        (make_gpu(free_gib=7.8), "insufficient memory", "needs 9.1 GiB, 7.8 GiB free"),
    ],
)
def test_each_filter_says_why(gpu: object, kind: str, detail: str) -> None:
    found = rejection(make_demand(vram_gib=9.1), gpu)  # type: ignore[arg-type]
    assert found is not None
    assert (found.kind, found.detail) == (kind, detail)


def test_a_gpu_that_fits_passes_every_filter() -> None:
    assert rejection(make_demand(vram_gib=9.1), make_gpu(free_gib=9.1, active=1)) is None


@pytest.mark.parametrize(
    ("gpus", "winner"),
    [
        # least busy first
        ([make_gpu("a", active=1), make_gpu("b", active=0)], ("b", 0)),
        # equally busy: the most memory left after placement, (24 - 1) > (12 - 1)
        ([make_gpu("a", free_gib=12), make_gpu("b", free_gib=24)], ("b", 0)),
        # a full tie breaks on node id, then GPU index
        ([make_gpu("b"), make_gpu("a", 1), make_gpu("a", 0)], ("a", 0)),
        # a busier GPU with more memory loses to an idle small one that fits
        ([make_gpu("big", free_gib=80, active=1), make_gpu("small", free_gib=2)], ("small", 0)),
    ],
)
def test_preference_order(gpus: list[object], winner: tuple[str, int]) -> None:
    decision = place(make_demand(vram_gib=1), gpus)  # type: ignore[arg-type]
    assert isinstance(decision, Placed)
    assert (decision.gpu.node_id, decision.gpu.index) == winner


def test_an_unplaced_job_gets_a_summary_with_numbers() -> None:
    gpus = [
        make_gpu("a", free_gib=7.8),
        make_gpu("b", free_gib=4),
        make_gpu("c", free_gib=6),
        make_gpu("d", draining=True),
    ]
    decision = place(make_demand(vram_gib=9.1), gpus)
    assert decision == Unplaced(
        "0/4 GPUs: 3 insufficient memory (needs 9.1 GiB, 7.8 GiB free), 1 draining"
    )
    assert place(make_demand(), []) == Unplaced("no GPUs connected")


def test_plan_charges_each_placement_before_the_next() -> None:
    # One 24 GiB GPU with two slots: 10 + 10 fit, the third job finds it busy.
    gpu = make_gpu("a", free_gib=24)
    decisions = plan([make_demand("j1", vram_gib=10), make_demand("j2", vram_gib=10),
                      make_demand("j3", vram_gib=1)], [gpu])  # fmt: skip
    assert [type(d).__name__ for _, d in decisions] == ["Placed", "Placed", "Unplaced"]
    assert decisions[2][1] == Unplaced("0/1 GPUs: 1 busy (2 jobs)")
    # Two GPUs: the second job goes to the other one, which is now less busy.
    decisions = plan([make_demand("j1"), make_demand("j2")], [make_gpu("a"), make_gpu("b")])
    assert [d.gpu.node_id for _, d in decisions if isinstance(d, Placed)] == ["a", "b"]
    # Memory left after the first job (24 - 20 = 4 GiB) is too little for the second.
    decisions = plan([make_demand("j1", vram_gib=20), make_demand("j2", vram_gib=5)], [gpu])
    assert decisions[1][1] == Unplaced(
        "0/1 GPUs: 1 insufficient memory (needs 5.0 GiB, 4.0 GiB free)"
    )


def test_first_estimate_is_weights_plus_activations_plus_margin() -> None:
    # 2 GiB + 512 * 512 * 1 * 3 KiB (768 MiB) + 512 MiB margin = 3.25 GiB
    assert estimate_vram_bytes(2 * GIB, 512, 512, 1) == 2 * GIB + 768 * MIB + 512 * MIB
    # batch 4 at 1024 px: 4 * 1024 * 1024 * 3 KiB = 12 GiB of activations
    assert estimate_vram_bytes(0, 1024, 1024, 4) == 12 * GIB + 512 * MIB
    assert format_bytes(int(9.1 * GIB)) == "9.1 GiB"
    assert format_bytes(640 * MIB) == "640 MiB"
