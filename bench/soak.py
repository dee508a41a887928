"""Soak benchmark: jobs through two scheduler replicas on PostgreSQL while
agents and leaders are killed and paused, then an audit of every job the
API acknowledged.

    python -m bench.soak [--jobs 200] [--faults 30] [--seed 1] [--minutes 10]

The cluster is real processes (`tests/processes.LocalCluster`): two
scheduler replicas on one throwaway PostgreSQL (`--lease 3s
--progress-deadline 10s`, each with its own data dir), and three agents
with a simulated 8 GiB card each, running the built-in `tiny` model on the
CPU with every step slowed by `--step-delay`. Jobs are 64x64, 4 steps; every
fourth asks for a batch of 2, so that an image set can be torn between
attempts.

One thread submits through the SDK with every replica's address; each
acknowledged job id goes into a ledger. Submissions are released in step
with the faults, so that work is in flight when each one fires. The fault
loop draws kinds from a seeded schedule (each round of four is a shuffle of
all four kinds):

- agent_kill: kill -9 an agent that is running a job, and start it again
  with the same name and data dir a second later, as systemd would;
- agent_pause: SIGSTOP an agent that is running a job for longer than the
  lease, then SIGCONT;
- leader_kill: kill -9 the replica whose GetHealth says it leads, while a
  job runs, and start it again once it is dead;
- leader_pause: SIGSTOP the leader past its lease, then SIGCONT.

After each fault the loop waits for a leader and three connected agents
before the next. When the faults are done it waits for every job in the
ledger to end, stops the cluster, and audits:

- lost: acknowledged, but not terminal at the end, or not found;
- duplicated: more than one attempt's images for a job, in the `images`
  table or in one images directory (the replicas' shared one, or a
  replica's own);
- image_mismatch: a succeeded job whose stored images are not exactly its
  batch from its final attempt, or stored images on a job that did not
  succeed;
- reexecuted: jobs dispatched more than once (`attempt` > 1);
- stray_files: PNGs (or partial writes) on disk that no image row names,
  and missing_files: image rows whose file is in no images directory.

It prints a summary, writes `bench/results/soak.json`, keeps the process
logs in a temporary directory it names, and exits 1 if any job was lost or
duplicated or had a mismatched image set.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (`python bench/NAME.py`): make the repository importable,
    # as `python -m bench.NAME` does.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak_audit import (
    KINDS,
    REPLICAS,
    TERMINAL,
    FinalJob,
    audit,
    fault_schedule,
    job_options,
    read_database,
    read_disk,
    release_quota,
    summary,
)
from client import Client, NotFoundError, SdmeshError
from harness.pgserver import ThrowawayPostgres
from harness.processes import LocalCluster, Process
from harness.waiting import until

LEASE_SECONDS = 3.0
SCHEDULER_ARGS = ("--lease", f"{LEASE_SECONDS:g}s", "--progress-deadline", "10s")
AGENTS = ("agent-a", "agent-b", "agent-c")
RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"


# ---- the run ----------------------------------------------------------------


@dataclass
class FaultRecord:
    number: int
    kind: str
    target: str = ""
    at_seconds: float = 0.0  # since the start of the fault loop
    condition_met: bool = False  # a job was running (on the target agent) when it fired
    running_job: str = ""
    recovery_seconds: float | None = None  # until a leader and every agent were back
    note: str = ""


@dataclass(frozen=True)
class Config:
    jobs: int
    faults: int
    seed: int
    minutes: float
    step_delay: float
    spacing: float
    agent_pause: float
    leader_pause: float
    restart_delay: float
    condition_timeout: float
    recovery_timeout: float


def _say(start: float, message: str) -> None:
    print(f"[{time.monotonic() - start:7.1f}s] {message}", file=sys.stderr, flush=True)


class Soak:
    def __init__(self, config: Config, cluster: LocalCluster) -> None:
        self.config = config
        self.cluster = cluster
        self.rng = random.Random(config.seed)
        self.start = time.monotonic()
        self.agent_flags = (
            "--simulate-gpus",
            "8GiB",
            "--simulate-step-delay",
            f"{config.step_delay:g}",
        )
        self.agents: dict[str, Process] = {}
        self.replicas: dict[int, Process] = {}
        self.ledger: dict[str, int] = {}  # job id -> batch size, in submission order
        self.submit_errors: list[str] = []
        self.faults: list[FaultRecord] = []
        self.unexpected_exits: list[str] = []
        self.hit: Counter[str] = Counter()  # job id -> agent faults that hit it
        self._started = 0
        self._faults_done = False
        self._release = threading.Condition()
        self.client = Client(cluster.addresses, user="soak", timeout=5.0, reconnect_timeout=60.0)

    def say(self, message: str) -> None:
        _say(self.start, message)

    # -- processes --

    def replica_name(self, index: int) -> str:
        return f"replica-{index}"

    def start_replica(self, index: int) -> None:
        self.replicas[index] = self.cluster.start_scheduler(
            name=self.replica_name(index), replica=index
        )

    def start_agent(self, name: str) -> None:
        self.agents[name] = self.cluster.start_agent(name, *self.agent_flags)

    def forget(self, process: Process) -> None:
        if process in self.cluster.processes:
            self.cluster.processes.remove(process)

    def boot(self) -> None:
        # One after the other: the first migrates the fresh database. (Two
        # replicas migrating it at once race on alembic_version; one exits.)
        for index in range(REPLICAS):
            self.start_replica(index)
            if index == 0 and self.leader(timeout=120.0) is None:
                raise RuntimeError("no replica leads:\n" + self.cluster.logs())
        for name in AGENTS:
            self.start_agent(name)
        self.cluster.wait_for_nodes(len(AGENTS))
        self.say(f"cluster up: replicas {self.cluster.addresses}, agents {', '.join(AGENTS)}")

    # -- observations --

    def leader(self, timeout: float = 30.0) -> int | None:
        """The index of the replica whose GetHealth says it leads."""
        try:
            return until(self._leading, "a replica to lead", done=lambda i: i is not None,
                         timeout=timeout, interval=0.2)  # fmt: skip
        except AssertionError:
            return None

    def _leading(self) -> int | None:
        for index, port in enumerate(self.cluster.ports):
            process = self.replicas.get(index)
            if process is None or not process.alive:
                continue
            try:
                health = self.client.health(f"{self.cluster.connect_host}:{port}")
            except SdmeshError:
                continue
            if health.leader:
                return index
        return None

    def running_job(self, agent: bool) -> tuple[str, str] | None:
        """(job id, agent name) of a job running now, waiting for one up to
        the condition timeout. For agent faults, a job that earlier agent
        faults hit least: a job whose node is lost three times fails by
        design (--max-attempts), which says nothing about the scheduler."""

        def candidates() -> list[tuple[str, str]]:
            jobs = self.client.list_jobs(states=["RUNNING"], limit=100)
            found = sorted((job.id, job.node_name) for job in jobs if job.node_name in AGENTS)
            if agent:
                found = [(j, n) for j, n in found if self.agents[n].alive]
                fewest = min((self.hit[j] for j, _ in found), default=0)
                found = [(j, n) for j, n in found if self.hit[j] == fewest]
            return found

        try:
            found = until(candidates, "a running job", timeout=self.config.condition_timeout,
                          interval=0.2)  # fmt: skip
        except AssertionError:
            return None
        return self.rng.choice(found)

    def recovered(self) -> bool:
        self.restart_unexpected()
        if self.leader(timeout=0.5) is None:
            return False
        try:
            nodes = self.client.list_nodes()
        except SdmeshError:
            return False
        return set(AGENTS) <= {node.name for node in nodes if node.connected}

    def restart_unexpected(self) -> None:
        """A process that died without being killed here is a finding; it is
        restarted, as systemd would, so that the run goes on."""
        for name, process in list(self.agents.items()):
            if not process.alive:
                self.note_exit(process)
                self.start_agent(name)
        for index, process in list(self.replicas.items()):
            if not process.alive:
                self.note_exit(process)
                self.start_replica(index)

    def note_exit(self, process: Process) -> None:
        message = f"{process.name} exited by itself with {process.popen.returncode}"
        self.unexpected_exits.append(message + "\n" + process.tail(20))
        self.say("UNEXPECTED: " + message)
        self.forget(process)

    # -- faults --

    def inject(self, record: FaultRecord) -> None:
        config = self.config
        if record.kind in ("agent_kill", "agent_pause"):
            running = self.running_job(agent=True)
            if running is not None:
                record.running_job, record.target = running
                record.condition_met = True
                self.hit[record.running_job] += 1
            else:
                record.target = self.rng.choice(AGENTS)
            process = self.agents[record.target]
            if record.kind == "agent_kill":
                process.kill()
                self.forget(process)
                time.sleep(config.restart_delay)
                self.start_agent(record.target)
            else:
                process.send(signal.SIGSTOP)
                time.sleep(config.agent_pause)
                process.send(signal.SIGCONT)
            return
        running = self.running_job(agent=False)
        if running is not None:
            record.running_job = running[0]
            record.condition_met = True
        index = self.leader()
        if index is None:
            record.note = "no leader to fault"
            return
        record.target = self.replica_name(index)
        process = self.replicas[index]
        if record.kind == "leader_kill":
            process.kill()
            self.forget(process)
            time.sleep(config.restart_delay)
            self.start_replica(index)
        else:
            process.send(signal.SIGSTOP)
            time.sleep(config.leader_pause)
            process.send(signal.SIGCONT)

    def fault_loop(self) -> None:
        loop_start = time.monotonic()
        for number, kind in enumerate(fault_schedule(self.config.faults, self.config.seed), 1):
            with self._release:
                self._started = number
                self._release.notify_all()
            record = FaultRecord(number, kind, at_seconds=time.monotonic() - loop_start)
            self.inject(record)
            self.faults.append(record)
            fired = time.monotonic()
            try:
                until(
                    self.recovered, "recovery", timeout=self.config.recovery_timeout, interval=0.3
                )
                record.recovery_seconds = time.monotonic() - fired
            except AssertionError:
                pass  # recorded as not recovered
            recovery = (
                "not recovered"
                if record.recovery_seconds is None
                else f"recovered in {record.recovery_seconds:.1f}s"
            )
            during = f" during {record.running_job}" if record.condition_met else ""
            self.say(
                f"fault {number}/{self.config.faults} {kind} {record.target}{during}; "
                f"{recovery}; {len(self.ledger)} jobs acknowledged"
            )
            time.sleep(self.config.spacing)
        with self._release:
            self._faults_done = True
            self._release.notify_all()

    # -- jobs --

    def submitter(self) -> None:
        config = self.config
        with Client(
            self.cluster.addresses, user="soak", timeout=10.0, reconnect_timeout=180.0
        ) as client:
            for number in range(config.jobs):
                with self._release:
                    while number >= release_quota(
                        config.jobs, config.faults, self._started, self._faults_done
                    ):
                        self._release.wait()
                options = job_options(number)
                try:
                    handle = client.submit(f"soak job {number}: a lighthouse", **options)
                except SdmeshError as error:
                    self.submit_errors.append(f"job {number}: {error}")
                    self.say(f"submit {number} failed: {error}")
                    continue
                self.ledger[handle.id] = options.get("batch_size", 1)
                time.sleep(0.15)

    def wait_terminal(self, deadline: float) -> None:
        pending = list(self.ledger)
        last_report = 0.0
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                try:
                    job = self.client.get_job(job_id)
                except NotFoundError:
                    still.append(job_id)
                    continue
                except SdmeshError:
                    still.append(job_id)
                    continue
                if job.state not in TERMINAL:
                    still.append(job_id)
            pending = still
            if pending and time.monotonic() - last_report > 10:
                self.say(f"waiting for {len(pending)} jobs to end")
                last_report = time.monotonic()
            if pending:
                time.sleep(1.0)

    def finals(self) -> dict[str, FinalJob | None]:
        out: dict[str, FinalJob | None] = {}
        for job_id in self.ledger:
            try:
                job = self.client.get_job(job_id)
            except NotFoundError:
                out[job_id] = None
                continue
            out[job_id] = FinalJob(job.state, job.attempt)
        return out


def log_findings(root: Path) -> dict[str, dict[str, Any]]:
    """Per log: how many tracebacks and ERROR/CRITICAL lines, and the first few."""
    findings: dict[str, dict[str, Any]] = {}
    for log in sorted(root.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        bad = [
            line for line in lines if "Traceback" in line or " ERROR " in line or "CRITICAL" in line
        ]
        if bad:
            findings[log.name] = {"count": len(bad), "first": bad[:5]}
    return findings


def source_version() -> str:
    """The commit the processes ran, and whether the tree differed from it."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit} (uncommitted changes)" if dirty else commit


