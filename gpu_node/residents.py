"""What a device holds, and what it costs: the resident models (`Resident`)
and ControlNets (`HeldControlNet`) of a `gpu_node.pipelines.PipelineCache`,
the arithmetic of their bytes, and how a pipeline is placed in a memory
mode. The errors a load ends with are here too, for every loader."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_node.adapters import LoraSlots, load_controlnet
from gpu_node.catalog import LocalModel
from sdmesh.domain import ModelInfo
from sdmesh.kinds import Kind, ModelKind
from sdmesh.spec import MemoryMode

RESIDENT_SHARE = 0.8  # of a card's memory, for resident weights
HOST_SHARE = 0.5  # of the host's memory, for weights resident on a CPU device
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}

Key = tuple[str, str]  # (model kind, name)


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


def load_dtype(device: str, weights_dtype: str) -> Any:
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
    kind: str = ModelKind.BASE
    # (task, ControlNets) -> the pipeline built around this one's modules
    variants: dict[tuple[Kind, tuple[str, ...]], Any] = field(default_factory=dict)
    loras: LoraSlots = field(default_factory=LoraSlots)
    placed: Any = None  # offloaded: the pipeline whose hooks are on the modules

    @property
    def key(self) -> Key:
        return (str(self.kind), self.name)

    @property
    def held_bytes(self) -> int:
        return self.weight_bytes + (self.loras.weight_bytes if self.mode is MemoryMode.FULL else 0)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.weight_bytes, self.dtype, str(self.kind))


@dataclass(eq=False)
class HeldControlNet:
    """A ControlNet on the device (or in host memory, for an offloaded job)."""

    name: str
    mode: MemoryMode
    model: Any
    weight_bytes: int  # on the device; 0 when offloaded to host memory
    dtype: str
    sha256: str = ""
    kind: str = ModelKind.CONTROLNET

    @property
    def key(self) -> Key:
        return (str(self.kind), self.name)

    @property
    def held_bytes(self) -> int:
        return self.weight_bytes

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.weight_bytes, self.dtype, str(self.kind), "", self.sha256)


Held = Resident | HeldControlNet


def load_controlnet_held(
    model: LocalModel, folder: Path, mode: MemoryMode, dtype: str, device: str
) -> HeldControlNet:
    """Loads a checked ControlNet folder in the dtype of the model it goes
    with: onto the device, or in host memory for an offloaded job."""
    import torch

    try:
        controlnet = load_controlnet(folder, getattr(torch, dtype))
        if mode is MemoryMode.FULL:
            controlnet = controlnet.to(device)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split()) or "no message"
        message = f"ControlNet {model.name!r} failed to load from {folder}: {reason}"
        raise ModelLoadFailed(message) from exc
    weight_bytes = sum(
        t.numel() * t.element_size()
        for t in itertools.chain(controlnet.parameters(), controlnet.buffers())
    )
    full = mode is MemoryMode.FULL
    return HeldControlNet(
        model.name, mode, controlnet, weight_bytes if full else 0, dtype, model.sha256
    )
