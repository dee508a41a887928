"""The checks that make a model's files safe to load, without loading
them: paths that stay inside a root, no pickle and no code, safetensors
headers that match their files, and configs that name only diffusers and
transformers classes. Used by the catalog's scan and again just before a
load (gpu_node/catalog.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

# torch.load and friends unpickle these; .npy/.npz may hold pickled objects.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".joblib", ".npy", ".npz")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".onnx", ".gguf", ".pb")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so")
# The configs where transformers looks for remote code (`auto_map`).
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json")
COMPONENT_LIBRARIES = ("diffusers", "transformers")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a safetensors header; real ones are under 1 MiB
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # model_index.json and the configs read here
MAX_FILES = 10_000  # in one model folder: bounds the scan of a wrong folder
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

SAFETENSORS_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# Bits per element of every dtype the safetensors format defines.
SAFETENSORS_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_span(key: str, entry: Any, data_bytes: int) -> tuple[int, int]:
    """A tensor entry's byte range in the data area, checked against its
    dtype and shape."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {key!r} is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    bits = SAFETENSORS_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise ValueError(f"tensor {key!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"tensor {key!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"tensor {key!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_bytes:
        raise ValueError(
            f"tensor {key!r} ends at byte {end} of a {data_bytes}-byte data area: "
            "the file is truncated"
        )
    if math.prod(shape) * bits != (end - begin) * 8:
        raise ValueError(f"tensor {key!r}: {dtype} {shape} does not fill its {end - begin} bytes")
    return begin, end


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a .safetensors file, checked against the file without
    loading any tensor: an 8-byte little-endian length no larger than the
    file or MAX_HEADER_BYTES, a JSON object, and tensors that tile the data
    area that follows exactly, as the safetensors library requires. Raises
    ValueError saying what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes is too short for a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"its header length {length} is beyond the file's {size - 8} bytes "
                f"or the {MAX_HEADER_BYTES}-byte limit"
            )
        raw = handle.read(length)
    if len(raw) != length:
        raise ValueError("the file shrank while its header was read")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    data_bytes = size - 8 - length
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict):
                raise ValueError("its __metadata__ is not an object")
            continue
        spans.append((*_tensor_span(key, entry, data_bytes), key))
    covered = 0
    for begin, end, key in sorted(spans):
        if begin != covered:
            raise ValueError(f"tensor {key!r} starts at byte {begin}, not {covered}")
        covered = end
    if covered != data_bytes:
        raise ValueError(f"{data_bytes - covered} bytes follow the last tensor")
    return header


def header_dtype(header: Mapping[str, Any]) -> str:
    """The dtype of the first tensor in a safetensors header."""
    for key, entry in header.items():
        if key != "__metadata__":
            name = str(entry["dtype"])
            return SAFETENSORS_DTYPES.get(name, name.lower())
    return "unknown"


def safetensors_dtype(path: Path) -> str:
    """The dtype of the first tensor in a .safetensors file, from its header."""
    return header_dtype(safetensors_header(path))


def model_files(folder: Path, root: Path) -> list[Path]:
    """Every file in a model folder as a loader would reach it, links
    followed. Each path, the folder's own included, must resolve inside
    `root` (resolved), so neither `..` nor a link leads out of it. A broken
    link or anything but a folder or a regular file (a FIFO would block the
    scan) is refused. Raises ValueError saying which path is wrong."""
    real = folder.resolve(strict=True)
    if not real.is_relative_to(root):
        raise ValueError(f"the folder leads outside {root}, to {real}")
    if not real.is_dir():
        raise ValueError("it is not a folder")
    files: list[Path] = []
    seen = {real}  # a link back up the tree is walked once
    pending = [folder]
    while pending:
        for entry in sorted(pending.pop().iterdir()):
            where = entry.relative_to(folder)
            if not os.path.exists(entry):
                raise ValueError(f"{where} is a broken link")
            target = entry.resolve(strict=True)
            if not target.is_relative_to(root):
                raise ValueError(f"{where} leads outside {root}, to {target}")
            if target.is_dir():
                if target not in seen:
                    seen.add(target)
                    pending.append(entry)
            elif target.is_file():
                files.append(entry)
                if len(files) > MAX_FILES:
                    raise ValueError(f"it holds more than {MAX_FILES} files")
            else:
                raise ValueError(f"{where} is neither a file nor a folder")
    return files


