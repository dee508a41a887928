"""Plain factory functions for test inputs."""

from __future__ import annotations

import struct
import zlib
from typing import Any

from scheduler.domain import Job
from scheduler.estimator import Need
from scheduler.placement import Demand, GpuView
from scheduler.states import JobState
from sdmesh.domain import DeviceInfo, ModelInfo, NodeInfo
from sdmesh.spec import JobSpec, MemoryMode
from sdmesh.speeds import Speed


def make_spec(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "",
        "model": "tiny",
        "width": 64,
        "height": 64,
        "steps": 4,
        "cfg_scale": 7.0,
        "seed": 1234,
        "sampler_name": "Euler a",
        "batch_size": 1,
        "priority": 0,
        "memory_mode": MemoryMode.AUTO,
        "request_id": "",
        "labels": {},
    }
    values.update(overrides)
    return JobSpec(**values)


def make_node(
    node_id: str = "n1", *, models: tuple[str, ...] = ("tiny",), **overrides: Any
) -> NodeInfo:
    values: dict[str, Any] = {
        "node_id": node_id,
        "name": f"host-{node_id}",
        "hostname": "host",
        "agent_version": "test",
        "devices": (DeviceInfo(0, "Test GPU", "GPU-0", "cuda", 24 * 2**30),),
        "models": tuple(ModelInfo(name, 2 * 2**30, "float16") for name in models),
        "labels": {},
    }
    values.update(overrides)
    return NodeInfo(**values)


GIB = 2**30


def make_gpu(
    node_id: str = "n1", index: int = 0, *, free_gib: float = 24, total_gib: float = 24,
    active: int = 0, models: tuple[str, ...] = ("tiny",), resident: tuple[str, ...] = (),
    speeds: dict[str, float] | None = None, host_free_gib: float = 64, **overrides: Any,
) -> GpuView:  # fmt: skip
    return GpuView(
        node_id=node_id,
        node_name=f"host-{node_id}",
        index=index,
        total_bytes=int(total_gib * GIB),
        free_bytes=int(free_gib * GIB),
        active_jobs=active,
        models=frozenset(models),
        resident=frozenset(resident),
        speeds={model: Speed(value, 0.0, 1) for model, value in (speeds or {}).items()},
        host_free_bytes=int(host_free_gib * GIB),
        **overrides,
    )


def make_demand(
    job_id: str = "j1", *, vram_gib: float = 1.0, model: str = "tiny", work: float = 5.0,
    needs: tuple[Need, ...] | None = None, **overrides: Any,
) -> Demand:  # fmt: skip
    return Demand(
        job_id=job_id,
        model=model,
        weight_bytes=0,
        work=work,
        needs=needs or (Need(MemoryMode.FULL, int(vram_gib * GIB), 0),),
        **overrides,
    )


def make_queued_job(job_id: str, owner: str = "alice", created_at: float = 0.0, **spec: Any) -> Job:
    """A job as the store holds it QUEUED, before its first attempt."""
    return Job(
        id=job_id,
        owner=owner,
        spec=make_spec(**spec),
        state=JobState.QUEUED,
        attempt=0,
        failures=0,
        max_attempts=3,
        created_at=created_at,
        updated_at=created_at,
    )


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR (8-bit RGB) claiming width x height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def make_png(width: int = 64, height: int = 64, *, shade: int = 0) -> bytes:
    """A real, decodable PNG of one grey level, built without PIL."""
    rows = b"".join(b"\x00" + bytes([shade]) * (width * 3) for _ in range(height))
    return (
        png_header(width, height)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def seeded_call(pipeline: Any, *, size: int, steps: int, seed: int, **kwargs: Any) -> Any:
    """A diffusers pipeline called as the tests call it directly: one
    prompt, a square size, a CPU generator with `seed`; its images."""
    import torch

    return pipeline(
        "a red cube",
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    ).images
