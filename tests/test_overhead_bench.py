"""The overhead benchmark runs as a file as well as a module, and its table
and percentiles say what they should. (Its figures come from `python -m
bench.overhead`, never asserted here.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.overhead import CASES, percentile, table


def test_it_runs_as_a_file() -> None:
    script = Path(__file__).resolve().parent.parent / "bench" / "overhead.py"
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        cwd="/",  # nothing of the repository is on the path by accident
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout


def test_the_cases_are_the_two_sizes_asked_for() -> None:
    assert [(c.size, c.steps) for c in CASES] == [(512, 20), (64, 4)]


def test_percentiles_and_the_table() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 0.5) == 11.0  # index round(0.5 * 19) = 10
    assert percentile(values, 0.95) == 19.0  # index round(0.95 * 19) = 18
    row = {
        "name": "64px-4steps",
        "jobs": 90,
        "direct_jobs_per_s": 10.0,
        "mesh_jobs_per_s": 9.5,
        "ratio": 0.95,
        "direct_p50_ms": 100.0,
        "attempt_p50_ms": 104.0,
        "overhead_p50_ms": 4.0,
        "overhead_p95_ms": 9.0,
    }
    lines = table([row]).splitlines()
    assert lines[0].startswith("| case | jobs | direct_jobs_per_s")
    assert lines[2] == "| 64px-4steps | 90 | 10.000 | 9.500 | 0.950 | 100 | 104 | 4 | 9 |"
