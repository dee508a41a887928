"""Liveness: leases, progress deadlines and device health.

- A node the scheduler has not heard from for its lease is lost: its stream
  is closed and its attempts go back to the queue, each counting as a
  failure.
- An attempt whose agent dropped its stream (or whose scheduler restarted)
  is an orphan. It waits for that agent to come back and re-attach it, and
  is re-queued as lost when the lease runs out first.
- An attempt that runs but reports no step before its progress deadline
  (a hung card: its agent still heartbeats) is fenced and re-queued, and
  its GPU is marked unhealthy. The GPU takes work again after a health
  probe on the agent passes.

Every decision uses the scheduler's clock, never an agent's. The decisions
are pure functions; `Supervisor` applies them once per heartbeat, through
the attempts' owner for anything that touches an attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from scheduler.attempt_state import ActiveAttempt, Orphan
from scheduler.attempts import Attempts
from scheduler.cluster import NodeSession
from scheduler.commands import HealthCheckCommand, PingCommand
from scheduler.config import LivenessConfig
from scheduler.runtime import Runtime, UsesRuntime

log = logging.getLogger(__name__)


def progress_deadline(config: LivenessConfig, active: ActiveAttempt) -> float:
    deadline = max(config.progress_deadline_seconds, config.deadline_steps * active.step_seconds)
    return deadline if active.last_step_at is not None else 2 * deadline


def lapsed(sessions: list[NodeSession], now: float, lease_seconds: float) -> list[NodeSession]:
    """Sessions silent for longer than the lease."""
    return [session for session in sessions if now - session.last_heard > lease_seconds]


def hung(
    attempts: Iterable[ActiveAttempt], last_heard: float, now: float, config: LivenessConfig
) -> list[ActiveAttempt]:
    """A node's running attempts that missed their progress deadline while
    its agent kept heartbeating (it was last heard at `last_heard`). A
    silent agent is a matter for its lease (it may be partitioned, not
    hung), and an attempt waiting behind another on its worker has not
    started, so has no deadline yet."""
    if now - last_heard > 2 * config.heartbeat_seconds:
        return []
    late = []
    for active in attempts:
        if active.started_at is None or active.stopping:
            continue
        since = active.last_step_at if active.last_step_at is not None else active.started_at
        if now - since > progress_deadline(config, active):
            late.append(active)
    return late


def expired(orphans: list[Orphan], now: float) -> list[Orphan]:
    return [orphan for orphan in orphans if orphan.deadline <= now]


class Supervisor(UsesRuntime):
    def __init__(self, runtime: Runtime, attempts: Attempts, config: LivenessConfig) -> None:
        super().__init__(runtime)
        self.attempts = attempts
        self.config = config
        self._probed: dict[tuple[str, int], float] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("liveness pass failed; retrying on the next heartbeat")

    async def tick(self) -> None:
        now = self.clock()
        sessions = list(self.cluster.sessions.values())
        for session in lapsed(sessions, now, self.config.lease_seconds):
            session.lost = f"no heartbeat for {now - session.last_heard:.1f}s"
            log.warning("node %s lost: %s", session.name, session.lost)
            self.cluster.disconnect(session)  # its stream ends; what it held is lost
        for session in list(self.cluster.sessions.values()):
            held = self.attempts.held(session)
            for active in hung(held, session.last_heard, now, self.config):
                await self._fence_hung(session, active, now)
        for orphan in expired(self.attempts.orphans(), now):
            await self.attempts.expire(orphan)
        for session in self.cluster.sessions.values():
            session.send(PingCommand())
            self._probe_unhealthy(session, now)

    async def _fence_hung(self, session: NodeSession, active: ActiveAttempt, now: float) -> None:
        since = active.last_step_at if active.last_step_at is not None else active.started_at
        silent = now - (since or now)
        reason = (
            f"{session.name} GPU {active.gpu_index}: no progress for {silent:.0f}s "
            f"(deadline {progress_deadline(self.config, active):.0f}s); the card may be hung"
        )
        session.unhealthy[active.gpu_index] = reason
        await self.attempts.fence_hung(session, active, reason)

    def _probe_unhealthy(self, session: NodeSession, now: float) -> None:
        for index in session.unhealthy:
            key = (session.node_id, index)
            if now - self._probed.get(key, 0.0) >= self.config.probe_every_seconds:
                self._probed[key] = now
                session.send(HealthCheckCommand(index))

    def health_reported(
        self, session: NodeSession, gpu_index: int, healthy: bool, detail: str
    ) -> None:
        if gpu_index not in session.unhealthy:
            return
        if healthy:
            del session.unhealthy[gpu_index]
            self._probed.pop((session.node_id, gpu_index), None)
            log.info("%s GPU %d is healthy again: %s", session.name, gpu_index, detail)
            self.wake()
        else:
            session.unhealthy[gpu_index] = f"health probe failed: {detail}"
