"""The models this agent can run, by kind: the built-in `tiny` (and, with
--tiny-variants, `tiny-inpaint`, the ControlNet `tiny-canny` and the LoRA
`tiny-lora`), plus, under --models-dir, every diffusers folder directly in
it (a base model, or an inpainting model when its UNet takes 9 channels),
every `loras/NAME.safetensors` file and every `controlnet/NAME/` diffusers
ControlNetModel folder.

A model is offered only when loading it can run no code and read nothing
outside its root (--models-dir; for tiny and its variants, their own
folder), as `gpu_node.safe_files` checks: no path or link leads out of the
root, every weight is .safetensors with a header that matches its file, no
pickle (a pickle LoRA in `loras/` is skipped with a log line like any
other), no code, and configs that name only diffusers and transformers
classes. Any other is skipped with one log line naming it and the reason,
and the scan goes on with the rest. The loader checks a model again just
before loading it (`verified_folder`), since its files may have changed.

For each model it reports the kind, the weight size and dtype (from the
safetensors headers), the base family it fits ("sd1", "sd2", "sdxl" from
the UNet's or ControlNet's config, a LoRA's from kohya's
`ss_base_model_version` metadata; "tiny" for tiny and its variants; ""
when unknown) and, for LoRAs and ControlNets, the sha256 of the weights,
which A1111's infotext quotes. Names of different kinds may coincide:
models are looked up by (kind, name). Single-file checkpoints are not
loaded yet; they are listed in the log with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpu_node.safe_files import (
    PICKLE_SUFFIXES,
    check_file,
    check_model_index,
    check_shard_index,
    header_dtype,
    model_files,
    read_json,
    safetensors_header,
    weight_files,
)
from gpu_node.tiny import ensure_tiny
from sdmesh.domain import ModelInfo
from sdmesh.kinds import ModelKind
from sdmesh.spec import TINY_MODEL

log = logging.getLogger(__name__)

LORAS_FOLDER = "loras"
CONTROLNETS_FOLDER = "controlnet"
TINY_FAMILY = "tiny"
# A UNet's or ControlNet's cross-attention width tells its base family.
CROSS_ATTENTION_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# kohya's ss_base_model_version values ("sd_v1", "sd_v2_768_v", "sdxl_base_v1-0"...).
LORA_FAMILY_PREFIXES = (("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sdxl", "sdxl"), ("tiny", "tiny"))
INPAINT_IN_CHANNELS = 9  # 4 latent + 4 masked-image latent + 1 mask
CONTROLNET_CLASSES = ("ControlNetModel",)
PIPELINE_KINDS = (ModelKind.BASE, ModelKind.INPAINT)


class ModelRefused(ValueError):
    """A model that is not offered: unsafe to load, or damaged. The message
    names the model and the reason, on one line."""


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path | None  # None for a synthetic model that only simulated GPUs run
    weight_bytes: int
    dtype: str
    root: Path | None = None  # resolved; the model's files must stay inside it
    kind: str = ModelKind.BASE
    family: str = ""
    sha256: str = ""  # of the weights; LoRAs and ControlNets only

    @property
    def synthetic(self) -> bool:
        return self.path is None

    @property
    def key(self) -> tuple[str, str]:
        return (str(self.kind), self.name)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            self.name, self.weight_bytes, self.dtype, str(self.kind), self.family, self.sha256
        )


# (resolved path, size, mtime) -> sha256: a rescan hashes no file twice.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of a file, computed once per (path, size, mtime)."""
    real = path.resolve(strict=True)
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    found = _SHA256_CACHE.get(key)
    if found is None:
        with open(real, "rb") as handle:
            found = hashlib.file_digest(handle, "sha256").hexdigest()
        _SHA256_CACHE[key] = found
    return found


