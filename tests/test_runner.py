"""The device worker running the real tiny pipeline on the CPU: steps,
previews, images with infotext, stops, failures."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from PIL import Image

from gpu_node.backends import TorchBackend
from gpu_node.catalog import Catalog
from gpu_node.pipelines import PipelineCache, place
from gpu_node.runner import Task
from sdmesh.domain import (
    AttemptOutcome,
    AttemptUpdate,
    DeviceInfo,
    Ended,
    ImageReady,
    Preview,
    Progress,
    Started,
)
from sdmesh.samplers import SAMPLERS
from sdmesh.spec import MemoryMode
from tests.factories import make_spec
from tests.workers import run_worker

CPU = DeviceInfo(0, "CPU", "cpu-0", "cpu", 1)


@pytest.fixture
def catalog(tiny_data_dir: Path) -> Catalog:
    catalog = Catalog(tiny_data_dir, None)
    catalog.scan()
    return catalog


def run(
    catalog: Catalog,
    tasks: list[Task],
    on_event: Callable[[AttemptUpdate], None] = lambda _: None,
) -> list[AttemptUpdate]:
    """Runs the tasks on a fresh worker and returns every event in order."""
    return run_worker(CPU, TorchBackend("cpu", catalog), [[t] for t in tasks], on_event)


def task(job_id: str = "j1", **spec: Any) -> Task:
    return Task(job_id, 1, make_spec(**spec), MemoryMode.AUTO)


def bodies(events: list[AttemptUpdate], kind: type) -> list[Any]:
    return [e.body for e in events if isinstance(e.body, kind)]


def test_a_job_reports_steps_previews_and_images(catalog: Catalog) -> None:
    events = run(catalog, [task(steps=6, batch_size=2, seed=1000, prompt="a lighthouse")])
    assert isinstance(events[0].body, Started)
    steps = [b.step for b in bodies(events, Progress)]
    assert steps == [1, 2, 3, 4, 5, 6]
    previews = [b.step for b in bodies(events, Preview)]
    assert previews[0] == 1
    assert previews[-1] == 6
    images = bodies(events, ImageReady)
    assert [(i.index, i.seed) for i in images] == [(0, 1000), (1, 1001)]
    for image in images:
        picture = Image.open(BytesIO(image.png))
        assert picture.size == (64, 64)
        assert f"Seed: {image.seed}," in picture.info["parameters"]
    [ended] = bodies(events, Ended)
    assert ended.outcome is AttemptOutcome.SUCCEEDED
    assert ended.profile.mean_step_seconds > 0
    assert isinstance(events[-1].body, Ended)
    # The last preview is out before the images.
    order = [type(e.body).__name__ for e in events]
    assert order.index("ImageReady") > max(i for i, name in enumerate(order) if name == "Preview")


# A batch runs its images through batched kernels, whose sums run in another
# order than a single image's (and, on several CPU threads or a GPU, in an
# order that varies). Measured here: at most 1 level, in under 0.01% of the
# channel values. The bound leaves room for other machines while a wrong
# seed (a different picture altogether) stays far outside it.
MAX_LEVEL_DIFFERENCE = 2
MAX_SHARE_DIFFERING = 0.01


def pixels(image: ImageReady) -> numpy.ndarray[Any, Any]:
    return numpy.asarray(Image.open(BytesIO(image.png)), dtype=numpy.int16)


def test_the_same_seed_gives_the_same_picture(catalog: Catalog) -> None:
    first = bodies(run(catalog, [task(seed=77, steps=3)]), ImageReady)
    # The same job twice on one worker: the same bytes.
    assert first[0].png == bodies(run(catalog, [task(seed=77, steps=3)]), ImageReady)[0].png
    # Image 1 of a batch uses seed + 1, so it matches a single job with that
    # seed, within the float tolerance above.
    batch = bodies(run(catalog, [task(seed=76, steps=3, batch_size=2)]), ImageReady)
    difference = numpy.abs(pixels(batch[1]) - pixels(first[0]))
    assert difference.max() <= MAX_LEVEL_DIFFERENCE
    assert (difference > 0).mean() <= MAX_SHARE_DIFFERING
    # Image 0 of that batch (seed 76) is another picture entirely.
    other = numpy.abs(pixels(batch[0]) - pixels(first[0]))
    assert (other > MAX_LEVEL_DIFFERENCE).mean() > 0.5


def test_a_stop_between_steps_ends_the_attempt_without_images(catalog: Catalog) -> None:
    running = task(steps=30, width=128, height=128)

    def stop_at_first_step(event: AttemptUpdate) -> None:
        if isinstance(event.body, Progress):
            running.stop(AttemptOutcome.STOPPED, "cancelled by alice")

    events = run(catalog, [running], stop_at_first_step)
    [ended] = bodies(events, Ended)
    assert (ended.outcome, ended.reason) == (AttemptOutcome.STOPPED, "cancelled by alice")
    assert bodies(events, ImageReady) == []
    assert max(b.step for b in bodies(events, Progress)) < 30


def test_a_task_stopped_while_waiting_never_starts(catalog: Catalog) -> None:
    waiting = task("j2")
    waiting.stop(AttemptOutcome.RELEASED, "agent shutting down")
    events = run(catalog, [waiting])
    [ended] = bodies(events, Ended)
    assert [type(e.body) for e in events] == [Ended]
    assert ended.outcome is AttemptOutcome.RELEASED


def test_an_unknown_model_fails_the_attempt(catalog: Catalog) -> None:
    [ended] = bodies(run(catalog, [task(model="sdxl")]), Ended)
    assert ended.outcome is AttemptOutcome.FAILED
    assert ended.error_kind == "model"
    assert "not on this node" in ended.reason


def test_out_of_memory_fails_the_attempt_and_the_worker_goes_on(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpu_node import pipelines

    real_get = pipelines.PipelineCache.get
    calls = []

    def get(
        self: pipelines.PipelineCache, model: str, sampler: str, mode: MemoryMode
    ) -> tuple[Any, float]:
        pipeline, seconds = real_get(self, model, sampler, mode)
        calls.append(model)
        if len(calls) == 1:

            def out_of_memory(**_: Any) -> Any:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            return out_of_memory, seconds
        return pipeline, seconds

    monkeypatch.setattr(pipelines.PipelineCache, "get", get)
    events = run(catalog, [task("oom"), task("next")])
    first, second = bodies(events, Ended)
    assert (first.outcome, first.error_kind) == (AttemptOutcome.FAILED, "oom")
    assert second.outcome is AttemptOutcome.SUCCEEDED


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
def test_every_sampler_runs(catalog: Catalog, sampler: str) -> None:
    events = run(catalog, [task(sampler_name=sampler, steps=3)])
    [ended] = bodies(events, Ended)
    assert ended.outcome is AttemptOutcome.SUCCEEDED, ended.reason


def test_the_sampler_picks_the_diffusers_scheduler_and_options(catalog: Catalog) -> None:
    cache = PipelineCache("cpu", catalog)
    for sampler in SAMPLERS:
        pipeline, _ = cache.get("tiny", sampler.name)
        assert type(pipeline.scheduler).__name__ == sampler.scheduler_class
        for option, value in sampler.options.items():
            assert pipeline.scheduler.config[option] == value, (sampler.name, option)
    # Options do not leak into the next job's sampler.
    pipeline, load_seconds = cache.get("tiny", "DPM++ 2M")
    assert not pipeline.scheduler.config.get("use_karras_sigmas")
    assert load_seconds == 0.0  # still resident


class RecordingPipeline:
    """Stands in for a diffusers pipeline on a card we do not have."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def to(self, device: str) -> RecordingPipeline:
        self.calls.append(("to", device))
        return self

    def enable_model_cpu_offload(self, device: str) -> None:
        self.calls.append(("model_offload", device))

    def enable_sequential_cpu_offload(self, device: str) -> None:
        self.calls.append(("sequential_offload", device))


@pytest.mark.parametrize(
    ("mode", "call"),
    [
        (MemoryMode.FULL, ("to", "cuda:1")),
        (MemoryMode.MODEL_OFFLOAD, ("model_offload", "cuda:1")),
        (MemoryMode.SEQUENTIAL_OFFLOAD, ("sequential_offload", "cuda:1")),
    ],
)
def test_memory_modes_place_the_pipeline(mode: MemoryMode, call: tuple[str, str]) -> None:
    pipeline = RecordingPipeline()
    place(pipeline, "cuda:1", mode)
    assert pipeline.calls == [call]


def test_on_the_cpu_every_mode_runs_in_full(catalog: Catalog) -> None:
    cache = PipelineCache("cpu", catalog)
    assert cache.mode_on_device(MemoryMode.SEQUENTIAL_OFFLOAD) is MemoryMode.FULL
    assert PipelineCache("cuda:0", catalog).mode_on_device(MemoryMode.AUTO) is MemoryMode.FULL
    offloaded = Task("j", 1, make_spec(steps=2), MemoryMode.MODEL_OFFLOAD)
    [ended] = bodies(run(catalog, [offloaded]), Ended)
    assert ended.outcome is AttemptOutcome.SUCCEEDED
