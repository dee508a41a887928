"""Simulated GPUs behave like real cards where the scheduler can see it:
memory held while a job runs, the real out-of-memory error from inside the
pipeline call, and times from the profile, never from the scheduler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpu_node.catalog import Catalog
from gpu_node.profiles import CUDA_CONTEXT_BYTES, PROFILES, profile_for, true_peak
from gpu_node.runner import Task
from gpu_node.simulated import (
    SimulatedProbe,
    parse_models,
    parse_sizes,
    parse_speeds,
)
from sdmesh.domain import AttemptOutcome, AttemptUpdate, Ended, ImageReady, Progress
from sdmesh.spec import MemoryMode
from tests.factories import make_spec
from tests.workers import run_worker

GIB = 2**30


def test_flags_parse_with_clear_errors() -> None:
    assert parse_sizes("24GiB,12GiB,512MiB") == [24 * GIB, 12 * GIB, 512 * 2**20]
    assert parse_speeds("1.0,0.5", 2) == [1.0, 0.5]
    assert parse_speeds("2", 3) == [2.0, 2.0, 2.0]
    assert parse_models("sdxl=6.9GiB,flux=23GiB") == {"sdxl": int(6.9 * GIB), "flux": 23 * GIB}
    with pytest.raises(ValueError, match="--simulate-gpus: expected a size like 24GiB"):
        parse_sizes("24")
    with pytest.raises(ValueError, match="--simulate-speed: expected 2 positive numbers"):
        parse_speeds("1,2,3", 2)
    with pytest.raises(ValueError, match="--simulate-models: expected NAME=SIZE"):
        parse_models("sdxl")


@pytest.fixture
def catalog(tiny_data_dir: Path) -> Catalog:
    catalog = Catalog(tiny_data_dir, None, {"sdxl": int(6.9 * GIB)})
    catalog.scan()
    return catalog


def run(
    probe: SimulatedProbe, catalog: Catalog, tasks: list[Task], index: int = 0
) -> list[AttemptUpdate]:
    backend = probe.backend(index, catalog)
    return run_worker(probe.devices()[index], backend, [[task] for task in tasks])


def ended(events: list[AttemptUpdate]) -> list[Ended]:
    return [e.body for e in events if isinstance(e.body, Ended)]


def test_a_synthetic_model_runs_on_the_timing_model_and_holds_memory(catalog: Catalog) -> None:
    probe = SimulatedProbe([16 * GIB], time_scale=0.001)
    card = probe.cards[0]

    spec = make_spec(model="sdxl", width=1024, height=1024, steps=5)
    events = run(probe, catalog, [Task("j", 1, spec, MemoryMode.FULL)])
    [result] = ended(events)
    assert result.outcome is AttemptOutcome.SUCCEEDED
    peak = true_peak(PROFILES["sdxl"], 1024, 1024, 1, MemoryMode.FULL)
    assert result.profile.peak_vram_bytes == peak
    assert [b.step for b in (e.body for e in events) if isinstance(b, Progress)] == [1, 2, 3, 4, 5]
    [image] = [e.body for e in events if isinstance(e.body, ImageReady)]
    assert (image.width, image.height) == (1024, 1024)
    # After the job, the model stays resident and its activations are freed.
    assert card.resident == ("sdxl", int(6.9 * GIB))
    assert card.free_bytes() == 16 * GIB - CUDA_CONTEXT_BYTES - int(6.9 * GIB)
    [stats] = probe.stats()
    assert stats.free_bytes == card.free_bytes()


def test_a_job_that_does_not_fit_raises_the_real_oom_inside_the_call(catalog: Catalog) -> None:
    probe = SimulatedProbe([8 * GIB], time_scale=0.001)
    spec = make_spec(model="sdxl", width=1024, height=1024, steps=3)
    # True peak ~ 6.9 GiB of weights + 4.2 KiB x 1 MP = ~11 GiB > 8 GiB.
    events = run(
        probe,
        catalog,
        [
            Task("big", 1, spec, MemoryMode.FULL),
            Task(
                "small", 1, make_spec(model="sdxl", width=256, height=256, steps=2), MemoryMode.FULL
            ),
        ],
    )
    first, second = ended(events)
    assert (first.outcome, first.error_kind) == (AttemptOutcome.FAILED, "oom")
    assert first.reason.startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate")
    # It reports what it had: the resident weights plus the free memory.
    assert first.profile.peak_vram_bytes == 8 * GIB - CUDA_CONTEXT_BYTES
    # The card recovers: the next job runs.
    assert second.outcome is AttemptOutcome.SUCCEEDED
    assert not [e for e in events if e.job_id == "big" and isinstance(e.body, Progress)]


def test_the_real_tiny_pipeline_runs_on_a_simulated_card(catalog: Catalog) -> None:
    probe = SimulatedProbe([GIB, CUDA_CONTEXT_BYTES + 2**20], time_scale=0.001)
    spec = make_spec(steps=3)
    [fits] = ended(run(probe, catalog, [Task("j", 1, spec, MemoryMode.FULL)], index=0))
    assert fits.outcome is AttemptOutcome.SUCCEEDED
    local = catalog.get("tiny")
    assert local is not None
    tiny = profile_for("tiny", local.weight_bytes)
    assert fits.profile.peak_vram_bytes == true_peak(tiny, 64, 64, 1, MemoryMode.FULL)
    # A card with 1 MiB to spare: the real pipeline starts, and fails at its
    # first step with torch's own error, as a real card would.
    [too_small] = ended(run(probe, catalog, [Task("j", 1, spec, MemoryMode.FULL)], index=1))
    assert (too_small.outcome, too_small.error_kind) == (AttemptOutcome.FAILED, "oom")
    assert issubclass(torch.OutOfMemoryError, RuntimeError)


def test_offload_keeps_weights_off_the_card_and_runs_slower(catalog: Catalog) -> None:
    # 12 GiB: full needs ~11.4 GiB with the context it cannot have; offload
    # needs 0.75 x 6.9 GiB + ~4.2 GiB of activations = ~9.4 GiB.
    probe = SimulatedProbe([12 * GIB], time_scale=0.001)
    spec = make_spec(model="sdxl", width=1024, height=1024, steps=2)
    [result] = ended(run(probe, catalog, [Task("j", 1, spec, MemoryMode.MODEL_OFFLOAD)]))
    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert result.profile.peak_vram_bytes == true_peak(
        PROFILES["sdxl"], 1024, 1024, 1, MemoryMode.MODEL_OFFLOAD
    )
    assert probe.cards[0].resident is None


def test_a_simulated_card_takes_every_kind_and_holds_controlnets_like_models(
    tiny_data_dir: Path,
) -> None:
    from PIL import Image

    from gpu_node.pipelines import ModelUnavailable
    from sdmesh.kinds import Kind, LoraWeight

    catalog = Catalog(
        tiny_data_dir,
        None,
        {"sdxl": int(6.9 * GIB), "controlnet:canny-sdxl": int(2.5 * GIB), "lora:detail": 2**27},
    )
    catalog.scan()
    probe = SimulatedProbe([24 * GIB], time_scale=0.001)
    backend = probe.backend(0, catalog)
    pipeline, _ = backend.pipeline(
        "sdxl",
        "Euler a",
        MemoryMode.FULL,
        task=Kind.IMG2IMG,
        controlnets=("canny-sdxl",),
        loras=(LoraWeight("detail", 0.8),),
    )
    # An img2img call gives its size by the image and runs steps * strength.
    image = Image.new("RGB", (1024, 768))
    [out] = pipeline(prompt="x", image=image, strength=0.5, num_inference_steps=4).images
    assert out.size == (1024, 768)
    assert pipeline.num_timesteps == 2
    held = {(m.kind, m.name): m.weight_bytes for m in backend.resident()}
    assert held == {("base", "sdxl"): int(6.9 * GIB), ("controlnet", "canny-sdxl"): int(2.5 * GIB)}
    backend.end_job()
    assert backend.hashes() == {}  # synthetic weights have no file to hash
    with pytest.raises(ModelUnavailable, match="no LoRA 'style' on this node"):
        backend.pipeline("sdxl", "Euler a", MemoryMode.FULL, loras=(LoraWeight("style"),))
    with pytest.raises(ModelUnavailable, match="no ControlNet 'depth' on this node"):
        backend.pipeline("sdxl", "Euler a", MemoryMode.FULL, controlnets=("depth",))
