"""Device probes: real NVML numbers through a fake NVML module, and the
fallbacks when there is no driver or no CUDA (as on this machine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gpu_node import probe as probe_module
from gpu_node.probe import CpuProbe, NvmlProbe, detect_probe, visible_cuda_devices

GIB = 2**30


class FakeNvml:
    """The slice of pynvml the probe uses, for two cards."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.cards = [
            ("NVIDIA GeForce RTX 4090", "GPU-aaaa", 24 * GIB, 20 * GIB, 37),
            ("NVIDIA GeForce RTX 3060", "GPU-bbbb", 12 * GIB, 11 * GIB, 0),
        ]

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.cards[handle][0].encode()  # older bindings return bytes

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.cards[handle][1]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        _, _, total, free, _ = self.cards[handle]
        return SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=self.cards[handle][4])


def test_nvml_probe_reports_devices_and_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    probe = NvmlProbe(FakeNvml())
    devices = probe.devices()
    assert [(d.index, d.name, d.uuid, d.kind, d.total_bytes) for d in devices] == [
        (0, "NVIDIA GeForce RTX 4090", "GPU-aaaa", "cuda", 24 * GIB),
        (1, "NVIDIA GeForce RTX 3060", "GPU-bbbb", "cuda", 12 * GIB),
    ]
    stats = probe.stats()
    assert [(s.free_bytes, s.used_bytes, s.utilization_percent) for s in stats] == [
        (20 * GIB, 4 * GIB, 37.0),
        (11 * GIB, 1 * GIB, 0.0),  # utilization not supported: 0, not a crash
    ]
    assert probe.backend(1, None).torch_device == "cuda:1"  # type: ignore[arg-type,attr-defined]


def test_cuda_visible_devices_picks_and_renumbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    [device] = NvmlProbe(FakeNvml()).devices()
    assert (device.index, device.uuid) == (0, "GPU-bbbb")  # torch calls it cuda:0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert [d.uuid for d in NvmlProbe(FakeNvml()).devices()] == ["GPU-bbbb", "GPU-aaaa"]
    assert visible_cuda_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_cuda_devices({}) is None


def test_without_a_driver_the_agent_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    # What this machine really does: no libnvidia-ml, so nvmlInit raises.
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        pynvml.nvmlInit()
    probe = detect_probe()
    assert isinstance(probe, CpuProbe)
    [device] = probe.devices()
    assert (device.kind, device.index) == ("cpu", 0)
    [stats] = probe.stats()
    assert 0 < stats.free_bytes <= stats.total_bytes == device.total_bytes


def test_cuda_that_asserts_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def no_cuda(*_: object) -> None:
        raise AssertionError("Torch not compiled with CUDA enabled")

    # A CPU-only torch that claims CUDA: mem_get_info raises AssertionError.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    assert isinstance(detect_probe(), CpuProbe)


def test_nvml_is_preferred_when_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml()
    monkeypatch.setattr(probe_module, "NvmlProbe", lambda: NvmlProbe(fake))
    found = detect_probe()
    assert found.kind == "nvml"
    assert len(found.devices()) == 2
