"""What security costs: the same calls against a scheduler with nothing on
(`--no-auth`, plain text, as `sdctl up` runs it) and with everything on
(TLS, client certificates, API keys, enrolled nodes), side by side.

    python -m bench.security            # about two minutes
    python -m bench.security --quick    # fewer calls

Each case is one `sdctl scheduler` process on SQLite (the queue bounds
and the submit rate raised out of the way) that has seen one simulated
agent, so the model is known; the agent then stops, and the jobs stay
queued. From this process:

- submits a second from 1 client, one after another, and from 16 clients
  (threads, a client each) at once;
- GetJob calls a second from 16 clients at once, on one job;
- the scheduler's CPU per call over each phase, from /proc.

The two cases take turns, phase by phase (`--rounds`, 2 by default), so
other load on a shared machine falls on both alike. It prints a table and
writes bench/results/security.json:

    {"source": COMMIT, "config": {...},
     "cases": {"plain": PHASES, "secure": PHASES},
     "ratio": {PHASE: secure_per_s / plain_per_s}}

PHASES: {"submit_1": ROW, "submit_16": ROW, "get_16": ROW};
ROW: calls, seconds, per_s, scheduler_cpu_ms_per_call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client
from harness.processes import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results" / "security.json"
OPEN_LIMITS = ("--max-queued-per-user", "1000000", "--max-queued", "1000000", "--submit-rate", "0")
CLIENTS = 16
TICKS = os.sysconf("SC_CLK_TCK")
Call = Callable[["Case", Client, int], Any]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class Case:
    def __init__(self, name: str, root: Path, secure: bool) -> None:
        self.name = name
        root.mkdir(parents=True)
        self.cluster = LocalCluster(root, secure=secure)
        self.scheduler = self.cluster.start_scheduler(*OPEN_LIMITS)
        agent = self.cluster.start_agent("agent", "--simulate-gpus", "24GiB")
        self.cluster.wait_for_nodes(1)
        agent.stop()  # the model stays known; jobs stay queued
        with self.cluster.client() as client:
            self.job_id = client.submit("a probe", width=64, height=64, steps=4).id

    def client(self) -> Client:
        return self.cluster.client("tester", reconnect_timeout=30)

    def phase(self, threads: int, calls: int, call: Call) -> dict[str, float]:
        clients = [self.client() for _ in range(threads)]
        try:
            for client in clients:  # connected (and TLS set up) before the clock starts
                client.get_job(self.job_id)
            share = calls // threads
            cpu = cpu_seconds(self.scheduler.popen.pid)
            began = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda c: [call(self, c, i) for i in range(share)], clients))
            seconds = time.perf_counter() - began
            cpu = cpu_seconds(self.scheduler.popen.pid) - cpu
        finally:
            for client in clients:
                client.close()
        done = share * threads
        return {
            "calls": done,
            "seconds": round(seconds, 3),
            "per_s": round(done / seconds, 1),
            "scheduler_cpu_ms_per_call": round(1000 * cpu / done, 3),
        }

    def stop(self) -> None:
        self.cluster.stop()


def submit(case: Case, client: Client, index: int) -> None:
    client.submit(f"job {index}", width=64, height=64, steps=4)


def get_job(case: Case, client: Client, index: int) -> None:
    client.get_job(case.job_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    phases: dict[str, tuple[int, int, Call]] = {
        "submit_1": (1, int(400 * scale), submit),
        "submit_16": (CLIENTS, int(1600 * scale), submit),
        "get_16": (CLIENTS, int(3200 * scale), get_job),
    }
    root = Path(tempfile.mkdtemp(prefix="sdmesh-bench-security-"))
    cases = {
        "plain": Case("plain", root / "plain", secure=False),
        "secure": Case("secure", root / "secure", secure=True),
    }
    rows: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in cases}
    try:
        for _ in range(args.rounds):
            for phase, (threads, calls, call) in phases.items():
                for name, case in cases.items():
                    rows[name].setdefault(phase, []).append(case.phase(threads, calls, call))
    finally:
        for case in cases.values():
            case.stop()
        shutil.rmtree(root, ignore_errors=True)

    def merged(runs: list[dict[str, float]]) -> dict[str, float]:
        calls = sum(r["calls"] for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        cpu = sum(r["scheduler_cpu_ms_per_call"] * r["calls"] for r in runs) / calls
        return {
            "calls": calls,
            "seconds": round(seconds, 3),
            "per_s": round(calls / seconds, 1),
            "scheduler_cpu_ms_per_call": round(cpu, 3),
        }

    out_cases = {name: {p: merged(runs) for p, runs in by.items()} for name, by in rows.items()}
    ratio = {
        phase: round(out_cases["secure"][phase]["per_s"] / out_cases["plain"][phase]["per_s"], 3)
        for phase in phases
    }
    print(
        f"{'phase':<11} {'plain /s':>9} {'secure /s':>10} {'ratio':>6} {'cpu ms plain':>13} {'secure':>7}"
    )
    for phase in phases:
        plain, secure = out_cases["plain"][phase], out_cases["secure"][phase]
        print(
            f"{phase:<11} {plain['per_s']:>9} {secure['per_s']:>10} {ratio[phase]:>6} "
            f"{plain['scheduler_cpu_ms_per_call']:>13} {secure['scheduler_cpu_ms_per_call']:>7}"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    output = args.output
    if args.quick and output == RESULTS:
        output = RESULTS.with_name("security-quick.json")
    output.write_text(
        json.dumps(
            {
                "source": commit,
                "config": {"rounds": args.rounds, "quick": args.quick, "clients": CLIENTS},
                "cases": out_cases,
                "ratio": ratio,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
