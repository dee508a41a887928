"""Finished PNGs on disk under the scheduler's data dir.

A file is written under a temporary name, flushed and renamed before the
database commit that references it, and removed again if that commit loses
(a cancelled job, a stale attempt). Paths carry the attempt, so two attempts
of one job never write the same file. A stored file is read back one
IMAGE_CHUNK_BYTES piece at a time, so a download holds one piece in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import BinaryIO

from sdmesh.wire import IMAGE_CHUNK_BYTES


class ImageReader:
    """One stored image, open for reading piece by piece; each `read_chunk`
    reads at most `chunk_bytes` from the file. A file removed while it is
    open still reads to its end."""

    def __init__(self, file: BinaryIO, chunk_bytes: int = IMAGE_CHUNK_BYTES) -> None:
        self._file = file
        self.chunk_bytes = chunk_bytes

    def read_chunk(self) -> bytes:
        """The next piece; b"" at the end."""
        return self._file.read(self.chunk_bytes)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        """Every piece in order; one empty piece for an empty file."""
        first = True
        while (data := self.read_chunk()) or first:
            first = False
            yield data
            if not data:
                return


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

    def open(self, relative: str) -> ImageReader:
        return ImageReader(open(self.root / relative, "rb"))

    async def stream(self, relative: str) -> AsyncGenerator[bytes, None]:
        """The stored image's pieces in order (one empty piece for an empty
        file), each read in the default executor as it is asked for."""
        loop = asyncio.get_running_loop()
        reader = await loop.run_in_executor(None, self.open, relative)
        try:
            first = True
            while (data := await loop.run_in_executor(None, reader.read_chunk)) or first:
                first = False
                yield data
                if not data:
                    return
        finally:
            reader.close()  # no await here: it runs when a cancelled download unwinds too
