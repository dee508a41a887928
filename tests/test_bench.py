"""The placement benchmark's simulation runs every policy to completion on
its fixed workload. (Its figures are reported by `python -m bench.placement`,
never asserted here.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("script", ["placement.py", "soak.py"])
def test_a_benchmark_runs_as_a_file_as_well_as_a_module(script: str) -> None:
    bench = Path(__file__).resolve().parent.parent / "bench"
    result = subprocess.run(
        [sys.executable, str(bench / script), "--help"],
        capture_output=True,
        text=True,
        cwd="/",  # nothing of the repository is on the path by accident
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
