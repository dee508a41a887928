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
are pure functions; `Supervisor` applies them once per heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from scheduler.cluster import (
    ActiveAttempt,
    HealthCheckCommand,
    NodeSession,
    Orphan,
    PingCommand,
    StopCommand,
)
from scheduler.domain import AttemptOutcome
from scheduler.runtime import Runtime, UsesRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LivenessConfig:
    heartbeat_seconds: float = 2.0
    lease_seconds: float = 10.0
    # An attempt must report a step within max(this, deadline_steps x its
    # expected step time); the first step, which includes loading the
    # model, gets twice that.
    progress_deadline_seconds: float = 60.0
    deadline_steps: float = 10.0

    @property
    def probe_every_seconds(self) -> float:
        return 2 * self.heartbeat_seconds


def progress_deadline(config: LivenessConfig, active: ActiveAttempt) -> float:
    deadline = max(config.progress_deadline_seconds, config.deadline_steps * active.step_seconds)
    return deadline if active.last_step_at is not None else 2 * deadline


def lapsed(sessions: list[NodeSession], now: float, lease_seconds: float) -> list[NodeSession]:
    """Sessions silent for longer than the lease."""
    return [session for session in sessions if now - session.last_heard > lease_seconds]


def hung(session: NodeSession, now: float, config: LivenessConfig) -> list[ActiveAttempt]:
    """Running attempts that missed their progress deadline while their
    agent kept heartbeating. A silent agent is a matter for its lease (it may
    be partitioned, not hung), and an attempt waiting behind another on its
    worker has not started, so has no deadline yet."""
    if now - session.last_heard > 2 * config.heartbeat_seconds:
        return []
    late = []
    for active in session.attempts.values():
        if active.started_at is None or active.stopping:
            continue
        since = active.last_step_at if active.last_step_at is not None else active.started_at
        if now - since > progress_deadline(config, active):
            late.append(active)
    return late


def expired(orphans: list[Orphan], now: float) -> list[Orphan]:
    return [orphan for orphan in orphans if orphan.deadline <= now]


class Supervisor(UsesRuntime):
    def __init__(self, runtime: Runtime, config: LivenessConfig) -> None:
        super().__init__(runtime)
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
            log.warning("node %s lost: %s", session.info.name, session.lost)
            self.cluster.disconnect(session)  # the gateway re-queues what it held
        for session in self.cluster.sessions.values():
            for active in hung(session, now, self.config):
                await self._fence_hung(session, active, now)
        for orphan in expired(list(self.cluster.orphans.values()), now):
            if self.cluster.orphans.get(orphan.active.job_id) is orphan:
                del self.cluster.orphans[orphan.active.job_id]
                await requeue_lost(
                    self, orphan.active, f"{orphan.why}; not back within the lease", failure=True
                )
        for session in self.cluster.sessions.values():
            session.send(PingCommand())
            self._probe_unhealthy(session, now)

    async def _fence_hung(self, session: NodeSession, active: ActiveAttempt, now: float) -> None:
        since = active.last_step_at if active.last_step_at is not None else active.started_at
        silent = now - (since or now)
        reason = (
            f"{session.info.name} GPU {active.gpu_index}: no progress for {silent:.0f}s "
            f"(deadline {progress_deadline(self.config, active):.0f}s); the card may be hung"
        )
        log.warning("job %s attempt %d fenced: %s", active.job_id, active.attempt, reason)
        del session.attempts[active.job_id]
        session.unhealthy[active.gpu_index] = reason
        session.send(StopCommand(active.job_id, active.attempt, "missed its progress deadline"))
        await requeue(self, active, AttemptOutcome.FAILED, reason, failure=True)

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
            log.info("%s GPU %d is healthy again: %s", session.info.name, gpu_index, detail)
            self.dispatcher.wake()
        else:
            session.unhealthy[gpu_index] = f"health probe failed: {detail}"


async def requeue(
    runtime: UsesRuntime,
    active: ActiveAttempt,
    outcome: AttemptOutcome,
    reason: str,
    *,
    failure: bool,
) -> None:
    """Ends an attempt the scheduler gave up on and puts its job back in the
    queue (or fails it, after max_attempts failures)."""
    events = await runtime.db.run(
        runtime.db.store.requeue,
        active.job_id,
        active.attempt,
        outcome,
        reason,
        count_failure=failure,
    )
    if events:
        what = "failed" if events[-1].terminal else "re-queued"
        log.info("job %s attempt %d %s: %s", active.job_id, active.attempt, what, reason)
        runtime.hub.publish(events)
    runtime.dispatcher.wake()


async def requeue_lost(
    runtime: UsesRuntime, active: ActiveAttempt, reason: str, *, failure: bool
) -> None:
    """Re-queues an attempt whose node went away or forgot it."""
    await requeue(runtime, active, AttemptOutcome.LOST, reason, failure=failure)
