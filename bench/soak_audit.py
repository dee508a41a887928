"""The pure parts of the soak benchmark: the seeded fault schedule, how
submissions are released between faults, and the audit of every job the
API acknowledged against the database and the image directories. See
`bench.soak` for what each figure means."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import SubmitOptions

REPLICAS = 2

KINDS = ("agent_kill", "agent_pause", "leader_kill", "leader_pause")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
_IMAGE_FILE = re.compile(r"^a(\d+)-(\d+)\.png$")


# ---- the pure parts: schedule, job options, audit ------------------------


def fault_schedule(count: int, seed: int) -> list[str]:
    """`count` fault kinds: rounds of all four kinds, each round shuffled by
    a generator seeded with `seed`, so any prefix is nearly balanced."""
    rng = random.Random(seed)
    kinds: list[str] = []
    while len(kinds) < count:
        round_ = list(KINDS)
        rng.shuffle(round_)
        kinds.extend(round_)
    return kinds[:count]


def job_options(number: int) -> SubmitOptions:
    """Small jobs; every fourth a batch of two."""
    return {"width": 64, "height": 64, "steps": 4, "batch_size": 2 if number % 4 == 3 else 1}


def release_quota(jobs: int, faults: int, started: int, finished: bool) -> int:
    """How many jobs the submitter may have sent once `started` faults have
    begun: an equal share per fault, all of them once the faults are done."""
    if finished or faults <= 0:
        return jobs
    return min(jobs, math.ceil(jobs * started / faults))


@dataclass(frozen=True)
class FinalJob:
    state: str
    attempt: int


@dataclass(frozen=True)
class ImageRow:
    job_id: str
    idx: int
    attempt: int
    path: str  # relative to the images directory


def parse_image_file(relative: str) -> tuple[str, int, int] | None:
    """(job id, attempt, index) of `xx/JOB/aATTEMPT-INDEX.png` (the layout of
    scheduler/images.py), or None for anything else (a `.part` file)."""
    parts = relative.split("/")
    if len(parts) != 3 or parts[1][:2] != parts[0]:
        return None
    match = _IMAGE_FILE.match(parts[2])
    if match is None:
        return None
    return parts[1], int(match.group(1)), int(match.group(2))


@dataclass
class Audit:
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0  # FAILED or CANCELLED
    lost: int = 0
    duplicated: int = 0
    reexecuted: int = 0
    image_mismatch: int = 0
    stray_files: int = 0
    missing_files: int = 0
    lost_jobs: dict[str, str] = field(default_factory=dict)  # id -> why
    failed_jobs: dict[str, str] = field(default_factory=dict)  # id -> state
    duplicated_jobs: dict[str, list[str]] = field(default_factory=dict)  # id -> evidence
    mismatched_jobs: dict[str, str] = field(default_factory=dict)
    reexecuted_jobs: dict[str, int] = field(default_factory=dict)  # id -> attempt
    stray: list[str] = field(default_factory=list)  # "directory:path"
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.image_mismatch == 0


def audit(
    acknowledged: Mapping[str, int],
    finals: Mapping[str, FinalJob | None],
    rows: Iterable[ImageRow],
    disk: Mapping[str, Iterable[str]],
) -> Audit:
    """The verdict on a run. `acknowledged`: job id -> batch size, for every
    job the API acknowledged; `finals`: what the API says of each at the
    end (None: not found); `rows`: the `images` table; `disk`: per images
    directory, the paths of the files under it, relative to it."""
    result = Audit(submitted=len(acknowledged))
    by_job: dict[str, list[ImageRow]] = {}
    for row in rows:
        by_job.setdefault(row.job_id, []).append(row)
    stored = {(r.job_id, r.attempt, r.idx) for rs in by_job.values() for r in rs}
    on_disk: dict[str, dict[str, set[int]]] = {}  # job -> directory -> attempts with files
    present: set[str] = set()
    for directory, paths in sorted(disk.items()):
        for path in sorted(paths):
            present.add(path)
            parsed = parse_image_file(path)
            if parsed is None:
                result.stray.append(f"{directory}:{path}")
                continue
            job_id, attempt, idx = parsed
            on_disk.setdefault(job_id, {}).setdefault(directory, set()).add(attempt)
            if (job_id, attempt, idx) not in stored:
                result.stray.append(f"{directory}:{path}")
    result.missing = sorted(
        f"{r.job_id}:{r.path}" for rs in by_job.values() for r in rs if r.path not in present
    )

    for job_id, batch in acknowledged.items():
        final = finals.get(job_id)
        if final is None:
            result.lost_jobs[job_id] = "not found"
        elif final.state not in TERMINAL:
            result.lost_jobs[job_id] = f"still {final.state} at attempt {final.attempt}"
        elif final.state == "SUCCEEDED":
            result.succeeded += 1
        else:
            result.failed += 1
            result.failed_jobs[job_id] = final.state
        if final is not None and final.attempt > 1:
            result.reexecuted_jobs[job_id] = final.attempt

        job_rows = by_job.get(job_id, [])
        evidence = []
        attempts = sorted({r.attempt for r in job_rows})
        if len(attempts) > 1:
            evidence.append(f"images table holds attempts {attempts}")
        if len(job_rows) > batch:
            evidence.append(f"images table holds {len(job_rows)} rows for a batch of {batch}")
        for directory, attempts_there in sorted(on_disk.get(job_id, {}).items()):
            if len(attempts_there) > 1:
                orphans = sorted(set(attempts_there) - set(attempts))
                note = f" (not in the images table: {orphans})" if orphans else ""
                evidence.append(
                    f"{directory} holds files of attempts {sorted(attempts_there)}{note}"
                )
        if evidence:
            result.duplicated_jobs[job_id] = evidence

        if final is not None and final.state == "SUCCEEDED":
            want = {(final.attempt, idx) for idx in range(batch)}
            have = {(r.attempt, r.idx) for r in job_rows}
            if have != want or len(job_rows) != batch:
                result.mismatched_jobs[job_id] = (
                    f"succeeded at attempt {final.attempt} with batch {batch}, "
                    f"images (attempt, index) {sorted(have)}"
                )
        elif job_rows:
            state = final.state if final is not None else "not found"
            result.mismatched_jobs[job_id] = f"{state} but has {len(job_rows)} image rows"

    result.lost = len(result.lost_jobs)
    result.duplicated = len(result.duplicated_jobs)
    result.reexecuted = len(result.reexecuted_jobs)
    result.image_mismatch = len(result.mismatched_jobs)
    result.stray_files = len(result.stray)
    result.missing_files = len(result.missing)
    return result


def read_database(url: str, ledger: Iterable[str]) -> tuple[list[ImageRow], dict[str, Any]]:
    """The images table, and facts for the report: attempt outcomes and jobs
    the database holds that the ledger does not."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [
                ImageRow(str(job_id), int(idx), int(attempt), str(path))
                for job_id, idx, attempt, path in conn.exec_driver_sql(
                    "SELECT job_id, idx, attempt, path FROM images"
                )
            ]
            outcomes = {
                str(outcome): int(count)
                for outcome, count in conn.exec_driver_sql(
                    "SELECT COALESCE(outcome, 'running'), COUNT(*) FROM attempts GROUP BY 1"
                )
            }
            states = {
                str(state): int(count)
                for state, count in conn.exec_driver_sql(
                    "SELECT state, COUNT(*) FROM jobs GROUP BY 1"
                )
            }
            stored = {str(job_id) for (job_id,) in conn.exec_driver_sql("SELECT id FROM jobs")}
            epoch = conn.exec_driver_sql("SELECT MAX(epoch) FROM leader").scalar()
    finally:
        engine.dispose()
    facts: dict[str, Any] = {
        "attempt_outcomes": outcomes,
        "job_states_in_database": states,
        "unacknowledged_jobs": sorted(stored - set(ledger)),
        "leader_epoch": epoch,
    }
    return rows, facts


