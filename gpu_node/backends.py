"""What a device worker runs jobs through: it hands out a pipeline for a
model in a memory mode (for a job's kind, with its ControlNets and LoRAs),
switches the LoRAs off after the job, evicts idle resident models when a
job needs their room, and reports the peak memory a job used.

`TorchBackend` is the real thing: diffusers pipelines on a CUDA card or the
CPU, with torch's own peak counter. Simulated cards (`gpu_node.simulated`)
implement the same protocol.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from typing import Any, Protocol

from gpu_node.catalog import Catalog
from gpu_node.pipelines import PipelineCache
from sdmesh.domain import ModelInfo
from sdmesh.kinds import Kind, LoraWeight
from sdmesh.spec import MemoryMode


class Backend(Protocol):
    def pipeline(
        self,
        model: str,
        sampler: str,
        mode: MemoryMode,
        *,
        task: Kind = Kind.TXT2IMG,
        controlnets: tuple[str, ...] = (),
        loras: tuple[LoraWeight, ...] = (),
    ) -> tuple[Any, float]:
        """A callable with the signature of the diffusers pipeline for
        `task` (its ControlNet variant when `controlnets` are given), the
        sampler applied and the LoRAs active, and the seconds spent loading
        anything (0 when all was resident). Raises ModelUnavailable naming
        what the node lacks."""
        ...

    def end_job(self) -> None:
        """After every job, however it ended: switches the LoRAs off, so a
        later job without them gives the picture a card that never loaded
        one gives."""
        ...

    def hashes(self) -> Mapping[str, str]:
        """ "lora:NAME" / "controlnet:NAME" -> the sha256 of its weights,
        for the infotext."""
        ...

    def resident(self) -> tuple[ModelInfo, ...]:
        """The models, ControlNets and LoRAs whose weights are on the
        device, least recently used first."""
        ...

    def begin_job(self) -> None:
        """Resets the peak-memory counter."""
        ...

    def peak_bytes(self) -> int:
        """The most memory the job had: its peak, or, after an out-of-memory,
        what it had when it failed; the weights of other resident models are
        not counted. 0 when the device cannot tell."""
        ...

    def make_room(self, model: str, peak_bytes: int) -> bool:
        """Before a job of `model` that last peaked at `peak_bytes` (its
        weights included): evicts other resident models, least recently used
        first, until it fits. True when it evicted any."""
        ...

    def evict_others(self, model: str) -> bool:
        """Evicts every resident model but `model`, after a job ran out of
        memory beside them. True when it evicted any."""
        ...

    def release(self, *, collect: bool = False) -> None:
        """Gives cached memory back after a job, so free memory is real.
        `collect`: run the cycle collector first, for an attempt that ended
        by an exception, whose traceback may hold tensors in cycles."""
        ...

    def health_check(self) -> str:
        """Runs a small computation on the device and waits for it; returns
        what was checked, or raises. On a hung device it hangs too."""
        ...


class TorchBackend:
    def __init__(
        self, torch_device: str, catalog: Catalog, budget_bytes: int | None = None
    ) -> None:
        self.torch_device = torch_device
        self.pipelines = PipelineCache(torch_device, catalog, budget_bytes)
        self.cuda = torch_device.startswith("cuda")
        self._model: str | None = None  # the running job's

    def pipeline(
        self,
        model: str,
        sampler: str,
        mode: MemoryMode,
        *,
        task: Kind = Kind.TXT2IMG,
        controlnets: tuple[str, ...] = (),
        loras: tuple[LoraWeight, ...] = (),
    ) -> tuple[Any, float]:
        self._model = model
        extras: dict[str, Any] = {}
        if task is not Kind.TXT2IMG or controlnets or loras:
            extras = {"task": task, "controlnets": controlnets, "loras": loras}
        pipeline, load_seconds = self.pipelines.get(model, sampler, mode, **extras)
        self.begin_job()  # the job's peak, not the load's
        return pipeline, load_seconds

    def end_job(self) -> None:
        self.pipelines.end_job()

    def hashes(self) -> Mapping[str, str]:
        return self.pipelines.hashes()

    def resident(self) -> tuple[ModelInfo, ...]:
        return self.pipelines.resident()

    def begin_job(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_bytes(self) -> int:
        if not self.cuda:
            return 0
        import torch

        others = self.pipelines.resident_bytes(besides=self._model, keep=self._job_keys())
        return max(0, int(torch.cuda.max_memory_allocated(self.torch_device)) - others)

    def make_room(self, model: str, peak_bytes: int) -> bool:
        if not self.cuda or peak_bytes <= 0:
            return False  # host memory is the host's to manage
        import torch

        keys = self._job_keys(model)
        own = self.pipelines.resident_bytes() - self.pipelines.resident_bytes(
            besides=model, keep=keys
        )
        evicted = False
        while True:
            free, _ = torch.cuda.mem_get_info(self.torch_device)
            cached = torch.cuda.memory_reserved(self.torch_device) - torch.cuda.memory_allocated(
                self.torch_device
            )
            if free + cached >= peak_bytes - own or not self.pipelines.evict_least_used(
                keep=model, keep_keys=keys
            ):
                if evicted:
                    self.begin_job()  # the evicted weights were in the counter's start
                return evicted
            evicted = True

    def evict_others(self, model: str) -> bool:
        evicted = False
        while self.pipelines.evict_least_used(keep=model, keep_keys=self._job_keys(model)):
            evicted = True
        return evicted

    def _job_keys(self, model: str | None = None) -> frozenset[tuple[str, str]]:
        """What the running job of `model` holds (its ControlNets)."""
        if model is not None and model != self._model:
            return frozenset()
        return self.pipelines.job_keys

    def release(self, *, collect: bool = False) -> None:
        if collect:
            gc.collect()
        if self.cuda:
            import torch

            # What NVML reports as free (and placement plans with) counts the
            # allocator's cache as used: hand it back after every job.
            torch.cuda.empty_cache()

    def health_check(self) -> str:
        import torch

        started = time.monotonic()
        a = torch.ones((256, 256), device=self.torch_device)
        total = float((a @ a).sum().item())  # .item() waits for the device
        if total != 256.0**3:
            raise RuntimeError(f"a 256x256 matmul on {self.torch_device} gave {total:g}")
        if self.cuda:
            torch.cuda.synchronize(self.torch_device)
        return f"256x256 matmul on {self.torch_device} in {time.monotonic() - started:.3f}s"
