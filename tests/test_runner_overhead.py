"""What the device worker does besides the pipeline call, and where: every
update leaves through the publisher thread, which encodes the finished
images (the next job starts meanwhile) and sends them before their
attempt's end, in order; the cycle
collector runs only after an attempt that ended by an exception; a sampler
asked for again is reused without carrying state from the job before; and
loading a model freezes what it leaves live, out of the collector's way."""

from __future__ import annotations

import gc
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_node import preview, runner
from gpu_node.backends import TorchBackend
from gpu_node.catalog import Catalog
from gpu_node.pipelines import PipelineCache
from gpu_node.preview import Previewer, host_copy
from gpu_node.runner import DeviceWorker, Task
from sdmesh.domain import (
    AttemptOutcome,
    AttemptUpdate,
    DeviceInfo,
    Ended,
    ImageReady,
    Preview,
    Progress,
)
from sdmesh.samplers import SAMPLERS
from sdmesh.spec import MemoryMode
from tests.factories import make_spec

CPU = DeviceInfo(0, "CPU", "cpu-0", "cpu", 1)


@pytest.fixture
def catalog(tiny_data_dir: Path) -> Catalog:
    catalog = Catalog(tiny_data_dir, None)
    catalog.scan()
    return catalog


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Loading freezes the collector's view of the process; give the next
    test the process as it found it."""
    yield
    gc.unfreeze()


class RecordingBackend(TorchBackend):
    """The real CPU backend, noting each release and whether it collected."""

    def __init__(self, catalog: Catalog) -> None:
        super().__init__("cpu", catalog)
        self.releases: list[bool] = []

    def release(self, *, collect: bool = False) -> None:
        self.releases.append(collect)
        super().release(collect=collect)


def run(
    backend: TorchBackend,
    tasks: list[Task],
    on_event: Callable[[AttemptUpdate], None] = lambda _: None,
) -> list[tuple[str, AttemptUpdate]]:
    """Every event, in order, with the name of the thread that sent it."""
    events: queue.Queue[tuple[str, AttemptUpdate]] = queue.Queue()

    def emit(event: AttemptUpdate) -> None:
        on_event(event)
        events.put((threading.current_thread().name, event))

    worker = DeviceWorker(CPU, backend, emit)
    for task in tasks:
        worker.submit(task)
    got: list[tuple[str, AttemptUpdate]] = []
    while sum(isinstance(event.body, Ended) for _, event in got) < len(tasks):
        got.append(events.get(timeout=120))
    worker.close(timeout=60)
    return got


def task(job_id: str, **spec: Any) -> Task:
    return Task(job_id, 1, make_spec(**spec), MemoryMode.AUTO)


def test_images_are_encoded_off_the_worker_and_arrive_before_the_end(catalog: Catalog) -> None:
    events = run(
        TorchBackend("cpu", catalog),
        [task("first", batch_size=2, steps=3), task("second", batch_size=1, steps=2)],
    )
    for job_id, images in (("first", 2), ("second", 1)):
        mine = [(thread, e.body) for thread, e in events if e.job_id == job_id]
        kinds = [type(body).__name__ for _, body in mine]
        assert kinds[0] == "Started"
        assert kinds[-1] == "Ended"
        assert kinds.count("Ended") == 1
        # Its previews, then its images in index order, then its end.
        last_preview = max(i for i, kind in enumerate(kinds) if kind == "Preview")
        image_positions = [i for i, kind in enumerate(kinds) if kind == "ImageReady"]
        assert len(image_positions) == images
        assert last_preview < image_positions[0]
        assert [body.index for _, body in mine if isinstance(body, ImageReady)] == list(
            range(images)
        )
        # Every update leaves through the publisher: the compute thread only
        # hands them over.
        assert {thread.rsplit("_", 1)[0] for thread, _ in mine} == {"publish-0"}
        [(_, ended)] = [(t, b) for t, b in mine if isinstance(b, Ended)]
        assert ended.outcome is AttemptOutcome.SUCCEEDED


def test_the_next_job_starts_while_the_last_one_is_encoded(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    second_started = threading.Event()
    real_encode = runner.encode_png

    class Backend(TorchBackend):
        jobs = 0

        def begin_job(self) -> None:
            self.jobs += 1
            if self.jobs == 2:
                second_started.set()
            super().begin_job()

    def encode_after_the_next_start(image: Any, parameters: str) -> bytes:
        # Encoding on the worker thread would wait here for good.
        assert second_started.wait(timeout=60), "the next job did not start meanwhile"
        return real_encode(image, parameters)

    monkeypatch.setattr(runner, "encode_png", encode_after_the_next_start)
    events = run(Backend("cpu", catalog), [task("first", steps=2), task("second", steps=2)])
    ends = [e.body for _, e in events if isinstance(e.body, Ended)]
    assert [end.outcome for end in ends] == [AttemptOutcome.SUCCEEDED] * 2
    # Still, the first attempt's updates all leave before the second's.
    assert [e.job_id for _, e in events] == sorted(e.job_id for _, e in events)


def test_a_failed_image_encode_fails_the_attempt_and_the_worker_goes_on(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_encode = runner.encode_png
    calls = []

    def broken_once(image: Any, parameters: str) -> bytes:
        calls.append(parameters)
        if len(calls) == 1:
            raise OSError("disk full")
        return real_encode(image, parameters)

    monkeypatch.setattr(runner, "encode_png", broken_once)
    with caplog.at_level(logging.ERROR, logger="gpu_node.runner"):
        events = run(TorchBackend("cpu", catalog), [task("a", steps=2), task("b", steps=2)])
    first, second = (e.body for _, e in events if isinstance(e.body, Ended))
    assert (first.outcome, first.reason) == (AttemptOutcome.FAILED, "OSError: disk full")
    assert second.outcome is AttemptOutcome.SUCCEEDED
    assert "encoding its images failed" in caplog.text


def test_the_collector_runs_only_after_an_attempt_that_ended_by_an_exception(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpu_node import pipelines

    real_get = pipelines.PipelineCache.get

    def get(self: PipelineCache, model: str, sampler: str, mode: MemoryMode) -> tuple[Any, float]:
        pipeline, seconds = real_get(self, model, sampler, mode)
        if model == "tiny" and sampler == "DDIM":  # this one runs out of memory

            def out_of_memory(**_: Any) -> Any:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            return out_of_memory, seconds
        return pipeline, seconds

    monkeypatch.setattr(pipelines.PipelineCache, "get", get)
    stopped = task("stopped", steps=20)

    def stop_at_first_step(event: AttemptUpdate) -> None:
        if event.job_id == "stopped" and isinstance(event.body, Progress):
            stopped.stop(AttemptOutcome.STOPPED, "cancelled")

    waiting = task("waiting")
    waiting.stop(AttemptOutcome.RELEASED, "draining")
    backend = RecordingBackend(catalog)
    events = run(
        backend,
        [task("ok"), task("oom", sampler_name="DDIM"), stopped, waiting, task("ok-again")],
        stop_at_first_step,
    )
    outcomes = {e.job_id: e.body.outcome for _, e in events if isinstance(e.body, Ended)}
    assert outcomes == {
        "ok": AttemptOutcome.SUCCEEDED,
        "oom": AttemptOutcome.FAILED,
        "stopped": AttemptOutcome.STOPPED,
        "waiting": AttemptOutcome.RELEASED,
        "ok-again": AttemptOutcome.SUCCEEDED,
    }
    # One release per job; a collection only where a traceback was left:
    # the out-of-memory and the stop raised from the step callback.
    assert backend.releases == [False, True, True, False, False]


def test_a_release_without_collect_skips_the_collector(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    collections: list[int] = []

    def collect(*_: Any) -> int:
        collections.append(1)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    backend = TorchBackend("cpu", catalog)
    backend.release()
    assert collections == []
    backend.release(collect=True)
    assert collections == [1]


def test_a_sampler_asked_for_again_is_reused(catalog: Catalog) -> None:
    cache = PipelineCache("cpu", catalog)
    pipeline, _ = cache.get("tiny", "Euler a")
    first = pipeline.scheduler
    assert cache.get("tiny", "Euler a")[0].scheduler is first
    assert cache.get("tiny", "DPM++ 2M")[0].scheduler is not first
    again = cache.get("tiny", "Euler a")[0].scheduler
    assert again is not first
    assert type(again) is type(first)


def test_a_reused_sampler_carries_nothing_into_the_next_job(catalog: Catalog) -> None:
    # Multistep samplers keep the last steps' outputs; each call must start
    # afresh, so the same job twice in a row on one worker (the second
    # reusing the first's sampler) gives the same bytes.
    names = [sampler.name for sampler in SAMPLERS]
    tasks = [
        task(f"{name}/{take}", sampler_name=name, steps=3, seed=5)
        for name in names
        for take in ("first", "again")
    ]
    events = run(TorchBackend("cpu", catalog), tasks)
    pngs = {e.job_id: e.body.png for _, e in events if isinstance(e.body, ImageReady)}
    assert len(pngs) == len(tasks)
    differing = [name for name in names if pngs[f"{name}/first"] != pngs[f"{name}/again"]]
    assert differing == []


def test_loading_freezes_what_it_leaves_and_an_eviction_still_collects_it(
    catalog: Catalog,
) -> None:
    gc.unfreeze()
    cache = PipelineCache("cpu", catalog)
    pipeline, _ = cache.get("tiny", "Euler a")
    assert gc.get_freeze_count() > 10_000  # torch, diffusers and the weights
    # A reference cycle through the frozen model: only a thawed collection
    # can free it.
    pipeline.unet.loop = [pipeline.unet]
    unet = weakref.ref(pipeline.unet)
    del pipeline
    cache.unload()
    assert unet() is None
    assert cache.resident() == ()
    cache.unload()  # nothing loaded: nothing to do


def test_a_preview_copies_host_latents_at_once() -> None:
    latents = torch.ones(4, 8, 8)
    copy, ready = host_copy(latents)
    latents.zero_()  # the next step may overwrite the source
    assert ready is None
    assert float(copy.sum()) == 4 * 8 * 8


def test_a_preview_that_fails_is_logged_and_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_map = preview.latents_to_png

    def broken_once(latents: Any) -> tuple[bytes, int, int]:
        if not calls:
            calls.append(1)
            raise RuntimeError("no memory for a preview")
        return real_map(latents)

    calls: list[int] = []
    monkeypatch.setattr(preview, "latents_to_png", broken_once)
    sent: list[Preview] = []
    with ThreadPoolExecutor(1) as executor, caplog.at_level(logging.ERROR):
        previewer = Previewer(executor, sent.append)
        previewer.offer(1, 2, torch.zeros(1, 4, 8, 8))
        previewer.offer(2, 2, torch.zeros(1, 4, 8, 8))
        previewer.flush()
    assert [p.step for p in sent] == [2]
    assert "preview of step 1 failed" in caplog.text
