"""Loads diffusers pipelines onto a device and keeps them resident while
they fit.

One cache per device worker. Loading is offline: from local folders only.
A pipeline is placed in the job's memory mode (the Forge "VRAM states"):
all on the card, or offloaded with accelerate's model or sequential CPU
offload. On a CPU device every mode is the same, since the weights already
live in host memory.

Several models stay resident at once while their weights fit the cache's
budget: most of a card's memory (the rest is for the running job), or half
the host's memory and at most four models on a CPU device. Loading one that
does not fit evicts the least recently used first, and so does a load that
runs out of memory. A model run offloaded is one the card is short of room
for: it is kept alone. The worker evicts idle models too when a job needs
their room (`evict_least_used`).

Samplers are built from the model's own scheduler config whenever a job asks
for another one, so one job's options never leak into the next; a job that
asks for the same one reuses it, as diffusers users do (every call starts
with `set_timesteps`, which resets its state).

Loading is safe as the catalog defines it (gpu_node/catalog.py): the model
is checked again just before it is loaded, since its folder may have
changed since the scan, and loaded from its resolved folder with
`use_safetensors=True` (diffusers and transformers then never unpickle a
.bin, even one added after the check) and `trust_remote_code=False`, and
never with a `custom_pipeline`. A model refused then, or one that fails to
load (damaged weights, say), fails the job's attempt with a message naming
the model; the worker runs on.

Loading ends with `gc.freeze()`: the hundreds of thousands of objects that
torch, diffusers and the weights leave live are moved out of the cycle
collector's way, so that no collection during a job walks them. An eviction
unfreezes them first, so the old pipeline's cycles can be collected.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_node.catalog import Catalog, LocalModel, ModelRefused, verified_folder
from sdmesh.domain import ModelInfo
from sdmesh.samplers import find_sampler
from sdmesh.spec import MemoryMode

log = logging.getLogger(__name__)

RESIDENT_SHARE = 0.8  # of a card's memory, for resident weights
HOST_SHARE = 0.5  # of the host's memory, for weights resident on a CPU device
MAX_CPU_MODELS = 4
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class ModelUnavailable(Exception):
    """The model is not on this node, or is refused: nothing was loaded."""


class ModelLoadFailed(Exception):
    """Loading the model raised: its files are damaged, most likely. Not a
    ModelUnavailable, so the worker collects what the failed load left."""


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


def default_budget(device: str) -> int:
    """Bytes of weights a device keeps resident."""
    if device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return int(total * RESIDENT_SHARE)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * HOST_SHARE)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def estimated_bytes(model: LocalModel, dtype: Any) -> int:
    """A model's weights once loaded in `dtype`, from its files' size."""
    stored, loaded = DTYPE_BYTES.get(model.dtype), DTYPE_BYTES.get(dtype_name(dtype))
    if stored is None or loaded is None:
        return model.weight_bytes
    return model.weight_bytes * loaded // stored


def device_bytes(pipeline: Any) -> int:
    """The bytes of a pipeline's weights and buffers."""
    import torch

    total = 0
    for component in getattr(pipeline, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            tensors = itertools.chain(component.parameters(), component.buffers())
            total += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return total


@dataclass(eq=False)
class Resident:
    """A pipeline on the device, and what applying a sampler to it needs."""

    name: str
    mode: MemoryMode
    pipeline: Any
    weight_bytes: int  # on the device; 0 when offloaded to host memory
    dtype: str
    scheduler_config: Any
    own_scheduler: Any
    classic: bool  # a noise-prediction model that A1111 samplers fit
    sampler_name: str | None = None  # the one on the pipeline now

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.weight_bytes, self.dtype)