def run(config: Config, output: Path) -> int:
    start = time.monotonic()
    version = source_version()
    root = Path(tempfile.mkdtemp(prefix="sdmesh-soak-"))
    _say(start, f"process logs in {root}")
    with ThrowawayPostgres() as pg:
        cluster = LocalCluster(
            root, db_url=pg.url, replicas=REPLICAS, scheduler_args=SCHEDULER_ARGS
        )
        soak = Soak(config, cluster)
        soak.start = start
        submitter = threading.Thread(target=soak.submitter, name="submitter", daemon=True)
        try:
            soak.boot()
            faults_start = time.monotonic()
            submitter.start()
            soak.fault_loop()
            submitter.join()
            fault_seconds = time.monotonic() - faults_start
            soak.say(f"faults done; {len(soak.ledger)} jobs acknowledged; waiting for them to end")
            drain_start = time.monotonic()
            budget_end = start + config.minutes * 60
            soak.wait_terminal(max(budget_end, drain_start + 180))
            drain_seconds = time.monotonic() - drain_start
            finals = soak.finals()
        finally:
            cluster.stop()
            soak.client.close()
            if pg.log.exists():
                shutil.copy(pg.log, root / "postgres.log.txt")
        rows, facts = read_database(pg.url, soak.ledger)
    verdict = audit(soak.ledger, finals, rows, read_disk(root))
    wall = time.monotonic() - start
    by_kind = Counter(record.kind for record in soak.faults)
    result: dict[str, Any] = {
        "submitted": verdict.submitted,
        "succeeded": verdict.succeeded,
        "failed": verdict.failed,
        "lost": verdict.lost,
        "duplicated": verdict.duplicated,
        "reexecuted": verdict.reexecuted,
        "faults_injected": len(soak.faults),
        "faults_by_kind": {kind: by_kind[kind] for kind in KINDS},
        "faults_while_running": sum(record.condition_met for record in soak.faults),
        "image_mismatch": verdict.image_mismatch,
        "stray_files": verdict.stray_files,
        "missing_files": verdict.missing_files,
        "wall_seconds": round(wall, 1),
        "fault_seconds": round(fault_seconds, 1),
        "drain_seconds": round(drain_seconds, 1),
        "config": asdict(config),
        "source": version,
        "details": {
            "lost": verdict.lost_jobs,
            "failed": verdict.failed_jobs,
            "duplicated": verdict.duplicated_jobs,
            "image_mismatch": verdict.mismatched_jobs,
            "reexecuted": verdict.reexecuted_jobs,
            "stray_files": verdict.stray,
            "missing_files": verdict.missing,
            **facts,
        },
        "faults": [asdict(record) for record in soak.faults],
        "submit_errors": soak.submit_errors,
        "unexpected_exits": soak.unexpected_exits,
        "log_findings": log_findings(root),
        "logs": str(root),
    }
    print(summary(result))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}; process logs in {root}")
    if not verdict.ok:
        print(
            f"FAILED: {verdict.lost} lost, {verdict.duplicated} duplicated, "
            f"{verdict.image_mismatch} mismatched image sets",
            file=sys.stderr,
        )
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--faults", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget for the run")
    parser.add_argument("--step-delay", type=float, default=0.3, help="agents' seconds per step")
    parser.add_argument("--spacing", type=float, default=1.0, help="seconds between faults")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = Config(
        jobs=args.jobs,
        faults=args.faults,
        seed=args.seed,
        minutes=args.minutes,
        step_delay=args.step_delay,
        spacing=args.spacing,
        agent_pause=LEASE_SECONDS + 1.5,
        leader_pause=LEASE_SECONDS + 2.0,
        restart_delay=1.0,
        condition_timeout=15.0,
        recovery_timeout=90.0,
    )
    sys.exit(run(config, args.output))


if __name__ == "__main__":
    main()
