"""Protobuf <-> domain conversions keep every field."""

from __future__ import annotations

import pytest

from protos import common_pb2
from scheduler.cluster import AssignCommand, StopCommand
from scheduler.convert import (
    command_to_proto,
    event_to_proto,
    hello_from_proto,
    hello_to_proto,
    job_to_proto,
    memory_mode_from_proto,
    spec_from_proto,
    spec_request_from_proto,
    spec_to_proto,
)
from scheduler.domain import ImageMeta, Job, JobEvent, Preview, StateChange
from scheduler.errors import InvalidArgument
from scheduler.spec import MemoryMode
from scheduler.states import JobState
from tests.factories import make_node, make_spec


def test_a_resolved_spec_round_trips() -> None:
    spec = make_spec(labels={"pool": "a"}, memory_mode=MemoryMode.FULL, request_id="r1")
    assert spec_from_proto(spec_to_proto(spec)) == spec


def test_unset_optional_fields_stay_unset_for_the_defaults() -> None:
    request = spec_request_from_proto(common_pb2.JobSpec(prompt="p", steps=0))
    assert request.steps == 0  # set to 0 explicitly: invalid, not "default"
    assert (request.width, request.model, request.seed) == (None, None, None)
    with pytest.raises(InvalidArgument, match="batch_size"):
        spec_from_proto(common_pb2.JobSpec(prompt="p"))


def test_an_unknown_enum_value_is_named() -> None:
    with pytest.raises(InvalidArgument, match="memory_mode: unknown memory mode 9"):
        memory_mode_from_proto(9)


def test_job_and_events() -> None:
    image = ImageMeta(0, 5, "ab" * 32, 10, 64, 64)
    job = Job("j", "alice", make_spec(), JobState.SUCCEEDED, 2, 1, 3, 1.5, 2.5,
              node_id="n", node_name="host", gpu_index=0, images=(image,))  # fmt: skip
    message = job_to_proto(job)
    assert (message.id, message.state, message.attempt, message.images[0].seed) == (
        "j", common_pb2.JOB_STATE_SUCCEEDED, 2, 5,
    )  # fmt: skip
    assert message.created_at.ToNanoseconds() == 1_500_000_000
    assert not message.HasField("started_at")
    state = event_to_proto(
        JobEvent("j", 3, 2, 1.0, StateChange(JobState.RUNNING, node_name="host"))
    )
    assert (state.seq, state.state.state, state.state.node_name) == (
        3,
        common_pb2.JOB_STATE_RUNNING,
        "host",
    )
    preview = event_to_proto(JobEvent("j", 0, 2, 1.0, Preview(1, 4, 8, 8, b"png")))
    assert preview.WhichOneof("body") == "preview"
    assert preview.preview.png == b"png"


def test_hello_and_commands() -> None:
    node = make_node("n1", labels={"pool": "x"})
    assert hello_from_proto(hello_to_proto(node)) == node
    assign = command_to_proto(AssignCommand("j", 2, make_spec(), 1, MemoryMode.FULL))
    [job] = assign.assign.jobs
    assert (assign.assign.gpu_index, job.job_id, job.attempt) == (1, "j", 2)
    assert spec_from_proto(job.spec) == make_spec()
    stop = command_to_proto(StopCommand("j", 2, "cancelled"))
    assert (stop.stop.job_id, stop.stop.attempt, stop.stop.reason) == ("j", 2, "cancelled")
