"""How a node joins a cluster that requires enrollment.

An admin makes a join token (`sdctl admin join-token`) and the node is
started once with it (`--join-token` or SDMESH_JOIN_TOKEN). The agent
presents it to `AgentGateway.Enroll` and is issued its own credential,
which it keeps in `<data-dir>/credential.json` (readable by its owner
only) and sends with every stream from then on; the token is not needed
again. A scheduler started with --no-auth ignores credentials, so an agent
without one still connects there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio

from protos import agent_pb2, agent_pb2_grpc
from sdmesh.dialing import FirstContact
from sdmesh.tls import TlsFiles
from sdmesh.waiting import wait_event
from sdmesh.wire import (
    AGENT_FIRST_BACKOFF_SECONDS,
    AGENT_MAX_BACKOFF_SECONDS,
    NODE_METADATA_KEY,
    Backoff,
    agent_channel_options,
    bearer,
    open_channel,
)

log = logging.getLogger(__name__)

FILE_NAME = "credential.json"
JOIN_TOKEN_ENV = "SDMESH_JOIN_TOKEN"
ENROLL_TIMEOUT_SECONDS = 15.0


class EnrollmentFailed(SystemExit):
    """The scheduler refused this node: the agent stops with this line."""


@dataclass(frozen=True)
class Credential:
    node_id: str
    secret: str = field(repr=False)
    labels: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (bearer(self.secret), (NODE_METADATA_KEY, self.node_id))


def load_credential(data_dir: Path, node_id: str) -> Credential | None:
    path = data_dir / FILE_NAME
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        credential = Credential(
            str(stored["node_id"]), str(stored["credential"]), dict(stored.get("labels") or {})
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnrollmentFailed(f"{path} is damaged ({exc}); remove it and enroll again") from None
    if credential.node_id != node_id:
        raise EnrollmentFailed(
            f"{path} belongs to node {credential.node_id}, not {node_id}; "
            "every agent needs its own --data-dir"
        )
    return credential


def save_credential(data_dir: Path, credential: Credential) -> None:
    """Written whole or not at all, readable by its owner only."""
    path = data_dir / FILE_NAME
    partial = path.with_suffix(".tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(
            {
                "node_id": credential.node_id,
                "credential": credential.secret,
                "labels": credential.labels,
            },
            handle,
        )
    partial.replace(path)


def join_token(flag: str) -> str:
    return flag or os.environ.get(JOIN_TOKEN_ENV, "")


async def enroll(
    addresses: list[str],
    token: str,
    node_id: str,
    name: str,
    tls: TlsFiles | None,
    stopping: asyncio.Event,
    contact: FirstContact,
) -> Credential | None:
    """Presents the join token to the first scheduler that answers, trying
    the addresses in turn with backoff until one does; None if the agent
    is stopped first. `contact` says what each failure means, and gives up
    on one that waiting cannot mend."""
    request = agent_pb2.EnrollRequest(join_token=token, node_id=node_id, name=name)
    backoff = Backoff(AGENT_FIRST_BACKOFF_SECONDS, AGENT_MAX_BACKOFF_SECONDS)
    while not stopping.is_set():
        for address in addresses:
            async with open_channel(address, agent_channel_options(), tls) as channel:
                try:
                    answer = await agent_pb2_grpc.AgentGatewayStub(channel).Enroll(
                        request, timeout=ENROLL_TIMEOUT_SECONDS
                    )
                except aio.AioRpcError as exc:
                    if exc.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise EnrollmentFailed(
                            f"the scheduler refused to enroll this node: {exc.details()}"
                        ) from None
                    if exc.code() is grpc.StatusCode.UNAVAILABLE:
                        log.warning("enrolling: %s", contact.failed(address, exc))
                    else:
                        log.warning("enrolling: scheduler %s: %s", address, exc.details())
                    continue
            contact.reached()
            log.info("enrolled with the scheduler at %s as node %s", address, node_id)
            return Credential(node_id, answer.credential, dict(answer.labels))
        await wait_event(stopping, backoff.next())
    return None
