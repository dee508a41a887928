"""The scheduler's in-memory picture of the connected agents: their GPUs'
latest stats, their models, and the attempts each one holds. It turns that
picture into the `GpuView` snapshots placement works on.

No I/O and no clock: callers pass `now`. Commands for an agent are queued on
its session as domain objects; the gateway turns them into protobuf.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from scheduler.domain import DeviceStats, Job, NodeInfo
from scheduler.placement import GpuView, Placed
from scheduler.spec import JobSpec, MemoryMode
from scheduler.speeds import Speed, megapixel_steps, run_seconds
from scheduler.uploads import UploadBuffer


@dataclass(frozen=True)
class AssignCommand:
    job_id: str
    attempt: int
    spec: JobSpec
    gpu_index: int
    memory_mode: MemoryMode


@dataclass(frozen=True)
class StopCommand:
    job_id: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class DrainCommand:
    timeout_seconds: float  # 0: the agent's own shutdown timeout


@dataclass(frozen=True)
class ResumeCommand:
    pass


@dataclass(frozen=True)
class PingCommand:
    pass


@dataclass(frozen=True)
class HealthCheckCommand:
    gpu_index: int


Command = (
    AssignCommand | StopCommand | DrainCommand | ResumeCommand | PingCommand | HealthCheckCommand
)


@dataclass
class ActiveAttempt:
    job_id: str
    attempt: int
    gpu_index: int
    owner: str
    spec: JobSpec
    memory_mode: MemoryMode  # the mode it was placed in
    vram_bytes: int  # the estimate placement charged
    expected_seconds: float  # placement's guess at its run, cold load included
    assigned_at: float
    started_at: float | None = None
    last_step_at: float | None = None  # when it last reported a step
    step_seconds: float = 0.0  # the expected time per step; 0 when unknown
    stopping: bool = False  # a stop was sent; its progress is no longer news
    uploads: UploadBuffer = field(default_factory=UploadBuffer)

    @property
    def expected_images(self) -> int:
        return self.spec.batch_size

    def remaining_seconds(self, now: float) -> float:
        if self.started_at is None:
            return self.expected_seconds
        return max(0.0, self.expected_seconds - (now - self.started_at))


@dataclass
class Orphan:
    """An attempt whose agent is not connected: its stream dropped, or the
    scheduler restarted. It waits for that agent to reconnect and re-attach
    it until `deadline`, then it is re-queued as lost."""

    active: ActiveAttempt
    node_id: str
    node_name: str
    deadline: float
    why: str


@dataclass
class NodeSession:
    info: NodeInfo
    connected_at: float
    last_heard: float = 0.0  # by the scheduler's clock, never the agent's
    draining: bool = False
    unhealthy: dict[int, str] = field(default_factory=dict)  # GPU index -> why
    lost: str = ""  # set when its lease ran out: its attempts are lost at once
    stats: dict[int, DeviceStats] = field(default_factory=dict)
    stats_at: float = 0.0
    host_free_bytes: int = 0
    attempts: dict[str, ActiveAttempt] = field(default_factory=dict)
    stale_stopped: set[tuple[str, int]] = field(default_factory=set)
    ending: set[asyncio.Task[None]] = field(default_factory=set)  # attempts being closed
    outbox: asyncio.Queue[Command | None] = field(default_factory=asyncio.Queue)

    @property
    def node_id(self) -> str:
        return self.info.node_id

    def send(self, command: Command) -> None:
        self.outbox.put_nowait(command)

    def close(self) -> None:
        self.outbox.put_nowait(None)

    def bind(self, job: Job, attempt: int, placed: Placed, now: float) -> ActiveAttempt:
        """Records an attempt placement put on one of this node's GPUs."""
        spec = job.spec
        speed = placed.gpu.speeds.get(spec.model)
        step_seconds = 0.0
        if speed is not None and speed.megapixel_steps_per_second > 0:
            work = megapixel_steps(spec.width, spec.height, spec.batch_size, 1)
            step_seconds = run_seconds(work, speed.megapixel_steps_per_second, placed.need.mode)
        active = ActiveAttempt(
            job_id=job.id,
            attempt=attempt,
            gpu_index=placed.gpu.index,
            owner=job.owner,
            spec=spec,
            memory_mode=placed.need.mode,
            vram_bytes=placed.need.vram_bytes,
            expected_seconds=placed.expected_seconds,
            assigned_at=now,
            step_seconds=step_seconds,
        )
        self.attempts[job.id] = active
        return active

    def take_attempts(self) -> list[ActiveAttempt]:
        """The attempts it still holds, which it holds no longer."""
        held = list(self.attempts.values())
        self.attempts.clear()
        return held

    def current(self, job_id: str, attempt: int) -> ActiveAttempt | None:
        active = self.attempts.get(job_id)
        return active if active is not None and active.attempt == attempt else None

    def gpu_views(self, now: float) -> list[GpuView]:
        models = frozenset(model.name for model in self.info.models)
        views = []
        for device in self.info.devices:
            stats = self.stats.get(device.index)
            on_gpu = [a for a in self.attempts.values() if a.gpu_index == device.index]
            # A job that had not started by the last report is not in its
            # numbers yet, whether it waits on the agent or was just assigned.
            pending = sum(
                a.vram_bytes
                for a in on_gpu
                if a.started_at is None or a.started_at >= self.stats_at
            )
            resident: tuple[str, ...] = ()
            speeds: dict[str, Speed] = {}
            if stats is None:
                free, utilization = device.total_bytes, 0.0
            else:
                # Resident models count as free: the worker reuses the one a
                # job needs, and evicts the others before it loads another.
                free = stats.free_bytes + stats.resident_bytes
                resident = tuple(model.name for model in stats.resident_models)
                speeds, utilization = dict(stats.speeds), stats.utilization_percent
            if on_gpu:
                # When a new job's turn comes, the last job bound here has
                # loaded its model (or, run offloaded, none).
                last = max(on_gpu, key=lambda a: a.assigned_at)
                resident = (last.spec.model,) if last.memory_mode is MemoryMode.FULL else ()
            views.append(
                GpuView(
                    node_id=self.node_id,
                    node_name=self.info.name,
                    index=device.index,
                    total_bytes=device.total_bytes,
                    free_bytes=free - pending,
                    active_jobs=len(on_gpu),
                    bound_bytes=sum(a.vram_bytes for a in on_gpu),
                    busy_seconds=sum(a.remaining_seconds(now) for a in on_gpu),
                    models=models,
                    resident=frozenset(resident),
                    speeds=speeds,
                    utilization_percent=utilization,
                    host_free_bytes=self.host_free_bytes,
                    labels=dict(self.info.labels),
                    healthy=device.index not in self.unhealthy,
                    draining=self.draining,
                )
            )
        return views


