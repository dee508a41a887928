"""Input images (init images, masks, control images) on the scheduler's
disk: checked as they are uploaded, stored content-addressed, streamed to
the agents that run their jobs, and removed once no row names them.

An upload streams to a file under `<root>/partial` while it is hashed, and
is refused at the chunk that breaks a rule (an offset out of order, a
chunk over 1 MiB, more than MAX_INPUT_BYTES in all, a first few bytes that
are no PNG, JPEG or WebP). Complete, the picture's header is read (PIL
opens lazily) and its pixels checked before anything is decoded; then it
is decoded in full, so a truncated or corrupt file is refused. Only then is
its row recorded and the file renamed to `<root>/<sha[:2]>/<sha>`: the same
bytes uploaded twice are one file, and nothing half-written is ever at a
final path. A partial file is removed on any failure, and one left by a
scheduler that died is removed when a scheduler starts and finds it
untouched for an hour (replicas may share the folder, as they share the
images': an upload in flight writes its file at every chunk).

Files go only after the rows' transaction commits, and under one lock with
the uploads' "record the row, then place the file", so a file is never
removed while a row that was just written names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image, UnidentifiedImageError

from scheduler.images import ImageStore
from sdmesh.errors import InvalidArgument
from sdmesh.kinds import (
    INPUT_FORMATS,
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    SHA256,
    SIGNATURE_BYTES,
    InputInfo,
    image_format,
)
from sdmesh.wire import INPUT_CHUNK_BYTES

if TYPE_CHECKING:
    from scheduler.store import Database

FIELD = "image"
# A chunk of an upload: a quarter of the largest message the scheduler
# takes (sdmesh.wire.MAX_SERVER_RECEIVE_BYTES, 4 MiB), so a chunk and its
# framing always fit one message.
ALLOWED = "PNG, JPEG or WebP"
# A partial file nobody wrote to for this long was left by a dead scheduler.
STALE_PARTIAL_SECONDS = 3600.0


def inspect(path: Path, size_bytes: int, sha256: str) -> InputInfo:
    """The picture's format and size, from its header, checked against
    the limits before it is decoded; then decoded in full, so that a
    truncated or corrupt file is refused here rather than on a GPU."""
    try:
        with Image.open(path, formats=INPUT_FORMATS) as image:
            width, height = image.size
            if width * height > MAX_INPUT_PIXELS:
                raise InvalidArgument(
                    FIELD,
                    f"is {width}x{height}, {width * height} pixels; at most "
                    f"{MAX_INPUT_PIXELS} ({MAX_INPUT_PIXELS // 10**6} megapixels) are allowed",
                )
            # A camera's JPEG with more pictures in it (MPO) is a JPEG whose
            # first picture is the one anyone means.
            found = "JPEG" if image.format == "MPO" else str(image.format)
            if found not in INPUT_FORMATS:
                raise InvalidArgument(FIELD, f"must be {ALLOWED}, got {image.format}")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument(
            FIELD, f"has more pixels than the {MAX_INPUT_PIXELS} allowed"
        ) from None
    except UnidentifiedImageError:
        raise InvalidArgument(
            FIELD, f"must be a {ALLOWED} image; this one does not parse"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, InvalidArgument):
            raise
        raise InvalidArgument(
            FIELD, f"does not decode as {ALLOWED} (truncated or corrupt: {type(exc).__name__})"
        ) from None
    return InputInfo(sha256, size_bytes, width, height, found)


class _Partial:
    """An upload being received: its bytes on disk under a temporary
    name, hashed as they arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by finish or discard)
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = b""

    def add(self, offset: int, data: bytes) -> None:
        if offset != self.size:
            raise InvalidArgument(
                FIELD, f"chunk at offset {offset}, expected {self.size}: send the chunks in order"
            )
        if len(data) > INPUT_CHUNK_BYTES:
            raise InvalidArgument(
                FIELD, f"a chunk of {len(data)} bytes; each may be at most {INPUT_CHUNK_BYTES}"
            )
        if self.size + len(data) > MAX_INPUT_BYTES:
            raise InvalidArgument(
                FIELD,
                f"is larger than {MAX_INPUT_BYTES} bytes ({MAX_INPUT_BYTES // 2**20} MiB), "
                "the most an input may be",
            )
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)
        if len(self.head) < SIGNATURE_BYTES:
            self.head += data[: SIGNATURE_BYTES - len(self.head)]
            if len(self.head) >= SIGNATURE_BYTES and image_format(self.head) not in INPUT_FORMATS:
                raise InvalidArgument(
                    FIELD, f"must be a {ALLOWED} image; it starts with {self.head[:8]!r}"
                )

    def finish(self) -> InputInfo:
        """Closes the file and checks the picture."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if image_format(self.head) not in INPUT_FORMATS:
            raise InvalidArgument(
                FIELD, f"must be a {ALLOWED} image; got {self.size} bytes that are none"
            )
        return inspect(self.path, self.size, self.digest.hexdigest())

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class _SharedOrAlone:
    """A lock that uploads and submits hold shared and the removal of
    files alone: the scheduler's one leader does both, so a lock in its
    process orders them. A removal waiting keeps new holders out."""

    def __init__(self) -> None:
        self._alone = asyncio.Lock()
        self._holders = 0
        self._none = asyncio.Event()
        self._none.set()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._alone:  # not while a removal runs
            self._holders += 1
            self._none.clear()
        try:
            yield
        finally:
            self._holders -= 1
            if not self._holders:
                self._none.set()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._alone:
            await self._none.wait()
            yield


class InputFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial = root / "partial"
        self.partial.mkdir(parents=True, exist_ok=True)
        stale = time.time() - STALE_PARTIAL_SECONDS
        for path in self.partial.iterdir():
            with contextlib.suppress(OSError):  # another replica's may go meanwhile
                if path.stat().st_mtime < stale:
                    path.unlink()
        self._reader = ImageStore(root)  # reads a file one IMAGE_CHUNK_BYTES piece at a time
        self._files = _SharedOrAlone()

    @staticmethod
    def relative(sha256: str) -> str:
        if not SHA256.fullmatch(sha256):  # never a path from the network unchecked
            raise InvalidArgument("sha256", "must be 64 lowercase hex digits")
        return f"{sha256[:2]}/{sha256}"

    def path(self, sha256: str) -> Path:
        return self.root / self.relative(sha256)

    async def upload(
        self, db: Database, owner: str, chunks: AsyncIterator[tuple[int, bytes]]
    ) -> InputInfo:
        """Receives one upload, `(offset, data)` by chunk, for `owner`."""
        loop = asyncio.get_running_loop()
        partial = await loop.run_in_executor(
            None, _Partial, self.partial / f"{secrets.token_hex(8)}.part"
        )
        try:
            async for offset, data in chunks:
                await loop.run_in_executor(None, partial.add, offset, data)
            info = await loop.run_in_executor(None, partial.finish)
        except BaseException:
            await loop.run_in_executor(None, partial.discard)
            raise
        # Recording the row and placing the file finish together even when
        # the call is cancelled between them: a row never names no file.
        await asyncio.shield(self._keep(db, owner, info, partial))
        return info

    async def _keep(self, db: Database, owner: str, info: InputInfo, partial: _Partial) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with self._files.shared():
                await db.run(db.store.inputs.record, owner, info)
                await loop.run_in_executor(None, self._place, partial.path, info.sha256)
        finally:
            await loop.run_in_executor(None, partial.discard)  # a no-op once placed

    def keeping(self) -> AbstractAsyncContextManager[None]:
        """Held by a submit naming inputs, from its check to its commit:
        no file is removed meanwhile (several may hold it at once)."""
        return self._files.shared()

    def _place(self, partial: Path, sha256: str) -> None:
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(final)  # the same bytes again replace themselves

    async def forget(self, db: Database, shas: Collection[str]) -> int:
        """Removes the files of those inputs that no row names any more;
        called after the transaction that removed rows has committed.
        Returns how many files went."""
        if not shas:
            return 0
        loop = asyncio.get_running_loop()
        async with self._files.alone():
            kept = await db.run(db.store.inputs.stored, shas)
            gone = [sha for sha in shas if sha not in kept]
            return await loop.run_in_executor(None, self._remove, gone)

    def _remove(self, shas: Collection[str]) -> int:
        removed = 0
        for sha in shas:
            path = self.path(sha)
            if path.exists():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    async def stream(self, sha256: str) -> AsyncGenerator[bytes, None]:
        """The stored file's pieces in order, one read at a time."""
        async for piece in self._reader.stream(self.relative(sha256)):
            yield piece
