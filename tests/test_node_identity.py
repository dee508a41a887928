"""The agent's stable id, its name, and its claim on the data dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_node.identity import default_name, load_identity
from sdmesh.datadir import DataDirInUse, DataDirLock
from sdmesh.domain import DeviceInfo

GPU = DeviceInfo(0, "RTX", "GPU-0", "cuda", 1)
GPU1 = DeviceInfo(1, "RTX", "GPU-1", "cuda", 1)
CPU = DeviceInfo(0, "CPU", "cpu-0", "cpu", 1)


def test_default_names() -> None:
    assert default_name([GPU], "box.example.org") == "box-gpu0"
    assert default_name([GPU, GPU1], "box") == "box-gpu0-1"
    assert default_name([CPU], "box") == "box-cpu"


def test_the_node_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = load_identity(tmp_path, None, [GPU])
    again = load_identity(tmp_path, None, [GPU])
    assert again == first
    assert first.node_id.startswith(first.name + "-")
    renamed = load_identity(tmp_path, "render-1", [GPU])
    assert (renamed.node_id, renamed.name) == (first.node_id, "render-1")
    assert json.loads((tmp_path / "node.json").read_text())["name"] == "render-1"
    assert load_identity(tmp_path / "other", None, [GPU]).node_id != first.node_id


def test_a_second_agent_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(DataDirInUse, match="in use by another agent"):
            DataDirLock(tmp_path).acquire()
    finally:
        first.release()
    second = DataDirLock(tmp_path)
    second.acquire()  # free again once released
    second.release()
