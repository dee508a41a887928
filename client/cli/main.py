"""sdctl: submit and watch Stable Diffusion jobs, inspect the cluster, and
run its servers.

Global flags (--scheduler, --api-key, --ca-cert, --client-cert,
--client-key, --user, --reconnect-timeout, -v, -o) go before or after the
command, as kubectl's do; the server commands (scheduler, node, up, admin)
take their own flags after it. Errors print as one line on stderr; -v adds
the details.

Exit codes: 0 ok; 1 job failed or cancelled, or not found, or a server
could not start; 2 invalid or rejected input; 3 scheduler (for the servers
and admin: the database) unreachable, or a TLS handshake failed (for
`health`: no replica is the leader); 4 not authenticated or not allowed;
5 a limit was hit: retry later.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from client._config import DEFAULT_ADDRESS, DEFAULT_RECONNECT_TIMEOUT
from client._errors import SdmeshError
from client.cli import servers
from client.cli.options import add_options, text_type
from client.cli.parser import Parser, innermost, refuse_unknown
from client.cli.render import os_error_text, safe_text
from sdmesh.flags import parse_duration, parse_positive
from sdmesh.spec import SpecRequest

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
OUTPUTS = ("table", "json")


def _global_flags(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    """The flags every user command takes. Before the command they carry the
    defaults and show in `sdctl --help`; after it they are only there when
    given, so that they never overwrite a value given before it, and each
    command's help names them in one line instead of repeating them."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    def shown(text: str) -> str:
        return argparse.SUPPRESS if after_command else text

    _client_flags(parser, shown)
    parser.add_argument(
        "--scheduler",
        metavar="HOST:PORT[,HOST:PORT...]",
        default=default(None),
        help=shown(
            f"scheduler replicas, tried in turn (default: $SDMESH_SCHEDULER or {DEFAULT_ADDRESS})"
        ),
    )
    parser.add_argument(
        "--reconnect-timeout",
        type=text_type(parse_duration),
        default=default(DEFAULT_RECONNECT_TIMEOUT),
        metavar="DURATION",
        help=shown(
            "how long to keep retrying a lost scheduler, e.g. 30s or 5m "
            f"(default {DEFAULT_RECONNECT_TIMEOUT:g}s)"
        ),
    )
    parser.add_argument(
        "--user",
        default=default(None),
        help=shown(
            "who you are, which counts only when the scheduler runs with --no-auth "
            "(default: $SDMESH_USER or your login)"
        ),
    )
    verbose_flag(parser, after_command=after_command, help=shown("debug logging"))


def verbose_flag(parser: argparse.ArgumentParser, *, after_command: bool, help: str) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if after_command else False,
        help=help,
    )


def _client_flags(parser: argparse.ArgumentParser, shown: Callable[[str], str]) -> None:
    """Who is asking and how to reach the scheduler. Left out, they are left
    out of the arguments too, before the command as after it: the client
    reads the environment instead."""
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=argparse.SUPPRESS,
        help=shown(
            "your API key, from `sdctl admin` (default: $SDMESH_API_KEY, which is better: "
            "a flag shows in the process list)"
        ),
    )
    parser.add_argument(
        "--ca-cert",
        metavar="PEM",
        type=Path,
        default=argparse.SUPPRESS,
        help=shown(
            "dial over TLS, checking the scheduler's certificate with this CA "
            "(default: $SDMESH_CA_CERT; without it, plain text)"
        ),
    )
    parser.add_argument(
        "--client-cert",
        metavar="PEM",
        type=Path,
        default=argparse.SUPPRESS,
        help=shown(
            "your certificate, for a scheduler with mutual TLS (default: $SDMESH_CLIENT_CERT)"
        ),
    )
    parser.add_argument(
        "--client-key",
        metavar="PEM",
        type=Path,
        default=argparse.SUPPRESS,
        help=shown("the key of --client-cert (default: $SDMESH_CLIENT_KEY)"),
    )


def _output_flag(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default=argparse.SUPPRESS if after_command else "table",
        help="output format: a table, or JSON (one line when piped; default table)",
    )


