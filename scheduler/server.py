"""Wires the scheduler together and runs it: the store, the in-memory
cluster and event hub, the dispatcher, liveness, and the two gRPC services.

A scheduler is one replica. Replicas sharing a database contend for the
leader lease; the one that holds it leads (dispatches, talks to agents,
answers clients) and the others wait as standbys, answering only GetHealth.
A leader that loses the lease (it was paused past it, or lost its database)
steps down at once: its writes are fenced by the epoch anyway, and its
agents and clients move on to the new leader. A single scheduler is the
same thing with nobody to contend with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from protos import agent_pb2_grpc, scheduler_pb2_grpc
from scheduler.agents import AgentGateway
from scheduler.cluster import ActiveAttempt, Cluster, Orphan
from scheduler.datadir import DataDirLock
from scheduler.dispatcher import Dispatcher
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.interceptors import ErrorInterceptor, LeaderInterceptor, PrincipalInterceptor
from scheduler.liveness import LivenessConfig, Supervisor
from scheduler.placement import RESERVE_AFTER_SECONDS
from scheduler.replica import ReplicaState, load_replica_id
from scheduler.runtime import Runtime
from scheduler.service import SchedulerService
from scheduler.store import Database, Store
from scheduler.store.leader import LeaderLease
from scheduler.waiting import wait_event

log = logging.getLogger(__name__)

NODE_TOUCH_SECONDS = 60.0
# The agents' longest reconnect backoff (gpu_node.agent.MAX_BACKOFF_SECONDS):
# a new leader waits this much longer than the lease for them to come back.
MAX_BACKOFF_SECONDS = 5.0

# Agents ping every 5 s; the server must accept pings that often, or it
# answers with GOAWAY "too_many_pings".
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 4000),
    ("grpc.http2.max_ping_strikes", 0),
]


@dataclass(frozen=True)
class SchedulerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    db_url: str = ""  # default: SQLite in the data dir
    heartbeat_seconds: float = 2.0
    # Agents silent this long are lost; so is a leader that cannot renew.
    lease_seconds: float = 10.0
    progress_deadline_seconds: float = 60.0
    node_window_seconds: float = 24 * 3600.0
    max_attempts: int = 3
    reserve_after_seconds: float = RESERVE_AFTER_SECONDS
    advertise: str = ""  # the address others reach this replica at; default host:port
    # Replicas must share it (a network filesystem), so that the leader can
    # serve images another replica stored. Default: images/ in the data dir.
    images_dir: Path | None = None

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'sdmesh.db'}"

    @property
    def liveness(self) -> LivenessConfig:
        return LivenessConfig(
            heartbeat_seconds=self.heartbeat_seconds,
            lease_seconds=self.lease_seconds,
            progress_deadline_seconds=self.progress_deadline_seconds,
        )


class SchedulerServer:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.clock = time.time
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.lock = DataDirLock(config.data_dir, role="scheduler")
        self.lock.acquire()
        store = Store(config.database_url, clock=self.clock)
        store.migrate()
        self.db = Database(store)
        self.replica = ReplicaState(load_replica_id(config.data_dir), config.advertise)
        self.lease = LeaderLease(store.engine, self.replica.replica_id, config.advertise)
        self.cluster = Cluster()
        self.hub = EventHub()
        estimates = EstimateBook({})
        self.dispatcher = Dispatcher(
            self.db,
            self.cluster,
            self.hub,
            self.clock,
            estimates,
            reserve_after_seconds=config.reserve_after_seconds,
            node_window_seconds=config.node_window_seconds,
        )
        self.images = ImageStore(config.images_dir or config.data_dir / "images")
        runtime = Runtime(
            self.db,
            self.cluster,
            self.hub,
            self.dispatcher,
            self.images,
            self.clock,
            estimates,
        )
        self.supervisor = Supervisor(runtime, config.liveness)
        self.gateway = AgentGateway(runtime, self.supervisor)
        self.service = SchedulerService(
            runtime,
            self.replica,
            node_window_seconds=config.node_window_seconds,
            max_attempts=config.max_attempts,
        )
        self.server = aio.server(
            interceptors=[
                ErrorInterceptor(),
                LeaderInterceptor(self.replica),
                PrincipalInterceptor(),
            ],
            options=SERVER_OPTIONS,
        )
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.service, self.server)
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(self.gateway, self.server)
        self._leading: list[asyncio.Task[None]] = []
        self._replica_task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._stopped = False
        self.port = 0

    @property
    def address(self) -> str:
        return self.replica.address

    async def start(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        advertise = self.config.advertise or f"{self.config.host}:{self.port}"
        self.replica.address = self.lease.address = advertise
        loop = asyncio.get_running_loop()

        def lost() -> None:  # called on a database thread
            loop.call_soon_threadsafe(self._lost.set)

        self.db.store.fence.on_lost = lost
        # A lone scheduler (or one whose own earlier run held the lease)
        # leads before it answers its first call.
        epoch = await self.db.run(self.lease.acquire, self.config.lease_seconds, None)
        if epoch is not None:
            await self._lead(epoch)
        else:
            await self._note_leader()
        await self.server.start()
        self._replica_task = asyncio.create_task(self._replica(), name="replica")
        log.info(
            "scheduler replica %s listening on %s:%d as %s (database: %s)",
            self.replica.replica_id,
            self.config.host,
            self.port,
            "leader" if self.replica.leading else "standby",
            self.db.store.engine.url.render_as_string(hide_password=True),
        )
        return self.port

    async def _replica(self) -> None:
        """Renews the lease while leading, and tries for it while standing by."""
        lease = self.config.lease_seconds
        renewed = time.monotonic()
        while not self._stopped:
            await wait_event(self._lost, lease / 3)
            leading = self.replica.leading
            try:
                epoch = await self.db.run(
                    self.lease.acquire, lease, self.replica.epoch if leading else None
                )
            except Exception as exc:  # the database is unreachable
                log.warning("leader lease: %s: %s", type(exc).__name__, exc)
                if leading and time.monotonic() - renewed > lease:
                    await self._step_down("could not renew the leader lease")
                continue
            if leading and (epoch != self.replica.epoch or self._lost.is_set()):
                await self._step_down("another replica holds the leader lease")
                epoch = None
            if epoch is not None:
                renewed = time.monotonic()
                if not self.replica.leading:
                    await self._lead(epoch)
            else:
                await self._note_leader()

    async def _note_leader(self) -> None:
        try:
            record = await self.db.run(self.lease.read)
        except Exception:
            return
        self.replica.epoch = record.epoch
        self.replica.leader_address = "" if record.expired else record.address

    async def _lead(self, epoch: int) -> None:
        self._lost.clear()
        self.db.store.fence.epoch = epoch
        self.replica.epoch = epoch
        self.replica.leader_address = self.replica.address
        self.gateway.closing = False
        self.dispatcher.estimates.replace(await self.db.run(self.db.store.estimates.load))
        await self._recover()
        self.replica.leading = True
        self._leading = [
            asyncio.create_task(self.dispatcher.run(), name="dispatcher"),
            asyncio.create_task(self.supervisor.run(), name="liveness"),
            asyncio.create_task(self._touch_nodes(), name="node-touch"),
        ]
        log.info("leading at epoch %d", epoch)

    async def _recover(self) -> None:
        """Jobs the previous leader had out on agents wait for those agents
        to reconnect and re-attach them; the ones whose agents do not come
        back within twice the lease and their longest reconnect backoff are
        re-queued as lost."""
        deadline = self.clock() + 2 * self.config.lease_seconds + MAX_BACKOFF_SECONDS
        loop = asyncio.get_running_loop()
        for job, record in await self.db.run(self.db.store.active_attempts):
            # An active job has no committed images; files here are from a
            # leader that died between writing a result and committing it.
            await loop.run_in_executor(None, self.images.remove_job, job.id)
            active = ActiveAttempt(
                job_id=job.id,
                attempt=job.attempt,
                gpu_index=job.gpu_index,
                owner=job.owner,
                spec=job.spec,
                memory_mode=record.memory_mode,
                vram_bytes=record.vram_estimate_bytes,
                expected_seconds=0.0,
                assigned_at=record.assigned_at,
                started_at=record.started_at,
            )
            self.cluster.orphans[job.id] = Orphan(
                active, job.node_id, job.node_name, deadline, "the scheduler changed leader"
            )
        if self.cluster.orphans:
            log.info("waiting for agents to re-attach %d job(s)", len(self.cluster.orphans))

    async def _step_down(self, why: str) -> None:
        """Stops leading: nothing more is written (the fence refuses it
        anyway), agents and watchers are let go to find the new leader."""
        if not self.replica.leading:
            return
        log.warning("stepping down: %s", why)
        self.replica.leading = False
        self._lost.clear()
        self.db.store.fence.epoch = -1  # matches no epoch: every write is refused
        await self._stop_leading()

    async def _stop_leading(self) -> None:
        for task in self._leading:
            task.cancel()
        await asyncio.gather(*self._leading, return_exceptions=True)
        self._leading = []
        # End the long streams ourselves, so that none is still open when
        # the server's grace period runs out: agents reconnect, watchers resume.
        self.gateway.closing = True
        for session in list(self.cluster.sessions.values()):
            self.cluster.disconnect(session)
        self.hub.close()
        await self.gateway.drain_background()
        self.cluster.orphans.clear()
        self.dispatcher.waiting.clear()

    async def _touch_nodes(self) -> None:
        """Keeps connected nodes and their models inside the memory window."""
        while True:
            await asyncio.sleep(NODE_TOUCH_SECONDS)
            with contextlib.suppress(Exception):
                await self.db.run(self.db.store.nodes.touch, list(self.cluster.sessions))

    async def stop(self, grace: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._replica_task is not None:
            self._replica_task.cancel()
            await asyncio.gather(self._replica_task, return_exceptions=True)
        epoch = self.replica.epoch if self.replica.leading else None
        self.replica.leading = False
        await self._stop_leading()
        await self.server.stop(grace)
        if epoch is not None:
            # Hand the lease over now rather than after it runs out.
            with contextlib.suppress(Exception):
                await self.db.run(self.lease.release, epoch)
        self.db.close()
        self.lock.release()
        log.info("scheduler stopped")


async def serve(config: SchedulerConfig) -> None:
    """Runs until SIGINT or SIGTERM, then stops gracefully."""
    server = SchedulerServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await server.stop()
