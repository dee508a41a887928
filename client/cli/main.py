"""sdctl: submit and watch Stable Diffusion jobs, inspect the cluster, and
run its servers.

Global flags (--scheduler, --api-key, --ca-cert, --client-cert,
--client-key, --user, --reconnect-timeout, -v, -o) go before or after the
command, as kubectl's do; the server commands take them before it only.
Errors print as one line on stderr.

Exit codes: 0 ok; 1 job failed or cancelled, or not found; 2 invalid or
rejected input; 3 scheduler unreachable, or its TLS handshake failed (or,
for `health`, no replica is the leader); 4 not authenticated or not
allowed; 5 a limit was hit: retry later.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from client._config import DEFAULT_ADDRESS, DEFAULT_RECONNECT_TIMEOUT
from client._errors import SdmeshError
from client.cli import servers
from client.cli.options import add_options, text_type
from client.cli.render import safe_text
from sdmesh.flags import parse_duration
from sdmesh.spec import SpecRequest

EXIT_INTERRUPTED = 130
OUTPUTS = ("table", "json")


def _global_flags(
    parser: argparse.ArgumentParser, *, after_command: bool, client: bool = True
) -> None:
    """The flags every command takes. Before the command they carry the
    defaults; after it they are only there when given, so that they never
    overwrite a value given before it. `client`: with the flags that say
    how to reach the scheduler as a client (the API key, the TLS files),
    which the server commands declare for themselves where they need them."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    if client:
        _client_flags(parser)

    parser.add_argument(
        "--scheduler",
        metavar="HOST:PORT[,HOST:PORT...]",
        default=default(None),
        help=f"scheduler replicas, tried in turn (default: $SDMESH_SCHEDULER or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--reconnect-timeout",
        type=text_type(parse_duration),
        default=default(DEFAULT_RECONNECT_TIMEOUT),
        metavar="DURATION",
        help="how long to keep retrying a lost scheduler, e.g. 30s or 5m "
        f"(default {DEFAULT_RECONNECT_TIMEOUT:g}s)",
    )
    parser.add_argument(
        "--user",
        default=default(None),
        help="who you are, which counts only when the scheduler runs with --no-auth "
        "(default: $SDMESH_USER or your login)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default(False), help="debug logging"
    )


def _client_flags(parser: argparse.ArgumentParser) -> None:
    """Who is asking and how to reach the scheduler. Left out, they are left
    out of the arguments too, before the command as after it: the client
    reads the environment instead, and a server command's own flag of the
    same name (a node's --ca-cert) keeps its default."""
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help="your API key, from `sdctl admin` (default: $SDMESH_API_KEY, which is better: "
        "a flag shows in the process list)",
    )
    parser.add_argument(
        "--ca-cert",
        metavar="PEM",
        type=Path,
        default=argparse.SUPPRESS,
        help="dial over TLS, checking the scheduler's certificate with this CA "
        "(default: $SDMESH_CA_CERT; without it, plain text)",
    )
    parser.add_argument(
        "--client-cert",
        metavar="PEM",
        type=Path,
        default=argparse.SUPPRESS,
        help="your certificate, for a scheduler with mutual TLS (default: $SDMESH_CLIENT_CERT)",
    )
    parser.add_argument(
        "--client-key",
        metavar="PEM",
        type=Path,
        default=argparse.SUPPRESS,
        help="the key of --client-cert (default: $SDMESH_CLIENT_KEY)",
    )


def _output_flag(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default=argparse.SUPPRESS if after_command else "table",
        help="output format (default table)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _global_flags(parser, after_command=False)
    _output_flag(parser, after_command=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, *, prints: bool = True, client: bool = True, **extra: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, **extra)  # type: ignore[arg-type]
        _global_flags(sub, after_command=True, client=client)
        if prints:
            _output_flag(sub, after_command=True)
        return sub

    submit = command("submit", "submit a job and wait for its images")
    submit.add_argument("prompt", help="what to generate")
    add_options(submit, SpecRequest, skip=("prompt",))
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--output-dir", default="outputs", help="where to save the PNGs")

    watch = command("watch", "follow a job until it ends")
    watch.add_argument("job_id", metavar="JOB")
    watch.add_argument("--after-seq", type=int, default=0, help="resume after this event")

    jobs = command("jobs", "list jobs, newest first")
    jobs.add_argument("--state", action="append", default=[], help="filter; repeatable")
    jobs.add_argument("--owner", help="only this user's jobs")
    jobs.add_argument("--limit", type=int, default=50)

    command("job", "show one job").add_argument("job_id", metavar="JOB")

    images = command("images", "download a job's images")
    images.add_argument("job_id", metavar="JOB")
    images.add_argument("--output-dir", default="outputs")

    command("cancel", "cancel a job").add_argument("job_id", metavar="JOB")
    command(
        "delete",
        "delete jobs with their images; a running job is cancelled first",
        description="Deletes each job with its events and images. A job still queued or "
        "running is cancelled first. Only a job's owner (or an admin) may delete it.",
    ).add_argument("job_ids", metavar="JOB", nargs="+")
    command("nodes", "list GPU nodes and their devices")
    command("models", "list the models nodes have reported")

    drain = command(
        "drain",
        "stop new work on a node; running jobs finish or are handed back",
        description="Stops new work on a node. Its running jobs finish within the timeout; "
        "those that do not are handed back to the queue without counting as a failure.",
    )
    drain.add_argument("node", metavar="NODE", help="node id or name")
    drain.add_argument(
        "--timeout",
        type=text_type(parse_duration),
        metavar="DURATION",
        help="how long running jobs may take to finish, e.g. 90s or 10m "
        "(default: the agent's shutdown timeout)",
    )
    undrain = command("undrain", "let a drained node take work again")
    undrain.add_argument("node", metavar="NODE", help="node id or name")
    command("health", "ask every --scheduler address for its role; exit 3 if none leads")

    # The server commands declare their own TLS flags (a node's --ca-cert
    # is its own), so they take the client's only before the command.
    servers.add_commands(lambda name, help: command(name, help, prints=False, client=False))
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
        if args.command in servers.SERVERS:
            code: int = servers.SERVERS[args.command](args)
            return code
        from client._sync import Client
        from client.cli.commands import COMMANDS

        with Client(
            args.scheduler,
            user=args.user,
            reconnect_timeout=args.reconnect_timeout,
            on_retry=_note_retrying(args.reconnect_timeout),
            api_key=getattr(args, "api_key", None),
            ca_cert=getattr(args, "ca_cert", None),
            client_cert=getattr(args, "client_cert", None),
            client_key=getattr(args, "client_key", None),
        ) as client:
            code = COMMANDS[args.command](args, client)
            return code
    except SdmeshError as exc:
        # The message may quote what the scheduler or a node sent.
        print(f"error: {safe_text(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main() -> None:
    sys.exit(run())
