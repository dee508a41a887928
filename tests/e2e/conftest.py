from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.processes import LocalCluster
from tests.conftest import DATABASES
from tests.databases import database


def _running(
    request: pytest.FixtureRequest, tmp_path: Path, *, secure: bool = False
) -> Iterator[LocalCluster]:
    with database(request.param, tmp_path) as url:
        local = LocalCluster(tmp_path, db_url=url, secure=secure)
        local.start_scheduler()
        try:
            yield local
        finally:
            local.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(local.logs())


@pytest.fixture(params=DATABASES)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A scheduler on SQLite or PostgreSQL, with no agents yet."""
    yield from _running(request, tmp_path)


@pytest.fixture(params=DATABASES)
def secure(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """The same with everything on: TLS, mutual TLS, keys and enrollment
    (agents started by `start_agent` enroll with a join token)."""
    yield from _running(request, tmp_path, secure=True)
