"""The scheduler's picture of connected agents, as placement sees it."""

from __future__ import annotations

from scheduler.cluster import ActiveAttempt, Cluster
from scheduler.domain import DeviceStats, ModelInfo
from scheduler.spec import MemoryMode
from scheduler.speeds import Speed
from tests.factories import GIB, make_node, make_spec


def attempt(
    job_id: str, *, gib: float, assigned_at: float, started_at: float | None,
    owner: str = "alice", seconds: float = 10.0,
) -> ActiveAttempt:  # fmt: skip
    return ActiveAttempt(
        job_id=job_id,
        attempt=1,
        gpu_index=0,
        owner=owner,
        spec=make_spec(),
        memory_mode=MemoryMode.FULL,
        vram_bytes=int(gib * GIB),
        expected_seconds=seconds,
        assigned_at=assigned_at,
        started_at=started_at,
    )


def test_free_memory_is_the_report_less_what_it_cannot_show_yet() -> None:
    cluster = Cluster()
    session = cluster.connect(make_node("n1"), now=0.0)
    # Before any report, the whole card counts as free.
    assert cluster.gpu_views(now=0.0)[0].free_bytes == 24 * GIB
    cluster.report_stats("n1", [DeviceStats(0, 24 * GIB, 20 * GIB, 4 * GIB, 50.0)], now=10.0)
    session.attempts["running"] = attempt("running", gib=3, assigned_at=1.0, started_at=2.0)
    session.attempts["waiting"] = attempt("waiting", gib=2, assigned_at=3.0, started_at=None)
    session.attempts["fresh"] = attempt("fresh", gib=1, assigned_at=11.0, started_at=12.0)
    [view] = cluster.gpu_views(now=14.0)
    # 20 reported free - 2 (not started) - 1 (started after the report) = 17;
    # the running job is already inside the report's numbers.
    assert view.free_bytes == 17 * GIB
    assert view.active_jobs == 3
    assert view.bound_bytes == 6 * GIB
    # Work still to do: 10 - (14 - 2) -> 0, 10 (not started), 10 - (14 - 12) = 8
    assert view.busy_seconds == 18.0
    assert view.utilization_percent == 50.0
    assert view.models == {"tiny"}
    assert cluster.active_by_owner() == {"alice": 3}


def test_a_resident_model_counts_as_free_memory_and_speeds_pass_through() -> None:
    cluster = Cluster()
    cluster.connect(make_node("n1", labels={"pool": "sdxl"}), now=0.0)
    sdxl = ModelInfo("sdxl", 7 * GIB, "float16")
    speeds = {"sdxl": Speed(1.5, 8.0, 3)}
    # 24 GiB card: SDXL resident (7 GiB) and 3 GiB of other use -> 14 GiB free.
    stats = DeviceStats(0, 24 * GIB, 14 * GIB, 10 * GIB, 0.0, (sdxl,), speeds)
    cluster.report_stats("n1", [stats], now=1.0, host_free_bytes=32 * GIB)
    [view] = cluster.gpu_views(now=1.0)
    # The worker reuses or evicts it, so placement may count on 14 + 7 = 21 GiB.
    assert view.free_bytes == 21 * GIB
    assert view.resident == {"sdxl"}
    assert view.speeds == speeds
    assert view.host_free_bytes == 32 * GIB
    assert view.labels == {"pool": "sdxl"}


def test_connect_refuses_a_second_session_with_the_same_id() -> None:
    cluster = Cluster()
    first = cluster.connect(make_node("n1"), now=0.0)
    try:
        cluster.connect(make_node("n1"), now=1.0)
    except KeyError:
        pass
    else:
        raise AssertionError("a second session with the same node id was accepted")
    first.attempts["j"] = attempt("j", gib=1, assigned_at=0, started_at=None)
    cluster.disconnect(first)
    assert cluster.sessions == {}
    assert [a.job_id for a in first.take_attempts()] == ["j"]
    assert first.attempts == {}
    assert first.outbox.get_nowait() is None  # its stream is told to end


def test_holder_finds_the_current_attempt_only() -> None:
    cluster = Cluster()
    session = cluster.connect(make_node("n1"), now=0.0)
    session.attempts["j"] = attempt("j", gib=1, assigned_at=0, started_at=None)
    assert cluster.holder("j", 1) is session
    assert cluster.holder("j", 2) is None
    assert cluster.models() == {"tiny": 2 * GIB}
