"""The agent's side of the stream without a network: assignments become
tasks on the device worker, worker events become protobuf updates, and a
drain hands back what has not started."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpu_node.agent import Agent
from gpu_node.config import AgentConfig
from gpu_node.hardware import select_devices
from gpu_node.probe import CpuProbe
from protos import agent_pb2, common_pb2
from sdmesh.convert import spec_to_proto
from sdmesh.domain import DeviceInfo
from tests.factories import make_spec


def test_assignments_run_and_a_drain_hands_back_what_waits(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    async def scenario() -> list[agent_pb2.JobUpdate]:
        data_dir = tmp_path / "agent"
        (data_dir / "models").mkdir(parents=True)
        (data_dir / "models" / "tiny").symlink_to(tiny_data_dir / "models" / "tiny")
        agent = Agent(AgentConfig(scheduler="unused:1", data_dir=data_dir), probe=CpuProbe())
        agent.prepare()
        outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        agent._outbox = outbox
        spec = spec_to_proto(make_spec(steps=3))
        # Two assignments: the second waits behind the first. (Several jobs
        # in one assignment are a batch, which runs as one.)
        for job_id in ("first", "second"):
            agent._assign(
                agent_pb2.Assignment(
                    gpu_index=0, jobs=[agent_pb2.AssignedJob(job_id=job_id, attempt=1, spec=spec)]
                )
            )
        agent._drain()
        agent._assign(
            agent_pb2.Assignment(
                gpu_index=0, jobs=[agent_pb2.AssignedJob(job_id="late", attempt=1, spec=spec)]
            )
        )
        agent._assign(
            agent_pb2.Assignment(
                gpu_index=7, jobs=[agent_pb2.AssignedJob(job_id="nowhere", attempt=1, spec=spec)]
            )
        )
        unresolved = common_pb2.JobSpec(prompt="p")  # defaults not applied: not from a scheduler
        agent._assign(
            agent_pb2.Assignment(
                gpu_index=0,
                jobs=[agent_pb2.AssignedJob(job_id="unresolved", attempt=1, spec=unresolved)],
            )
        )
        await asyncio.wait_for(agent._idle.wait(), 60)
        await asyncio.sleep(0)  # let the last call_soon_threadsafe land
        agent.close()
        updates = []
        while not outbox.empty():
            message = outbox.get_nowait()
            assert message is not None
            updates.append(message.job)
        return updates

    updates = asyncio.run(scenario())
    ended = {u.job_id: u.ended for u in updates if u.WhichOneof("body") == "ended"}
    assert ended["first"].outcome == agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED
    assert ended["second"].outcome == agent_pb2.ATTEMPT_OUTCOME_RELEASED
    assert ended["late"].outcome == agent_pb2.ATTEMPT_OUTCOME_RELEASED
    assert ended["nowhere"].outcome == agent_pb2.ATTEMPT_OUTCOME_FAILED
    assert ended["nowhere"].reason == "bad assignment: this node has no device 7"
    assert ended["unresolved"].reason.startswith("bad assignment: batch_size: must be set")
    kinds = [u.WhichOneof("body") for u in updates if u.job_id == "first"]
    assert kinds[0] == "started"
    assert kinds[-1] == "ended"
    assert {"progress", "preview", "image"} <= set(kinds)
    assert not [u for u in updates if u.job_id == "second" and u.WhichOneof("body") == "started"]


def test_gpus_selects_devices_by_index() -> None:
    devices = [DeviceInfo(i, "GPU", f"GPU-{i}", "cuda", 2**30) for i in range(3)]
    assert select_devices(devices, None) == devices
    assert [d.index for d in select_devices(devices, (2, 0))] == [0, 2]
    with pytest.raises(ValueError, match="--gpus 1,5: no device 5; this host has 0, 1, 2"):
        select_devices(devices, (1, 5))
