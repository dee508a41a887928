"""Stored PNGs are read back one IMAGE_CHUNK_BYTES piece at a time, never
the whole file at once."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from scheduler.images import ImageReader, ImageStore
from sdmesh.wire import IMAGE_CHUNK_BYTES

CHUNK = IMAGE_CHUNK_BYTES


class SpyFile(io.BytesIO):
    """A file that records the size of every read asked of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int | None] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.reads.append(size)
        return super().read(size)


def test_the_reader_reads_one_piece_per_call() -> None:
    data = bytes(range(256)) * (CHUNK * 5 // 2 // 256)  # 2.5 pieces
    spy = SpyFile(data)
    reader = ImageReader(spy)
    assert reader.read_chunk() == data[:CHUNK]
    assert spy.reads == [CHUNK]  # one piece asked for, not the file
    with reader:
        rest = list(reader)
    assert [len(piece) for piece in rest] == [CHUNK, CHUNK // 2]
    assert data[:CHUNK] + b"".join(rest) == data
    assert spy.reads == [CHUNK] * 4  # the last read finds the end
    assert spy.closed


@pytest.mark.parametrize(
    ("size", "pieces"), [(0, [0]), (10, [10]), (CHUNK, [CHUNK]), (2 * CHUNK + 1, [CHUNK, CHUNK, 1])]
)
def test_a_stored_image_streams_in_pieces(tmp_path: Path, size: int, pieces: list[int]) -> None:
    store = ImageStore(tmp_path)
    data = bytes(i % 251 for i in range(size))
    path = store.write("abcdef", 1, 0, data)

    async def read_all() -> list[bytes]:
        return [piece async for piece in store.stream(path)]

    streamed = asyncio.run(read_all())
    assert [len(piece) for piece in streamed] == pieces  # an empty file is one empty piece
    assert b"".join(streamed) == data


def test_the_stream_reads_only_as_far_as_it_was_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ImageStore(tmp_path)
    spy = SpyFile(bytes(3 * CHUNK))
    monkeypatch.setattr(store, "open", lambda relative: ImageReader(spy))

    async def first_piece() -> None:
        stream = store.stream("any.png")
        assert len(await anext(stream)) == CHUNK
        assert spy.reads == [CHUNK]
        await stream.aclose()  # a download given up: the file is closed
        assert spy.closed

    asyncio.run(first_piece())
