"""Where the scheduler is and who is asking: flags first, then environment
variables, then defaults."""

from __future__ import annotations

import getpass
import os

DEFAULT_ADDRESS = "localhost:50051"
USER_METADATA_KEY = "x-sdmesh-user"


def resolve_address(address: str | None = None) -> str:
    return address or os.environ.get("SDMESH_SCHEDULER") or DEFAULT_ADDRESS


def resolve_user(user: str | None = None) -> str:
    if user:
        return user
    if os.environ.get("SDMESH_USER"):
        return os.environ["SDMESH_USER"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        return "anonymous"
