"""Worker events as the protobuf job updates an agent streams up: the
agent's type boundary in one direction. An image goes up in chunks under
the gRPC message limit, the last one carrying its digest."""

from __future__ import annotations

import hashlib

from gpu_node.runner import Ended, ImageReady, Started, StepDone, WorkerEvent
from protos import agent_pb2, common_pb2
from scheduler.convert import preview_to_proto, profile_to_proto
from scheduler.domain import AttemptOutcome, Preview

UPLOAD_CHUNK_BYTES = 256 * 1024
_OUTCOMES = {
    AttemptOutcome.SUCCEEDED: agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    AttemptOutcome.FAILED: agent_pb2.ATTEMPT_OUTCOME_FAILED,
    AttemptOutcome.STOPPED: agent_pb2.ATTEMPT_OUTCOME_STOPPED,
    AttemptOutcome.RELEASED: agent_pb2.ATTEMPT_OUTCOME_RELEASED,
}


def job_updates(event: WorkerEvent) -> list[agent_pb2.JobUpdate]:
    """The protobuf messages for one worker event; an image takes several."""
    body = event.body
    update = agent_pb2.JobUpdate(job_id=event.job_id, attempt=event.attempt)
    if isinstance(body, Started):
        update.started.SetInParent()
    elif isinstance(body, StepDone):
        update.progress.CopyFrom(common_pb2.Progress(step=body.step, total_steps=body.total_steps))
    elif isinstance(body, Preview):
        update.preview.CopyFrom(preview_to_proto(body))
    elif isinstance(body, Ended):
        update.ended.CopyFrom(
            agent_pb2.AttemptEnded(
                outcome=_OUTCOMES[body.outcome],
                reason=body.reason,
                error_kind=body.error_kind,
                profile=profile_to_proto(body.profile),
            )
        )
    else:
        return _image_updates(event.job_id, event.attempt, body)
    return [update]


def _image_updates(job_id: str, attempt: int, image: ImageReady) -> list[agent_pb2.JobUpdate]:
    data = image.png
    offsets = range(0, len(data), UPLOAD_CHUNK_BYTES) or range(1)
    updates = []
    for offset in offsets:
        last = offset + UPLOAD_CHUNK_BYTES >= len(data)
        chunk = agent_pb2.ImageUpload(
            index=image.index,
            seed=image.seed,
            width=image.width,
            height=image.height,
            offset=offset,
            data=data[offset : offset + UPLOAD_CHUNK_BYTES],
            last=last,
        )
        if last:
            chunk.sha256 = hashlib.sha256(data).hexdigest()
            chunk.size_bytes = len(data)
        updates.append(agent_pb2.JobUpdate(job_id=job_id, attempt=attempt, image=chunk))
    return updates
