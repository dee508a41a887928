"""Reassembling chunked PNG uploads, and refusing broken or forged ones as
their chunks arrive: a PNG of the job's output size (the hires fix's final
size when it has one), of the images it asked for (batch_size * n_iter),
no larger than such a PNG can be, nor all of them past the attempt's cap."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from scheduler import uploads
from scheduler.uploads import (
    MAX_IMAGE_BYTES,
    MAX_PREVIEW_BYTES,
    UploadBuffer,
    UploadError,
    max_png_bytes,
    png_size,
    report_problem,
)
from sdmesh.domain import ImageChunk as Chunk
from sdmesh.domain import ImageInfo, Preview, Progress
from sdmesh.wire import IMAGE_CHUNK_BYTES
from tests.factories import make_png, make_spec, png_chunk, png_header

SPEC = make_spec(width=64, height=64, seed=7, batch_size=2)
DATA = make_png(64, 64, shade=3)


def chunks(index: int, data: bytes, *, chunk: int = 1000, **overrides: object) -> Iterator[Chunk]:
    for offset in range(0, len(data), chunk) or range(1):
        last = offset + chunk >= len(data)
        fields = {
            "seed": SPEC.seed + index, "width": 64, "height": 64, "last": last,
            "sha256": hashlib.sha256(data).hexdigest() if last else "",
            "size_bytes": len(data) if last else 0,
        }  # fmt: skip
        fields.update(overrides)
        yield Chunk(index, offset, data[offset : offset + chunk], **fields)  # type: ignore[arg-type]


def send(buffer: UploadBuffer, index: int, data: bytes, **options: object) -> None:
    for piece in chunks(index, data, **options):  # type: ignore[arg-type]
        buffer.add(piece)


def test_chunks_come_back_as_whole_verified_images() -> None:
    buffer = UploadBuffer(SPEC)
    other = make_png(64, 64, shade=9)
    send(buffer, 0, DATA)
    send(buffer, 1, other, chunk=7)
    [(first, data0), (second, data1)] = buffer.complete()
    assert (data0, data1) == (DATA, other)
    assert first == ImageInfo(0, 7, hashlib.sha256(DATA).hexdigest(), len(DATA), 64, 64)
    assert second.seed == 8


def test_a_missing_image_fails_completion() -> None:
    buffer = UploadBuffer(SPEC)
    send(buffer, 0, DATA)
    with pytest.raises(UploadError, match="image 1 of 2 was not uploaded completely"):
        buffer.complete()


def test_a_wrong_digest_voids_the_upload_and_drops_what_it_held() -> None:
    buffer = UploadBuffer(SPEC)
    send(buffer, 1, DATA)
    with pytest.raises(UploadError, match="does not match"):
        send(buffer, 0, DATA, sha256="0" * 64)
    assert buffer.held_bytes == 0
    with pytest.raises(UploadError, match="does not match"):
        buffer.complete()
    with pytest.raises(UploadError, match="does not match"):  # and every chunk after it
        send(buffer, 1, DATA)


def test_out_of_order_chunks_are_refused() -> None:
    buffer = UploadBuffer(SPEC)
    with pytest.raises(UploadError, match="chunk at offset 1000, expected 0"):
        buffer.add(Chunk(0, 1000, b"x", seed=7, width=64, height=64))


@pytest.mark.parametrize(
    ("index", "overrides", "message"),
    [
        (2, {}, "image 2: the job has 2 image"),  # more images than the batch
        (-1, {}, "image -1: the job has 2 image"),
        (0, {"seed": 99}, "image 0: seed 99, 64x64; the job asked for seed 7, 64x64"),
        (1, {"width": 50000, "height": 50000}, "seed 8, 50000x50000; the job asked for"),
    ],
)
def test_images_the_job_did_not_ask_for_are_refused(
    index: int, overrides: dict[str, object], message: str
) -> None:
    buffer = UploadBuffer(SPEC)
    with pytest.raises(UploadError, match=message):
        send(buffer, index, DATA, **{"seed": SPEC.seed + index, **overrides})
    assert buffer.held_bytes == 0


# The forged uploads a rogue agent tried, each labelled as the job's 64x64:
FORGED = {
    "a PNG of another size": (make_png(32, 64), "image 0 is a 32x64 PNG, not 64x64"),
    "HTML": (b"<html><body>" + b"x" * 4000 + b"</body></html>", "image 0 is not a PNG: it starts"),
    "a PNG bomb's header": (
        png_header(50000, 50000) + png_chunk(b"IDAT", b"\x78\x9c" + b"\x00" * 5000),
        "image 0 is a 50000x50000 PNG: 2500000000 pixels, more than the 4194304",
    ),
    "a damaged header": (DATA[:29] + b"\x00\x00\x00\x00" + DATA[33:], "IHDR's CRC does not match"),
    "a stub": (DATA[:20], "image 0 is not a PNG: 20 bytes, too short"),
    "nothing": (b"", "image 0 is not a PNG: 0 bytes"),
}


@pytest.mark.parametrize("name", FORGED)
def test_a_forged_image_is_refused_at_its_first_chunk(name: str) -> None:
    data, message = FORGED[name]
    buffer = UploadBuffer(SPEC)
    pieces = chunks(0, data)
    with pytest.raises(UploadError, match=message):
        buffer.add(next(pieces))
    assert buffer.held_bytes == 0


def noise(total: int) -> Iterator[Chunk]:
    """`total` bytes of noise behind a real 64x64 PNG header, in the
    agents' chunk size, made one chunk at a time."""
    offset = 0
    while offset < total:
        data = os.urandom(IMAGE_CHUNK_BYTES)
        if offset == 0:
            data = png_header(64, 64) + data[33:]
        yield Chunk(0, offset, data, seed=7, width=64, height=64)
        offset += len(data)


