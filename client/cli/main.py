"""sdctl: submit and watch Stable Diffusion jobs, inspect the cluster, and
run its servers.

Errors print as one line on stderr. Exit codes: 0 ok; 1 job failed or
cancelled, or not found; 2 invalid or rejected input; 3 scheduler
unreachable (or, for `health`, no replica is the leader).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from client._config import DEFAULT_ADDRESS, DEFAULT_RECONNECT_TIMEOUT
from client._errors import SdmeshError
from client.cli.servers import parse_duration

EXIT_INTERRUPTED = 130


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scheduler",
        metavar="HOST:PORT[,HOST:PORT...]",
        help=f"scheduler replicas, tried in turn (default: $SDMESH_SCHEDULER or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--reconnect-timeout",
        type=parse_duration,
        default=DEFAULT_RECONNECT_TIMEOUT,
        metavar="DURATION",
        help="how long to keep retrying a lost scheduler, e.g. 30s or 5m "
        f"(default {DEFAULT_RECONNECT_TIMEOUT:g}s)",
    )
    parser.add_argument("--user", help="who you are (default: $SDMESH_USER or your login)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="submit a job and wait for its images")
    submit.add_argument("prompt")
    submit.add_argument("--model", help="model name (default tiny)")
    submit.add_argument("--negative", default="", help="negative prompt")
    submit.add_argument("--steps", type=int, help="denoising steps (default 20)")
    submit.add_argument("--width", type=int, help="pixels, a multiple of 8 (default 512)")
    submit.add_argument("--height", type=int, help="pixels, a multiple of 8 (default 512)")
    submit.add_argument("--seed", type=int, help="-1 for random (default)")
    submit.add_argument("--cfg-scale", type=float, help="guidance scale (default 7)")
    submit.add_argument("--sampler", help='A1111 sampler name (default "Euler a")')
    submit.add_argument("--batch-size", type=int, help="images per job (default 1)")
    submit.add_argument("--priority", type=int, default=0, help="-100..100, higher first")
    submit.add_argument(
        "--memory-mode",
        default="auto",
        choices=("auto", "full", "model_offload", "sequential_offload"),
    )
    submit.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument(
        "--selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only on nodes with this label; repeatable",
    )
    submit.add_argument("--request-id", help="makes a retried submit return the same job")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--output-dir", default="outputs", help="where to save the PNGs")
    _output(submit)

    watch = commands.add_parser("watch", help="follow a job until it ends")
    watch.add_argument("job_id", metavar="JOB")
    watch.add_argument("--after-seq", type=int, default=0, help="resume after this event")
    _output(watch)

    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", action="append", default=[], help="filter; repeatable")
    jobs.add_argument("--owner", help="only this user's jobs")
    jobs.add_argument("--limit", type=int, default=50)
    _output(jobs)

    job = commands.add_parser("job", help="show one job")
    job.add_argument("job_id", metavar="JOB")
    _output(job)

    images = commands.add_parser("images", help="download a job's images")
    images.add_argument("job_id", metavar="JOB")
    images.add_argument("--output-dir", default="outputs")
    _output(images)

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id", metavar="JOB")
    _output(cancel)

    _output(commands.add_parser("nodes", help="list GPU nodes and their devices"))
    _output(commands.add_parser("models", help="list the models nodes have reported"))

    drain = commands.add_parser(
        "drain",
        help="stop new work on a node; running jobs finish or are handed back",
        description="Stops new work on a node. Its running jobs finish within the timeout; "
        "those that do not are handed back to the queue without counting as a failure.",
    )
    drain.add_argument("node", metavar="NODE", help="node id or name")
    drain.add_argument(
        "--timeout",
        type=parse_duration,
        metavar="DURATION",
        help="how long running jobs may take to finish, e.g. 90s or 10m "
        "(default: the agent's shutdown timeout)",
    )
    _output(drain)
    undrain = commands.add_parser("undrain", help="let a drained node take work again")
    undrain.add_argument("node", metavar="NODE", help="node id or name")
    _output(undrain)
    _output(
        commands.add_parser(
            "health", help="ask every --scheduler address for its role; exit 3 if none leads"
        )
    )

    scheduler = commands.add_parser("scheduler", help="run the scheduler")
    scheduler.add_argument("--host", default="127.0.0.1", help="0.0.0.0 for other machines")
    scheduler.add_argument("--port", type=int, default=50051)
    scheduler.add_argument("--data-dir", help="default ~/.local/share/sdmesh/scheduler")
    scheduler.add_argument(
        "--db", metavar="URL", help="postgresql+psycopg://... (default SQLite in the data dir)"
    )
    scheduler.add_argument("--heartbeat", type=float, default=2.0, help="agent stats seconds")
    scheduler.add_argument(
        "--lease",
        type=parse_duration,
        default="10s",
        help="an agent silent this long is lost, its jobs re-queued; replicas hold the "
        "leader lease for as long (default 10s)",
    )
    scheduler.add_argument(
        "--progress-deadline",
        type=parse_duration,
        default="60s",
        help="a running job must report a step this often, or 10x its step time if longer; "
        "else its GPU counts as hung (default 60s)",
    )
    scheduler.add_argument(
        "--images-dir",
        help="where images are stored; replicas on one database must share it "
        "(default: images/ in the data dir)",
    )
    scheduler.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="where agents and clients reach this replica (default --host:--port)",
    )
    scheduler.add_argument("--max-attempts", type=int, default=3)
    scheduler.add_argument(
        "--reserve-after",
        type=parse_duration,
        default="120s",
        help="hold a GPU for a job that fits nowhere for this long (default 120s)",
    )
    scheduler.add_argument(
        "--node-window",
        type=parse_duration,
        default="24h",
        help="how long a node's models count as known after it leaves (default 24h)",
    )

    node = commands.add_parser("node", help="run a GPU node agent")
    node.add_argument("--name", help="display name (default hostname-gpuN)")
    node.add_argument("--data-dir", help="default ~/.local/share/sdmesh/node")
    node.add_argument("--models-dir", help="folder of diffusers model folders")
    node.add_argument("--gpus", help="device indexes to use, e.g. 0,1 (default: all)")
    node.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    node.add_argument(
        "--shutdown-timeout",
        type=parse_duration,
        default="30s",
        help="on SIGTERM, running jobs get this long to finish before they are handed back",
    )
    node.add_argument(
        "--simulate-gpus", metavar="SIZES", help="simulated cards instead of real ones: 24GiB,12GiB"
    )
    node.add_argument(
        "--simulate-speed", default="1.0", metavar="FACTORS", help="per card, e.g. 1.0,0.5"
    )
    node.add_argument(
        "--simulate-models", metavar="NAME=SIZE,...", help="synthetic models, e.g. sdxl=6.9GiB"
    )
    node.add_argument(
        "--simulate-time-scale",
        type=float,
        default=1.0,
        help="multiplies every simulated wait (loads, steps); 0.01 for fast tests",
    )
    node.add_argument(
        "--simulate-step-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="real seconds added to every simulated step, to keep jobs mid-flight in tests",
    )
    node.add_argument(
        "--simulate-hang",
        metavar="STEP:SECONDS",
        help="each simulated card hangs once, at this step, for this long",
    )
    node.add_argument(
        "--simulate-poison",
        metavar="TEXT",
        help="a job whose prompt holds TEXT kills this agent (SIGKILL) at its first step",
    )

    up = commands.add_parser("up", help="run a scheduler and one local agent")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051)
    up.add_argument("--data-dir", help="default ~/.local/share/sdmesh/up")
    up.add_argument("--models-dir")
    return parser


def _note_retrying(reconnect_timeout: float) -> Callable[[str, SdmeshError], None]:
    """Says once on stderr that sdctl waits for a scheduler, so that a restart
    or failover does not look like a hang. `submit` and `watch` replace it
    with their own display."""
    said = False

    def note(address: str, error: SdmeshError) -> None:
        nonlocal said
        if not said:
            said = True
            print(f"{error}; retrying for up to {reconnect_timeout:g}s", file=sys.stderr)

    return note


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "scheduler":
            from client.cli.servers import run_scheduler

            return run_scheduler(args)
        if args.command == "node":
            from client._config import resolve_address
            from client.cli.servers import run_node

            return run_node(args, resolve_address(args.scheduler))
        if args.command == "up":
            from client.cli.servers import run_up

            return run_up(args)
        from client._sync import Client
        from client.cli.commands import COMMANDS

        with Client(
            args.scheduler,
            user=args.user,
            reconnect_timeout=args.reconnect_timeout,
            on_retry=_note_retrying(args.reconnect_timeout),
        ) as client:
            code: int = COMMANDS[args.command](args, client)
            return code
    except SdmeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main() -> None:
    sys.exit(run())