def _holds_pickle(path: Path) -> bool:
    """Whether a file starts as a pickle (protocol 2 or later) or as a zip,
    which is how torch.save writes its pickles."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or (
        head == b"PK\x03\x04"
    )


def read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"it is larger than {MAX_CONFIG_BYTES} bytes")
    return json.loads(path.read_bytes().decode("utf-8"))


def check_file(path: Path, where: Path) -> None:
    """Refuses a file that a loader would unpickle or import, or that is
    weights in a format other than safetensors. A safetensors file's header
    is checked on its own (`safetensors_header`); its length prefix could
    look like a pickle's."""
    name = path.name.lower()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{where}: pickle weights are refused (loading them runs code)")
    if suffix in OTHER_WEIGHT_SUFFIXES:
        raise ValueError(f"{where}: only .safetensors weights are loaded")
    if suffix in CODE_SUFFIXES:
        raise ValueError(f"{where}: code files are refused (diffusers would import them)")
    if name.endswith(".index.json") and not name.endswith(".safetensors.index.json"):
        raise ValueError(f"{where}: an index of pickle weights is refused")
    if suffix != ".safetensors" and _holds_pickle(path):
        raise ValueError(f"{where} holds a pickle, which is refused")
    if name in CODE_CONFIGS:
        config = read_json(path)
        if isinstance(config, dict) and "auto_map" in config:
            raise ValueError(f"{where} names custom code (auto_map)")


def check_shard_index(path: Path, where: Path) -> None:
    """A sharded weight's index names its shards as plain file names beside
    it, each of them .safetensors: the loader joins them to the folder, so
    `../` in a name would read outside it."""
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{where} has no weight_map")
    for shard in set(weight_map.values()):
        if (
            not isinstance(shard, str)
            or Path(shard).name != shard
            or shard in (".", "..")
            or not shard.endswith(".safetensors")
            or not (path.parent / shard).is_file()
        ):
            raise ValueError(f"{where} names a shard {shard!r} that is not a file beside it")


@cache
def _is_diffusers_pipeline_module(library: str) -> bool:
    """Whether `library` is one of diffusers' pipeline packages, which
    model_index.json may name as a component's library (SD1.x names its
    safety checker ["stable_diffusion", ...]). Looked up on disk, so the
    scan imports no diffusers."""
    if not IDENTIFIER.fullmatch(library):
        return False
    spec = importlib.util.find_spec("diffusers")
    locations = spec.submodule_search_locations if spec is not None else None
    return any(
        (Path(location) / "pipelines" / library / "__init__.py").is_file()
        for location in locations or ()
    )


def check_model_index(path: Path) -> None:
    """Refuses a model_index.json that diffusers could not load without
    running the model's own code: the pipeline must be a diffusers class
    named by a plain name (a [file, class] pair is a custom pipeline), and
    each component a [library, class] pair from diffusers (its pipeline
    packages included) or transformers, or [null, null] for none. Other
    keys are the pipeline's options: numbers, booleans and null. A string
    there would be unpacked as a component."""
    index = read_json(path)
    if not isinstance(index, dict):
        raise ValueError("model_index.json is not a JSON object")
    pipeline_class = index.get("_class_name")
    if not isinstance(pipeline_class, str) or not IDENTIFIER.fullmatch(pipeline_class):
        raise ValueError(
            f"model_index.json names the pipeline {pipeline_class!r}, not a diffusers class "
            "(custom pipelines run code)"
        )
    for key, value in index.items():
        if key.startswith("_") or value is None or isinstance(value, bool | int | float):
            continue
        if value == [None, None]:
            continue
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"model_index.json gives component {key!r} as {value!r}")
        library, class_name = value
        known = isinstance(library, str) and (
            library in COMPONENT_LIBRARIES or _is_diffusers_pipeline_module(library)
        )
        if not known or not isinstance(class_name, str) or not IDENTIFIER.fullmatch(class_name):
            raise ValueError(
                f"model_index.json names component {key!r} as {value!r}, outside diffusers "
                "and transformers (custom code)"
            )


def weight_files(folder: Path, files: list[Path] | None = None) -> list[Path]:
    """The .safetensors files diffusers would load: the plain ones, or the
    variant files (model.fp16.safetensors) when a component has only those."""
    if files is None:
        files = model_files(folder, folder.resolve())
    chosen: list[Path] = []
    for component in sorted({f.parent for f in files if f.suffix == ".safetensors"}):
        found = sorted(f for f in files if f.parent == component and f.suffix == ".safetensors")
        plain = [f for f in found if "." not in f.name.removesuffix(".safetensors")]
        chosen.extend(plain or found)
    return chosen
