"""The statements the job store runs for every job, each built once.

Building a SQLAlchemy statement, and the cache key SQLAlchemy derives from
it, costs more CPU than running it. Built once, with bind parameters for
what changes from call to call, a statement goes straight to SQLAlchemy's
compiled cache. Plain column values are passed as parameters named after
their columns, which SQLAlchemy adds to the INSERT's VALUES or the UPDATE's
SET (its compiled cache keys on those names too); a bind parameter of our
own therefore never takes a column's name.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa

from scheduler.states import ACTIVE, JobState
from scheduler.store.schema import attempts, images, job_events, jobs

NOW = sa.bindparam("now", type_=sa.Float)

# ---- jobs: state changes (`Store._transition`) ----------------------------

# What a state change may set or require besides plain values. They are
# constants because `transition` caches its statements by them. FIRST_START
# binds :first_start (the time of the first start, kept on a restart).
NEXT_ATTEMPT = jobs.c.attempt + 1
ONE_MORE_FAILURE = jobs.c.failures + 1
FIRST_START = sa.func.coalesce(jobs.c.started_at, sa.bindparam("first_start", type_=sa.Float))
LAST_FAILURE = jobs.c.failures + 1 >= jobs.c.max_attempts
NOT_LAST_FAILURE = jobs.c.failures + 1 < jobs.c.max_attempts

Expressions = tuple[tuple[str, sa.ColumnElement[Any] | None], ...]


@functools.lru_cache(maxsize=128)
def transition(
    target: JobState,
    allowed: frozenset[JobState],
    with_attempt: bool,
    where: tuple[sa.ColumnElement[bool], ...],
    values: Expressions,
) -> sa.Update:
    """The conditional UPDATE of a move to `target`:

        UPDATE jobs SET state = target, updated_at = :now,
            last_seq = last_seq + :seq_step [, finished_at = :now] [, ...]
        WHERE id = :job_id AND state IN (allowed)
            [AND attempt = :expected_attempt] [AND where ...]
        RETURNING last_seq, attempt, node_id, node_name, gpu_index

    `values` names every other column set: with its expression, or with
    None for a plain value, which the caller passes (as `reason` always) as
    a parameter named after the column."""
    plain = {name for name, expression in values if expression is None}
    unknown = plain - set(jobs.c.keys())
    if unknown:
        raise ValueError(f"jobs has no column {sorted(unknown)}")
    conditions = [
        jobs.c.id == sa.bindparam("job_id"),
        # Literal bind values, not an expanding IN: the SQL is then the same
        # on every call, with nothing to render per execution.
        jobs.c.state.in_([sa.literal(state.value) for state in sorted(allowed)]),
        *where,
    ]
    if with_attempt:
        conditions.append(jobs.c.attempt == sa.bindparam("expected_attempt"))
    sets: dict[str, Any] = {
        "state": target.value,
        "updated_at": NOW,
        "last_seq": jobs.c.last_seq + sa.bindparam("seq_step"),
    }
    if target.terminal:
        sets["finished_at"] = NOW
    sets.update({name: expression for name, expression in values if expression is not None})
    return (
        sa.update(jobs)
        .where(*conditions)
        .values(sets)
        .returning(
            jobs.c.last_seq, jobs.c.attempt, jobs.c.node_id, jobs.c.node_name, jobs.c.gpu_index
        )
    )


# ---- inserts: rows as dicts keyed by column --------------------------------

INSERT_JOBS = sa.insert(jobs)
INSERT_EVENTS = sa.insert(job_events)
INSERT_IMAGES = sa.insert(images)

# An assignment's attempt. queued_seconds is the time since the job's last
# event before the assignment's own (:assigned_seq), read in the same
# statement; NULL when there is none.
INSERT_ATTEMPT = sa.insert(attempts).values(
    queued_seconds=NOW
    - sa.select(job_events.c.created_at)
    .where(
        job_events.c.job_id == sa.bindparam("event_job_id"),
        job_events.c.seq < sa.bindparam("assigned_seq"),
    )
    .order_by(job_events.c.seq.desc())
    .limit(1)
    .scalar_subquery()
)

# ---- attempts: updates, SET from the columns passed -------------------------

_THE_ATTEMPT = (
    attempts.c.job_id == sa.bindparam("attempt_job_id"),
    attempts.c.attempt == sa.bindparam("attempt_number"),
)
UPDATE_ATTEMPT = sa.update(attempts).where(*_THE_ATTEMPT)
END_ATTEMPT = sa.update(attempts).where(*_THE_ATTEMPT, attempts.c.outcome.is_(None))

# ---- reads -------------------------------------------------------------------

JOB = sa.select(jobs).where(jobs.c.id == sa.bindparam("job_id"))
JOBS_BY_IDS = sa.select(jobs).where(jobs.c.id.in_(sa.bindparam("job_ids", expanding=True)))
# One owner's request ids: the unique (owner, request_id) index serves it,
# where a row-value IN over (owner, request_id) makes SQLite scan every job.
JOBS_BY_REQUEST_IDS = sa.select(jobs).where(
    jobs.c.owner == sa.bindparam("owner"),
    jobs.c.request_id.in_(sa.bindparam("request_ids", expanding=True)),
)
ACTIVE_JOBS = sa.select(jobs).where(jobs.c.state.in_([state.value for state in ACTIVE]))
QUEUED_IDS = sa.select(jobs.c.id).where(jobs.c.state == JobState.QUEUED.value)
IMAGES_OF_JOB = (
    sa.select(images).where(images.c.job_id == sa.bindparam("job_id")).order_by(images.c.idx)
)
IMAGES_OF_JOBS = (
    sa.select(images)
    .where(images.c.job_id.in_(sa.bindparam("job_ids", expanding=True)))
    .order_by(images.c.idx)
)
IMAGE = sa.select(images).where(
    images.c.job_id == sa.bindparam("job_id"), images.c.idx == sa.bindparam("index")
)
EVENTS_AFTER = (
    sa.select(job_events)
    .where(job_events.c.job_id == sa.bindparam("job_id"), job_events.c.seq > sa.bindparam("after"))
    .order_by(job_events.c.seq)
)
ATTEMPTS_OF_JOB = (
    sa.select(attempts)
    .where(attempts.c.job_id == sa.bindparam("job_id"))
    .order_by(attempts.c.attempt)
)
ACTIVE_ATTEMPTS = (
    sa.select(attempts)
    .join(jobs, sa.and_(jobs.c.id == attempts.c.job_id, jobs.c.attempt == attempts.c.attempt))
    .where(jobs.c.state.in_([state.value for state in ACTIVE]))
)
COUNTED_FAILURES = (
    sa.select(attempts.c.attempt, attempts.c.reason)
    .where(attempts.c.job_id == sa.bindparam("job_id"), attempts.c.counted_failure.is_(True))
    .order_by(attempts.c.attempt)
)
