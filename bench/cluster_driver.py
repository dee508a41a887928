"""What `bench.scale` drives real processes with: the synthetic job, CPU
clocks read from /proc, a read-only view of the scheduler's SQLite file,
a submitter that keeps a backlog topped up, submit workers in their own
processes, py-spy's raw output summed up by function, and the tables the
benchmark prints.

    python -m bench.cluster_driver submit-worker ADDRESS THREADS JOBS USER

runs one submit worker (`bench.scale` starts them): it opens THREADS
clients, submits one job on each to warm up, prints "ready", waits for
"go" on stdin, submits JOBS jobs on each client and prints its figures as
one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client, SdmeshError
from gpu_node.profiles import profile_for, run_seconds
from harness.processes import LocalCluster
from sdmesh.spec import MemoryMode

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20

# The synthetic job: a 10 MiB model takes the profile of the built-in tiny
# one (0.2 s cold load, 0.35 s per megapixel-step), so no diffusion runs
# and the simulated card only sleeps. Four steps of 256x256 keep the
# messages per job (started, 4 progress, previews, image, ended) modest.
MODEL, MODEL_BYTES = "synth", 10 * MIB
WIDTH = HEIGHT = 256
STEPS = 4


def submit(client: Client, prompt: str = "bench.scale") -> str:
    """Submits the synthetic job; returns its id."""
    return client.submit(prompt, model=MODEL, width=WIDTH, height=HEIGHT, steps=STEPS).id


def time_scale_for(job_seconds: float) -> float:
    """The --simulate-time-scale that makes one job take `job_seconds` on
    a warm speed-1.0 card (the cold load scales with it)."""
    profile = profile_for(MODEL, MODEL_BYTES)
    return job_seconds / run_seconds(profile, WIDTH, HEIGHT, 1, STEPS, MemoryMode.FULL, 1.0)


def load_seconds(time_scale: float) -> float:
    return profile_for(MODEL, MODEL_BYTES).load_seconds * time_scale


def agent_flags(cards: int, time_scale: float) -> list[str]:
    return [
        "--simulate-gpus",
        ",".join(["24GiB"] * cards),
        "--simulate-models",
        f"{MODEL}={MODEL_BYTES // MIB}MiB",
        "--simulate-time-scale",
        f"{time_scale:.6g}",
    ]


# ---- CPU clocks ----------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    # user nice system idle iowait irq softirq steal (guest time is in user)
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(values[:3]) + values[5] + values[6]
    return busy, sum(values)


@dataclass(frozen=True)
class Snapshot:
    """CPU clocks at one moment: wall time (the scheduler's clock is
    time.time too), the scheduler, the agents, this process, the machine."""

    at: float
    scheduler: float
    agents: float
    client: float
    busy: int
    total: int

    def busy_cores(self, before: Snapshot) -> float:
        """Cores the whole machine kept busy since `before`."""
        return (self.busy - before.busy) / TICK / max(self.at - before.at, 1e-9)

    @classmethod
    def take(cls, scheduler_pid: int, agent_pids: list[int]) -> Snapshot:
        busy, total = machine_ticks()
        return cls(
            time.time(),
            cpu_seconds(scheduler_pid),
            sum(cpu_seconds(pid) for pid in agent_pids),
            own_cpu_seconds(),
            busy,
            total,
        )


# ---- the scheduler's SQLite file, read-only --------------------------------


class JobsDb:
    """Counts and timings from the scheduler's SQLite file, read-only (WAL
    lets this read while the scheduler writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)

    def counts(self) -> Counter[str]:
        with self._connect() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return Counter(dict(rows))

    def succeeded_between(self, start: float, end: float) -> Counter[str]:
        """Jobs that succeeded in [start, end), by owner."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT owner, COUNT(*) FROM jobs WHERE state = 'SUCCEEDED' "
                "AND finished_at >= ? AND finished_at < ? GROUP BY owner",
                (start, end),
            ).fetchall()
        return Counter(dict(rows))

    def card_seconds(self, start: float, end: float) -> float | None:
        """Mean time from an attempt's start on its card to its end, for the
        attempts that succeeded in [start, end)."""
        with self._connect() as conn:
            (mean,) = conn.execute(
                "SELECT AVG(ended_at - started_at) FROM attempts WHERE outcome = 'succeeded' "
                "AND ended_at >= ? AND ended_at < ? AND started_at IS NOT NULL",
                (start, end),
            ).fetchone()
        return None if mean is None else float(mean)


TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


class TopUp:
    """Keeps `target` jobs outstanding (submitted, not ended), spread over
    `users`, from several threads with a client each; a sampler thread
    reads the counts from the database every `interval` seconds."""

    def __init__(
        self, address: str, db: JobsDb, users: list[str], target: int, interval: float = 0.2
    ) -> None:
        self.address, self.db, self.users, self.target = address, db, users, target
        self.interval = interval
        base = db.counts()
        self.base_submitted = sum(base.values())
        self.base_ended = sum(base[s] for s in TERMINAL)
        self.submitted = 0
        self.ended = 0
        self.queued = 0
        self.errors: list[str] = []
        self.samples: list[tuple[float, int, int]] = []  # (time, ended, queued)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler_stop = threading.Event()
        per_user = max(1, -(-4 // len(users)))  # at least four submitting threads
        self._threads = [
            threading.Thread(target=self._submit, args=(user,), daemon=True)
            for user in users
            for _ in range(per_user)
        ]
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._sampler.start()
        for thread in self._threads:
            thread.start()

    def _sample(self) -> None:
        while not self._sampler_stop.is_set():
            try:
                counts = self.db.counts()
            except sqlite3.Error:
                counts = None
            if counts is not None:
                self.ended = sum(counts[s] for s in TERMINAL) - self.base_ended
                self.queued = counts["QUEUED"]
                self.samples.append((time.time(), self.ended, self.queued))
            self._sampler_stop.wait(self.interval)

    def _submit(self, user: str) -> None:
        with Client(self.address, user=user, timeout=60.0) as client:
            while not self._stop.is_set():
                with self._lock:
                    room = self.submitted - self.ended < self.target
                    if room:
                        self.submitted += 1
                if not room:
                    time.sleep(0.01)
                    continue
                try:
                    submit(client)
                except SdmeshError as error:
                    with self._lock:
                        self.submitted -= 1
                        self.errors.append(str(error))
                    time.sleep(0.1)

    def stop_submitting(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def close(self) -> None:
        self.stop_submitting()
        self._sampler_stop.set()
        self._sampler.join(timeout=10)

    def min_queued(self, start: float, end: float) -> int | None:
        inside = [queued for at, _, queued in self.samples if start <= at <= end]
        return min(inside) if inside else None


# ---- processes --------------------------------------------------------------


def split(cards: int, per_agent: int) -> list[int]:
    agents = -(-cards // per_agent)
    return [cards // agents + (i < cards % agents) for i in range(agents)]


def check_alive(cluster: LocalCluster) -> None:
    for process in cluster.processes:
        if not process.alive:
            raise RuntimeError(f"{process.name} exited:\n{process.tail()}")


def wait_while_alive(
    cluster: LocalCluster, done: Callable[[], bool], what: str, limit: float
) -> bool:
    deadline = time.monotonic() + limit
    while not done():
        check_alive(cluster)
        if time.monotonic() > deadline:
            print(f"  gave up waiting for {what} after {limit:.0f}s", file=sys.stderr)
            return False
        time.sleep(0.1)
    return True


# ---- submit workers, each in its own process ---------------------------------


def start_submit_workers(
    address: str, processes: int, threads: int, jobs: int, user: str
) -> list[subprocess.Popen[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "bench.cluster_driver", "submit-worker", address]
    return [
        subprocess.Popen(
            [*command, str(threads), str(jobs), user],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]


def expect_line(worker: subprocess.Popen[str], what: str) -> str:
    assert worker.stdout is not None
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"a submit worker exited ({worker.wait()}) before it said {what}")
    return line.strip()


def submit_worker(address: str, threads: int, jobs: int, user: str) -> None:
    clients = [Client(address, user=user, timeout=60.0) for _ in range(threads)]
    for client in clients:  # connects each channel and warms the server's path
        submit(client, "bench.scale warm-up")
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    errors: list[str] = []
    cpu, start = own_cpu_seconds(), time.time()

    def run(client: Client) -> None:
        for _ in range(jobs):
            try:
                submit(client)
            except SdmeshError as error:
                errors.append(str(error))

    workers = [threading.Thread(target=run, args=(client,)) for client in clients]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    end = time.time()
    result = {
        "submitted": threads * jobs - len(errors),
        "errors": errors[:5],
        "start": start,
        "end": end,
        "cpu_seconds": own_cpu_seconds() - cpu,
    }
    print(json.dumps(result), flush=True)
    for client in clients:
        client.close()


# ---- py-spy ------------------------------------------------------------------


def py_spy(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    """Samples `pid` for `seconds` at 100 Hz into a raw (collapsed) file."""
    binary = Path(sys.executable).parent / "py-spy"
    command = [str(binary if binary.exists() else "py-spy"), "record", "--pid", str(pid)]
    command += ["--duration", str(max(1, round(seconds))), "--rate", "100", "--nonblocking"]
    command += ["--format", "raw", "--output", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_LINE = re.compile(r":\d+\)$")
# Leaf frames that wait rather than work: an idle event loop, an idle pool
# thread, a lock. py-spy (--nonblocking) sometimes counts them as active.
WAITING = re.compile(
    r"^(\w*Selector\.select|_worker|Semaphore\.acquire|Condition\.wait|Event\.wait) \("
)
PROJECT = ("scheduler/", "sdmesh/", "protos/")


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's raw output: the top functions by own samples (the
    leaf frame), by total samples among the project's own functions
    (anywhere in the stack, once per stack), and own samples by package.
    Lines are folded together; waiting leaves are counted apart."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    package: Counter[str] = Counter()
    samples = waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        if WAITING.match(frames[-1]):
            waiting += count
            continue
        samples += count
        own[frames[-1]] += count
        where = frames[-1].rpartition(" (")[2]
        where = where.rstrip(")")
        # "<string>" (code dataclasses generate), "<sqlalchemy generated ...>"
        name = where[1:].split()[0].rstrip(">") if where.startswith("<") else where
        package[name.split("/")[0].split(".")[0]] += count
        for frame in set(frames):
            if any(f"({root}" in frame for root in PROJECT):
                total[frame] += count

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": frame, "samples": n, "share": round(n / max(samples, 1), 3)}
            for frame, n in counter.most_common(top)
        ]

    return {
        "samples": samples,
        "waiting_samples": waiting,
        "own": ranked(own),
        "total": ranked(total),
        "by_package": ranked(package),
    }


# ---- the tables -------------------------------------------------------------


def render(out: dict[str, Any]) -> str:
    lines = []
    if out.get("agents"):
        lines += ["| cards | users | jobs/s | ideal | ratio | sched ms/job | sched cores | "
                  "agent cores | client cores | other cores | machine busy | card s/job | min queued |",
                  "|---" * 13 + "|"]  # fmt: skip
        for key, users in (("agents", 1), ("agents_5users", 5)):
            for cards, r in out.get(key, {}).items():
                card = r["card_seconds_per_job"] or 0.0
                lines.append(
                    f"| {cards} | {users} | {r['jobs_per_s']:.1f} | {r['ideal_jobs_per_s']:.0f} "
                    f"| {r['ratio']:.2f} | {r['scheduler_cpu_ms_per_job']:.1f} "
                    f"| {r['scheduler_cpu_cores']:.2f} | {r['agents_cpu_cores']:.2f} "
                    f"| {r['client_cpu_cores']:.2f} | {r.get('other_cpu_cores', 0.0):.2f} "
                    f"| {100 * r['machine_busy']:.0f}% | {card:.2f} | {r['min_queued']} |"
                )
        lines.append("")
    if out.get("submit"):
        lines += ["| database | clients | submits/s | sched ms/submit | sched cores | "
                  "client cores | other cores | machine busy |", "|---" * 8 + "|"]  # fmt: skip
        for backend, rows in out["submit"].items():
            for clients, r in rows.items():
                lines.append(
                    f"| {backend} | {clients} | {r['submits_per_s']:.0f} "
                    f"| {r['scheduler_cpu_ms_per_submit']:.1f} | {r['scheduler_cpu_cores']:.2f} "
                    f"| {r['client_cpu_cores']:.2f} | {r.get('other_cpu_cores', 0.0):.2f} "
                    f"| {100 * r['machine_busy']:.0f}% |"
                )
        lines.append("")
    if out.get("placement_ms"):
        lines += ["| GPUs | speeds | decisions timed | p50 ms | p99 ms | max ms | pass ms |",
                  "|---" * 7 + "|"]  # fmt: skip
        for key in ("placement_ms", "placement_ms_1000", "placement_ms_10000"):
            for case, s in out[key]["by_case"].items():
                extra = "" if s["complete"] else " (extrapolated)"
                lines.append(
                    f"| {s['gpus']} | {case} | {s['decisions']} | {s['p50']:.3f} "
                    f"| {s['p99']:.3f} | {s['max']:.3f} | {s['pass_ms']:.0f}{extra} |"
                )
    quality = out.get("sampling_quality")
    if quality:
        lines.append(
            f"\nscoring a sample of the free GPUs at 1,000: mean expected finish "
            f"{quality['finish_ratio']:.3f}x that of scoring every one; pass "
            f"{quality['sampled']['pass_ms']:.0f} ms against {quality['every_gpu']['pass_ms']:.0f} ms"
        )
    profile = out.get("scheduler_profile")
    if profile:
        lines += ["", f"scheduler at {profile['cards']} cards, {profile['samples']} samples:"]
        for kind in ("own", "total", "by_package"):
            lines.append(f"  top by {kind} samples:")
            lines += [f"    {f['share']:6.1%}  {f['frame']}" for f in profile[kind]]
    return "\n".join(lines)


def source_version() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit} (uncommitted changes)" if dirty else commit


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "submit-worker":
        sys.exit(__doc__)
    submit_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
