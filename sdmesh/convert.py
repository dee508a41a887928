"""The one conversion between the contract's dataclasses and the `common`
and `agent` protos, used by the scheduler, the agents and the SDK alike.

Dataclasses convert field by field by name (`to_message`, `from_message`),
so a field added to the .proto and to `sdmesh.spec` needs no edit here;
`tests/test_contract.py` checks that every side has every field.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, fields, is_dataclass
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
    ImageReady,
    ModelInfo,
    NodeInfo,
    Preview,
    Progress,
    Started,
)
from sdmesh.errors import InvalidArgument
from sdmesh.kinds import ControlNetUnit, InputInfo, LoraWeight
from sdmesh.spec import JobSpec, MemoryMode, SpecRequest
from sdmesh.speeds import Speed
from sdmesh.wire import IMAGE_CHUNK_BYTES

E = TypeVar("E")
M = TypeVar("M", bound=Message)
T = TypeVar("T")

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
# What an agent says of an ended attempt in words becomes one printable line
# of at most this many characters before the scheduler stores it: the reason
# goes into the job's row and events (PostgreSQL refuses NUL in text) and
# into every listing of the job. Agents' own reasons fit in it
# (gpu_node.runner.one_line).
MAX_REASON_CHARS = 500
MAX_ERROR_KIND_CHARS = 32


def enum_from_proto(table: Mapping[int, E], value: int, field: str, kind: str, names: Any) -> E:
    """`table[value]`, or InvalidArgument naming the field and the values
    allowed."""
    found = table.get(value)
    if found is None:
        allowed = ", ".join(names.Name(v) for v in table)
        raise InvalidArgument(field, f"unknown {kind} {value}; allowed: {allowed}")
    return found


def to_message(obj: Any, message_class: type[M], **overrides: Any) -> M:
    """A message from a dataclass whose fields carry the message's own
    names: each field the message has, then `overrides` for what needs
    converting (a nested message, an enum). None leaves a field unset."""
    names = {descriptor.name for descriptor in message_class.DESCRIPTOR.fields}
    values = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name in names}
    values.update(overrides)
    return message_class(**{name: value for name, value in values.items() if value is not None})


def from_message(cls: type[T], message: Message, **overrides: Any) -> T:
    """A dataclass from a message with the same field names; `overrides`
    give the fields that need converting."""
    values = {f.name: getattr(message, f.name) for f in fields(cls) if f.name not in overrides}  # type: ignore[arg-type]
    return cls(**values, **overrides)


def memory_mode_to_proto(mode: MemoryMode) -> common_pb2.MemoryMode.ValueType:
    return _MEMORY_MODES[mode]


def memory_mode_from_proto(value: int, field: str = "memory_mode") -> MemoryMode:
    return enum_from_proto(_MEMORY_MODES_BACK, value, field, "memory mode", common_pb2.MemoryMode)


# ---- the job spec ------------------------------------------------------------


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
        elif name == "loras":
            value = tuple(from_message(LoraWeight, lora) for lora in value)
        elif name == "controlnets":
            value = tuple(from_message(ControlNetUnit, unit) for unit in value)
        elif isinstance(value, Mapping):
            value = dict(value)
        values[name] = value
    return values


def _spec_overrides(spec: SpecRequest | JobSpec) -> dict[str, Any]:
    return {
        "memory_mode": memory_mode_to_proto(spec.memory_mode),
        "loras": [to_message(lora, common_pb2.LoraWeight) for lora in spec.loras],
        "controlnets": [to_message(unit, common_pb2.ControlNetUnit) for unit in spec.controlnets],
    }


def spec_request_to_proto(request: SpecRequest) -> common_pb2.JobSpec:
    """Fields left None stay unset, so the scheduler applies its defaults."""
    return to_message(request, common_pb2.JobSpec, **_spec_overrides(request))


def spec_request_from_proto(message: common_pb2.JobSpec) -> SpecRequest:
    values = _spec_values(message)
    return SpecRequest(**{f.name: values[f.name] for f in fields(SpecRequest)})


def spec_to_proto(spec: JobSpec) -> common_pb2.JobSpec:
    return to_message(spec, common_pb2.JobSpec, **_spec_overrides(spec))


def input_info_to_proto(info: InputInfo) -> common_pb2.InputInfo:
    return to_message(info, common_pb2.InputInfo)


def input_info_from_proto(message: common_pb2.InputInfo) -> InputInfo:
    return from_message(InputInfo, message)


def model_info_from_proto(model: common_pb2.ModelInfo) -> ModelInfo:
    """An agent that says no kind means a base model."""
    return from_message(ModelInfo, model, kind=model.kind or "base")


def spec_from_proto(message: common_pb2.JobSpec) -> JobSpec:
    """A resolved spec, as the scheduler sends it to agents and clients:
    every field set."""
    values = _spec_values(message)
    unset = sorted(f.name for f in fields(JobSpec) if values[f.name] is None)
    if unset:
        raise InvalidArgument(unset[0], "must be set in a resolved spec")
    return JobSpec(**{f.name: values[f.name] for f in fields(JobSpec)})


# ---- images, progress, previews ----------------------------------------------


# ---- devices, models, nodes --------------------------------------------------


def device_stats_to_proto(stats: DeviceStats) -> common_pb2.DeviceStats:
    return to_message(
        stats,
        common_pb2.DeviceStats,
        resident_models=[
            to_message(model, common_pb2.ModelInfo) for model in stats.resident_models
        ],
        model_speeds=[
            common_pb2.ModelSpeed(model=model, **asdict(speed))
            for model, speed in sorted(stats.speeds.items())
        ],
    )


def device_stats_from_proto(stats: common_pb2.DeviceStats) -> DeviceStats:
    return from_message(
        DeviceStats,
        stats,
        resident_models=tuple(model_info_from_proto(model) for model in stats.resident_models),
        speeds={speed.model: from_message(Speed, speed) for speed in stats.model_speeds},
    )


def hello_to_proto(node: NodeInfo) -> agent_pb2.Hello:
    return to_message(
        node,
        agent_pb2.Hello,
        devices=[to_message(device, common_pb2.DeviceInfo) for device in node.devices],
        models=[to_message(model, common_pb2.ModelInfo) for model in node.models],
    )


def hello_from_proto(hello: agent_pb2.Hello) -> NodeInfo:
    """The node an agent describes; InvalidArgument naming the field for a
    negative device or model size."""
    node = from_message(
        NodeInfo,
        hello,
        devices=tuple(from_message(DeviceInfo, device) for device in hello.devices),
        models=tuple(model_info_from_proto(model) for model in hello.models),
        labels=dict(hello.labels),
    )
    unsound = unsound_numbers(node)
    if unsound:
        name, value = unsound[0].split("=", 1)
        raise InvalidArgument(
            f"hello.{name}", f"must be a finite number, not negative; got {value}"
        )
    return node


def unsound_numbers(value: Any, name: str = "") -> list[str]:
    """Every number in `value` (a dataclass, with the dataclasses, tuples
    and mappings inside it) that is NaN, infinite or negative, as
    "path=value". No size, count, speed or time an agent reports may be
    any of those; the caller refuses what has them."""
    if isinstance(value, bool | str | bytes):
        return []
    if isinstance(value, int | float):
        return [] if math.isfinite(value) and value >= 0 else [f"{name}={value}"]
    if is_dataclass(value) and not isinstance(value, type):
        prefix = f"{name}." if name else ""
        return [
            found
            for f in fields(value)
            for found in unsound_numbers(getattr(value, f.name), prefix + f.name)
        ]
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, tuple | list):
        items = enumerate(value)
    else:
        return []
    return [found for key, item in items for found in unsound_numbers(item, f"{name}[{key}]")]


# ---- attempt updates ---------------------------------------------------------


def outcome_to_proto(outcome: AttemptOutcome) -> agent_pb2.AttemptOutcome.ValueType:
    return _OUTCOMES[outcome]


def outcome_from_proto(value: int) -> AttemptOutcome:
    """An outcome this version does not know counts as a failure."""
    return _OUTCOMES_BACK.get(value, AttemptOutcome.FAILED)


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
            message.progress.CopyFrom(to_message(part, common_pb2.Progress))
        elif isinstance(part, Preview):
            message.preview.CopyFrom(to_message(part, common_pb2.Preview))
        elif isinstance(part, ImageChunk):
            message.image.CopyFrom(to_message(part, agent_pb2.ImageUpload))
        else:
            ended = to_message(
                part,
                agent_pb2.AttemptEnded,
                outcome=outcome_to_proto(part.outcome),
                profile=to_message(part.profile, agent_pb2.AttemptProfile),
            )
            message.ended.CopyFrom(ended)
        messages.append(message)
    return messages


def one_printable_line(text: str, limit: int) -> str:
    """`text` as one printable line of at most `limit` characters: line
    breaks and tabs become spaces, any other unprintable character (NUL,
    ESC, a bidi control) its escape, as Python writes it."""
    line = "".join(
        char if char.isprintable() else " " if char.isspace() else repr(char)[1:-1]
        for char in text[:limit]
    )
    return line[:limit]


def update_from_proto(message: agent_pb2.JobUpdate) -> AttemptUpdate | None:
    """The update a message carries; None for one with no body (a newer
    agent's kind of update, say). An ended attempt's reason and error kind
    come as one printable line each, cut short."""
    kind = message.WhichOneof("body")
    body: Started | Progress | Preview | ImageChunk | Ended
    if kind == "started":
        body = Started()
    elif kind == "progress":
        body = from_message(Progress, message.progress)
    elif kind == "preview":
        body = from_message(Preview, message.preview)
    elif kind == "image":
        body = from_message(ImageChunk, message.image)
    elif kind == "ended":
        ended = message.ended
        body = from_message(
            Ended,
            ended,
            outcome=outcome_from_proto(ended.outcome),
            profile=from_message(AttemptProfile, ended.profile),
            reason=one_printable_line(ended.reason, MAX_REASON_CHARS),
            error_kind=one_printable_line(ended.error_kind, MAX_ERROR_KIND_CHARS),
        )
    else:
        return None
    return AttemptUpdate(message.job_id, message.attempt, body)
