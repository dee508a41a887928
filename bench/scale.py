"""Scale benchmark: jobs a second through one scheduler as the cluster
grows, submits a second, and the time of one placement decision.

    python -m bench.scale                 # everything, about 10 minutes
    python -m bench.scale --quick         # a smoke test, about 2 minutes
    python -m bench.scale --only agents   # or submit, or placement
    python -m bench.scale --profile       # adds a py-spy run on the scheduler

1. agents: one scheduler process (`sdctl scheduler`, SQLite, the default
   2 s heartbeat) and 1, 4, 16 and 64 simulated 24 GiB cards, 8 to an
   agent process. Every job is the synthetic model `synth` (10 MiB: the
   built-in tiny profile), 256x256, 4 steps; --simulate-time-scale makes
   a warm card take 0.5 s a job, so ideal = cards / 0.5 s (128 jobs/s at
   64 cards). Threads in this process keep 9 x cards + 8 jobs outstanding
   (two slots a card, each up to a batch of 4 alike jobs, and a queue). After a warm-up (3 x cards jobs ended; the cards' speeds
   are learned from them) it counts the jobs that succeeded in a fixed
   window (their finished_at in the database) and reads every process's
   CPU from /proc over the same window; once for one user, once for five.
2. submit: submits a second through the SDK, on SQLite and on PostgreSQL
   (a fresh database on 127.0.0.1:5432, dropped after, or a throwaway
   cluster from harness.pgserver): 2,000 from 1 client, then 4,000 from 16
   (4 processes x 4 threads, a client each) on the same scheduler. An agent
   connects first so that the model is known, then stops: the jobs stay
   queued, and the dispatch passes they wake find no GPU.
3. placement, in process: 1,000 queued jobs (60% SD1.5 512 px, 30% SDXL,
   10% FLUX-class; five users) through one pass as the dispatcher makes
   it (`QueueIndex.ordered`, `demand_for`, `Cluster.gpu_views`, `Planner`,
   `plan`), on 64, 1,000 and 10,000 GPUs of 80/24/12 GiB, with no speeds
   known and with all learned. A decision is one turn of plan's loop,
   timed between the demands it takes (a pass stops once no GPU has a free
   slot: about 2 x GPUs decisions). A case stops after its time budget;
   pass_ms is then extrapolated from the mean.

bench/results/scale.json (--quick: scale-quick.json; --only updates its
sections of the file):

    {"source": COMMIT, "config": {...},
     "agents":        {CARDS: ROW},                     # one user
     "agents_5users": {CARDS: ROW + "per_user": {USER: jobs}},
     "submit_per_s":  {"sqlite": {"1": N, "16": N}, "postgres": {...}},
     "submit":        {"sqlite": {"1": SUBMIT_ROW, "16": ...}, "postgres": ...},
     "placement_ms":       {"p50", "p99", "case", "gpus", "by_case": {CASE: STATS}},
     "placement_ms_1000":  the same at 1,000 GPUs, "placement_ms_10000" at 10,000,
     "dispatch_pass_ms": N,        # 1,000 queued at 1,000 GPUs, the slower case
     "dispatch_pass": {CASE: STATS},
     "sampling_quality": {"sampled": Q, "every_gpu": Q, "finish_ratio"},  # not --quick
     "scheduler_profile": {"cards", "samples", "own", "total", "by_package"}}

ROW: jobs_per_s, ideal_jobs_per_s, ratio, scheduler_cpu_ms_per_job,
scheduler_cpu_cores, agents_cpu_cores, agents_cpu_ms_per_job,
client_cpu_cores (this process: the submitters), other_cpu_cores (the
rest of the machine), machine_busy (share of all cores),
card_seconds_per_job (attempt start to end), min_queued (> 0: the backlog
never ran dry), jobs, window_s, agent_processes, failed, submit_errors.
SUBMIT_ROW: submits_per_s, submits, seconds, scheduler_cpu_ms_per_submit,
scheduler_cpu_cores, client_cpu_cores, other_cpu_cores, machine_busy.
STATS: decisions (timed), placed, p50, p99, mean, max (ms a decision),
demands_ms (queue order and demands), planner_ms (views and Planner),
pass_ms, complete. CASE: no_speeds or learned; the headline p50/p99 is
the slower one. Q (bench/placement_timing.py): placed, mean_finish_s,
max_finish_s (a placed job's expected finish), mean_score, pass_ms, p50.
scheduler_profile (--profile): py-spy at 100 Hz on the scheduler over one
more window at the most cards; own: leaf functions; total: the project's
functions anywhere in the stack; by_package: leaves by package (leaves
that only wait are left out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (`python bench/NAME.py`): make the repository importable,
    # as `python -m bench.NAME` does.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cluster_driver as drive
from bench import placement_timing as timing
from harness.processes import LocalCluster, Process

RESULTS = Path(__file__).resolve().parent / "results"
JOB_SECONDS = 0.5
CARDS_PER_AGENT = 8
# The heartbeat is the default, not the harness's 0.5 s. The admission
# limits are off: the figures are the scheduler's, and a burst of 2,000
# submits from one user is past the default rate and queue bound.
SCHEDULER_ARGS = ("--heartbeat", "2s", "--submit-rate", "0",
                  "--max-queued-per-user", "1000000", "--max-queued", "1000000")  # fmt: skip
# Jobs outstanding per card: each GPU has two slots, and the scheduler
# sends up to --batch-max (4) alike jobs in one; all of this benchmark's
# jobs are alike.
BACKLOG_PER_CARD = 9
USERS = [f"user-{n}" for n in range(1, 6)]
GIB, MIB = 2**30, 2**20


def say(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


START = time.monotonic()


# ---- 1. cluster throughput ---------------------------------------------------


@dataclass
class Rig:
    """One cluster under test: its scheduler, its agents, its database."""

    cluster: LocalCluster
    scheduler: Process
    agents: list[Process]
    db: drive.JobsDb
    cards: int
    job_seconds: float

    def snapshot(self) -> drive.Snapshot:
        return drive.Snapshot.take(self.scheduler.popen.pid, [a.popen.pid for a in self.agents])

    def wait(self, done: Callable[[], bool], what: str, limit: float) -> None:
        drive.wait_while_alive(self.cluster, done, what, limit)


def phase(rig: Rig, users: list[str], window: float, spy_to: Path | None = None) -> dict[str, Any]:
    """Keeps the backlog topped up; after the warm-up, one measured window."""
    cards = rig.cards
    topup = drive.TopUp(rig.cluster.address, rig.db, users, BACKLOG_PER_CARD * cards + 8)
    topup.start()
    try:
        begun, warm = time.monotonic(), max(3 * cards, 4)
        rig.wait(lambda: topup.ended >= warm and time.monotonic() - begun >= 3, "warm-up", 180)
        before = rig.snapshot()
        spy = drive.py_spy(rig.scheduler.popen.pid, window, spy_to) if spy_to else None
        rig.wait(lambda: time.time() - before.at >= window, "the window", window + 5)
        after = rig.snapshot()
        if spy is not None:
            spy.wait(timeout=60)
        topup.stop_submitting()
        rig.wait(lambda: topup.ended >= topup.submitted, "the backlog to end", 180)
    finally:
        topup.close()
    by_user = rig.db.succeeded_between(before.at, after.at)
    jobs, seconds = max(sum(by_user.values()), 1), after.at - before.at
    ideal = cards / rig.job_seconds
    scheduler, agents, client = (
        after.scheduler - before.scheduler,
        after.agents - before.agents,
        after.client - before.client,
    )
    row: dict[str, Any] = {
        "jobs_per_s": jobs / seconds,
        "ideal_jobs_per_s": ideal,
        "ratio": jobs / seconds / ideal,
        "scheduler_cpu_ms_per_job": 1000 * scheduler / jobs,
        "scheduler_cpu_cores": scheduler / seconds,
        "agents_cpu_cores": agents / seconds,
        "agents_cpu_ms_per_job": 1000 * agents / jobs,
        "client_cpu_cores": client / seconds,
        "machine_busy": (after.busy - before.busy) / max(after.total - before.total, 1),
        # Whatever else ran on the machine meanwhile (another test run, say).
        "other_cpu_cores": after.busy_cores(before) - (scheduler + agents + client) / seconds,
        "card_seconds_per_job": rig.db.card_seconds(before.at, after.at),
        "min_queued": topup.min_queued(before.at, after.at),
        "jobs": sum(by_user.values()),
        "window_s": seconds,
        "agent_processes": len(rig.agents),
        "failed": rig.db.counts()["FAILED"],
        "submit_errors": len(topup.errors),
    }
    if len(users) > 1:
        row["per_user"] = {user: by_user[user] for user in users}
    say(
        f"  {cards} cards, {len(users)} user(s): {row['jobs_per_s']:.1f} jobs/s of {ideal:.0f} "
        f"ideal; scheduler {row['scheduler_cpu_ms_per_job']:.1f} ms/job, "
        f"{row['scheduler_cpu_cores']:.2f} cores; agents {row['agents_cpu_cores']:.2f} cores; "
        f"others {row['other_cpu_cores']:.2f} cores"
    )
    return row


def run_agents(args: argparse.Namespace, logs: Path, out: dict[str, Any]) -> None:
    scale = drive.time_scale_for(args.job_seconds)
    out["agents"], out["agents_5users"] = {}, {}
    for cards in args.cards:
        root = logs / f"cards-{cards}"
        root.mkdir()
        cluster = LocalCluster(root, scheduler_args=args.scheduler_args)
        try:
            scheduler = cluster.start_scheduler()
            agents = [
                cluster.start_agent(f"agent-{i}", *drive.agent_flags(n, scale))
                for i, n in enumerate(drive.split(cards, args.cards_per_agent))
            ]
            cluster.wait_for_nodes(len(agents))
            say(f"{cards} cards up on {len(agents)} agent process(es)")
            db = drive.JobsDb(root / "scheduler" / "sdmesh.db")
            rig = Rig(cluster, scheduler, agents, db, cards, args.job_seconds)
            for key, users in (("agents", ["bench"]), ("agents_5users", USERS)):
                out[key][str(cards)] = phase(rig, users, args.window)
            if args.profile and cards == max(args.cards):
                raw = logs / "scheduler-profile.txt"
                say(f"  profiling the scheduler at {cards} cards (py-spy, {args.window:g}s)")
                row = phase(rig, ["bench"], args.window, raw)
                out["scheduler_profile"] = {
                    "cards": cards,
                    "jobs_per_s_while_sampled": row["jobs_per_s"],
                    **drive.summarize_profile(raw),
                }
        finally:
            cluster.stop()


# ---- 2. submit throughput ----------------------------------------------------


SHARED_POSTGRES = "postgresql://postgres@127.0.0.1:5432"


def postgres_url(cleanup: list[Callable[[], None]], name: str) -> str | None:
    """A fresh database on the shared server, or else a throwaway cluster;
    what drops it goes on `cleanup`."""
    try:
        import psycopg

        def admin(sql: str) -> None:
            with psycopg.connect(f"{SHARED_POSTGRES}/postgres", autocommit=True,
                                 connect_timeout=3) as conn:  # fmt: skip
                conn.execute(sql.encode())

        admin(f'CREATE DATABASE "{name}"')
        cleanup.append(lambda: admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        return f"postgresql+psycopg://{SHARED_POSTGRES.split('//')[1]}/{name}"
    except Exception as exc:
        say(f"  the server on 127.0.0.1:5432 is not usable ({exc}); trying a throwaway one")
    from harness.pgserver import ThrowawayPostgres, available

    if (problem := available()) is not None:
        say(f"  no PostgreSQL: {problem}")
        return None
    server = ThrowawayPostgres(name)
    cleanup.append(server.close)
    server.start()
    return server.url


def submit_burst(address: str, scheduler: Process, clients: int, per_client: int) -> dict[str, Any]:
    processes, threads = (1, 1) if clients == 1 else (4, clients // 4)
    workers = drive.start_submit_workers(address, processes, threads, per_client, "bench")
    try:
        for worker in workers:
            if (line := drive.expect_line(worker, "ready")) != "ready":
                raise RuntimeError(f"a submit worker said {line!r}")
        before = drive.Snapshot.take(scheduler.popen.pid, [])
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [json.loads(drive.expect_line(worker, "its result")) for worker in workers]
        after = drive.Snapshot.take(scheduler.popen.pid, [])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
    submits = sum(r["submitted"] for r in results)
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    cpu = after.scheduler - before.scheduler
    client_cpu = sum(r["cpu_seconds"] for r in results)
    return {
        "submits_per_s": submits / seconds,
        "submits": submits,
        "seconds": seconds,
        "client_processes": processes,
        "scheduler_cpu_ms_per_submit": 1000 * cpu / max(submits, 1),
        "scheduler_cpu_cores": cpu / seconds,
        "client_cpu_cores": client_cpu / seconds,
        "machine_busy": (after.busy - before.busy) / max(after.total - before.total, 1),
        "other_cpu_cores": after.busy_cores(before) - (cpu + client_cpu) / seconds,
        "errors": [e for r in results for e in r["errors"]][:5],
    }


def run_submit(args: argparse.Namespace, logs: Path, out: dict[str, Any]) -> None:
    """Per database one scheduler: 1 client, then 16 into the queue it left."""
    out["submit_per_s"], out["submit"] = {}, {}
    for backend in ("sqlite", "postgres"):
        cleanup: list[Callable[[], None]] = []
        try:
            url = ""
            if backend == "postgres":
                found = postgres_url(cleanup, f"sdmesh_scale_{int(time.time())}")
                if found is None:
                    continue
                url = found
            root = logs / f"submit-{backend}"
            root.mkdir()
            cluster = LocalCluster(root, db_url=url, scheduler_args=args.scheduler_args)
            try:
                scheduler = cluster.start_scheduler()
                flags = drive.agent_flags(1, drive.time_scale_for(JOB_SECONDS))
                agent = cluster.start_agent("agent-0", *flags)
                cluster.wait_for_nodes(1)
                agent.stop()  # its model stays known (the node window); jobs stay queued
                for clients in (1, 16):
                    per_client = args.submits * (1 if clients == 1 else 2) // clients
                    row = submit_burst(cluster.address, scheduler, clients, per_client)
                    row["database"] = url.split("@")[-1] if url else "sqlite (WAL)"
                    out["submit"].setdefault(backend, {})[str(clients)] = row
                    out["submit_per_s"].setdefault(backend, {})[str(clients)] = row["submits_per_s"]
                    say(
                        f"  submit {backend}, {clients} client(s): {row['submits_per_s']:.0f}/s; "
                        f"scheduler {row['scheduler_cpu_ms_per_submit']:.1f} ms/submit, "
                        f"{row['scheduler_cpu_cores']:.2f} cores; "
                        f"clients {row['client_cpu_cores']:.2f} cores"
                    )
            finally:
                cluster.stop()
        finally:
            for step in cleanup:
                step()


# ---- 3. placement, in process ------------------------------------------------


def run_placement(args: argparse.Namespace, out: dict[str, Any]) -> None:
    for gpus, key in (
        (64, "placement_ms"),
        (1000, "placement_ms_1000"),
        (10_000, "placement_ms_10000"),
    ):
        cases = {}
        for case, learned in (("no_speeds", False), ("learned", True)):
            budget = {64: 1e9, 1000: 4 * args.budget}.get(gpus, args.budget)
            cases[case] = stats = timing.time_plan(gpus, learned, budget)[0]
            say(
                f"  {gpus} GPUs, {case}: {stats['decisions']} decisions timed, p50 "
                f"{stats['p50']:.3f} ms, p99 {stats['p99']:.3f} ms, pass {stats['pass_ms']:.0f} ms"
                + ("" if stats["complete"] else " (extrapolated)")
            )
        worst = max(cases, key=lambda c: cases[c]["p50"])
        out[key] = {"p50": cases[worst]["p50"], "p99": cases[worst]["p99"], "case": worst,
                    "gpus": gpus, "by_case": cases}  # fmt: skip
        if gpus == 1000:
            slow = max(cases, key=lambda c: cases[c]["pass_ms"])
            out["dispatch_pass_ms"], out["dispatch_pass"] = cases[slow]["pass_ms"], cases
    if not args.quick:
        out["sampling_quality"] = quality = timing.sampling_quality()
        say(
            f"  1000 GPUs, sampled against every GPU scored: mean expected finish "
            f"{quality['finish_ratio']:.3f}x, pass {quality['sampled']['pass_ms']:.0f} against "
            f"{quality['every_gpu']['pass_ms']:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 and 16 cards, short windows")
    parser.add_argument("--only", choices=("agents", "submit", "placement"))
    parser.add_argument("--cards", type=int, nargs="+", help="default 1 4 16 64 (quick: 1 16)")
    parser.add_argument("--cards-per-agent", type=int, default=CARDS_PER_AGENT)
    parser.add_argument("--job-seconds", type=float, default=JOB_SECONDS)
    parser.add_argument("--window", type=float, help="measured seconds (default 15; quick 3)")
    parser.add_argument(
        "--submits",
        type=int,
        help="submits from 1 client, twice as many from 16 (default 2000; quick 200)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds per placement case, 4x at 1,000 GPUs (default 30; quick 1)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the scheduler at most cards")
    parser.add_argument(
        "--scheduler-args", default="", help="more `sdctl scheduler` flags, e.g. '--batch-max 1'"
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    quick = args.quick
    args.cards = args.cards or ([1, 16] if quick else [1, 4, 16, 64])
    args.window = args.window or (3.0 if quick else 15.0)
    args.submits = args.submits or (200 if quick else 2000)
    args.budget = args.budget or (1.0 if quick else 30.0)
    args.scheduler_args = (*SCHEDULER_ARGS, *shlex.split(args.scheduler_args))
    output = args.output or RESULTS / ("scale-quick.json" if quick else "scale.json")
    out: dict[str, Any] = {}
    if args.only and output.exists():
        out = json.loads(output.read_text())
    out["source"] = drive.source_version()
    out.setdefault("config", {}).update(
        job=f"{drive.MODEL} ({drive.MODEL_BYTES // MIB} MiB, tiny profile), "
        f"{drive.WIDTH}x{drive.HEIGHT}, {drive.STEPS} steps",
        job_seconds=args.job_seconds,
        time_scale=drive.time_scale_for(args.job_seconds),
        cold_load_seconds=drive.load_seconds(drive.time_scale_for(args.job_seconds)),
        cards=args.cards,
        cards_per_agent=args.cards_per_agent,
        window_s=args.window,
        scheduler_args=" ".join(args.scheduler_args),
        cpu_cores=len(os.sched_getaffinity(0)),
        quick=quick,
    )
    logs = Path(tempfile.mkdtemp(prefix="sdmesh-scale-"))
    say(f"process logs in {logs}")
    ok = False
    try:
        if args.only in (None, "placement"):
            say("placement, in process")
            run_placement(args, out)
        if args.only in (None, "submit"):
            say("submit throughput")
            run_submit(args, logs, out)
        if args.only in (None, "agents"):
            say("cluster throughput")
            run_agents(args, logs, out)
        ok = True
    finally:
        if ok and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        elif not ok:
            say(f"failed; process logs kept in {logs}")
    print(drive.render(out))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
