"""The scheduler's side of the type boundary: its client-facing messages
(jobs, events, nodes, models, attempts) and the commands it streams to
agents. The contract's own types convert in `sdmesh.convert`."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from protos import agent_pb2, common_pb2, scheduler_pb2
from scheduler.commands import (
    AssignCommand,
    Command,
    DrainCommand,
    HealthCheckCommand,
    ResumeCommand,
    StopCommand,
)
from scheduler.domain import AttemptRecord, Job, JobEvent, KnownModel, StateChange
from scheduler.states import JobState
from sdmesh.convert import (
    device_info_to_proto,
    device_stats_to_proto,
    enum_from_proto,
    image_to_proto,
    memory_mode_to_proto,
    preview_to_proto,
    progress_to_proto,
    spec_to_proto,
)
from sdmesh.domain import DeviceStats, ImageInfo, NodeInfo, Progress

_JOB_STATES = {
    JobState.QUEUED: common_pb2.JOB_STATE_QUEUED,
    JobState.ASSIGNED: common_pb2.JOB_STATE_ASSIGNED,
    JobState.RUNNING: common_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: common_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: common_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: common_pb2.JOB_STATE_CANCELLED,
}
_JOB_STATES_BACK: dict[int, JobState] = {v: state for state, v in _JOB_STATES.items()}


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def job_state_to_proto(state: JobState) -> common_pb2.JobState.ValueType:
    return _JOB_STATES[state]


def job_state_from_proto(value: int, field: str = "state") -> JobState:
    return enum_from_proto(_JOB_STATES_BACK, value, field, "job state", common_pb2.JobState)


def job_to_proto(
    job: Job,
    *,
    progress: Progress | None = None,
    reason: str | None = None,
    attempts: Sequence[AttemptRecord] = (),
) -> scheduler_pb2.Job:
    """A job as clients see it: `progress` while it runs, `reason` when it
    has more to say than the stored one (why it waits), and its attempts
    when asked for one job."""
    message = scheduler_pb2.Job(
        id=job.id,
        spec=spec_to_proto(job.spec),
        state=job_state_to_proto(job.state),
        owner=job.owner,
        attempt=job.attempt,
        failures=job.failures,
        max_attempts=job.max_attempts,
        node_id=job.node_id,
        node_name=job.node_name,
        gpu_index=job.gpu_index,
        reason=job.reason if reason is None else reason,
        images=[image_to_proto(image) for image in job.images],
        attempts=[attempt_to_proto(attempt) for attempt in attempts],
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        memory_mode=memory_mode_to_proto(job.memory_mode),
    )
    if job.started_at is not None:
        message.started_at.CopyFrom(timestamp(job.started_at))
    if job.finished_at is not None:
        message.finished_at.CopyFrom(timestamp(job.finished_at))
    if progress is not None:
        message.progress.CopyFrom(progress_to_proto(progress))
    return message


def event_to_proto(event: JobEvent) -> common_pb2.JobEvent:
    message = common_pb2.JobEvent(
        job_id=event.job_id, seq=event.seq, attempt=event.attempt, time=timestamp(event.time)
    )
    body = event.body
    if isinstance(body, StateChange):
        message.state.CopyFrom(
            common_pb2.StateChange(
                state=job_state_to_proto(body.state),
                reason=body.reason,
                node_id=body.node_id,
                node_name=body.node_name,
                gpu_index=body.gpu_index,
            )
        )
    elif isinstance(body, ImageInfo):
        message.image.CopyFrom(image_to_proto(body))
    elif isinstance(body, Progress):
        message.progress.CopyFrom(progress_to_proto(body))
    else:
        message.preview.CopyFrom(preview_to_proto(body))
    return message


def command_to_proto(command: Command) -> agent_pb2.SchedulerMessage:
    if isinstance(command, AssignCommand):
        return agent_pb2.SchedulerMessage(
            assign=agent_pb2.Assignment(
                gpu_index=command.gpu_index,
                jobs=[
                    agent_pb2.AssignedJob(
                        job_id=command.job_id,
                        attempt=command.attempt,
                        spec=spec_to_proto(command.spec),
                        memory_mode=memory_mode_to_proto(command.memory_mode),
                    )
                ],
            )
        )
    if isinstance(command, StopCommand):
        return agent_pb2.SchedulerMessage(
            stop=agent_pb2.StopAttempt(
                job_id=command.job_id, attempt=command.attempt, reason=command.reason
            )
        )
    if isinstance(command, DrainCommand):
        return agent_pb2.SchedulerMessage(
            drain=agent_pb2.Drain(timeout_seconds=command.timeout_seconds)
        )
    if isinstance(command, ResumeCommand):
        return agent_pb2.SchedulerMessage(resume=agent_pb2.Resume())
    if isinstance(command, HealthCheckCommand):
        return agent_pb2.SchedulerMessage(check=agent_pb2.HealthCheck(gpu_index=command.gpu_index))
    return agent_pb2.SchedulerMessage(ping=agent_pb2.Ping())


def node_to_proto(
    info: NodeInfo,
    *,
    connected: bool,
    last_seen: float,
    stats: dict[int, DeviceStats],
    active_jobs: dict[int, int],
    draining: bool = False,
    unhealthy: dict[int, str] | None = None,
) -> scheduler_pb2.Node:
    unhealthy = unhealthy or {}
    node = scheduler_pb2.Node(
        draining=draining,
        id=info.node_id,
        name=info.name,
        hostname=info.hostname,
        connected=connected,
        models=sorted(model.name for model in info.models),
        labels=dict(info.labels),
        agent_version=info.agent_version,
        last_seen=timestamp(last_seen),
    )
    for device in info.devices:
        entry = node.devices.add(
            info=device_info_to_proto(device),
            active_jobs=active_jobs.get(device.index, 0),
            healthy=device.index not in unhealthy,
            health_detail=unhealthy.get(device.index, ""),
        )
        if device.index in stats:
            entry.stats.CopyFrom(device_stats_to_proto(stats[device.index]))
    return node


def model_to_listing(model: KnownModel, connected_holders: list[str]) -> scheduler_pb2.Model:
    return scheduler_pb2.Model(
        name=model.name,
        weight_bytes=model.weight_bytes,
        dtype=model.dtype,
        node_ids=connected_holders,
        last_seen=timestamp(model.last_seen),
    )


def attempt_to_proto(attempt: AttemptRecord) -> scheduler_pb2.AttemptInfo:
    message = scheduler_pb2.AttemptInfo(
        attempt=attempt.attempt,
        node_id=attempt.node_id,
        node_name=attempt.node_name,
        gpu_index=attempt.gpu_index,
        memory_mode=memory_mode_to_proto(attempt.memory_mode),
        outcome=attempt.outcome,
        reason=attempt.reason,
        placement=attempt.placement,
        vram_estimate_bytes=attempt.vram_estimate_bytes,
        queued_seconds=attempt.queued_seconds,
        load_seconds=attempt.profile.load_seconds,
        mean_step_seconds=attempt.profile.mean_step_seconds,
        peak_vram_bytes=attempt.profile.peak_vram_bytes,
        assigned_at=timestamp(attempt.assigned_at),
    )
    if attempt.started_at is not None:
        message.started_at.CopyFrom(timestamp(attempt.started_at))
    if attempt.ended_at is not None:
        message.ended_at.CopyFrom(timestamp(attempt.ended_at))
    return message
