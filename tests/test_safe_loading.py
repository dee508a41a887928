"""Loading a model runs none of its code and reads nothing outside
--models-dir: links out, pickles and custom classes are refused, at the scan
and again at load time; a damaged model is skipped with one log line, and a
job on one fails its attempt while the worker runs on."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

import gpu_node.pipelines
from gpu_node.backends import TorchBackend
from gpu_node.catalog import Catalog, LocalModel, ModelRefused, describe, verified_folder
from gpu_node.pipelines import ModelLoadFailed, ModelUnavailable, PipelineCache
from gpu_node.runner import Task
from gpu_node.safe_files import check_model_index, safetensors_header
from sdmesh.domain import AttemptOutcome, Ended
from sdmesh.spec import MemoryMode
from tests.factories import make_spec
from tests.test_runner import CPU
from tests.workers import run_worker

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


class Canary:
    """Unpickling one creates the file at `path`: the code a pickle runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def copy_tiny(tiny_data_dir: Path, destination: Path) -> Path:
    shutil.copytree(tiny_data_dir / "models" / "tiny", destination)
    return destination


def refusals(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"model {name!r}" in r.getMessage()]


def scan(tiny_data_dir: Path, models_dir: Path) -> tuple[Catalog, list[str]]:
    catalog = Catalog(tiny_data_dir, models_dir)
    return catalog, [model.name for model in catalog.scan()]


# ---- paths: nothing outside --models-dir ----


