"""What a device worker runs jobs through: it hands out a pipeline for a
model in a memory mode, and reports the peak memory a job used.

`TorchBackend` is the real thing: diffusers pipelines on a CUDA card or the
CPU, with torch's own peak counter. Simulated cards (`gpu_node.simulated`)
implement the same protocol.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Protocol

from gpu_node.catalog import Catalog
from gpu_node.pipelines import PipelineCache
from sdmesh.domain import ModelInfo
from sdmesh.spec import MemoryMode


class Backend(Protocol):
    def pipeline(self, model: str, sampler: str, mode: MemoryMode) -> tuple[Any, float]:
        """A callable with the diffusers text-to-image signature, and the
        seconds spent loading the model (0 when it was resident)."""
        ...

    def resident(self) -> tuple[ModelInfo, ...]: ...

    def begin_job(self) -> None:
        """Resets the peak-memory counter."""
        ...

    def peak_bytes(self) -> int:
        """The most memory the job had: its peak, or, after an out-of-memory,
        what it had when it failed. 0 when the device cannot tell."""
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
    def __init__(self, torch_device: str, catalog: Catalog) -> None:
        self.torch_device = torch_device
        self.pipelines = PipelineCache(torch_device, catalog)
        self.cuda = torch_device.startswith("cuda")

    def pipeline(self, model: str, sampler: str, mode: MemoryMode) -> tuple[Any, float]:
        return self.pipelines.get(model, sampler, mode)

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

        return int(torch.cuda.max_memory_allocated(self.torch_device))

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
