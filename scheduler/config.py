"""The scheduler's settings, each declared once with its `sdctl scheduler`
flag (see `sdmesh.flags`). Light on purpose: sdctl imports it to build its
flags without loading the scheduler."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from sdmesh.flags import option, parse_duration

# A job that fits nowhere for this long gets a GPU held for it, so a stream
# of small jobs cannot starve it.
RESERVE_AFTER_SECONDS = 120.0


@dataclass(frozen=True)
class LivenessConfig:
    heartbeat_seconds: float = 2.0
    lease_seconds: float = 10.0
    # An attempt must report a step within max(this, deadline_steps x its
    # expected step time); the first step, which includes loading the
    # model, gets twice that.
    progress_deadline_seconds: float = 60.0
    deadline_steps: float = 10.0

    @property
    def probe_every_seconds(self) -> float:
        return 2 * self.heartbeat_seconds


# Alike jobs one GPU runs as one pipeline call, in images. Four SD-class
# images at 512 px fit any card that fits one with room to spare, and most
# of the gain on a GPU comes by then.
BATCH_MAX_IMAGES = 4


# Admission limits: far above what one person queues by hand, low enough
# that a runaway script cannot fill the database or the scheduler's memory.
MAX_QUEUED_PER_USER = 1000
MAX_QUEUED = 20000
SUBMIT_RATE = 50.0


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server listening on `host`."""
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name, or "" / 0.0.0.0 for every address
        return False


# The SQLite file in the data dir, when --db is not given.
DATABASE_FILE = "sdmesh.db"
# The replica's id, kept in its data dir (see scheduler.leadership).
REPLICA_ID_FILE = "replica-id"
# PostgreSQL goes through psycopg 3, the driver the scheduler extra ships;
# these spellings of its URL all mean it.
_POSTGRES_SCHEMES = ("postgresql+psycopg", "postgresql", "postgres")


def _hide_password(rest: str) -> str:
    """USER:SECRET@HOST... as USER:***@HOST..., for messages."""
    return re.sub(r"^([^/@:]*):[^/@]*@", r"\1:***@", rest)


