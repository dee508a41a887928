from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.processes import LocalCluster
from tests.chaos.ledger import Ledger
from tests.conftest import DATABASES
from tests.databases import database

# Fast liveness for tests: agents heartbeat every 0.5 s and are lost after
# 3 s of silence; a running job must report a step every 3 s.
SCHEDULER_ARGS = ("--lease", "3s", "--progress-deadline", "3s")
# Slow steps keep a job mid-flight long enough for a fault to hit it.
AGENT_ARGS = ("--simulate-gpus", "8GiB", "--simulate-step-delay", "0.4")

Chaos = Callable[..., tuple[LocalCluster, Ledger]]


@pytest.fixture(params=DATABASES)
def chaos(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chaos]:
    """Makes a cluster (schedulers not yet started) and its ledger, on
    SQLite or PostgreSQL; stops every process at the end and prints their
    logs if the test failed."""
    made: list[tuple[LocalCluster, Ledger]] = []
    with database(request.param, tmp_path) as url:

        def make(**options: object) -> tuple[LocalCluster, Ledger]:
            cluster = LocalCluster(tmp_path, db_url=url, scheduler_args=SCHEDULER_ARGS, **options)  # type: ignore[arg-type]
            made.append((cluster, Ledger(cluster)))
            return made[-1]

        try:
            yield make
        finally:
            for cluster, ledger in made:
                ledger.close()
                cluster.stop()
            report = getattr(request.node, "rep_call", None)
            if report is not None and report.failed:
                for cluster, _ in made:
                    print(cluster.logs())
