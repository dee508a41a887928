"""The placement benchmark's simulation runs every policy to completion on
its fixed workload. (Its figures are reported by `python -m bench.placement`,
never asserted here.)"""

from __future__ import annotations

import pytest

from bench.placement import COLUMNS, JOBS, POLICIES, simulate, workload


def test_the_workload_is_fixed_by_its_seed() -> None:
    first, again, other = workload(1), workload(1), workload(2)
    assert len(first) == JOBS
    assert [(j.model, j.owner, j.arrival) for j in first] == [
        (j.model, j.owner, j.arrival) for j in again
    ]
    assert [j.arrival for j in first] != [j.arrival for j in other]
    assert {j.model for j in first} == {"sd15", "sdxl", "flux"}


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_every_policy_finishes_every_job(policy: type) -> None:
    result = simulate(policy, seed=1)
    assert set(result) == set(COLUMNS)
    assert result["failed_jobs"] == 0
    makespan = result["makespan_s"]
    assert makespan is not None
    assert makespan > 0
