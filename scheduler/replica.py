"""Who this scheduler replica is and whether it leads. Every replica sharing
a database has a stable id, kept in its data dir; the leader lease (see
scheduler.store.leader) decides which one is active."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


def load_replica_id(data_dir: Path) -> str:
    path = data_dir / "replica-id"
    if path.exists():
        text = path.read_text().strip()
        if text:
            return text
    replica_id = secrets.token_hex(8)
    path.write_text(replica_id + "\n")
    return replica_id


def package_version() -> str:
    """sdmesh's installed version; agents report it too."""
    try:
        return metadata.version("sdmesh")
    except metadata.PackageNotFoundError:
        return "dev"


@dataclass
class ReplicaState:
    replica_id: str
    address: str  # where agents and clients reach this replica
    leading: bool = False
    epoch: int = 0
    leader_address: str = ""  # as the lease last said

    def standby_message(self) -> str:
        where = (
            f"the active scheduler is at {self.leader_address}"
            if self.leader_address
            else ("no replica holds the leader lease yet")
        )
        return f"standby replica {self.replica_id} ({self.address}): {where}"
