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

Beside a model, a job may use ControlNets, LoRAs and a pipeline of
another kind (img2img, inpainting); `gpu_node.adapters` builds those with
diffusers' own mechanisms. ControlNets are held on the device like models
(counted in the budget, evicted least recently used first, never while
the job that needs them is loading); LoRAs live inside their model's
modules and go with it; the pipelines of other kinds are built once per
(model, kind, ControlNets) with `from_pipe` around the model's modules, so
they cost no memory and no time after the first job. An inpainting job
uses the node's inpainting model for the base (`NAME-inpainting` or
`NAME-inpaint`) when it has one, else the generic inpainting pipeline on
the base's own modules.

With model or sequential offload, accelerate's hooks sit on the modules a
model and its other pipelines share: the pipeline handed out is the one
whose hooks were installed last, placed again when it is not (ControlNets
are loaded in host memory and offloaded with it). On a CPU device every
mode is full.

Loading ends with `gc.freeze()`: the hundreds of thousands of objects that
torch, diffusers and the weights leave live are moved out of the cycle
collector's way, so that no collection during a job walks them. An eviction
unfreezes them first, so the old pipeline's cycles can be collected.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from gpu_node.adapters import variant
from gpu_node.catalog import Catalog, LocalModel, ModelRefused, verified_folder
from gpu_node.residents import (
    Held,
    HeldControlNet,
    Key,
    ModelLoadFailed,
    ModelUnavailable,
    Resident,
    default_budget,
    device_bytes,
    dtype_name,
    estimated_bytes,
    load_controlnet_held,
    load_dtype,
    place,
    quiet_libraries,
)
from sdmesh.domain import ModelInfo
from sdmesh.kinds import Kind, LoraWeight, ModelKind
from sdmesh.samplers import find_sampler
from sdmesh.spec import MemoryMode

log = logging.getLogger(__name__)

# Re-exported: the agent, the runner and the tests know them from here.
__all__ = [
    "ModelLoadFailed",
    "ModelUnavailable",
    "PipelineCache",
    "device_bytes",
    "place",
    "quiet_libraries",
]

