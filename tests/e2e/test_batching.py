"""Cross-request batching through real processes: alike jobs queued
together go to the GPU as one assignment and run as one pipeline call, each
with its own attempt, progress, previews and image; the image of a batched
job matches the same job run alone. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any

import numpy
import pytest
from PIL import Image as PILImage

from client import Image, PreviewEvent, ProgressEvent
from harness.processes import LocalCluster
from tests.e2e.test_whole_path import check_png, collect
from tests.test_runner import MAX_LEVEL_DIFFERENCE, MAX_SHARE_DIFFERING

pytestmark = pytest.mark.e2e


def pixels(images: list[Image]) -> numpy.ndarray[Any, Any]:
    [image] = images
    return numpy.asarray(PILImage.open(BytesIO(image.data)), dtype=numpy.int16)


def test_alike_queued_jobs_run_as_one_batch(cluster: LocalCluster) -> None:
    cluster.start_agent("agent-a")
    cluster.wait_for_nodes(1)
    with cluster.client("alice") as alice, cluster.client("bob") as bob:
        alone = alice.submit("a red door", seed=5, width=64, height=64, steps=4)
        assert alone.wait().succeeded
        # Drained, the node takes nothing: the jobs queue up together.
        [node] = alice.list_nodes()
        alice.drain_node(node.id)
        handles = [
            alice.submit("a red door", seed=5, width=64, height=64, steps=4),
            bob.submit("a green field", seed=9, width=64, height=64, steps=4),
            alice.submit("a blue sky", seed=11, batch_size=2, width=64, height=64, steps=4),
            alice.submit("another size", seed=3, width=72, height=64, steps=4),
        ]
        alice.drain_node(node.id, undo=True)
        with ThreadPoolExecutor(len(handles)) as pool:
            streams = list(pool.map(collect, handles))
        jobs = [handle.refresh() for handle in handles]
        images = [handle.images() for handle in handles]
        red_door, red_door_alone = pixels(images[0]), pixels(alone.images())
    assert [job.state for job in jobs] == ["SUCCEEDED"] * 4
    placements = [job.attempts[-1].placement for job in jobs]
    # The first three are alike (4 images): one batch; the fourth is not.
    for placement in placements[:3]:
        assert "batched with 2 alike job(s), 4 images" in placement
    assert "batched" not in placements[3]
    for stream in streams:
        assert [e.step for e in stream if isinstance(e, ProgressEvent)][-1] == 4
        assert any(isinstance(e, PreviewEvent) for e in stream)
    # Each its own images and infotext; the batched red door is the one run alone.
    for job, pngs in zip(jobs, images, strict=True):
        assert len(pngs) == job.spec.batch_size
        for image in pngs:
            check_png(image.data, job.spec.width, job.spec.height, image.info.seed, job.spec.prompt)
    difference = numpy.abs(red_door - red_door_alone)
    assert difference.max() <= MAX_LEVEL_DIFFERENCE
    assert (difference > 0).mean() <= MAX_SHARE_DIFFERING