def test_a_model_folder_linked_outside_is_refused_and_one_inside_is_not(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models_dir = tmp_path / "models"
    copy_tiny(tiny_data_dir, models_dir / "good")
    (models_dir / "alias").symlink_to(models_dir / "good")
    (models_dir / "escape").symlink_to(copy_tiny(tiny_data_dir, tmp_path / "outside" / "m"))
    _, names = scan(tiny_data_dir, models_dir)
    assert names == ["tiny", "alias", "good"]
    [line] = refusals(caplog, "escape")
    assert "leads outside" in line


@pytest.mark.parametrize("linked", [UNET_WEIGHTS, Path("vae")], ids=["weight-file", "component"])
def test_a_weight_file_or_component_linked_outside_is_refused(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, linked: Path
) -> None:
    models_dir = tmp_path / "models"
    model = copy_tiny(tiny_data_dir, models_dir / "m")
    outside = copy_tiny(tiny_data_dir, tmp_path / "outside")
    target = model / linked
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.symlink_to(outside / linked)
    _, names = scan(tiny_data_dir, models_dir)
    assert names == ["tiny"]
    [line] = refusals(caplog, "m")
    assert f"{linked} leads outside {models_dir.resolve()}" in line


def test_dot_dot_out_of_the_models_dir_is_refused(tiny_data_dir: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    copy_tiny(tiny_data_dir, tmp_path / "outside")
    with pytest.raises(ModelRefused, match="the folder leads outside"):
        describe("m", models_dir / ".." / "outside", models_dir)


def test_a_shard_index_naming_a_file_elsewhere_is_refused(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    model = copy_tiny(tiny_data_dir, tmp_path / "models" / "m")
    index = model / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(
        json.dumps({"weight_map": {"w": "../vae/diffusion_pytorch_model.safetensors"}})
    )
    with pytest.raises(ModelRefused, match="names a shard"):
        describe("m", model, tmp_path / "models")


# ---- pickles: never unpickled ----


def plant_pickle(model: Path, canary: Path) -> None:
    """Swaps the unet's weights for a pickle that creates `canary`."""
    (model / UNET_WEIGHTS).unlink()
    payload = pickle.dumps({"conv_in.weight": Canary(canary)})
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)


def test_the_canary_pickle_works(tmp_path: Path) -> None:
    """The payload the next tests plant does run code when unpickled."""
    opened = pickle.loads(pickle.dumps(Canary(tmp_path / "probe")))
    opened.close()
    assert (tmp_path / "probe").exists()


def test_a_pickle_component_is_refused_at_the_scan_and_never_unpickled(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models_dir = tmp_path / "models"
    model = copy_tiny(tiny_data_dir, models_dir / "m")
    canary = tmp_path / "canary"
    plant_pickle(model, canary)
    catalog, names = scan(tiny_data_dir, models_dir)
    assert names == ["tiny"]
    [line] = refusals(caplog, "m")
    assert "unet/diffusion_pytorch_model.bin: pickle weights are refused" in line
    with pytest.raises(ModelUnavailable, match="not on this node"):
        PipelineCache("cpu", catalog).get("m", "Euler a")
    assert not canary.exists()


def test_a_pickle_planted_after_the_scan_is_refused_at_load_time(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models_dir = tmp_path / "models"
    model = copy_tiny(tiny_data_dir, models_dir / "m")
    catalog, names = scan(tiny_data_dir, models_dir)
    assert names == ["tiny", "m"]
    canary = tmp_path / "canary"
    plant_pickle(model, canary)
    with pytest.raises(ModelUnavailable, match="pickle weights are refused"):
        PipelineCache("cpu", catalog).get("m", "Euler a")
    assert not canary.exists()
    assert "refused to load: model 'm'" in caplog.text


def test_the_load_itself_takes_only_safetensors(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the checks passed by a swap between them and the load, diffusers
    is still told to load safetensors only: it never opens the .bin."""
    models_dir = tmp_path / "models"
    model = copy_tiny(tiny_data_dir, models_dir / "m")
    catalog, _ = scan(tiny_data_dir, models_dir)
    canary = tmp_path / "canary"
    plant_pickle(model, canary)
    monkeypatch.setattr(gpu_node.pipelines, "verified_folder", lambda m: m.path.resolve())
    with pytest.raises(
        ModelLoadFailed, match=re.escape("no file named diffusion_pytorch_model.safetensors")
    ):
        PipelineCache("cpu", catalog).get("m", "Euler a")
    assert not canary.exists()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("unet/weights", pickle.dumps({"w": 1})),  # a pickle by its content, with no suffix
        (str(UNET_WEIGHTS), pickle.dumps({"w": 1})),  # a pickle named .safetensors
        ("unet/diffusion_pytorch_model.ckpt", b"anything"),
        ("text_encoder/pytorch_model.pkl", b"anything"),
        ("text_encoder/pytorch_model.bin.index.json", b"{}"),
        ("vae/diffusion_flax_model.msgpack", b"anything"),
    ],
)
def test_every_weight_file_must_be_safetensors(
    tiny_data_dir: Path, tmp_path: Path, name: str, content: bytes
) -> None:
    model = copy_tiny(tiny_data_dir, tmp_path / "m")
    (model / name).write_bytes(content)
    with pytest.raises(ModelRefused, match=re.escape(name)):
        describe("m", model)


# ---- model_index.json: diffusers and transformers classes only ----


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("unet", ["my_module", "MyUNet"]),
        ("unet", ["./unet/my_unet.py", "MyUNet"]),
        ("unet", ["diffusers", "../MyUNet"]),
        ("unet", "unet/my_unet.py"),
        ("unet", {"library": "diffusers"}),
        ("_class_name", ["my_pipeline", "MyPipeline"]),
        ("_class_name", "my_pipeline.py"),
    ],
)
def test_a_model_index_naming_custom_code_is_refused(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str, value: Any
) -> None:
    models_dir = tmp_path / "models"
    model = copy_tiny(tiny_data_dir, models_dir / "m")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, key: value}))
    _, names = scan(tiny_data_dir, models_dir)
    assert names == ["tiny"]
    [line] = refusals(caplog, "m")
    assert "model_index.json" in line


def test_null_components_and_diffusers_pipeline_packages_are_accepted(tmp_path: Path) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.6.0",
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": [None, None],
        "image_encoder": None,
        "requires_safety_checker": False,
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    check_model_index(tmp_path / "model_index.json")
    index["safety_checker"] = ["no_such_pipeline", "StableDiffusionSafetyChecker"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside diffusers and transformers"):
        check_model_index(tmp_path / "model_index.json")


@pytest.mark.parametrize(
    "name",
    [
        "None.py",  # diffusers loads <custom_pipeline>.py, and f"{None}.py" when none is given
        "unet/my_unet.py",
        "text_encoder/config.json",  # given an auto_map below
    ],
)
def test_code_in_the_folder_is_refused(tiny_data_dir: Path, tmp_path: Path, name: str) -> None:
    model = copy_tiny(tiny_data_dir, tmp_path / "m")
    if name.endswith(".json"):
        config = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    else:
        (model / name).write_text("open('canary', 'w')\n")
    with pytest.raises(ModelRefused, match=re.escape(name)):
        describe("m", model)


# ---- damaged models: skipped with one line, the rest still offered ----


def test_a_truncated_safetensors_is_skipped_with_one_line_and_the_rest_are_listed(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models_dir = tmp_path / "models"
    copy_tiny(tiny_data_dir, models_dir / "a-good")
    broken = copy_tiny(tiny_data_dir, models_dir / "broken")
    copy_tiny(tiny_data_dir, models_dir / "z-good")
    weights = broken / UNET_WEIGHTS
    os.truncate(weights, weights.stat().st_size // 2)
    with caplog.at_level(logging.INFO):
        _, names = scan(tiny_data_dir, models_dir)
    assert names == ["tiny", "a-good", "z-good"]
    [line] = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert f"model 'broken' in {broken}: {UNET_WEIGHTS}: tensor" in line
    assert "the file is truncated" in line


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "invalid model_index.json"),
        (b"{not json", "Expecting property name"),
        (b"[]", "is not a JSON object"),
        (b"\xff\xfe", "codec can't decode"),
        (b"[" * 100_000, "recursion"),
    ],
)
def test_an_invalid_model_index_is_skipped_with_one_line(
    tiny_data_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
    problem: str,
) -> None:
    models_dir = tmp_path / "models"
    model = copy_tiny(tiny_data_dir, models_dir / "m")
    (model / "model_index.json").write_bytes(content)
    _, names = scan(tiny_data_dir, models_dir)
    assert names == ["tiny"]
    [line] = refusals(caplog, "m")
    if problem != "invalid model_index.json":
        assert problem in line


def write_raw_safetensors(path: Path, header: Any, data: bytes, length: int | None = None) -> None:
    encoded = json.dumps(header).encode()
    size = len(encoded) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + encoded + data)


def entry(dtype: str = "F32", shape: list[int] | None = None, offsets: Any = (0, 8)) -> Any:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data", "length", "problem"),
    [
        ({"w": entry()}, b"\0" * 8, None, None),  # 2 x F32 = 8 bytes: fine
        ({"__metadata__": {"format": "pt"}, "w": entry()}, b"\0" * 8, None, None),
        ({}, b"", None, None),  # no tensors at all
        ({"w": entry()}, b"\0" * 4, None, "ends at byte 8 of a 4-byte data area"),
        ({"w": entry()}, b"\0" * 8, 10**12, "header length 1000000000000 is beyond"),
        ({"w": entry()}, b"\0" * 8, 200 * 1024 * 1024, "is beyond"),
        ([1, 2], b"", None, "not a JSON object"),
        ({"w": [1]}, b"", None, "not described by an object"),
        ({"w": entry(dtype="Q9")}, b"\0" * 8, None, "unknown dtype 'Q9'"),
        ({"w": entry(shape=[-1])}, b"\0" * 8, None, "invalid shape"),
        ({"w": entry(offsets=(8, 0))}, b"\0" * 8, None, "invalid data_offsets"),
        ({"w": entry(offsets=(0, "8"))}, b"\0" * 8, None, "invalid data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "invalid data_offsets"),
        ({"w": entry(shape=[3])}, b"\0" * 8, None, "does not fill its 8 bytes"),
        ({"w": entry(offsets=(4, 12), shape=[2])}, b"\0" * 12, None, "starts at byte 4, not 0"),
        ({"w": entry()}, b"\0" * 12, None, "4 bytes follow the last tensor"),
        (
            {"a": entry(), "b": entry(offsets=(4, 12))},  # overlapping
            b"\0" * 12,
            None,
            "starts at byte 4, not 8",
        ),
    ],
)
def test_the_safetensors_header_is_checked_against_the_file(
    tmp_path: Path, header: Any, data: bytes, length: int | None, problem: str | None
) -> None:
    path = tmp_path / "w.safetensors"
    write_raw_safetensors(path, header, data, length)
    if problem is None:
        assert safetensors_header(path) == header
    else:
        with pytest.raises(ValueError, match=re.escape(problem)):
            safetensors_header(path)


def test_a_file_too_short_for_a_header_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match="3 bytes is too short"):
        safetensors_header(tmp_path / "w.safetensors")


# ---- loading: the real path, and a damaged model at load time ----


def test_a_scanned_model_loads_from_its_resolved_folder(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    copy_tiny(tiny_data_dir, models_dir / "m")
    (tmp_path / "link").symlink_to(models_dir)  # --models-dir given through a link
    catalog, names = scan(tiny_data_dir, tmp_path / "link")
    assert names == ["tiny", "m"]
    model = catalog.get("m")
    assert model is not None
    assert model.root == models_dir.resolve()
    assert verified_folder(model) == (models_dir / "m").resolve()
    pipeline, load_seconds = PipelineCache("cpu", catalog).get("m", "Euler a")
    assert load_seconds > 0
    assert type(pipeline).__name__ == "StableDiffusionPipeline"


def test_tiny_is_checked_inside_its_own_folder(tiny_data_dir: Path) -> None:
    catalog = Catalog(tiny_data_dir, None)
    catalog.scan()
    tiny = catalog.get("tiny")
    assert tiny is not None
    assert tiny.root == (tiny_data_dir / "models" / "tiny").resolve()
    with pytest.raises(ModelRefused, match="no folder"):
        verified_folder(LocalModel("sdxl", None, 1, "float16"))


def test_a_model_damaged_after_the_scan_fails_its_job_and_the_worker_runs_on(
    tiny_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models_dir = tmp_path / "models"
    truncated = copy_tiny(tiny_data_dir, models_dir / "truncated")
    unconfigured = copy_tiny(tiny_data_dir, models_dir / "unconfigured")
    catalog, names = scan(tiny_data_dir, models_dir)
    assert names == ["tiny", "truncated", "unconfigured"]
    weights = truncated / UNET_WEIGHTS
    os.truncate(weights, weights.stat().st_size - 1)
    (unconfigured / "unet" / "config.json").unlink()  # passes the checks, fails the load

    def task(job_id: str, model: str) -> Task:
        return Task(job_id, 1, make_spec(model=model, steps=1), MemoryMode.AUTO)

    batches = [[task("a", "truncated")], [task("b", "unconfigured")], [task("c", "tiny")]]
    events = run_worker(CPU, TorchBackend("cpu", catalog), batches)
    ended = {e.job_id: e.body for e in events if isinstance(e.body, Ended)}
    assert ended["a"].outcome is AttemptOutcome.FAILED
    assert "model 'truncated'" in ended["a"].reason
    assert "the file is truncated" in ended["a"].reason
    assert ended["b"].outcome is AttemptOutcome.FAILED
    assert "ModelLoadFailed: model 'unconfigured' failed to load" in ended["b"].reason
    assert ended["c"].outcome is AttemptOutcome.SUCCEEDED
    assert "refused to load: model 'truncated'" in caplog.text
