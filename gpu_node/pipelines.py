"""Loads diffusers pipelines onto a device and keeps the last one resident.

One cache per device worker. Loading is offline: from local folders only.
A pipeline is placed in the job's memory mode (the Forge "VRAM states"):
all on the card, or offloaded with accelerate's model or sequential CPU
offload. On a CPU device every mode is the same, since the weights already
live in host memory. Samplers are built from the model's own scheduler
config whenever a job asks for another one, so one job's options never leak
into the next; a job that asks for the same one reuses it, as diffusers
users do (every call starts with `set_timesteps`, which resets its state).

Loading ends with `gc.freeze()`: the hundreds of thousands of objects that
torch, diffusers and the weights leave live are moved out of the cycle
collector's way, so that no collection during a job walks them. An unload
unfreezes them first, so the old pipeline's cycles can be collected.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

from gpu_node.catalog import Catalog
from sdmesh.domain import ModelInfo
from sdmesh.samplers import find_sampler
from sdmesh.spec import MemoryMode

log = logging.getLogger(__name__)


class ModelUnavailable(Exception):
    pass


def quiet_libraries() -> None:
    """No download or loading progress bars in the agent's log, and no
    transformers notices about optional backends."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _load_dtype(device: str, weights_dtype: str) -> Any:
    import torch

    if device == "cpu":
        return torch.float32  # half precision is slow or missing on CPUs
    return torch.bfloat16 if weights_dtype == "bfloat16" else torch.float16


def place(pipeline: Any, device: str, mode: MemoryMode) -> Any:
    """Puts a freshly loaded pipeline on its device in the memory mode."""
    if mode is MemoryMode.MODEL_OFFLOAD:
        # Whole components move to the card when used: slower, far less VRAM.
        pipeline.enable_model_cpu_offload(device=device)
    elif mode is MemoryMode.SEQUENTIAL_OFFLOAD:
        # Layer by layer: the least VRAM and the slowest.
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline = pipeline.to(device)
    return pipeline


class PipelineCache:
    def __init__(self, device: str, catalog: Catalog) -> None:
        self.device = device
        self.catalog = catalog
        self.model_name: str | None = None
        self.memory_mode: MemoryMode | None = None
        self.pipeline: Any = None
        self._scheduler_config: Any = None
        self._own_scheduler: Any = None
        self._classic = True  # a noise-prediction model that A1111 samplers fit
        self._sampler_name: str | None = None  # the one on the pipeline now

    def unload(self) -> None:
        if self.pipeline is None:
            return
        self.pipeline = None
        self.model_name = None
        self.memory_mode = None
        self._sampler_name = None
        gc.unfreeze()
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def resident(self) -> tuple[ModelInfo, ...]:
        """The model whose weights are on the device, if any: offloaded
        weights live in host memory. Read from other threads."""
        name, mode = self.model_name, self.memory_mode
        if name is None or (self.device != "cpu" and mode is not MemoryMode.FULL):
            return ()
        model = self.catalog.get(name)
        return (model.info,) if model is not None else ()

    def mode_on_device(self, requested: MemoryMode) -> MemoryMode:
        if self.device == "cpu" or requested is MemoryMode.AUTO:
            return MemoryMode.FULL
        return requested

    def get(
        self, model_name: str, sampler_name: str, memory_mode: MemoryMode = MemoryMode.FULL
    ) -> tuple[Any, float]:
        """The pipeline for the model in that memory mode with the sampler
        applied, and the seconds spent loading (0 when it was resident)."""
        load_seconds = 0.0
        mode = self.mode_on_device(memory_mode)
        if (self.model_name, self.memory_mode) != (model_name, mode):
            model = self.catalog.get(model_name)
            if model is None or model.path is None:
                raise ModelUnavailable(f"model {model_name!r} is not on this node")
            self.unload()
            started = time.monotonic()
            self.pipeline = self._load(model.path, _load_dtype(self.device, model.dtype), mode)
            self._scheduler_config = self.pipeline.scheduler.config
            self._own_scheduler = type(self.pipeline.scheduler)
            # Every A1111 sampler is a classic noise-prediction scheduler;
            # models trained for flow matching (FLUX-class, SD3) keep theirs.
            compatible = {cls.__name__ for cls in self.pipeline.scheduler.compatibles}
            self._classic = "EulerDiscreteScheduler" in compatible | {self._own_scheduler.__name__}
            self.model_name, self.memory_mode = model_name, mode
            gc.collect()  # the loader's own garbage is not kept frozen
            gc.freeze()
            load_seconds = time.monotonic() - started
            log.info(
                "loaded %s on %s (%s) in %.2fs", model_name, self.device, mode.value, load_seconds
            )
        if sampler_name != self._sampler_name:
            self._apply_sampler(sampler_name)
        return self.pipeline, load_seconds

    def _load(self, path: Any, dtype: Any, mode: MemoryMode) -> Any:
        from diffusers import AutoPipelineForText2Image

        quiet_libraries()
        pipeline = AutoPipelineForText2Image.from_pretrained(
            path, dtype=dtype, local_files_only=True
        )
        pipeline.set_progress_bar_config(disable=True)
        return place(pipeline, self.device, mode)

    def _apply_sampler(self, sampler_name: str) -> None:
        import diffusers

        sampler = find_sampler(sampler_name)
        if sampler is None:
            raise ValueError(f"unknown sampler {sampler_name!r}")
        if self._classic:
            scheduler_class = getattr(diffusers, sampler.scheduler_class)
            options = sampler.options
        else:
            log.info(
                "%s uses %s; sampler %s does not apply",
                self.model_name,
                self._own_scheduler.__name__,
                sampler_name,
            )
            scheduler_class, options = self._own_scheduler, {}
        self.pipeline.scheduler = scheduler_class.from_config(self._scheduler_config, **options)
        self._sampler_name = sampler_name
