"""Where the schedulers are, who is asking (the API key, the user name),
how to reach them (TLS files) and how long to keep trying: flags first,
then environment variables, then defaults."""

from __future__ import annotations

import getpass
import os
from collections.abc import Sequence
from pathlib import Path

from client._errors import InvalidArgumentError
from sdmesh.tls import CLIENT_FLAGS, TlsFiles
from sdmesh.wire import parse_addresses

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_RECONNECT_TIMEOUT = 60.0


def resolve_address(address: str | None = None) -> str:
    return address or os.environ.get("SDMESH_SCHEDULER") or DEFAULT_ADDRESS


def resolve_addresses(address: str | Sequence[str] | None = None) -> list[str]:
    """The scheduler replicas to try, in order: "host1:50051,host2:50051", a
    list of strings, or SDMESH_SCHEDULER, else localhost:50051."""
    if address is None or isinstance(address, str):
        address = resolve_address(address)
    try:
        return parse_addresses(address) or [DEFAULT_ADDRESS]
    except ValueError as exc:
        raise InvalidArgumentError(f"--scheduler: {exc}") from None


def resolve_user(user: str | None = None) -> str:
    if user:
        return user
    if os.environ.get("SDMESH_USER"):
        return os.environ["SDMESH_USER"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        return "anonymous"


def resolve_api_key(api_key: str | None = None) -> str:
    """The API key, else SDMESH_API_KEY, else "" (none sent). A key goes in
    request metadata, so it must be printable ASCII without spaces."""
    key = (api_key or os.environ.get("SDMESH_API_KEY") or "").strip()
    if key and not all("!" <= char <= "~" for char in key):
        raise InvalidArgumentError(
            "--api-key: must be printable ASCII without spaces (is it the whole key?)"
        )
    return key


def _path(value: str | Path | None, variable: str) -> Path | None:
    text = os.environ.get(variable, "") if value is None else str(value)
    return Path(text).expanduser() if text else None


def resolve_tls(
    ca_cert: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
) -> TlsFiles:
    """The TLS files: each given, else SDMESH_CA_CERT, SDMESH_CLIENT_CERT and
    SDMESH_CLIENT_KEY. A client certificate without a CA is refused (see
    TlsFiles)."""
    try:
        return TlsFiles(
            _path(ca_cert, "SDMESH_CA_CERT"),
            _path(client_cert, "SDMESH_CLIENT_CERT"),
            _path(client_key, "SDMESH_CLIENT_KEY"),
            flags=CLIENT_FLAGS,
        )
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
