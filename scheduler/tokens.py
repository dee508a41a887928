"""The secrets sdmesh hands out, and how they are checked. Pure: no I/O.

Every secret reads `<kind>_<id>_<secret>`: `sdk` for an API key, `sdj` for
a node join token, `sdn` for a node's own credential. The id is public
(it names the row in lists, logs and the audit trail); the secret is 32
random bytes, shown once and stored only as its SHA-256. A slow hash would
add nothing: the secrets are random, not chosen by people, so there is no
dictionary to guess from.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

API_KEY = "sdk"
JOIN_TOKEN = "sdj"
NODE_CREDENTIAL = "sdn"
KINDS = {API_KEY: "API key", JOIN_TOKEN: "join token", NODE_CREDENTIAL: "node credential"}

_ID = re.compile(r"^[0-9a-f]{12}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")
# Longer text is never a token; nothing longer is hashed or parsed.
MAX_TOKEN_CHARS = 80


@dataclass(frozen=True)
class Token:
    kind: str
    id: str
    secret: str

    @property
    def text(self) -> str:
        return f"{self.kind}_{self.id}_{self.secret}"

    @property
    def secret_hash(self) -> str:
        return hash_secret(self.secret)


def new_token(kind: str) -> Token:
    return Token(kind, secrets.token_hex(6), secrets.token_urlsafe(32))


def parse_token(text: str, kind: str) -> Token | None:
    """The token in `text` if it is well formed and of `kind`, else None."""
    if len(text) > MAX_TOKEN_CHARS:
        return None
    prefix, _, rest = text.strip().partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != kind or not _ID.fullmatch(token_id) or not _SECRET.fullmatch(secret):
        return None
    return Token(kind, token_id, secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(token: Token, stored_hash: str) -> bool:
    return hmac.compare_digest(token.secret_hash, stored_hash)
