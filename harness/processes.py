"""Starts the scheduler and agents as real OS processes on free loopback
ports, the way users run them, and stops them at the end of a test. Each
one is tied to the process that started it (`spawn_tied`): if a test run is
killed, its servers stop too, and no orphan holds a port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import Client
from client.cli.tied import spawn_tied
from harness.waiting import until
from scheduler.config import is_loopback

START_TIMEOUT = 180.0


class ProcessExited(AssertionError):
    """A server the wait depended on is gone."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether pid runs; a zombie (dead, not yet reaped by whoever adopted
    it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


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

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.send(signal.SIGKILL)
        self.popen.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.send(signal.SIGCONT)  # a paused process cannot handle SIGTERM
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class Security:
    """Everything on, as a hardened cluster runs: TLS with client
    certificates (mutual TLS), API keys and node enrollment. Made in
    `root` before the scheduler starts, as an admin would on its host."""

    root: Path
    db_url: str
    hosts: tuple[str, ...] = ("127.0.0.1",)
    users: tuple[str, ...] = ("tester",)
    files: dict[str, Path] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # user -> API key
    admin_key: str = ""
    join_token: str = ""

    def __post_init__(self) -> None:
        from scheduler.store import Store
        from sdmesh.tls import make_cluster_certs

        self.files = make_cluster_certs(
            self.root / "certs", self.hosts, nodes=("node",), clients=("client",)
        )
        store = Store(self.db_url)
        try:
            store.migrate()
            registry = store.credentials
            self.admin_key = registry.create_key(
                "admin", admin=True, expires_at=None, actor="test"
            )[1].text
            for user in self.users:
                self.keys[user] = registry.create_key(
                    user, admin=False, expires_at=None, actor="test"
                )[1].text
            self.join_token = registry.create_join_token(
                expires_at=store.clock() + 3600, reusable=True, labels={}, actor="test"
            )[1].text
        finally:
            store.close()

    def scheduler_args(self) -> list[str]:
        f = self.files
        return [
            "--tls-cert",
            str(f["scheduler"]),
            "--tls-key",
            str(f["scheduler-key"]),
            "--client-ca",
            str(f["ca"]),
        ]

    def agent_args(self) -> list[str]:
        f = self.files
        return [
            "--join-token",
            self.join_token,
            "--ca-cert",
            str(f["ca"]),
            "--tls-cert",
            str(f["node"]),
            "--tls-key",
            str(f["node-key"]),
        ]

    def client_options(self, user: str) -> dict[str, Any]:
        f = self.files
        return {
            "api_key": self.admin_key if user == "admin" else self.keys[user],
            "ca_cert": f["ca"],
            "client_cert": f["client"],
            "client_key": f["client-key"],
        }

    def env(self, user: str = "tester") -> dict[str, str]:
        options = self.client_options(user)
        return {
            "SDMESH_API_KEY": options["api_key"],
            "SDMESH_CA_CERT": str(options["ca_cert"]),
            "SDMESH_CLIENT_CERT": str(options["client_cert"]),
            "SDMESH_CLIENT_KEY": str(options["client_key"]),
        }


@dataclass
class LocalCluster:
    """A scheduler (or several replicas on one database) and agents.
    `replicas` > 1 gives each replica its own port and data dir; agents and
    clients get every address."""

    root: Path
    db_url: str = ""
    port: int = field(default_factory=free_port)
    replicas: int = 1
    scheduler_args: tuple[str, ...] = ()  # passed to every replica
    host: str = "127.0.0.1"  # what replicas listen on
    connect_host: str = "127.0.0.1"  # what agents and clients dial
    processes: list[Process] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    # TLS, mutual TLS, keys and enrollment; without it the scheduler runs
    # with --no-auth (and --insecure off loopback), as `sdctl up` does.
    secure: bool = False
    security: Security | None = None

    def __post_init__(self) -> None:
        self.ports = [self.port] + [free_port() for _ in range(self.replicas - 1)]
        if self.secure:
            url = self.db_url or f"sqlite:///{self.root / 'scheduler' / 'sdmesh.db'}"
            (self.root / "scheduler").mkdir(parents=True, exist_ok=True)
            hosts = tuple(dict.fromkeys([self.connect_host, self.host]))
            self.security = Security(self.root, url, hosts=hosts)

    def _env(self) -> dict[str, str]:
        env = process_env()
        if self.security is not None:
            env.update(self.security.env())
        return env

    @property
    def address(self) -> str:
        return f"{self.connect_host}:{self.port}"

    @property
    def addresses(self) -> str:
        return ",".join(f"{self.connect_host}:{port}" for port in self.ports)

    def _spawn(self, name: str, args: list[str], wrap: list[str] | None = None) -> Process:
        log = self.root / f"{name}.log"
        with open(log, "ab") as handle:
            popen = spawn_tied(
                [*(wrap or []), *sdctl_command(*args)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=self._env(),
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_scheduler(self, *extra: str, name: str = "scheduler", replica: int = 0) -> Process:
        data_dir = self.root / ("scheduler" if replica == 0 else f"scheduler-{replica}")
        args = ["-v", "scheduler", "--host", self.host, "--port", str(self.ports[replica])]
        args += ["--heartbeat", "0.5", "--data-dir", str(data_dir), *self.scheduler_args, *extra]
        if self.replicas > 1:
            args += ["--images-dir", str(self.root / "images")]
        if self.host != self.connect_host:
            args += ["--advertise", f"{self.connect_host}:{self.ports[replica]}"]
        if self.db_url:
            args += ["--db", self.db_url]
        if self.security is not None:
            args += self.security.scheduler_args()
        else:
            args += ["--no-auth"] + ([] if is_loopback(self.host) else ["--insecure"])
        return self._spawn(name, args)

    def start_agent(self, name: str, *extra: str, wrap: list[str] | None = None) -> Process:
        # As the README has it: `sdctl node --scheduler HOST:PORT ...`.
        args = ["node", "--scheduler", self.addresses, "--name", name]
        args += ["--data-dir", str(self.root / name), *extra]
        if self.security is not None:
            args += self.security.agent_args()
        return self._spawn(name, args, wrap)

    def client(self, user: str = "tester", **options: Any) -> Client:
        """A client as `user`; with security on, with that user's key (the
        admin's for "admin")."""
        if self.security is not None:
            options = self.security.client_options(user) | options
        options.setdefault("timeout", 10.0)
        return Client(self.addresses, user=user, **options)

    def wait_for(self, condition: Callable[[Client], bool], what: str) -> None:
        """Until `condition` holds, failing at once if a process exits."""

        def all_alive() -> None:
            for process in self.processes:
                if process.popen.poll() is not None:
                    raise ProcessExited(
                        f"{process.name} exited with {process.popen.returncode} "
                        f"while waiting for {what}:\n{process.tail()}"
                    )

        with self.client() as client:
            try:
                until(
                    lambda: condition(client),
                    what,
                    timeout=START_TIMEOUT,
                    interval=0.2,
                    while_alive=all_alive,
                )
            except ProcessExited:
                raise
            except AssertionError as exc:  # timed out: every process's log helps
                raise AssertionError(f"{exc}\n{self.logs()}") from None

    def wait_for_nodes(self, count: int) -> None:
        self.wait_for(
            lambda c: sum(node.connected for node in c.list_nodes()) >= count,
            f"{count} connected nodes",
        )

    def sdctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            sdctl_command("--scheduler", self.addresses, *args),
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=timeout,
            check=False,
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.processes)

    def stop(self) -> None:
        # Agents first, so that they hand their work back to a live scheduler.
        for process in reversed(self.processes):
            process.stop()
