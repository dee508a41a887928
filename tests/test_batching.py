"""Cross-request batching in the scheduler: a placed job takes alike queued
jobs with it, while their VRAM fits and up to the image limit; unlike jobs
never join; a job may wait a bounded time for a partner."""

from __future__ import annotations

from scheduler.batching import BatchPolicy, QueueBatcher
from scheduler.domain import Job
from scheduler.estimator import GIB, EstimateBook
from scheduler.placement import Demand, Placed, Planner, Unplaced, demand_for, plan
from scheduler.queue import QueueIndex
from sdmesh.kinds import LoraWeight
from tests.factories import make_gpu, make_queued_job

WEIGHT = 2 * GIB


def job(job_id: str, created_at: float, owner: str = "alice", **spec: object) -> Job:
    return make_queued_job(job_id, owner, created_at, **spec)


def run(
    jobs: list[Job],
    free_gib: float = 24,
    policy: BatchPolicy | None = None,
    active: dict[str, int] | None = None,
) -> list[object]:
    index, book = QueueIndex(), EstimateBook()
    for queued in jobs:
        index.add(queued)

    def demand(queued: Job) -> Demand:
        return demand_for(queued.id, queued.spec, WEIGHT, book, waited_seconds=0.0)

    batcher = QueueBatcher(
        policy or BatchPolicy(max_images=4),
        index,
        book,
        lambda _: WEIGHT,
        demand,
        active,
    )
    gpus = [make_gpu(name, free_gib=free_gib, total_gib=free_gib) for name in ("a", "b")]
    planner = Planner(gpus, batcher=batcher)
    lead_first = (demand(j) for j in index.ordered({}))  # the lead: the oldest job
    return [d for _, d in plan(lead_first, (), planner=planner)]


def members(decision: object) -> list[str]:
    assert isinstance(decision, Placed)
    return [p.job_id for p in decision.batch]


def test_alike_jobs_ride_with_the_first_up_to_the_image_limit() -> None:
    jobs = [job(f"j{n}", n, prompt=f"prompt {n}", seed=n) for n in range(6)]
    jobs.append(job("other-size", 2.5, width=128))
    decisions = run(jobs)
    # j0 takes j1..j3 (4 images); the other size is not alike; then j4 takes j5.
    assert members(decisions[0]) == ["j1", "j2", "j3"]
    first = decisions[0]
    assert isinstance(first, Placed)
    assert first.explanation.endswith("batched with 3 alike job(s), 4 images")
    assert [members(d) for d in decisions[1:]] == [[], ["j5"]]


def test_image_counts_add_up_and_vram_bounds_the_batch() -> None:
    jobs = [job("a", 0, batch_size=2), job("b", 1, batch_size=3), job("c", 2, batch_size=2)]
    # b would make 5 images: skipped; c makes 4.
    assert members(run(jobs)[0]) == ["c"]
    # At 512 px each image needs 0.75 GiB besides 2 GiB of weights and a
    # 0.5 GiB margin: 4.5 GiB of room holds two (4.0 GiB), not three (4.75).
    big = [job(f"j{n}", n, width=512, height=512) for n in range(4)]
    assert members(run(big, free_gib=4.5)[0]) == ["j1"]


def test_batching_off_and_a_bounded_wait_for_a_partner() -> None:
    alike = [job("j0", 0), job("j1", 1)]
    assert members(run(alike, policy=BatchPolicy(max_images=1))[0]) == []
    lonely = run([job("solo", 0)], policy=BatchPolicy(max_images=4, wait_seconds=5.0))
    assert isinstance(lonely[0], Unplaced)
    assert lonely[0].reason == "waiting up to 5s for an alike job to batch with"


def test_partners_take_turns_between_users() -> None:
    # Alice's a0 leads. Her backlog is older, but she has jobs on GPUs and
    # Bob has none: Bob's alike job rides first, then Alice's oldest.
    jobs = [job(f"a{n}", n) for n in range(6)] + [job("b0", 10, owner="bob")]
    assert members(run(jobs, active={"alice": 2})[0]) == ["b0", "a1", "a2"]


SHA = "ab" * 32


def test_jobs_of_different_kinds_never_share_a_batch() -> None:
    jobs = [
        job("t0", 0),
        job("i0", 1, init_image=SHA),
        job("t1", 2),
        job("m0", 3, init_image=SHA, mask="cd" * 32),
        job("i1", 4, init_image="ef" * 32),  # another init image: still alike
        job("l0", 5, loras=(LoraWeight("detail"),)),
        job("n0", 6, n_iter=2),
    ]
    decisions = run(jobs)
    assert members(decisions[0]) == ["t1"]
    assert members(decisions[1]) == ["i1"]
    assert members(decisions[2]) == []  # the inpainting job
    # No GPU here has the LoRA; the job with two batches runs alone.
    assert isinstance(decisions[3], Unplaced)
    assert members(decisions[4]) == []


def test_a_batch_is_estimated_as_its_kind() -> None:
    # Hires x2 at 512 px: each image's second pass at 1024 x 1024 needs
    # 3 GiB besides 2 GiB of weights and a 0.5 GiB margin: 9 GiB of room
    # holds two (8.5 GiB), not three (11.5). As plain txt2img, 512 px images
    # (0.75 GiB each) would fit eight.
    hires = [job(f"h{n}", n, width=512, height=512, enable_hr=True) for n in range(4)]
    assert members(run(hires, free_gib=9)[0]) == ["h1"]
    # n_iter runs its batches one after another: it does not add to the peak.
    iterated = [job(f"n{n}", n, width=512, height=512, n_iter=4) for n in range(4)]
    assert members(run(iterated, free_gib=9)[0]) == ["n1", "n2", "n3"]
