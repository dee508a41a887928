"""Starts the scheduler and agents as real OS processes on free loopback
ports, the way users run them, and stops them at the end of a test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client import Client

START_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sdctl_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "client.cli", *args]


def process_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SDMESH_USER="tester")
    env.pop("SDMESH_SCHEDULER", None)
    return env


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class LocalCluster:
    root: Path
    db_url: str = ""
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> Process:
        log = self.root / f"{name}.log"
        with open(log, "wb") as handle:
            popen = subprocess.Popen(
                sdctl_command(*args), stdout=handle, stderr=subprocess.STDOUT, env=process_env()
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_scheduler(self, *extra: str, name: str = "scheduler") -> Process:
        args = ["-v", "scheduler", "--port", str(self.port), "--heartbeat", "0.5"]
        args += ["--data-dir", str(self.root / "scheduler"), *extra]
        if self.db_url:
            args += ["--db", self.db_url]
        return self._spawn(name, args)

    def start_agent(self, name: str, *extra: str) -> Process:
        args = ["--scheduler", self.address, "node", "--name", name]
        args += ["--data-dir", str(self.root / name), *extra]
        return self._spawn(name, args)

    def client(self, user: str = "tester") -> Client:
        return Client(self.address, user=user, timeout=10.0)

    def wait_for(self, condition: Callable[[Client], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with self.client() as client:
            while time.monotonic() < deadline:
                for process in self.processes:
                    if process.popen.poll() is not None:
                        raise AssertionError(
                            f"{process.name} exited with {process.popen.returncode} "
                            f"while waiting for {what}:\n{process.tail()}"
                        )
                try:
                    if condition(client):
                        return
                except Exception:  # not up yet
                    pass
                time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n" + self.logs())

    def wait_for_nodes(self, count: int) -> None:
        self.wait_for(
            lambda c: sum(node.connected for node in c.list_nodes()) >= count,
            f"{count} connected nodes",
        )

    def sdctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            sdctl_command("--scheduler", self.address, *args),
            capture_output=True,
            text=True,
            env=process_env(),
            timeout=timeout,
            check=False,
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.processes)

    def stop(self) -> None:
        # Agents first, so that they hand their work back to a live scheduler.
        for process in reversed(self.processes):
            process.stop()