def config_family(config: Any) -> str:
    """The base family of a UNet or ControlNet config."""
    if not isinstance(config, dict):
        return ""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    width = config.get("cross_attention_dim")
    return CROSS_ATTENTION_FAMILIES.get(width, "") if isinstance(width, int) else ""


def lora_family(header: Mapping[str, Any]) -> str:
    """A LoRA's base family from kohya's `ss_base_model_version`."""
    metadata = header.get("__metadata__")
    version = metadata.get("ss_base_model_version") if isinstance(metadata, dict) else None
    if isinstance(version, str):
        for prefix, family in LORA_FAMILY_PREFIXES:
            if version.startswith(prefix):
                return family
    return ""


def _checked_files(folder: Path, root: Path) -> tuple[list[Path], dict[Path, dict[str, Any]]]:
    """Every file of a folder, each checked; the safetensors headers."""
    files = model_files(folder, root)
    headers: dict[Path, dict[str, Any]] = {}
    for path in files:
        where = path.relative_to(folder)
        check_file(path, where)
        if path.name.lower().endswith(".safetensors.index.json"):
            check_shard_index(path, where)
        elif path.suffix.lower() == ".safetensors":
            try:
                headers[path] = safetensors_header(path)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
    return files, headers


def _weights(
    folder: Path, files: list[Path], headers: Mapping[Path, Any]
) -> tuple[list[Path], int, str]:
    chosen = weight_files(folder, files)
    if not chosen:
        raise ValueError("no .safetensors weights")
    largest = max(chosen, key=lambda f: f.stat().st_size)
    return chosen, sum(f.stat().st_size for f in chosen), header_dtype(headers[largest])


def _checked(name: str, folder: Path, root: Path) -> LocalModel:
    files, headers = _checked_files(folder, root)
    if folder / "model_index.json" not in files:
        raise ValueError("it has no model_index.json")
    check_model_index(folder / "model_index.json")
    _, weight_bytes, dtype = _weights(folder, files, headers)
    unet = (
        read_json(folder / "unet" / "config.json")
        if folder / "unet" / "config.json" in files
        else {}
    )
    pipeline_class = str(read_json(folder / "model_index.json").get("_class_name", ""))
    inpaint = "Inpaint" in pipeline_class or (
        isinstance(unet, dict) and unet.get("in_channels") == INPAINT_IN_CHANNELS
    )
    return LocalModel(
        name=name,
        path=folder,
        weight_bytes=weight_bytes,
        dtype=dtype,
        root=root,
        kind=ModelKind.INPAINT if inpaint else ModelKind.BASE,
        family=config_family(unet),
    )


def _checked_controlnet(name: str, folder: Path, root: Path) -> LocalModel:
    files, headers = _checked_files(folder, root)
    if folder / "config.json" not in files:
        raise ValueError("it has no config.json")
    config = read_json(folder / "config.json")
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name not in CONTROLNET_CLASSES:
        raise ValueError(f"its config.json names {class_name!r}, not a ControlNetModel")
    chosen, weight_bytes, dtype = _weights(folder, files, headers)
    # Sharded weights: the hash of the shards' hashes, in order.
    sha256 = (
        file_sha256(chosen[0])
        if len(chosen) == 1
        else hashlib.sha256("".join(file_sha256(f) for f in chosen).encode()).hexdigest()
    )
    return LocalModel(
        name, folder, weight_bytes, dtype, root, ModelKind.CONTROLNET, config_family(config), sha256
    )


def _checked_lora(name: str, path: Path, root: Path) -> LocalModel:
    real = path.resolve(strict=True)
    if not real.is_relative_to(root):
        raise ValueError(f"it leads outside {root}, to {real}")
    if not real.is_file():
        raise ValueError("it is not a file")
    check_file(real, Path(path.name))
    if real.suffix.lower() != ".safetensors":
        raise ValueError("a LoRA must be one .safetensors file")
    header = safetensors_header(real)
    return LocalModel(
        name,
        path,
        real.stat().st_size,
        header_dtype(header),
        root,
        ModelKind.LORA,
        lora_family(header),
        file_sha256(real),
    )


