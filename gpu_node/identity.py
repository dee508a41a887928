"""The agent's identity and its claim on its data dir.

The node id is made once and kept in `<data-dir>/node.json`, so the node
stays the same across restarts. A lock file (`sdmesh.datadir`) keeps a
second agent off the same data dir; the scheduler refuses a second live
agent with the same id, which catches copied data dirs too.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from sdmesh.domain import DeviceInfo


@dataclass(frozen=True)
class Identity:
    node_id: str
    name: str


def default_name(devices: list[DeviceInfo], hostname: str | None = None) -> str:
    """hostname-gpuN (hostname-gpu0-1 for several GPUs), or hostname-cpu."""
    host = (hostname or socket.gethostname()).split(".")[0] or "node"
    cuda = [device.index for device in devices if device.kind == "cuda"]
    if not cuda:
        return f"{host}-cpu"
    return f"{host}-gpu" + "-".join(str(index) for index in cuda)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return slug[:48] or "node"


def load_identity(data_dir: Path, name: str | None, devices: list[DeviceInfo]) -> Identity:
    """Reads the node id from the data dir, making one on first start. A
    --name given now replaces the remembered name."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "node.json"
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    chosen = name or stored.get("name") or default_name(devices)
    node_id = stored.get("node_id") or f"{_slug(chosen)}-{secrets.token_hex(3)}"
    if stored != {"node_id": node_id, "name": chosen}:
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({"node_id": node_id, "name": chosen}, indent=2) + "\n")
        partial.replace(path)
    return Identity(node_id, chosen)
