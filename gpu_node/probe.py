"""Devices, read through one `Probe` interface.

`detect_probe` tries NVML (nvidia-ml-py) first, then torch.cuda, then falls
back to the CPU. Without a GPU, `nvmlInit` raises NVMLError_LibraryNotFound
and `torch.cuda.mem_get_info` raises a plain AssertionError; neither may stop
the agent, so each probe is tried and its failure logged.

Device indexes are the ones torch uses: the position among the devices
CUDA_VISIBLE_DEVICES leaves visible.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Any, Protocol

from gpu_node.backends import Backend, TorchBackend
from gpu_node.catalog import Catalog
from sdmesh.domain import DeviceInfo, DeviceStats

log = logging.getLogger(__name__)


class Probe(Protocol):
    kind: str  # "nvml", "torch", "cpu", "simulated"

    def devices(self) -> list[DeviceInfo]: ...

    def stats(self) -> list[DeviceStats]: ...

    def backend(self, index: int, catalog: Catalog) -> Backend:
        """What the worker for device `index` runs jobs through."""
        ...


def visible_cuda_devices(environ: dict[str, str] | None = None) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entries (indexes or UUIDs), or None when unset."""
    value = (environ if environ is not None else dict(os.environ)).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlProbe:
    kind = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        nvml.nvmlInit()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        visible = visible_cuda_devices()
        if visible is not None:
            by_key: dict[str, Any] = {}
            for physical, handle in enumerate(handles):
                by_key[str(physical)] = handle
                by_key[_text(nvml.nvmlDeviceGetUUID(handle))] = handle
            handles = [by_key[key] for key in visible if key in by_key]
        self._handles = handles

    def devices(self) -> list[DeviceInfo]:
        nvml = self._nvml
        return [
            DeviceInfo(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                kind="cuda",
                total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            )
            for index, handle in enumerate(self._handles)
        ]

    def stats(self) -> list[DeviceStats]:
        nvml = self._nvml
        stats = []
        for index, handle in enumerate(self._handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:
                utilization = 0.0  # not supported on some cards (MIG slices)
            stats.append(
                DeviceStats(
                    index, int(memory.total), int(memory.free), int(memory.used), utilization
                )
            )
        return stats

    def backend(self, index: int, catalog: Catalog) -> Backend:
        return TorchBackend(f"cuda:{index}", catalog)


class TorchCudaProbe:
    kind = "torch"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda is not available")
        self._cuda = torch.cuda
        self._count = torch.cuda.device_count()
        torch.cuda.mem_get_info(0)  # raises AssertionError on a CPU-only build

    def devices(self) -> list[DeviceInfo]:
        devices = []
        for index in range(self._count):
            props = self._cuda.get_device_properties(index)
            uuid = str(getattr(props, "uuid", "")) or f"cuda-{index}"
            devices.append(DeviceInfo(index, props.name, uuid, "cuda", int(props.total_memory)))
        return devices

    def stats(self) -> list[DeviceStats]:
        stats = []
        for index in range(self._count):
            free, total = self._cuda.mem_get_info(index)
            stats.append(DeviceStats(index, total, free, total - free, 0.0))
        return stats

    def backend(self, index: int, catalog: Catalog) -> Backend:
        return TorchBackend(f"cuda:{index}", catalog)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host RAM."""
    memory = _meminfo()
    total = memory.get("MemTotal", 0)
    return total, memory.get("MemAvailable", memory.get("MemFree", 0))


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


class CpuProbe:
    """The host itself as one device: its RAM stands in for VRAM."""

    kind = "cpu"

    def devices(self) -> list[DeviceInfo]:
        total = host_memory()[0] or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        name = platform.processor() or platform.machine() or "CPU"
        return [DeviceInfo(0, f"CPU ({name}, {os.cpu_count()} cores)", "cpu-0", "cpu", total)]

    def stats(self) -> list[DeviceStats]:
        total, free = host_memory()
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
        return [DeviceStats(0, total, free, total - free, min(100.0, 100.0 * load))]

    def backend(self, index: int, catalog: Catalog) -> Backend:
        return TorchBackend("cpu", catalog)


def detect_probe() -> Probe:
    """The first probe that finds a device: NVML, then torch.cuda, then CPU."""
    try:
        nvml_probe = NvmlProbe()
        if nvml_probe.devices():
            return nvml_probe
        log.info("NVML found no visible GPUs")
    except Exception as exc:  # NVMLError_LibraryNotFound without a driver
        log.info("NVML unavailable (%s: %s)", type(exc).__name__, exc)
    try:
        torch_probe = TorchCudaProbe()
        if torch_probe.devices():
            return torch_probe
    except (AssertionError, RuntimeError, ImportError) as exc:
        log.info("torch.cuda unavailable (%s: %s)", type(exc).__name__, exc or "no CUDA")
    log.info("no GPU found; running on the CPU")
    return CpuProbe()
