"""Where the schedulers are, who is asking, and how long to keep trying:
flags first, then environment variables, then defaults."""

from __future__ import annotations

import getpass
import os
import random
from collections.abc import Sequence

DEFAULT_ADDRESS = "localhost:50051"
USER_METADATA_KEY = "x-sdmesh-user"
DEFAULT_RECONNECT_TIMEOUT = 60.0
FIRST_BACKOFF = 0.2
MAX_BACKOFF = 2.0


def resolve_address(address: str | None = None) -> str:
    return address or os.environ.get("SDMESH_SCHEDULER") or DEFAULT_ADDRESS


def resolve_addresses(address: str | Sequence[str] | None = None) -> list[str]:
    """The scheduler replicas to try, in order: "host1:50051,host2:50051" or a
    list of strings. Blanks and repeats are dropped."""
    if address is None or isinstance(address, str):
        parts = resolve_address(address).split(",")
    else:
        parts = [part for item in address for part in item.split(",")]
    found: list[str] = []
    for part in (part.strip() for part in parts):
        if part and part not in found:
            found.append(part)
    return found or [DEFAULT_ADDRESS]


def resolve_user(user: str | None = None) -> str:
    if user:
        return user
    if os.environ.get("SDMESH_USER"):
        return os.environ["SDMESH_USER"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        return "anonymous"


class Backoff:
    """Waits between passes over the addresses: doubling from `first` up to
    `cap`, each jittered down by up to half, so that many clients that lost
    the same scheduler do not come back in step."""

    def __init__(self, first: float = FIRST_BACKOFF, cap: float = MAX_BACKOFF) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.5, 1.0)