_CHECKS = {
    ModelKind.BASE: _checked,
    ModelKind.INPAINT: _checked,
    ModelKind.CONTROLNET: _checked_controlnet,
    ModelKind.LORA: _checked_lora,
}
_WHAT = {ModelKind.CONTROLNET: "ControlNet", ModelKind.LORA: "LoRA"}


def describe(
    name: str, path: Path, root: Path | None = None, kind: str = ModelKind.BASE
) -> LocalModel:
    """The model at `path` (a folder; a file for a LoRA), checked in full
    (see the module's docstring). `root` is the folder its files must stay
    inside: --models-dir, or by default the model's own folder. `kind`:
    BASE for any pipeline folder (it finds INPAINT itself), CONTROLNET or
    LORA. Raises ModelRefused, whatever is wrong."""
    kind = ModelKind(kind)
    try:
        default_root = path.parent if kind is ModelKind.LORA else path
        real_root = (root or default_root).resolve(strict=True)
        return _CHECKS[kind](name, path, real_root)
    except (ValueError, OSError, RuntimeError) as exc:
        # RuntimeError: a link loop (Path.resolve) or JSON nested too deep.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        what = _WHAT.get(kind, "model")
        raise ModelRefused(f"{what} {name!r} in {path}: {reason}") from exc


def verified_folder(model: LocalModel) -> Path:
    """The resolved folder (a LoRA's file) to load a model from, after
    checking the model again as the scan did: its files may have changed
    since. Raises ModelRefused."""
    if model.path is None or model.root is None:
        raise ModelRefused(f"model {model.name!r} has no folder to load")
    described = describe(model.name, model.path, model.root, _scan_kind(model.kind))
    if described.kind != model.kind:
        raise ModelRefused(f"model {model.name!r} in {model.path} is now a {described.kind} model")
    return model.path.resolve(strict=True)


def _scan_kind(kind: str) -> ModelKind:
    return ModelKind.BASE if kind == ModelKind.INPAINT else ModelKind(kind)


def _synthetic(key: str, weight_bytes: int) -> LocalModel:
    """A synthetic model from --simulate-models: NAME, or KIND:NAME for an
    inpainting model, a ControlNet or a LoRA (lora:detail=150MiB)."""
    kind, sep, name = key.partition(":")
    if not sep or kind not in set(ModelKind):
        kind, name = ModelKind.BASE, key
    return LocalModel(name, None, weight_bytes, "float16", kind=ModelKind(kind))