def build_parser() -> Parser:
    parser = Parser(
        prog="sdctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    declared = len(parser._actions)
    _global_flags(parser, after_command=False)
    # Named in each user command's help as they are declared.
    global_flags = [action.option_strings[0] for action in parser._actions[declared:]]
    epilog = (
        f"Global flags ({', '.join(global_flags[:-1])} and {global_flags[-1]}) go before or "
        "after the command: see `sdctl --help`."
    )
    _output_flag(parser, after_command=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, *, args: str = "", prints: bool = True, **extra: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            usage=f"sdctl {name}{' ' + args if args else ''} [flags]",
            epilog=epilog,
            **extra,  # type: ignore[arg-type]
        )
        _global_flags(sub, after_command=True)
        if prints:
            _output_flag(sub, after_command=True)
        return sub

    def server(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, usage=f"sdctl {name} [flags]")
        verbose_flag(sub, after_command=True, help="debug logging")
        return sub

    submit = command(
        "submit",
        "submit a job and wait for its images",
        args="PROMPT",
        description="Submits a job, follows its progress and saves its PNGs. "
        "Only the flags given are sent; the scheduler applies the defaults of the rest.",
    )
    submit.add_argument("prompt", metavar="PROMPT", help="what to generate, in quotes")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument(
        "--output-dir", metavar="DIR", default="outputs", help="where to save the PNGs"
    )
    add_options(submit, SpecRequest, skip=("prompt",))

    watch = command("watch", "follow a job until it ends", args="JOB")
    watch.add_argument("job_id", metavar="JOB")
    watch.add_argument(
        "--after-seq", type=int, default=0, metavar="N", help="resume after this event"
    )

    jobs = command("jobs", "list jobs, newest first")
    jobs.add_argument(
        "--state", action="append", default=[], metavar="STATE", help="filter; repeatable"
    )
    jobs.add_argument("--owner", metavar="USER", help="only this user's jobs")
    jobs.add_argument(
        "--limit",
        type=text_type(parse_positive),
        default=50,
        metavar="N",
        help="at most this many (default 50)",
    )

    command("job", "show one job", args="JOB").add_argument("job_id", metavar="JOB")

    images = command("images", "download a job's images", args="JOB")
    images.add_argument("job_id", metavar="JOB")
    images.add_argument("--output-dir", metavar="DIR", default="outputs")

    command("cancel", "cancel a job", args="JOB").add_argument("job_id", metavar="JOB")
    command(
        "delete",
        "delete jobs with their images; a running job is cancelled first",
        args="JOB...",
        description="Deletes each job with its events and images. A job still queued or "
        "running is cancelled first. Only a job's owner (or an admin) may delete it.",
    ).add_argument("job_ids", metavar="JOB", nargs="+")
    command("nodes", "list GPU nodes and their devices")
    command("models", "list the models nodes have reported")

    drain = command(
        "drain",
        "stop new work on a node; running jobs finish or are handed back",
        args="NODE",
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
    undrain = command("undrain", "let a drained node take work again", args="NODE")
    undrain.add_argument("node", metavar="NODE", help="node id or name")
    command("health", "ask every --scheduler address for its role; exit 3 if none leads")

    # The server commands take only their own flags after the command (a
    # node's --ca-cert is its own); see client.cli.servers.
    servers.add_commands(server)
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


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, or SystemExit(2) after one line naming the command a
    mistake was made in (see `client.cli.parser`)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse_unknown(innermost(parser, args, ("command", "admin_command")), unknown)
    return args


def run(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
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
    except BrokenPipeError:
        # The reader went away (`sdctl jobs | head`): nothing is wrong here.
        # Point stdout at nothing, so that flushing it at exit stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A file sdctl was asked to read or write: which, and why.
        print(f"error: {safe_text(os_error_text(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        # A fault of sdctl's own: one line, and the traceback with -v.
        if args.verbose:
            raise
        print(
            f"error: sdctl {args.command} failed: {type(exc).__name__}: {safe_text(str(exc))} "
            "(run it again with -v for the details)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def main() -> None:
    sys.exit(run())
