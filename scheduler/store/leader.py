"""The leader lease and the write fence.

Replicas sharing one database contend for a single `leader` row. Holding it
means: this replica's id is in it and it has not expired by the database's
clock (never a replica's own). Taking it over after it expired raises the
epoch. Every write transaction first checks, in the same transaction, that
the epoch is still the one this replica was elected with. A replica that was
paused past its lease and then woke commits nothing, because the standby's
takeover raised the epoch.

On PostgreSQL the check takes a share lock on the leader row, so a takeover
(which updates the row) waits for the writes in flight, and every write
after it sees the new epoch. SQLite has one writer at a time; there the
check is itself a write, which takes that lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa

from scheduler.errors import Unavailable
from scheduler.store.schema import leader


class NotLeader(Unavailable):
    """This replica's epoch is no longer the leader's: it must not write."""


@dataclass(frozen=True)
class LeaderRecord:
    epoch: int
    holder: str
    address: str
    expires_at: float
    now: float  # the database's clock when it was read

    @property
    def expired(self) -> bool:
        return self.expires_at <= self.now


def database_now(conn: sa.Connection) -> float:
    """Seconds since the epoch by the database server's clock."""
    if conn.dialect.name == "postgresql":
        query = "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"
    else:
        query = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    return float(conn.exec_driver_sql(query).scalar_one())


# The fence's statements, built once: every write transaction runs one.
# PostgreSQL: the epoch, under a share lock that a takeover must wait for.
_EPOCH_SHARED = sa.select(leader.c.epoch).where(leader.c.id == 1).with_for_update(read=True)
# SQLite: a no-op write of the row if the epoch is still ours, which takes
# the database's one write lock.
_TOUCH_IF_EPOCH = (
    sa.update(leader)
    .where(leader.c.id == 1, leader.c.epoch == sa.bindparam("held_epoch"))
    .values(epoch=leader.c.epoch)
)


class Fence:
    """Opens write transactions that commit only while `epoch` is the
    leader's. With no epoch set (tools, tests, a single scheduler before its
    first election) writes are not fenced."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.epoch: int | None = None
        self.on_lost: Callable[[], None] | None = None
        self._shared = threading.local()  # the transaction `together` opened

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        shared: sa.Connection | None = getattr(self._shared, "conn", None)
        if shared is not None:
            yield shared
            return
        with self.engine.begin() as conn:
            self.check(conn)
            yield conn

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Every `begin` in this thread within the block joins one fenced
        transaction, which commits at the end of the block or not at all."""
        with self.begin() as conn:
            self._shared.conn = conn
            try:
                yield
            finally:
                self._shared.conn = None

    def check(self, conn: sa.Connection) -> None:
        epoch = self.epoch
        if epoch is None:
            return
        if conn.dialect.name == "postgresql":
            held = conn.execute(_EPOCH_SHARED).scalar() == epoch
        else:
            held = conn.execute(_TOUCH_IF_EPOCH, {"held_epoch": epoch}).rowcount == 1
        if not held:
            if self.on_lost is not None:
                self.on_lost()
            raise NotLeader(f"this scheduler replica lost the leader lease (epoch {epoch})")


class LeaderLease:
    """One replica's side of the lease: acquire or renew, release, read."""

    def __init__(self, engine: sa.Engine, replica_id: str, address: str) -> None:
        self.engine = engine
        self.replica_id = replica_id
        self.address = address

    def acquire(self, lease_seconds: float, epoch: int | None) -> int | None:
        """Renews the lease if this replica holds it at `epoch`, or takes it
        over if it expired (or this replica's id holds it from an earlier
        run: the data dir lock guarantees that run is over). Returns the
        epoch held, or None when another replica holds it."""
        mine = leader.c.holder == self.replica_id
        renewing = sa.and_(mine, leader.c.epoch == (-1 if epoch is None else epoch))
        with self.engine.begin() as conn:
            now = database_now(conn)
            row = conn.execute(
                sa.update(leader)
                .where(leader.c.id == 1, sa.or_(renewing, mine, leader.c.expires_at <= now))
                .values(
                    epoch=sa.case((renewing, leader.c.epoch), else_=leader.c.epoch + 1),
                    holder=self.replica_id,
                    address=self.address,
                    expires_at=now + lease_seconds,
                )
                .returning(leader.c.epoch)
            ).first()
        return None if row is None else int(row.epoch)

    def release(self, epoch: int) -> None:
        """Lets a standby take over at once instead of after the lease."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(leader)
                .where(leader.c.id == 1, leader.c.holder == self.replica_id)
                .where(leader.c.epoch == epoch)
                .values(expires_at=0.0)
            )

    def read(self) -> LeaderRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(leader).where(leader.c.id == 1)).one()
            return LeaderRecord(
                row.epoch, row.holder, row.address, row.expires_at, database_now(conn)
            )
