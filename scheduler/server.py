"""Wires the scheduler together and runs it: the store, the in-memory
cluster and event hub, the dispatcher, and the two gRPC services."""

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
from scheduler.cluster import Cluster
from scheduler.dispatcher import Dispatcher
from scheduler.domain import AttemptOutcome
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.interceptors import ErrorInterceptor, PrincipalInterceptor
from scheduler.placement import RESERVE_AFTER_SECONDS
from scheduler.runtime import Runtime
from scheduler.service import SchedulerService
from scheduler.store import Database, Store

log = logging.getLogger(__name__)

NODE_TOUCH_SECONDS = 60.0

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
    node_window_seconds: float = 24 * 3600.0
    max_attempts: int = 3
    reserve_after_seconds: float = RESERVE_AFTER_SECONDS

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'sdmesh.db'}"


class SchedulerServer:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.clock = time.time
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(config.database_url, clock=self.clock)
        store.migrate()
        self.db = Database(store)
        self.cluster = Cluster()
        self.hub = EventHub()
        estimates = EstimateBook(store.estimates.load())
        self.dispatcher = Dispatcher(
            self.db,
            self.cluster,
            self.hub,
            self.clock,
            estimates,
            reserve_after_seconds=config.reserve_after_seconds,
            node_window_seconds=config.node_window_seconds,
        )
        runtime = Runtime(
            self.db,
            self.cluster,
            self.hub,
            self.dispatcher,
            ImageStore(config.data_dir / "images"),
            self.clock,
            estimates,
        )
        self.gateway = AgentGateway(runtime, heartbeat_seconds=config.heartbeat_seconds)
        self.service = SchedulerService(
            runtime,
            node_window_seconds=config.node_window_seconds,
            max_attempts=config.max_attempts,
        )
        self.server = aio.server(
            interceptors=[ErrorInterceptor(), PrincipalInterceptor()], options=SERVER_OPTIONS
        )
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.service, self.server)
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(self.gateway, self.server)
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0

    async def start(self) -> int:
        await self._recover()
        address = f"{self.config.host}:{self.config.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        self._tasks = [
            asyncio.create_task(self.dispatcher.run(), name="dispatcher"),
            asyncio.create_task(self._touch_nodes(), name="node-touch"),
        ]
        log.info(
            "scheduler listening on %s:%d (database: %s)",
            self.config.host,
            self.port,
            self.db.store.engine.url.render_as_string(hide_password=True),
        )
        return self.port

    async def _recover(self) -> None:
        """Jobs that were assigned or running when the scheduler stopped go
        back to the queue; their agents' late reports are stale."""
        for job in await self.db.run(self.db.store.active_jobs):
            events = await self.db.run(
                self.db.store.requeue,
                job.id,
                job.attempt,
                AttemptOutcome.LOST,
                "scheduler restarted",
                count_failure=False,
            )
            if events:
                log.info("job %s re-queued after a scheduler restart", job.id)

    async def _touch_nodes(self) -> None:
        """Keeps connected nodes and their models inside the memory window."""
        while True:
            await asyncio.sleep(NODE_TOUCH_SECONDS)
            with contextlib.suppress(Exception):
                await self.db.run(self.db.store.nodes.touch, list(self.cluster.sessions))

    async def stop(self, grace: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # End the long streams ourselves, so that none is still open when the
        # grace period runs out: agents reconnect, watchers resume.
        self.gateway.closing = True
        for session in list(self.cluster.sessions.values()):
            session.close()
        self.hub.close()
        await self.server.stop(grace)
        await self.gateway.drain_background()
        self.db.close()
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
