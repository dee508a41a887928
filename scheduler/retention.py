"""Retention (`--retain 30d`): finished jobs are deleted with their events
and images once they ended that long ago. Runs on the leader, in batches,
so that a first pass over years of jobs does not hold the database."""

from __future__ import annotations

import asyncio
import logging

from scheduler.runtime import Runtime, UsesRuntime

log = logging.getLogger(__name__)

BATCH = 500
# Checked this often, or more often for a short retention.
CHECK_SECONDS = 60.0


class Retention(UsesRuntime):
    def __init__(self, runtime: Runtime, retain_seconds: float) -> None:
        super().__init__(runtime)
        self.retain_seconds = retain_seconds  # 0: keep every job

    @property
    def every(self) -> float:
        return min(CHECK_SECONDS, max(0.5, self.retain_seconds / 4))

    async def run(self) -> None:
        if self.retain_seconds <= 0:
            return
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: next time
                log.warning("retention: %s", exc)
            await asyncio.sleep(self.every)

    async def sweep(self) -> int:
        """Deletes what has been finished for longer than the retention;
        returns how many jobs went."""
        store = self.db.store
        cutoff = self.clock() - self.retain_seconds
        total = 0
        while ids := await self.db.run(store.removal.finished_before, cutoff, BATCH):
            deleted = await self.db.run(store.removal.delete_finished, ids)
            loop = asyncio.get_running_loop()
            for job_id in deleted:
                await loop.run_in_executor(None, self.images.remove_job, job_id)
            total += len(deleted)
            if len(ids) < BATCH:
                break
        if total:
            log.info(
                "retention: deleted %d job(s) that ended before the last %gs",
                total,
                self.retain_seconds,
            )
        return total