def parse_database_url(text: str) -> str:
    """--db's value: `sqlite:///PATH`, or PostgreSQL as `postgresql://`,
    `postgres://` (as Heroku and many hosts write it) or
    `postgresql+psycopg://`, all read as psycopg 3. Raises ValueError saying
    what is allowed, never repeating a password."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or not rest:
        raise ValueError(
            "expected a database URL like postgresql://USER@HOST/DATABASE or "
            f"sqlite:///PATH, got {_hide_password(text)!r}"
        )
    if scheme in _POSTGRES_SCHEMES:
        return f"postgresql+psycopg://{rest}"
    if scheme == "sqlite":
        return f"sqlite://{rest}"
    if scheme.startswith(("postgresql+", "postgres+")):
        raise ValueError(
            f"{scheme}:// names a driver sdmesh does not ship; it talks to PostgreSQL through "
            f"psycopg 3: write postgresql://{_hide_password(rest)}"
        )
    raise ValueError(
        f"{scheme}:// is not a database sdmesh supports: use PostgreSQL "
        "(postgresql://USER@HOST/DATABASE), or leave --db out for SQLite in the data dir"
    )


def _at_least(low: int, value: int) -> int:
    if value < low:
        raise ValueError(f"must be at least {low}, got {value}")
    return value


@dataclass(frozen=True)
class SchedulerConfig:
    data_dir: Path = option(
        help="default ~/.local/share/sdmesh/scheduler", parse=Path, metavar="DIR"
    )
    host: str = option("127.0.0.1", help="listen address; 0.0.0.0 for other machines")
    port: int = option(50051, help="listen port (0: any free port)", parse=int)
    db_url: str = option(
        "",
        flag="--db",
        metavar="URL",
        parse=parse_database_url,
        help="PostgreSQL, as postgresql://USER@HOST/DATABASE (default: SQLite in the data dir)",
    )
    heartbeat_seconds: float = option(
        2.0, flag="--heartbeat", parse=parse_duration, help="agent stats interval (default 2s)"
    )
    # Agents silent this long are lost; so is a leader that cannot renew.
    lease_seconds: float = option(
        10.0,
        flag="--lease",
        parse=parse_duration,
        help="an agent silent this long is lost, its jobs re-queued; replicas hold the "
        "leader lease for as long (default 10s)",
    )
    progress_deadline_seconds: float = option(
        60.0,
        flag="--progress-deadline",
        parse=parse_duration,
        help="a running job must report a step this often, or 10x its step time if longer; "
        "else its GPU counts as hung (default 60s)",
    )
    node_window_seconds: float = option(
        24 * 3600.0,
        flag="--node-window",
        parse=parse_duration,
        help="how long a node's models count as known after it leaves (default 24h)",
    )
    max_attempts: int = option(
        3, parse=int, help="failures (out of memory, crashes, lost nodes) before a job fails"
    )
    reserve_after_seconds: float = option(
        RESERVE_AFTER_SECONDS,
        flag="--reserve-after",
        parse=parse_duration,
        help="hold a GPU for a job that fits nowhere for this long (default 120s)",
    )
    batch_max_images: int = option(
        BATCH_MAX_IMAGES,
        flag="--batch-max",
        parse=lambda text: _at_least(1, int(text)),
        help="images one GPU may run as one batch of alike jobs; 1 turns batching off "
        f"(default {BATCH_MAX_IMAGES})",
    )
    batch_wait_seconds: float = option(
        0.0,
        flag="--batch-wait",
        parse=parse_duration,
        help="how long a job that could run now may wait for an alike job to batch with "
        "(default 0: batch only what is already queued)",
    )
    advertise: str = option(
        "",
        metavar="HOST:PORT",
        help="where agents and clients reach this replica (default --host:--port)",
    )
    # Replicas must share it (a network filesystem), so that the leader can
    # serve images another replica stored. Default: images/ in the data dir.
    images_dir: Path | None = option(
        None,
        parse=Path,
        metavar="DIR",
        help="where images are stored; replicas on one database must share it "
        "(default: images/ in the data dir)",
    )

    # ---- security (see README, "Security") ----
    no_auth: bool = option(
        False,
        help="accept every caller without an API key and every agent without enrolling; "
        "only for a cluster nobody else can reach",
    )
    insecure: bool = option(
        False, help="allow plain-text gRPC on an address other machines can reach"
    )
    tls_cert: Path | None = option(
        None, parse=Path, metavar="PEM", help="serve TLS with this certificate"
    )
    tls_key: Path | None = option(None, parse=Path, metavar="PEM", help="the key of --tls-cert")
    client_ca: Path | None = option(
        None,
        parse=Path,
        metavar="PEM",
        help="require every peer (agents and clients) to present a certificate signed by this "
        "CA (mutual TLS); needs --tls-cert",
    )
    # ---- admission limits ----
    max_queued_per_user: int = option(
        MAX_QUEUED_PER_USER,
        parse=lambda text: _at_least(1, int(text)),
        help=f"jobs one user may have queued at once (default {MAX_QUEUED_PER_USER})",
    )
    max_queued: int = option(
        MAX_QUEUED,
        parse=lambda text: _at_least(1, int(text)),
        help=f"jobs queued at once, all users together (default {MAX_QUEUED})",
    )
    submit_rate: float = option(
        SUBMIT_RATE,
        parse=float,
        metavar="PER_SECOND",
        help=f"submits one API key (or, without keys, one user) may make per second, "
        f"in bursts of up to 2s worth (default {SUBMIT_RATE:g}; 0: no limit)",
    )
    retain_seconds: float = option(
        0.0,
        flag="--retain",
        parse=parse_duration,
        help="delete finished jobs and their images this long after they end, e.g. 30d "
        "(default 0: keep them)",
    )

    @property
    def database_url(self) -> str:
        """--db as given (`scheduler.store` reads it with
        `parse_database_url`), or SQLite in the data dir."""
        return self.db_url or f"sqlite:///{self.data_dir / DATABASE_FILE}"

    @property
    def liveness(self) -> LivenessConfig:
        return LivenessConfig(
            heartbeat_seconds=self.heartbeat_seconds,
            lease_seconds=self.lease_seconds,
            progress_deadline_seconds=self.progress_deadline_seconds,
        )
