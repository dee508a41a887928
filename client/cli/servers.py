"""The server subcommands: `sdctl scheduler`, `sdctl node` and `sdctl up`.
They import the scheduler and agent packages only when they run, so the
user-facing commands start fast and never load torch."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from client._errors import InvalidArgumentError, SdmeshError
from client.cli.labels import parse_labels

log = logging.getLogger("sdctl")


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


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '2d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 90s, 15m or 24h, got {text!r}"
        ) from None


def run_scheduler(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    import asyncio

    from scheduler.server import SchedulerConfig, serve

    config = SchedulerConfig(
        data_dir=Path(args.data_dir or default_data_dir("scheduler")),
        host=args.host,
        port=args.port,
        db_url=args.db or "",
        heartbeat_seconds=args.heartbeat,
        lease_seconds=args.lease,
        progress_deadline_seconds=args.progress_deadline,
        advertise=args.advertise or "",
        images_dir=Path(args.images_dir) if args.images_dir else None,
        node_window_seconds=args.node_window,
        max_attempts=args.max_attempts,
        reserve_after_seconds=args.reserve_after,
    )
    try:
        asyncio.run(serve(config))
    except (OSError, RuntimeError) as exc:
        raise SdmeshError(f"scheduler failed to start: {exc}") from None
    return 0


def run_node(args: argparse.Namespace, scheduler: str) -> int:
    configure_logging(args.verbose)
    import asyncio

    from gpu_node.agent import AgentConfig, run_agent
    from gpu_node.identity import DataDirInUse
    from gpu_node.probe import Probe
    from gpu_node.simulated import (
        CardFaults,
        SimulatedProbe,
        parse_hang,
        parse_models,
        parse_sizes,
        parse_speeds,
    )

    try:
        probe: Probe | None = None
        synthetic: dict[str, int] = {}
        if args.simulate_gpus:
            sizes = parse_sizes(args.simulate_gpus)
            speeds = parse_speeds(args.simulate_speed, len(sizes))
            hang_at, hang_seconds = parse_hang(args.simulate_hang) if args.simulate_hang else (0, 0)
            faults = CardFaults(
                step_delay=args.simulate_step_delay,
                hang_at_step=hang_at,
                hang_seconds=hang_seconds,
                poison=args.simulate_poison or "",
            )
            probe = SimulatedProbe(sizes, speeds, args.simulate_time_scale, faults)
            synthetic = parse_models(args.simulate_models) if args.simulate_models else {}
        else:
            for flag in ("simulate_models", "simulate_hang", "simulate_poison"):
                if getattr(args, flag):
                    name = "--" + flag.replace("_", "-")
                    raise ValueError(f"{name} needs --simulate-gpus: only simulated GPUs have it")
        config = AgentConfig(
            scheduler=scheduler,
            data_dir=Path(args.data_dir or default_data_dir("node")),
            models_dir=Path(args.models_dir) if args.models_dir else None,
            name=args.name,
            labels=parse_labels(args.label),
            gpus=parse_gpus(args.gpus) if args.gpus else None,
            synthetic_models=synthetic,
            shutdown_timeout=args.shutdown_timeout,
        )
        asyncio.run(run_agent(config, probe))
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    except (DataDirInUse, FileNotFoundError) as exc:
        raise SdmeshError(str(exc)) from None
    return 0


def parse_gpus(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--gpus: expected indexes like 0,1, got {text!r}") from None


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


def run_up(args: argparse.Namespace) -> int:
    """The embedded cluster: a scheduler with SQLite and one local agent, as
    two child processes in the foreground. Ctrl-C stops the agent first, so
    it hands its work back, then the scheduler."""
    data_dir = Path(args.data_dir or default_data_dir("up"))
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    address = f"{connect_host}:{args.port}"
    command = [sys.executable, "-m", "client.cli"] + (["-v"] if args.verbose else [])
    scheduler = subprocess.Popen(
        [
            *command,
            "scheduler",
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--data-dir",
            str(data_dir / "scheduler"),
        ],
        start_new_session=True,
    )
    node_command = [*command, "--scheduler", address, "node", "--data-dir", str(data_dir / "node")]
    if args.models_dir:
        node_command += ["--models-dir", args.models_dir]
    node = subprocess.Popen(node_command, start_new_session=True)
    children = [node, scheduler]

    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if _wait_until_ready(address, children, timeout=300):
            print(
                f"sdmesh is up: scheduler at {address}, data in {data_dir}\n"
                f'  submit:  sdctl --scheduler {address} submit "a lighthouse at dusk"\n'
                "  stop:    Ctrl-C",
                file=sys.stderr,
                flush=True,
            )
        while not stop_requested and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:  # the agent first, then the scheduler
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    failed = [child for child in children if child.returncode not in (0, -signal.SIGTERM)]
    if failed and not stop_requested:
        raise SdmeshError("the embedded cluster stopped: a child process exited with an error")
    return 0
