"""Wire facts every process agrees on: request metadata keys (the caller's
credential among them), how a standby replica says so, keepalive, message
size limits, the channel every caller dials through (plain or TLS),
reconnect backoff, scheduler address lists and the package version.

Message sizes. The scheduler takes at most MAX_SERVER_RECEIVE_BYTES (4 MiB,
gRPC's own default, made explicit) in one message: the largest anyone is
meant to send it is an agent's image chunk of IMAGE_CHUNK_BYTES (256 KiB);
a submit is a few KiB. Its answers can be larger, so clients take up to
MAX_CLIENT_RECEIVE_BYTES (64 MiB): a ListJobs page holds up to 1000 jobs,
each up to about 40 KiB (two 4000-character prompts in UTF-8 and 32
labels). Agents take up to MAX_AGENT_RECEIVE_BYTES (4 MiB; an assignment is
a few specs). Each side also refuses to send what its peer would refuse to
take, so that an oversized message fails where it is made, with
RESOURCE_EXHAUSTED, instead of on the wire.
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

import grpc
from grpc import aio

from sdmesh.tls import TlsFiles

# Who is calling: an API key (or an agent's credential) as
# `authorization: Bearer <token>`; the user name alone counts only on a
# scheduler that runs with --no-auth.
AUTHORIZATION_METADATA_KEY = "authorization"
BEARER_SCHEME = "Bearer"
USER_METADATA_KEY = "x-sdmesh-user"
# An agent names the node its credential was issued to beside it.
NODE_METADATA_KEY = "x-sdmesh-node"
# How long to wait before retrying a call refused with RESOURCE_EXHAUSTED
# (seconds, as text): trailing metadata.
RETRY_AFTER_METADATA_KEY = "retry-after"
# The node an agent's credential belongs to, beside its `authorization`.
NODE_METADATA_KEY = "x-sdmesh-node"
# A standby replica turns calls away with UNAVAILABLE and says so in these
# trailing metadata keys, never in its message text.
ROLE_METADATA_KEY = "x-sdmesh-role"
LEADER_METADATA_KEY = "x-sdmesh-leader"
STANDBY_ROLE = "standby"

# Agents and the scheduler ping each other this often on an idle stream.
KEEPALIVE_SECONDS = 5.0
# Full-jitter-style backoff between dial attempts: agents redial from
# 0.25 s up to 5 s (a new leader waits this much longer than a lease for
# them), clients retry from 0.2 s up to 2 s.
AGENT_FIRST_BACKOFF_SECONDS = 0.25
AGENT_MAX_BACKOFF_SECONDS = 5.0
CLIENT_FIRST_BACKOFF_SECONDS = 0.2
CLIENT_MAX_BACKOFF_SECONDS = 2.0
# PNGs travel in pieces well under gRPC's 4 MiB message limit, both ways.
IMAGE_CHUNK_BYTES = 256 * 1024
# An input image uploaded by a client goes in chunks of at most this (the
# scheduler refuses larger ones): four fit one 4 MiB message limit.
INPUT_CHUNK_BYTES = 1024 * 1024
# The largest message each side takes (see the module's docstring).
MAX_SERVER_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_CLIENT_RECEIVE_BYTES = 64 * 1024 * 1024
MAX_AGENT_RECEIVE_BYTES = 4 * 1024 * 1024

Options = list[tuple[str, Any]]


def package_version() -> str:
    """sdmesh's installed version; the scheduler reports it in its health,
    agents in their hello."""
    try:
        return metadata.version("sdmesh")
    except metadata.PackageNotFoundError:
        return "dev"


# gRPC's own target forms (unix:/path/to/socket, dns:///host:port, ...),
# passed on as they are.
_GRPC_TARGETS = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")


def check_address(address: str) -> str:
    """One scheduler address: HOST:PORT, [IPv6]:PORT, or one of gRPC's own
    target forms. Raises ValueError saying what to write instead, for the
    likely mistakes: no port (gRPC would quietly dial 443), a URL scheme, a
    port that is not a number."""
    if address.startswith(_GRPC_TARGETS):
        return address
    scheme, sep, rest = address.partition("://")
    if sep:
        raise ValueError(
            f"{address!r} is a URL; give HOST:PORT without {scheme}://, e.g. {rest.rstrip('/')}"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or host.endswith(":") or (":" in host and not host.startswith("[")):
        example = f"[{address}]:50051" if ":" in address else f"{address}:50051"
        raise ValueError(f"{address!r} has no port; give HOST:PORT, e.g. {example}")
    if not port:
        raise ValueError(f"{address!r} has no port; give HOST:PORT, e.g. {host}:50051")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: the port must be a number from 1 to 65535")
    return address


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on `host`:`port`, as a server
    about to bind there would find (port 0 is never taken)."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # binding will say what is wrong with the host
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def parse_addresses(address: str | Sequence[str]) -> list[str]:
    """The replicas of one scheduler, in order, from "host1:50051,host2:50051"
    or a list of such strings. Blanks and repeats are dropped; an address
    that cannot be right raises ValueError (see `check_address`)."""
    parts = (
        address.split(",")
        if isinstance(address, str)
        else [part for item in address for part in item.split(",")]
    )
    found: list[str] = []
    for part in (part.strip() for part in parts):
        if part and part not in found:
            found.append(check_address(part))
    return found


class Backoff:
    """Waits between passes over the addresses: doubling from `first` up to
    `cap`, each jittered down by up to half, so that many callers that lost
    the same scheduler do not all come back in step."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.5, 1.0)


