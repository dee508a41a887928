"""`sdctl admin`'s commands on the scheduler's database: keys, join tokens,
node removal and the audit trail. These work directly on the database
(`--db`, or the SQLite file in `--data-dir`), on the scheduler's host, as
`kubeadm token create` works on the control-plane host: so the first admin
key exists before any client could present one. A running scheduler sees
each change within a few seconds (`scheduler.auth.CACHE_SECONDS`,
`scheduler.agents.REMOVAL_CHECK_SECONDS`).

Secrets are printed once, on stdout alone, so that `KEY=$(sdctl admin
create-key ...)` works, or inside the one JSON object of `-o json`;
everything else goes to stderr. JSON times are ISO 8601, as in job JSON.
"""

from __future__ import annotations

import getpass
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from scheduler.principal import check_user_name
from scheduler.store import DatabaseUnreachable, Store
from scheduler.store.credentials import KeyRecord
from sdmesh.errors import InvalidArgument, quote
from sdmesh.output import iso_time, write_json

DEFAULT_JOIN_TOKEN_SECONDS = 3600.0
# The exit codes sdctl uses (see client.cli.main).
EXIT_NOT_FOUND = 1
EXIT_INVALID = 2
EXIT_UNREACHABLE = 3


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"admin-cli:{user}@{socket.gethostname()}"


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    for line in [headers, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _key_state(record: KeyRecord, now: float) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and now >= record.expires_at:
        return "expired"
    return "active"


def _key_json(record: KeyRecord, now: float) -> dict[str, Any]:
    return {
        "id": record.id,
        "user": record.user,
        "admin": record.admin,
        "state": _key_state(record, now),
        "created_at": iso_time(record.created_at),
        "expires_at": iso_time(record.expires_at),
        "revoked_at": iso_time(record.revoked_at),
    }


def create_key(store: Store, args: Any) -> int:
    user = check_user_name(args.user, "--user")
    expires = None if args.expires is None else store.clock() + args.expires
    record, token = store.credentials.create_key(
        user, admin=args.admin, expires_at=expires, actor=_actor()
    )
    if args.output == "json":
        write_json({**_key_json(record, store.clock()), "key": token.text})
        return 0
    print(token.text)
    print(
        f"API key {record.id} for {user}{' (admin)' if record.admin else ''}, "
        f"expires {_when(expires) if expires else 'never'}. It is shown only now: keep it.",
        file=sys.stderr,
    )
    return 0


def list_keys(store: Store, args: Any) -> int:
    keys = store.credentials.keys(include_revoked=args.all)
    now = store.clock()
    if args.output == "json":
        write_json([_key_json(k, now) for k in keys])
        return 0
    _table(
        ["ID", "USER", "ADMIN", "STATE", "CREATED", "EXPIRES"],
        [
            [
                k.id,
                k.user,
                "yes" if k.admin else "",
                _key_state(k, now),
                _when(k.created_at),
                _when(k.expires_at),
            ]
            for k in keys
        ],
    )
    return 0


def revoke_key(store: Store, args: Any) -> int:
    if not store.credentials.revoke_key(args.key_id, actor=_actor()):
        print(
            f"error: no active API key {quote(args.key_id)}: `sdctl admin list-keys` shows them",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    print(f"API key {args.key_id} revoked; schedulers refuse it within seconds", file=sys.stderr)
    return 0


def join_token(store: Store, args: Any) -> int:
    from sdmesh.spec import check_labels

    labels = dict(args.label or {})
    check_labels(labels, "--label")
    expires = store.clock() + (
        args.expires if args.expires is not None else DEFAULT_JOIN_TOKEN_SECONDS
    )
    record, token = store.credentials.create_join_token(
        expires_at=expires, reusable=args.reusable, labels=labels, actor=_actor()
    )
    if args.output == "json":
        write_json(
            {
                "id": record.id,
                "reusable": record.reusable,
                "labels": record.labels,
                "created_at": iso_time(record.created_at),
                "expires_at": iso_time(expires),
                "token": token.text,
            }
        )
        return 0
    print(token.text)
    kind = "reusable until it expires" if record.reusable else "single-use"
    print(
        f"join token {record.id}: {kind}, expires {_when(expires)}. "
        "Start a node with: sdctl node --join-token TOKEN (or SDMESH_JOIN_TOKEN=TOKEN)",
        file=sys.stderr,
    )
    return 0


def remove_node(store: Store, args: Any) -> int:
    node_id = store.credentials.enrolled_node(args.node)
    if node_id is None or not store.credentials.revoke_node(node_id, actor=_actor()):
        print(
            f"error: no enrolled node with the id or name {quote(args.node)}: "
            "`sdctl nodes` lists them",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    print(
        f"node {node_id} removed: its stream closes within seconds and its jobs go back "
        "to the queue; it needs a new join token to come back",
        file=sys.stderr,
    )
    return 0


def audit(store: Store, args: Any) -> int:
    since = None if args.since is None else store.clock() - args.since
    entries = store.credentials.audit_entries(limit=args.limit, since=since)
    if args.output == "json":
        write_json(
            [
                {
                    "id": e.id,
                    "at": iso_time(e.at),
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "detail": e.detail,
                }
                for e in entries
            ]
        )
        return 0
    _table(
        ["TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"],
        [[_when(e.at), e.actor, e.action, e.target, e.detail] for e in entries],
    )
    return 0


COMMANDS: dict[str, Callable[[Store, Any], int]] = {
    "create-key": create_key,
    "list-keys": list_keys,
    "revoke-key": revoke_key,
    "join-token": join_token,
    "remove-node": remove_node,
    "audit": audit,
}


def run_admin(args: Any, database_url: str) -> int:
    """Runs `args.admin_command` on the database; returns sdctl's exit code,
    having said what went wrong in one line."""
    store = None
    try:
        store = Store(database_url)
        store.migrate()
        return COMMANDS[args.admin_command](store, args)
    except InvalidArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except DatabaseUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        if store is not None:
            store.close()
