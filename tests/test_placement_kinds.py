"""Placement of the kinds beyond txt2img: LoRAs and ControlNets go only to
nodes that have them (and fit the base model's family), with the reason
for the others; residency counts them; a job no one node could run is
unresolvable; each kind learns its peaks under its own variant key, with
its work and first estimate counting what really runs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from scheduler.estimator import ACTIVATION_BYTES_PER_PIXEL, GIB, MARGIN_BYTES, EstimateBook
from scheduler.placement import (
    Demand,
    ExtraModel,
    GpuView,
    MissingTogether,
    Placed,
    Planner,
    Reason,
    SeenGpu,
    Unplaced,
    Unresolvable,
    demand_for,
    place,
    rejection,
    shape_of,
    unresolvable,
    variant_of,
    work_of,
)
from scheduler.placement.scores import resident_score
from sdmesh.kinds import ControlNetUnit, LoraWeight, ModelKind
from sdmesh.spec import MemoryMode
from tests.factories import make_demand, make_gpu, make_spec

LORA, CONTROLNET, BASE = ModelKind.LORA, ModelKind.CONTROLNET, ModelKind.BASE
SHA = "ab" * 32
CANNY = ExtraModel(CONTROLNET, "canny-sdxl", int(2.5 * GIB))
DETAIL = ExtraModel(LORA, "detail", GIB // 4)


def gpu(node_id: str, **overrides: Any) -> GpuView:
    values: dict[str, Any] = {"models": ("sdxl",)}
    values.update(overrides)
    for name in ("loras", "controlnets", "resident_extras"):
        if name in values:
            values[name] = frozenset(values[name])
    return make_gpu(node_id, **values)


def demand(*extras: ExtraModel, weight_bytes: int = 0, **overrides: Any) -> Demand:
    return replace(make_demand(model="sdxl", extras=extras, **overrides), weight_bytes=weight_bytes)


def test_a_controlnet_job_goes_only_to_the_node_with_that_controlnet() -> None:
    without, with_it = gpu("a"), gpu("b", controlnets={"canny-sdxl"})
    decision = place(demand(CANNY), [without, with_it])
    assert isinstance(decision, Placed)
    assert decision.gpu.node_id == "b"
    found = rejection(demand(CANNY), without)
    assert found is not None
    assert found.reason is Reason.CONTROLNET_MISSING and found.unresolvable
    assert found.detail == "no ControlNet 'canny-sdxl' on this node"
    # With only the node without it, the reason is what the job's waiting text says.
    waiting = place(demand(CANNY), [without])
    assert isinstance(waiting, Unplaced)
    assert waiting.reason == (
        "0/1 GPUs: 1 ControlNet not on node (no ControlNet 'canny-sdxl' on this node)"
    )


def test_a_lora_job_goes_only_to_the_node_with_that_lora() -> None:
    without, with_it = gpu("a", loras={"other"}), gpu("b", loras={"detail"})
    decision = place(demand(DETAIL), [without, with_it])
    assert isinstance(decision, Placed)
    assert decision.gpu.node_id == "b"
    found = rejection(demand(DETAIL), without)
    assert found is not None
    assert (found.kind, found.detail) == ("LoRA not on node", "no LoRA 'detail' on this node")
    # Every LoRA is checked, not just the first.
    both = demand(DETAIL, ExtraModel(LORA, "film"))
    found = rejection(both, with_it)
    assert found is not None and found.detail == "no LoRA 'film' on this node"


def test_the_planner_gives_the_reason_to_a_job_that_waits() -> None:
    planner = Planner([gpu("a"), gpu("b", active=2, controlnets={"canny-sdxl"})])
    decision = planner.decide(demand(CANNY, job_id="cn"))
    assert isinstance(decision, Unplaced)
    why = planner.why(demand(CANNY, job_id="cn"))
    assert isinstance(why, Unplaced)
    # counts sorted by how many, then by name
    assert why.reason == (
        "0/2 GPUs: 1 ControlNet not on node (no ControlNet 'canny-sdxl' on this node), "
        "1 busy (2 jobs)"
    )
    # A plain job of the same needs is not held back by the remembered verdict.
    assert isinstance(planner.decide(demand(job_id="plain")), Placed)


@pytest.mark.parametrize(
    ("families", "detail"),
    [
        # an SDXL LoRA on an SD 1.5 model
        ({("base", "sdxl"): "sd1", ("lora", "detail"): "sdxl"},
         "LoRA 'detail' is for sdxl, model 'sdxl' is sd1"),
        ({("base", "sdxl"): "sdxl", ("controlnet", "canny-sdxl"): "sd1"},
         "ControlNet 'canny-sdxl' is for sd1, model 'sdxl' is sdxl"),
        # a family unknown on either side is not judged
        ({("lora", "detail"): "sdxl", ("controlnet", "canny-sdxl"): "sd1"}, None),
        ({("base", "sdxl"): "sd1"}, None),
        ({("base", "sdxl"): "sdxl", ("lora", "detail"): "sdxl"}, None),
    ],
)  # fmt: skip
def test_a_family_mismatch_is_rejected_with_its_reason(
    families: dict[tuple[str, str], str], detail: str | None
) -> None:
    node = gpu("a", loras={"detail"}, controlnets={"canny-sdxl"}, families=families)
    found = rejection(demand(DETAIL, CANNY), node)
    if detail is None:
        assert found is None
    else:
        assert found is not None
        assert (found.reason, found.unresolvable, found.detail) == (
            Reason.FAMILY_MISMATCH,
            True,
            detail,
        )


def test_an_inpaint_job_needs_only_its_base_model() -> None:
    spec = make_spec(model="sdxl", init_image=SHA, mask="cd" * 32)
    found = demand_for("j", spec, 0, EstimateBook())
    assert found.extras == ()
    assert rejection(found, gpu("a")) is None


def test_residency_prefers_the_gpu_with_the_controlnet_loaded() -> None:
    base = demand(CANNY, weight_bytes=int(6.5 * GIB))
    cold = gpu("a", controlnets={"canny-sdxl"}, resident={"sdxl"})
    warm = gpu("b", controlnets={"canny-sdxl"}, resident={"sdxl"},
               resident_extras={(CONTROLNET, "canny-sdxl")})  # fmt: skip
    # SDXL (6.5 GiB) resident, its ControlNet (2.5 GiB) not: 100 x 6.5 / 9 = 72.2
    assert resident_score(base, cold) == pytest.approx(100 * 6.5 / 9, abs=1e-9)
    assert resident_score(base, warm) == pytest.approx(100.0, abs=1e-9)
    # nothing loaded
    assert resident_score(base, gpu("c")) == pytest.approx(0.0, abs=1e-9)
    # sizes unknown: each part counts the same, 1 of 2 loaded
    assert resident_score(demand(ExtraModel(CONTROLNET, "canny-sdxl")), cold) == pytest.approx(
        50.0, abs=1e-9
    )
    decision = place(base, [cold, warm])
    assert isinstance(decision, Placed)
    assert decision.gpu.node_id == "b"
    assert "resident 100" in decision.explanation


def test_a_plain_job_scores_residency_as_before() -> None:
    assert resident_score(demand(), gpu("a", resident={"sdxl"})) == 100.0
    assert resident_score(demand(), gpu("a")) == 0.0


def spec_of(**overrides: Any) -> Any:
    values: dict[str, Any] = {"model": "sdxl", "width": 512, "height": 512, "steps": 20}
    values.update(overrides)
    return make_spec(**values)


@pytest.mark.parametrize(
    ("overrides", "variant"),
    [
        ({}, ""),  # plain txt2img keeps the key older peaks were learned under
        ({"n_iter": 4}, ""),  # batches run one after another: the same peak
        ({"init_image": SHA}, "img2img"),
        ({"init_image": SHA, "mask": "cd" * 32}, "inpaint"),
        ({"enable_hr": True, "hr_scale": 2.0}, "txt2img+hires:1024x1024"),
        ({"enable_hr": True, "hr_resize_x": 768, "hr_resize_y": 640}, "txt2img+hires:768x640"),
        ({"loras": (LoraWeight("b", 0.5), LoraWeight("a"))}, "txt2img+lora:a,b"),
        ({"init_image": SHA, "controlnets": (ControlNetUnit("y", SHA), ControlNetUnit("x", SHA))},
         "img2img+cn:x,y"),
        ({"enable_hr": True, "loras": (LoraWeight("a"),), "controlnets": (ControlNetUnit("x", SHA),)},
         "txt2img+hires:1024x1024+lora:a+cn:x"),
    ],
)  # fmt: skip
def test_each_kind_has_its_own_variant_key(overrides: dict[str, Any], variant: str) -> None:
    shape = shape_of(spec_of(**overrides))
    assert variant_of(spec_of(**overrides)) == variant
    assert shape.key(MemoryMode.FULL) == ("sdxl", 512 * 512, 1, MemoryMode.FULL, variant)


def test_a_variant_of_many_long_names_fits_its_column_and_stays_distinct() -> None:
    def many(last: str) -> str:
        loras = (*(LoraWeight(f"{'l' * 120}{i:02d}") for i in range(15)), LoraWeight(last))
        return variant_of(spec_of(loras=loras))

    first, second = many("a" * 128), many("b" * 128)
    assert len(first) == len(second) == 256
    assert first != second
    assert first == many("a" * 128)  # the same job, the same key


def test_peaks_learned_for_one_kind_do_not_change_another() -> None:
    book = EstimateBook()
    img2img, plain = shape_of(spec_of(init_image=SHA)), shape_of(spec_of())
    book.record_peak(img2img, MemoryMode.FULL, 9 * GIB)
    assert book.need(2 * GIB, img2img, MemoryMode.FULL).learned
    assert not book.need(2 * GIB, plain, MemoryMode.FULL).learned


@pytest.mark.parametrize(
    ("overrides", "megapixel_steps"),
    [
        # 512 x 512 = 0.262144 MP x 20 steps
        ({}, 0.262144 * 20),
        ({"batch_size": 2, "n_iter": 3}, 0.262144 * 20 * 2 * 3),
        # img2img at 0.75: int(20 x 0.75) = 15 steps
        ({"init_image": SHA}, 0.262144 * 15),
        # inpainting at 0.33: int(6.6) = 6 steps
        ({"init_image": SHA, "mask": "cd" * 32, "denoising_strength": 0.33}, 0.262144 * 6),
        # hires x2 at 0.7: 20 steps at 512, then int(20 x 0.7) = 14 at 1024 x 1024
        ({"enable_hr": True, "hr_scale": 2.0, "denoising_strength": 0.7},
         0.262144 * 20 + 1.048576 * 14),
        # a second pass of 10 steps at 0.5 (5 run), twice
        ({"enable_hr": True, "hr_second_pass_steps": 10, "denoising_strength": 0.5,
          "n_iter": 2}, (0.262144 * 20 + 1.048576 * 5) * 2),
    ],
)  # fmt: skip
def test_the_work_counts_what_really_runs(
    overrides: dict[str, Any], megapixel_steps: float
) -> None:
    assert work_of(spec_of(**overrides)) == pytest.approx(megapixel_steps, rel=1e-9)


def test_the_first_estimate_adds_extras_weights_and_the_larger_pass() -> None:
    book = EstimateBook()
    weights: dict[tuple[str, str], int] = {(LORA, "a"): GIB // 4, (CONTROLNET, "x"): 2 * GIB}
    spec = spec_of(loras=(LoraWeight("a"),), controlnets=(ControlNetUnit("x", SHA),))
    found = demand_for("j", spec, 6 * GIB, book, extra_weights=weights)
    assert found.extras == (ExtraModel(LORA, "a", GIB // 4), ExtraModel(CONTROLNET, "x", 2 * GIB))
    assert found.weight_bytes == 6 * GIB
    # 6 + 0.25 + 2 GiB of weights + 512 x 512 x 3 KiB (0.75 GiB) + 0.5 GiB margin = 9.5 GiB
    assert found.needs[0].vram_bytes == int(9.5 * GIB)
    hires = demand_for("j", spec_of(enable_hr=True, hr_scale=2.0), 6 * GIB, book)
    # the second pass's 1024 x 1024 activations (3 GiB), not the first's
    assert hires.needs[0].vram_bytes == 6 * GIB + 1024 * 1024 * ACTIVATION_BYTES_PER_PIXEL + (
        MARGIN_BYTES
    )
    assert hires.needs[0].vram_bytes == int(9.5 * GIB)


SEEN_MODELS = {
    "lora-node": frozenset({(BASE, "sdxl"), (LORA, "detail")}),
    "cn-node": frozenset({(BASE, "sdxl"), (CONTROLNET, "canny-sdxl")}),
}


def seen(name: str, total_gib: float = 24, **overrides: Any) -> SeenGpu:
    return SeenGpu(name, 0, int(total_gib * GIB), {}, SEEN_MODELS.get(name), **overrides)


def test_a_job_whose_lora_and_controlnet_live_on_different_nodes_is_unresolvable() -> None:
    problem = unresolvable(demand(DETAIL, CANNY), [seen("lora-node"), seen("cn-node")])
    assert isinstance(problem, MissingTogether)
    assert problem.text == (
        "no node seen recently has model 'sdxl', LoRA 'detail', ControlNet 'canny-sdxl' "
        "together; the closest, cn-node, lacks LoRA 'detail'"
    )
    # Each alone is fine.
    assert unresolvable(demand(DETAIL), [seen("lora-node"), seen("cn-node")]) is None
    assert unresolvable(demand(CANNY), [seen("lora-node"), seen("cn-node")]) is None
    # A node whose models are not known is given the benefit of the doubt.
    assert unresolvable(demand(DETAIL, CANNY), [seen("cn-node"), seen("other")]) is None


def test_a_family_mismatch_on_every_node_is_unresolvable() -> None:
    families = {(BASE, "sdxl"): "sd1", (LORA, "detail"): "sdxl"}
    problem = unresolvable(demand(DETAIL), [seen("lora-node", families=families)])
    assert isinstance(problem, MissingTogether)
    assert problem.lacking == ("LoRA 'detail' for sd1 (it has one for sdxl)",)


def test_vram_is_judged_on_the_nodes_that_have_the_models() -> None:
    # The big card lacks the ControlNet; the node with it has 8 GiB (7.5 usable).
    nodes = [seen("cn-node", total_gib=8), seen("lora-node", total_gib=80)]
    problem = unresolvable(demand(CANNY, vram_gib=10), nodes)
    assert isinstance(problem, Unresolvable)
    assert problem.biggest.node_name == "cn-node"