MAX_CPU_MODELS = 4
INPAINT_SUFFIXES = ("-inpainting", "-inpaint")  # the inpainting model for a base model NAME


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
        # Models and ControlNets, by (kind, name), least recently used first.
        self._residents: OrderedDict[Key, Held] = OrderedDict()
        self._lock = threading.Lock()  # `resident()` is read from other threads
        self.job_keys: frozenset[Key] = frozenset()  # what the last `get` handed out uses

    @property
    def budget_bytes(self) -> int:
        if self._budget_bytes is None:
            self._budget_bytes = default_budget(self.device)
        return self._budget_bytes

    def resident(self) -> tuple[ModelInfo, ...]:
        """The models and ControlNets whose weights are on the device, least
        recently used first, each with the bytes and dtype it holds there,
        then the LoRAs loaded into them (each once). Offloaded weights live
        in host memory: a model run offloaded on a card is not listed. Read
        from other threads."""
        with self._lock:
            held = [h for h in self._residents.values() if h.mode is MemoryMode.FULL]
            loras = {
                name: size
                for h in held
                if isinstance(h, Resident)
                for name, size in h.loras.loaded.items()
            }
        infos = [h.info for h in held]
        for name, size in loras.items():
            model = self.catalog.get(name, ModelKind.LORA)
            sha256, family = (model.sha256, model.family) if model else ("", "")
            dtype = next(
                h.dtype for h in held if isinstance(h, Resident) and name in h.loras.loaded
            )
            infos.append(ModelInfo(name, size, dtype, ModelKind.LORA, family, sha256))
        return tuple(infos)

    def resident_bytes(self, *, besides: str | None = None, keep: Collection[Key] = ()) -> int:
        """The weights held on the device (LoRAs included) for everything
        but the model named `besides` and the entries `keep`."""
        with self._lock:
            return sum(
                h.held_bytes
                for h in self._residents.values()
                if h.key not in keep and not (isinstance(h, Resident) and h.name == besides)
            )

    def mode_on_device(self, requested: MemoryMode) -> MemoryMode:
        if self.device == "cpu" or requested is MemoryMode.AUTO:
            return MemoryMode.FULL
        return requested

    def get(
        self,
        model_name: str,
        sampler_name: str,
        memory_mode: MemoryMode = MemoryMode.FULL,
        *,
        task: Kind = Kind.TXT2IMG,
        controlnets: Sequence[str] = (),
        loras: Sequence[LoraWeight] = (),
    ) -> tuple[Any, float]:
        """The pipeline for `task` on the model in that memory mode, with
        the ControlNets, the LoRAs active and the sampler applied, and the
        seconds spent loading (0 when all was resident). Raises
        ModelUnavailable, naming what is missing, before loading anything."""
        import torch

        mode = self.mode_on_device(memory_mode)
        target = self._model_for(model_name, task)
        wanted_controlnets = [self._known(name, ModelKind.CONTROLNET) for name in controlnets]
        lora_files = {
            lora.name: self._verified(self._known(lora.name, ModelKind.LORA)) for lora in loras
        }
        # The model, then its ControlNets: their order as most recently used.
        keys = [target.key, *((str(ModelKind.CONTROLNET), name) for name in controlnets)]
        self.job_keys = frozenset(keys)
        resident, load_seconds = self._resident_model(target, mode)
        held = []
        for model in wanted_controlnets:
            controlnet, seconds = self._controlnet(model, resident)
            held.append(controlnet)
            load_seconds += seconds
        with self._lock:
            for key in keys:
                if key in self._residents:
                    self._residents.move_to_end(key)
        lora_seconds = resident.loras.activate(
            resident.pipeline, loras, lora_files, getattr(torch, resident.dtype)
        )
        if lora_seconds:
            resident.placed = None  # loading LoRAs may have moved offload hooks
        if sampler_name != resident.sampler_name:
            self._apply_sampler(resident, sampler_name)
        pipeline, build_seconds = self._pipeline_for(resident, task, tuple(controlnets), held)
        return pipeline, load_seconds + lora_seconds + build_seconds

    def end_job(self) -> None:
        """Switches off the LoRAs of every resident model: the next job
        runs on the weights alone."""
        with self._lock:
            residents = [h for h in self._residents.values() if isinstance(h, Resident)]
        for resident in residents:
            try:
                resident.loras.deactivate(resident.pipeline)
            except Exception:
                # Its LoRA state is unknown: the model goes, and is loaded
                # clean for the next job that needs it.
                log.exception("switching off the LoRAs of %s failed; evicting it", resident.name)
                self._evict([resident.key])

    def hashes(self) -> Mapping[str, str]:
        """ "lora:NAME" / "controlnet:NAME" -> the sha256 of its weights."""
        return {
            f"{model.kind}:{model.name}": model.sha256
            for model in self.catalog.models.values()
            if model.kind in (ModelKind.LORA, ModelKind.CONTROLNET) and model.sha256
        }

    def evict_least_used(self, *, keep: str | None = None, keep_keys: Collection[Key] = ()) -> bool:
        """Evicts the least recently used model or ControlNet but the model
        `keep` and the entries `keep_keys`; False when there is none."""
        with self._lock:
            key = next(
                (
                    key
                    for key, held in self._residents.items()
                    if key not in keep_keys
                    and not (isinstance(held, Resident) and held.name == keep)
                ),
                None,
            )
        if key is None:
            return False
        self._evict([key])
        return True

    def unload(self) -> None:
        """Evicts every model and ControlNet."""
        self._evict(list(self._residents))

    def _known(self, name: str, kind: ModelKind) -> LocalModel:
        model = self.catalog.get(name, kind)
        if model is None or model.path is None:
            what = {ModelKind.LORA: "LoRA", ModelKind.CONTROLNET: "ControlNet"}.get(kind, "model")
            raise ModelUnavailable(f"no {what} {name!r} on this node")
        return model

    @staticmethod
    def _verified(model: LocalModel) -> Path:
        try:
            return verified_folder(model)
        except ModelRefused as exc:
            log.warning("refused to load: %s", exc)
            raise ModelUnavailable(str(exc)) from exc

    def _model_for(self, model_name: str, task: Kind) -> LocalModel:
        """The model a job of `task` on `model_name` runs: for inpainting,
        the node's inpainting model for that base when it has one."""
        model = self.catalog.get(model_name)
        if model is None or model.path is None:
            raise ModelUnavailable(f"model {model_name!r} is not on this node")
        if task is Kind.INPAINT and model.kind == ModelKind.BASE:
            for suffix in INPAINT_SUFFIXES:
                inpaint = self.catalog.get(model_name + suffix, ModelKind.INPAINT)
                if inpaint is not None and inpaint.path is not None:
                    return inpaint
        if task is not Kind.INPAINT and model.kind == ModelKind.INPAINT:
            raise ModelUnavailable(
                f"model {model_name!r} is an inpainting model; it runs inpainting jobs only"
            )
        return model

    def _resident_model(self, model: LocalModel, mode: MemoryMode) -> tuple[Resident, float]:
        held = self._residents.get(model.key)
        if isinstance(held, Resident) and held.mode is mode:
            return held, 0.0
        started = time.monotonic()
        resident = self._load_resident(model, mode)
        load_seconds = time.monotonic() - started
        log.info(
            "loaded %s on %s (%s) in %.2fs; resident: %s",
            model.name,
            self.device,
            mode.value,
            load_seconds,
            ", ".join(name for _, name in self._residents),
        )
        return resident, load_seconds

    def _controlnet(self, model: LocalModel, resident: Resident) -> tuple[HeldControlNet, float]:
        """The ControlNet held in the resident model's mode and dtype,
        loaded when it is not."""
        import torch

        held = self._residents.get(model.key)
        if (
            isinstance(held, HeldControlNet)
            and held.mode is resident.mode
            and held.dtype == resident.dtype
        ):
            return held, 0.0
        if held is not None:
            self._evict([model.key])
        folder = self._verified(model)
        if resident.mode is MemoryMode.FULL:
            dtype = getattr(torch, resident.dtype)
            self._make_room(model.key, estimated_bytes(model, dtype), keep=self.job_keys)
        started = time.monotonic()
        held = load_controlnet_held(model, folder, resident.mode, resident.dtype, self.device)
        with self._lock:
            self._residents[model.key] = held
        seconds = time.monotonic() - started
        log.info("loaded ControlNet %s on %s in %.2fs", model.name, self.device, seconds)
        return held, seconds

    def _pipeline_for(
        self, resident: Resident, task: Kind, names: tuple[str, ...], held: list[HeldControlNet]
    ) -> tuple[Any, float]:
        """The resident pipeline itself, or the one of `task` with the
        ControlNets built around its modules (cached), its sampler the
        resident's, placed in the memory mode; and the seconds building it
        took."""
        seconds = 0.0
        if resident.kind == ModelKind.BASE and task is Kind.TXT2IMG and not names:
            pipeline = resident.pipeline
        else:
            pipeline = resident.variants.get((task, names))
            if pipeline is None:
                started = time.monotonic()
                pipeline = variant(resident.pipeline, task, [h.model for h in held])
                resident.variants[(task, names)] = pipeline
                seconds = time.monotonic() - started
            pipeline.scheduler = resident.pipeline.scheduler
        if resident.mode is not MemoryMode.FULL and resident.placed is not pipeline:
            place(pipeline, self.device, resident.mode)
            resident.placed = pipeline
        return pipeline, seconds

    def _evict(self, keys: list[Key]) -> None:
        if not keys:
            return
        with self._lock:
            for key in keys:
                self._residents.pop(key, None)
            gone = {name for kind, name in keys if kind == ModelKind.CONTROLNET}
            for held in self._residents.values():
                if isinstance(held, Resident) and gone:
                    # A pipeline built with an evicted ControlNet holds its weights.
                    for variant_key in [k for k in held.variants if gone & set(k[1])]:
                        del held.variants[variant_key]
        log.info("evicted %s from %s", ", ".join(name for _, name in keys), self.device)
        # The pipelines' objects were frozen at load; their cycles can only
        # be collected once thawed.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _make_room(self, key: Key, weight_bytes: int, *, keep: Collection[Key] = ()) -> None:
        """Evicts, least recently used first, until `weight_bytes` more fit
        the budget beside what stays, and the model count allows one more
        (for a model; ControlNets are not counted). Offloaded entries go
        first, and an offloaded one is kept alone; `keep` stays."""
        with self._lock:
            entries = list(self._residents.values())
        leaving = [h.key for h in entries if h.key == key or h.mode is not MemoryMode.FULL]
        staying = [h for h in entries if h.key not in leaving]
        is_model = key[0] != ModelKind.CONTROLNET
        for candidate in [h for h in staying if h.key not in keep]:
            models = sum(1 for h in staying if isinstance(h, Resident))
            too_many = is_model and self.max_models is not None and models >= self.max_models
            held = sum(h.held_bytes for h in staying)
            if not too_many and held + weight_bytes <= self.budget_bytes:
                break
            leaving.append(candidate.key)
            staying.remove(candidate)
        self._evict(leaving)

    def _load_resident(self, model: LocalModel, mode: MemoryMode) -> Resident:
        import torch

        folder = self._verified(model)  # before any eviction: a refused model costs nothing
        dtype = load_dtype(self.device, model.dtype)
        if mode is MemoryMode.FULL:
            self._make_room(
                model.key, estimated_bytes(model, dtype), keep=self.job_keys - {model.key}
            )
        else:
            self.unload()
        while True:
            try:
                pipeline = self._load(folder, dtype, mode)
                break
            except torch.OutOfMemoryError:
                if not self.evict_least_used(keep_keys=self.job_keys):
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
            kind=model.kind,
            placed=pipeline,
        )
        with self._lock:
            self._residents[resident.key] = resident
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