class PipelineCache:
    def __init__(
        self,
        device: str,
        catalog: Catalog,
        budget_bytes: int | None = None,
        max_models: int | None = None,
    ) -> None:
        self.device = device
        self.catalog = catalog
        self._budget_bytes = budget_bytes  # found on first use: reading a card's size starts CUDA
        self.max_models = max_models or (MAX_CPU_MODELS if device == "cpu" else None)
        self._residents: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # `resident()` is read from other threads

    @property
    def budget_bytes(self) -> int:
        if self._budget_bytes is None:
            self._budget_bytes = default_budget(self.device)
        return self._budget_bytes

    def resident(self) -> tuple[ModelInfo, ...]:
        """The models whose weights are on the device, least recently used
        first, each with the bytes and dtype it holds there. Offloaded
        weights live in host memory: a model run offloaded on a card is not
        listed. Read from other threads."""
        with self._lock:
            residents = list(self._residents.values())
        return tuple(r.info for r in residents if r.mode is MemoryMode.FULL)

    def resident_bytes(self, *, besides: str | None = None) -> int:
        """The weights held on the device for every model but `besides`."""
        with self._lock:
            return sum(r.weight_bytes for r in self._residents.values() if r.name != besides)

    def mode_on_device(self, requested: MemoryMode) -> MemoryMode:
        if self.device == "cpu" or requested is MemoryMode.AUTO:
            return MemoryMode.FULL
        return requested

    def get(
        self, model_name: str, sampler_name: str, memory_mode: MemoryMode = MemoryMode.FULL
    ) -> tuple[Any, float]:
        """The pipeline for the model in that memory mode with the sampler
        applied, and the seconds spent loading (0 when it was resident)."""
        mode = self.mode_on_device(memory_mode)
        resident = self._residents.get(model_name)
        load_seconds = 0.0
        if resident is None or resident.mode is not mode:
            model = self.catalog.get(model_name)
            if model is None or model.path is None:
                raise ModelUnavailable(f"model {model_name!r} is not on this node")
            started = time.monotonic()
            resident = self._load_resident(model, mode)
            load_seconds = time.monotonic() - started
            log.info(
                "loaded %s on %s (%s) in %.2fs; resident: %s",
                model_name,
                self.device,
                mode.value,
                load_seconds,
                ", ".join(self._residents),
            )
        with self._lock:
            self._residents.move_to_end(model_name)
        if sampler_name != resident.sampler_name:
            self._apply_sampler(resident, sampler_name)
        return resident.pipeline, load_seconds

    def evict_least_used(self, *, keep: str | None = None) -> bool:
        """Evicts the least recently used model but `keep`; False when
        there is none."""
        with self._lock:
            name = next((name for name in self._residents if name != keep), None)
        if name is None:
            return False
        self._evict([name])
        return True

    def unload(self) -> None:
        """Evicts every model."""
        self._evict(list(self._residents))

    def _evict(self, names: list[str]) -> None:
        if not names:
            return
        with self._lock:
            for name in names:
                self._residents.pop(name, None)
        log.info("evicted %s from %s", ", ".join(names), self.device)
        # The pipelines' objects were frozen at load; their cycles can only
        # be collected once thawed.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _make_room(self, model: LocalModel, weight_bytes: int) -> None:
        """Evicts, least recently used first, until `weight_bytes` more fit
        the budget beside what stays, and the model count allows one more.
        Offloaded models go first, and an offloaded one is kept alone."""
        with self._lock:
            residents = list(self._residents.values())
        leaving = [
            r.name for r in residents if r.name == model.name or r.mode is not MemoryMode.FULL
        ]
        staying = [r for r in residents if r.name not in leaving]
        held = sum(r.weight_bytes for r in staying)
        for resident in staying:
            too_many = self.max_models is not None and len(staying) >= self.max_models
            if not too_many and held + weight_bytes <= self.budget_bytes:
                break
            leaving.append(resident.name)
            staying = staying[1:]
            held -= resident.weight_bytes
        self._evict(leaving)

    def _load_resident(self, model: LocalModel, mode: MemoryMode) -> Resident:
        import torch

        try:  # before any eviction: a refused model costs the others nothing
            folder = verified_folder(model)
        except ModelRefused as exc:
            log.warning("refused to load: %s", exc)
            raise ModelUnavailable(str(exc)) from exc
        dtype = _load_dtype(self.device, model.dtype)
        if mode is MemoryMode.FULL:
            self._make_room(model, estimated_bytes(model, dtype))
        else:
            self.unload()
        while True:
            try:
                pipeline = self._load(folder, dtype, mode)
                break
            except torch.OutOfMemoryError:
                if not self.evict_least_used():
                    raise
                log.warning(
                    "loading %s ran out of memory; evicted the least used model", model.name
                )
            except Exception as exc:
                reason = " ".join(str(exc).split()) or "no message"
                message = f"model {model.name!r} failed to load from {folder}: {reason}"
                log.warning("%s", message)
                raise ModelLoadFailed(message) from exc
        scheduler = pipeline.scheduler
        # Every A1111 sampler is a classic noise-prediction scheduler;
        # models trained for flow matching (FLUX-class, SD3) keep theirs.
        compatible = {cls.__name__ for cls in scheduler.compatibles}
        resident = Resident(
            name=model.name,
            mode=mode,
            pipeline=pipeline,
            weight_bytes=device_bytes(pipeline) if mode is MemoryMode.FULL else 0,
            dtype=dtype_name(dtype),
            scheduler_config=scheduler.config,
            own_scheduler=type(scheduler),
            classic="EulerDiscreteScheduler" in compatible | {type(scheduler).__name__},
        )
        with self._lock:
            self._residents[model.name] = resident
        gc.collect()  # the loader's own garbage is not kept frozen
        gc.freeze()
        return resident

    def _load(self, folder: Path, dtype: Any, mode: MemoryMode) -> Any:
        from diffusers import AutoPipelineForText2Image

        quiet_libraries()
        pipeline = AutoPipelineForText2Image.from_pretrained(
            folder,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return place(pipeline, self.device, mode)

    def _apply_sampler(self, resident: Resident, sampler_name: str) -> None:
        import diffusers

        sampler = find_sampler(sampler_name)
        if sampler is None:
            raise ValueError(f"unknown sampler {sampler_name!r}")
        if resident.classic:
            scheduler_class = getattr(diffusers, sampler.scheduler_class)
            options = sampler.options
        else:
            log.info(
                "%s uses %s; sampler %s does not apply",
                resident.name,
                resident.own_scheduler.__name__,
                sampler_name,
            )
            scheduler_class, options = resident.own_scheduler, {}
        resident.pipeline.scheduler = scheduler_class.from_config(
            resident.scheduler_config, **options
        )
        resident.sampler_name = sampler_name
