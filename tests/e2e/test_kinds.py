"""Every kind of job end to end, through real processes, on SQLite and on
PostgreSQL: img2img, inpainting, the hires fix, LoRA, ControlNet and n_iter,
each with previews and its A1111 infotext; placement by capability; LoRAs
that never leak into the next job; bad input refused before anything is
queued.

One scheduler and two agents serve every test of a database: `agent-a`
offers the tiny variants (an inpainting model, the ControlNet `tiny-canny`
and the LoRA `tiny-lora`), `agent-b` only `tiny`.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageDraw

from client import (
    Client,
    Event,
    InvalidArgumentError,
    JobHandle,
    PreviewEvent,
    ProgressEvent,
    RejectedError,
    StateEvent,
)
from harness.processes import LocalCluster
from tests.conftest import DATABASES
from tests.databases import database

pytestmark = pytest.mark.e2e

SIZE = 64
STEPS = 4


@pytest.fixture(scope="module", params=DATABASES)
def kinds(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp(f"kinds-{request.param}")
    with database(request.param, root) as url:
        cluster = LocalCluster(root, db_url=url)
        cluster.start_scheduler()
        cluster.start_agent("agent-a", "--tiny-variants", "--label", "pool=a")
        cluster.start_agent("agent-b", "--label", "pool=b")
        try:
            cluster.wait_for_nodes(2)
            yield cluster
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            cluster.stop()


@pytest.fixture
def client(kinds: LocalCluster) -> Iterator[Client]:
    with kinds.client("alice") as made:
        yield made


def picture(size: tuple[int, int] = (SIZE, SIZE)) -> PILImage.Image:
    """A picture with edges and colours: a gradient and a dark square."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(255, 0, height, dtype=np.uint8)[:, None].repeat(width, 1)
    image = PILImage.fromarray(np.stack([x, y, (x // 2 + y // 2)], axis=-1), "RGB")
    ImageDraw.Draw(image).rectangle(
        (width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(20, 20, 90)
    )
    return image


def png_bytes(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask(size: tuple[int, int] = (SIZE, SIZE)) -> PILImage.Image:
    made = PILImage.new("L", size, 0)
    width, height = size
    ImageDraw.Draw(made).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), 255)
    return made


def pixels(data: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def run(handle: JobHandle) -> tuple[list[Event], list[bytes], str]:
    """The job's events, its PNGs and their infotexts (checked alike)."""
    events = list(handle.events())
    job = handle.refresh()
    assert job.state == "SUCCEEDED", job.reason
    images = handle.images()
    texts: list[str] = []
    for image in images:
        with PILImage.open(io.BytesIO(image.data)) as opened:
            texts.append(opened.info["parameters"])
    return events, [image.data for image in images], texts[0]


def check_previews_and_progress(events: list[Event], total: int) -> None:
    steps = [e.step for e in events if isinstance(e, ProgressEvent)]
    totals = {e.total_steps for e in events if isinstance(e, ProgressEvent)}
    assert steps == sorted(steps) and steps[-1] == total, steps
    assert totals == {total}, totals
    assert any(isinstance(e, PreviewEvent) for e in events)
    states = [e.state for e in events if isinstance(e, StateEvent)]
    assert states[-1] == "SUCCEEDED"


def test_img2img_is_deterministic_and_changes_its_input(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    picture().save(source)
    options: dict[str, Any] = {
        "width": SIZE,
        "height": SIZE,
        "steps": STEPS,
        "seed": 7,
        "denoising_strength": 0.5,
    }
    first = client.submit("a harbour at dusk", init_image=source, **options)  # a path
    second = client.submit("a harbour at dusk", init_image=source.read_bytes(), **options)  # bytes
    events, [one], text = run(first)
    _, [two], _ = run(second)
    check_previews_and_progress(events, int(STEPS * 0.5))
    assert np.array_equal(pixels(one), pixels(two))
    assert np.abs(pixels(one) - np.asarray(picture(), dtype=np.int16)).mean() > 1.0
    assert "Denoising strength: 0.5" in text
    assert f"Size: {SIZE}x{SIZE}" in text
    assert first.refresh().spec.init_image == second.refresh().spec.init_image


def test_inpainting_keeps_what_the_mask_does_not_cover(client: Client) -> None:
    init = picture()
    handle = client.submit(
        "a red balloon",
        init_image=init,  # a PIL image
        mask=mask(),
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        seed=3,
        denoising_strength=1.0,
        mask_blur=0,
        selector={"pool": "a"},
    )
    events, [data], text = run(handle)
    check_previews_and_progress(events, STEPS)
    assert "Mask blur: 0" in text and "Denoising strength: 1" in text
    out = pixels(data)
    inside = np.asarray(mask(), dtype=bool)
    before = np.asarray(init, dtype=np.int16)
    # The masked area is repainted; the rest stays close to the input (the
    # VAE's round trip blurs it a little: a stated tolerance, in 0-255 units).
    assert (
        np.abs(out[inside] - before[inside]).mean() > np.abs(out[~inside] - before[~inside]).mean()
    )


def test_the_hires_fix_runs_two_passes_as_one_job(client: Client) -> None:
    handle = client.submit(
        "a castle",
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        seed=11,
        enable_hr=True,
        hr_scale=2,
        hr_second_pass_steps=4,
        denoising_strength=0.5,
    )
    events, images, text = run(handle)
    [data] = images
    with PILImage.open(io.BytesIO(data)) as image:
        assert image.size == (2 * SIZE, 2 * SIZE)
    check_previews_and_progress(events, STEPS + 2)  # pass 2 runs 4 * 0.5 steps
    for entry in (
        "Hires upscale: 2",
        "Hires steps: 4",
        "Hires upscaler: Latent",
        "Denoising strength: 0.5",
    ):
        assert entry in text, text


def test_a_lora_never_leaks_into_the_next_job_on_its_card(client: Client) -> None:
    plain: dict[str, Any] = {
        "width": SIZE,
        "height": SIZE,
        "steps": STEPS,
        "seed": 5,
        "selector": {"pool": "a"},
    }
    _, [before], _ = run(client.submit("a lantern", **plain))
    _, [with_lora], text = run(client.submit("a lantern <lora:tiny-lora:1>", **plain))
    _, [after], _ = run(client.submit("a lantern", **plain))
    _, [listed], listed_text = run(client.submit("a lantern", loras=[("tiny-lora", 1.0)], **plain))
    assert np.array_equal(pixels(before), pixels(after))
    assert not np.array_equal(pixels(before), pixels(with_lora))
    assert np.array_equal(pixels(with_lora), pixels(listed))
    assert 'Lora hashes: "tiny-lora: ' in text
    assert "<lora:tiny-lora:1>" in listed_text.splitlines()[0]


def test_a_controlnet_job_goes_only_to_the_node_that_has_it(client: Client) -> None:
    control = picture()
    handles = [
        client.submit(
            f"a tower, take {i}",
            controlnets=[{"model": "tiny-canny", "image": control, "weight": 0.8}],
            width=SIZE,
            height=SIZE,
            steps=STEPS,
        )
        for i in range(3)
    ]
    for number, handle in enumerate(handles):
        events, _, text = run(handle)
        if number == 0:
            # Progress and previews reach a watcher that is there while the
            # job runs; the later jobs may end while the first is watched.
            check_previews_and_progress(events, STEPS)
        assert handle.refresh().node_name == "agent-a"
        assert 'ControlNet 0: "Module: none, Model: tiny-canny [' in text
        assert "Weight: 0.8" in text


def test_n_iter_runs_batches_one_after_another(client: Client) -> None:
    handle = client.submit(
        "a fox", width=SIZE, height=SIZE, steps=2, seed=100, batch_size=2, n_iter=2
    )
    events, images, _ = run(handle)
    assert [image.info.seed for image in handle.images()] == [100, 101, 102, 103]
    assert len(images) == 4
    check_previews_and_progress(events, 2 * 2)
    assert len({bytes(pixels(data)) for data in images}) == 4


def test_a_job_nobody_can_run_or_with_bad_input_is_refused_and_nothing_queued(
    client: Client, kinds: LocalCluster
) -> None:
    before = len(client.list_jobs(limit=1000))
    good = picture()

    def refused(field: str, **options: Any) -> None:
        with pytest.raises(InvalidArgumentError) as caught:
            client.submit("bad", width=SIZE, height=SIZE, steps=2, **options)
        assert field in str(caught.value), str(caught.value)

    refused("loras[0].name", loras=[("nobody-has-this", 1.0)])
    refused("nobody-has-this", loras=[("nobody-has-this", 1.0)])
    refused("controlnets[0].model", controlnets=[{"model": "canny-sdxl", "image": good}])
    refused("init_image", init_image=b"\x89PNG\r\n\x1a\n not really a png")
    refused("mask", init_image=good, mask=mask((SIZE * 2, SIZE)))
    refused("denoising_strength", init_image=good, denoising_strength=1.5)
    refused("loras[0].weight", loras=[("tiny-lora", 9.0)])
    refused("init_image", init_image=huge_png(10_000, 10_000))
    assert len(client.list_jobs(limit=1000)) == before


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG of width x height black pixels: 100 megapixels compress
    to a few hundred kilobytes."""
    row = b"\x00" + bytes(width)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def test_sdctl_runs_img2img_and_controlnet_from_files(kinds: LocalCluster, tmp_path: Path) -> None:
    source, control = tmp_path / "in.png", tmp_path / "edges.png"
    picture().save(source)
    picture().save(control)
    done = kinds.sdctl(
        "submit", "a lighthouse", "--init-image", str(source), "--denoising-strength", "0.6",
        "--controlnet", f"tiny-canny:{control}:0.5", "--lora", "tiny-lora:0.7",
        "--width", str(SIZE), "--height", str(SIZE), "--steps", str(STEPS),
        "--output-dir", str(tmp_path / "out"), "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"] == "SUCCEEDED"
    assert result["node"] == "agent-a"
    [path] = result["images"]
    with PILImage.open(path) as image:
        text = image.info["parameters"]
    assert "Denoising strength: 0.6" in text and "ControlNet 0" in text and "Lora hashes" in text


def test_a_job_whose_needs_no_single_node_meets_is_refused(client: Client) -> None:
    """agent-b has no ControlNet; a selector for it leaves no node that can."""
    with pytest.raises((RejectedError, InvalidArgumentError)) as caught:
        client.submit(
            "a tower",
            controlnets=[{"model": "tiny-canny", "image": picture()}],
            selector={"pool": "b"},
            width=SIZE,
            height=SIZE,
            steps=2,
        )
    assert "tiny-canny" in str(caught.value)
