"""Placement with real processes and simulated GPUs: jobs go where they
fit, an out-of-memory is retried on a bigger card with a raised estimate,
impossible jobs are refused at submit, one agent runs several GPUs at once,
and a user with one job is not stuck behind another user's fifty.

The synthetic model "flux" here is small (1.2 GiB of weights) but keeps the
FLUX-class activation profile of gpu_node/profiles.py, so its first estimate
is too low, as real first estimates are: at 768x768 the scheduler guesses
3.4 GiB and the card needs about 4.6 GiB.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from client import Event, Job, RejectedError, StateEvent
from gpu_node.profiles import CUDA_CONTEXT_BYTES, profile_for, true_peak
from harness.processes import LocalCluster
from scheduler.config import BATCH_MAX_IMAGES
from scheduler.estimator import Shape, first_estimate
from sdmesh.spec import MemoryMode

pytestmark = pytest.mark.e2e

GIB = 2**30
FLUX = ("--simulate-models", "flux=1.2GiB", "--simulate-time-scale", "0.01")


def states(events: Sequence[Event]) -> list[str]:
    return [e.state for e in events if isinstance(e, StateEvent)]


def test_jobs_go_where_they_fit_and_learn_from_running_out_of_memory(cluster: LocalCluster) -> None:
    cluster.start_agent("small", "--simulate-gpus", "4GiB", *FLUX)
    cluster.start_agent("big", "--simulate-gpus", "16GiB", *FLUX)
    cluster.wait_for_nodes(2)
    flux = profile_for("flux", int(1.2 * GIB))
    small_free = 4 * GIB - CUDA_CONTEXT_BYTES
    with cluster.client() as client:
        # The first estimate fits the small card, the true peak does not. No
        # card holds the model yet, so the tightest fit (the small card) wins.
        shape = Shape("flux", 768, 768, 1)
        guess = first_estimate(flux.weight_bytes, shape, MemoryMode.FULL).vram_bytes
        truth = true_peak(flux, 768, 768, 1, MemoryMode.FULL)
        assert guess <= small_free < truth
        retried = client.submit("an underestimated one", model="flux", width=768, height=768,
                                steps=4, memory_mode="full")  # fmt: skip
        events = list(retried.events())
        job: Job = client.get_job(retried.id)
        assert job.state == "SUCCEEDED", job.reason
        assert states(events) == [
            "QUEUED",
            "ASSIGNED",
            "RUNNING",
            "QUEUED",
            "ASSIGNED",
            "RUNNING",
            "SUCCEEDED",
        ]
        first, second = job.attempts
        assert (first.node_name, first.outcome) == ("small", "failed")
        assert "out of memory" in first.reason
        assert first.peak_vram_bytes == small_free  # what it had when it failed
        assert (second.node_name, second.outcome) == ("big", "succeeded")
        assert second.vram_estimate_bytes > first.vram_estimate_bytes  # learned
        assert second.vram_estimate_bytes > small_free
        assert second.peak_vram_bytes == truth
        assert (job.failures, job.attempt) == (1, 2)
        assert "(learned)" in second.placement

        # Only the big card can take this one in full mode (needs ~4.7 GiB).
        only_big = client.submit("a big one", model="flux", width=1024, height=1024, steps=4,
                                 memory_mode="full").wait()  # fmt: skip
        assert only_big.succeeded, only_big.reason
        assert only_big.node_name == "big"

        # Too large for every card in full mode: refused at submit.
        with pytest.raises(RejectedError) as refused:
            client.submit("too big", model="flux", width=2048, height=2048, batch_size=2,
                          memory_mode="full")  # fmt: skip
        assert "biggest GPU is big gpu 0 with 16.0 GiB" in str(refused.value)
        assert [j.id for j in client.list_jobs(limit=10)] == [only_big.id, retried.id]


def test_one_agent_runs_a_job_on_each_of_its_gpus_at_once(cluster: LocalCluster) -> None:
    cluster.start_agent("twin", "--simulate-gpus", "8GiB,8GiB", "--simulate-models", "flux=1.2GiB",
                        "--simulate-time-scale", "0.05")  # fmt: skip
    cluster.wait_for_nodes(1)
    with cluster.client() as client:
        first = client.submit("one", model="flux", width=768, height=768, steps=40)
        second = client.submit("two", model="flux", width=768, height=768, steps=40)
        one, two = first.wait(), second.wait()
        assert one.succeeded
        assert two.succeeded
        assert {one.gpu_index, two.gpu_index} == {0, 1}
        # They overlapped: the second started before the first finished.
        second_started, first_finished = two.started_at, one.finished_at
        assert second_started is not None
        assert first_finished is not None
        assert second_started < first_finished
        [node] = client.list_nodes()
        assert [d.index for d in node.devices] == [0, 1]


def test_a_user_with_one_job_is_not_stuck_behind_another_users_fifty(cluster: LocalCluster) -> None:
    cluster.start_agent("gpu", "--simulate-gpus", "16GiB", "--simulate-models", "sd15=2GiB",
                        "--simulate-time-scale", "0.05")  # fmt: skip
    cluster.wait_for_nodes(1)
    with cluster.client("alice") as alice, cluster.client("bob") as bob:
        mine = [alice.submit(f"a{i}", model="sd15", steps=20) for i in range(50)]
        theirs = bob.submit("b", model="sd15", steps=20)
        submitted_at = theirs.refresh().created_at
        assert theirs.wait().succeeded
        jobs = [alice.get_job(h.id) for h in mine]
        bob_job = bob.get_job(theirs.id)
    # Alice's jobs that were still in the queue when Bob submitted: Bob's job
    # was assigned before every one of them. At most one running and one
    # prefetched job per GPU were already bound, and went first.
    never = submitted_at.replace(year=9999)  # still queued: assigned after anything
    assigned = {j.id: j.attempts[0].assigned_at if j.attempts else never for j in [*jobs, bob_job]}
    waiting = [j for j in jobs if assigned[j.id] > submitted_at]
    assert len(waiting) >= 10, "alice's queue was nearly empty before bob submitted"
    # A dispatch pass that read the queue just before Bob's job was committed
    # may still bind Alice's jobs to the GPU's two slots, each a batch of up
    # to BATCH_MAX_IMAGES alike jobs; nothing after it.
    slots = 2 * BATCH_MAX_IMAGES
    ahead = [j for j in waiting if assigned[j.id] < assigned[bob_job.id]]
    assert len(ahead) <= slots, f"{len(ahead)} of alice's queued jobs went before bob's"
    bound_before = [
        j
        for j in jobs
        if assigned[j.id] <= submitted_at and j.finished_at and j.finished_at > submitted_at
    ]
    assert len(bound_before) <= slots
