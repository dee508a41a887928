"""Simulated GPUs, for tests and benchmarks on machines without one.

`sdctl node --simulate-gpus 24GiB,12GiB [--simulate-speed 1.0,0.5]
[--simulate-models sdxl=6.9GiB,flux=23GiB]` gives the agent cards that
behave like real ones where the scheduler can see it. Synthetic
ControlNets, LoRAs and inpainting models are named with their kind:
`--simulate-models sdxl=6.9GiB,controlnet:canny-sdxl=2.5GiB,lora:detail=150MiB`.

- a job of any kind runs; its ControlNets are held on the card like
  models (`controlnet:NAME`), and a ControlNet or LoRA the node lacks fails
  it as on a real card;

- each card charges a job its true peak from `gpu_node.profiles` (never the
  scheduler's estimate), and holds it while the job runs;
- several models stay resident, each charged its weights, while they fit
  the card: a model that does not fit beside them, or a job whose peak
  does not, evicts the least recently used idle ones first;
- when the peak does not fit even then, the real `torch.OutOfMemoryError`
  is raised from inside the pipeline call, at the first step;
- the work is the real pipeline on the CPU for real models (`tiny`), or a
  timing model for synthetic ones: steps x per-step time, scaled by pixels
  and card speed, plus a cold load for a model that is not resident.
  `--simulate-time-scale` shrinks every simulated wait, for fast tests.

Faults, for the chaos tests: `--simulate-step-delay 0.5` slows every step
so that a job is surely mid-flight when a fault fires; `--simulate-hang
2:30` makes each card hang at step 2 of the first job that gets there, for
30 s, its thread stuck as a wedged kernel leaves it while the agent goes on
heartbeating; `--simulate-poison TEXT` kills the agent (SIGKILL) at the
first step of any job whose prompt holds TEXT.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from gpu_node.catalog import Catalog
from gpu_node.pipelines import ModelUnavailable, PipelineCache
from gpu_node.profiles import (
    CUDA_CONTEXT_BYTES,
    ModelProfile,
    profile_for,
    run_seconds,
    true_peak,
)
from sdmesh.domain import DeviceInfo, DeviceStats, ModelInfo
from sdmesh.kinds import Kind, LoraWeight, ModelKind
from sdmesh.spec import MemoryMode

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB)\s*$", re.IGNORECASE)
_UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}


def parse_size(text: str, flag: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{flag}: expected a size like 24GiB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_sizes(text: str, flag: str = "--simulate-gpus") -> list[int]:
    return [parse_size(part, flag) for part in text.split(",")]


def parse_speeds(text: str, count: int, flag: str = "--simulate-speed") -> list[float]:
    try:
        speeds = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected numbers like 1.0,0.5, got {text!r}") from None
    if len(speeds) == 1:
        speeds *= count
    if len(speeds) != count or any(speed <= 0 for speed in speeds):
        raise ValueError(f"{flag}: expected {count} positive numbers, one per GPU, got {text!r}")
    return speeds


def parse_models(text: str, flag: str = "--simulate-models") -> dict[str, int]:
    models = {}
    for part in text.split(","):
        name, sep, size = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag}: expected NAME=SIZE like sdxl=6.9GiB, got {part!r}")
        models[name.strip()] = parse_size(size, flag)
    return models


@dataclass(frozen=True)
class CardFaults:
    """Faults a simulated card injects, for the chaos tests."""

    step_delay: float = 0.0  # real seconds added to every step
    hang_at_step: int = 0  # the first job to reach this step hangs there...
    hang_seconds: float = 0.0  # ...for this long, while its agent heartbeats
    poison: str = ""  # a job whose prompt holds this kills its agent at step 1


def parse_hang(text: str, flag: str = "--simulate-hang") -> tuple[int, float]:
    """'STEP:SECONDS' -> (step, seconds)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+(?:\.\d+)?)\s*", text)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"{flag}: expected STEP:SECONDS with STEP >= 1, e.g. 2:30, got {text!r}")
    return int(match.group(1)), float(match.group(2))


