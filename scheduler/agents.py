"""The agent-facing service: one bidirectional stream per connected agent,
enrollment, and the input images of the attempts an agent runs.

An adapter and nothing more. Up come hello, stats, health reports and
attempt updates, which it converts and hands to the cluster, liveness and
the attempts' owner; down go the commands queued on the node's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any

from grpc import aio

from protos import agent_pb2, agent_pb2_grpc, common_pb2
from scheduler.attempt_state import ActiveAttempt
from scheduler.attempts import Attempts
from scheduler.auth import Authenticator
from scheduler.cluster import NodeSession
from scheduler.convert import command_to_proto
from scheduler.errors import AlreadyExists, NotFound, PermissionDenied, Unauthenticated
from scheduler.liveness import Supervisor
from scheduler.principal import current_node_labels, current_principal
from scheduler.runtime import Runtime, UsesRuntime
from scheduler.store.credentials import EnrollRefused, NodeAlreadyEnrolled
from scheduler.store.leader import NotLeader
from scheduler.tokens import JOIN_TOKEN, parse_token
from sdmesh.convert import (
    MAX_REASON_CHARS,
    device_stats_from_proto,
    hello_from_proto,
    one_printable_line,
    update_from_proto,
)
from sdmesh.domain import NodeInfo
from sdmesh.errors import InvalidArgument, quote
from sdmesh.kinds import SHA256, ModelKind
from sdmesh.spec import check_labels, printable

log = logging.getLogger(__name__)

HELLO_TIMEOUT_SECONDS = 30.0
NODE_TOUCH_SECONDS = 60.0
# How soon a node removed with `sdctl admin remove-node` loses its stream.
REMOVAL_CHECK_SECONDS = 2.0
MODEL_KINDS = tuple(kind.value for kind in ModelKind)
NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_hello(node: NodeInfo) -> None:
    if not NODE_ID.fullmatch(node.node_id):
        raise InvalidArgument("hello.node_id", "must be 1-64 letters, digits, '.', '_' or '-'")
    if not node.devices:
        raise InvalidArgument("hello.devices", "must list at least one device")
    if len({device.index for device in node.devices}) != len(node.devices):
        raise InvalidArgument("hello.devices", "device indexes must be unique")
    if len({(model.kind, model.name) for model in node.models}) != len(node.models):
        raise InvalidArgument("hello.models", "model names must be unique within a kind")
    # Bounded by the nodes and models columns, and printable: they are
    # stored and shown in listings.
    printable("hello.name", node.name, 128, least=1)
    printable("hello.hostname", node.hostname, 255)
    printable("hello.agent_version", node.agent_version, 64)
    for device in node.devices:
        printable("hello.devices.name", device.name, 128)
    for model in node.models:
        printable("hello.models.name", model.name, 128, least=1)
        printable("hello.models.dtype", model.dtype, 32)
        if model.kind not in MODEL_KINDS:
            raise InvalidArgument(
                "hello.models.kind",
                f"must be one of {', '.join(MODEL_KINDS)}, got {quote(model.kind)}",
            )
        printable("hello.models.family", model.family, 32)
        if model.sha256 and not SHA256.fullmatch(model.sha256):
            raise InvalidArgument("hello.models.sha256", "must be empty or 64 lowercase hex digits")
    check_labels(node.labels, "hello.labels")


class AgentGateway(UsesRuntime, agent_pb2_grpc.AgentGatewayServicer):
    def __init__(
        self,
        runtime: Runtime,
        attempts: Attempts,
        supervisor: Supervisor,
        authenticator: Authenticator | None = None,
    ) -> None:
        super().__init__(runtime)
        self.authenticator = authenticator  # None: --no-auth
        self.attempts = attempts
        self.supervisor = supervisor
        self.liveness = supervisor.config
        self._background: set[asyncio.Task[None]] = set()

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.SchedulerMessage]:
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT_SECONDS)
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "hello":
            raise InvalidArgument("hello", "the first message on the stream must be a hello")
        info = self._authorized(hello_from_proto(first.hello))
        check_hello(info)
        self._replace_silent(info)
        session = self.cluster.connect(info, self.clock(), draining=first.hello.draining)
        reader: asyncio.Task[None] | None = None
        try:
            await self.db.run(self.db.store.nodes.upsert, info)
            held = [(entry.job_id, entry.attempt) for entry in first.hello.held]
            await self.attempts.reattach(session, held)
            log.info(
                "node %s (%s) connected from %s with %d device(s), models: %s",
                info.name,
                info.node_id,
                context.peer(),
                len(info.devices),
                ", ".join(model.name for model in info.models) or "none",
            )
            self.wake()
            yield agent_pb2.SchedulerMessage(
                welcome=agent_pb2.Welcome(
                    heartbeat_seconds=self.liveness.heartbeat_seconds,
                    lease_seconds=self.liveness.lease_seconds,
                )
            )
            reader = asyncio.create_task(self._read(session, request_iterator))
            while (command := await session.outbox.get()) is not None:
                yield command_to_proto(command)
        finally:
            if reader is not None:
                reader.cancel()
            # Runs on its own: this generator may be closed by a cancellation.
            self._spawn(self._disconnected(session))

    def _authorized(self, info: NodeInfo) -> NodeInfo:
        """With enrollment on, a node speaks only as the node its credential
        was issued to, and carries the labels its join token fixed."""
        who = current_principal()
        if not who.node_id:  # --no-auth
            return info
        if info.node_id != who.node_id:
            log.warning(
                "refused a hello as node %s over the credential of node %s",
                quote(info.node_id),
                who.node_id,
            )
            raise PermissionDenied(
                f"this credential belongs to node {who.node_id}, not {quote(info.node_id)}"
            )
        fixed = current_node_labels()
        return replace(info, labels={**info.labels, **fixed}) if fixed else info

    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: aio.ServicerContext[Any, Any]
    ) -> agent_pb2.EnrollResponse:
        """Trades a join token for the node's own credential, once."""
        if not NODE_ID.fullmatch(request.node_id):
            raise InvalidArgument("node_id", "must be 1-64 letters, digits, '.', '_' or '-'")
        printable("name", request.name, 128)
        token = parse_token(request.join_token, JOIN_TOKEN)
        if token is None:
            raise Unauthenticated("the join token is not valid (it is not an sdmesh join token)")
        try:
            credential, labels = await self.db.run(
                self.db.store.credentials.enroll, token, request.node_id, request.name
            )
        except EnrollRefused as exc:
            log.warning("enrollment of node %s refused: %s", request.node_id, exc)
            raise Unauthenticated(str(exc)) from None
        except NodeAlreadyEnrolled as exc:
            raise AlreadyExists(str(exc)) from None
        if self.authenticator is not None:
            self.authenticator.forget_node(request.node_id)
        log.info("node %s enrolled with join token %s", request.node_id, token.id)
        return agent_pb2.EnrollResponse(credential=credential.text, labels=labels)

    async def FetchInput(
        self, request: agent_pb2.FetchInputRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.InputChunk]:
        """An input image of an attempt bound to the calling node, from
        disk one piece at a time. Only an input its job names: a node sees
        no other user's uploads."""
        if not SHA256.fullmatch(request.sha256):
            raise InvalidArgument(
                "sha256", f"must be 64 lowercase hex digits, got {quote(request.sha256)}"
            )
        active = self._bound_to_caller(request.job_id, request.attempt)
        if request.sha256 not in active.spec.inputs:
            raise NotFound(f"job {active.job_id} names no input {request.sha256[:12]}…")
        if not self.inputs.path(request.sha256).is_file():
            raise NotFound(f"input {request.sha256[:12]}… of job {active.job_id} is not stored")
        offset = 0
        async for data in self.inputs.stream(request.sha256):
            yield common_pb2.InputChunk(offset=offset, data=data)
            offset += len(data)

    def _bound_to_caller(self, job_id: str, attempt: int) -> ActiveAttempt:
        """The live attempt, if it is bound to the calling node (with
        --no-auth, to any connected node)."""
        who = current_principal()
        if who.node_id:
            session = self.cluster.sessions.get(who.node_id)
            sessions = [session] if session is not None else []
        else:
            sessions = list(self.cluster.sessions.values())
        for session in sessions:
            active = self.attempts.current(session, job_id, attempt)
            if active is not None:
                return active
        node = f"node {who.node_id}" if who.node_id else "any connected node"
        raise PermissionDenied(f"attempt {attempt} of job {quote(job_id)} is not running on {node}")

    async def enforce_removals(self) -> None:
        """Closes the streams of nodes removed with `sdctl admin
        remove-node` (which writes the database directly): their running
        jobs go back to the queue as with any lost node."""
        since = self.clock()
        while True:
            await asyncio.sleep(REMOVAL_CHECK_SECONDS)
            now = self.clock()
            try:
                removed = await self.db.run(
                    self.db.store.credentials.revoked_nodes_since, since - REMOVAL_CHECK_SECONDS
                )
            except Exception as exc:  # the database is away: try again next time
                log.warning("could not read removed nodes: %s", exc)
                continue
            since = now
            for node_id in removed:
                if self.authenticator is not None:
                    self.authenticator.forget_node(node_id)
                session = self.cluster.sessions.get(node_id)
                if session is not None:
                    log.warning(
                        "node %s (%s) was removed: closing its stream", session.name, node_id
                    )
                    self.cluster.disconnect(session)

    def _replace_silent(self, info: NodeInfo) -> None:
        """A node that dials again while its old stream still looks open (a
        partition healed, a dead connection not yet noticed) replaces it,
        once that stream has been silent for two heartbeats. A second agent
        with the same id, while the first still talks, is refused."""
        existing = self.cluster.sessions.get(info.node_id)
        if existing is None:
            return
        now = self.clock()
        if now - existing.last_heard <= 2 * self.liveness.heartbeat_seconds:
            raise AlreadyExists(
                f"node id {info.node_id} is already connected as {existing.name!r}; "
                "every agent needs its own --data-dir"
            )
        log.info("node %s dialled again; dropping its silent stream", info.name)
        self.cluster.disconnect(existing)
        self.attempts.orphan(
            existing, now + self.liveness.lease_seconds, f"node {info.name} reconnected"
        )

    async def _read(
        self, session: NodeSession, requests: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        try:
            async for message in requests:
                session.last_heard = self.clock()
                kind = message.WhichOneof("body")
                if kind == "stats":
                    stats = [device_stats_from_proto(d) for d in message.stats.devices]
                    self.cluster.report_stats(
                        session.node_id, stats, self.clock(), message.stats.host_free_bytes
                    )
                elif kind == "job":
                    await self._job_update(session, message.job)
                elif kind == "leaving":
                    # No more work for it; the Drain it gets back says so, and
                    # comes after every assignment already sent.
                    log.info("node %s is leaving: no new work", session.name)
                    self.cluster.drain(session, 0.0)
                elif kind == "health":
                    report = message.health
                    self.supervisor.health_reported(
                        session,
                        report.gpu_index,
                        report.healthy,
                        one_printable_line(report.detail, MAX_REASON_CHARS),
                    )
                else:
                    log.warning("node %s sent an unexpected %s", session.name, kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("stream from node %s ended: %s", session.name, exc)
        finally:
            session.close()

    async def _job_update(self, session: NodeSession, message: agent_pb2.JobUpdate) -> None:
        update = update_from_proto(message)
        if update is None:
            log.warning("node %s sent a job update with no body", session.name)
            return
        try:
            await self.attempts.update(session, update)
        except asyncio.CancelledError:
            raise
        except Exception:
            # One update that cannot be handled (the database is down, say)
            # must not cut the node off.
            log.exception("node %s: handling a job update failed", session.name)

    async def _disconnected(self, session: NodeSession) -> None:
        self.cluster.disconnect(session)  # no new work goes to it from now on
        await self.attempts.node_gone(session)
        if self.attempts.closing:
            return
        await self.db.run(self.db.store.nodes.touch, [session.node_id])
        self.wake()

    async def touch_nodes(self) -> None:
        """Keeps connected nodes and their models inside the memory window."""
        while True:
            await asyncio.sleep(NODE_TOUCH_SECONDS)
            with contextlib.suppress(Exception):
                await self.db.run(self.db.store.nodes.touch, list(self.cluster.sessions))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    async def drain_background(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


def _log_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    if isinstance(error, NotLeader):  # expected after stepping down: the fence held
        log.info("dropped after stepping down: %s", error)
    else:
        log.error("background task failed", exc_info=error)
