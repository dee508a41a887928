"""Who a call's credentials name: an API key (a user, maybe an admin) or a
node credential (an enrolled node).

The interceptor asks this on every call, so records are cached for
`CACHE_SECONDS`: a key revoked with `sdctl admin revoke-key` (which writes
the database directly) stops working within that time on every replica.
Unknown ids are cached as well, so a stream of made-up keys costs one read
per id and interval, and the caches are bounded.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from scheduler.errors import Unauthenticated
from scheduler.principal import Principal
from scheduler.store.credentials import KeyRecord, NodeCredentialRecord
from scheduler.store.database import Database
from scheduler.tokens import API_KEY, NODE_CREDENTIAL, parse_token, secret_matches

log = logging.getLogger(__name__)

CACHE_SECONDS = 2.0
CACHE_ENTRIES = 4096
NO_KEY = (
    "this scheduler needs an API key: pass --api-key or set SDMESH_API_KEY "
    "(an admin makes one with `sdctl admin create-key`)"
)
NOT_ENROLLED = (
    "this node is not enrolled: get a join token with `sdctl admin join-token` on the "
    "scheduler's host and start the agent with --join-token"
)

R = TypeVar("R")


class _Cache(Generic[R]):
    """id -> (record or None, when read), least recently read first."""

    def __init__(self, read: Callable[[str], R | None], clock: Callable[[], float]) -> None:
        self.read = read
        self.clock = clock
        self.entries: OrderedDict[str, tuple[R | None, float]] = OrderedDict()

    async def get(self, db: Database, key: str) -> R | None:
        now = self.clock()
        entry = self.entries.get(key)
        if entry is not None and now - entry[1] < CACHE_SECONDS:
            return entry[0]
        record = await db.run(self.read, key)
        self.entries[key] = (record, now)
        self.entries.move_to_end(key)
        while len(self.entries) > CACHE_ENTRIES:
            self.entries.popitem(last=False)
        return record

    def forget(self, key: str) -> None:
        self.entries.pop(key, None)


class Authenticator:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        registry = db.store.credentials
        self._keys: _Cache[KeyRecord] = _Cache(registry.key, time.monotonic)
        self._nodes: _Cache[NodeCredentialRecord] = _Cache(registry.node_credential, time.monotonic)

    async def user(self, bearer: str | None) -> Principal:
        """The user an `authorization: Bearer` API key names."""
        if not bearer:
            raise Unauthenticated(NO_KEY)
        token = parse_token(bearer, API_KEY)
        if token is None:
            raise Unauthenticated("the API key is not valid (it is not an sdmesh API key)")
        record = await self._keys.get(self.db, token.id)
        if record is None or not secret_matches(token, record.secret_hash):
            raise Unauthenticated("the API key is not valid")
        problem = record.problem(self.clock())
        if problem is not None:
            raise Unauthenticated(problem)
        return Principal(record.user, admin=record.admin, key_id=record.id)

    async def node(self, bearer: str | None, node_id: str) -> tuple[Principal, dict[str, str]]:
        """The node a credential names (with the id the agent says it has,
        `x-sdmesh-node`), and the labels its join token fixed."""
        if not bearer or not node_id:
            raise Unauthenticated(NOT_ENROLLED)
        token = parse_token(bearer, NODE_CREDENTIAL)
        record = await self._nodes.get(self.db, node_id[:64]) if token is not None else None
        if token is None or record is None or not secret_matches(token, record.secret_hash):
            raise Unauthenticated("the node credential is not valid; " + NOT_ENROLLED)
        if record.revoked_at is not None:
            raise Unauthenticated(
                f"node {record.node_id} was removed from the cluster; enroll it again "
                "with a new join token and a fresh --data-dir"
            )
        return Principal(f"node:{record.node_id}", node_id=record.node_id), record.labels

    def forget_node(self, node_id: str) -> None:
        self._nodes.forget(node_id)
