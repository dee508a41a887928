"""Reassembles the PNGs an agent uploads in chunks, and checks each one's
size and sha256 before anything is stored."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from sdmesh.domain import ImageChunk, ImageInfo

MAX_IMAGE_BYTES = 64 * 2**20


class UploadError(Exception):
    pass


@dataclass
class _Image:
    seed: int
    width: int
    height: int
    data: bytearray = field(default_factory=bytearray)
    meta: ImageInfo | None = None  # set by the last chunk, once verified


class UploadBuffer:
    """The images of one attempt, as their chunks arrive in order."""

    def __init__(self) -> None:
        self._images: dict[int, _Image] = {}
        self.error: str | None = None  # the first problem; the upload is void after it

    def add(self, chunk: ImageChunk) -> None:
        if self.error is not None:
            raise UploadError(self.error)
        try:
            self._add(chunk)
        except UploadError as exc:
            self.error = str(exc)
            raise

    def _add(self, chunk: ImageChunk) -> None:
        index = chunk.index
        image = self._images.setdefault(index, _Image(chunk.seed, chunk.width, chunk.height))
        if image.meta is not None:
            raise UploadError(f"image {index} was already complete")
        if chunk.offset != len(image.data):
            raise UploadError(
                f"image {index}: chunk at offset {chunk.offset}, expected {len(image.data)}"
            )
        if chunk.offset + len(chunk.data) > MAX_IMAGE_BYTES:
            raise UploadError(f"image {index} is larger than {MAX_IMAGE_BYTES} bytes")
        image.data += chunk.data
        if not chunk.last:
            return
        if len(image.data) != chunk.size_bytes:
            raise UploadError(
                f"image {index}: got {len(image.data)} bytes, expected {chunk.size_bytes}"
            )
        digest = hashlib.sha256(image.data).hexdigest()
        if digest != chunk.sha256:
            raise UploadError(f"image {index}: sha256 {digest} does not match {chunk.sha256}")
        image.meta = ImageInfo(
            index, image.seed, digest, chunk.size_bytes, image.width, image.height
        )

    def complete(self, expected: int) -> list[tuple[ImageInfo, bytes]]:
        """All `expected` images, verified, by index; raises UploadError if
        any is missing or unfinished."""
        if self.error is not None:
            raise UploadError(self.error)
        done = []
        for index in range(expected):
            image = self._images.get(index)
            if image is None or image.meta is None:
                raise UploadError(f"image {index} of {expected} was not uploaded completely")
            done.append((image.meta, bytes(image.data)))
        return done
