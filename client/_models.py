"""What the SDK returns: plain dataclasses, converted from protobuf here and
nowhere else in the client. A job's spec, its images' metadata and its
progress are the contract's own types (`sdmesh.domain`, `sdmesh.spec`), as
the scheduler and agents use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from client._errors import SdmeshError
from protos import common_pb2, scheduler_pb2
from sdmesh.convert import (
    from_message,
    memory_mode_from_proto,
    spec_from_proto,
)
from sdmesh.domain import ImageInfo, Progress
from sdmesh.errors import InvalidArgument  # re-exported by client/__init__
from sdmesh.spec import JobSpec, MemoryMode

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def state_name(value: int) -> str:
    return common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def _time(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def _optional_time(message: Any, name: str) -> datetime | None:
    return _time(getattr(message, name)) if message.HasField(name) else None


@dataclass(frozen=True)
class Image:
    info: ImageInfo
    data: bytes  # the PNG file

    def save(self, path: str | Path) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.data)
        return target.resolve()


@dataclass(frozen=True)
class Attempt:
    """One dispatch of a job: where, why, and its profile (as Forge's
    --profile reports it)."""

    attempt: int
    node_id: str
    node_name: str
    gpu_index: int
    memory_mode: MemoryMode
    outcome: str  # "" while it runs
    reason: str
    placement: str  # why this GPU
    vram_estimate_bytes: int
    queued_seconds: float
    load_seconds: float
    mean_step_seconds: float
    peak_vram_bytes: int
    assigned_at: datetime
    started_at: datetime | None
    ended_at: datetime | None

    @classmethod
    def from_proto(cls, attempt: scheduler_pb2.AttemptInfo) -> Attempt:
        return from_message(
            cls,
            attempt,
            memory_mode=memory_mode_from_proto(attempt.memory_mode),
            assigned_at=_time(attempt.assigned_at),
            started_at=_optional_time(attempt, "started_at"),
            ended_at=_optional_time(attempt, "ended_at"),
        )


@dataclass(frozen=True)
class Job:
    id: str
    state: str  # QUEUED, ASSIGNED, RUNNING, SUCCEEDED, FAILED, CANCELLED
    owner: str
    spec: JobSpec
    attempt: int
    failures: int
    max_attempts: int
    node_id: str
    node_name: str
    gpu_index: int
    memory_mode: MemoryMode
    reason: str
    images: list[ImageInfo]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress | None
    attempts: list[Attempt]  # filled in by get_job, empty in listings

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"

    @classmethod
    def from_proto(cls, job: scheduler_pb2.Job) -> Job:
        try:
            spec = spec_from_proto(job.spec)
        except InvalidArgument as exc:  # a resolved spec has every field
            raise SdmeshError(
                f"job {job.id}: the scheduler sent an incomplete spec: {exc}"
            ) from None
        return from_message(
            cls,
            job,
            state=state_name(job.state),
            spec=spec,
            memory_mode=memory_mode_from_proto(job.memory_mode),
            images=[from_message(ImageInfo, image) for image in job.images],
            created_at=_time(job.created_at),
            updated_at=_time(job.updated_at),
            started_at=_optional_time(job, "started_at"),
            finished_at=_optional_time(job, "finished_at"),
            progress=from_message(Progress, job.progress) if job.HasField("progress") else None,
            attempts=[Attempt.from_proto(attempt) for attempt in job.attempts],
        )


@dataclass(frozen=True)
class Event:
    """One entry of a job's history. `seq` > 0 for durable events (state
    changes, stored images); progress and previews have seq 0. `attempt`
    tells a retry from a step going backwards."""

    job_id: str
    seq: int
    attempt: int
    time: datetime


@dataclass(frozen=True)
class StateEvent(Event):
    state: str
    reason: str
    node_id: str
    node_name: str
    gpu_index: int

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class ImageEvent(Event):
    image: ImageInfo


@dataclass(frozen=True)
class ProgressEvent(Event):
    step: int
    total_steps: int


@dataclass(frozen=True)
class PreviewEvent(Event):
    step: int
    total_steps: int
    width: int
    height: int
    png: bytes = field(repr=False)


def event_from_proto(event: common_pb2.JobEvent) -> Event:
    base = (event.job_id, event.seq, event.attempt, _time(event.time))
    kind = event.WhichOneof("body")
    if kind == "state":
        s = event.state
        return StateEvent(*base, state_name(s.state), s.reason, s.node_id, s.node_name, s.gpu_index)
    if kind == "image":
        return ImageEvent(*base, from_message(ImageInfo, event.image))
    if kind == "progress":
        return ProgressEvent(*base, event.progress.step, event.progress.total_steps)
    p = event.preview
    return PreviewEvent(*base, p.step, p.total_steps, p.width, p.height, p.png)


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    uuid: str
    kind: str
    total_bytes: int
    free_bytes: int | None  # None when the node is not connected
    used_bytes: int | None
    utilization_percent: float | None
    active_jobs: int
    resident_models: list[str]  # loaded on the device now
    speeds: dict[str, float]  # measured megapixel-steps per second, per model
    healthy: bool = True  # False after a missed progress deadline, until a probe passes
    health_detail: str = ""  # why it is unhealthy


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    hostname: str
    connected: bool
    devices: list[Device]
    models: list[str]
    labels: dict[str, str]
    agent_version: str
    last_seen: datetime
    draining: bool = False  # takes no new work; what runs finishes or is handed back

    @classmethod
    def from_proto(cls, node: scheduler_pb2.Node) -> Node:
        devices = []
        for device in node.devices:
            stats = device.stats if device.HasField("stats") else None
            devices.append(
                Device(
                    index=device.info.index,
                    name=device.info.name,
                    uuid=device.info.uuid,
                    kind=device.info.kind,
                    total_bytes=device.info.total_bytes,
                    free_bytes=stats.free_bytes if stats else None,
                    used_bytes=stats.used_bytes if stats else None,
                    utilization_percent=stats.utilization_percent if stats else None,
                    active_jobs=device.active_jobs,
                    resident_models=[m.name for m in stats.resident_models] if stats else [],
                    speeds=(
                        {s.model: s.megapixel_steps_per_second for s in stats.model_speeds}
                        if stats
                        else {}
                    ),
                    healthy=device.healthy,
                    health_detail=device.health_detail,
                )
            )
        return from_message(
            cls,
            node,
            devices=devices,
            models=list(node.models),
            labels=dict(node.labels),
            last_seen=_time(node.last_seen),
        )


ROLES = {scheduler_pb2.ROLE_LEADER: "leader", scheduler_pb2.ROLE_STANDBY: "standby"}


@dataclass(frozen=True)
class Health:
    """One scheduler replica's answer to GetHealth. Only the leader serves;
    a standby waits to take over and points at the leader if it knows it."""

    address: str  # where this answer came from
    role: str  # "leader", "standby" or "unknown"
    epoch: int  # the leader lease's epoch, as this replica last saw it
    replica_id: str
    leader_address: str  # "" if unknown
    version: str

    @property
    def leader(self) -> bool:
        return self.role == "leader"

    @classmethod
    def from_proto(cls, health: scheduler_pb2.Health, address: str) -> Health:
        return from_message(cls, health, address=address, role=ROLES.get(health.role, "unknown"))


@dataclass(frozen=True)
class Model:
    name: str
    weight_bytes: int
    dtype: str
    node_ids: list[str]  # connected nodes that hold it
    last_seen: datetime
    kind: str = "base"  # "base", "inpaint", "controlnet" or "lora" (sdmesh.kinds.ModelKind)
    family: str = ""  # the base family it fits: "sd1", "sdxl", "tiny", ...; "" unknown

    @classmethod
    def from_proto(cls, model: scheduler_pb2.Model) -> Model:
        """A scheduler that says no kind means a base model."""
        return from_message(
            cls,
            model,
            node_ids=list(model.node_ids),
            last_seen=_time(model.last_seen),
            kind=model.kind or "base",
        )
