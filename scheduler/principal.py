"""Who is calling. Until authentication exists, the user comes from the
`x-sdmesh-user` request metadata, which the SDK and sdctl set from --user,
SDMESH_USER or the OS login. The security work replaces only the interceptor
that fills this in."""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass

from sdmesh.errors import InvalidArgument
from sdmesh.wire import USER_METADATA_KEY

ANONYMOUS = "anonymous"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    user: str


_current: ContextVar[Principal] = ContextVar("principal", default=Principal(ANONYMOUS))  # noqa: B039 (frozen)


def current_principal() -> Principal:
    return _current.get()


def principal_from_metadata(metadata: tuple[tuple[str, str | bytes], ...]) -> Principal:
    for key, value in metadata:
        if key == USER_METADATA_KEY:
            user = value.decode() if isinstance(value, bytes) else value
            if not USER_NAME.match(user):
                raise InvalidArgument(
                    USER_METADATA_KEY,
                    "user must be 1-64 letters, digits, '.', '_', '@' or '-', "
                    f"starting with a letter or digit; got {user!r}",
                )
            return Principal(user)
    return Principal(ANONYMOUS)
