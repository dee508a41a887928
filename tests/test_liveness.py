"""The pure liveness decisions: lapsed leases, missed progress deadlines and
orphans that outlived their wait, on the scheduler's clock."""

from __future__ import annotations

from scheduler.attempt_state import ActiveAttempt, Orphan
from scheduler.cluster import NodeSession
from scheduler.config import LivenessConfig
from scheduler.liveness import expired, hung, lapsed, progress_deadline
from sdmesh.domain import DeviceInfo, NodeInfo
from sdmesh.spec import MemoryMode
from tests.factories import make_spec

CONFIG = LivenessConfig(heartbeat_seconds=1.0, lease_seconds=10.0, progress_deadline_seconds=60.0)


def session(node_id: str, last_heard: float) -> NodeSession:
    info = NodeInfo(node_id, node_id, "host", "test", (DeviceInfo(0, "GPU", "U", "cuda", 1),), ())
    return NodeSession(info=info, connected_at=0.0, last_heard=last_heard)


def attempt(job_id: str, **fields: object) -> ActiveAttempt:
    values: dict[str, object] = {
        "job_id": job_id,
        "attempt": 1,
        "gpu_index": 0,
        "owner": "alice",
        "spec": make_spec(),
        "memory_mode": MemoryMode.FULL,
        "vram_bytes": 1,
        "expected_seconds": 10.0,
        "assigned_at": 0.0,
    }
    values.update(fields)
    return ActiveAttempt(**values)  # type: ignore[arg-type]


def test_a_node_is_lost_only_after_a_whole_lease_of_silence() -> None:
    quiet, talking = session("quiet", last_heard=100.0), session("talking", last_heard=105.0)
    assert lapsed([quiet, talking], now=110.0, lease_seconds=10.0) == []
    assert lapsed([quiet, talking], now=110.5, lease_seconds=10.0) == [quiet]


def test_the_deadline_is_the_floor_or_ten_steps_and_the_first_step_gets_twice_that() -> None:
    fast = attempt("fast", step_seconds=0.5, last_step_at=1.0)
    slow = attempt("slow", step_seconds=9.0, last_step_at=1.0)
    assert progress_deadline(CONFIG, fast) == 60.0
    assert progress_deadline(CONFIG, slow) == 90.0
    assert progress_deadline(CONFIG, attempt("loading", step_seconds=9.0)) == 180.0


def test_only_a_started_attempt_silent_past_its_deadline_is_hung() -> None:
    held = [
        attempt("stuck", started_at=0.0, last_step_at=900.0),
        attempt("stepping", started_at=0.0, last_step_at=990.0),
        attempt("loading", started_at=900.0),  # 100 s < 2 x 60 s
        attempt("waiting"),  # behind another job on its worker
        attempt("stopping", started_at=0.0, last_step_at=0.0, stopping=True),
    ]
    assert [a.job_id for a in hung(held, 1000.0, 1000.0, CONFIG)] == ["stuck"]
    assert [a.job_id for a in hung(held, 1021.0, 1021.0, CONFIG)] == ["stuck", "loading"]


def test_a_silent_agent_is_left_to_its_lease_not_called_hung() -> None:
    held = [attempt("stuck", started_at=0.0, last_step_at=900.0)]
    # heard at 1000, asked at 1002.5: over two heartbeats without a word
    assert hung(held, 1000.0, 1002.5, CONFIG) == []


def test_orphans_expire_at_their_deadline() -> None:
    early = Orphan(attempt("a"), "n", "n", deadline=50.0, why="")
    late = Orphan(attempt("b"), "n", "n", deadline=70.0, why="")
    assert expired([early, late], 49.0) == []
    assert expired([early, late], 50.0) == [early]
