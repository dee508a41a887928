"""What a rogue agent sends is checked before it counts: it reports only on
its own attempts; its uploads must be the PNGs its job asked for, refused
as they arrive; its previews must be small PNGs; its stats, hello and
profiles hold no NaN, infinite or negative numbers."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos import agent_pb2, common_pb2
from scheduler.attempts import Attempts
from scheduler.cluster import Cluster, NodeSession
from scheduler.commands import AssignCommand, StopCommand
from scheduler.domain import Job
from scheduler.placement import Placed, place
from scheduler.states import JobState
from scheduler.uploads import max_png_bytes
from sdmesh.convert import hello_from_proto, unsound_numbers
from sdmesh.domain import (
    AttemptOutcome,
    AttemptProfile,
    AttemptUpdate,
    DeviceStats,
    Ended,
    ImageChunk,
    ModelInfo,
    Preview,
    Progress,
    Started,
    UpdateBody,
)
from sdmesh.errors import InvalidArgument
from sdmesh.speeds import Speed
from sdmesh.wire import IMAGE_CHUNK_BYTES
from tests.factories import make_demand, make_gpu, make_node, make_png, png_chunk, png_header
from tests.test_attempts import NOW, queued_job, run

GIB = 2**30
SEED = 1234  # make_spec's


def commands(session: NodeSession) -> list[object]:
    sent: list[object] = []
    while not session.outbox.empty():
        sent.append(session.outbox.get_nowait())
    return sent


async def assigned(attempts: Attempts, job_id: str = "j1", node: str = "n1") -> Job:
    """The job, assigned to the node (connected first if it is not)."""
    session = attempts.cluster.sessions.get(node) or attempts.cluster.connect(make_node(node), NOW)
    job = await attempts.db.run(attempts.db.store.get_job, job_id) or await queued_job(
        attempts, job_id
    )
    placed = place(make_demand(job_id), [make_gpu(node)])
    assert isinstance(placed, Placed)
    assert await attempts.assign(job, placed) == {job_id}
    assert isinstance(commands(session)[-1], AssignCommand)
    found = await attempts.db.run(attempts.db.store.get_job, job_id)
    assert found is not None
    return found


async def say(attempts: Attempts, node: str, job_id: str, attempt: int, body: UpdateBody) -> None:
    await attempts.update(attempts.cluster.sessions[node], AttemptUpdate(job_id, attempt, body))


def pieces(data: bytes, chunk: int = IMAGE_CHUNK_BYTES) -> Iterator[ImageChunk]:
    """The chunks an agent sends for image 0 of a 64x64 job."""
    for offset in range(0, len(data), chunk) or range(1):
        last = offset + chunk >= len(data)
        yield ImageChunk(
            0, offset, data[offset : offset + chunk], seed=SEED, width=64, height=64, last=last,
            sha256=hashlib.sha256(data).hexdigest() if last else "",
            size_bytes=len(data) if last else 0,
        )  # fmt: skip


def stored_files(tmp_path: Path) -> list[Path]:
    return [path for path in (tmp_path / "images").rglob("*") if path.is_file()]


# ---- reports only on its own attempts ----------------------------------------


def test_a_report_on_another_node_s_attempt_is_refused_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(attempts: Attempts) -> None:
        job = await assigned(attempts, "j1", "n1")
        rogue = attempts.cluster.connect(make_node("n2"), NOW)
        caplog.set_level(logging.INFO, "scheduler.attempts")
        bodies: tuple[UpdateBody, ...] = (
            Started(),
            Progress(1, 4),
            Preview(1, 4, 8, 8, make_png(8, 8)),
            *pieces(make_png()),
            Ended(AttemptOutcome.SUCCEEDED),
            Ended(AttemptOutcome.FAILED, "forged", "error"),
        )
        for body in bodies:
            await say(attempts, "n2", "j1", 1, body)
        after = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert after is not None
        assert (after.state, after.attempt, after.failures) == (JobState.ASSIGNED, 1, 0)
        assert not after.images and not job.images
        assert [a.job_id for a in attempts.held(attempts.cluster.sessions["n1"])] == ["j1"]
        assert attempts.hub.latest_progress("j1") is None
        assert attempts.hub.latest_preview("j1") is None
        assert stored_files(tmp_path) == []
        # One warning naming the node, the job, the attempt and its holder;
        # one stop, to the rogue alone.
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning == (
            "node host-n2 reported on job j1 attempt 1, refused: it is bound to node host-n1"
        )
        [stop] = commands(rogue)
        assert isinstance(stop, StopCommand)
        assert (stop.job_id, stop.attempt) == ("j1", 1)
        assert commands(attempts.cluster.sessions["n1"]) == []
        # The node it is bound to still reports on it.
        await say(attempts, "n1", "j1", 1, Started())
        running = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert running is not None
        assert running.state is JobState.RUNNING

    run(scenario, tmp_path)


def test_a_report_on_an_attempt_that_never_was_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(attempts: Attempts) -> None:
        await assigned(attempts, "j1", "n1")
        caplog.set_level(logging.WARNING, "scheduler.attempts")
        await say(attempts, "n1", "j1", 7, Ended(AttemptOutcome.SUCCEEDED))  # a later attempt
        await say(attempts, "n1", "nope", 1, Started())  # no such job
        after = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert after is not None
        assert (after.state, after.attempt) == (JobState.ASSIGNED, 1)
        assert [r.getMessage() for r in caplog.records] == [
            "node host-n1 reported on job j1 attempt 7, refused: it holds no such attempt",
            "node host-n1 reported on job nope attempt 1, refused: it holds no such attempt",
        ]

    run(scenario, tmp_path)


# ---- uploads -----------------------------------------------------------------


BOMB = png_header(50000, 50000) + png_chunk(b"IDAT", b"\x78\x9c" + b"\x00" * 1000)


def noise_behind_a_header() -> Iterator[ImageChunk]:
    """60 MiB of noise behind a real 64x64 header, made one chunk at a time."""
    header = png_header(64, 64)
    for offset in range(0, 60 * 2**20, IMAGE_CHUNK_BYTES):
        data = (
            (header + bytes(IMAGE_CHUNK_BYTES - len(header)))
            if offset == 0
            else b"\xa5" * IMAGE_CHUNK_BYTES
        )
        yield ImageChunk(0, offset, data, seed=SEED, width=64, height=64)  # fmt: skip


@pytest.mark.parametrize(
    ("upload", "reason"),
    [
        (lambda: pieces(make_png(128, 64)), "image 0 is a 128x64 PNG, not 64x64"),
        (lambda: pieces(b"<!doctype html><script>alert(1)</script>"), "image 0 is not a PNG"),
        (
            noise_behind_a_header,
            f"image 0 is larger than {max_png_bytes(64, 64)} bytes, the most a 64x64 PNG may take",
        ),
        (lambda: pieces(BOMB), "image 0 is a 50000x50000 PNG: 2500000000 pixels, more than"),
    ],
    ids=["forged size", "html", "noise", "bomb"],
)
def test_a_forged_upload_fails_the_attempt_and_nothing_is_stored(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    upload: object,
    reason: str,
) -> None:
    async def scenario(attempts: Attempts) -> None:
        await assigned(attempts, "j1", "n1")
        session = attempts.cluster.sessions["n1"]
        await say(attempts, "n1", "j1", 1, Started())
        [active] = attempts.held(session)
        cap = max_png_bytes(64, 64)
        caplog.set_level(logging.INFO, "scheduler.attempts")
        for sent, chunk in enumerate(upload(), 1):  # type: ignore[operator]
            await say(attempts, "n1", "j1", 1, chunk)
            assert active.uploads.held_bytes <= cap  # never more than one image's cap
            if sent > 3:
                break  # the rogue keeps going; what it sends is dropped
        await say(attempts, "n1", "j1", 1, Ended(AttemptOutcome.SUCCEEDED))
        job = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert job is not None
        # Failed as the attempt's failure, with the reason; back in the queue.
        assert (job.state, job.attempt, job.failures) == (JobState.QUEUED, 1, 1)
        assert job.reason.startswith(f"host-n1: {reason}"), job.reason
        [record] = await attempts.db.run(attempts.db.store.attempts, "j1")
        assert record.outcome == AttemptOutcome.FAILED.value
        assert not job.images
        assert stored_files(tmp_path) == []
        assert active.uploads.held_bytes == 0
        assert attempts.held(session) == []
        assert commands(session) == []  # the rest, and its end, dropped without a word
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].startswith("node host-n1: upload of j1 attempt 1 refused: ")

    run(scenario, tmp_path)


def test_forged_uploads_fail_the_job_after_max_attempts(tmp_path: Path) -> None:
    async def scenario(attempts: Attempts) -> None:
        for attempt in (1, 2, 3):
            await assigned(attempts, "j1", "n1")
            for chunk in pieces(b"<html>"):
                await say(attempts, "n1", "j1", attempt, chunk)
        job = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert job is not None
        assert (job.state, job.failures) == (JobState.FAILED, 3)
        assert "image 0 is not a PNG" in job.reason

    run(scenario, tmp_path)


def test_a_true_upload_still_succeeds(tmp_path: Path) -> None:
    async def scenario(attempts: Attempts) -> None:
        await assigned(attempts, "j1", "n1")
        png = make_png(64, 64, shade=5)
        bodies: list[UpdateBody] = [Started(), *pieces(png, chunk=100)]
        for body in [*bodies, Ended(AttemptOutcome.SUCCEEDED)]:
            await say(attempts, "n1", "j1", 1, body)
        job = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert job is not None
        assert job.state is JobState.SUCCEEDED
        [stored] = stored_files(tmp_path)
        assert stored.read_bytes() == png

    run(scenario, tmp_path)


# ---- previews and progress ---------------------------------------------------


def test_malformed_previews_never_reach_watchers_and_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(attempts: Attempts) -> None:
        await assigned(attempts, "j1", "n1")
        caplog.set_level(logging.WARNING, "scheduler.attempts")
        for step in range(1, 4):
            await say(attempts, "n1", "j1", 1, Preview(step, 4, 8, 8, b"<html>" * step))
        await say(attempts, "n1", "j1", 1, Preview(1, 4, 8, 8, png_header(50000, 50000)))
        await say(attempts, "n1", "j1", 1, Progress(9, 4))
        assert attempts.hub.latest_preview("j1") is None
        assert attempts.hub.latest_progress("j1") is None
        [warning] = [r.getMessage() for r in caplog.records]
        assert warning.startswith("node host-n1: Preview of j1 attempt 1 refused: is not a PNG")
        good = Preview(2, 4, 8, 8, make_png(8, 8))
        await say(attempts, "n1", "j1", 1, good)
        latest = attempts.hub.latest_preview("j1")
        assert latest is not None
        assert latest.body == good

    run(scenario, tmp_path)


# ---- numbers: stats, hello, profiles -----------------------------------------


def stats(**overrides: object) -> DeviceStats:
    values: dict[str, object] = {
        "index": 0, "total_bytes": 24 * GIB, "free_bytes": 20 * GIB, "used_bytes": 4 * GIB,
        "utilization_percent": 50.0,
        "resident_models": (ModelInfo("tiny", GIB, "float16"),),
        "speeds": {"tiny": Speed(2.0, 1.0, 3)},
    }  # fmt: skip
    values.update(overrides)
    return DeviceStats(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"utilization_percent": math.nan}, "gpu0.utilization_percent=nan"),
        ({"utilization_percent": math.inf}, "gpu0.utilization_percent=inf"),
        ({"free_bytes": -1}, "gpu0.free_bytes=-1"),
        ({"resident_models": (ModelInfo("tiny", -GIB, "f"),)}, "gpu0.resident_models[0]"),
        ({"speeds": {"tiny": Speed(math.nan)}}, "gpu0.speeds[tiny].megapixel_steps_per_second"),
        ({"speeds": {"tiny": Speed(1.0, -2.0)}}, "gpu0.speeds[tiny].load_seconds=-2.0"),
    ],
)
def test_stats_with_nan_infinite_or_negative_numbers_are_refused(
    bad: dict[str, object], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = Cluster()
    session = cluster.connect(make_node("n1"), NOW)
    good = stats()
    cluster.report_stats("n1", [good], NOW, host_free_bytes=GIB)
    caplog.set_level(logging.WARNING, "scheduler.cluster")
    for later in (NOW + 1, NOW + 2, NOW + 3):
        cluster.report_stats("n1", [stats(**bad)], later, host_free_bytes=GIB)
    # The last sound report stays; the refusal is logged once, naming the number.
    assert (session.stats, session.stats_at) == ({0: good}, NOW)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("node host-n1: stats refused: ") and named in warning
    cluster.report_stats("n1", [good], NOW, host_free_bytes=-5)
    assert session.host_free_bytes == GIB
    cluster.report_stats("n1", [stats(free_bytes=GIB)], NOW + 4, host_free_bytes=2 * GIB)
    assert (session.stats[0].free_bytes, session.host_free_bytes) == (GIB, 2 * GIB)


def test_unsound_numbers_are_found_anywhere_in_a_report() -> None:
    assert unsound_numbers(stats()) == []
    assert unsound_numbers(AttemptProfile(math.nan, -1.0, 3)) == [
        "load_seconds=nan",
        "mean_step_seconds=-1.0",
    ]
    assert unsound_numbers(-1, "x") == ["x=-1"]
    assert unsound_numbers(True) == []


def test_a_hello_with_a_negative_size_is_refused() -> None:
    def hello(device_bytes: int, model_bytes: int) -> agent_pb2.Hello:
        return agent_pb2.Hello(
            node_id="n1", name="n1",
            devices=[common_pb2.DeviceInfo(index=0, name="GPU", total_bytes=device_bytes)],
            models=[common_pb2.ModelInfo(name="tiny", weight_bytes=model_bytes)],
        )  # fmt: skip

    assert hello_from_proto(hello(GIB, GIB)).devices[0].total_bytes == GIB
    with pytest.raises(InvalidArgument, match=r"hello\.devices\[0\]\.total_bytes: must be"):
        hello_from_proto(hello(-GIB, GIB))
    with pytest.raises(InvalidArgument, match=r"hello\.models\[0\]\.weight_bytes"):
        hello_from_proto(hello(GIB, -1))


def test_an_unsound_profile_is_dropped_and_the_outcome_still_counts(tmp_path: Path) -> None:
    async def scenario(attempts: Attempts) -> None:
        await assigned(attempts, "j1", "n1")
        profile = AttemptProfile(load_seconds=math.nan, mean_step_seconds=-3.0, peak_vram_bytes=-9)
        ended = Ended(AttemptOutcome.FAILED, "CUDA out of memory", "oom", profile)
        await say(attempts, "n1", "j1", 1, ended)
        job = await attempts.db.run(attempts.db.store.get_job, "j1")
        assert job is not None
        assert (job.state, job.failures) == (JobState.QUEUED, 1)
        [record] = await attempts.db.run(attempts.db.store.attempts, "j1")
        assert record.profile == AttemptProfile()

    run(scenario, tmp_path)
