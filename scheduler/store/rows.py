"""Conversions between database rows and domain dataclasses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from scheduler.domain import AttemptRecord, EventBody, Job, JobEvent, StateChange
from scheduler.states import JobState
from sdmesh.domain import AttemptProfile, ImageInfo
from sdmesh.spec import JobSpec, MemoryMode


def event_row(job_id: str, seq: int, attempt: int, now: float, body: EventBody) -> dict[str, Any]:
    # Both bodies hold only scalars: a copy of their fields is what asdict
    # gives, without its deep copy (which cost more than the insert).
    if isinstance(body, StateChange):
        kind, payload = "state", {**vars(body), "state": body.state.value}
    elif isinstance(body, ImageInfo):
        kind, payload = "image", dict(vars(body))
    else:
        raise TypeError(f"{type(body).__name__} events are not durable")
    return {
        "job_id": job_id,
        "seq": seq,
        "attempt": attempt,
        "kind": kind,
        "payload": payload,
        "created_at": now,
    }


def event_from_row(row: sa.Row[Any]) -> JobEvent:
    payload = dict(row.payload)
    body: EventBody
    if row.kind == "state":
        body = StateChange(**{**payload, "state": JobState(payload["state"])})
    else:
        body = ImageInfo(**payload)
    return JobEvent(row.job_id, row.seq, row.attempt, row.created_at, body)


def image_from_row(row: sa.Row[Any]) -> ImageInfo:
    return ImageInfo(row.idx, row.seed, row.sha256, row.size_bytes, row.width, row.height)


def job_from_row(row: sa.Row[Any], images: Sequence[ImageInfo]) -> Job:
    return Job(
        id=row.id,
        owner=row.owner,
        spec=JobSpec.from_dict(row.spec),
        state=JobState(row.state),
        attempt=row.attempt,
        failures=row.failures,
        max_attempts=row.max_attempts,
        created_at=row.created_at,
        updated_at=row.updated_at,
        node_id=row.node_id or "",
        node_name=row.node_name or "",
        gpu_index=-1 if row.gpu_index is None else row.gpu_index,
        memory_mode=MemoryMode(row.memory_mode),
        reason=row.reason,
        started_at=row.started_at,
        finished_at=row.finished_at,
        images=tuple(images),
    )


def attempt_from_row(row: sa.Row[Any]) -> AttemptRecord:
    return AttemptRecord(
        attempt=row.attempt,
        node_id=row.node_id,
        node_name=row.node_name,
        gpu_index=row.gpu_index,
        memory_mode=MemoryMode(row.memory_mode),
        assigned_at=row.assigned_at,
        outcome=row.outcome or "",
        reason=row.reason,
        placement=row.placement,
        vram_estimate_bytes=row.vram_estimate_bytes or 0,
        queued_seconds=row.queued_seconds or 0.0,
        started_at=row.started_at,
        ended_at=row.ended_at,
        profile=AttemptProfile(
            row.load_seconds or 0.0, row.mean_step_seconds or 0.0, row.peak_vram_bytes or 0
        ),
    )
