"""Runs jobs on one device, in one worker thread, one job (or one batch of
alike jobs, run as one pipeline call) at a time.

The thread is the only place that calls the diffusers pipeline for its
device, and it does nothing else it can hand off: the step callback only
checks for a stop, reports the step and hands latents to the previewer.
A second thread per device, the publisher, encodes previews and the
finished images and sends every update, so the next job starts while the
last one's PNGs are written. Everything goes out through `emit` as an
`AttemptUpdate` (`sdmesh.domain`); the connection turns those into
protobuf on the asyncio side.

A job of any kind (img2img, inpainting, the hires fix's two passes, LoRAs,
ControlNets, n_iter batches one after another) runs through the backend's
diffusers pipelines; what each kind asks of them (its passes, their call
arguments, its input images prepared) is `gpu_node.passes`, and one step
count runs over all of a job's passes.

Ordering: every update of the device leaves through the one publisher
thread in the order it was handed over, so an attempt's start, steps,
previews, images and end arrive in that order (the next attempt may start
before the last one's images are out).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gpu_node.backends import Backend
from gpu_node.passes import Pass, Prepared, arguments, finish, plan, prepare, upscale
from gpu_node.pipelines import ModelUnavailable
from gpu_node.preview import Previewer
from sdmesh.domain import (
    AttemptOutcome,
    AttemptProfile,
    AttemptUpdate,
    DeviceInfo,
    Ended,
    ImageReady,
    Preview,
    Progress,
    Started,
    UpdateBody,
)
from sdmesh.infotext import infotext
from sdmesh.kinds import Kind
from sdmesh.spec import JobSpec, MemoryMode
from sdmesh.speeds import SpeedTable

log = logging.getLogger(__name__)


@dataclass
class Task:
    job_id: str
    attempt: int
    spec: JobSpec
    memory_mode: MemoryMode
    stop_requested: threading.Event = field(default_factory=threading.Event)
    stop_outcome: AttemptOutcome = AttemptOutcome.STOPPED
    stop_reason: str = ""
    batch: str = ""  # the first job of the batch it runs in, if it runs in one
    # Its input images, decoded (PIL), by sha256 (sdmesh.spec.JobSpec.inputs).
    inputs: Mapping[str, Any] = field(default_factory=dict)

    def stop(self, outcome: AttemptOutcome, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.stop_outcome, self.stop_reason = outcome, reason
            self.stop_requested.set()


@dataclass(frozen=True)
class HealthResult:
    gpu_index: int
    healthy: bool
    detail: str


class _Probe:
    """A health probe waiting in a worker's queue. It runs after the job
    ahead of it, on the device's own thread: on a hung card it hangs too,
    which is the point."""


class AttemptStopped(Exception):
    """Raised from the step callback to leave the pipeline at once, skipping
    the remaining steps and the final VAE decode that `_interrupt` would
    still run."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"[:500]


