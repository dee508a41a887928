"""Remembered nodes and the models they reported, so that a restarted
scheduler still knows which models exist and which GPUs it has seen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa

from scheduler.domain import KnownModel, NodeRecord
from scheduler.store.leader import Fence
from scheduler.store.schema import models, nodes
from sdmesh.domain import DeviceInfo, ModelInfo, NodeInfo


class NodeRegistry:
    def __init__(self, engine: sa.Engine, fence: Fence, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.fence = fence
        self.clock = clock

    def upsert(self, info: NodeInfo) -> None:
        """Records a hello: the node's devices, labels and its current models."""
        now = self.clock()
        values: dict[str, Any] = {
            "name": info.name,
            "hostname": info.hostname,
            "agent_version": info.agent_version,
            "labels": dict(info.labels),
            "devices": [asdict(device) for device in info.devices],
            "last_seen": now,
        }
        with self.fence.begin() as conn:
            updated = conn.execute(
                sa.update(nodes).where(nodes.c.id == info.node_id).values(**values)
            ).rowcount
            if not updated:
                conn.execute(sa.insert(nodes).values(id=info.node_id, first_seen=now, **values))
            conn.execute(sa.delete(models).where(models.c.node_id == info.node_id))
            if info.models:
                conn.execute(
                    sa.insert(models),
                    [
                        {
                            "node_id": info.node_id,
                            "kind": model.kind or "base",
                            "name": model.name,
                            "weight_bytes": model.weight_bytes,
                            "dtype": model.dtype,
                            "family": model.family,
                            "sha256": model.sha256,
                            "last_seen": now,
                        }
                        for model in info.models
                    ],
                )

    def touch(self, node_ids: list[str]) -> None:
        """Marks nodes (and their models) as seen now: on disconnect, and
        periodically while they stay connected."""
        if not node_ids:
            return
        now = self.clock()
        with self.fence.begin() as conn:
            conn.execute(sa.update(nodes).where(nodes.c.id.in_(node_ids)).values(last_seen=now))
            conn.execute(
                sa.update(models).where(models.c.node_id.in_(node_ids)).values(last_seen=now)
            )

    def seen_since(self, since: float) -> list[NodeRecord]:
        with self.engine.connect() as conn:
            node_rows = conn.execute(
                sa.select(nodes).where(nodes.c.last_seen >= since).order_by(nodes.c.name)
            ).all()
            model_rows = conn.execute(
                sa.select(models).where(models.c.node_id.in_([row.id for row in node_rows]))
            ).all()
        by_node: dict[str, list[ModelInfo]] = {}
        for row in model_rows:
            by_node.setdefault(row.node_id, []).append(
                ModelInfo(row.name, row.weight_bytes, row.dtype, row.kind, row.family, row.sha256)
            )
        return [
            NodeRecord(
                info=NodeInfo(
                    node_id=row.id,
                    name=row.name,
                    hostname=row.hostname,
                    agent_version=row.agent_version,
                    devices=tuple(DeviceInfo(**device) for device in row.devices),
                    models=tuple(sorted(by_node.get(row.id, []), key=lambda m: m.name)),
                    labels=dict(row.labels),
                ),
                first_seen=row.first_seen,
                last_seen=row.last_seen,
            )
            for row in node_rows
        ]

    def models_seen_since(self, since: float) -> list[KnownModel]:
        """Every model some node reported since `since`, with the largest
        weight size any node gave for it."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(models).where(models.c.last_seen >= since).order_by(models.c.name)
            ).all()
        grouped: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            grouped.setdefault((row.kind, row.name), []).append(row)
        return [
            KnownModel(
                kind=kind,
                name=name,
                family=max(group, key=lambda row: row.weight_bytes).family,
                weight_bytes=max(row.weight_bytes for row in group),
                dtype=max(group, key=lambda row: row.weight_bytes).dtype,
                node_ids=tuple(sorted(row.node_id for row in group)),
                last_seen=max(row.last_seen for row in group),
            )
            for (kind, name), group in grouped.items()
        ]
