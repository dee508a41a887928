"""The store benchmark runs as a file, and its JSON has every case and
operation. (Its figures are reported by `python -m bench.store_ops`, never
asserted here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.store_ops import CASES, OPERATIONS


def test_the_store_benchmark_times_every_operation_in_every_case(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "bench" / "store_ops.py"
    output = tmp_path / "store_ops.json"
    result = subprocess.run(
        [sys.executable, str(script), "--jobs", "3", "--rounds", "1", "--only", "sqlite",
         "--output", str(output)],
        capture_output=True,
        text=True,
        cwd="/",  # nothing of the repository is on the path by accident
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| sqlite | batch16_fenced |" in result.stdout
    cases = json.loads(output.read_text())["results"]["sqlite"]
    assert set(cases) == {f"batch{b}" + ("_fenced" if fenced else "") for b, fenced in CASES}
    for row in cases.values():
        assert set(row) == {*OPERATIONS, "total", "wall"}
        assert all(value >= 0 for value in row.values())
