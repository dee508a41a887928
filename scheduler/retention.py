"""Retention, run by the leader in batches so that a first pass over years
of jobs does not hold the database:

- finished jobs (`--retain 30d`; 0 keeps every job) are deleted with their
  events and images once they ended that long ago, and with them the rows
  naming their input images;
- an uploaded input image no job of its owner names is deleted
  UNUSED_INPUT_SECONDS (a day) after it was last uploaded: time enough to
  upload and then submit, or to retry a failed submit, while an upload that
  is never used does not take disk for good. This runs whatever --retain
  says.

An input file goes once no owner's row names it, after the rows' commit.
"""

from __future__ import annotations

import asyncio
import logging

from scheduler.runtime import Runtime, UsesRuntime

log = logging.getLogger(__name__)

BATCH = 500
# Checked this often, or more often for a short retention.
CHECK_SECONDS = 60.0
UNUSED_INPUT_SECONDS = 86400.0


class Retention(UsesRuntime):
    def __init__(
        self,
        runtime: Runtime,
        retain_seconds: float,
        unused_input_seconds: float = UNUSED_INPUT_SECONDS,
    ) -> None:
        super().__init__(runtime)
        self.retain_seconds = retain_seconds  # 0: keep every job
        self.unused_input_seconds = unused_input_seconds

    @property
    def every(self) -> float:
        shortest = min(
            self.retain_seconds if self.retain_seconds > 0 else CHECK_SECONDS,
            self.unused_input_seconds,
        )
        return min(CHECK_SECONDS, max(0.5, shortest / 4))

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
                await self.sweep_inputs()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: next time
                log.warning("retention: %s", exc)
            await asyncio.sleep(self.every)

    async def sweep(self) -> int:
        """Deletes what has been finished for longer than the retention;
        returns how many jobs went."""
        if self.retain_seconds <= 0:
            return 0
        store = self.db.store
        cutoff = self.clock() - self.retain_seconds
        total = 0
        while ids := await self.db.run(store.removal.finished_before, cutoff, BATCH):
            deleted = await self.db.run(store.removal.delete_finished, ids)
            loop = asyncio.get_running_loop()
            for job_id in deleted.job_ids:
                await loop.run_in_executor(None, self.images.remove_job, job_id)
            await self.inputs.forget(self.db, deleted.inputs)
            total += len(deleted.job_ids)
            if len(ids) < BATCH:
                break
        if total:
            log.info(
                "retention: deleted %d job(s) that ended before the last %gs",
                total,
                self.retain_seconds,
            )
        return total

    async def sweep_inputs(self) -> int:
        """Deletes the uploads no job of their owner names, uploaded more
        than `unused_input_seconds` ago; returns how many files went."""
        cutoff = self.clock() - self.unused_input_seconds
        files = 0
        while shas := await self.db.run(self.db.store.inputs.unused_before, cutoff, BATCH):
            files += await self.inputs.forget(self.db, shas)
            if len(shas) < BATCH:
                break
        if files:
            log.info("retention: deleted %d unused input image(s)", files)
        return files
