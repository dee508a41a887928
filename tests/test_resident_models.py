"""Several models resident on one device: kept while their weights fit the
budget, the least recently used evicted first, all of them reported (in
full mode), the same on real and simulated cards."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gpu_node.backends import TorchBackend
from gpu_node.catalog import Catalog
from gpu_node.pipelines import PipelineCache, device_bytes
from gpu_node.profiles import CUDA_CONTEXT_BYTES
from gpu_node.runner import Task
from gpu_node.simulated import SimulatedProbe
from sdmesh.domain import AttemptOutcome, AttemptUpdate, DeviceInfo, Ended, Progress
from sdmesh.spec import MemoryMode
from tests.factories import make_spec
from tests.workers import run_worker

GIB = 2**30
MIB = 2**20
MODELS = ("tiny", "tiny-b", "tiny-c")
CPU = DeviceInfo(0, "CPU", "cpu-0", "cpu", 1)


@pytest.fixture(scope="module")
def three_models(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """tiny, plus two copies of it under other names in --models-dir."""
    models_dir = tmp_path_factory.mktemp("models")
    for name in MODELS[1:]:
        shutil.copytree(tiny_data_dir / "models" / "tiny", models_dir / name)
    catalog = Catalog(tiny_data_dir, models_dir)
    catalog.scan()
    return catalog


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def names(cache: PipelineCache | TorchBackend) -> list[str]:
    return [model.name for model in cache.resident()]


def test_models_stay_resident_and_are_reported_least_recently_used_first(
    three_models: Catalog,
) -> None:
    cache = PipelineCache("cpu", three_models)
    tiny, first_load = cache.get("tiny", "Euler a")
    assert first_load > 0
    cache.get("tiny-b", "Euler a")
    assert names(cache) == ["tiny", "tiny-b"]
    again, load_seconds = cache.get("tiny", "DDIM")
    assert (again, load_seconds) == (tiny, 0.0)
    assert names(cache) == ["tiny-b", "tiny"]
    # Each with the bytes and dtype it holds on the device: fp32 on a CPU.
    [info, _] = cache.resident()
    assert (info.weight_bytes, info.dtype) == (device_bytes(tiny), "float32")
    assert info.weight_bytes > 0


def test_a_model_that_does_not_fit_evicts_the_least_recently_used(three_models: Catalog) -> None:
    probe = PipelineCache("cpu", three_models)
    one_model = device_bytes(probe.get("tiny", "Euler a")[0])
    cache = PipelineCache("cpu", three_models, budget_bytes=int(2.5 * one_model))
    for name in ("tiny", "tiny-b", "tiny", "tiny-c"):
        cache.get(name, "Euler a")
    # tiny-c needed room for one more: tiny-b had been used least recently.
    assert names(cache) == ["tiny", "tiny-c"]
    assert cache.resident_bytes() == 2 * one_model
    assert cache.resident_bytes(besides="tiny") == one_model


def test_a_cpu_device_keeps_at_most_its_model_count(three_models: Catalog) -> None:
    cache = PipelineCache("cpu", three_models, max_models=2)
    for name in MODELS:
        cache.get(name, "Euler a")
    assert names(cache) == ["tiny-b", "tiny-c"]
    assert PipelineCache("cpu", three_models).max_models == 4
    assert PipelineCache("cuda:0", three_models).max_models is None  # its memory decides


class FakeLoads:
    """Stands in for diffusers loading onto a card we do not have: each
    pipeline holds `weights` bytes of fp32 parameters and tiny's real
    sampler config; a load can be made to run out of memory."""

    def __init__(self, catalog: Catalog, weights: int = 4096) -> None:
        from diffusers import EulerAncestralDiscreteScheduler

        local = catalog.get("tiny")
        assert local is not None and local.path is not None
        tiny = local.path
        self.scheduler = EulerAncestralDiscreteScheduler.from_pretrained(tiny / "scheduler")
        self.weights = weights
        self.loads: list[tuple[str, MemoryMode]] = []
        self.out_of_memory = 0  # the next loads that fail

    def __call__(self, path: Path, dtype: Any, mode: MemoryMode) -> Any:
        self.loads.append((path.name, mode))
        if self.out_of_memory:
            self.out_of_memory -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        unet = torch.nn.Linear(self.weights // 4, 1, bias=False)
        return SimpleNamespace(scheduler=self.scheduler, components={"unet": unet})


def card_cache(catalog: Catalog, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Any:
    cache = PipelineCache("cuda:0", catalog, **options)
    loads = FakeLoads(catalog)
    monkeypatch.setattr(cache, "_load", loads)
    return cache, loads


def test_an_offloaded_model_is_not_resident_and_is_kept_alone(
    three_models: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _ = card_cache(three_models, monkeypatch, budget_bytes=GIB)
    cache.get("tiny", "Euler a", MemoryMode.FULL)
    cache.get("tiny-b", "Euler a", MemoryMode.FULL)
    assert names(cache) == ["tiny", "tiny-b"]
    # Offloaded weights live in host memory; and a job run offloaded is one
    # the card is short of room for, so nothing else stays.
    cache.get("tiny-c", "Euler a", MemoryMode.MODEL_OFFLOAD)
    assert cache.resident() == ()
    cache.get("tiny", "Euler a", MemoryMode.AUTO)
    assert names(cache) == ["tiny"]


def test_a_load_that_runs_out_of_memory_evicts_the_least_used_and_tries_again(
    three_models: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, loads = card_cache(three_models, monkeypatch, budget_bytes=GIB)
    cache.get("tiny", "Euler a")
    cache.get("tiny-b", "Euler a")
    loads.out_of_memory = 1
    cache.get("tiny-c", "Euler a")
    assert names(cache) == ["tiny-b", "tiny-c"]
    # With nothing left to evict, the error is the job's.
    loads.out_of_memory = 3
    with pytest.raises(torch.OutOfMemoryError):
        cache.get("tiny", "Euler a")
    assert names(cache) == []


def test_the_peak_leaves_out_other_models_and_room_is_made_for_a_known_peak(
    three_models: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = torch.cuda
    backend = TorchBackend("cuda:0", three_models, budget_bytes=GIB)
    loads = FakeLoads(three_models, weights=10 * MIB)
    monkeypatch.setattr(backend.pipelines, "_load", loads)
    total = 100 * MIB
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *_: None)
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    # The card: 100 MiB, of which the resident weights are used.
    monkeypatch.setattr(cuda, "memory_allocated", lambda *_: backend.pipelines.resident_bytes())
    monkeypatch.setattr(cuda, "memory_reserved", lambda *_: backend.pipelines.resident_bytes())
    monkeypatch.setattr(
        cuda, "mem_get_info", lambda *_: (total - backend.pipelines.resident_bytes(), total)
    )
    for name in MODELS:
        backend.pipeline(name, "Euler a", MemoryMode.FULL)
    backend.pipeline("tiny", "Euler a", MemoryMode.FULL)
    assert names(backend) == ["tiny-b", "tiny-c", "tiny"]
    # tiny's job peaked at 45 MiB with all three resident (30 MiB): its own
    # peak is 45 - 20 (the two others) = 25 MiB.
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *_: 45 * MIB)
    assert backend.peak_bytes() == 25 * MIB
    # A job of tiny peaking at 85 MiB needs 85 - 10 = 75 MiB free; 70 are:
    # tiny-b, the least recently used, goes (80 free).
    assert backend.make_room("tiny", 85 * MIB)
    assert names(backend) == ["tiny-c", "tiny"]
    assert not backend.make_room("tiny", 85 * MIB)  # it fits now
    assert backend.evict_others("tiny")
    assert names(backend) == ["tiny"]
    assert not backend.evict_others("tiny")


def run(backend: Any, tasks: list[Task]) -> list[AttemptUpdate]:
    return run_worker(CPU, backend, [[task] for task in tasks])


def test_a_job_out_of_memory_beside_other_models_evicts_them_and_runs_again(
    three_models: Catalog,
) -> None:
    class Crowded(TorchBackend):
        """Runs out of memory while another model is resident."""

        def pipeline(
            self, model: str, sampler: str, mode: MemoryMode, **kinds: Any
        ) -> tuple[Any, float]:
            pipeline, seconds = super().pipeline(model, sampler, mode, **kinds)

            def call(**arguments: Any) -> Any:
                if len(self.resident()) > 1:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
                return pipeline(**arguments)

            return call, seconds

    backend = Crowded("cpu", three_models)
    events = run(
        backend,
        [
            Task("alone", 1, make_spec(model="tiny", steps=2), MemoryMode.AUTO),
            Task("crowded", 1, make_spec(model="tiny-b", steps=2), MemoryMode.AUTO),
        ],
    )
    ends = {e.job_id: e.body for e in events if isinstance(e.body, Ended)}
    assert ends["alone"].outcome is AttemptOutcome.SUCCEEDED
    assert ends["crowded"].outcome is AttemptOutcome.SUCCEEDED
    steps = [e.body.step for e in events if e.job_id == "crowded" and isinstance(e.body, Progress)]
    assert steps == [1, 2]
    assert names(backend) == ["tiny-b"]


def test_simulated_cards_keep_several_models_and_evict_the_least_recently_used(
    tiny_data_dir: Path,
) -> None:
    catalog = Catalog(
        tiny_data_dir, None, {"sdxl": int(6.9 * GIB), "sd15": 2 * GIB, "big": 12 * GIB}
    )
    catalog.scan()
    probe = SimulatedProbe([24 * GIB], time_scale=0.001)
    card, backend = probe.cards[0], probe.backend(0, catalog)

    def job(name: str, model: str, size: int) -> Task:
        return Task(
            name, 1, make_spec(model=model, width=size, height=size, steps=2), MemoryMode.FULL
        )

    run(backend, [job("a", "sdxl", 512), job("b", "sd15", 512), job("c", "big", 512)])
    # 6.9 + 2 + 12 = 20.9 GiB of weights fit beside the 0.4 GiB context.
    assert [m.name for m in backend.resident()] == ["sdxl", "sd15", "big"]
    assert [m.weight_bytes for m in backend.resident()] == [int(6.9 * GIB), 2 * GIB, 12 * GIB]
    held = int(6.9 * GIB) + 2 * GIB + 12 * GIB
    assert card.free_bytes() == 24 * GIB - CUDA_CONTEXT_BYTES - held
    # big at 1024 px needs ~4.2 GiB of activations (x noise); 2.7 GiB are
    # free: sdxl, used least recently, is evicted for it, sd15 stays.
    [ended] = [e.body for e in run(backend, [job("d", "big", 1024)]) if isinstance(e.body, Ended)]
    assert ended.outcome is AttemptOutcome.SUCCEEDED
    assert [m.name for m in backend.resident()] == ["sd15", "big"]
    # sdxl comes back beside them (9.6 GiB free) without evicting anything.
    run(backend, [job("e", "sdxl", 512)])
    assert [m.name for m in backend.resident()] == ["sd15", "big", "sdxl"]
    assert card.resident == ("sdxl", int(6.9 * GIB))
    [stats] = probe.stats()
    assert stats.free_bytes == card.free_bytes()


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    catalog = Catalog(tmp_path_factory.mktemp("agent"), None, tiny_variants=True)
    catalog.scan()
    return catalog


def test_controlnets_are_held_and_evicted_like_models_but_never_from_their_job(
    variants: Catalog,
) -> None:
    from sdmesh.kinds import Kind

    tiny, canny = variants.get("tiny"), variants.get("tiny-canny", "controlnet")
    assert tiny is not None and canny is not None
    # Room for tiny and half of the ControlNet: the job needs both, so the
    # ControlNet's load evicts nothing it uses.
    cache = PipelineCache("cpu", variants, budget_bytes=tiny.weight_bytes + canny.weight_bytes // 2)
    cache.get("tiny", "Euler a", controlnets=("tiny-canny",))
    held = {(m.kind, m.name): m.weight_bytes for m in cache.resident()}
    assert list(held) == [("base", "tiny"), ("controlnet", "tiny-canny")]
    assert cache.resident_bytes() == sum(held.values())
    # An inpainting job loads tiny-inpaint: the least recently used go, the
    # ControlNet too (tiny-inpaint and it do not fit together).
    cache.get("tiny", "Euler a", task=Kind.INPAINT)
    assert names(cache) == ["tiny-inpaint"]
