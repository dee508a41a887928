"""The server subcommands: `sdctl scheduler`, `sdctl node` and `sdctl up`,
and the one place sdctl starts the servers. Their flags come from the
servers' config dataclasses (light modules); the servers themselves are
imported only when they run, so the user-facing commands start fast and
never load torch.

Servers started by `sdctl up` (and by the test harness) end with their
parent, even one killed with SIGKILL: each child inherits the read end of
a pipe whose write end only the parent holds, and stops when it reads EOF.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from client._config import resolve_address
from client._errors import InvalidArgumentError, SdmeshError
from client.cli.options import add_options, config_from, text_type
from gpu_node.config import AgentConfig
from scheduler.config import SchedulerConfig, is_loopback
from sdmesh.datadir import DataDirInUse
from sdmesh.flags import parse_duration, parse_pairs

log = logging.getLogger("sdctl")

PARENT_FD_ENV = "SDMESH_PARENT_FD"


def add_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    add_options(command("scheduler", "run the scheduler"), SchedulerConfig)
    add_options(command("node", "run a GPU node agent"), AgentConfig)
    up = command("up", "run a scheduler and one local agent, on this machine only, without keys")
    add_options(up, SchedulerConfig, only=("host", "port"))
    up.add_argument("--data-dir", help="default ~/.local/share/sdmesh/up")
    add_options(up, AgentConfig, only=("models_dir", "tiny_variants"))
    _admin_commands(command("admin", "keys, join tokens, nodes, audit, certificates"))


def _admin_commands(admin: argparse.ArgumentParser) -> None:
    """`sdctl admin ...`, run on the scheduler's host: it works on the
    scheduler's database directly (see scheduler/admin.py)."""
    admin.add_argument("--db", metavar="URL", help="the scheduler's database (as its --db)")
    admin.add_argument(
        "--data-dir",
        help="the scheduler's data dir, for its SQLite database "
        "(default ~/.local/share/sdmesh/scheduler)",
    )
    subs = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    duration = text_type(parse_duration)

    def sub(name: str, help: str, *, prints: bool = False) -> argparse.ArgumentParser:
        parser = subs.add_parser(name, help=help, description=help)
        if prints:
            parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
        return parser

    key = sub("create-key", "make an API key for a user; prints it once")
    key.add_argument("--user", required=True, help="who the key speaks for")
    key.add_argument("--admin", action="store_true", help="may see and act on every job and node")
    key.add_argument(
        "--expires", type=duration, metavar="DURATION", help="e.g. 90d (default never)"
    )
    listing = sub("list-keys", "list API keys (never their secrets)", prints=True)
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    sub("revoke-key", "revoke an API key").add_argument("key_id", metavar="KEY_ID")
    token = sub("join-token", "make a token a new node presents once to enroll")
    token.add_argument("--expires", type=duration, metavar="DURATION", help="default 1h")
    token.add_argument(
        "--reusable", action="store_true", help="enroll any number of nodes until it expires"
    )
    token.add_argument(
        "--label",
        action="append",
        type=text_type(lambda text: parse_pairs([text])),
        metavar="KEY=VALUE",
        help="a label fixed on every node it enrolls; repeatable",
    )
    sub("remove-node", "revoke a node: its stream closes, its jobs are re-queued").add_argument(
        "node", metavar="NODE_ID"
    )
    log_ = sub(
        "audit",
        "who made and revoked keys, enrolled and removed nodes, drained, and acted on others' jobs",
        prints=True,
    )
    log_.add_argument("--limit", type=int, default=100)
    log_.add_argument("--since", type=duration, metavar="DURATION", help="e.g. 24h")
    certs = sub("certs", "make a CA and certificates for the scheduler, nodes and clients")
    certs.add_argument("--out", required=True, metavar="DIR")
    certs.add_argument(
        "--hosts", required=True, help="the scheduler's names and addresses: a,b,..."
    )
    certs.add_argument(
        "--nodes", default="node", help="node certificates to make: n1,n2,... (default node)"
    )
    certs.add_argument(
        "--clients",
        default="client",
        help="client certificates, for mutual TLS: c1,c2,... (default client)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity (default 365)")


