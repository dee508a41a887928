"""Alike jobs run as one pipeline call: each keeps its own prompt, seeds,
progress, previews, images and end; batching never changes a job's image
beyond float tolerance; a stop removes only that job's share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy
import pytest

from gpu_node.backends import TorchBackend
from gpu_node.catalog import Catalog
from gpu_node.runner import Task
from sdmesh.domain import AttemptOutcome, AttemptUpdate, Ended, ImageReady, Preview, Progress
from sdmesh.spec import MemoryMode
from tests.factories import make_spec
from tests.test_runner import CPU, MAX_LEVEL_DIFFERENCE, MAX_SHARE_DIFFERING, pixels
from tests.workers import run_worker


@pytest.fixture
def catalog(tiny_data_dir: Path) -> Catalog:
    catalog = Catalog(tiny_data_dir, None)
    catalog.scan()
    return catalog


def task(job_id: str, **spec: Any) -> Task:
    return Task(job_id, 1, make_spec(**{"steps": 3, **spec}), MemoryMode.AUTO)


def run_batch(
    catalog: Catalog, batches: list[list[Task]], stop_after: tuple[str, int] | None = None
) -> list[AttemptUpdate]:
    """Runs each batch on a fresh worker; every event in order. With
    `stop_after` (job, step), that job is stopped once it reports the step."""
    tasks = {t.job_id: t for batch in batches for t in batch}

    def stop(event: AttemptUpdate) -> None:
        body = event.body
        if stop_after and isinstance(body, Progress) and (event.job_id, body.step) == stop_after:
            tasks[event.job_id].stop(AttemptOutcome.STOPPED, "cancelled")

    return run_worker(CPU, TorchBackend("cpu", catalog), batches, stop)


def of(events: list[AttemptUpdate], job_id: str, kind: type) -> list[Any]:
    return [e.body for e in events if e.job_id == job_id and isinstance(e.body, kind)]


def test_a_batch_gives_each_job_its_own_picture_as_if_alone(catalog: Catalog) -> None:
    alone = run_batch(catalog, [[task("a", seed=5, prompt="a red door")]])
    batched = run_batch(
        catalog,
        [
            [
                task("b", seed=9, prompt="a green field", batch_size=2),
                task("a", seed=5, prompt="a red door"),
            ]
        ],
    )
    [mine] = of(alone, "a", ImageReady)
    [same] = of(batched, "a", ImageReady)
    # The same job, alone and third in a batch of three images: the same
    # picture within float tolerance (see tests/test_runner.py).
    difference = numpy.abs(pixels(mine) - pixels(same))
    assert difference.max() <= MAX_LEVEL_DIFFERENCE
    assert (difference > 0).mean() <= MAX_SHARE_DIFFERING
    # Each job has its own steps, previews, images (with its own seeds and
    # infotext) and end.
    for job_id, seeds in (("a", [5]), ("b", [9, 10])):
        assert [p.step for p in of(batched, job_id, Progress)] == [1, 2, 3]
        assert of(batched, job_id, Preview)
        images = of(batched, job_id, ImageReady)
        assert [(i.index, i.seed) for i in images] == list(enumerate(seeds))
        [ended] = of(batched, job_id, Ended)
        assert ended.outcome is AttemptOutcome.SUCCEEDED
    b_images = of(batched, "b", ImageReady)
    assert (numpy.abs(pixels(b_images[0]) - pixels(mine)) > MAX_LEVEL_DIFFERENCE).mean() > 0.5


def test_a_stop_removes_only_that_job_s_share(catalog: Catalog) -> None:
    alike = {"steps": 30, "width": 128, "height": 128}
    events = run_batch(
        catalog,
        [[task("keep", seed=1, **alike), task("drop", seed=2, **alike)]],
        stop_after=("drop", 1),
    )
    [dropped] = of(events, "drop", Ended)
    assert (dropped.outcome, dropped.reason) == (AttemptOutcome.STOPPED, "cancelled")
    assert of(events, "drop", ImageReady) == []
    assert max(p.step for p in of(events, "drop", Progress)) < 30
    [kept] = of(events, "keep", Ended)
    assert kept.outcome is AttemptOutcome.SUCCEEDED
    assert len(of(events, "keep", ImageReady)) == 1
    assert [p.step for p in of(events, "keep", Progress)] == list(range(1, 31))
