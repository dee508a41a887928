"""The type boundary: conversions between protobuf messages and the domain
dataclasses, for both the scheduler's services and the agent's connection."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from protos import agent_pb2, common_pb2, scheduler_pb2
from scheduler.cluster import (
    AssignCommand,
    Command,
    DrainCommand,
    HealthCheckCommand,
    ResumeCommand,
    StopCommand,
)
from scheduler.domain import (
    AttemptProfile,
    AttemptRecord,
    DeviceInfo,
    DeviceStats,
    ImageMeta,
    Job,
    JobEvent,
    KnownModel,
    ModelInfo,
    NodeInfo,
    Preview,
    Progress,
    StateChange,
)
from scheduler.errors import InvalidArgument
from scheduler.spec import JobSpec, MemoryMode, SpecRequest
from scheduler.speeds import Speed
from scheduler.states import JobState

E = TypeVar("E")

_MEMORY_MODES = {
    MemoryMode.AUTO: common_pb2.MEMORY_MODE_AUTO,
    MemoryMode.FULL: common_pb2.MEMORY_MODE_FULL,
    MemoryMode.MODEL_OFFLOAD: common_pb2.MEMORY_MODE_MODEL_OFFLOAD,
    MemoryMode.SEQUENTIAL_OFFLOAD: common_pb2.MEMORY_MODE_SEQUENTIAL_OFFLOAD,
}
_MEMORY_MODES_BACK: dict[int, MemoryMode] = {v: mode for mode, v in _MEMORY_MODES.items()}

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


def _from_proto(table: dict[int, E], value: int, field: str, kind: str, names: Any) -> E:
    found = table.get(value)
    if found is None:
        allowed = ", ".join(names.Name(v) for v in table)
        raise InvalidArgument(field, f"unknown {kind} {value}; allowed: {allowed}")
    return found


def memory_mode_to_proto(mode: MemoryMode) -> common_pb2.MemoryMode.ValueType:
    return _MEMORY_MODES[mode]


def memory_mode_from_proto(value: int, field: str = "memory_mode") -> MemoryMode:
    return _from_proto(_MEMORY_MODES_BACK, value, field, "memory mode", common_pb2.MemoryMode)


def job_state_to_proto(state: JobState) -> common_pb2.JobState.ValueType:
    return _JOB_STATES[state]


def job_state_from_proto(value: int, field: str = "state") -> JobState:
    return _from_proto(_JOB_STATES_BACK, value, field, "job state", common_pb2.JobState)


def spec_request_from_proto(spec: common_pb2.JobSpec) -> SpecRequest:
    return SpecRequest(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        model=spec.model if spec.HasField("model") else None,
        width=spec.width if spec.HasField("width") else None,
        height=spec.height if spec.HasField("height") else None,
        steps=spec.steps if spec.HasField("steps") else None,
        cfg_scale=spec.cfg_scale if spec.HasField("cfg_scale") else None,
        seed=spec.seed if spec.HasField("seed") else None,
        sampler_name=spec.sampler_name if spec.HasField("sampler_name") else None,
        batch_size=spec.batch_size if spec.HasField("batch_size") else None,
        priority=spec.priority,
        memory_mode=memory_mode_from_proto(spec.memory_mode, "memory_mode"),
        request_id=spec.request_id,
        labels=dict(spec.labels),
        selector=dict(spec.selector),
    )


def spec_to_proto(spec: JobSpec) -> common_pb2.JobSpec:
    return common_pb2.JobSpec(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        model=spec.model,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        cfg_scale=spec.cfg_scale,
        seed=spec.seed,
        sampler_name=spec.sampler_name,
        batch_size=spec.batch_size,
        priority=spec.priority,
        memory_mode=memory_mode_to_proto(spec.memory_mode),
        request_id=spec.request_id,
        labels=dict(spec.labels),
        selector=dict(spec.selector),
    )


def spec_from_proto(spec: common_pb2.JobSpec) -> JobSpec:
    """A resolved spec, as the scheduler sends it to agents: every field set."""
    request = spec_request_from_proto(spec)
    values = {f.name: getattr(request, f.name) for f in fields(JobSpec)}
    unset = sorted(name for name, value in values.items() if value is None)
    if unset:
        raise InvalidArgument(unset[0], "must be set in a resolved spec")
    return JobSpec(**values)


def image_to_proto(image: ImageMeta) -> common_pb2.ImageInfo:
    return common_pb2.ImageInfo(
        index=image.index,
        seed=image.seed,
        sha256=image.sha256,
        size_bytes=image.size_bytes,
        width=image.width,
        height=image.height,
    )


def job_to_proto(job: Job, progress: Progress | None = None) -> scheduler_pb2.Job:
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
        reason=job.reason,
        images=[image_to_proto(image) for image in job.images],
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


def progress_to_proto(progress: Progress) -> common_pb2.Progress:
    return common_pb2.Progress(step=progress.step, total_steps=progress.total_steps)


def preview_to_proto(preview: Preview) -> common_pb2.Preview:
    return common_pb2.Preview(
        step=preview.step,
        total_steps=preview.total_steps,
        width=preview.width,
        height=preview.height,
        png=preview.png,
    )


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
    elif isinstance(body, ImageMeta):
        message.image.CopyFrom(image_to_proto(body))
    elif isinstance(body, Progress):
        message.progress.CopyFrom(progress_to_proto(body))
    else:
        message.preview.CopyFrom(preview_to_proto(body))
    return message


def device_info_to_proto(device: DeviceInfo) -> common_pb2.DeviceInfo:
    return common_pb2.DeviceInfo(
        index=device.index,
        name=device.name,
        uuid=device.uuid,
        kind=device.kind,
        total_bytes=device.total_bytes,
    )


def device_info_from_proto(device: common_pb2.DeviceInfo) -> DeviceInfo:
    return DeviceInfo(device.index, device.name, device.uuid, device.kind, device.total_bytes)


def device_stats_to_proto(stats: DeviceStats) -> common_pb2.DeviceStats:
    return common_pb2.DeviceStats(
        index=stats.index,
        total_bytes=stats.total_bytes,
        free_bytes=stats.free_bytes,
        used_bytes=stats.used_bytes,
        utilization_percent=stats.utilization_percent,
        resident_models=[model_to_proto(model) for model in stats.resident_models],
        model_speeds=[
            common_pb2.ModelSpeed(
                model=model,
                megapixel_steps_per_second=speed.megapixel_steps_per_second,
                load_seconds=speed.load_seconds,
                samples=speed.samples,
            )
            for model, speed in sorted(stats.speeds.items())
        ],
    )


def device_stats_from_proto(stats: common_pb2.DeviceStats) -> DeviceStats:
    return DeviceStats(
        stats.index,
        stats.total_bytes,
        stats.free_bytes,
        stats.used_bytes,
        stats.utilization_percent,
        tuple(model_from_proto(model) for model in stats.resident_models),
        {
            speed.model: Speed(speed.megapixel_steps_per_second, speed.load_seconds, speed.samples)
            for speed in stats.model_speeds
        },
    )


def model_to_proto(model: ModelInfo) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=model.name, weight_bytes=model.weight_bytes, dtype=model.dtype)


def model_from_proto(model: common_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(model.name, model.weight_bytes, model.dtype)


def hello_to_proto(node: NodeInfo) -> agent_pb2.Hello:
    return agent_pb2.Hello(
        node_id=node.node_id,
        name=node.name,
        hostname=node.hostname,
        agent_version=node.agent_version,
        devices=[device_info_to_proto(device) for device in node.devices],
        models=[model_to_proto(model) for model in node.models],
        labels=dict(node.labels),
    )


def hello_from_proto(hello: agent_pb2.Hello) -> NodeInfo:
    return NodeInfo(
        node_id=hello.node_id,
        name=hello.name,
        hostname=hello.hostname,
        agent_version=hello.agent_version,
        devices=tuple(device_info_from_proto(device) for device in hello.devices),
        models=tuple(model_from_proto(model) for model in hello.models),
        labels=dict(hello.labels),
    )


def profile_to_proto(profile: AttemptProfile) -> agent_pb2.AttemptProfile:
    return agent_pb2.AttemptProfile(
        load_seconds=profile.load_seconds,
        mean_step_seconds=profile.mean_step_seconds,
        peak_vram_bytes=profile.peak_vram_bytes,
    )


def profile_from_proto(profile: agent_pb2.AttemptProfile) -> AttemptProfile:
    return AttemptProfile(profile.load_seconds, profile.mean_step_seconds, profile.peak_vram_bytes)


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
