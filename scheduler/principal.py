"""Who is calling. The auth interceptor (`scheduler.interceptors`) sets the
`Principal` of every call from its credentials: an API key names a user
(who may be an admin), a node credential names a node. With `--no-auth`
the user comes from the `x-sdmesh-user` metadata, which the SDK and sdctl
set from --user, SDMESH_USER or the OS login, and every caller may act on
every job, as before keys existed."""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass

from sdmesh.errors import InvalidArgument, quote
from sdmesh.wire import USER_METADATA_KEY

ANONYMOUS = "anonymous"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
USER_RULE = "1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Principal:
    user: str
    # May see and act on every job, and drain, undrain and remove nodes.
    admin: bool = False
    # The API key's id, when the caller presented one (the rate limit's key).
    key_id: str = ""
    # Set on an agent's calls: the node its credential was issued to.
    node_id: str = ""

    @property
    def limit_key(self) -> str:
        """Whose submit rate this call counts against."""
        return f"key:{self.key_id}" if self.key_id else f"user:{self.user}"

    def may_act_on(self, owner: str) -> bool:
        return self.admin or owner == self.user


# With --no-auth every caller is an admin of the cluster it can reach.
_current: ContextVar[Principal] = ContextVar(
    "principal",
    default=Principal(ANONYMOUS, admin=True),  # noqa: B039 (frozen)
)


# The labels an enrolled node's join token fixed, for its Connect.
_node_labels: ContextVar[dict[str, str]] = ContextVar("node_labels", default={})  # noqa: B039


def current_principal() -> Principal:
    return _current.get()


def current_node_labels() -> dict[str, str]:
    return _node_labels.get()


def check_user_name(user: str, field: str) -> str:
    if not USER_NAME.fullmatch(user):
        raise InvalidArgument(field, f"user must be {USER_RULE}; got {quote(user)}")
    return user


def unauthenticated_principal(user: str | None) -> Principal:
    """The caller without authentication (--no-auth): whoever
    `x-sdmesh-user` says (`user`, None when it was not sent), acting as an
    admin."""
    if user is None:
        return Principal(ANONYMOUS, admin=True)
    return Principal(check_user_name(user, USER_METADATA_KEY), admin=True)
