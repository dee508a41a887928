"""The VRAM figures the estimator learned, kept so that a restarted
scheduler does not have to run out of memory again to relearn them."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from scheduler.estimator import EstimateKey, LearnedPeak
from scheduler.store.leader import Fence
from scheduler.store.schema import vram_estimates
from sdmesh.spec import MemoryMode


class EstimateRegistry:
    def __init__(self, engine: sa.Engine, fence: Fence, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.fence = fence
        self.clock = clock

    def load(self) -> dict[EstimateKey, LearnedPeak]:
        """The learned VRAM figures, keyed as the estimator keys them."""
        with self.engine.connect() as conn:
            return {
                (
                    row.model,
                    row.size_bucket,
                    row.batch_size,
                    MemoryMode(row.memory_mode),
                    row.variant,
                ): (LearnedPeak(row.peak_bytes, row.pixels))
                for row in conn.execute(sa.select(vram_estimates))
            }

    def save(self, key: EstimateKey, learned: LearnedPeak) -> None:
        """Stores a learned figure unless a larger one is there already.
        One statement, so replicas and threads saving at once cannot clash."""
        model, bucket, batch_size, mode, variant = key
        insert = sqlite_insert if self.engine.dialect.name == "sqlite" else postgresql_insert
        statement = insert(vram_estimates).values(
            model=model,
            size_bucket=bucket,
            batch_size=batch_size,
            memory_mode=mode.value,
            variant=variant,
            peak_bytes=learned.peak_bytes,
            pixels=learned.pixels,
            updated_at=self.clock(),
        )
        statement = statement.on_conflict_do_update(
            index_elements=["model", "size_bucket", "batch_size", "memory_mode", "variant"],
            set_={
                "peak_bytes": statement.excluded.peak_bytes,
                "pixels": statement.excluded.pixels,
                "updated_at": statement.excluded.updated_at,
            },
            where=vram_estimates.c.peak_bytes < statement.excluded.peak_bytes,
        )
        with self.fence.begin() as conn:
            conn.execute(statement)
