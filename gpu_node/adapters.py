"""What goes on top of a resident pipeline for one job: LoRAs, ControlNets
and the pipeline of the job's kind (img2img, inpainting, their ControlNet
variants), all with diffusers' own mechanisms.

- **LoRAs** are loaded into a resident pipeline's modules with
  `load_lora_weights(state, adapter_name=...)` on first use and kept there
  (at most `MAX_LORAS_PER_MODEL`; the least recently used are removed with
  `delete_adapters`). A job activates its own with `set_adapters(names,
  adapter_weights=...)`, and after the job `disable_lora()` switches every
  LoRA layer off: PEFT then calls the base layers alone, so the next job
  gets exactly the picture a card that never loaded a LoRA gives. The
  weights are read with `safetensors.torch.load_file` from a file the
  catalog has checked again just before (no pickle is ever read).
- **ControlNets** are `ControlNetModel.from_pretrained` folders, loaded
  safetensors-only, offline, in the base model's dtype.
- **Variants** come from `AutoPipelineFor*.from_pipe(base, controlnet=...)`,
  which builds the other pipeline class around the very same modules: no
  weight is loaded or held twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdmesh.kinds import Kind, LoraWeight

log = logging.getLogger(__name__)

# LoRAs kept loaded in one resident model. Each is small (tens to hundreds
# of MB) but every active adapter costs each LoRA layer's forward a little.
MAX_LORAS_PER_MODEL = 8


def adapter_name(lora: str) -> str:
    """The PEFT adapter name of a LoRA: adapter names become module keys,
    where a '.' (common in file names) is not allowed."""
    return "lora_" + hashlib.sha256(lora.encode()).hexdigest()[:16]


def loaded_bytes(state: dict[str, Any], dtype: Any) -> int:
    """The bytes a LoRA's tensors take once loaded in `dtype`."""
    elements = sum(int(tensor.numel()) for tensor in state.values())
    return elements * int(getattr(dtype, "itemsize", 4))


class LoraSlots:
    """The LoRAs loaded into one resident pipeline's modules, least recently
    used first, and whether they are switched on."""

    def __init__(self) -> None:
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes
        self.active = False

    @property
    def weight_bytes(self) -> int:
        return sum(self.loaded.values())

    def activate(
        self, pipeline: Any, loras: Sequence[LoraWeight], files: dict[str, Path], dtype: Any
    ) -> float:
        """Makes `loras` (each one's file in `files`) the pipeline's active
        adapters, loading those it lacks; returns the seconds spent loading.
        With no LoRAs it switches any off."""
        import time

        if not loras:
            self.deactivate(pipeline)
            return 0.0
        wanted = [lora.name for lora in loras]
        started = time.monotonic()
        loaded_any = False
        # Counted on from here: diffusers switches an adapter on as it
        # injects it, so even a load that fails half-way is switched off
        # by `deactivate` after the job.
        self.active = True
        for name in wanted:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            self._make_room(pipeline, keep=wanted)
            from safetensors.torch import load_file

            state = load_file(str(files[name]))
            try:
                pipeline.load_lora_weights(state, adapter_name=adapter_name(name))
            except Exception:
                # Whatever it injected goes, so the name can be loaded again.
                with contextlib.suppress(Exception):
                    pipeline.delete_adapters([adapter_name(name)])
                raise
            self.loaded[name] = loaded_bytes(state, dtype)
            loaded_any = True
            log.info("loaded LoRA %s", name)
        seconds = time.monotonic() - started if loaded_any else 0.0
        pipeline.enable_lora()
        pipeline.set_adapters(
            [adapter_name(name) for name in wanted],
            adapter_weights=[float(lora.weight) for lora in loras],
        )
        return seconds

    def deactivate(self, pipeline: Any) -> None:
        """Switches every LoRA layer off (the weights stay loaded)."""
        if self.active and getattr(pipeline.unet, "_hf_peft_config_loaded", False):
            pipeline.disable_lora()
        self.active = False

    def _make_room(self, pipeline: Any, keep: Sequence[str]) -> None:
        while len(self.loaded) >= MAX_LORAS_PER_MODEL:
            name = next((name for name in self.loaded if name not in keep), None)
            if name is None:
                return
            pipeline.delete_adapters([adapter_name(name)])
            del self.loaded[name]
            log.info("unloaded LoRA %s", name)


def load_controlnet(folder: Path, dtype: Any) -> Any:
    """A ControlNetModel from a checked folder, never from pickles, never
    from the network."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(
        folder, dtype=dtype, local_files_only=True, use_safetensors=True
    )


def variant(base: Any, task: Kind, controlnets: Sequence[Any]) -> Any:
    """The pipeline for `task` built with `from_pipe` around `base`'s own
    modules, with the ControlNets (one model, or a list, which the pipeline
    wraps in a MultiControlNetModel)."""
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
    )

    auto = {
        Kind.TXT2IMG: AutoPipelineForText2Image,
        Kind.IMG2IMG: AutoPipelineForImage2Image,
        Kind.INPAINT: AutoPipelineForInpainting,
    }[task]
    options: dict[str, Any] = {}
    if controlnets:
        options["controlnet"] = controlnets[0] if len(controlnets) == 1 else list(controlnets)
    pipeline = auto.from_pipe(base, **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
