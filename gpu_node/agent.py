"""The node agent: dials the scheduler, says hello, sends stats every
heartbeat, runs what it is assigned on its device workers and streams every
step, preview and image back.

The agent outlives its scheduler connection. When the stream drops (the
scheduler restarted, failed over, or the network went away) the work goes
on; the journal keeps each attempt's durable outcome, and the next hello
lists what the agent holds so the scheduler can re-attach it. The agent
dials the scheduler addresses in turn with jittered backoff, and treats a
scheduler that sends nothing for its lease as gone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
from grpc import aio

from gpu_node.catalog import Catalog
from gpu_node.config import AgentConfig
from gpu_node.enrollment import (
    Credential,
    enroll,
    join_token,
    load_credential,
    save_credential,
)
from gpu_node.hardware import configured_probe, select_devices, synthetic_models
from gpu_node.identity import Identity, load_identity
from gpu_node.inputs import InputCache, Waiting
from gpu_node.journal import Journal
from gpu_node.pipelines import quiet_libraries
from gpu_node.probe import Probe, detect_probe, host_memory
from gpu_node.runner import DeviceWorker, HealthResult, Task
from protos import agent_pb2, agent_pb2_grpc
from sdmesh.convert import (
    device_stats_to_proto,
    hello_to_proto,
    memory_mode_from_proto,
    spec_from_proto,
    update_to_protos,
)
from sdmesh.datadir import DataDirLock
from sdmesh.dialing import FirstContact
from sdmesh.domain import AttemptOutcome, AttemptUpdate, DeviceInfo, DeviceStats, Ended, NodeInfo
from sdmesh.spec import batch_key
from sdmesh.tls import TlsFiles
from sdmesh.waiting import wait_event
from sdmesh.wire import (
    AGENT_FIRST_BACKOFF_SECONDS,
    AGENT_MAX_BACKOFF_SECONDS,
    Backoff,
    agent_channel_options,
    is_standby,
    leader_hint,
    open_channel,
    package_version,
)

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 10.0
AGENT_TLS_FLAGS = ("--ca-cert", "--tls-cert", "--tls-key")
# Answers that no redial can change: the agent stops with the reason.
REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)
Outbox = asyncio.Queue[agent_pb2.AgentMessage | None]


def redial_backoff() -> Backoff:
    return Backoff(AGENT_FIRST_BACKOFF_SECONDS, AGENT_MAX_BACKOFF_SECONDS)


class Agent:
    def __init__(self, config: AgentConfig, probe: Probe | None = None) -> None:
        self.config = config
        self.probe = probe
        self.lock = DataDirLock(config.data_dir)
        self.catalog = Catalog(
            config.data_dir,
            config.models_dir,
            synthetic_models(config),
            tiny_variants=config.tiny_variants,
        )
        self.devices: list[DeviceInfo] = []
        self.identity: Identity | None = None
        self.credential: Credential | None = None  # None: not enrolled (or --no-auth)
        self.tls = TlsFiles(config.ca_cert, config.tls_cert, config.tls_key, flags=AGENT_TLS_FLAGS)
        self.workers: dict[int, DeviceWorker] = {}
        self.waiting = Waiting(InputCache(config.data_dir / "inputs"), self._submit, self._failed)
        self.draining = False
        self.lease_seconds = DEFAULT_LEASE_SECONDS
        self.journal = Journal(keep_seconds=2 * DEFAULT_LEASE_SECONDS)
        self._outbox: Outbox | None = None
        self._live: set[tuple[str, int]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_timer: asyncio.TimerHandle | None = None
        self._leaving = False  # SIGTERM: no new work, then away
        self._no_more_work = asyncio.Event()  # the scheduler said it sends none
        self._heard = 0.0  # when the scheduler last said anything
        self._loop: asyncio.AbstractEventLoop | None = None

    def prepare(self) -> None:
        """Claims the data dir, finds devices and models, starts workers."""
        self.lock.acquire()
        self.tls.credentials()  # a wrong TLS file stops the agent now, naming its flag
        self._loop = asyncio.get_running_loop()
        probe = self.probe = self.probe or detect_probe()
        devices = self.devices = select_devices(probe.devices(), self.config.gpus)
        self.identity = load_identity(self.config.data_dir, self.config.name, devices)
        self.credential = load_credential(self.config.data_dir, self.identity.node_id)
        quiet_libraries()  # imports torch and diffusers now, not in the first job
        models = self.catalog.scan()
        for device in devices:
            backend = probe.backend(device.index, self.catalog)
            self.workers[device.index] = DeviceWorker(
                device, backend, self._emit, self._health_reported
            )
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
            agent_version=package_version(),
            devices=tuple(self.devices),
            models=tuple(model.info for model in self.catalog.models.values()),
            # The labels the join token fixed win; the scheduler enforces them too.
            labels={**self.config.labels, **(self.credential.labels if self.credential else {})},
        )

    def hello(self) -> agent_pb2.Hello:
        hello = hello_to_proto(self.node_info())
        hello.draining = self.draining
        for entry in self.journal.held(time.monotonic()):
            hello.held.add(job_id=entry.job_id, attempt=entry.attempt, gpu_index=entry.gpu_index)
        return hello

    # ---- worker events (called from worker and preview threads) --------

    def _emit(self, event: AttemptUpdate) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, event)

    def _health_reported(self, result: HealthResult) -> None:
        assert self._loop is not None
        message = agent_pb2.AgentMessage(
            health=agent_pb2.HealthReport(
                gpu_index=result.gpu_index, healthy=result.healthy, detail=result.detail
            )
        )
        self._loop.call_soon_threadsafe(self._send, message)

    def _send(self, message: agent_pb2.AgentMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    def _deliver(self, event: AttemptUpdate) -> None:
        self.journal.record(event, time.monotonic(), connected=self._outbox is not None)
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
        # Not connected: the journal keeps what matters until the next stream.
        for update in update_to_protos(event):
            self._send(agent_pb2.AgentMessage(job=update))

    # ---- scheduler messages ---------------------------------------------

    def _assign(self, assignment: agent_pb2.Assignment) -> None:
        """One job, or alike jobs the scheduler batched: those run as one
        pipeline call, each with its own attempt."""
        worker = self.workers.get(assignment.gpu_index)
        tasks: list[Task] = []
        for job in assignment.jobs:
            self._live.add((job.job_id, job.attempt))
            self._idle.clear()
            self.journal.assigned(job.job_id, job.attempt, assignment.gpu_index)
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
                self._emit(AttemptUpdate(job.job_id, job.attempt, failed))
                continue
            if self.draining:
                task.stop(AttemptOutcome.RELEASED, "node is draining")
            log.info(
                "job %s attempt %d assigned to device %d",
                job.job_id,
                job.attempt,
                assignment.gpu_index,
            )
            tasks.append(task)
        if worker is None or not tasks:
            return
        if any(task.spec.inputs for task in tasks):
            self.waiting.start(worker, tasks)  # then to the worker, once they are here
            return
        self._submit(worker, tasks)

    def _failed(self, task: Task, reason: str) -> None:
        self._emit(
            AttemptUpdate(task.job_id, task.attempt, Ended(AttemptOutcome.FAILED, reason, "input"))
        )

    def _submit(self, worker: DeviceWorker, tasks: list[Task]) -> None:
        lead = tasks[0]
        alike = all(
            batch_key(task.spec) == batch_key(lead.spec) and task.memory_mode is lead.memory_mode
            for task in tasks
        )
        if len(tasks) > 1 and alike:
            for task in tasks:
                task.batch = lead.job_id
            worker.submit_batch(tasks)
            return
        for task in tasks:  # not alike after all: one after another
            worker.submit(task)

    def _tasks(self) -> list[Task]:
        running = [task for worker in self.workers.values() for task in worker.tasks()]
        return running + self.waiting.tasks()

    def _stop(self, stop: agent_pb2.StopAttempt) -> None:
        found = [worker.find(stop.job_id, stop.attempt) for worker in self.workers.values()]
        for task in (self.waiting.find(stop.job_id, stop.attempt), *found):
            if task is not None:
                log.info("stopping job %s attempt %d: %s", stop.job_id, stop.attempt, stop.reason)
                task.stop(AttemptOutcome.STOPPED, stop.reason)
        self.journal.forget(stop.job_id, stop.attempt)

    def _drain(self, timeout: float | None = None) -> None:
        """Takes no new work, hands back what only waits, and lets what runs
        finish for `timeout` seconds before handing it back too."""
        self.draining = True
        for task in self.waiting.tasks():  # waiting for inputs: not started
            task.stop(AttemptOutcome.RELEASED, "node is draining")
        for worker in self.workers.values():
            tasks = worker.tasks()
            for position, task in enumerate(tasks):
                # What waits behind the running job, or the batch running.
                running = position == 0 or (task.batch and task.batch == tasks[0].batch)
                if not running:
                    task.stop(AttemptOutcome.RELEASED, "node is draining")
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._loop is not None:
            self._drain_timer = self._loop.call_later(timeout, self._drain_expired, timeout)
        log.info("draining: no new work will start here; running jobs get %gs", timeout)

    def _drain_expired(self, timeout: float) -> None:
        self._drain_timer = None
        if self._tasks():
            log.info("drain timeout: handing back what still runs")
        self.stop_all(AttemptOutcome.RELEASED, f"node drained; not finished within {timeout:g}s")

    def _resume(self) -> None:
        self.draining = False
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        log.info("resumed: taking work again")

    def stop_all(self, outcome: AttemptOutcome, reason: str) -> None:
        for task in self._tasks():
            task.stop(outcome, reason)

    # ---- the connection -------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Connects, and reconnects, until `stopping` is set and the work is
        handed over. Raises GaveUp if it never gets through because of a
        mistake waiting cannot mend (see `sdmesh.dialing.FirstContact`)."""
        addresses = self.config.addresses
        contact = FirstContact(addresses, self.config.reconnect_timeout, tls=self.tls.enabled)
        await self._enroll(stopping, contact)
        position = 0
        backoff = redial_backoff()
        while not stopping.is_set():
            address = addresses[position % len(addresses)]
            try:
                if await self._session(address, stopping):
                    contact.reached()
                    backoff.reset()  # it was up: start over
            except aio.AioRpcError as exc:
                if exc.code() in REFUSED:
                    raise SystemExit(f"the scheduler refused this agent: {exc.details()}") from None
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    log.warning("%s", contact.failed(address, exc))
                    # Down, or a standby: the leader it names if we know
                    # that address, else the next replica.
                    leader = leader_hint(exc)
                    position = addresses.index(leader) if leader in addresses else position + 1
                    if is_standby(exc):
                        backoff.reset()  # a live replica: the leader is near
                else:
                    log.warning(
                        "scheduler %s: %s: %s",
                        address,
                        exc.code().name,
                        exc.details() or "no details",
                    )
            if stopping.is_set():
                break
            delay = backoff.next()
            log.info("reconnecting in %.1fs; the work here goes on", delay)
            await wait_event(stopping, delay)

    async def _enroll(self, stopping: asyncio.Event, contact: FirstContact) -> None:
        """With a join token and no credential yet: trade the one for the
        other, once, and keep the credential in the data dir."""
        token = join_token(self.config.join_token)
        if self.credential is not None or not token:
            return
        assert self.identity is not None
        credential = await enroll(
            self.config.addresses,
            token,
            self.identity.node_id,
            self.identity.name,
            self.tls,
            stopping,
            contact,
        )
        if credential is not None:
            save_credential(self.config.data_dir, credential)
            self.credential = credential

    async def _session(self, address: str, stopping: asyncio.Event) -> bool:
        """One stream; returns whether it got as far as the welcome."""
        outbox: Outbox = asyncio.Queue()
        outbox.put_nowait(agent_pb2.AgentMessage(hello=self.hello()))

        async def requests() -> AsyncIterator[agent_pb2.AgentMessage]:
            while (message := await outbox.get()) is not None:
                yield message

        welcomed = False
        self._heard = time.monotonic()
        helpers: list[asyncio.Task[None]] = []
        metadata = self.credential.metadata() if self.credential else None
        async with open_channel(address, agent_channel_options(), self.tls) as channel:
            self.waiting.channel, self.waiting.metadata = channel, metadata
            call = agent_pb2_grpc.AgentGatewayStub(channel).Connect(requests(), metadata=metadata)
            try:
                async for message in call:
                    self._heard = time.monotonic()
                    kind = message.WhichOneof("body")
                    if kind == "welcome":
                        welcomed = True
                        heartbeat = message.welcome.heartbeat_seconds or 2.0
                        self.lease_seconds = message.welcome.lease_seconds or 5 * heartbeat
                        self.journal.keep_seconds = 2 * self.lease_seconds
                        self._replay(outbox)
                        self._outbox = outbox
                        log.info("connected to scheduler %s", address)
                        helpers = [
                            asyncio.create_task(self._send_stats(outbox, heartbeat)),
                            asyncio.create_task(self._leave_when(stopping, outbox)),
                            asyncio.create_task(self._watch(call)),
                        ]
                    elif kind == "assign":
                        self._assign(message.assign)
                    elif kind == "stop":
                        self._stop(message.stop)
                    elif kind == "drain":
                        if self._leaving:
                            # The answer to our Leaving: nothing more is
                            # coming, and our own shutdown timeout holds.
                            self._no_more_work.set()
                        else:
                            self._drain(message.drain.timeout_seconds or None)
                    elif kind == "resume":
                        self._resume()
                    elif kind == "check":
                        worker = self.workers.get(message.check.gpu_index)
                        if worker is not None:
                            worker.check()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this task is being cancelled, not just the call
                if not stopping.is_set():  # the watchdog gave up on a silent scheduler
                    log.warning("scheduler %s went silent; dialling again", address)
            finally:
                self._outbox = None
                self.waiting.channel = None
                outbox.put_nowait(None)
                for helper in helpers:
                    helper.cancel()
        return welcomed

    def _replay(self, outbox: Outbox) -> None:
        """Sends the durable history of every attempt the hello listed. The
        scheduler keeps what it re-attached and stops the rest."""
        now = time.monotonic()
        for entry in self.journal.held(now):
            for event in entry.replay():
                for update in update_to_protos(event):
                    outbox.put_nowait(agent_pb2.AgentMessage(job=update))
        self.journal.delivered(now)

    async def _watch(
        self,
        call: aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.SchedulerMessage],
    ) -> None:
        """Ends a stream on which the scheduler has said nothing, not even
        its ping, for a whole lease: a paused process or a partition that
        drops packets shows up no other way."""
        while True:
            await asyncio.sleep(self.lease_seconds / 4)
            if time.monotonic() - self._heard > self.lease_seconds:
                call.cancel()
                return

    async def _send_stats(self, outbox: Outbox, heartbeat: float) -> None:
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

    async def _leave_when(self, stopping: asyncio.Event, outbox: Outbox) -> None:
        """On shutdown: tell the scheduler, which answers once it will send
        no more work (so whatever it sent before is here); let running jobs
        finish for the shutdown timeout, then hand them back; let the
        scheduler hear every outcome; then end the request stream. The
        scheduler ends the call once it has read that far, and `_session`
        returns; a scheduler that goes silent instead is left to the
        watchdog."""
        await stopping.wait()
        timeout = self.config.shutdown_timeout
        self._leaving = True
        self._drain(timeout)
        outbox.put_nowait(agent_pb2.AgentMessage(leaving=agent_pb2.Leaving()))
        if not await wait_event(self._no_more_work, self.lease_seconds):
            log.warning("the scheduler did not answer our leaving; going anyway")
        if not await wait_event(self._idle, timeout + 30.0):
            log.warning("some work did not stop within %gs of being handed back", 30.0)
        outbox.put_nowait(None)

    def hand_back_now(self) -> None:
        """A second stop signal: what still runs is handed back at once
        rather than given the rest of the shutdown timeout."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self._tasks():
            log.info("handing back what still runs, now")
        self.stop_all(AttemptOutcome.RELEASED, "agent stopped at once")

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close(timeout=10.0)
        self.lock.release()


async def run_agent(config: AgentConfig, probe: Probe | None = None) -> None:
    """Runs an agent until SIGINT or SIGTERM. Running jobs get the shutdown
    timeout to finish; a second signal hands them back at once."""
    config.check()
    agent = Agent(config, probe or configured_probe(config))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stopping.is_set():
            agent.hand_back_now()
        else:
            stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    agent.prepare()
    try:
        await agent.run(stopping)
    finally:
        agent.stop_all(AttemptOutcome.RELEASED, "agent shutting down")
        await loop.run_in_executor(None, agent.close)
        log.info("agent stopped")