def run_admin(args: argparse.Namespace) -> int:
    from scheduler.admin import run_admin as run

    if getattr(args, "label", None):
        args.label = {k: v for pair in args.label for k, v in pair.items()}
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir("scheduler")
    url = args.db or SchedulerConfig(data_dir=data_dir).database_url
    return run(args, url)


def default_data_dir(kind: str) -> Path:
    root = os.environ.get("SDMESH_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "sdmesh"
    )
    return Path(root) / kind


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # gRPC's and SQLAlchemy's own loggers are noisy at INFO.
    for noisy in ("grpc", "sqlalchemy", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- ending with the parent ------------------------------------------------


def spawn_tied(command: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Starts `command` (an sdctl server) so that it stops when this process
    ends, however it ends."""
    read_end, _ = _parent_pipe()
    env = dict(popen.pop("env", None) or os.environ)
    env[PARENT_FD_ENV] = str(read_end)
    return subprocess.Popen(command, env=env, pass_fds=(read_end,), **popen)


_pipe: tuple[int, int] | None = None


def _parent_pipe() -> tuple[int, int]:
    """One pipe for every child: its write end stays open, unwritten, for as
    long as this process lives."""
    global _pipe
    if _pipe is None:
        read_end, write_end = os.pipe()
        os.set_inheritable(write_end, False)
        _pipe = (read_end, write_end)
    return _pipe


def _stop_with_parent() -> None:
    """In a server started by `spawn_tied`: when the parent is gone, stop as
    a second SIGTERM stops (at once, handing running work back), since
    nobody is left to wait for."""
    fd_text = os.environ.pop(PARENT_FD_ENV, "")
    if not fd_text.isdigit():
        return
    fd = int(fd_text)

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        log.warning("the process that started this one is gone; stopping")
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# ---- the servers -------------------------------------------------------------


def run_scheduler(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    _stop_with_parent()
    import asyncio

    from scheduler.server import serve

    config = config_from(
        SchedulerConfig, args, defaults={"data_dir": default_data_dir("scheduler")}
    )
    try:
        asyncio.run(serve(config))
    except DataDirInUse as exc:
        raise SdmeshError(str(exc)) from None
    except ValueError as exc:  # settings that contradict each other, or a bad TLS file
        raise InvalidArgumentError(str(exc)) from None
    except (OSError, RuntimeError) as exc:
        raise SdmeshError(f"scheduler failed to start: {exc}") from None
    return 0


def run_node(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    _stop_with_parent()
    import asyncio
    import gc

    from gpu_node.agent import run_agent

    config = config_from(
        AgentConfig,
        args,
        defaults={"data_dir": default_data_dir("node")},
        scheduler=resolve_address(args.scheduler),
    )
    try:
        asyncio.run(run_agent(config))
        # torch and diffusers leave some 330,000 objects behind, and the
        # interpreter's last collections over them take about a second at
        # exit. Nothing in them needs finalizing: keep them out of reach.
        gc.freeze()
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    except (DataDirInUse, FileNotFoundError) as exc:
        raise SdmeshError(str(exc)) from None
    return 0


def _wait_until_ready(
    address: str, children: list[subprocess.Popen[bytes]], timeout: float
) -> bool:
    """Polls the scheduler until one node is connected, or a child exits."""
    from client._sync import Client

    deadline = time.monotonic() + timeout
    with Client(address, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                return False
            try:
                if any(node.connected for node in client.list_nodes()):
                    return True
            except SdmeshError:
                pass
            time.sleep(0.25)
    return False


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
    data_dir = Path(args.data_dir or default_data_dir("up"))
    host = getattr(args, "host", SchedulerConfig.host)
    port = getattr(args, "port", SchedulerConfig.port)
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
        if _wait_until_ready(address, children, timeout=300):
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
    "admin": run_admin,
}