class Cluster:
    def __init__(self) -> None:
        self.sessions: dict[str, NodeSession] = {}
        self.orphans: dict[str, Orphan] = {}  # job id -> attempt waiting for its agent

    def connect(self, info: NodeInfo, now: float) -> NodeSession:
        if info.node_id in self.sessions:
            raise KeyError(info.node_id)
        session = NodeSession(info=info, connected_at=now, last_heard=now)
        self.sessions[info.node_id] = session
        return session

    def disconnect(self, session: NodeSession) -> None:
        """Forgets the session and ends its stream; its attempts stay on it
        until the caller takes them."""
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
        session.close()

    def orphan(self, session: NodeSession, deadline: float, why: str) -> list[Orphan]:
        """Moves the session's attempts to the orphans, to wait for its agent."""
        orphans = [
            Orphan(active, session.node_id, session.info.name, deadline, why)
            for active in session.take_attempts()
        ]
        for orphan in orphans:
            self.orphans[orphan.active.job_id] = orphan
        return orphans

    def adopt(self, session: NodeSession, job_id: str, attempt: int, now: float) -> bool:
        """Re-attaches an orphan its agent says it still holds. Its upload
        starts over: the agent replays every image."""
        orphan = self.orphans.get(job_id)
        if orphan is None or orphan.node_id != session.node_id:
            return False
        if orphan.active.attempt != attempt:
            return False
        del self.orphans[job_id]
        active = orphan.active
        active.uploads = UploadBuffer()
        active.last_step_at = now  # its progress clock starts again
        session.attempts[job_id] = active
        return True

    def orphans_of(self, node_id: str) -> list[Orphan]:
        return [orphan for orphan in self.orphans.values() if orphan.node_id == node_id]

    def report_stats(
        self, node_id: str, stats: list[DeviceStats], now: float, host_free_bytes: int = 0
    ) -> None:
        session = self.sessions.get(node_id)
        if session is not None:
            session.stats = {device.index: device for device in stats}
            session.stats_at = now
            session.host_free_bytes = host_free_bytes

    def gpu_views(self, now: float) -> list[GpuView]:
        return [view for session in self.sessions.values() for view in session.gpu_views(now)]

    def active_by_owner(self) -> dict[str, int]:
        """Assigned and running jobs per user, for fair share."""
        counts: dict[str, int] = {}
        held = [a for session in self.sessions.values() for a in session.attempts.values()]
        for active in [*held, *(orphan.active for orphan in self.orphans.values())]:
            counts[active.owner] = counts.get(active.owner, 0) + 1
        return counts

    def holder(self, job_id: str, attempt: int) -> NodeSession | None:
        for session in self.sessions.values():
            if session.current(job_id, attempt) is not None:
                return session
        return None

    def models(self) -> dict[str, int]:
        """Model name -> the largest weight size a connected node reports."""
        sizes: dict[str, int] = {}
        for session in self.sessions.values():
            for model in session.info.models:
                sizes[model.name] = max(sizes.get(model.name, 0), model.weight_bytes)
        return sizes
