"""The server subcommands: `sdctl scheduler`, `sdctl node` and `sdctl up`,
and the one place sdctl starts the servers. Their flags come from the
servers' config dataclasses (light modules); the servers themselves are
imported only when they run, so the user-facing commands start fast and
never load torch. Before a server starts, the packages of its extra are
checked (`client.cli.install`), and whatever stops it from starting is one
line on stderr.

Servers started by `sdctl up` end with it (`client.cli.tied`). `sdctl
admin` lives in `client.cli.admin`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from client._config import DEFAULT_ADDRESS, resolve_address
from client._errors import (
    AuthenticationError,
    InvalidArgumentError,
    SdmeshError,
    UnavailableError,
)
from client.cli import admin
from client.cli.install import default_data_dir, missing_module, require
from client.cli.options import add_options, config_from, text_type
from client.cli.render import os_error_text
from client.cli.tied import spawn_tied, stop_with_parent
from gpu_node.config import AgentConfig
from scheduler.config import REPLICA_ID_FILE, SchedulerConfig, is_loopback
from sdmesh.datadir import DataDirInUse, DataDirLock
from sdmesh.dialing import GaveUp
from sdmesh.flags import parse_duration
from sdmesh.wire import port_taken

log = logging.getLogger("sdctl")


def add_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    add_options(command("scheduler", "run the scheduler"), SchedulerConfig)
    node = command("node", "run a GPU node agent")
    node.add_argument(
        "--scheduler",
        metavar="HOST:PORT[,HOST:PORT...]",
        default=argparse.SUPPRESS,
        help="the scheduler replicas to dial, in turn "
        f"(default: $SDMESH_SCHEDULER or {DEFAULT_ADDRESS})",
    )
    node.add_argument(
        "--reconnect-timeout",
        type=text_type(parse_duration),
        default=argparse.SUPPRESS,
        metavar="DURATION",
        help="a node that has never got through gives up after this long when the scheduler's "
        "name does not resolve or its TLS handshake fails "
        f"(default {AgentConfig.reconnect_timeout:g}s); otherwise it keeps dialing",
    )
    add_options(node, AgentConfig)
    up = command("up", "run a scheduler and one local agent, on this machine only, without keys")
    up.add_argument(
        "--host",
        default=SchedulerConfig.host,
        metavar="HOST",
        help="listen address: 127.0.0.1 (default), ::1 or localhost; this cluster has no "
        "keys, so only this machine may reach it",
    )
    up.add_argument(
        "--port",
        type=text_type(_port),
        default=SchedulerConfig.port,
        metavar="PORT",
        help=f"listen port (default {SchedulerConfig.port})",
    )
    up.add_argument("--data-dir", metavar="DIR", help="default ~/.local/share/sdmesh/up")
    add_options(up, AgentConfig, only=("models_dir", "tiny_variants"))
    admin.add_command(command("admin", "keys, join tokens, nodes, audit, certificates"))


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"must be from 1 to 65535, got {port}")
    return port


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # gRPC's and SQLAlchemy's own loggers are noisy at INFO.
    for noisy in ("grpc", "sqlalchemy", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- the servers -------------------------------------------------------------


def run_scheduler(args: argparse.Namespace) -> int:
    require("scheduler", "sdctl scheduler")
    configure_logging(args.verbose)
    stop_with_parent()
    import asyncio

    try:
        from scheduler.server import DatabaseUnreachable, PortInUse, serve
    except ModuleNotFoundError as exc:
        raise missing_module("sdctl scheduler", "scheduler", exc) from None

    config = config_from(
        SchedulerConfig, args, defaults={"data_dir": default_data_dir("scheduler")}
    )
    try:
        asyncio.run(serve(config))
    except DataDirInUse as exc:
        raise SdmeshError(str(exc)) from None
    except DatabaseUnreachable as exc:
        raise UnavailableError(str(exc)) from None
    except PortInUse as exc:
        raise InvalidArgumentError(str(exc)) from None
    except ValueError as exc:  # settings that contradict each other, or a bad TLS file
        raise InvalidArgumentError(str(exc)) from None
    except OSError as exc:
        raise SdmeshError(f"scheduler failed to start: {os_error_text(exc)}") from None
    except RuntimeError as exc:
        raise SdmeshError(f"scheduler failed to start: {exc}") from None
    return 0


def run_node(args: argparse.Namespace) -> int:
    require("node", "sdctl node")
    configure_logging(args.verbose)
    stop_with_parent()
    import asyncio
    import gc

    try:
        from gpu_node.agent import run_agent
    except ModuleNotFoundError as exc:
        raise missing_module("sdctl node", "node", exc) from None

    config = config_from(
        AgentConfig,
        args,
        defaults={"data_dir": default_data_dir("node")},
        scheduler=resolve_address(getattr(args, "scheduler", None)),
        reconnect_timeout=args.reconnect_timeout,
    )
    try:
        asyncio.run(run_agent(config))
        # torch and diffusers leave some 330,000 objects behind, and the
        # interpreter's last collections over them take about a second at
        # exit. Nothing in them needs finalizing: keep them out of reach.
        gc.freeze()
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    except GaveUp as exc:
        raise UnavailableError(str(exc)) from None
    except (DataDirInUse, FileNotFoundError) as exc:
        raise SdmeshError(str(exc)) from None
    except SystemExit as exc:
        # The scheduler refused this node (not enrolled, a revoked
        # credential, a damaged credential file): its reason, as an error.
        if isinstance(exc.code, str):
            raise AuthenticationError(exc.code) from None
        raise
    return 0


def _wait_until_ready(
    address: str, replica_file: Path, children: list[subprocess.Popen[bytes]], timeout: float
) -> bool:
    """Polls the scheduler until one node is connected, or a child exits.
    Only our own scheduler counts: the one whose replica id is in its data
    dir, not another that answers at the same address."""
    from client._sync import Client

    deadline = time.monotonic() + timeout
    with Client(address, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                return False
            try:
                ours = replica_file.read_text().strip() if replica_file.exists() else None
                if (
                    ours
                    and client.health(address).replica_id == ours
                    and any(node.connected for node in client.list_nodes())
                ):
                    return True
            except SdmeshError:
                pass
            time.sleep(0.25)
    return False


def _check_free(host: str, port: int, address: str) -> None:
    """Refuses, in one line, a port something already listens on, saying
    whether that is an sdmesh scheduler (most likely another `sdctl up`)."""
    if not port_taken(host, port):
        return
    from client._sync import Client

    try:
        with Client(address, timeout=2.0, reconnect_timeout=0) as client:
            client.health(address)
        what = "an sdmesh scheduler (another `sdctl up`, or `sdctl scheduler`) already listens"
    except SdmeshError:
        what = "another program already listens"
    raise InvalidArgumentError(
        f"--port {port}: {what} on {address}: stop it, or pass another --port "
        "(and --data-dir, for a second cluster)"
    )


def _running_jobs(address: str) -> int:
    """Jobs the local agent is running now, as the scheduler sees them."""
    from client._sync import Client

    try:
        with Client(address, timeout=2.0, reconnect_timeout=0) as client:
            return sum(d.active_jobs for node in client.list_nodes() for d in node.devices)
    except SdmeshError:
        return 0


class _Stops:
    """Counts Ctrl-C and SIGTERM while `sdctl up` runs."""

    def __init__(self) -> None:
        self.count = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.count += 1


def _stop_agent(
    agent: subprocess.Popen[bytes], stops: _Stops, address: str, timeout: float
) -> None:
    """Asks the agent to stop and says so: its running job gets the shutdown
    timeout to finish, unless a second Ctrl-C hands it back at once."""
    seen = stops.count  # a Ctrl-C from now on hands the work back
    agent.send_signal(signal.SIGTERM)
    running = _running_jobs(address)
    if running:
        print(
            f"stopping: the agent finishes its {running} running job(s) or hands them back, "
            f"within {timeout:g}s; press Ctrl-C again to hand them back now",
            file=sys.stderr,
            flush=True,
        )
    started = time.monotonic()
    while agent.poll() is None:
        if stops.count > seen:
            seen = stops.count
            print("handing the running job(s) back now", file=sys.stderr, flush=True)
            agent.send_signal(signal.SIGTERM)
        if time.monotonic() - started > timeout + 60:
            agent.kill()
        time.sleep(0.1)


def run_up(args: argparse.Namespace) -> int:
    """The embedded cluster: a scheduler with SQLite and one local agent, as
    two child processes in the foreground. Ctrl-C stops the agent first, so
    it hands its work back, then the scheduler."""
    require("scheduler,node", "sdctl up")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir("up")
    host, port = args.host, args.port
    if not is_loopback(host):
        # The embedded cluster has no keys and no TLS: it is for this
        # machine only. A cluster others reach is `sdctl scheduler` with
        # keys, and `sdctl node --join-token` (README, "Security").
        raise InvalidArgumentError(
            f"--host {host}: `sdctl up` runs without keys, so it listens on this machine only "
            "(127.0.0.1, ::1 or localhost); for other machines run `sdctl scheduler` and "
            "`sdctl node` as the README's Security section shows"
        )
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    lock = DataDirLock(data_dir, role="up")
    try:
        lock.acquire()
    except DataDirInUse as exc:
        raise SdmeshError(
            f"another `sdctl up` (pid {exc.holder}) runs with the data dir {data_dir}: stop it "
            "(Ctrl-C where it runs), or give this one its own --data-dir and --port"
        ) from None
    try:
        _check_free(host, port, address)
        return _run_cluster(args, data_dir, host, port, address)
    finally:
        lock.release()


def _run_cluster(
    args: argparse.Namespace, data_dir: Path, host: str, port: int, address: str
) -> int:
    command = [sys.executable, "-m", "client.cli"] + (["-v"] if args.verbose else [])
    stops = _Stops()
    scheduler = spawn_tied(
        [
            *command,
            "scheduler",
            "--host",
            host,
            "--port",
            str(port),
            "--data-dir",
            str(data_dir / "scheduler"),
            "--no-auth",
        ],
        start_new_session=True,
    )
    node_command = [*command, "--scheduler", address, "node", "--data-dir", str(data_dir / "node")]
    if getattr(args, "models_dir", None):
        node_command += ["--models-dir", str(args.models_dir)]
    if getattr(args, "tiny_variants", False):
        node_command.append("--tiny-variants")
    node = spawn_tied(node_command, start_new_session=True)
    children = [node, scheduler]
    try:
        replica_file = data_dir / "scheduler" / REPLICA_ID_FILE
        if _wait_until_ready(address, replica_file, children, timeout=300):
            print(
                f"sdmesh is up: scheduler at {address}, data in {data_dir}\n"
                "  no API keys: this cluster listens on this machine only\n"
                f'  submit:  sdctl --scheduler {address} submit "a lighthouse at dusk"\n'
                "  stop:    Ctrl-C",
                file=sys.stderr,
                flush=True,
            )
        while not stops.count and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        if node.poll() is None:
            _stop_agent(node, stops, address, AgentConfig.shutdown_timeout)
        if scheduler.poll() is None:
            scheduler.send_signal(signal.SIGTERM)
            try:
                scheduler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                scheduler.kill()
                scheduler.wait()
    failed = [child for child in children if child.returncode not in (0, -signal.SIGTERM)]
    if failed and not stops.count:
        raise SdmeshError("the embedded cluster stopped: a child process exited with an error")
    return 0


SERVERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "scheduler": run_scheduler,
    "node": run_node,
    "up": run_up,
    "admin": admin.run,
}
