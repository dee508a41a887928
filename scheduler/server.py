"""Wires the scheduler together and runs it: the store, the in-memory
cluster and event hub, the attempts' owner, admission, the dispatcher,
liveness, leadership, and the two gRPC services.

While this replica leads (see `scheduler.leadership`) it recovers the
attempts the previous leader had out, dispatches, supervises agents and
answers clients; when it stops leading, it lets every agent and watcher go
to find the new leader.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from grpc import aio

from protos import agent_pb2_grpc, scheduler_pb2_grpc
from scheduler.admission import Admission
from scheduler.agents import AgentGateway
from scheduler.attempts import Attempts
from scheduler.auth import Authenticator
from scheduler.batching import BatchPolicy
from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig, is_loopback
from scheduler.dispatcher import Dispatcher
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.interceptors import AuthInterceptor, ErrorInterceptor, LeaderInterceptor
from scheduler.leadership import Leadership, ReplicaState, load_replica_id
from scheduler.liveness import Supervisor
from scheduler.retention import Retention
from scheduler.runtime import Runtime
from scheduler.service import SchedulerService
from scheduler.store import Database, DatabaseUnreachable, Store
from sdmesh.datadir import DataDirLock
from sdmesh.tls import server_credentials
from sdmesh.wire import AGENT_MAX_BACKOFF_SECONDS, port_taken, server_options

log = logging.getLogger(__name__)

__all__ = ["DatabaseUnreachable", "PortInUse", "SchedulerConfig", "SchedulerServer", "serve"]


class PortInUse(OSError):
    """Something already listens where this replica would."""


def check_exposure(config: SchedulerConfig) -> None:
    """Refuses settings that would leave the port open to the network by
    accident; raises ValueError naming the flag."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.client_ca is not None and config.tls_cert is None:
        raise ValueError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if config.tls_cert is None and not is_loopback(config.host) and not config.insecure:
        raise ValueError(
            f"--host {config.host} lets other machines reach this scheduler: give it "
            "--tls-cert and --tls-key (see `sdctl admin certs`), or pass --insecure to "
            "accept plain text on the network"
        )


