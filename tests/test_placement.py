"""Placement tables: filters with their reasons, scores with their
arithmetic, planning several jobs against one snapshot, reservations for
jobs that wait too long, and rejection of jobs that can never run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.estimator import GIB, Need
from scheduler.placement import (
    Decision,
    GpuView,
    Placed,
    Planner,
    Reason,
    Rejection,
    Reserved,
    SeenGpu,
    Unplaced,
    place,
    plan,
    rejection,
    unresolvable,
)
from scheduler.placement.resolvable import Unresolvable
from scheduler.placement.scores import fit_score, utilization_score
from sdmesh.spec import MemoryMode
from tests.factories import make_demand, make_gpu

FULL, OFFLOAD, SEQUENTIAL = MemoryMode.FULL, MemoryMode.MODEL_OFFLOAD, MemoryMode.SEQUENTIAL_OFFLOAD


def need(mode: MemoryMode, vram_gib: float, host_gib: float = 0) -> Need:
    return Need(mode, int(vram_gib * GIB), int(host_gib * GIB))


def reason(decision: Decision) -> str:
    assert isinstance(decision, Unplaced), decision
    return decision.reason


@pytest.mark.parametrize(
    ("gpu", "kind", "detail"),
    [
        (make_gpu(healthy=False), "unhealthy", ""),
        (make_gpu(draining=True), "draining", ""),
        (make_gpu(labels={"pool": "flux"}), "selector mismatch", "pool=sdxl"),
        (make_gpu(models=("sdxl",), labels={"pool": "sdxl"}), "model not on node", "tiny"),
        (make_gpu(active=2, labels={"pool": "sdxl"}), "busy", "2 jobs"),
        # needs 9.1 GiB, 7.8 free
        (
            make_gpu(free_gib=7.8, labels={"pool": "sdxl"}),
            "insufficient VRAM",
            "needs 9.1 GiB, 7.8 GiB free",
        ),
    ],
)
def test_each_filter_says_why(gpu: GpuView, kind: str, detail: str) -> None:
    found = rejection(make_demand(vram_gib=9.1, selector={"pool": "sdxl"}), gpu)
    assert found is not None
    assert (found.kind, found.detail) == (kind, detail)


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        # 7.8 GiB free on a 24 GiB card: it may fit later, when work ends.
        (make_gpu(free_gib=7.8), Rejection(Reason.INSUFFICIENT_VRAM, int(9.1 * GIB),
                                           int(7.8 * GIB), 24 * GIB, False, "full")),
        # An 8 GiB card less the 0.5 GiB CUDA context: 7.5 < 9.1, never.
        (make_gpu(free_gib=8, total_gib=8), Rejection(Reason.INSUFFICIENT_VRAM, int(9.1 * GIB),
                                                      8 * GIB, 8 * GIB, True, "full")),
        # Two jobs bound, two slots: needs 1 slot, 0 free of 2.
        (make_gpu(active=2), Rejection(Reason.BUSY, 1, 0, 2, subject="2 jobs")),
        (make_gpu(labels={"pool": "flux"}),
         Rejection(Reason.SELECTOR_MISMATCH, unresolvable=True, subject="pool=sdxl")),
        (make_gpu(models=("sdxl",), labels={"pool": "sdxl"}),
         Rejection(Reason.MODEL_MISSING, unresolvable=True, subject="tiny")),
        (make_gpu(draining=True), Rejection(Reason.DRAINING)),
    ],
)  # fmt: skip
def test_a_rejection_carries_its_numbers_and_whether_waiting_helps(
    gpu: GpuView, expected: Rejection
) -> None:
    selector = {} if expected.reason is Reason.INSUFFICIENT_VRAM else {"pool": "sdxl"}
    if expected.reason in (Reason.BUSY, Reason.DRAINING):
        gpu = replace(gpu, labels={"pool": "sdxl"})
    assert rejection(make_demand(vram_gib=9.1, selector=selector), gpu) == expected


def test_offload_is_the_fallback_when_full_does_not_fit() -> None:
    demand = make_demand(needs=(need(FULL, 27), need(OFFLOAD, 19, 23), need(SEQUENTIAL, 5, 23)))
    # 24 GiB free: full (27) does not fit, model offload (19) does.
    placed = place(demand, [make_gpu(free_gib=24)])
    assert isinstance(placed, Placed)
    assert placed.need.mode is OFFLOAD
    # 12 GiB free: only sequential offload (5) fits.
    placed = place(demand, [make_gpu(free_gib=12, total_gib=12)])
    assert isinstance(placed, Placed)
    assert placed.need.mode is SEQUENTIAL
    # Offloaded weights live in host RAM: 23 GiB needed, 16 free.
    assert rejection(demand, make_gpu(free_gib=12, total_gib=12, host_free_gib=16)) == rejection(
        make_demand(needs=(need(SEQUENTIAL, 5, 23),)), make_gpu(free_gib=12, host_free_gib=16)
    )
    found = rejection(demand, make_gpu(free_gib=12, total_gib=12, host_free_gib=16))
    assert found is not None
    assert found.kind == "insufficient host RAM"
    # 23 GiB of weights to hold in host RAM, 16 free; the card itself would do.
    assert (found.reason, found.needed, found.available, found.unresolvable) == (
        Reason.INSUFFICIENT_HOST_RAM, 23 * GIB, 16 * GIB, False,
    )  # fmt: skip
    # A job pinned to full mode never falls back.
    pinned = make_demand(needs=(need(FULL, 27),))
    assert reason(place(pinned, [make_gpu(free_gib=24)])) == (
        "0/1 GPUs: 1 insufficient VRAM (needs 27.0 GiB, 24.0 GiB free)"
    )


@pytest.mark.parametrize(
    ("gpu", "need_gib", "expected"),
    [
        # fit = 100 x (1 - left / total)
        (make_gpu(free_gib=24, total_gib=24), 9, 100 * (1 - 15 / 24)),  # 37.5
        (make_gpu(free_gib=12, total_gib=12), 9, 100 * (1 - 3 / 12)),  # 75
        (make_gpu(free_gib=9, total_gib=80), 9, 100.0),  # a perfect fit
    ],
)
def test_fit_score_prefers_the_tightest_card(
    gpu: GpuView, need_gib: float, expected: float
) -> None:
    assert fit_score(gpu, need(FULL, need_gib)) == pytest.approx(expected)


def test_utilization_score() -> None:
    assert utilization_score(make_gpu(utilization_percent=30.0)) == 70.0


@pytest.mark.parametrize(
    ("gpus", "winner"),
    [
        # Same speed, nothing bound: the model already loaded wins
        # (finish 100 vs 3/(3+1) load guess, resident 100 vs 0).
        ([make_gpu("a"), make_gpu("b", resident=("tiny",))], "b"),
        # 2x faster card: 5 MP-steps take 2.5 s there vs 5 s (finish 100 vs 50).
        ([make_gpu("slow", speeds={"tiny": 1.0}), make_gpu("fast", speeds={"tiny": 2.0})], "fast"),
        # The fast card has 20 s of bound work: 22.5 s vs 5 s, so the idle one wins.
        (
            [
                make_gpu("slow", speeds={"tiny": 1.0}),
                make_gpu("fast", speeds={"tiny": 2.0}, busy_seconds=20.0),
            ],
            "slow",
        ),
        # Everything equal: ties break on node id, then GPU index.
        ([make_gpu("b"), make_gpu("a", 1), make_gpu("a", 0)], "a"),
    ],
)
def test_scores_pick_the_soonest_finish(gpus: list[GpuView], winner: str) -> None:
    decision = place(make_demand(work=5.0, vram_gib=1), gpus)
    assert isinstance(decision, Placed)
    assert decision.gpu.node_id == winner
    if winner == "a":
        assert decision.gpu.index == 0


def test_an_unmeasured_card_is_judged_by_how_it_does_on_other_models() -> None:
    # sd15 runs at 1.0 on "old" and 2.0 on "new": mean 1.5, so "new" is
    # 2.0 / 1.5 = 1.33x the mean. tiny's mean is 2.0 (old's), so "new" is
    # expected at 2.67 MP-steps/s: 5 MP-steps in 1.875 s, against 2.5 s on "old".
    old = make_gpu("old", speeds={"tiny": 2.0, "sd15": 1.0}, resident=("tiny",))
    new = make_gpu("new", speeds={"sd15": 2.0}, resident=("tiny",))
    decision = place(make_demand(work=5.0), [old, new])
    assert isinstance(decision, Placed)
    assert decision.gpu.node_id == "new"
    assert decision.expected_seconds == pytest.approx(1.875)
    assert "finish 100" in decision.explanation


def test_an_unplaced_job_gets_a_summary_with_numbers() -> None:
    gpus = [
        make_gpu("a", free_gib=7.8),
        make_gpu("b", free_gib=4),
        make_gpu("c", free_gib=6),
        make_gpu("d", draining=True),
    ]
    assert reason(place(make_demand(vram_gib=9.1), gpus)) == (
        "0/4 GPUs: 3 insufficient VRAM (needs 9.1 GiB, 7.8 GiB free), 1 draining"
    )
    assert reason(place(make_demand(), [])) == ("no GPUs connected")


def test_plan_charges_each_placement_before_the_next() -> None:
    # One 24 GiB GPU with two slots: 10 + 10 fit, the third job finds it busy.
    # The pass stops there: nothing else can be placed, and why the third
    # waits is worked out against the views the pass left.
    gpu = make_gpu("a", free_gib=24)
    planner = Planner([gpu])
    third = make_demand("j3", vram_gib=1)
    decisions = plan(
        [make_demand("j1", vram_gib=10), make_demand("j2", vram_gib=10), third],
        [gpu],
        planner=planner,
    )
    assert [type(d).__name__ for _, d in decisions] == ["Placed", "Placed"]
    assert not planner.open
    assert reason(planner.why(third)) == ("0/1 GPUs: 1 busy (2 jobs)")
    # A worker runs one job at a time, so the job bound second gets the
    # whole 24 GiB when its turn comes, not 24 - 20 = 4.
    decisions = plan([make_demand("j1", vram_gib=20), make_demand("j2", vram_gib=20)], [gpu])
    assert [type(d).__name__ for _, d in decisions] == ["Placed", "Placed"]
    # A GPU with 10 GiB of running work and 14 GiB free has 24 GiB of room.
    running = make_gpu("a", free_gib=14, active=1, bound_bytes=10 * GIB)
    assert reason(place(make_demand(vram_gib=25), [running])) == (
        "0/1 GPUs: 1 insufficient VRAM (needs 25.0 GiB, 24.0 GiB free)"
    )
    # Two idle GPUs: the second job goes where nothing is bound yet.
    decisions = plan([make_demand("j1"), make_demand("j2")], [make_gpu("a"), make_gpu("b")])
    assert [d.gpu.node_id for _, d in decisions if isinstance(d, Placed)] == ["a", "b"]


def test_a_small_job_is_not_held_behind_a_big_one() -> None:
    gpus = [make_gpu("a", free_gib=12, total_gib=12)]
    decisions = plan([make_demand("big", vram_gib=20), make_demand("small", vram_gib=2)], gpus)
    assert isinstance(decisions[0][1], Unplaced)  # fits nowhere right now
    assert isinstance(decisions[1][1], Placed)


def test_a_job_that_waited_too_long_gets_a_gpu_held_for_it() -> None:
    # The big card's two slots are taken (20 GiB, 30 s of work); the small
    # card has 12 GiB of room. The 18 GiB job fits the big card once its
    # bound work is done.
    busy_big = make_gpu("big", free_gib=4, active=2, bound_bytes=20 * GIB, busy_seconds=30.0)
    busy_small = make_gpu("small", free_gib=8, total_gib=12, active=1, bound_bytes=4 * GIB)
    demands = [
        make_demand("starving", vram_gib=18, waited_seconds=600.0),
        make_demand("small", vram_gib=2),
    ]
    decisions = plan(demands, [busy_big, busy_small], reserve_after_seconds=120.0)
    held = decisions[0][1]
    assert isinstance(held, Reserved)
    assert held.gpu.node_id == "big"
    assert held.reason.endswith("holding host-big gpu 0 for it")
    # The small job may not use the held card; it goes to the other one.
    placed = decisions[1][1]
    assert isinstance(placed, Placed)
    assert placed.gpu.node_id == "small"
    # Before the bound wait it holds nothing.
    fresh = [
        make_demand("starving", vram_gib=18, waited_seconds=10.0),
        make_demand("small", vram_gib=2),
    ]
    assert isinstance(plan(fresh, [busy_big, busy_small])[0][1], Unplaced)


SEEN = [
    SeenGpu("small", 0, 4 * GIB, {}),
    SeenGpu("big", 0, 16 * GIB, {"pool": "sdxl"}),
    SeenGpu("big", 1, 16 * GIB, {"pool": "sdxl"}),
]


def test_a_job_no_gpu_could_ever_take_is_rejected() -> None:
    pinned_full = make_demand(needs=(need(FULL, 20),))
    problem = unresolvable(pinned_full, SEEN)
    assert isinstance(problem, Unresolvable)
    assert (problem.needed_bytes, problem.mode, problem.biggest) == (20 * GIB, FULL, SEEN[1])
    assert problem.text == (
        "fits no GPU seen recently: needs at least 20.0 GiB (full; allowed modes: full), "
        "and the biggest GPU is big gpu 0 with 16.0 GiB"
    )
    # With offload allowed, 20 GiB full still has a 12 GiB model-offload way in.
    auto = make_demand(needs=(need(FULL, 20), need(OFFLOAD, 12, 16)))
    assert unresolvable(auto, SEEN) is None
    # A selector narrows the GPUs that count; one nobody has yet waits.
    assert unresolvable(make_demand(vram_gib=6, selector={"pool": "sdxl"}), SEEN) is None
    assert unresolvable(make_demand(vram_gib=6, selector={"pool": "flux"}), SEEN) is None
    assert unresolvable(make_demand(vram_gib=6), []) is None


def test_a_job_waits_for_a_busy_gpu_that_would_still_finish_it_sooner() -> None:
    # 30 MP-steps. The fast card runs them at 3.0 but has 5 s of bound work:
    # 5 + 10 = 15 s. The slow card is free but runs at 0.5: 60 s. 15 <= 0.8 x 60,
    # so the job waits, and its run is charged to the fast card.
    fast = make_gpu("fast", speeds={"tiny": 3.0}, resident=("tiny",), active=2, busy_seconds=5.0)
    slow = make_gpu("slow", speeds={"tiny": 0.5}, resident=("tiny",))
    demands = [make_demand(f"j{n}", work=30.0) for n in range(1, 6)]
    decisions = [decision for _, decision in plan(demands, [fast, slow])]
    assert reason(decisions[0]) == (
        "waiting for host-fast gpu 0: expected to finish there in 15s, "
        "against 60s on host-slow gpu 0 now"
    )
    # Each waiting job lengthens the line: 25 s, 35 s, 45 s are still <= 48 s;
    # the fifth would finish there after 55 s, so it takes the slow card now.
    assert [type(d).__name__ for d in decisions] == ["Unplaced"] * 4 + ["Placed"]
    fifth = decisions[4]
    assert isinstance(fifth, Placed)
    assert fifth.gpu.node_id == "slow"


def test_a_job_never_waits_for_a_gpu_it_could_have_now() -> None:
    # Both cards are free and fit. The roomy one would finish sooner (10 MP-steps
    # at 1.3: 7.7 s, under 0.8 x 10 s), but the tight one scores higher: its
    # model is resident and it fits best. Waiting for a card that is free now
    # would leave it idle for good, so the job is placed.
    tight = make_gpu("tight", free_gib=2, total_gib=2, resident=("tiny",), speeds={"tiny": 1.0})
    roomy = make_gpu("roomy", free_gib=80, total_gib=80, speeds={"tiny": 1.3})
    [(_, decision)] = plan([make_demand(vram_gib=1.9, work=10.0)], [tight, roomy])
    assert isinstance(decision, Placed)
    assert decision.gpu.node_id == "tight"


def test_a_large_cluster_scores_a_rotating_sample() -> None:
    # 600 idle GPUs: each decision scores 256 of them (SAMPLE_AT_LEAST), and
    # the next decision's sample starts where the last one ended.
    gpus = [make_gpu(f"n{i:03d}") for i in range(600)]
    planner = Planner(gpus)
    first = planner.decide(make_demand("j1"))
    second = planner.decide(make_demand("j2"))
    assert isinstance(first, Placed) and isinstance(second, Placed)
    assert first.explanation.endswith("256/600 GPUs fit")
    assert first.gpu.node_id < "n256" <= second.gpu.node_id
    # A job only the last GPU can take is still found outside the sample.
    only_last = [*gpus[:-1], make_gpu("n599", models=("rare",))]
    decision = Planner(only_last).decide(make_demand("j3", model="rare"))
    assert isinstance(decision, Placed) and decision.gpu.node_id == "n599"


def test_alike_jobs_that_fit_nowhere_share_one_verdict() -> None:
    planner = Planner([make_gpu("a", free_gib=4, total_gib=4)])
    first = planner.decide(make_demand("j1", vram_gib=8))
    assert isinstance(first, Unplaced)
    assert planner.decide(make_demand("j2", vram_gib=8)) is first
    # Views only lose room as the pass goes on: it stays unplaceable. Why
    # it waits is worked out when asked, against the views as they are.
    assert isinstance(planner.decide(make_demand("small", vram_gib=1)), Placed)
    assert planner.decide(make_demand("j3", vram_gib=8)) is first
    assert first.reason == ""
    assert reason(planner.why(make_demand("j3", vram_gib=8))) == (
        "0/1 GPUs: 1 insufficient VRAM (needs 8.0 GiB, 4.0 GiB free)"
    )
