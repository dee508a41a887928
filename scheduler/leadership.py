"""Whether this scheduler replica leads, as a small state machine.

Replicas sharing a database contend for the leader lease (see
`scheduler.store.leader`). Each replica has a stable id, kept in its data
dir. A standby tries for the lease every third of a lease; the one that
holds it leads, renewing it as often. A leader steps down at once when its
epoch is gone (a write found a newer one, or a renewal found another
holder) or when it could not renew for a whole lease: its writes are fenced
by the epoch anyway. A single scheduler is the same thing with nobody to
contend with.

What leading means (recovering attempts, dispatching, talking to agents)
is the server's: it passes `lead` and `step_down`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from scheduler.config import REPLICA_ID_FILE
from scheduler.store import Database
from scheduler.store.leader import LeaderLease
from sdmesh.waiting import wait_event

log = logging.getLogger(__name__)


def load_replica_id(data_dir: Path) -> str:
    path = data_dir / REPLICA_ID_FILE
    if path.exists():
        text = path.read_text().strip()
        if text:
            return text
    replica_id = secrets.token_hex(8)
    path.write_text(replica_id + "\n")
    return replica_id


@dataclass
class ReplicaState:
    replica_id: str
    address: str  # where agents and clients reach this replica
    leading: bool = False
    epoch: int = 0
    leader_address: str = ""  # as the lease last said

    def standby_message(self) -> str:
        where = (
            f"the active scheduler is at {self.leader_address}"
            if self.leader_address
            else "no replica holds the leader lease yet"
        )
        return f"standby replica {self.replica_id} ({self.address}): {where}"


class Leadership:
    def __init__(
        self,
        db: Database,
        replica: ReplicaState,
        lease_seconds: float,
        *,
        lead: Callable[[int], Awaitable[None]],
        step_down: Callable[[], Awaitable[None]],
    ) -> None:
        self.db = db
        self.replica = replica
        self.lease_seconds = lease_seconds
        self.lease = LeaderLease(db.store.engine, replica.replica_id, replica.address)
        self._lead = lead
        self._step_down = step_down
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self, address: str) -> None:
        """Takes the lease if it can (a lone scheduler, or one whose own
        earlier run held it, leads before it answers its first call), then
        keeps trying or renewing in the background."""
        self.replica.address = self.lease.address = address
        loop = asyncio.get_running_loop()

        def lost() -> None:  # called on a database thread
            loop.call_soon_threadsafe(self._lost.set)

        self.db.store.fence.on_lost = lost
        epoch = await self.db.run(self.lease.acquire, self.lease_seconds, None)
        if epoch is not None:
            await self._become_leader(epoch)
        else:
            await self._note_leader()
        self._task = asyncio.create_task(self._run(), name="leadership")

    async def _run(self) -> None:
        lease = self.lease_seconds
        renewed = time.monotonic()
        while not self._stopped:
            await wait_event(self._lost, lease / 3)
            leading = self.replica.leading
            try:
                epoch = await self.db.run(
                    self.lease.acquire, lease, self.replica.epoch if leading else None
                )
            except Exception as exc:  # the database is unreachable
                log.warning("leader lease: %s: %s", type(exc).__name__, exc)
                if leading and time.monotonic() - renewed > lease:
                    await self._stop_leading("could not renew the leader lease")
                continue
            if leading and (epoch != self.replica.epoch or self._lost.is_set()):
                await self._stop_leading("another replica holds the leader lease")
                epoch = None
            if epoch is not None:
                renewed = time.monotonic()
                if not self.replica.leading:
                    await self._become_leader(epoch)
            else:
                await self._note_leader()

    async def _note_leader(self) -> None:
        try:
            record = await self.db.run(self.lease.read)
        except Exception:
            return
        self.replica.epoch = record.epoch
        self.replica.leader_address = "" if record.expired else record.address

    async def _become_leader(self, epoch: int) -> None:
        self._lost.clear()
        self.db.store.fence.epoch = epoch
        self.replica.epoch = epoch
        self.replica.leader_address = self.replica.address
        await self._lead(epoch)
        self.replica.leading = True
        log.info("leading at epoch %d", epoch)

    async def _stop_leading(self, why: str) -> None:
        """Nothing more is written (the fence refuses it anyway); agents and
        watchers are let go to find the new leader."""
        if not self.replica.leading:
            return
        log.warning("stepping down: %s", why)
        self.replica.leading = False
        self._lost.clear()
        self.db.store.fence.epoch = -1  # matches no epoch: every write is refused
        await self._step_down()

    async def stop(self) -> int | None:
        """Stops leading and contending; returns the epoch this replica led
        at, if it led, for `release` once in-flight calls have finished
        (their writes still pass the fence until then)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        epoch = self.replica.epoch if self.replica.leading else None
        self.replica.leading = False
        await self._step_down()
        return epoch

    async def release(self, epoch: int | None) -> None:
        """Hands the lease over at once, rather than after it runs out."""
        if epoch is None:
            return
        try:
            await self.db.run(self.lease.release, epoch)
        except Exception as exc:
            log.info("could not hand the lease over: %s", exc)
