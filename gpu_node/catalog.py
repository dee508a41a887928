"""The models this agent can run: the built-in `tiny`, plus every diffusers
folder (one with a model_index.json) directly under --models-dir.

For each it reports the weight size and dtype, read from the safetensors
headers without loading anything. Pickle weights (.ckpt, .pt, .bin) are
refused: loading them runs arbitrary code. Single-file checkpoints are not
loaded yet; they are listed in the log with the reason.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpu_node.tiny import ensure_tiny
from sdmesh.domain import ModelInfo
from sdmesh.spec import TINY_MODEL

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path | None  # None for a synthetic model that only simulated GPUs run
    weight_bytes: int
    dtype: str

    @property
    def synthetic(self) -> bool:
        return self.path is None

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.weight_bytes, self.dtype)


def safetensors_dtype(path: Path) -> str:
    """The dtype of the first tensor in a .safetensors file, from its header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    for key, entry in header.items():
        if key != "__metadata__":
            name = str(entry["dtype"])
            return SAFETENSORS_DTYPES.get(name, name.lower())
    return "unknown"


def weight_files(folder: Path) -> list[Path]:
    """The .safetensors files diffusers would load: the plain ones, or the
    variant files (model.fp16.safetensors) when a component has only those."""
    chosen: list[Path] = []
    for component in sorted({p.parent for p in folder.rglob("*.safetensors")}):
        files = sorted(component.glob("*.safetensors"))
        plain = [f for f in files if "." not in f.name.removesuffix(".safetensors")]
        chosen.extend(plain or files)
    return chosen


def describe(name: str, folder: Path) -> LocalModel:
    files = weight_files(folder)
    if not files:
        pickles = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        problem = "pickle weights are refused" if pickles else "no .safetensors weights"
        raise ValueError(f"model {name!r} in {folder}: {problem}")
    largest = max(files, key=lambda f: f.stat().st_size)
    return LocalModel(
        name=name,
        path=folder,
        weight_bytes=sum(f.stat().st_size for f in files),
        dtype=safetensors_dtype(largest),
    )


class Catalog:
    def __init__(
        self, data_dir: Path, models_dir: Path | None, synthetic: Mapping[str, int] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.models_dir = models_dir
        self.synthetic = dict(synthetic or {})  # name -> weight bytes, for simulated GPUs
        self.models: dict[str, LocalModel] = {}

    def scan(self) -> list[LocalModel]:
        """Builds tiny if needed and rescans --models-dir."""
        found = {TINY_MODEL: describe(TINY_MODEL, ensure_tiny(self.data_dir / "models"))}
        if self.models_dir is not None:
            if not self.models_dir.is_dir():
                raise FileNotFoundError(f"--models-dir {self.models_dir} is not a folder")
            for entry in sorted(self.models_dir.iterdir()):
                if entry.is_dir() and (entry / "model_index.json").exists():
                    if entry.name == TINY_MODEL:
                        log.warning("%s: the name %r is reserved; skipped", entry, TINY_MODEL)
                        continue
                    try:
                        found[entry.name] = describe(entry.name, entry)
                    except ValueError as exc:
                        log.warning("skipped: %s", exc)
                elif entry.suffix in PICKLE_SUFFIXES:
                    log.warning("skipped %s: pickle checkpoints are refused", entry.name)
                elif entry.suffix == ".safetensors":
                    log.warning(
                        "skipped %s: single-file checkpoints are not supported yet; "
                        "use a diffusers folder",
                        entry.name,
                    )
        for name, weight_bytes in self.synthetic.items():
            found[name] = LocalModel(name, None, weight_bytes, "float16")
        self.models = found
        return list(found.values())

    def get(self, name: str) -> LocalModel | None:
        return self.models.get(name)
