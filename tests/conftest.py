from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.databases import database

# The suite's own thread settings, whatever the environment says, so that a
# result never depends on the machine's defaults. Set before anything imports
# torch, which reads them once. Agents the tests start as processes get one
# thread each (harness.processes.process_env).
SUITE_THREADS = "2"
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = SUITE_THREADS

DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: once on SQLite, once on PostgreSQL."""
    with database(request.param, tmp_path) as url:
        yield url


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Lets fixtures see whether the test failed (to print process logs)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agent data dir with the tiny model built once for the session."""
    from gpu_node.tiny import ensure_tiny

    data_dir = tmp_path_factory.mktemp("agent")
    ensure_tiny(data_dir / "models")
    return data_dir


@pytest.fixture(scope="session")
def variants_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agent data dir with tiny and its offline variants (an inpainting
    model, the ControlNet tiny-canny, the LoRA tiny-lora) built once for
    the session, as `sdctl node --tiny-variants` builds them; the models
    are under `models/`."""
    from gpu_node.catalog import Catalog

    data_dir = tmp_path_factory.mktemp("agent-variants")
    Catalog(data_dir, None, tiny_variants=True).scan()
    return data_dir