def read_disk(root: Path) -> dict[str, list[str]]:
    """Per images directory (the shared one that LocalCluster gives
    replicas, and each replica's own under its data dir), its files."""
    dirs = [root / "images"]
    dirs += [root / data_dir(index) / "images" for index in range(REPLICAS)]
    return {
        images.relative_to(root).as_posix(): sorted(
            p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()
        )
        for images in dirs
        if images.is_dir()
    }


def summary(result: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in result["faults_by_kind"].items())
    lines = [
        f"jobs:   {result['submitted']} submitted, {result['succeeded']} succeeded, "
        f"{result['failed']} failed or cancelled, {result['lost']} lost, "
        f"{result['duplicated']} duplicated, {result['reexecuted']} re-executed",
        f"images: {result['image_mismatch']} mismatched sets, {result['stray_files']} stray "
        f"files, {result['missing_files']} missing files",
        f"faults: {result['faults_injected']} ({kinds}); "
        f"{result['faults_while_running']} fired while a job ran",
        f"time:   {result['wall_seconds']:.0f} s in all, faults over "
        f"{result['fault_seconds']:.0f} s, drain {result['drain_seconds']:.0f} s",
    ]
    if result["submit_errors"]:
        lines.append(f"submit errors: {len(result['submit_errors'])}")
    if result["unexpected_exits"]:
        lines.append(f"unexpected exits: {len(result['unexpected_exits'])}")
    return "\n".join(lines)


def data_dir(index: int) -> str:
    """A replica's data dir under the cluster root, as LocalCluster names it."""
    return "scheduler" if index == 0 else f"scheduler-{index}"