class Catalog:
    def __init__(
        self,
        data_dir: Path,
        models_dir: Path | None,
        synthetic: Mapping[str, int] | None = None,
        *,
        tiny_variants: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.models_dir = models_dir
        self.synthetic = dict(synthetic or {})  # [kind:]name -> weight bytes, for simulated GPUs
        self.tiny_variants = tiny_variants
        self.models: dict[tuple[str, str], LocalModel] = {}  # by (kind, name)

    def scan(self) -> list[LocalModel]:
        """Builds tiny (and its variants) if needed and rescans
        --models-dir. A model that is refused is skipped with one log line;
        only a missing --models-dir is an error."""
        found: dict[tuple[str, str], LocalModel] = {}
        for name, path, kind in self._tiny():
            self._offer(found, name, path, None, kind, family=TINY_FAMILY)
        if self.models_dir is not None:
            if not self.models_dir.is_dir():
                raise FileNotFoundError(f"--models-dir {self.models_dir} is not a folder")
            root = self.models_dir.resolve(strict=True)
            for entry in sorted(self.models_dir.iterdir()):
                try:
                    if entry.name == LORAS_FOLDER and entry.is_dir():
                        self._look_in(found, entry, root, ModelKind.LORA)
                    elif entry.name == CONTROLNETS_FOLDER and entry.is_dir():
                        self._look_in(found, entry, root, ModelKind.CONTROLNET)
                    else:
                        self._look_at(found, entry, root)
                except OSError as exc:
                    log.warning("skipped %s: %s", entry, " ".join(str(exc).split()))
        for key, weight_bytes in self.synthetic.items():
            model = _synthetic(key, weight_bytes)
            found[model.key] = model
        self.models = found
        return list(found.values())

    def get(self, name: str, kind: str | None = None) -> LocalModel | None:
        """The model of that kind and name; with no kind, the pipeline
        model (base or inpainting: one folder namespace) of that name."""
        if kind is None:
            return self.models.get((ModelKind.BASE, name)) or self.models.get(
                (ModelKind.INPAINT, name)
            )
        return self.models.get((str(kind), name))

    def of_kind(self, kind: str) -> list[LocalModel]:
        return [model for model in self.models.values() if model.kind == kind]

    def _tiny(self) -> list[tuple[str, Path, ModelKind]]:
        root = self.data_dir / "models"
        offered = [(TINY_MODEL, ensure_tiny(root), ModelKind.BASE)]
        if self.tiny_variants:
            from gpu_node import tiny_variants as variants

            offered += [
                (variants.INPAINT_NAME, variants.ensure_tiny_inpaint(root), ModelKind.BASE),
                (
                    variants.CONTROLNET_NAME,
                    variants.ensure_tiny_controlnet(root),
                    ModelKind.CONTROLNET,
                ),
                (variants.LORA_NAME, variants.ensure_tiny_lora(root), ModelKind.LORA),
            ]
        return offered

    def _look_at(self, found: dict[tuple[str, str], LocalModel], entry: Path, root: Path) -> None:
        if entry.is_dir() and os.path.lexists(entry / "model_index.json"):
            self._offer(found, entry.name, entry, root, ModelKind.BASE)
        elif entry.suffix in PICKLE_SUFFIXES:
            log.warning("skipped %s: pickle checkpoints are refused", entry.name)
        elif entry.suffix == ".safetensors":
            log.warning(
                "skipped %s: single-file checkpoints are not supported yet; use a diffusers folder",
                entry.name,
            )

    def _look_in(
        self, found: dict[tuple[str, str], LocalModel], folder: Path, root: Path, kind: ModelKind
    ) -> None:
        """`loras/NAME.safetensors` or `controlnet/NAME/`."""
        for entry in sorted(folder.iterdir()):
            where = f"{folder.name}/{entry.name}"
            if entry.name.startswith("."):
                continue  # a build in progress, or the system's
            if entry.suffix.lower() in PICKLE_SUFFIXES:
                log.warning(
                    "skipped %s: pickle weights are refused (loading them runs code)", where
                )
            elif kind is ModelKind.LORA and entry.suffix.lower() == ".safetensors":
                self._offer(found, entry.stem, entry, root, kind)
            elif kind is ModelKind.CONTROLNET and entry.is_dir():
                self._offer(found, entry.name, entry, root, kind)
            else:
                expected = "NAME.safetensors" if kind is ModelKind.LORA else "a ControlNet folder"
                log.warning("skipped %s: not %s", where, expected)

    @staticmethod
    def _offer(
        found: dict[tuple[str, str], LocalModel],
        name: str,
        path: Path,
        root: Path | None,
        kind: ModelKind,
        family: str | None = None,
    ) -> None:
        try:
            model = describe(name, path, root, kind)
        except ModelRefused as exc:
            log.warning("skipped: %s", exc)
            return
        if family is not None:
            model = replace(model, family=family)
        # Pipeline folders share one namespace, whatever their kind.
        pipeline = model.kind in PIPELINE_KINDS
        names = [(other, name) for other in PIPELINE_KINDS] if pipeline else [model.key]
        if any(taken in found for taken in names):
            log.warning("%s: the name %r is reserved; skipped", path, name)
            return
        found[model.key] = model
