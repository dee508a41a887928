"""What agents upload, checked as it arrives: the PNGs of an attempt,
reassembled from their chunks, and the previews.

Nothing an agent says is taken on trust. An image must be one its job
asked for (its index among batch_size * n_iter, its seed, and the job's
output size: the hires fix's final size when it has one), no larger than a
PNG of that size can be, and a PNG whose header (IHDR) has exactly that
width and height. Each chunk is checked before its bytes are kept, and the
header as soon as its 33 bytes are in, so a forged upload is refused at its
first chunk and a long one at the cap: memory never holds more than the cap
of each image the job declared, nor MAX_ATTEMPT_BYTES for all of them. The header is read, never decompressed, so a
PNG bomb costs nothing.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from sdmesh.domain import ImageChunk, ImageInfo, Preview, Progress
from sdmesh.spec import MAX_SIZE, JobSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_HEADER_BYTES = 33  # the signature, then the IHDR chunk: length, type, 13 bytes, CRC
MAX_PIXELS = MAX_SIZE * MAX_SIZE  # the largest picture any job may ask for
# Room in a PNG beyond its pixels: the infotext (both prompts, up to 4000
# characters each, 4 bytes a character in UTF-8) and the chunks' framing.
PNG_OVERHEAD_BYTES = 256 * 1024
# The hard cap, whatever the size: 2048x2048 (the largest output, hires fix
# included) needs ~17 MiB by the formula below.
MAX_IMAGE_BYTES = 32 * 2**20
# What one attempt's images may hold together: 64 images (the most a job
# may have) of 2048x2048 are ~800 MiB as PNGs of pure noise, real pictures
# a good deal less; a forged upload stops here, not at 64 caps.
MAX_ATTEMPT_BYTES = 1024 * 2**20
# Previews are 128 px at most on the agent (gpu_node/preview.py), ~50 KiB
# as PNG at worst; these leave room for other agents' choices. Every open
# watch stream may hold a preview or two in flight, so this also sets what
# a thousand watchers that never read can cost (scheduler/service.py).
MAX_PREVIEW_BYTES = 128 * 1024
MAX_PREVIEW_SIDE = 512


class UploadError(Exception):
    pass


def max_png_bytes(width: int, height: int) -> int:
    """The most a PNG of width x height may weigh: its rows as 8-bit RGBA
    with their filter byte, stored uncompressed (the agents write RGB, so
    this is more than they ever send), deflate's framing, the overhead."""
    raw = (width * 4 + 1) * height
    return min(MAX_IMAGE_BYTES, raw + raw // 64 + PNG_OVERHEAD_BYTES)


def png_size(header: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's first 33 bytes: the signature and the
    IHDR chunk, its CRC checked. Raises UploadError saying what is wrong."""
    if len(header) < PNG_HEADER_BYTES:
        raise UploadError(f"is not a PNG: {len(header)} bytes, too short for a PNG header")
    if header[:8] != PNG_SIGNATURE:
        raise UploadError(f"is not a PNG: it starts with {header[:8]!r}")
    length, kind = struct.unpack(">I4s", header[8:16])
    if kind != b"IHDR" or length != 13:
        raise UploadError("is not a PNG: its first chunk is not a 13-byte IHDR")
    (crc,) = struct.unpack(">I", header[29:33])
    if zlib.crc32(header[12:29]) != crc:
        raise UploadError("is not a PNG: its IHDR's CRC does not match")
    width, height = struct.unpack(">II", header[16:24])
    if width == 0 or height == 0:
        raise UploadError(f"is not a PNG: its header says {width}x{height}")
    return width, height


def check_png_header(header: bytes, width: int, height: int) -> None:
    """A PNG of exactly width x height, within the pixels any job may ask
    for; from its header alone."""
    found_width, found_height = png_size(header)
    if found_width * found_height > MAX_PIXELS:
        raise UploadError(
            f"is a {found_width}x{found_height} PNG: {found_width * found_height} pixels, "
            f"more than the {MAX_PIXELS} a job may have"
        )
    if (found_width, found_height) != (width, height):
        raise UploadError(f"is a {found_width}x{found_height} PNG, not {width}x{height}")


def report_problem(report: Progress | Preview) -> str:
    """Why a progress report or a preview is refused, or "" when it may go
    to watchers. A preview must be a small PNG of the size it says, checked
    from its header: watchers decode it."""
    if not 0 <= report.step <= report.total_steps:
        return f"step {report.step} of {report.total_steps}"
    return preview_problem(report) if isinstance(report, Preview) else ""


def preview_problem(preview: Preview) -> str:
    if len(preview.png) > MAX_PREVIEW_BYTES:
        return f"{len(preview.png)} bytes, more than the {MAX_PREVIEW_BYTES} a preview may take"
    if not (0 < preview.width <= MAX_PREVIEW_SIDE and 0 < preview.height <= MAX_PREVIEW_SIDE):
        return f"{preview.width}x{preview.height}, more than {MAX_PREVIEW_SIDE} px a side"
    try:
        check_png_header(preview.png[:PNG_HEADER_BYTES], preview.width, preview.height)
    except UploadError as exc:
        return str(exc)
    return ""


@dataclass
class _Image:
    data: bytearray = field(default_factory=bytearray)
    digest: Any = field(default_factory=hashlib.sha256)
    header_checked: bool = False
    meta: ImageInfo | None = None  # set by the last chunk, once verified


class UploadBuffer:
    """The images of one attempt of a job with `spec`, as their chunks
    arrive in order. After the first problem the upload is void: what it
    held is dropped, and every later chunk is refused."""

    def __init__(self, spec: JobSpec) -> None:
        self._width, self._height = spec.output_size
        self._seeds = spec.seeds
        self.max_image_bytes = max_png_bytes(self._width, self._height)
        self._images: dict[int, _Image] = {}
        self.error: str | None = None  # the first problem
        self.held_bytes = 0

    def add(self, chunk: ImageChunk) -> None:
        if self.error is not None:
            raise UploadError(self.error)
        try:
            self._add(chunk)
        except UploadError as exc:
            self.error = str(exc)
            self._images.clear()  # nothing of a void upload is kept
            self.held_bytes = 0
            raise

    def _add(self, chunk: ImageChunk) -> None:
        index, count = chunk.index, len(self._seeds)
        if not 0 <= index < count:
            raise UploadError(f"image {index}: the job has {count} image(s)")
        declared = (chunk.seed, chunk.width, chunk.height)
        expected = (self._seeds[index], self._width, self._height)
        if declared != expected:
            raise UploadError(
                f"image {index}: seed {chunk.seed}, {chunk.width}x{chunk.height}; "
                f"the job asked for seed {expected[0]}, {self._width}x{self._height}"
            )
        image = self._images.setdefault(index, _Image())
        if image.meta is not None:
            raise UploadError(f"image {index} was already complete")
        if chunk.offset != len(image.data):
            raise UploadError(
                f"image {index}: chunk at offset {chunk.offset}, expected {len(image.data)}"
            )
        if chunk.offset + len(chunk.data) > self.max_image_bytes:
            raise UploadError(
                f"image {index} is larger than {self.max_image_bytes} bytes, "
                f"the most a {self._width}x{self._height} PNG may take"
            )
        if self.held_bytes + len(chunk.data) > MAX_ATTEMPT_BYTES:
            raise UploadError(
                f"image {index}: the job's images pass {MAX_ATTEMPT_BYTES} bytes together"
            )
        image.data += chunk.data
        self.held_bytes += len(chunk.data)
        image.digest.update(chunk.data)
        if not image.header_checked and (len(image.data) >= PNG_HEADER_BYTES or chunk.last):
            try:
                check_png_header(bytes(image.data[:PNG_HEADER_BYTES]), self._width, self._height)
            except UploadError as exc:
                raise UploadError(f"image {index} {exc}") from None
            image.header_checked = True
        if not chunk.last:
            return
        if len(image.data) != chunk.size_bytes:
            raise UploadError(
                f"image {index}: got {len(image.data)} bytes, expected {chunk.size_bytes}"
            )
        digest = image.digest.hexdigest()
        if digest != chunk.sha256:
            raise UploadError(f"image {index}: sha256 {digest} does not match {chunk.sha256}")
        image.meta = ImageInfo(
            index, self._seeds[index], digest, len(image.data), self._width, self._height
        )

    def complete(self) -> list[tuple[ImageInfo, bytes]]:
        """Every image of the job, verified, by index; raises UploadError if
        any is missing or unfinished."""
        if self.error is not None:
            raise UploadError(self.error)
        done = []
        count = len(self._seeds)
        for index in range(count):
            image = self._images.get(index)
            if image is None or image.meta is None:
                raise UploadError(f"image {index} of {count} was not uploaded completely")
            done.append((image.meta, bytes(image.data)))
        return done
