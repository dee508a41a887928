"""The node agent: dials the scheduler, says hello, sends stats every
heartbeat, runs what it is assigned on its device workers and streams every
step, preview and image back.

This module is the agent's type boundary: worker events become protobuf
here, and scheduler messages become tasks. The agent survives the scheduler
going away: it stops what it was running (the scheduler re-queues it) and
dials again with backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import grpc
from grpc import aio

from gpu_node.catalog import Catalog
from gpu_node.identity import DataDirLock, Identity, load_identity
from gpu_node.pipelines import quiet_libraries
from gpu_node.probe import Probe, detect_probe, host_memory
from gpu_node.runner import (
    DeviceWorker,
    Ended,
    ImageReady,
    Started,
    StepDone,
    Task,
    WorkerEvent,
)
from protos import agent_pb2, agent_pb2_grpc, common_pb2
from scheduler.convert import (
    device_stats_to_proto,
    hello_to_proto,
    memory_mode_from_proto,
    preview_to_proto,
    profile_to_proto,
    spec_from_proto,
)
from scheduler.domain import AttemptOutcome, DeviceInfo, DeviceStats, NodeInfo, Preview

log = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES = 256 * 1024
MAX_BACKOFF_SECONDS = 10.0
SHUTDOWN_GRACE_SECONDS = 30.0
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_OUTCOMES = {
    AttemptOutcome.SUCCEEDED: agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    AttemptOutcome.FAILED: agent_pb2.ATTEMPT_OUTCOME_FAILED,
    AttemptOutcome.STOPPED: agent_pb2.ATTEMPT_OUTCOME_STOPPED,
    AttemptOutcome.RELEASED: agent_pb2.ATTEMPT_OUTCOME_RELEASED,
}


def agent_version() -> str:
    try:
        return metadata.version("sdmesh")
    except metadata.PackageNotFoundError:
        return "dev"


@dataclass(frozen=True)
class AgentConfig:
    scheduler: str
    data_dir: Path
    models_dir: Path | None = None
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    gpus: tuple[int, ...] | None = None  # device indexes to use; None: all
    synthetic_models: dict[str, int] = field(default_factory=dict)  # simulated GPUs only


def job_updates(event: WorkerEvent) -> list[agent_pb2.JobUpdate]:
    """The protobuf messages for one worker event; an image takes several."""
    body = event.body
    update = agent_pb2.JobUpdate(job_id=event.job_id, attempt=event.attempt)
    if isinstance(body, Started):
        update.started.SetInParent()
    elif isinstance(body, StepDone):
        update.progress.CopyFrom(common_pb2.Progress(step=body.step, total_steps=body.total_steps))
    elif isinstance(body, Preview):
        update.preview.CopyFrom(preview_to_proto(body))
    elif isinstance(body, Ended):
        update.ended.CopyFrom(
            agent_pb2.AttemptEnded(
                outcome=_OUTCOMES[body.outcome],
                reason=body.reason,
                error_kind=body.error_kind,
                profile=profile_to_proto(body.profile),
            )
        )
    else:
        return _image_updates(event.job_id, event.attempt, body)
    return [update]


def _image_updates(job_id: str, attempt: int, image: ImageReady) -> list[agent_pb2.JobUpdate]:
    data = image.png
    offsets = range(0, len(data), UPLOAD_CHUNK_BYTES) or range(1)
    updates = []
    for offset in offsets:
        last = offset + UPLOAD_CHUNK_BYTES >= len(data)
        chunk = agent_pb2.ImageUpload(
            index=image.index,
            seed=image.seed,
            width=image.width,
            height=image.height,
            offset=offset,
            data=data[offset : offset + UPLOAD_CHUNK_BYTES],
            last=last,
        )
        if last:
            chunk.sha256 = hashlib.sha256(data).hexdigest()
            chunk.size_bytes = len(data)
        updates.append(agent_pb2.JobUpdate(job_id=job_id, attempt=attempt, image=chunk))
    return updates


def select_devices(devices: list[DeviceInfo], wanted: tuple[int, ...] | None) -> list[DeviceInfo]:
    """The devices `--gpus` names (all when it is not given)."""
    if wanted is None:
        return devices
    by_index = {device.index: device for device in devices}
    missing = [index for index in wanted if index not in by_index]
    if missing:
        have = ", ".join(str(index) for index in sorted(by_index)) or "none"
        raise ValueError(
            f"--gpus {','.join(map(str, wanted))}: no device {missing[0]}; this host has {have}"
        )
    return [by_index[index] for index in sorted(set(wanted))]


class Agent:
    def __init__(self, config: AgentConfig, probe: Probe | None = None) -> None:
        self.config = config
        self.probe = probe
        self.lock = DataDirLock(config.data_dir)
        self.catalog = Catalog(config.data_dir, config.models_dir, config.synthetic_models)
        self.devices: list[DeviceInfo] = []
        self.identity: Identity | None = None
        self.workers: dict[int, DeviceWorker] = {}
        self.draining = False
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage | None] | None = None
        self._live: set[tuple[str, int]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def prepare(self) -> None:
        """Claims the data dir, finds devices and models, starts workers."""
        self.lock.acquire()
        self._loop = asyncio.get_running_loop()
        probe = self.probe = self.probe or detect_probe()
        devices = self.devices = select_devices(probe.devices(), self.config.gpus)
        self.identity = load_identity(self.config.data_dir, self.config.name, devices)
        quiet_libraries()  # imports torch and diffusers now, not in the first job
        models = self.catalog.scan()
        for device in devices:
            backend = probe.backend(device.index, self.catalog)
            self.workers[device.index] = DeviceWorker(device, backend, self._emit)
        log.info(
            "agent %s (%s): %s; models: %s",
            self.identity.name,
            self.identity.node_id,
            ", ".join(f"[{d.index}] {d.name}" for d in devices),
            ", ".join(m.name for m in models),
        )

    def node_info(self) -> NodeInfo:
        assert self.identity is not None and self.probe is not None
        return NodeInfo(
            node_id=self.identity.node_id,
            name=self.identity.name,
            hostname=socket.gethostname(),
            agent_version=agent_version(),
            devices=tuple(self.devices),
            models=tuple(model.info for model in self.catalog.models.values()),
            labels=dict(self.config.labels),
        )

    # ---- worker events (called from worker and preview threads) --------

    def _emit(self, event: WorkerEvent) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: WorkerEvent) -> None:
        if isinstance(event.body, Ended):
            self._live.discard((event.job_id, event.attempt))
            if not self._live:
                self._idle.set()
            log.info(
                "job %s attempt %d %s%s",
                event.job_id,
                event.attempt,
                event.body.outcome.value,
                f": {event.body.reason}" if event.body.reason else "",
            )
        outbox = self._outbox
        if outbox is None:
            return  # not connected: the scheduler has re-queued this attempt
        for update in job_updates(event):
            outbox.put_nowait(agent_pb2.AgentMessage(job=update))

    # ---- scheduler messages ---------------------------------------------

    def _assign(self, assignment: agent_pb2.Assignment) -> None:
        worker = self.workers.get(assignment.gpu_index)
        for job in assignment.jobs:
            self._live.add((job.job_id, job.attempt))
            self._idle.clear()
            try:
                if worker is None:
                    raise ValueError(f"this node has no device {assignment.gpu_index}")
                task = Task(
                    job.job_id,
                    job.attempt,
                    spec_from_proto(job.spec),
                    memory_mode_from_proto(job.memory_mode),
                )
            except ValueError as exc:  # InvalidArgument is one too
                failed = Ended(AttemptOutcome.FAILED, f"bad assignment: {exc}", "error")
                self._emit(WorkerEvent(job.job_id, job.attempt, failed))
                continue
            if self.draining:
                task.stop(AttemptOutcome.RELEASED, "node is draining")
            log.info(
                "job %s attempt %d assigned to device %d",
                job.job_id,
                job.attempt,
                assignment.gpu_index,
            )
            worker.submit(task)

    def _tasks(self) -> list[Task]:
        return [task for worker in self.workers.values() for task in worker.tasks()]

    def _stop(self, stop: agent_pb2.StopAttempt) -> None:
        for worker in self.workers.values():
            task = worker.find(stop.job_id, stop.attempt)
            if task is not None:
                log.info("stopping job %s attempt %d: %s", stop.job_id, stop.attempt, stop.reason)
                task.stop(AttemptOutcome.STOPPED, stop.reason)

    def _drain(self) -> None:
        """Finishes what runs; hands back what only waits."""
        self.draining = True
        for worker in self.workers.values():
            for position, task in enumerate(worker.tasks()):
                if position > 0:
                    task.stop(AttemptOutcome.RELEASED, "node is draining")
        log.info("draining: no new work will start here")

    def stop_all(self, outcome: AttemptOutcome, reason: str) -> None:
        for task in self._tasks():
            task.stop(outcome, reason)

    # ---- the connection -------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Connects and reconnects until `stopping` is set."""
        backoff = 0.5
        while not stopping.is_set():
            try:
                connected = await self._session(stopping)
            except aio.AioRpcError as exc:
                connected = False
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise SystemExit(f"the scheduler refused this agent: {exc.details()}") from None
                log.warning(
                    "scheduler %s: %s: %s",
                    self.config.scheduler,
                    exc.code().name,
                    exc.details() or "no details",
                )
            if stopping.is_set():
                break
            # Whatever ran belongs to the old session: the scheduler has
            # re-queued it. Free the devices for the new one.
            self.stop_all(AttemptOutcome.STOPPED, "lost the connection to the scheduler")
            backoff = 0.5 if connected else min(backoff * 2, MAX_BACKOFF_SECONDS)
            delay = backoff * random.uniform(0.8, 1.2)
            log.info("reconnecting in %.1fs", delay)
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except TimeoutError:
                pass

    async def _session(self, stopping: asyncio.Event) -> bool:
        """One stream; returns whether it got as far as the welcome."""
        outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        outbox.put_nowait(agent_pb2.AgentMessage(hello=hello_to_proto(self.node_info())))

        async def requests() -> AsyncIterator[agent_pb2.AgentMessage]:
            while (message := await outbox.get()) is not None:
                yield message

        welcomed = False
        helpers: list[asyncio.Task[None]] = []
        async with aio.insecure_channel(self.config.scheduler, options=CHANNEL_OPTIONS) as channel:
            call = agent_pb2_grpc.AgentGatewayStub(channel).Connect(requests())
            try:
                async for message in call:
                    kind = message.WhichOneof("body")
                    if kind == "welcome":
                        welcomed = True
                        self._outbox = outbox
                        log.info("connected to scheduler %s", self.config.scheduler)
                        heartbeat = message.welcome.heartbeat_seconds or 2.0
                        helpers = [
                            asyncio.create_task(self._send_stats(outbox, heartbeat)),
                            asyncio.create_task(self._leave_when(stopping, outbox, call)),
                        ]
                    elif kind == "assign":
                        self._assign(message.assign)
                    elif kind == "stop":
                        self._stop(message.stop)
                    elif kind == "drain":
                        self._drain()
            finally:
                self._outbox = None
                outbox.put_nowait(None)
                for helper in helpers:
                    helper.cancel()
        return welcomed

    async def _send_stats(
        self, outbox: asyncio.Queue[agent_pb2.AgentMessage | None], heartbeat: float
    ) -> None:
        assert self.probe is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                stats = await loop.run_in_executor(None, self.probe.stats)
                host_total, host_free = host_memory()
            except Exception as exc:  # an NVML error after a GPU fault, say
                log.warning("reading device stats failed: %s: %s", type(exc).__name__, exc)
            else:
                message = agent_pb2.Stats(
                    devices=[
                        device_stats_to_proto(self._with_worker(s))
                        for s in stats
                        if s.index in self.workers
                    ],
                    host_total_bytes=host_total,
                    host_free_bytes=host_free,
                )
                outbox.put_nowait(agent_pb2.AgentMessage(stats=message))
            await asyncio.sleep(heartbeat)

    def _with_worker(self, stats: DeviceStats) -> DeviceStats:
        """Adds what only the device's worker knows: the resident model and
        the speeds it measured."""
        worker = self.workers[stats.index]
        return replace(
            stats, resident_models=worker.backend.resident(), speeds=dict(worker.speeds.speeds)
        )

    async def _leave_when(
        self,
        stopping: asyncio.Event,
        outbox: asyncio.Queue[agent_pb2.AgentMessage | None],
        call: aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.SchedulerMessage],
    ) -> None:
        """On shutdown: hand back every attempt, let the scheduler hear it,
        then close the stream."""
        await stopping.wait()
        self.stop_all(AttemptOutcome.RELEASED, "agent shutting down")
        try:
            await asyncio.wait_for(self._idle.wait(), SHUTDOWN_GRACE_SECONDS)
        except TimeoutError:
            log.warning("some work did not stop in %ss", SHUTDOWN_GRACE_SECONDS)
        outbox.put_nowait(None)  # ends the request stream; the server then closes
        await asyncio.sleep(SHUTDOWN_GRACE_SECONDS)
        call.cancel()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close(timeout=SHUTDOWN_GRACE_SECONDS)
        self.lock.release()


async def run_agent(config: AgentConfig, probe: Probe | None = None) -> None:
    """Runs an agent until SIGINT or SIGTERM."""
    agent = Agent(config, probe)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    agent.prepare()
    try:
        await agent.run(stopping)
    finally:
        agent.stop_all(AttemptOutcome.RELEASED, "agent shutting down")
        await loop.run_in_executor(None, agent.close)
        log.info("agent stopped")
