"""The scheduler's side of the type boundary: its client-facing messages
(jobs, events, nodes, models, attempts) and the commands it streams to
agents. The contract's own types convert in `sdmesh.convert`."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from protos import agent_pb2, common_pb2, scheduler_pb2
from scheduler.commands import (
    AssignCommand,
    BatchPartner,
    Command,
    DrainCommand,
    HealthCheckCommand,
    ResumeCommand,
    StopCommand,
)
from scheduler.domain import AttemptRecord, Job, JobEvent, KnownModel, StateChange
from scheduler.states import JobState
from sdmesh.convert import (
    device_stats_to_proto,
    enum_from_proto,
    memory_mode_to_proto,
    spec_to_proto,
    to_message,
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


def timestamp_or_none(seconds: float | None) -> Timestamp | None:
    return None if seconds is None else timestamp(seconds)


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
    return to_message(
        job,
        scheduler_pb2.Job,
        spec=spec_to_proto(job.spec),
        state=job_state_to_proto(job.state),
        reason=job.reason if reason is None else reason,
        images=[to_message(image, common_pb2.ImageInfo) for image in job.images],
        attempts=[attempt_to_proto(attempt) for attempt in attempts],
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        started_at=timestamp_or_none(job.started_at),
        finished_at=timestamp_or_none(job.finished_at),
        progress=None if progress is None else to_message(progress, common_pb2.Progress),
        memory_mode=memory_mode_to_proto(job.memory_mode),
    )


def event_to_proto(event: JobEvent) -> common_pb2.JobEvent:
    message = common_pb2.JobEvent(
        job_id=event.job_id, seq=event.seq, attempt=event.attempt, time=timestamp(event.time)
    )
    body = event.body
    if isinstance(body, StateChange):
        message.state.CopyFrom(
            to_message(body, common_pb2.StateChange, state=job_state_to_proto(body.state))
        )
    elif isinstance(body, ImageInfo):
        message.image.CopyFrom(to_message(body, common_pb2.ImageInfo))
    elif isinstance(body, Progress):
        message.progress.CopyFrom(to_message(body, common_pb2.Progress))
    else:
        message.preview.CopyFrom(to_message(body, common_pb2.Preview))
    return message


def command_to_proto(command: Command) -> agent_pb2.SchedulerMessage:
    if isinstance(command, AssignCommand):
        members: tuple[AssignCommand | BatchPartner, ...] = (command, *command.partners)
        return agent_pb2.SchedulerMessage(
            assign=agent_pb2.Assignment(
                gpu_index=command.gpu_index,
                # One job, or several that run as one batch.
                jobs=[
                    agent_pb2.AssignedJob(
                        job_id=job.job_id,
                        attempt=job.attempt,
                        spec=spec_to_proto(job.spec),
                        memory_mode=memory_mode_to_proto(command.memory_mode),
                    )
                    for job in members
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
            info=to_message(device, common_pb2.DeviceInfo),
            active_jobs=active_jobs.get(device.index, 0),
            healthy=device.index not in unhealthy,
            health_detail=unhealthy.get(device.index, ""),
        )
        if device.index in stats:
            entry.stats.CopyFrom(device_stats_to_proto(stats[device.index]))
    return node


def model_to_listing(model: KnownModel, connected_holders: list[str]) -> scheduler_pb2.Model:
    return to_message(
        model,
        scheduler_pb2.Model,
        node_ids=connected_holders,
        last_seen=timestamp(model.last_seen),
    )


def attempt_to_proto(attempt: AttemptRecord) -> scheduler_pb2.AttemptInfo:
    profile = attempt.profile
    return to_message(
        attempt,
        scheduler_pb2.AttemptInfo,
        memory_mode=memory_mode_to_proto(attempt.memory_mode),
        load_seconds=profile.load_seconds,
        mean_step_seconds=profile.mean_step_seconds,
        peak_vram_bytes=profile.peak_vram_bytes,
        assigned_at=timestamp(attempt.assigned_at),
        started_at=timestamp_or_none(attempt.started_at),
        ended_at=timestamp_or_none(attempt.ended_at),
    )
