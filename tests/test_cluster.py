"""The scheduler's picture of connected agents, as placement sees it, with
the attempts bound to each GPU charged to it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.attempt_state import ActiveAttempt, count_by_owner
from scheduler.cluster import Cluster
from scheduler.commands import DrainCommand, ResumeCommand
from scheduler.errors import FailedPrecondition, NotFound
from sdmesh.domain import DeviceStats, ModelInfo
from sdmesh.kinds import ControlNetUnit
from sdmesh.spec import MemoryMode
from sdmesh.speeds import Speed
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
    cluster.connect(make_node("n1"), now=0.0)
    # Before any report, the whole card counts as free.
    assert cluster.gpu_views(now=0.0, held={})[0].free_bytes == 24 * GIB
    cluster.report_stats("n1", [DeviceStats(0, 24 * GIB, 20 * GIB, 4 * GIB, 50.0)], now=10.0)
    held = [
        attempt("running", gib=3, assigned_at=1.0, started_at=2.0),
        attempt("waiting", gib=2, assigned_at=3.0, started_at=None),
        attempt("fresh", gib=1, assigned_at=11.0, started_at=12.0),
    ]
    [view] = cluster.gpu_views(now=14.0, held={"n1": held})
    # 20 reported free - 2 (not started) - 1 (started after the report) = 17;
    # the running job is already inside the report's numbers.
    assert view.free_bytes == 17 * GIB
    assert view.active_jobs == 3
    assert view.bound_bytes == 6 * GIB
    # Work still to do: 10 - (14 - 2) -> 0, 10 (not started), 10 - (14 - 12) = 8
    assert view.busy_seconds == 18.0
    assert view.utilization_percent == 50.0
    assert view.models == {"tiny"}
    assert count_by_owner(held) == {"alice": 3}


def test_a_resident_model_counts_as_free_memory_and_speeds_pass_through() -> None:
    cluster = Cluster()
    cluster.connect(make_node("n1", labels={"pool": "sdxl"}), now=0.0)
    sdxl = ModelInfo("sdxl", 7 * GIB, "float16")
    speeds = {"sdxl": Speed(1.5, 8.0, 3)}
    # 24 GiB card: SDXL resident (7 GiB) and 3 GiB of other use -> 14 GiB free.
    stats = DeviceStats(0, 24 * GIB, 14 * GIB, 10 * GIB, 0.0, (sdxl,), speeds)
    cluster.report_stats("n1", [stats], now=1.0, host_free_bytes=32 * GIB)
    [view] = cluster.gpu_views(now=1.0, held={})
    # The worker reuses or evicts it, so placement may count on 14 + 7 = 21 GiB.
    assert view.free_bytes == 21 * GIB
    assert view.resident == {"sdxl"}
    assert view.speeds == speeds
    assert view.host_free_bytes == 32 * GIB
    assert view.labels == {"pool": "sdxl"}


def test_connect_refuses_a_second_session_with_the_same_id() -> None:
    cluster = Cluster()
    first = cluster.connect(make_node("n1"), now=0.0)
    with pytest.raises(KeyError):
        cluster.connect(make_node("n1"), now=1.0)
    cluster.disconnect(first)
    assert cluster.sessions == {}
    assert first.outbox.get_nowait() is None  # its stream is told to end
    assert cluster.models() == {}


def test_nodes_are_found_by_id_or_name_and_drained() -> None:
    cluster = Cluster()
    session = cluster.connect(make_node("n1"), now=0.0)
    assert cluster.find("n1") is session
    assert cluster.find(session.name) is session
    assert cluster.models() == {"tiny": 2 * GIB}
    assert cluster.holders() == {("base", "tiny"): ["n1"]}
    with pytest.raises(NotFound, match="node n9 is not connected"):
        cluster.find("n9")
    cluster.connect(make_node("n2", name=session.name), now=0.0)
    with pytest.raises(FailedPrecondition, match="names several nodes"):
        cluster.find(session.name)
    cluster.drain(session, 90.0)
    assert session.draining
    cluster.resume(session)
    assert not session.draining
    assert [session.outbox.get_nowait(), session.outbox.get_nowait()] == [
        DrainCommand(90.0),
        ResumeCommand(),
    ]


def test_models_are_seen_by_kind_with_their_families() -> None:
    cluster = Cluster()
    models = (
        ModelInfo("sdxl", 7 * GIB, "float16", "base", "sdxl"),
        ModelInfo("sdxl-inpaint", 7 * GIB, "float16", "inpaint", "sdxl"),
        ModelInfo("detail", GIB // 4, "float16", "lora", "sdxl"),
        ModelInfo("canny-sdxl", 2 * GIB, "float16", "controlnet", "sdxl"),
        ModelInfo("depth", GIB, "float16", "controlnet"),  # family unknown
    )
    cluster.connect(replace(make_node("n1"), models=models), now=0.0)
    # The ControlNet is loaded beside SDXL; a bound full-mode job with
    # another ControlNet will have loaded its own by its turn.
    resident = (models[0], models[3])
    stats = DeviceStats(0, 24 * GIB, 10 * GIB, 14 * GIB, 0.0, resident)
    cluster.report_stats("n1", [stats], now=1.0)
    bound = attempt("j1", gib=3, assigned_at=1.0, started_at=None)
    spec = make_spec(model="sdxl", controlnets=(ControlNetUnit("depth", "ab" * 32),))
    bound = replace(bound, spec=spec)
    [view] = cluster.gpu_views(now=1.0, held={"n1": [bound]})
    # An inpainting model is not a model a job names, nor is a LoRA.
    assert view.models == {"sdxl"}
    assert view.loras == {"detail"}
    assert view.controlnets == {"canny-sdxl", "depth"}
    assert view.families[("lora", "detail")] == "sdxl"
    assert ("controlnet", "depth") not in view.families
    assert view.resident == {"sdxl"}
    assert view.resident_extras == {("controlnet", "canny-sdxl"), ("controlnet", "depth")}
    # 10 GiB free + 9 GiB resident (both count as reclaimable) - 3 GiB not yet reported
    assert view.free_bytes == 16 * GIB
    assert cluster.models() == {"sdxl": 7 * GIB}
    assert cluster.models("controlnet") == {"canny-sdxl": 2 * GIB, "depth": GIB}
    assert cluster.weights()[("lora", "detail")] == GIB // 4
