"""Reassembling chunked PNG uploads, and refusing broken ones."""

from __future__ import annotations

import hashlib

import pytest

from scheduler.uploads import UploadBuffer, UploadError
from sdmesh.domain import ImageChunk as Chunk
from sdmesh.domain import ImageInfo

DATA = bytes(range(256)) * 40


def send(
    buffer: UploadBuffer, index: int, data: bytes, *, chunk: int = 1000, **overrides: object
) -> None:
    for offset in range(0, len(data), chunk):
        last = offset + chunk >= len(data)
        fields = {
            "seed": 7 + index, "width": 64, "height": 64, "last": last,
            "sha256": hashlib.sha256(data).hexdigest() if last else "",
            "size_bytes": len(data) if last else 0,
        }  # fmt: skip
        fields.update(overrides)
        buffer.add(Chunk(index, offset, data[offset : offset + chunk], **fields))  # type: ignore[arg-type]


def test_chunks_come_back_as_whole_verified_images() -> None:
    buffer = UploadBuffer()
    send(buffer, 0, DATA)
    send(buffer, 1, DATA[:10])
    [(first, data0), (second, data1)] = buffer.complete(2)
    assert data0 == DATA
    assert data1 == DATA[:10]
    assert first == ImageInfo(0, 7, hashlib.sha256(DATA).hexdigest(), len(DATA), 64, 64)
    assert second.seed == 8


def test_a_missing_image_fails_completion() -> None:
    buffer = UploadBuffer()
    send(buffer, 0, DATA)
    with pytest.raises(UploadError, match="image 1 of 2 was not uploaded completely"):
        buffer.complete(2)


def test_a_wrong_digest_voids_the_upload() -> None:
    buffer = UploadBuffer()
    with pytest.raises(UploadError, match="does not match"):
        send(buffer, 0, DATA, sha256="0" * 64)
    with pytest.raises(UploadError, match="does not match"):
        buffer.complete(1)


def test_out_of_order_chunks_are_refused() -> None:
    buffer = UploadBuffer()
    with pytest.raises(UploadError, match="chunk at offset 1000, expected 0"):
        buffer.add(Chunk(0, 1000, b"x", seed=1, width=1, height=1))
