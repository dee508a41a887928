"""Finished PNGs on disk under the scheduler's data dir.

A file is written under a temporary name, flushed and renamed before the
database commit that references it, and removed again if that commit loses
(a cancelled job, a stale attempt). Paths carry the attempt, so two attempts
of one job never write the same file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sdmesh.wire import IMAGE_CHUNK_BYTES


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, job_id: str, attempt: int, index: int, data: bytes) -> str:
        """Stores one PNG and returns its path relative to the root."""
        relative = f"{job_id[:2]}/{job_id}/a{attempt}-{index}.png"
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_suffix(".part")
        try:
            with open(partial, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            partial.replace(final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return relative

    def remove(self, relative_paths: list[str]) -> None:
        for relative in relative_paths:
            (self.root / relative).unlink(missing_ok=True)

    def remove_job(self, job_id: str) -> int:
        """Removes every file of a job that has no committed images: what a
        scheduler that died between writing a result and committing it left
        behind. Returns how many files went."""
        folder = self.root / job_id[:2] / job_id
        removed = 0
        if folder.is_dir():
            for path in folder.iterdir():
                path.unlink(missing_ok=True)
                removed += 1
            with contextlib.suppress(OSError):
                folder.rmdir()
        return removed

    def chunks(self, relative: str) -> list[bytes]:
        data = (self.root / relative).read_bytes()
        return [
            data[i : i + IMAGE_CHUNK_BYTES] for i in range(0, len(data), IMAGE_CHUNK_BYTES)
        ] or [b""]