class SimulatedCard:
    """One card's memory: the CUDA context, the resident models' weights and
    the running job's allocations."""

    def __init__(
        self,
        index: int,
        total_bytes: int,
        speed: float,
        time_scale: float,
        faults: CardFaults | None = None,
    ) -> None:
        self.index = index
        self.total_bytes = total_bytes
        self.speed = speed
        self.time_scale = time_scale
        self.faults = faults or CardFaults()
        self._hung = False
        self._lock = threading.Lock()
        # model -> weight bytes, least recently used first
        self.residents: OrderedDict[str, int] = OrderedDict()
        self.running_bytes = 0
        self.last_peak = 0

    @property
    def resident(self) -> tuple[str, int] | None:
        """The model used last and its weight bytes; None when none is."""
        with self._lock:
            if not self.residents:
                return None
            name = next(reversed(self.residents))
            return name, self.residents[name]

    def resident_models(self) -> list[tuple[str, int]]:
        """Every resident model and its weight bytes, least recently used first."""
        with self._lock:
            return list(self.residents.items())

    def _free(self) -> int:
        held = sum(self.residents.values())
        return self.total_bytes - CUDA_CONTEXT_BYTES - held - self.running_bytes

    def free_bytes(self) -> int:
        with self._lock:
            return self._free()

    def _evict_for(self, needed: int, keep: str) -> None:
        """Under the lock: evicts the least recently used models but `keep`
        until `needed` bytes are free, or none is left to evict."""
        for name in [name for name in self.residents if name != keep]:
            if self._free() >= needed:
                return
            del self.residents[name]
            log.info("simulated GPU %d evicted %s", self.index, name)

    def wait(self, seconds: float) -> None:
        time.sleep(seconds * self.time_scale)

    def load(self, model: str, profile: ModelProfile) -> float:
        """Makes `model` resident, evicting the least recently used others
        while it does not fit; returns the load time."""
        with self._lock:
            if model in self.residents:
                self.residents.move_to_end(model)
                return 0.0
            self._evict_for(profile.weight_bytes, keep=model)
        self.wait(profile.load_seconds)
        with self._lock:
            self.residents[model] = profile.weight_bytes
        return profile.load_seconds * self.time_scale

    def evict(self) -> None:
        """Evicts every model: a job run offloaded needs the card's room."""
        with self._lock:
            self.residents.clear()

    def step(self, index: int, prompt: str) -> None:
        """Runs on the worker's thread after each step: the slow-step delay,
        a one-time hang, and the poison job that kills its agent."""
        faults = self.faults
        if faults.poison and faults.poison in prompt:
            log.error("simulated crash: the poison job killed this agent")
            os.kill(os.getpid(), signal.SIGKILL)
        if faults.step_delay:
            time.sleep(faults.step_delay)
        if faults.hang_at_step == index + 1 and not self._hung:
            self._hung = True
            log.warning("simulated GPU %d hangs for %gs", self.index, faults.hang_seconds)
            time.sleep(faults.hang_seconds)  # the thread is stuck, like a wedged kernel

    def health_check(self) -> str:
        return f"simulated GPU {self.index} responds"

    @contextmanager
    def allocate(self, peak_bytes: int, model: str) -> Iterator[None]:
        """Holds a job's memory while it runs, evicting idle models it needs
        the room of, or raises the out-of-memory error a real card raises.
        The resident weights of `model` are part of its peak already."""
        import torch

        with self._lock:
            reused = self.residents.get(model, 0)
            extra = peak_bytes - reused
            self._evict_for(extra, keep=model)
            free = self._free()
            if extra > free:
                self.last_peak = reused + max(free, 0)  # what it had when it failed
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {extra / 2**30:.2f} GiB. "
                    f"GPU {self.index} has a total capacity of {self.total_bytes / 2**30:.2f} GiB "
                    f"of which {max(free, 0) / 2**30:.2f} GiB is free."
                )
            self.running_bytes += extra
            self.last_peak = peak_bytes
        try:
            yield
        finally:
            with self._lock:
                self.running_bytes -= extra


