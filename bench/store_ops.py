"""Store benchmark: the scheduler's CPU per job in the job store, in process.

    python -m bench.store_ops              # SQLite and PostgreSQL, 100 jobs x 9 rounds
    python -m bench.store_ops --jobs 30 --rounds 3 --only sqlite   # quicker

Jobs go through the store's calls as the scheduler makes them: submit_many
(batches of 1, as a lone client gets, and of 16, as group commit gathers
under load), assign, start, succeed with one image (a fake path), and the
two reads a watcher makes (events_after, get_job). Each call is timed in
CPU seconds of this process (time.process_time), so the database server's
own work on PostgreSQL is not counted; the table gives microseconds per job
for each call, the minimum over the rounds, unfenced and fenced (with a
leader epoch set, as production runs: every write transaction checks it).
CPU time still grows when other processes share the cores: compare runs
made one after the other on a quiet machine.

SQLite is a file in a temporary directory. PostgreSQL is a fresh database
on 127.0.0.1:5432 (user postgres), dropped after; it is skipped with a
message when the server is unreachable.

bench/results/store_ops.json:

    {"source": COMMIT, "jobs": N, "rounds": R,
     "results": {BACKEND: {CASE: {OPERATION: US, ..., "total": US, "wall": US}}}}

CASE: batch1, batch16, batch1_fenced, batch16_fenced. "wall" is the wall
time per job of the whole round (PostgreSQL: including its commits).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (`python bench/NAME.py`): make the repository importable,
    # as `python -m bench.NAME` does.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa

from bench.cluster_driver import source_version
from scheduler.store import Store
from scheduler.store.leader import LeaderLease
from scheduler.store.store import Submission
from sdmesh.domain import AttemptProfile, ImageInfo
from sdmesh.spec import JobSpec, MemoryMode

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
OPERATIONS = ("submit", "assign", "start", "succeed", "events_after", "get_job")
CASES = ((1, False), (16, False), (1, True), (16, True))  # (submit batch, fenced)
WARMUP_JOBS = 32
RESULTS = Path(__file__).resolve().parent / "results" / "store_ops.json"


def spec(number: int, request_id: str) -> JobSpec:
    return JobSpec(
        prompt="a lighthouse at dusk",
        negative_prompt="",
        model="sd15",
        width=512,
        height=512,
        steps=20,
        cfg_scale=7.0,
        seed=1000 + number,
        sampler_name="Euler a",
        batch_size=1,
        priority=0,
        memory_mode=MemoryMode.AUTO,
        request_id=request_id,
        labels={},
    )


class Timer:
    """CPU seconds spent in each operation."""

    def __init__(self) -> None:
        self.cpu = dict.fromkeys(OPERATIONS, 0.0)

    @contextmanager
    def __call__(self, operation: str) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            self.cpu[operation] += time.process_time() - start


def run_jobs(store: Store, prefix: str, count: int, batch: int, timer: Timer) -> None:
    """`count` jobs through submit, assign, start, succeed and a watcher's
    reads, one call of each kind for every job, phase by phase."""
    ids = [f"{prefix}{number:06d}" for number in range(count)]
    for first in range(0, count, batch):
        chunk = [Submission(job_id, "bench", spec(first + i, f"req-{job_id}"), 3)
                 for i, job_id in enumerate(ids[first : first + batch])]  # fmt: skip
        with timer("submit"):
            results = store.submit_many(chunk)
        assert all(created for _, created in results)
    for job_id in ids:
        with timer("assign"):
            events = store.assign(job_id, expected_attempt=0, node_id="node-1",
                                  node_name="host-gpu0", gpu_index=0,
                                  memory_mode=MemoryMode.FULL, placement="fits",
                                  vram_estimate_bytes=4 * 2**30)  # fmt: skip
        assert events is not None
    for job_id in ids:
        with timer("start"):
            events = store.start(job_id, 1)
        assert events is not None
    profile = AttemptProfile(load_seconds=0.5, mean_step_seconds=0.05, peak_vram_bytes=3 * 2**30)
    for number, job_id in enumerate(ids):
        image = ImageInfo(0, 1000 + number, "0" * 64, 400_000, 512, 512)
        with timer("succeed"):
            events = store.succeed(job_id, 1, [(image, f"{job_id}/0.png")], profile)
        assert events is not None
    for job_id in ids:
        with timer("events_after"):
            found = store.events_after(job_id, 0)
        assert len(found) == 5
        with timer("get_job"):
            job = store.get_job(job_id)
        assert job is not None


def measure(url: str, jobs: int, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    store = Store(url)
    try:
        store.migrate()
        epoch = LeaderLease(store.engine, "bench", "bench:1").acquire(3600.0, None)
        for batch, fenced in CASES:
            case = f"batch{batch}" + ("_fenced" if fenced else "")
            store.fence.epoch = epoch if fenced else None
            run_jobs(store, f"w{case}-", WARMUP_JOBS, batch, Timer())
            best: dict[str, float] = {}
            for round_number in range(rounds):
                timer = Timer()
                wall = time.perf_counter()
                run_jobs(store, f"r{round_number}{case}-", jobs, batch, timer)
                wall = time.perf_counter() - wall
                row = {op: seconds / jobs * 1e6 for op, seconds in timer.cpu.items()}
                row["total"] = sum(row.values())
                row["wall"] = wall / jobs * 1e6
                best = {key: min(best.get(key, value), value) for key, value in row.items()}
            results[case] = best
            say(f"  {case}: {best['total']:.0f} us CPU a job")
    finally:
        store.close()
    return results


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh database on the local server, dropped after; None (and a
    message) when there is none."""
    name = f"sdmesh_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        except sa.exc.OperationalError as exc:
            problem = str(exc.orig).strip().splitlines()[0]
            print(f"skipping PostgreSQL: unreachable at 127.0.0.1:5432 ({problem})")
            yield None
            return
        try:
            yield sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table of CPU microseconds per job, for the terminal and for
    BENCHMARKS.md alike."""
    columns = [*OPERATIONS, "total", "wall"]
    lines = ["| backend | case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for backend, cases in results.items():
        for case, row in cases.items():
            cells = " | ".join(f"{row[column]:.0f}" for column in columns)
            lines.append(f"| {backend} | {case} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100, help="jobs a round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results: dict[str, Any] = {}
    if args.only in (None, "sqlite"):
        say("sqlite")
        with tempfile.TemporaryDirectory() as directory:
            url = f"sqlite:///{Path(directory) / 'sdmesh.db'}"
            results["sqlite"] = measure(url, args.jobs, args.rounds, say)
    if args.only in (None, "postgresql"):
        with postgres_database() as postgres_url:
            if postgres_url is not None:
                say("postgresql")
                results["postgresql"] = measure(postgres_url, args.jobs, args.rounds, say)
    print(f"CPU us a job (this process), minimum of {args.rounds} rounds of {args.jobs} jobs")
    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out = {"source": source_version(), "jobs": args.jobs, "rounds": args.rounds,
           "results": results}  # fmt: skip
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
