"""The SDK's input images, against a scripted scheduler on a real in-process
gRPC server: an image given as a path, bytes or a PIL image is uploaded
with UploadInput and the job names it by sha256; the same image goes up
once; a bad image is refused naming its field before any call; an upload
rides out an unavailable replica; LoRAs and ControlNet units in every shape
the SDK takes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image as PILImage

from client import AsyncClient, Client, InvalidArgumentError
from client._inputs import (
    input_chunks,
    lora_weights,
    prepare,
    read_input,
)
from protos import common_pb2, scheduler_pb2
from sdmesh.convert import spec_request_from_proto, spec_to_proto
from sdmesh.errors import InvalidArgument
from sdmesh.kinds import MAX_INPUT_BYTES, ControlNetUnit, InputInfo, LoraWeight, image_format
from sdmesh.spec import resolve
from sdmesh.wire import INPUT_CHUNK_BYTES
from tests.scripted import running_scheduler
from tests.test_client_retry import Context, FakeScheduler, nowhere, run, serving


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class KindsScheduler(FakeScheduler):
    """Resolves a submit as the real scheduler does, against the inputs
    uploaded to it and one LoRA and one ControlNet."""

    def __init__(self) -> None:
        super().__init__()
        self.specs: list[common_pb2.JobSpec] = []
        self.sizes: dict[str, tuple[int, int]] = {}

    async def UploadInput(self, chunks: Any, context: Context) -> common_pb2.InputInfo:
        info = await super().UploadInput(chunks, context)
        data = self.inputs[info.sha256]
        if not data.startswith(b"\x89PNG") and not data.startswith(b"\xff\xd8"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a PNG, JPEG or WebP image")
        with PILImage.open(io.BytesIO(data)) as image:
            info.width, info.height = image.size
            info.format = image.format or ""
        self.sizes[info.sha256] = (info.width, info.height)
        return info

    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: Context
    ) -> scheduler_pb2.SubmitJobResponse:
        await self._enter("SubmitJob", request, context)
        self.specs.append(request.spec)
        inputs = {
            sha: InputInfo(sha, len(self.inputs[sha]), *self.sizes[sha], "PNG")
            for sha in self.inputs
        }
        try:
            spec = resolve(
                spec_request_from_proto(request.spec),
                known_models=(),
                random_seed=lambda: 7,
                known_loras=("detail",),
                known_controlnets=("canny",),
                inputs=inputs,
            )
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        job = scheduler_pb2.Job(
            id=f"job-{len(self.specs)}", state=common_pb2.JOB_STATE_QUEUED, spec=spec_to_proto(spec)
        )
        return scheduler_pb2.SubmitJobResponse(job=job, created=True)

    def uploads(self) -> int:
        return len(self.requests.get("UploadInput", []))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_path_bytes_and_a_pil_image_are_uploaded_and_named_by_sha256(tmp_path: Path) -> None:
    init, mask, control = png((10, 20, 30)), png((255, 255, 255)), png((0, 0, 0))
    (tmp_path / "init.png").write_bytes(init)

    async def scenario() -> None:
        scheduler = KindsScheduler()
        async with serving(scheduler) as address, AsyncClient(address) as client:
            handle = await client.submit(
                "a harbour",
                init_image=tmp_path / "init.png",
                mask=mask,
                controlnets=[{"model": "canny", "image": PILImage.open(io.BytesIO(control))}],
                denoising_strength=0.5,
            )
            assert handle.last_known is not None
            job_spec = handle.last_known.spec
        [spec] = scheduler.specs
        assert (spec.init_image, spec.mask, spec.controlnets[0].image) == (
            sha(init),
            sha(mask),
            job_spec.controlnets[0].image,
        )
        # The PIL image went up as a PNG of the same pixels.
        uploaded = scheduler.inputs[spec.controlnets[0].image]
        assert (
            PILImage.open(io.BytesIO(uploaded)).tobytes()
            == PILImage.open(io.BytesIO(control)).tobytes()
        )
        assert scheduler.inputs[sha(init)] == init and scheduler.inputs[sha(mask)] == mask
        assert scheduler.uploads() == 3
        assert (job_spec.kind, job_spec.denoising_strength) == ("inpaint", 0.5)

    run(scenario())


def test_the_same_image_is_uploaded_once_per_client(tmp_path: Path) -> None:
    picture = png()
    (tmp_path / "a.png").write_bytes(picture)

    async def scenario() -> None:
        scheduler = KindsScheduler()
        async with serving(scheduler) as address, AsyncClient(address) as client:
            # The init image and a control image alike, within one submit...
            await client.submit(
                "p", init_image=picture, controlnets=[("canny", tmp_path / "a.png")]
            )
            # ...and across submits, from a path or bytes.
            await client.submit("p", init_image=tmp_path / "a.png")
            info = await client.upload(picture)
            await client.submit("p", init_image=info)  # an InputInfo stands for it
        assert scheduler.uploads() == 1
        assert [spec.init_image for spec in scheduler.specs] == [sha(picture)] * 3
        assert scheduler.specs[0].controlnets[0].image == sha(picture)
        assert info.sha256 == sha(picture) and (info.width, info.height) == (16, 16)

    run(scenario())


def test_a_large_image_goes_up_in_chunks_of_at_most_1_mib() -> None:
    data = png() + bytes(2 * INPUT_CHUNK_BYTES + 5)  # past IEND: still a PNG to the magic
    chunks = input_chunks(data)
    assert [len(chunk.data) for chunk in chunks] == [
        INPUT_CHUNK_BYTES,
        INPUT_CHUNK_BYTES,
        len(png()) + 5,
    ]
    assert [chunk.offset for chunk in chunks] == [0, INPUT_CHUNK_BYTES, 2 * INPUT_CHUNK_BYTES]
    assert b"".join(chunk.data for chunk in chunks) == data


@pytest.fixture
def forty_mib(tmp_path: Path) -> Path:
    path = tmp_path / "big.png"
    with path.open("wb") as file:
        file.write(png())
        file.truncate(40 * 2**20)  # sparse: 40 MiB on paper
    return path


def test_a_bad_image_is_refused_naming_its_field_before_any_call(
    tmp_path: Path, forty_mib: Path
) -> None:
    gif = tmp_path / "a.gif"
    PILImage.new("RGB", (8, 8)).save(gif, format="GIF")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"init_image": tmp_path / "missing.png"}, "init_image: no such file '"),
        ({"init_image": str(forty_mib)}, "init_image: '"),
        ({"init_image": png(), "mask": gif}, "mask: '"),
        (
            {"controlnets": [{"model": "canny", "image": b"GIF89a..."}]},
            "controlnets[0].image: it is a GIF",
        ),
        ({"init_image": b"plain text"}, "init_image: it is not an image"),
        ({"init_image": 42}, "init_image: expected a file path, bytes or a PIL image, got int"),
        ({"init_image": tmp_path}, "init_image: '"),
        ({"controlnets": [{"model": "canny"}]}, "controlnets[0]: needs a model"),
        (
            {"controlnets": [{"model": "canny", "image": png(), "strength": 1}]},
            "controlnets[0]: unknown key 'strength'",
        ),
        ({"loras": [("detail", "high")]}, "loras[0].weight: must be a number, got str"),
        ({"loras": "detail"}, "loras: expected a list of LoRAs"),
        ({"init_image": png(), "memory_mode": "half"}, "memory_mode: must be one of"),
    ]

    async def scenario() -> None:
        scheduler = KindsScheduler()
        async with serving(scheduler) as address, AsyncClient(address) as client:
            for options, message in cases:
                with pytest.raises(InvalidArgumentError) as caught:
                    await client.submit("p", **options)
                assert str(caught.value).startswith(message), (options, str(caught.value))
        assert scheduler.requests == {}  # no call at all, no upload among them

    run(scenario())
    # What each says in full, for the ones the table cuts short.
    assert str(_error(lambda: read_input("init_image", forty_mib))) == (
        f"init_image: '{forty_mib}' is 40.0 MiB; an input image may be at most 32.0 MiB"
    )
    assert str(_error(lambda: read_input("mask", gif))) == (
        f"mask: '{gif}' is a GIF; allowed: PNG, JPEG or WebP"
    )
    assert str(_error(lambda: read_input("init_image", tmp_path / "x.png"))) == (
        f"init_image: no such file '{tmp_path / 'x.png'}'"
    )
    assert MAX_INPUT_BYTES == 32 * 2**20


def _error(call: Any) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (png(), "PNG"),
        (b"\xff\xd8\xff\xe0" + bytes(8), "JPEG"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", ""),  # RIFF, but audio
        (b"GIF87a", "GIF"),
        (b"", ""),
    ],
)
def test_formats_by_their_first_bytes(data: bytes, found: str) -> None:
    assert image_format(data) == found


def test_the_scheduler_s_refusal_of_an_upload_names_the_field() -> None:
    async def scenario() -> None:
        scheduler = KindsScheduler()
        async with serving(scheduler) as address, AsyncClient(address) as client:
            with pytest.raises(InvalidArgumentError) as caught:
                await client.submit("p", controlnets=[("canny", b"RIFF\0\0\0\0WEBPVP8 ")])
        assert str(caught.value) == "controlnets[0].image: not a PNG, JPEG or WebP image"
        assert "SubmitJob" not in scheduler.requests

    run(scenario())


def test_an_upload_moves_on_from_an_unavailable_address() -> None:
    async def scenario() -> None:
        scheduler = KindsScheduler()
        dead = nowhere()
        async with serving(scheduler) as live, AsyncClient([dead, live]) as client:
            info = await client.upload(png())
            assert client.address == live
        assert info.sha256 == sha(png()) and scheduler.uploads() == 1

    run(scenario())


def test_an_input_the_scheduler_no_longer_has_is_uploaded_again() -> None:
    """Inputs go with their job: a later submit of the same image finds it
    gone, uploads it again and is retried once."""

    async def scenario() -> None:
        scheduler = KindsScheduler()
        async with serving(scheduler) as address, AsyncClient(address) as client:
            await client.submit("p", init_image=png())
            scheduler.inputs.clear()  # the job was deleted, and its inputs with it
            handle = await client.submit("p", init_image=png())
        assert handle.last_known is not None and handle.last_known.spec.init_image == sha(png())
        assert scheduler.uploads() == 2
        assert len(scheduler.requests["SubmitJob"]) == 3  # refused once, then accepted

    run(scenario())


def test_the_blocking_client_uploads_and_submits_too() -> None:
    scheduler = KindsScheduler()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    address: list[str] = []
    ready = threading.Event()

    async def serve() -> None:
        async with serving(scheduler) as where:
            address.append(where)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()))
    thread.start()
    try:
        assert ready.wait(10)
        with Client(address[0]) as client:
            info = client.upload(png())
            handle = client.submit("p", init_image=png(), loras=["detail"])
        assert handle.last_known is not None
        assert handle.last_known.spec.init_image == info.sha256
        assert handle.last_known.spec.loras == (LoraWeight("detail", 1.0),)
        assert scheduler.uploads() == 1
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        loop.close()


def test_loras_and_controlnet_units_in_every_shape() -> None:
    assert lora_weights(
        "loras", ["a", ("b", 0.5), {"name": "c", "weight": -1}, LoraWeight("d", 2)]
    ) == (
        LoraWeight("a", 1.0),
        LoraWeight("b", 0.5),
        LoraWeight("c", -1.0),
        LoraWeight("d", 2.0),
    )
    picture = png()
    prepared = prepare(
        {
            "controlnets": [
                {"model": "canny", "image": picture, "weight": 0.8, "guidance_end": 0.5},
                ControlNetUnit("depth", picture, guidance_start=0.2),  # type: ignore[arg-type]
            ]
        }
    )
    assert prepared.options["controlnets"] == (
        ControlNetUnit("canny", sha(picture), 0.8, 0.0, 0.5),
        ControlNetUnit("depth", sha(picture), 1.0, 0.2, 1.0),
    )
    assert list(prepared.to_upload) == [sha(picture)]
    assert prepared.fields == {sha(picture): "controlnets[0].image"}


def test_against_the_real_scheduler(tmp_path: Path) -> None:
    """Uploads, the job naming them, one upload for the same bytes, a
    refusal naming the field, and an input gone with its job sent again."""
    picture = png((40, 80, 120), (64, 64))
    (tmp_path / "in.png").write_bytes(picture)

    async def scenario() -> None:
        async with (
            running_scheduler(tmp_path / "scheduler") as server,
            AsyncClient(f"127.0.0.1:{server.port}") as client,
        ):
            sent: list[int] = []
            send = client._uploads._send

            async def counted(chunks: list[common_pb2.InputChunk]) -> InputInfo:
                sent.append(len(chunks))
                return await send(chunks)

            client._uploads._send = counted
            options: dict[str, Any] = {"width": 64, "height": 64, "steps": 4}
            first = await client.submit(
                "a harbour", init_image=tmp_path / "in.png", denoising_strength=0.5, **options
            )
            second = await client.submit("a harbour", init_image=picture, **options)
            assert sent == [1]
            for handle in (first, second):
                job = await handle.refresh()
                assert (job.spec.init_image, job.spec.kind) == (sha(picture), "img2img")
            info = await client.upload(PILImage.new("RGB", (64, 32), (1, 2, 3)))
            assert (info.width, info.height, info.format) == (64, 32, "PNG")

            with pytest.raises(InvalidArgumentError) as caught:
                await client.submit("p", init_image=b"\x89PNG\r\n\x1a\n not really", **options)
            assert str(caught.value).startswith("init_image: "), str(caught.value)
            assert "image: image:" not in str(caught.value)

            # Its jobs deleted, the input goes too; the next submit sends it again.
            await first.delete()
            await second.delete()
            third = await client.submit("again", init_image=picture, **options)
            assert (await third.refresh()).spec.init_image == sha(picture)
            assert len(sent) == 4  # the PIL image, the refused one, and this one again

    run(scenario())