class SchedulerServer:
    def __init__(self, config: SchedulerConfig) -> None:
        check_exposure(config)
        self.config = config
        self.clock = time.time
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.lock = DataDirLock(config.data_dir, role="scheduler")
        self.lock.acquire()
        store = Store(config.database_url, clock=self.clock)
        store.migrate()
        self.db = Database(store)
        self.replica = ReplicaState(load_replica_id(config.data_dir), config.advertise)
        self.runtime = runtime = Runtime(
            db=self.db,
            cluster=Cluster(),
            hub=EventHub(),
            images=ImageStore(config.images_dir or config.data_dir / "images"),
            clock=self.clock,
            estimates=EstimateBook({}),
            # Beside the images where replicas share those, for the same reason.
            inputs_dir=(config.images_dir or config.data_dir) / "inputs",
        )
        self.attempts = Attempts(runtime, lease_seconds=config.lease_seconds)
        self.authenticator = None if config.no_auth else Authenticator(self.db, self.clock)
        self.admission = Admission(
            runtime,
            node_window_seconds=config.node_window_seconds,
            max_attempts=config.max_attempts,
            max_queued_per_user=config.max_queued_per_user,
            max_queued=config.max_queued,
            submit_rate=config.submit_rate,
        )
        self.retention = Retention(runtime, config.retain_seconds)
        self.dispatcher = Dispatcher(
            runtime,
            self.attempts,
            self.admission,
            reserve_after_seconds=config.reserve_after_seconds,
            batching=BatchPolicy(config.batch_max_images, config.batch_wait_seconds),
        )
        self.supervisor = Supervisor(runtime, self.attempts, config.liveness)
        self.gateway = AgentGateway(runtime, self.attempts, self.supervisor, self.authenticator)
        self.service = SchedulerService(
            runtime,
            admission=self.admission,
            attempts=self.attempts,
            dispatcher=self.dispatcher,
            replica=self.replica,
            node_window_seconds=config.node_window_seconds,
        )
        self.leadership = Leadership(
            self.db,
            self.replica,
            config.lease_seconds,
            lead=self._lead,
            step_down=self._stop_leading,
        )
        self.server = aio.server(
            interceptors=[
                ErrorInterceptor(),
                LeaderInterceptor(self.replica),
                AuthInterceptor(self.authenticator),
            ],
            options=server_options(),
        )
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.service, self.server)
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(self.gateway, self.server)
        self._leading: list[asyncio.Task[None]] = []
        self._stopped = False
        self.port = 0

    @property
    def address(self) -> str:
        return self.replica.address

    async def start(self) -> int:
        config = self.config
        address = f"{config.host}:{config.port}"
        if port_taken(config.host, config.port):
            raise PortInUse(
                f"--port {config.port}: {address} is already in use (another scheduler, an "
                "`sdctl up`, or another program): stop it, or pass another --port"
            )
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = server_credentials(config.tls_cert, config.tls_key, config.client_ca)
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._say_how_it_is_exposed()
        await self.leadership.start(self.config.advertise or f"{self.config.host}:{self.port}")
        await self.server.start()
        log.info(
            "scheduler replica %s listening on %s:%d as %s (database: %s)",
            self.replica.replica_id,
            self.config.host,
            self.port,
            "leader" if self.replica.leading else "standby",
            self.db.store.engine.url.render_as_string(hide_password=True),
        )
        return self.port

    def _say_how_it_is_exposed(self) -> None:
        config = self.config
        if config.no_auth:
            log.warning(
                "AUTHENTICATION IS OFF (--no-auth): anyone who reaches %s:%d can submit, "
                "see and cancel every job, drain nodes, and join as a GPU node",
                config.host,
                self.port,
            )
        if config.tls_cert is None and not is_loopback(config.host):
            log.warning(
                "PLAIN TEXT ON THE NETWORK (--insecure): keys, prompts and images cross "
                "%s:%d unencrypted",
                config.host,
                self.port,
            )
        elif config.tls_cert is not None:
            log.info(
                "serving TLS%s",
                " with client certificates required (mutual TLS)" if config.client_ca else "",
            )

    async def _lead(self, epoch: int) -> None:
        """Takes over: the learned estimates, and the jobs the previous
        leader had out on agents, which wait twice the lease and the agents'
        longest reconnect backoff for those agents to re-attach them."""
        self.attempts.closing = False
        self.runtime.estimates.replace(await self.db.run(self.db.store.estimates.load))
        deadline = self.clock() + 2 * self.config.lease_seconds + AGENT_MAX_BACKOFF_SECONDS
        await self.attempts.recover(deadline)
        await self.dispatcher.load()
        self._leading = [
            asyncio.create_task(self.dispatcher.run(), name="dispatcher"),
            asyncio.create_task(self.supervisor.run(), name="liveness"),
            asyncio.create_task(self.gateway.touch_nodes(), name="node-touch"),
            asyncio.create_task(self.gateway.enforce_removals(), name="node-removals"),
            asyncio.create_task(self.retention.run(), name="retention"),
        ]

    async def _stop_leading(self) -> None:
        for task in self._leading:
            task.cancel()
        await asyncio.gather(*self._leading, return_exceptions=True)
        self._leading = []
        # End the long streams ourselves, so that none is still open when
        # the server's grace period runs out: agents reconnect, watchers resume.
        self.attempts.closing = True
        for session in list(self.runtime.cluster.sessions.values()):
            self.runtime.cluster.disconnect(session)
        self.runtime.hub.close()
        await self.gateway.drain_background()
        self.attempts.release_all()
        self.dispatcher.waiting.clear()
        self.dispatcher.planner = None

    async def stop(self, grace: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        epoch = await self.leadership.stop()
        await self.server.stop(grace)  # calls in flight finish, still fenced by the epoch
        await self.leadership.release(epoch)
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
