"""Where the schedulers are, who is asking, and how long to keep trying:
flags first, then environment variables, then defaults."""

from __future__ import annotations

import getpass
import os
from collections.abc import Sequence

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
    return parse_addresses(address) or [DEFAULT_ADDRESS]


def resolve_user(user: str | None = None) -> str:
    if user:
        return user
    if os.environ.get("SDMESH_USER"):
        return os.environ["SDMESH_USER"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        return "anonymous"
