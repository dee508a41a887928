"""What the scheduler tells an agent, as domain objects queued on the
agent's session; `scheduler.convert` turns them into protobuf."""

from __future__ import annotations

from dataclasses import dataclass

from sdmesh.spec import JobSpec, MemoryMode


@dataclass(frozen=True)
class BatchPartner:
    """A job that runs in one pipeline call with the job it is assigned
    with (cross-request batching)."""

    job_id: str
    attempt: int
    spec: JobSpec


@dataclass(frozen=True)
class AssignCommand:
    job_id: str
    attempt: int
    spec: JobSpec
    gpu_index: int
    memory_mode: MemoryMode
    partners: tuple[BatchPartner, ...] = ()


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
