"""`sdctl admin`: keys, join tokens, node removal, the audit trail and
certificates. These work directly on the scheduler's database (`--db`, or
the SQLite file in `--data-dir`), on the scheduler's host, as `kubeadm
token create` works on the control-plane host: so the first admin key
exists before any client could present one. A running scheduler sees each
change within a few seconds (`scheduler.auth.CACHE_SECONDS`,
`scheduler.agents.REMOVAL_CHECK_SECONDS`).

Secrets are printed once, on stdout alone, so that `KEY=$(sdctl admin
create-key ...)` works; everything else goes to stderr.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scheduler.principal import check_user_name
from scheduler.store import Store
from sdmesh.errors import InvalidArgument, quote

DEFAULT_JOIN_TOKEN_SECONDS = 3600.0


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


def _json(items: list[Any]) -> None:
    print(json.dumps([asdict(item) for item in items], indent=2))


def _key_state(record: Any, now: float) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and now >= record.expires_at:
        return "expired"
    return "active"


def create_key(store: Store, args: Any) -> int:
    user = check_user_name(args.user, "--user")
    expires = None if args.expires is None else store.clock() + args.expires
    record, token = store.credentials.create_key(
        user, admin=args.admin, expires_at=expires, actor=_actor()
    )
    print(token.text)
    print(
        f"API key {record.id} for {user}{' (admin)' if record.admin else ''}, "
        f"expires {_when(expires) if expires else 'never'}. It is shown only now: keep it.",
        file=sys.stderr,
    )
    return 0


def list_keys(store: Store, args: Any) -> int:
    keys = store.credentials.keys(include_revoked=args.all)
    if args.output == "json":
        print(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "user": k.user,
                        "admin": k.admin,
                        "created_at": k.created_at,
                        "expires_at": k.expires_at,
                        "revoked_at": k.revoked_at,
                        "state": _key_state(k, store.clock()),
                    }
                    for k in keys
                ],
                indent=2,
            )
        )
        return 0
    now = store.clock()
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
        print(f"error: no active API key {quote(args.key_id)}", file=sys.stderr)
        return 1
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
    print(token.text)
    kind = "reusable until it expires" if record.reusable else "single-use"
    print(
        f"join token {record.id}: {kind}, expires {_when(expires)}. "
        "Start a node with: sdctl node --join-token TOKEN (or SDMESH_JOIN_TOKEN=TOKEN)",
        file=sys.stderr,
    )
    return 0


def remove_node(store: Store, args: Any) -> int:
    if not store.credentials.revoke_node(args.node, actor=_actor()):
        print(f"error: no enrolled node with id {quote(args.node)}", file=sys.stderr)
        return 1
    print(
        f"node {args.node} removed: its stream closes within seconds and its jobs go back "
        "to the queue; it needs a new join token to come back",
        file=sys.stderr,
    )
    return 0


def audit(store: Store, args: Any) -> int:
    since = None if args.since is None else store.clock() - args.since
    entries = store.credentials.audit_entries(limit=args.limit, since=since)
    if args.output == "json":
        _json(entries)
        return 0
    _table(
        ["TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"],
        [[_when(e.at), e.actor, e.action, e.target, e.detail] for e in entries],
    )
    return 0


def certs(args: Any) -> int:
    from sdmesh.tls import make_cluster_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    try:
        written = make_cluster_certs(
            Path(args.out), hosts, days=args.days, nodes=nodes, clients=clients
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in sorted(written.items()):
        print(f"{name:<16} {path}")
    print(
        f"made a CA and certificates for the scheduler ({', '.join(hosts)}), nodes and "
        f"clients in "
        f"{args.out}; keep ca-key.pem offline",
        file=sys.stderr,
    )
    return 0


STORE_COMMANDS: dict[str, Callable[[Store, Any], int]] = {
    "create-key": create_key,
    "list-keys": list_keys,
    "revoke-key": revoke_key,
    "join-token": join_token,
    "remove-node": remove_node,
    "audit": audit,
}


def run_admin(args: Any, database_url: str) -> int:
    if args.admin_command == "certs":
        return certs(args)
    store = Store(database_url)
    try:
        store.migrate()
        return STORE_COMMANDS[args.admin_command](store, args)
    except InvalidArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
