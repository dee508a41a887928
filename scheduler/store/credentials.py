"""API keys, join tokens, node credentials and the audit trail in the
database. `sdctl admin` writes here directly (as `kubeadm token create`
works on the control-plane host), and the scheduler reads the same rows;
so none of these writes goes through the leader fence: a key made while
no replica leads must still work.

Only the SHA-256 of each secret is stored (`scheduler.tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from scheduler.store.schema import api_keys, audit, join_tokens, node_credentials, nodes
from scheduler.tokens import API_KEY, JOIN_TOKEN, NODE_CREDENTIAL, Token, new_token, secret_matches
from sdmesh.errors import InvalidArgument, quote
from sdmesh.output import iso_time


@dataclass(frozen=True)
class KeyRecord:
    id: str
    user: str
    admin: bool
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    secret_hash: str = field(repr=False, default="")

    def problem(self, now: float) -> str | None:
        """Why this key cannot be used now, or None."""
        if self.revoked_at is not None:
            return f"API key {self.id} was revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return f"API key {self.id} has expired"
        return None


@dataclass(frozen=True)
class JoinTokenRecord:
    id: str
    reusable: bool
    labels: dict[str, str]
    created_at: float
    expires_at: float
    used_at: float | None
    revoked_at: float | None
    secret_hash: str = field(repr=False, default="")

    def problem(self, now: float) -> str | None:
        if self.revoked_at is not None:
            return f"join token {self.id} was revoked"
        if now >= self.expires_at:
            return f"join token {self.id} has expired"
        if not self.reusable and self.used_at is not None:
            return f"join token {self.id} was already used (it is single-use)"
        return None


@dataclass(frozen=True)
class NodeCredentialRecord:
    node_id: str
    token_id: str
    labels: dict[str, str]
    created_at: float
    revoked_at: float | None
    secret_hash: str = field(repr=False, default="")


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str
    detail: str


class EnrollRefused(Exception):
    """A join token that cannot enroll this node; the message says why."""


class NodeAlreadyEnrolled(Exception):
    pass


def _labels(value: Any) -> dict[str, str]:
    if isinstance(value, str):  # some drivers hand JSON back as text
        value = json.loads(value)
    return {str(k): str(v) for k, v in dict(value or {}).items()}


class CredentialRegistry:
    def __init__(self, engine: sa.Engine, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.clock = clock

    # ---- API keys ------------------------------------------------------

    def create_key(
        self, user: str, *, admin: bool, expires_at: float | None, actor: str
    ) -> tuple[KeyRecord, Token]:
        token = new_token(API_KEY)
        now = self.clock()
        record = KeyRecord(token.id, user, admin, now, expires_at, None, token.secret_hash)
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(api_keys).values(
                    id=token.id,
                    user_name=user,
                    admin=admin,
                    secret_hash=token.secret_hash,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            detail = f"user {user}{' (admin)' if admin else ''}" + (
                "" if expires_at is None else f", expires {iso_time(expires_at)}"
            )
            self._audit(conn, actor, "create-key", token.id, detail)
        return record, token

    def key(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        return None if row is None else self._key(row)

    def keys(self, *, include_revoked: bool = False) -> list[KeyRecord]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [self._key(row) for row in conn.execute(query)]

    def revoke_key(self, key_id: str, *, actor: str) -> bool:
        with self.engine.begin() as conn:
            revoked = conn.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            ).rowcount
            if revoked:
                self._audit(conn, actor, "revoke-key", key_id, "")
        return bool(revoked)

    @staticmethod
    def _key(row: Any) -> KeyRecord:
        return KeyRecord(
            row.id,
            row.user_name,
            bool(row.admin),
            row.created_at,
            row.expires_at,
            row.revoked_at,
            row.secret_hash,
        )

    # ---- join tokens and enrollment -----------------------------------

    def create_join_token(
        self, *, expires_at: float, reusable: bool, labels: Mapping[str, str], actor: str
    ) -> tuple[JoinTokenRecord, Token]:
        token = new_token(JOIN_TOKEN)
        now = self.clock()
        record = JoinTokenRecord(
            token.id, reusable, dict(labels), now, expires_at, None, None, token.secret_hash
        )
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(join_tokens).values(
                    id=token.id,
                    secret_hash=token.secret_hash,
                    reusable=reusable,
                    labels=dict(labels),
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            kind = "reusable" if reusable else "single-use"
            self._audit(
                conn,
                actor,
                "create-join-token",
                token.id,
                f"{kind}, expires {iso_time(expires_at)}",
            )
        return record, token

    def join_tokens(self) -> list[JoinTokenRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(join_tokens).order_by(join_tokens.c.created_at)).all()
        return [self._join_token(row) for row in rows]

    @staticmethod
    def _join_token(row: Any) -> JoinTokenRecord:
        return JoinTokenRecord(
            row.id,
            bool(row.reusable),
            _labels(row.labels),
            row.created_at,
            row.expires_at,
            row.used_at,
            row.revoked_at,
            row.secret_hash,
        )

    def enroll(self, token: Token, node_id: str, name: str) -> tuple[Token, dict[str, str]]:
        """Spends a join token on a node: issues its own credential and
        returns it with the labels the token fixes. Refuses a bad token
        (EnrollRefused) and a node id that holds a live credential
        (NodeAlreadyEnrolled): a token must not let anyone take over a
        node that is already in the cluster."""
        now = self.clock()
        credential = new_token(NODE_CREDENTIAL)
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(join_tokens).where(join_tokens.c.id == token.id).with_for_update()
            ).first()
            if row is None or not secret_matches(token, row.secret_hash):
                raise EnrollRefused("the join token is not valid")
            record = self._join_token(row)
            problem = record.problem(now)
            if problem is not None:
                raise EnrollRefused(problem)
            existing = conn.execute(
                sa.select(node_credentials.c.revoked_at).where(
                    node_credentials.c.node_id == node_id
                )
            ).first()
            if existing is not None and existing.revoked_at is None:
                raise NodeAlreadyEnrolled(
                    f"node {node_id} is already enrolled; remove it first "
                    "(sdctl admin remove-node) or start the agent with a fresh --data-dir"
                )
            conn.execute(sa.delete(node_credentials).where(node_credentials.c.node_id == node_id))
            conn.execute(
                sa.insert(node_credentials).values(
                    node_id=node_id,
                    secret_hash=credential.secret_hash,
                    token_id=token.id,
                    labels=record.labels,
                    created_at=now,
                )
            )
            if not record.reusable:
                conn.execute(
                    sa.update(join_tokens).where(join_tokens.c.id == token.id).values(used_at=now)
                )
            self._audit(conn, f"join-token:{token.id}", "enroll-node", node_id, f"name {name[:64]}")
        return credential, record.labels

    def node_credential(self, node_id: str) -> NodeCredentialRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(node_credentials).where(node_credentials.c.node_id == node_id)
            ).first()
        if row is None:
            return None
        return NodeCredentialRecord(
            row.node_id,
            row.token_id,
            _labels(row.labels),
            row.created_at,
            row.revoked_at,
            row.secret_hash,
        )

    def enrolled_node(self, node: str) -> str | None:
        """The id of the enrolled, unrevoked node with this id or, failing
        that, this name (as the scheduler last saw it), as `sdctl drain`
        takes either; None when there is none. A name several nodes share
        is refused: the id tells them apart."""
        enrolled = sa.select(node_credentials.c.node_id).where(
            node_credentials.c.revoked_at.is_(None)
        )
        with self.engine.connect() as conn:
            if conn.execute(enrolled.where(node_credentials.c.node_id == node)).first():
                return node
            named = sorted(
                row.node_id
                for row in conn.execute(
                    enrolled.where(
                        node_credentials.c.node_id.in_(
                            sa.select(nodes.c.id).where(nodes.c.name == node)
                        )
                    )
                )
            )
        if len(named) > 1:
            raise InvalidArgument(
                "NODE", f"{quote(node)} names several nodes ({', '.join(named)}); give the id"
            )
        return named[0] if named else None

    def revoke_node(self, node_id: str, *, actor: str) -> bool:
        with self.engine.begin() as conn:
            revoked = conn.execute(
                sa.update(node_credentials)
                .where(
                    node_credentials.c.node_id == node_id, node_credentials.c.revoked_at.is_(None)
                )
                .values(revoked_at=self.clock())
            ).rowcount
            if revoked:
                self._audit(conn, actor, "remove-node", node_id, "")
        return bool(revoked)

    def revoked_nodes_since(self, since: float) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(node_credentials.c.node_id).where(node_credentials.c.revoked_at >= since)
            ).all()
        return [row.node_id for row in rows]

    # ---- the audit trail -------------------------------------------------

    def record(self, actor: str, action: str, target: str, detail: str = "") -> None:
        with self.engine.begin() as conn:
            self._audit(conn, actor, action, target, detail)

    def _audit(
        self, conn: sa.Connection, actor: str, action: str, target: str, detail: str
    ) -> None:
        conn.execute(
            sa.insert(audit).values(
                at=self.clock(),
                actor=actor[:80],
                action=action[:32],
                target=target[:128],
                detail=detail[:1000],
            )
        )

    def audit_entries(self, *, limit: int = 100, since: float | None = None) -> list[AuditEntry]:
        """The newest entries, oldest first."""
        query = sa.select(audit).order_by(audit.c.id.desc()).limit(limit)
        if since is not None:
            query = query.where(audit.c.at >= since)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            AuditEntry(row.id, row.at, row.actor, row.action, row.target, row.detail)
            for row in reversed(rows)
        ]
