"""The scheduler's in-memory picture of the connected agents: who they are,
their GPUs' latest stats, health and drain state, and the stream each one
is sent commands on. It turns that picture, with the attempts bound to each
GPU (which `scheduler.attempts` owns), into the `GpuView` snapshots
placement works on.

No I/O and no clock: callers pass `now`. Commands for an agent are queued on
its session as domain objects; the gateway turns them into protobuf.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scheduler.commands import Command, DrainCommand, ResumeCommand
from scheduler.errors import FailedPrecondition, NotFound
from scheduler.placement import GpuView
from sdmesh.convert import unsound_numbers
from sdmesh.domain import DeviceStats, NodeInfo
from sdmesh.kinds import ModelKind
from sdmesh.spec import MemoryMode
from sdmesh.speeds import Speed

if TYPE_CHECKING:
    from scheduler.attempt_state import ActiveAttempt

log = logging.getLogger(__name__)

# Models a job loads beside its base model; placement counts them apart.
EXTRA_KINDS = frozenset({ModelKind.LORA.value, ModelKind.CONTROLNET.value})


@dataclass(eq=False)  # one per stream, compared and hashed by identity
class NodeSession:
    info: NodeInfo
    connected_at: float
    last_heard: float = 0.0  # by the scheduler's clock, never the agent's
    draining: bool = False
    unhealthy: dict[int, str] = field(default_factory=dict)  # GPU index -> why
    lost: str = ""  # set when its lease ran out: its attempts are lost at once
    stats: dict[int, DeviceStats] = field(default_factory=dict)
    stats_at: float = 0.0
    host_free_bytes: int = 0
    refused_stats: str = ""  # why its last stats were refused; logged when it changes
    outbox: asyncio.Queue[Command | None] = field(default_factory=asyncio.Queue)

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def name(self) -> str:
        return self.info.name

    def send(self, command: Command) -> None:
        self.outbox.put_nowait(command)

    def close(self) -> None:
        self.outbox.put_nowait(None)

    def gpu_views(self, now: float, held: Sequence[ActiveAttempt]) -> list[GpuView]:
        """Each GPU as placement sees it, with `held`, the attempts bound to
        this node, charged to their GPUs."""
        by_kind: dict[str, set[str]] = {}
        for model in self.info.models:
            by_kind.setdefault(model.kind, set()).add(model.name)
        models = frozenset(by_kind.get(ModelKind.BASE, ()))
        loras = frozenset(by_kind.get(ModelKind.LORA, ()))
        controlnets = frozenset(by_kind.get(ModelKind.CONTROLNET, ()))
        families = {(m.kind, m.name): m.family for m in self.info.models if m.family}
        views = []
        for device in self.info.devices:
            stats = self.stats.get(device.index)
            on_gpu = [a for a in held if a.gpu_index == device.index]
            # A job that had not started by the last report is not in its
            # numbers yet, whether it waits on the agent or was just assigned.
            pending = sum(
                a.vram_bytes
                for a in on_gpu
                if a.started_at is None or a.started_at >= self.stats_at
            )
            resident: tuple[str, ...] = ()
            resident_extras: frozenset[tuple[str, str]] = frozenset()
            speeds: dict[str, Speed] = {}
            if stats is None:
                free, utilization = device.total_bytes, 0.0
            else:
                # Resident models count as free: the worker reuses the one a
                # job needs, and evicts the others before it loads another.
                # A job's estimate holds its ControlNets' weights, so one
                # already loaded is counted once, as free here.
                free = stats.free_bytes + stats.resident_bytes
                resident = tuple(
                    model.name for model in stats.resident_models if model.kind not in EXTRA_KINDS
                )
                resident_extras = frozenset(
                    (model.kind, model.name)
                    for model in stats.resident_models
                    if model.kind in EXTRA_KINDS
                )
                speeds, utilization = dict(stats.speeds), stats.utilization_percent
            # When a new job's turn comes, the jobs bound here have loaded
            # their models too (those run in full mode): a worker keeps
            # several while they fit, evicting the least recently used.
            full = [a for a in on_gpu if a.memory_mode is MemoryMode.FULL]
            resident += tuple(a.spec.model for a in full)
            resident_extras |= {
                (ModelKind.CONTROLNET, unit.model) for a in full for unit in a.spec.controlnets
            }
            views.append(
                GpuView(
                    node_id=self.node_id,
                    node_name=self.info.name,
                    index=device.index,
                    total_bytes=device.total_bytes,
                    free_bytes=free - pending,
                    # A batch runs as one job: it takes one slot.
                    active_jobs=len({a.batch or a.job_id for a in on_gpu}),
                    bound_bytes=sum(a.vram_bytes for a in on_gpu),
                    busy_seconds=sum(a.remaining_seconds(now) for a in on_gpu),
                    models=models,
                    resident=frozenset(resident),
                    loras=loras,
                    controlnets=controlnets,
                    families=families,
                    resident_extras=frozenset(resident_extras),
                    speeds=speeds,
                    utilization_percent=utilization,
                    host_free_bytes=self.host_free_bytes,
                    labels=dict(self.info.labels),
                    healthy=device.index not in self.unhealthy,
                    draining=self.draining,
                )
            )
        return views


class Cluster:
    def __init__(self) -> None:
        self.sessions: dict[str, NodeSession] = {}
        self.version = 0  # moves on whenever a node connects or disconnects

    def connect(self, info: NodeInfo, now: float, *, draining: bool = False) -> NodeSession:
        if info.node_id in self.sessions:
            raise KeyError(info.node_id)
        session = NodeSession(info=info, connected_at=now, last_heard=now, draining=draining)
        self.sessions[info.node_id] = session
        self.version += 1
        return session

    def disconnect(self, session: NodeSession) -> None:
        """Forgets the session and ends its stream; what it held is for the
        attempts' owner to settle."""
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
            self.version += 1
        session.close()

    def report_stats(
        self, node_id: str, stats: list[DeviceStats], now: float, host_free_bytes: int = 0
    ) -> None:
        """A node's latest stats. A report with a NaN, infinite or negative
        number anywhere is refused whole, and the last sound one stays:
        placement must never rank GPUs on such numbers."""
        session = self.sessions.get(node_id)
        if session is None:
            return
        unsound = [
            *(found for device in stats for found in unsound_numbers(device, f"gpu{device.index}")),
            *unsound_numbers(host_free_bytes, "host_free_bytes"),
        ]
        if unsound:
            why = ", ".join(unsound)
            if why != session.refused_stats:  # once, not every heartbeat
                log.warning("node %s: stats refused: %s", session.name, why)
            session.refused_stats = why
            return
        session.refused_stats = ""
        session.stats = {device.index: device for device in stats}
        session.stats_at = now
        session.host_free_bytes = host_free_bytes

    def gpu_views(self, now: float, held: Mapping[str, Sequence[ActiveAttempt]]) -> list[GpuView]:
        """Every connected GPU; `held` maps a node id to its bound attempts."""
        return [
            view
            for session in self.sessions.values()
            for view in session.gpu_views(now, held.get(session.node_id, ()))
        ]

    def find(self, node: str) -> NodeSession:
        """The connected node with this id or name."""
        matches = [s for s in self.sessions.values() if node in (s.node_id, s.info.name)]
        if not matches:
            raise NotFound(f"node {node} is not connected")
        if len(matches) > 1:
            ids = ", ".join(sorted(session.node_id for session in matches))
            raise FailedPrecondition(f"{node} names several nodes ({ids}); use an id")
        return matches[0]

    def drain(self, session: NodeSession, timeout_seconds: float) -> None:
        """No new work for the node; what runs there finishes within the
        timeout (0: the agent's own) or is handed back."""
        session.draining = True
        session.send(DrainCommand(timeout_seconds))

    def resume(self, session: NodeSession) -> None:
        session.draining = False
        session.send(ResumeCommand())

    def models(self, kind: str = ModelKind.BASE) -> dict[str, int]:
        """Name -> the largest weight size a connected node reports, of the
        models of one kind (base models by default: an inpainting model or
        a LoRA is not something a job names as its model)."""
        return {name: size for (of, name), size in self.weights().items() if of == kind}

    def weights(self) -> dict[tuple[str, str], int]:
        """(kind, name) -> the largest weight size a connected node reports."""
        sizes: dict[tuple[str, str], int] = {}
        for session in self.sessions.values():
            for model in session.info.models:
                key = (model.kind, model.name)
                sizes[key] = max(sizes.get(key, 0), model.weight_bytes)
        return sizes

    def holders(self) -> dict[tuple[str, str], list[str]]:
        """(model kind, name) -> the connected nodes that hold it."""
        found: dict[tuple[str, str], list[str]] = {}
        for session in self.sessions.values():
            for model in session.info.models:
                found.setdefault((model.kind, model.name), []).append(session.node_id)
        return found