def encode_png(image: Any, parameters: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class StepCounter:
    """One increasing step count over every pass of every iteration of a
    job. A pass's own count is what the pipeline says it runs
    (`num_timesteps`, known once it starts); passes still to come count as
    planned (`Pass.expected_steps`), so the total is exact once the last
    pass has started, and the last step reported equals it."""

    def __init__(self, planned: Sequence[int]) -> None:
        self.planned = list(planned)
        self.position = 0
        self.done = 0  # steps of the passes that ended
        self.current = 0  # steps of the running pass so far

    def step(self, index: int, running: int) -> tuple[int, int]:
        """(step, total) for the callback of the running pass's step `index`."""
        self.current = index + 1
        running = running or self.planned[self.position]
        return self.done + index + 1, self.done + running + sum(self.planned[self.position + 1 :])

    def end_pass(self) -> None:
        self.done += self.current
        self.current = 0
        self.position += 1


class DeviceWorker:
    def __init__(
        self,
        device: DeviceInfo,
        backend: Backend,
        emit: Callable[[AttemptUpdate], None],
        report_health: Callable[[HealthResult], None] | None = None,
    ) -> None:
        self.device = device
        self.backend = backend
        self.speeds = SpeedTable()  # measured here, reported in every stats message
        self._emit = emit
        self._report_health = report_health
        self._probing = False
        self._queue: queue.Queue[list[Task] | _Probe | None] = queue.Queue()
        self._tasks: dict[tuple[str, int], Task] = {}
        self._lock = threading.Lock()
        # The last peak of each job shape (model, kind, sizes, images, LoRAs,
        # ControlNets), so idle models can be evicted before a job that
        # needs their room.
        self._peaks: dict[tuple[object, ...], int] = {}
        # One thread, so updates leave in the order they were handed over.
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix=f"publish-{device.index}")
        self._thread = threading.Thread(
            target=self._loop, name=f"worker-{device.index}", daemon=True
        )
        self._thread.start()

    def submit(self, task: Task) -> None:
        self.submit_batch([task])

    def submit_batch(self, tasks: list[Task]) -> None:
        """Runs alike jobs (`sdmesh.spec.batch_key`) as one pipeline call,
        each with its own attempt: its own prompts, seeds, progress,
        previews, images and end."""
        with self._lock:
            for task in tasks:
                self._tasks[(task.job_id, task.attempt)] = task
        self._queue.put(tasks)

    def tasks(self) -> list[Task]:
        with self._lock:
            return list(self._tasks.values())

    def find(self, job_id: str, attempt: int) -> Task | None:
        with self._lock:
            return self._tasks.get((job_id, attempt))

    def check(self) -> None:
        """Queues a health probe unless one is waiting already."""
        with self._lock:
            if self._probing:
                return
            self._probing = True
        self._queue.put(_Probe())

    def _probe(self) -> None:
        try:
            detail = self.backend.health_check()
            result = HealthResult(self.device.index, True, detail)
        except Exception as exc:
            result = HealthResult(self.device.index, False, one_line(exc))
        with self._lock:
            self._probing = False
        if self._report_health is not None:
            self._report_health(result)

    def close(self, timeout: float | None = None) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        self._publisher.shutdown(wait=True)

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            if isinstance(batch, _Probe):
                self._probe()
                continue
            clean = False
            try:
                clean = self._run(batch)
            except Exception as exc:  # a bug here must not kill the device's thread
                log.exception(
                    "job %s attempt %d crashed the worker", batch[0].job_id, batch[0].attempt
                )
                self._end_all(batch, Ended(AttemptOutcome.FAILED, one_line(exc), "error"))
            finally:
                with self._lock:
                    for task in batch:
                        self._tasks.pop((task.job_id, task.attempt), None)
                # Hand the allocator's cache back, so that the free memory
                # NVML reports (and placement uses) is what is really free.
                # Only an attempt that left the pipeline by an exception can
                # have left reference cycles (a traceback's frames) holding
                # tensors; a full collection costs a quarter of a second.
                self.backend.release(collect=not clean)

    def _sender(self, task: Task) -> Callable[[Preview], None]:
        return lambda preview: self._send(task, preview)

    def _end_all(self, tasks: Sequence[Task], ended: Ended) -> None:
        for task in tasks:
            self._post(task, ended)

    def _wanted(self, tasks: Sequence[Task]) -> list[Task]:
        """The tasks not stopped; each stopped one is told it ended."""
        wanted = []
        for task in tasks:
            if task.stop_requested.is_set():
                self._post(task, self._stopped(task))
            else:
                wanted.append(task)
        return wanted

    def _send(self, task: Task, body: UpdateBody) -> None:
        self._emit(AttemptUpdate(task.job_id, task.attempt, body))

    def _post(self, task: Task, body: UpdateBody) -> None:
        """From the worker thread: sends `body` through the publisher, after
        whatever was handed to it before. Waking the asyncio loop costs the
        sender a GIL hand-off; the publisher pays it, not the compute."""
        self._publisher.submit(self._send, task, body)

    def _publish(
        self, task: Task, images: list[Any], profile: AttemptProfile, hashes: Mapping[str, str]
    ) -> None:
        """On the publisher: a finished attempt's PNGs, then its ending."""
        spec = task.spec
        try:
            for index, (image, seed) in enumerate(zip(images, spec.seeds, strict=True)):
                png = encode_png(image, infotext(spec, seed, hashes))
                self._send(task, ImageReady(index, seed, image.width, image.height, png))
        except Exception as exc:
            log.exception(
                "job %s attempt %d: encoding its images failed", task.job_id, task.attempt
            )
            self._send(task, Ended(AttemptOutcome.FAILED, one_line(exc), "error"))
            return
        self._send(task, Ended(AttemptOutcome.SUCCEEDED, profile=profile))

    def _out_of_memory(self, tasks: Sequence[Task], message: str, load_seconds: float) -> None:
        """Reports what the jobs had when they ran out, each failing its own
        attempt. The worker's loop frees the cache after, so the device
        stays usable. A batch's peak is no one job's: none is reported."""
        peak = self.backend.peak_bytes() if len(tasks) == 1 else 0
        profile = AttemptProfile(load_seconds, 0.0, peak)
        self._end_all(tasks, Ended(AttemptOutcome.FAILED, message, "oom", profile))

    def _stopped(self, task: Task) -> Ended:
        return Ended(task.stop_outcome, task.stop_reason)

    def _load(
        self, spec: JobSpec, mode: MemoryMode, passes: list[Pass]
    ) -> tuple[dict[Kind, Any], float]:
        """The pipeline of each kind of pass the job has (the hires fix's
        second pass is the same model's image-to-image pipeline, with the
        same LoRAs and ControlNets), and the seconds spent loading."""
        pipelines: dict[Kind, Any] = {}
        seconds = 0.0
        for kind in dict.fromkeys(step.kind for step in passes):
            # A plain txt2img job asks as it always has: backends (and test
            # doubles) that wrap `pipeline` keep working for it.
            extras: dict[str, Any] = {}
            if kind is not Kind.TXT2IMG or spec.loras or spec.controlnets:
                extras = {
                    "task": kind,
                    "controlnets": tuple(unit.model for unit in spec.controlnets),
                    "loras": spec.loras,
                }
            pipelines[kind], load_seconds = self.backend.pipeline(
                spec.model, spec.sampler_name, mode, **extras
            )
            seconds += load_seconds
        return pipelines, seconds

    def _run(self, batch: list[Task]) -> bool:
        """Runs one attempt, or alike attempts as one batch. False when the
        call left the pipeline by an exception, whose traceback may hold
        tensors in reference cycles."""
        wanted = self._wanted(batch)
        if not wanted:
            return True
        for task in wanted:
            self._post(task, Started())
        self.backend.begin_job()
        try:
            return self._run_started(wanted)
        finally:
            # LoRAs were activated for this job only: the next job on the
            # card must not see them, whatever happened.
            self.backend.end_job()

    def _run_started(self, wanted: list[Task]) -> bool:
        import torch

        lead = wanted[0]
        spec = lead.spec
        passes = plan(spec)
        try:
            pipelines, load_seconds = self._load(spec, lead.memory_mode, passes)
        except ModelUnavailable as exc:
            self._end_all(wanted, Ended(AttemptOutcome.FAILED, str(exc), "model"))
            return True
        except torch.OutOfMemoryError as exc:  # the weights alone did not fit
            self._out_of_memory(wanted, one_line(exc), 0.0)
            return False
        except Exception as exc:
            self._end_all(wanted, Ended(AttemptOutcome.FAILED, one_line(exc), "model"))
            return False
        # The pipeline's batch, in order. A job stopped mid-way keeps its
        # place in it (the call's tensors are sized), and its share is dropped.
        running = self._wanted(wanted)
        if not running:
            return True
        try:
            prepared = [prepare(task.spec, task.inputs) for task in running]
        except Exception as exc:  # an input that does not decode or is missing
            self._end_all(running, Ended(AttemptOutcome.FAILED, one_line(exc), "input"))
            return True
        images = sum(task.spec.batch_size for task in running)
        offsets = [sum(t.spec.batch_size for t in running[:i]) for i in range(len(running))]
        shape = (
            spec.model,
            spec.kind,
            spec.enable_hr,
            *spec.output_size,
            images,
            tuple(sorted(lora.name for lora in spec.loras)),  # weights change no memory
            tuple(unit.model for unit in spec.controlnets),
        )
        self.backend.make_room(spec.model, self._peaks.get(shape, 0))
        previewers = [Previewer(self._publisher, self._sender(task)) for task in running]
        still = set(range(len(running)))
        # The callbacks' times of each pass at the job's own size (the
        # speeds are per size), so that prompt encoding, the first step's
        # warm-up and decodes between passes do not count.
        step_times: list[list[float]] = []
        counter = StepCounter([])
        started = time.monotonic()

        def on_step_end(pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
            step_times[-1].append(time.monotonic())
            for position in list(still):
                task = running[position]
                if task.stop_requested.is_set():
                    still.discard(position)
                    self._post(task, self._stopped(task))
            if not still:
                raise AttemptStopped
            step, total = counter.step(index, int(getattr(pipe, "num_timesteps", 0) or 0))
            latents = tensors.get("latents")
            for position in sorted(still):
                task, offset = running[position], offsets[position]
                self._post(task, Progress(step, total))
                share = None if latents is None else latents[offset : offset + task.spec.batch_size]
                previewers[position].offer(step, total, share)
            return tensors

        def one_pass(step: Pass, iteration: int, carried: Any) -> Any:
            pipeline = pipelines[step.kind]
            step_times.append([])
            call = arguments(
                pipeline, step, [t.spec for t in running], prepared, iteration, on_step_end, carried
            )
            result = pipeline(**call).images
            if step.width != spec.width or step.height != spec.height:
                step_times.pop()
            counter.end_pass()
            return result

        for tries in (1, 2):
            out_of_memory = ""
            counter = StepCounter([step.expected_steps for step in passes] * spec.n_iter)
            try:
                outputs = self._iterations(running, passes, prepared, offsets, one_pass)
                break
            except AttemptStopped:
                return False  # each was told when it stopped
            except torch.OutOfMemoryError as exc:
                out_of_memory = one_line(exc)
            except Exception as exc:
                failed = Ended(AttemptOutcome.FAILED, one_line(exc), "error")
                self._end_all([running[p] for p in sorted(still)], failed)
                return False
            # Out of the handler, the failed call's tensors are free.
            if tries == 1 and self.backend.evict_others(spec.model):
                log.warning(
                    "job %s attempt %d ran out of memory beside other resident models; "
                    "evicted them and running it again",
                    lead.job_id,
                    lead.attempt,
                )
                self.backend.begin_job()
                step_times.clear()
                continue
            self._out_of_memory([running[p] for p in sorted(still)], out_of_memory, load_seconds)
            return False
        intervals = sum(len(times) - 1 for times in step_times if times)
        if intervals:
            mean_step = sum(times[-1] - times[0] for times in step_times if times) / intervals
        else:
            mean_step = step_times[0][0] - started if step_times and step_times[0] else 0.0
        peak = self.backend.peak_bytes()
        if peak:
            self._peaks[shape] = peak
        # Every memory mode is measured: offloaded speeds are what placement
        # weighs a job that only fits offloaded by. A step moves every image.
        mode = MemoryMode.FULL if lead.memory_mode is MemoryMode.AUTO else lead.memory_mode
        self.speeds.record(
            spec.model, spec.width, spec.height, images, mean_step, load_seconds, mode
        )
        # A batch's peak is no one job's: the scheduler learns peaks per job.
        profile = AttemptProfile(load_seconds, mean_step, peak if len(running) == 1 else 0)
        hashes = dict(self.backend.hashes())
        for position, task in enumerate(running):
            if position in still:
                self._publisher.submit(self._publish, task, outputs[position], profile, hashes)
        return True

    @staticmethod
    def _iterations(
        running: list[Task],
        passes: list[Pass],
        prepared: list[Prepared],
        offsets: list[int],
        one_pass: Callable[[Pass, int, Any], Any],
    ) -> list[list[Any]]:
        """Every iteration's passes, one after another: each job's pictures,
        `batch_size` an iteration, laid over its original when inpainted."""
        lead = running[0].spec
        outputs: list[list[Any]] = [[] for _ in running]
        for iteration in range(lead.n_iter):
            carried = None
            for number, step in enumerate(passes):
                result = one_pass(step, iteration, carried)
                if number + 1 < len(passes):
                    carried = upscale(result, lead)
            pictures = list(result)
            for position, task in enumerate(running):
                share = pictures[offsets[position] : offsets[position] + task.spec.batch_size]
                outputs[position].extend(finish(prepared[position], image) for image in share)
        return outputs