class SimulatedPipeline:
    """The diffusers text-to-image call, on a simulated card: a real
    pipeline run on the CPU (`inner`), or the timing model."""

    def __init__(
        self,
        card: SimulatedCard,
        profile: ModelProfile,
        mode: MemoryMode,
        inner: Any = None,
    ) -> None:
        self.card = card
        self.profile = profile
        self.mode = mode
        self.inner = inner
        self.num_timesteps = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # the prompt, as diffusers takes it
            kwargs["prompt"] = args[0]
        width, height = _size(kwargs)
        prompts = kwargs.get("prompt") or ""
        # One prompt, or a batch of jobs' prompts, each image its own.
        batch = (kwargs.get("num_images_per_prompt") or 1) * (
            len(prompts) if isinstance(prompts, list) else 1
        )
        prompt = " ".join(prompts) if isinstance(prompts, list) else prompts
        # Image-to-image runs steps * strength of them, as diffusers does.
        steps = max(1, int(kwargs["num_inference_steps"] * kwargs.get("strength", 1.0)))
        self.num_timesteps = steps
        peak = true_peak(self.profile, width, height, batch, self.mode)
        callback: Callable[..., Any] | None = kwargs.get("callback_on_step_end")
        with ExitStack() as held:
            if self.inner is not None:
                return self._real(kwargs, peak, callback, held)
            held.enter_context(self.card.allocate(peak, self.profile.name))
            return self._timed(width, height, batch, steps, callback, prompt)

    def _real(
        self,
        kwargs: dict[str, Any],
        peak: int,
        callback: Callable[..., Any] | None,
        held: ExitStack,
    ) -> Any:
        def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            if index == 0:  # the first step is where a real card runs out
                held.enter_context(self.card.allocate(peak, self.profile.name))
            prompts = kwargs.get("prompt") or ""
            self.card.step(index, " ".join(prompts) if isinstance(prompts, list) else prompts)
            return callback(pipe, index, timestep, tensors) if callback else tensors

        return self.inner(**{**kwargs, "callback_on_step_end": on_step_end})

    def _timed(
        self,
        width: int,
        height: int,
        batch: int,
        steps: int,
        callback: Callable[..., Any] | None,
        prompt: str,
    ) -> Any:
        import torch
        from PIL import Image

        per_step = (
            run_seconds(self.profile, width, height, batch, steps, self.mode, self.card.speed)
            / steps
        )
        noise = torch.Generator().manual_seed(width * 31 + height)
        for index in range(steps):
            self.card.wait(per_step)
            self.card.step(index, prompt)
            if callback is not None:
                latents = torch.randn(
                    batch, 4, max(1, height // 8), max(1, width // 8), generator=noise
                )
                callback(self, index, index, {"latents": latents})
        shade = (37 * width + 11 * height) % 200 + 30
        return SimpleNamespace(
            images=[Image.new("RGB", (width, height), (shade, 90, 160)) for _ in range(batch)]
        )


def _size(kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """The picture's size: given, or that of the input image (a picture or
    a list of them; latents are an eighth of it)."""
    if kwargs.get("width") and kwargs.get("height"):
        return int(kwargs["width"]), int(kwargs["height"])
    image: Any = kwargs.get("image")
    if isinstance(image, list | tuple) and image:
        image = image[0]
    if hasattr(image, "size") and isinstance(image.size, tuple):
        return int(image.size[0]), int(image.size[1])
    if hasattr(image, "shape"):
        return int(image.shape[-1]) * 8, int(image.shape[-2]) * 8
    raise ValueError("a simulated pipeline needs width and height, or an image")


CONTROLNET_PREFIX = "controlnet:"  # a ControlNet's name among a card's residents


class SimulatedBackend:
    def __init__(self, card: SimulatedCard, catalog: Catalog) -> None:
        self.card = card
        self.catalog = catalog
        self.cpu = PipelineCache("cpu", catalog)  # real models really run, on the CPU

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
        local = self.catalog.get(model)
        if local is None:
            raise ModelUnavailable(f"model {model!r} is not on this node")
        held = [self._known(name, ModelKind.CONTROLNET, "ControlNet") for name in controlnets]
        for lora in loras:
            self._known(lora.name, ModelKind.LORA, "LoRA")
        profile = profile_for(model, local.weight_bytes)
        full = mode in (MemoryMode.FULL, MemoryMode.AUTO)
        if full:
            load_seconds = self.card.load(model, profile)
            for controlnet in held:
                name = CONTROLNET_PREFIX + controlnet.name
                load_seconds += self.card.load(name, profile_for(name, controlnet.weight_bytes))
        else:  # offloaded weights live in host memory, not on the card
            self.card.evict()
            load_seconds = 0.0
        inner = None
        if not local.synthetic:
            extras: dict[str, Any] = {}
            if task is not Kind.TXT2IMG or controlnets or loras:
                extras = {"task": task, "controlnets": controlnets, "loras": loras}
            inner, cpu_load = self.cpu.get(model, sampler, MemoryMode.FULL, **extras)
            load_seconds += cpu_load
        mode = MemoryMode.FULL if full else mode
        return SimulatedPipeline(self.card, profile, mode, inner), load_seconds

    def _known(self, name: str, kind: ModelKind, what: str) -> Any:
        found = self.catalog.get(name, kind)
        if found is None:
            raise ModelUnavailable(f"no {what} {name!r} on this node")
        return found

    def end_job(self) -> None:
        self.cpu.end_job()

    def hashes(self) -> Mapping[str, str]:
        return self.cpu.hashes()

    def resident(self) -> tuple[ModelInfo, ...]:
        infos = []
        for name, weight_bytes in self.card.resident_models():
            kind = ModelKind.CONTROLNET if name.startswith(CONTROLNET_PREFIX) else None
            model = self.catalog.get(name.removeprefix(CONTROLNET_PREFIX), kind)
            if model is not None:
                infos.append(ModelInfo(model.name, weight_bytes, model.dtype, str(model.kind)))
        return tuple(infos)

    def begin_job(self) -> None:
        self.card.last_peak = 0

    def peak_bytes(self) -> int:
        return self.card.last_peak

    def make_room(self, model: str, peak_bytes: int) -> bool:
        return False  # the card makes room when the job allocates its peak

    def evict_others(self, model: str) -> bool:
        return False  # nor does it run out while an idle model could go

    def release(self, *, collect: bool = False) -> None:
        pass

    def health_check(self) -> str:
        return self.card.health_check()


class SimulatedProbe:
    kind = "simulated"

    def __init__(
        self,
        sizes: list[int],
        speeds: list[float] | None = None,
        time_scale: float = 1.0,
        faults: CardFaults | None = None,
    ) -> None:
        speeds = speeds or [1.0] * len(sizes)
        self.cards = [
            SimulatedCard(index, size, speed, time_scale, faults)
            for index, (size, speed) in enumerate(zip(sizes, speeds, strict=True))
        ]

    def devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(
                card.index,
                f"Simulated GPU {card.total_bytes / 2**30:g} GiB (speed {card.speed:g})",
                f"SIM-{card.index}-{card.total_bytes}",
                "cuda",
                card.total_bytes,
            )
            for card in self.cards
        ]

    def stats(self) -> list[DeviceStats]:
        stats = []
        for card in self.cards:
            free = card.free_bytes()
            busy = 100.0 if card.running_bytes else 0.0
            stats.append(
                DeviceStats(card.index, card.total_bytes, free, card.total_bytes - free, busy)
            )
        return stats

    def backend(self, index: int, catalog: Catalog) -> SimulatedBackend:
        return SimulatedBackend(self.cards[index], catalog)

    @classmethod
    def from_flags(
        cls,
        sizes: str,
        speeds: str = "1.0",
        time_scale: float = 1.0,
        *,
        step_delay: float = 0.0,
        hang: str = "",
        poison: str = "",
    ) -> SimulatedProbe:
        """The cards `sdctl node --simulate-*` asks for; ValueError names
        the flag that is wrong."""
        card_sizes = parse_sizes(sizes)
        hang_at, hang_seconds = parse_hang(hang) if hang else (0, 0.0)
        faults = CardFaults(step_delay, hang_at, hang_seconds, poison)
        return cls(card_sizes, parse_speeds(speeds, len(card_sizes)), time_scale, faults)