def _keepalive() -> Options:
    """Both ends of an agent's stream ping every KEEPALIVE_SECONDS, and
    give up on a peer that does not answer within as long."""
    millis = int(KEEPALIVE_SECONDS * 1000)
    return [
        ("grpc.keepalive_time_ms", millis),
        ("grpc.keepalive_timeout_ms", millis),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _message_sizes(receive: int, send: int) -> Options:
    return [
        ("grpc.max_receive_message_length", receive),
        ("grpc.max_send_message_length", send),
    ]


def server_options() -> Options:
    # The server must accept the agents' pings that often, or it answers
    # with GOAWAY "too_many_pings".
    margin_ms = int(KEEPALIVE_SECONDS * 1000) - 1000
    return [
        # gRPC sets SO_REUSEPORT by default, which lets a second scheduler
        # bind a port the first is serving and take half its connections.
        ("grpc.so_reuseport", 0),
        *_keepalive(),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", margin_ms),
        ("grpc.http2.max_ping_strikes", 0),
        *_message_sizes(MAX_SERVER_RECEIVE_BYTES, MAX_CLIENT_RECEIVE_BYTES),
    ]


def agent_channel_options() -> Options:
    return [
        *_keepalive(),
        ("grpc.http2.max_pings_without_data", 0),
        *_message_sizes(MAX_AGENT_RECEIVE_BYTES, MAX_SERVER_RECEIVE_BYTES),
    ]


def client_channel_options() -> Options:
    return [
        *_message_sizes(MAX_CLIENT_RECEIVE_BYTES, MAX_SERVER_RECEIVE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC's own reconnect backoff grows to two minutes; a scheduler that
        # comes back should be found within our own backoff's cap.
        ("grpc.initial_reconnect_backoff_ms", int(CLIENT_FIRST_BACKOFF_SECONDS * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(CLIENT_MAX_BACKOFF_SECONDS * 1000)),
    ]


def open_channel(address: str, options: Options, tls: TlsFiles | None = None) -> aio.Channel:
    """The one place callers (agents, the SDK) dial a scheduler: over TLS
    when `tls` names a CA, else in plain text. Raises ValueError, naming the
    flag, for a TLS file that cannot be used."""
    if tls is not None and tls.enabled:
        return aio.secure_channel(address, tls.credentials(), options=options)
    return aio.insecure_channel(address, options=options)


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry that carries a credential."""
    return (AUTHORIZATION_METADATA_KEY, f"{BEARER_SCHEME} {token}")


def parse_bearer(value: str | bytes | None) -> str | None:
    """The token in an `authorization` value ("Bearer <token>", the scheme
    in any case), or None when it is not one."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    scheme, _, token = (value or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER_SCHEME.lower() or not token or " " in token:
        return None
    return token


def retry_after_metadata(seconds: float) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a RESOURCE_EXHAUSTED that says when to retry."""
    return ((RETRY_AFTER_METADATA_KEY, f"{max(0.0, seconds):.3f}"),)


def retry_after(error: grpc.RpcError) -> float | None:
    """The seconds a RESOURCE_EXHAUSTED asked the caller to wait, if it said."""
    for key, value in _trailing(error):
        if key == RETRY_AFTER_METADATA_KEY:
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                return None
            return seconds if 0 <= seconds < float("inf") else None
    return None


def standby_metadata(leader_address: str) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a standby's UNAVAILABLE."""
    return ((ROLE_METADATA_KEY, STANDBY_ROLE), (LEADER_METADATA_KEY, leader_address))


def _trailing(error: grpc.RpcError) -> Iterable[tuple[str, Any]]:
    trailing = getattr(error, "trailing_metadata", None)
    return (trailing() if callable(trailing) else None) or ()


def is_standby(error: grpc.RpcError) -> bool:
    """Whether a live standby replica answered: the leader is near."""
    return any(
        key == ROLE_METADATA_KEY and value == STANDBY_ROLE for key, value in _trailing(error)
    )


def leader_hint(error: grpc.RpcError) -> str:
    """The leader's address a standby named, or "" when it knows none."""
    for key, value in _trailing(error):
        if key == LEADER_METADATA_KEY:
            return str(value)
    return ""
