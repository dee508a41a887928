"""The one conversion between the contract's dataclasses and the `common`
and `agent` protos, used by the scheduler, the agents and the SDK alike.

The job spec converts field by field by name, so a field added to the
.proto and to `sdmesh.spec` needs no edit here; `tests/test_contract.py`
checks that every side has every field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from google.protobuf.message import Message

from protos import agent_pb2, common_pb2
from sdmesh.domain import (
    AttemptOutcome,
    AttemptProfile,
    AttemptUpdate,
    DeviceInfo,
    DeviceStats,
    Ended,
    ImageChunk,
    ImageInfo,
    ImageReady,
    ModelInfo,
    NodeInfo,
    Preview,
    Progress,
    Started,
)
from sdmesh.errors import InvalidArgument
from sdmesh.spec import JobSpec, MemoryMode, SpecRequest
from sdmesh.speeds import Speed
from sdmesh.wire import IMAGE_CHUNK_BYTES

E = TypeVar("E")

_MEMORY_MODES = {
    MemoryMode.AUTO: common_pb2.MEMORY_MODE_AUTO,
    MemoryMode.FULL: common_pb2.MEMORY_MODE_FULL,
    MemoryMode.MODEL_OFFLOAD: common_pb2.MEMORY_MODE_MODEL_OFFLOAD,
    MemoryMode.SEQUENTIAL_OFFLOAD: common_pb2.MEMORY_MODE_SEQUENTIAL_OFFLOAD,
}
_MEMORY_MODES_BACK: dict[int, MemoryMode] = {v: mode for mode, v in _MEMORY_MODES.items()}
# LOST is the scheduler's verdict on an attempt whose node went away; no
# agent reports it, so it has no wire value.
_OUTCOMES = {
    AttemptOutcome.SUCCEEDED: agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    AttemptOutcome.FAILED: agent_pb2.ATTEMPT_OUTCOME_FAILED,
    AttemptOutcome.STOPPED: agent_pb2.ATTEMPT_OUTCOME_STOPPED,
    AttemptOutcome.RELEASED: agent_pb2.ATTEMPT_OUTCOME_RELEASED,
}
_OUTCOMES_BACK: dict[int, AttemptOutcome] = {v: outcome for outcome, v in _OUTCOMES.items()}


def enum_from_proto(table: Mapping[int, E], value: int, field: str, kind: str, names: Any) -> E:
    """`table[value]`, or InvalidArgument naming the field and the values
    allowed."""
    found = table.get(value)
    if found is None:
        allowed = ", ".join(names.Name(v) for v in table)
        raise InvalidArgument(field, f"unknown {kind} {value}; allowed: {allowed}")
    return found


def memory_mode_to_proto(mode: MemoryMode) -> common_pb2.MemoryMode.ValueType:
    return _MEMORY_MODES[mode]


def memory_mode_from_proto(value: int, field: str = "memory_mode") -> MemoryMode:
    return enum_from_proto(_MEMORY_MODES_BACK, value, field, "memory mode", common_pb2.MemoryMode)


# ---- the job spec ------------------------------------------------------------


def _spec_message(values: Mapping[str, Any]) -> common_pb2.JobSpec:
    """A JobSpec message from field values; None leaves a field unset."""
    message = common_pb2.JobSpec()
    for name, value in values.items():
        if value is None:
            continue
        if name == "memory_mode":
            message.memory_mode = memory_mode_to_proto(value)
        elif isinstance(value, Mapping):
            getattr(message, name).update(value)
        else:
            setattr(message, name, value)
    return message


def _spec_values(message: common_pb2.JobSpec) -> dict[str, Any]:
    """Every field of a JobSpec message by name, None where an optional
    field is unset."""
    plain: Message = message  # fields by name, not by the generated stub's literals
    values: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        name = descriptor.name
        value = getattr(message, name)
        if descriptor.has_presence and not plain.HasField(name):
            value = None
        elif name == "memory_mode":
            value = memory_mode_from_proto(value, name)
        elif isinstance(value, Mapping):
            value = dict(value)
        values[name] = value
    return values


def spec_request_to_proto(request: SpecRequest) -> common_pb2.JobSpec:
    return _spec_message({f.name: getattr(request, f.name) for f in fields(SpecRequest)})


def spec_request_from_proto(message: common_pb2.JobSpec) -> SpecRequest:
    values = _spec_values(message)
    return SpecRequest(**{f.name: values[f.name] for f in fields(SpecRequest)})


def spec_to_proto(spec: JobSpec) -> common_pb2.JobSpec:
    return _spec_message({f.name: getattr(spec, f.name) for f in fields(JobSpec)})


def spec_from_proto(message: common_pb2.JobSpec) -> JobSpec:
    """A resolved spec, as the scheduler sends it to agents and clients:
    every field set."""
    values = _spec_values(message)
    unset = sorted(f.name for f in fields(JobSpec) if values[f.name] is None)
    if unset:
        raise InvalidArgument(unset[0], "must be set in a resolved spec")
    return JobSpec(**{f.name: values[f.name] for f in fields(JobSpec)})


# ---- images, progress, previews ----------------------------------------------


def image_to_proto(image: ImageInfo) -> common_pb2.ImageInfo:
    return common_pb2.ImageInfo(
        index=image.index,
        seed=image.seed,
        sha256=image.sha256,
        size_bytes=image.size_bytes,
        width=image.width,
        height=image.height,
    )


def image_from_proto(image: common_pb2.ImageInfo) -> ImageInfo:
    return ImageInfo(
        image.index, image.seed, image.sha256, image.size_bytes, image.width, image.height
    )


def progress_to_proto(progress: Progress) -> common_pb2.Progress:
    return common_pb2.Progress(step=progress.step, total_steps=progress.total_steps)


def progress_from_proto(progress: common_pb2.Progress) -> Progress:
    return Progress(progress.step, progress.total_steps)


def preview_to_proto(preview: Preview) -> common_pb2.Preview:
    return common_pb2.Preview(
        step=preview.step,
        total_steps=preview.total_steps,
        width=preview.width,
        height=preview.height,
        png=preview.png,
    )


def preview_from_proto(preview: common_pb2.Preview) -> Preview:
    return Preview(preview.step, preview.total_steps, preview.width, preview.height, preview.png)


# ---- devices, models, nodes --------------------------------------------------


def model_to_proto(model: ModelInfo) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=model.name, weight_bytes=model.weight_bytes, dtype=model.dtype)


def model_from_proto(model: common_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(model.name, model.weight_bytes, model.dtype)


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


# ---- attempt updates ---------------------------------------------------------


def outcome_to_proto(outcome: AttemptOutcome) -> agent_pb2.AttemptOutcome.ValueType:
    return _OUTCOMES[outcome]


def outcome_from_proto(value: int) -> AttemptOutcome:
    """An outcome this version does not know counts as a failure."""
    return _OUTCOMES_BACK.get(value, AttemptOutcome.FAILED)


def profile_to_proto(profile: AttemptProfile) -> agent_pb2.AttemptProfile:
    return agent_pb2.AttemptProfile(
        load_seconds=profile.load_seconds,
        mean_step_seconds=profile.mean_step_seconds,
        peak_vram_bytes=profile.peak_vram_bytes,
    )


def profile_from_proto(profile: agent_pb2.AttemptProfile) -> AttemptProfile:
    return AttemptProfile(profile.load_seconds, profile.mean_step_seconds, profile.peak_vram_bytes)


def image_chunks(image: ImageReady, chunk_bytes: int = IMAGE_CHUNK_BYTES) -> list[ImageChunk]:
    """A PNG in pieces under the gRPC message limit; the last carries the
    digest and size of the whole."""
    data = image.png
    chunks = []
    for offset in range(0, len(data), chunk_bytes) or range(1):
        last = offset + chunk_bytes >= len(data)
        chunks.append(
            ImageChunk(
                index=image.index,
                offset=offset,
                data=data[offset : offset + chunk_bytes],
                seed=image.seed,
                width=image.width,
                height=image.height,
                last=last,
                sha256=hashlib.sha256(data).hexdigest() if last else "",
                size_bytes=len(data) if last else 0,
            )
        )
    return chunks


def _chunk_to_proto(chunk: ImageChunk) -> agent_pb2.ImageUpload:
    return agent_pb2.ImageUpload(
        index=chunk.index,
        seed=chunk.seed,
        width=chunk.width,
        height=chunk.height,
        offset=chunk.offset,
        data=chunk.data,
        last=chunk.last,
        sha256=chunk.sha256,
        size_bytes=chunk.size_bytes,
    )


def update_to_protos(update: AttemptUpdate) -> list[agent_pb2.JobUpdate]:
    """The messages for one attempt update: an image takes one per chunk."""
    body = update.body
    if isinstance(body, ImageReady):
        bodies: list[Any] = image_chunks(body)
    else:
        bodies = [body]
    messages = []
    for part in bodies:
        message = agent_pb2.JobUpdate(job_id=update.job_id, attempt=update.attempt)
        if isinstance(part, Started):
            message.started.SetInParent()
        elif isinstance(part, Progress):
            message.progress.CopyFrom(progress_to_proto(part))
        elif isinstance(part, Preview):
            message.preview.CopyFrom(preview_to_proto(part))
        elif isinstance(part, ImageChunk):
            message.image.CopyFrom(_chunk_to_proto(part))
        else:
            message.ended.CopyFrom(
                agent_pb2.AttemptEnded(
                    outcome=outcome_to_proto(part.outcome),
                    reason=part.reason,
                    error_kind=part.error_kind,
                    profile=profile_to_proto(part.profile),
                )
            )
        messages.append(message)
    return messages


def update_from_proto(message: agent_pb2.JobUpdate) -> AttemptUpdate | None:
    """The update a message carries; None for one with no body (a newer
    agent's kind of update, say)."""
    kind = message.WhichOneof("body")
    body: Started | Progress | Preview | ImageChunk | Ended
    if kind == "started":
        body = Started()
    elif kind == "progress":
        body = progress_from_proto(message.progress)
    elif kind == "preview":
        body = preview_from_proto(message.preview)
    elif kind == "image":
        image = message.image
        body = ImageChunk(
            index=image.index,
            offset=image.offset,
            data=image.data,
            seed=image.seed,
            width=image.width,
            height=image.height,
            last=image.last,
            sha256=image.sha256,
            size_bytes=image.size_bytes,
        )
    elif kind == "ended":
        ended = message.ended
        body = Ended(
            outcome_from_proto(ended.outcome),
            ended.reason,
            ended.error_kind,
            profile_from_proto(ended.profile),
        )
    else:
        return None
    return AttemptUpdate(message.job_id, message.attempt, body)