def test_noise_longer_than_the_job_s_png_can_be_is_refused_as_it_arrives() -> None:
    buffer = UploadBuffer(SPEC)
    cap = max_png_bytes(64, 64)
    # (64 * 4 + 1) * 64 = 16448 raw, + 16448 // 64 = 257, + 256 KiB overhead
    assert cap == 16448 + 257 + 256 * 1024
    taken, refused = 0, ""
    for piece in noise(60 * 2**20):
        try:
            buffer.add(piece)
        except UploadError as exc:
            refused = str(exc)
            break
        taken += 1
        assert buffer.held_bytes <= cap  # never more than the cap in memory
    assert refused == f"image 0 is larger than {cap} bytes, the most a 64x64 PNG may take"
    assert taken == cap // IMAGE_CHUNK_BYTES  # refused at the first chunk past the cap
    assert buffer.held_bytes == 0


def test_the_cap_follows_the_size_up_to_a_hard_one() -> None:
    # 2048x2048: (2048 * 4 + 1) * 2048 = 16779264, + 262176, + 262144 = ~16.4 MiB
    assert max_png_bytes(2048, 2048) == 16779264 + 262176 + 262144
    assert max_png_bytes(2048, 2048) < MAX_IMAGE_BYTES
    assert max_png_bytes(100_000, 100_000) == MAX_IMAGE_BYTES


def test_a_hires_job_s_images_are_its_final_size() -> None:
    spec = make_spec(width=64, height=64, seed=7, enable_hr=True, hr_scale=1.5)
    assert spec.output_size == (96, 96)  # 64 * 1.5, a multiple of 8
    buffer = UploadBuffer(spec)
    send(buffer, 0, make_png(96, 96), width=96, height=96)
    [(info, _)] = buffer.complete()
    assert (info.width, info.height) == (96, 96)
    assert buffer.max_image_bytes == max_png_bytes(96, 96)

    first_pass = UploadBuffer(spec)  # the first pass's size is not the result
    with pytest.raises(UploadError, match="64x64; the job asked for seed 7, 96x96"):
        send(first_pass, 0, DATA)
    with pytest.raises(UploadError, match="image 0 is a 64x64 PNG, not 96x96"):
        send(UploadBuffer(spec), 0, DATA, width=96, height=96)


def test_a_job_of_several_batches_has_batch_size_times_n_iter_images() -> None:
    spec = make_spec(seed=7, batch_size=2, n_iter=3)
    buffer = UploadBuffer(spec)
    for index in range(6):
        send(buffer, index, make_png(64, 64, shade=index), seed=7 + index)
    assert [info.seed for info, _ in buffer.complete()] == [7, 8, 9, 10, 11, 12]
    with pytest.raises(UploadError, match="image 6: the job has 6 image"):
        send(UploadBuffer(spec), 6, DATA, seed=13)


def test_an_attempt_s_images_together_stop_at_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "MAX_ATTEMPT_BYTES", len(DATA) + 10)
    buffer = UploadBuffer(SPEC)
    send(buffer, 0, DATA)
    with pytest.raises(UploadError, match="the job's images pass"):
        send(buffer, 1, DATA)
    assert buffer.held_bytes == 0


def test_the_header_is_read_without_decoding() -> None:
    assert png_size(png_header(50000, 50000)) == (50000, 50000)
    assert png_size(make_png(72, 64)[:33]) == (72, 64)


@pytest.mark.parametrize(
    ("report", "problem"),
    [
        (Progress(2, 4), ""),
        (Progress(-1, 4), "step -1 of 4"),
        (Progress(5, 4), "step 5 of 4"),
        (Preview(1, 4, 8, 8, make_png(8, 8)), ""),
        (Preview(1, 4, 8, 8, b"<html>" * 10), "is not a PNG"),
        (Preview(1, 4, 8, 8, make_png(16, 8)), "is a 16x8 PNG, not 8x8"),
        (Preview(1, 4, 9000, 9000, png_header(9000, 9000)), "9000x9000, more than 512 px"),
        (Preview(1, 4, 8, 8, b"x" * (MAX_PREVIEW_BYTES + 1)), f"more than the {MAX_PREVIEW_BYTES}"),
    ],
)
def test_progress_and_previews_are_checked(report: Progress | Preview, problem: str) -> None:
    found = report_problem(report)
    assert (problem in found) if problem else found == ""
