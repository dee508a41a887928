"""`sdctl admin`, run on the scheduler's host: keys, join tokens, node
removal and the audit trail, on the scheduler's database directly (see
scheduler/admin.py, imported only when one of them runs), and `certs`,
which makes a CA and certificates and needs no database.

The database is `--db URL`, or the SQLite file in `--data-dir`; either flag
goes before or after the action. An action that makes a key or a token
creates the SQLite database on a fresh host, as the scheduler would on its
first start, so that the first admin key can exist before the scheduler
runs; the others refuse a data dir that holds no database, which is most
likely a mistyped path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client._errors import InvalidArgumentError
from client.cli.install import default_data_dir, missing_module, require
from client.cli.options import text_type
from scheduler.config import DATABASE_FILE, SchedulerConfig, parse_database_url
from sdmesh.flags import parse_duration, parse_pairs, parse_positive

# Actions that create what they need in a fresh data dir.
CREATING = ("create-key", "join-token")


def _database_flags(parser: argparse.ArgumentParser, *, after_action: bool) -> None:
    default = argparse.SUPPRESS if after_action else None
    parser.add_argument(
        "--db",
        metavar="URL",
        type=text_type(parse_database_url),
        default=default,
        help="the scheduler's database, as its --db: postgresql://USER@HOST/DATABASE",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default,
        help="the scheduler's data dir, for its SQLite database "
        "(default ~/.local/share/sdmesh/scheduler)",
    )


def add_command(admin: argparse.ArgumentParser) -> None:
    _database_flags(admin, after_action=False)
    subs = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    duration = text_type(parse_duration)

    def sub(
        name: str, help: str, *, database: bool = True, args: str = ""
    ) -> argparse.ArgumentParser:
        parser = subs.add_parser(
            name,
            prog=f"sdctl admin {name}",
            help=help,
            description=help,
            usage=f"sdctl admin {name}{' ' + args if args else ''} [flags]",
        )
        if database:
            _database_flags(parser, after_action=True)
        parser.add_argument(
            "-o",
            "--output",
            choices=("table", "json"),
            default="table",
            help="output format (default table)",
        )
        return parser

    key = sub("create-key", "make an API key for a user; prints it once")
    key.add_argument("--user", required=True, help="who the key speaks for")
    key.add_argument("--admin", action="store_true", help="may see and act on every job and node")
    key.add_argument(
        "--expires", type=duration, metavar="DURATION", help="e.g. 90d (default never)"
    )
    listing = sub("list-keys", "list API keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    sub("revoke-key", "revoke an API key", args="KEY_ID").add_argument("key_id", metavar="KEY_ID")
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
    sub(
        "remove-node",
        "revoke a node: its stream closes, its jobs are re-queued",
        args="NODE",
    ).add_argument("node", metavar="NODE", help="node id or name")
    log_ = sub(
        "audit",
        "who made and revoked keys, enrolled and removed nodes, drained, and acted on others' jobs",
    )
    log_.add_argument("--limit", type=text_type(parse_positive), default=100, metavar="N")
    log_.add_argument("--since", type=duration, metavar="DURATION", help="e.g. 24h")
    certs = sub(
        "certs", "make a CA and certificates for the scheduler, nodes and clients", database=False
    )
    certs.add_argument("--out", required=True, metavar="DIR")
    certs.add_argument(
        "--hosts",
        required=True,
        metavar="NAMES",
        help="the scheduler's names and addresses: a,b,...",
    )
    certs.add_argument(
        "--nodes",
        default="node",
        metavar="NAMES",
        help="node certificates to make: n1,n2,... (default node)",
    )
    certs.add_argument(
        "--clients",
        default="client",
        metavar="NAMES",
        help="client certificates, for mutual TLS: c1,c2,... (default client)",
    )
    certs.add_argument("--days", type=int, default=365, metavar="N", help="validity (default 365)")


def run(args: argparse.Namespace) -> int:
    if args.admin_command == "certs":
        return certs(args)
    require("scheduler", "sdctl admin")
    try:
        from scheduler.admin import run_admin
    except ModuleNotFoundError as exc:
        raise missing_module("sdctl admin", "scheduler", exc) from None

    if getattr(args, "label", None):
        args.label = {k: v for pair in args.label for k, v in pair.items()}
    return run_admin(args, database_url(args))


def database_url(args: argparse.Namespace) -> str:
    """--db, or the SQLite file in --data-dir (see the module's docstring)."""
    if args.db:
        return str(args.db)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir("scheduler")
    database = data_dir / DATABASE_FILE
    if args.admin_command in CREATING:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(
                f"--data-dir {data_dir}: cannot create it ({exc.strerror})"
            ) from None
    elif not database.exists():
        raise InvalidArgumentError(
            f"--data-dir {data_dir}: no scheduler database there ({DATABASE_FILE}); "
            "give the scheduler's --data-dir, or --db for PostgreSQL"
        )
    return SchedulerConfig(data_dir=data_dir).database_url


def certs(args: argparse.Namespace) -> int:
    from sdmesh.tls import make_cluster_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not hosts:
        raise InvalidArgumentError(
            "--hosts: give the names and addresses clients and nodes dial the scheduler at, "
            "e.g. sched.example.com,10.0.0.5"
        )
    try:
        written = make_cluster_certs(
            Path(args.out), hosts, days=args.days, nodes=nodes, clients=clients
        )
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    except OSError as exc:
        raise InvalidArgumentError(f"--out {args.out}: {exc.strerror}") from None
    if args.output == "json":
        from sdmesh.output import write_json

        write_json({name: str(path) for name, path in sorted(written.items())})
    else:
        for name, path in sorted(written.items()):
            print(f"{name:<16} {path}")
    print(
        f"made a CA and certificates for the scheduler ({', '.join(hosts)}), nodes and "
        f"clients in {args.out}; keep ca-key.pem offline",
        file=sys.stderr,
    )
    return 0
