"""Protobuf <-> domain conversions keep every field: the contract's
(`sdmesh.convert`) and the scheduler's own (`scheduler.convert`)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from protos import common_pb2
from scheduler.commands import AssignCommand, StopCommand
from scheduler.convert import command_to_proto, event_to_proto, job_to_proto
from scheduler.domain import Job, JobEvent, StateChange
from scheduler.states import JobState
from sdmesh.convert import (
    hello_from_proto,
    hello_to_proto,
    memory_mode_from_proto,
    spec_from_proto,
    spec_request_from_proto,
    spec_to_proto,
    update_from_proto,
    update_to_protos,
)
from sdmesh.domain import (
    AttemptOutcome,
    AttemptProfile,
    AttemptUpdate,
    Ended,
    ImageChunk,
    ImageInfo,
    ImageReady,
    Preview,
    Progress,
    Started,
)
from sdmesh.errors import InvalidArgument
from sdmesh.spec import MemoryMode
from sdmesh.wire import IMAGE_CHUNK_BYTES
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
    image = ImageInfo(0, 5, "ab" * 32, 10, 64, 64)
    job = Job("j", "alice", make_spec(), JobState.SUCCEEDED, 2, 1, 3, 1.5, 2.5,
              node_id="n", node_name="host", gpu_index=0, images=(image,))  # fmt: skip
    message = job_to_proto(job)
    assert (message.id, message.state, message.attempt, message.images[0].seed) == (
        "j", common_pb2.JOB_STATE_SUCCEEDED, 2, 5,
    )  # fmt: skip
    assert message.created_at.ToNanoseconds() == 1_500_000_000
    assert not message.HasField("started_at")
    assert (message.owner, message.node_name, message.gpu_index) == ("alice", "host", 0)
    assert message.spec == spec_to_proto(make_spec())
    assert job_to_proto(replace(job, reason="failed 1 time")).reason == "failed 1 time"
    assert job_to_proto(job, reason="waiting: busy").reason == "waiting: busy"
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


@pytest.mark.parametrize(
    "body",
    [
        Started(),
        Progress(3, 20),
        Preview(3, 20, 8, 8, b"png"),
        Ended(AttemptOutcome.FAILED, "OutOfMemoryError: ...", "oom", AttemptProfile(0.5, 0.1, 7)),
        Ended(AttemptOutcome.RELEASED, "node is draining"),
    ],
)
def test_attempt_updates_cross_the_wire_unchanged(body: object) -> None:
    update = AttemptUpdate("j", 2, body)  # type: ignore[arg-type]
    [message] = update_to_protos(update)
    assert update_from_proto(message) == update


def test_an_image_is_uploaded_in_chunks_with_its_digest() -> None:
    png = bytes(range(256)) * (IMAGE_CHUNK_BYTES // 256 * 2 + 3)
    messages = update_to_protos(AttemptUpdate("j", 2, ImageReady(1, 42, 64, 64, png)))
    chunks = [update_from_proto(message) for message in messages]
    bodies = [chunk.body for chunk in chunks if chunk is not None]
    assert all(isinstance(body, ImageChunk) for body in bodies)
    assert [b.offset for b in bodies] == [0, IMAGE_CHUNK_BYTES, 2 * IMAGE_CHUNK_BYTES]  # type: ignore[union-attr]
    assert b"".join(b.data for b in bodies) == png  # type: ignore[union-attr]
    assert [b.last for b in bodies] == [False, False, True]  # type: ignore[union-attr]
    last = bodies[-1]
    assert isinstance(last, ImageChunk)
    assert (last.sha256, last.size_bytes) == (hashlib.sha256(png).hexdigest(), len(png))
    assert {(m.job_id, m.attempt, m.image.index, m.image.seed) for m in messages} == {
        ("j", 2, 1, 42)
    }


def test_an_update_with_no_body_is_none_and_an_unknown_outcome_a_failure() -> None:
    from protos import agent_pb2

    assert update_from_proto(agent_pb2.JobUpdate(job_id="j", attempt=1)) is None
    message = agent_pb2.JobUpdate(job_id="j", attempt=1, ended=agent_pb2.AttemptEnded(outcome=9))  # type: ignore[arg-type]
    update = update_from_proto(message)
    assert update is not None
    assert isinstance(update.body, Ended)
    assert update.body.outcome is AttemptOutcome.FAILED
