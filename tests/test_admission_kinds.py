"""Admission of the kinds beyond txt2img on a real store, without gRPC: a
LoRA or ControlNet no node in the window has is INVALID_ARGUMENT naming
the field, and nothing is queued; one a node has is accepted; a job whose
LoRA and ControlNet live on different nodes is FAILED_PRECONDITION naming
what is missing; an inpaint model is not a model a job may name; input
images are the owner's uploads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from scheduler.admission import Admission
from scheduler.cluster import Cluster
from scheduler.errors import FailedPrecondition
from scheduler.estimator import EstimateBook
from scheduler.events import EventHub
from scheduler.images import ImageStore
from scheduler.runtime import Runtime
from scheduler.store import Database, Store
from sdmesh.domain import ModelInfo
from sdmesh.errors import InvalidArgument
from sdmesh.kinds import ControlNetUnit, InputInfo, LoraWeight
from sdmesh.spec import SpecRequest
from tests.factories import GIB, make_node

CONTROL = "ab" * 32  # the sha256 of an uploaded control image
INIT, MASK = "cd" * 32, "ef" * 32

TINY = ModelInfo("tiny", GIB, "float16", "base", "sd1")
LORA = ModelInfo("detail", GIB // 8, "float16", "lora", "sd1")
CANNY = ModelInfo("canny", GIB, "float16", "controlnet", "sd1")
INPAINT = ModelInfo("tiny-inpaint", GIB, "float16", "inpaint", "sd1")


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(
    scenario: Callable[[Admission], Coroutine[Any, Any, None]],
    tmp_path: Path,
    nodes: dict[str, tuple[ModelInfo, ...]],
) -> None:
    """Runs the scenario with these nodes connected (id -> its models), and
    alice's uploads of the control image, an init image and its mask."""

    async def main() -> None:
        clock = Clock()
        store = Store(f"sqlite:///{tmp_path / 'jobs.db'}", clock=clock)
        store.migrate()
        for sha in (CONTROL, INIT, MASK):
            store.inputs.record("alice", InputInfo(sha, 1000, 64, 64, "PNG"))
        db = Database(store)
        cluster = Cluster()
        for node_id, models in nodes.items():
            cluster.connect(replace(make_node(node_id), models=models), now=clock())
        runtime = Runtime(db, cluster, EventHub(), ImageStore(tmp_path / "images"), clock,
                          EstimateBook())  # fmt: skip
        try:
            await scenario(Admission(runtime, node_window_seconds=60.0, max_attempts=3))
        finally:
            db.close()

    asyncio.run(main())


def request(**fields: Any) -> SpecRequest:
    return SpecRequest("a lighthouse", width=64, height=64, steps=4, **fields)


async def refused(admitted: Admission, spec: SpecRequest, error: type[Exception]) -> Exception:
    """The error the submit raises; and nothing was queued or stored."""
    with pytest.raises(error) as raised:
        await admitted.submit(spec, "alice")
    assert len(admitted.queue) == 0
    assert await admitted.db.run(admitted.db.store.queued_ids) == set()
    return raised.value


def test_an_unknown_lora_is_refused_naming_its_field(tmp_path: Path) -> None:
    async def scenario(admitted: Admission) -> None:
        found = await refused(admitted, request(loras=(LoraWeight("film"),)), InvalidArgument)
        assert isinstance(found, InvalidArgument)
        assert found.field == "loras[0].name"
        assert str(found) == (
            "loras[0].name: no node in the window has LoRA 'film'; LoRAs seen: detail"
        )
        # A tag in the prompt is a LoRA too; it comes after the explicit ones.
        tagged = request(loras=(LoraWeight("detail"),))
        tagged = replace(tagged, prompt="a lighthouse <lora:film:0.5>")
        found = await refused(admitted, tagged, InvalidArgument)
        assert isinstance(found, InvalidArgument) and found.field == "loras[1].name"

    run(scenario, tmp_path, {"n1": (TINY, LORA)})


def test_an_unknown_controlnet_is_refused_naming_its_field(tmp_path: Path) -> None:
    async def scenario(admitted: Admission) -> None:
        unit = ControlNetUnit("depth", CONTROL)
        found = await refused(admitted, request(controlnets=(unit,)), InvalidArgument)
        assert isinstance(found, InvalidArgument)
        assert found.field == "controlnets[0].model"
        # A LoRA's name is not a ControlNet's.
        lora_named = ControlNetUnit("detail", CONTROL)
        found = await refused(admitted, request(controlnets=(lora_named,)), InvalidArgument)
        assert isinstance(found, InvalidArgument) and found.field == "controlnets[0].model"

    run(scenario, tmp_path, {"n1": (TINY, LORA, CANNY)})


def test_loras_and_controlnets_a_node_has_are_accepted(tmp_path: Path) -> None:
    async def scenario(admitted: Admission) -> None:
        job, created = await admitted.submit(
            request(loras=(LoraWeight("detail", 0.6),), controlnets=(ControlNetUnit("canny", CONTROL),)),
            "alice",
        )  # fmt: skip
        assert created
        assert job.spec.loras == (LoraWeight("detail", 0.6),)
        assert [unit.model for unit in job.spec.controlnets] == ["canny"]
        assert admitted.queue.get(job.id) is not None

    run(scenario, tmp_path, {"n1": (TINY, LORA, CANNY)})


def test_a_control_image_must_be_the_owners_upload(tmp_path: Path) -> None:
    async def scenario(admitted: Admission) -> None:
        unit = ControlNetUnit("canny", CONTROL)
        with pytest.raises(InvalidArgument) as raised:
            await admitted.submit(request(controlnets=(unit,)), "bob")
        assert raised.value.field == "controlnets[0].image"
        job, _ = await admitted.submit(request(controlnets=(unit,)), "alice")
        assert job.spec.controlnets[0].image == CONTROL

    run(scenario, tmp_path, {"n1": (TINY, CANNY)})


def test_a_lora_and_a_controlnet_on_different_nodes_are_refused(tmp_path: Path) -> None:
    async def scenario(admitted: Admission) -> None:
        spec = request(
            loras=(LoraWeight("detail"),), controlnets=(ControlNetUnit("canny", CONTROL),)
        )
        found = await refused(admitted, spec, FailedPrecondition)
        assert str(found) == (
            "no node seen recently has model 'tiny', LoRA 'detail', ControlNet 'canny' "
            "together; the closest, host-a, lacks ControlNet 'canny'"
        )
        # Each alone runs.
        for alone in (request(loras=(LoraWeight("detail"),)),
                      request(controlnets=(ControlNetUnit("canny", CONTROL),))):  # fmt: skip
            _, created = await admitted.submit(alone, "alice")
            assert created

    run(scenario, tmp_path, {"a": (TINY, LORA), "b": (TINY, CANNY)})


def test_an_inpaint_model_is_not_a_model_a_job_names(tmp_path: Path) -> None:
    async def scenario(admitted: Admission) -> None:
        found = await refused(admitted, request(model="tiny-inpaint"), InvalidArgument)
        assert isinstance(found, InvalidArgument) and found.field == "model"
        # An inpainting job names its base model.
        job, _ = await admitted.submit(request(init_image=INIT, mask=MASK), "alice")
        assert (job.spec.model, job.spec.kind.value) == ("tiny", "inpaint")

    run(scenario, tmp_path, {"n1": (TINY, INPAINT)})
