"""What `submit` takes: its options (`SubmitOptions`, the fields of
`sdmesh.spec.SpecRequest`) and how they become a `SpecRequest`: input
images (the init image, the mask, each ControlNet's image) given as a path,
bytes, a PIL image or an `InputInfo` already uploaded, each uploaded once
and named by its sha256; LoRAs and ControlNet units in the shapes people
write them.

Every image is read and checked here, before the client sends anything: a
missing file, one over `MAX_INPUT_BYTES` or one that is not a PNG, JPEG or
WebP by its first bytes is an InvalidArgumentError naming the field. The
scheduler checks the rest (the header, the pixel count) when the image is
uploaded. PIL is imported only when a PIL image is given, so that the SDK
and `sdctl jobs` start fast.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypedDict

from client._errors import InvalidArgumentError, SdmeshError
from protos import common_pb2
from sdmesh.kinds import (
    INPUT_FORMATS,
    MAX_INPUT_BYTES,
    ControlNetUnit,
    InputInfo,
    LoraWeight,
    image_format,
)
from sdmesh.spec import MemoryMode, SpecRequest
from sdmesh.wire import INPUT_CHUNK_BYTES

# Scheduler.UploadInput takes chunks of at most 1 MiB (protos/scheduler.proto).
# What the scheduler's refusals of an upload call the image.
UPLOAD_FIELD = "image"
# The submit options that name an input image (ControlNet units carry theirs).
IMAGE_OPTIONS = ("init_image", "mask")


class PilImage(Protocol):
    """A PIL image, as far as this module uses one (no import of PIL)."""

    def save(self, fp: BinaryIO, format: str | None = None) -> None: ...


ImageInput = str | os.PathLike[str] | bytes | PilImage | InputInfo
LoraOption = LoraWeight | str | tuple[str, float] | Mapping[str, Any]
ControlNetOption = (
    ControlNetUnit | tuple[str, ImageInput] | tuple[str, ImageInput, float] | Mapping[str, Any]
)


class SubmitOptions(TypedDict, total=False):
    """What a job can ask for besides its prompt: the fields of
    `sdmesh.spec.SpecRequest`, whose module holds their defaults and limits
    (tests/test_contract.py keeps the two in step)."""

    negative_prompt: str
    model: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int  # -1: random, fixed by the scheduler
    sampler_name: str
    batch_size: int
    priority: int  # -100..100, higher first
    memory_mode: str | MemoryMode  # auto, full, model_offload, sequential_offload
    labels: Mapping[str, str]
    selector: Mapping[str, str]  # only nodes with all these labels take the job
    request_id: str
    # img2img and inpainting: images as a path, bytes, a PIL image or an
    # InputInfo from `upload`; each is uploaded once and sent as its sha256.
    init_image: ImageInput
    denoising_strength: float  # 0..1
    resize_mode: int  # 0 just resize, 1 crop and resize, 2 resize and fill
    mask: ImageInput  # white is repainted
    mask_blur: int
    inpainting_fill: int  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool  # "only masked"
    inpaint_full_res_padding: int
    inpainting_mask_invert: bool
    # Hires fix (txt2img): a second pass at hr_scale, or at hr_resize_x/y.
    enable_hr: bool
    hr_scale: float
    hr_resize_x: int
    hr_resize_y: int
    hr_upscaler: str  # "Latent" and its variants, "None", "Lanczos", "Nearest"
    hr_second_pass_steps: int  # 0: as steps
    loras: Sequence[LoraOption]  # "name", ("name", 0.8), {"name", "weight"} or LoraWeight
    # {"model", "image", "weight", "guidance_start", "guidance_end"} or
    # ControlNetUnit; the image as init_image's
    controlnets: Sequence[ControlNetOption]
    n_iter: int  # batches one after another


def spec_request(prompt: str, options: Mapping[str, Any]) -> SpecRequest:
    """The spec as submitted, with a request id made here unless given: the
    same id goes out on every retry. Options left out (or None) take the
    scheduler's defaults."""
    values: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    mode = values.get("memory_mode", MemoryMode.AUTO)
    try:
        values["memory_mode"] = MemoryMode(mode)
    except ValueError:
        allowed = ", ".join(m.value for m in MemoryMode)
        raise InvalidArgumentError(f"memory_mode: must be one of {allowed}, got {mode!r}") from None
    values["request_id"] = values.get("request_id") or uuid.uuid4().hex
    for name in ("labels", "selector"):
        values[name] = dict(values.get(name) or {})
    try:
        return SpecRequest(prompt=prompt, **values)
    except TypeError as exc:  # an option SpecRequest does not have
        raise InvalidArgumentError(f"submit: {exc}") from None


@dataclass(frozen=True)
class LocalInput:
    """An input image read and checked on this side, before its upload."""

    data: bytes
    sha256: str
    format: str  # "PNG", "JPEG" or "WEBP"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _read_file(field: str, path: Path) -> bytes:
    """The file's bytes, its size checked before it is read."""
    shown = repr(str(path))  # the caller's own path, whole
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidArgumentError(f"{field}: no such file {shown}") from None
    except OSError as exc:
        raise InvalidArgumentError(f"{field}: cannot read {shown}: {exc.strerror}") from None
    if not path.is_file():
        raise InvalidArgumentError(f"{field}: {shown} is not a file")
    if size > MAX_INPUT_BYTES:
        raise InvalidArgumentError(
            f"{field}: {shown} is {_mib(size)}; an input image may be at most "
            f"{_mib(MAX_INPUT_BYTES)}"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"{field}: cannot read {shown}: {exc.strerror}") from None


def _is_pil_image(image: object) -> bool:
    """Without importing PIL: if the caller has a PIL image, PIL is loaded."""
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(image, pil.Image)


def _png_of(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_input(field: str, image: object) -> LocalInput:
    """An image given as a path (str or Path), bytes or a PIL image (encoded
    as PNG), checked: at most MAX_INPUT_BYTES, a PNG, JPEG or WebP."""
    where = "it"
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, str | os.PathLike):
        data = _read_file(field, Path(image))
        where = repr(str(image))
    elif _is_pil_image(image):
        data = _png_of(image)
    else:
        raise InvalidArgumentError(
            f"{field}: expected a file path, bytes or a PIL image, got {type(image).__name__}"
        )
    if not data:
        raise InvalidArgumentError(f"{field}: {where} is empty")
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidArgumentError(
            f"{field}: {where} is {_mib(len(data))}; an input image may be at most "
            f"{_mib(MAX_INPUT_BYTES)}"
        )
    found = image_format(data)
    if found not in INPUT_FORMATS:
        what = f"a {found}" if found else "not an image this side knows"
        raise InvalidArgumentError(f"{field}: {where} is {what}; allowed: PNG, JPEG or WebP")
    return LocalInput(data, hashlib.sha256(data).hexdigest(), found)


def input_chunks(data: bytes) -> list[common_pb2.InputChunk]:
    """The upload's messages: a list, so that a retried upload sends it again."""
    return [
        common_pb2.InputChunk(offset=offset, data=data[offset : offset + INPUT_CHUNK_BYTES])
        for offset in range(0, len(data), INPUT_CHUNK_BYTES)
    ]


def lora_weights(field: str, loras: Iterable[object]) -> tuple[LoraWeight, ...]:
    """LoRAs as `LoraWeight`s, `"name"`, `("name", weight)` or
    `{"name": ..., "weight": ...}`."""
    if isinstance(loras, str | bytes):
        raise InvalidArgumentError(f"{field}: expected a list of LoRAs, got one string")
    found = []
    for index, lora in enumerate(loras):
        if isinstance(lora, LoraWeight):
            found.append(lora)
        elif isinstance(lora, str):
            found.append(LoraWeight(lora))
        elif isinstance(lora, tuple | list) and len(lora) == 2 and isinstance(lora[0], str):
            found.append(LoraWeight(lora[0], _number(f"{field}[{index}].weight", lora[1])))
        elif isinstance(lora, Mapping) and isinstance(lora.get("name"), str):
            weight = _number(f"{field}[{index}].weight", lora.get("weight", 1.0))
            found.append(LoraWeight(lora["name"], weight))
        else:
            raise InvalidArgumentError(
                f"{field}[{index}]: expected a name, (name, weight) or a LoraWeight, "
                f"got {type(lora).__name__}"
            )
    return tuple(found)


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"{field}: must be a number, got {type(value).__name__}")
    return float(value)


_UNIT_KEYS = ("model", "image", "weight", "guidance_start", "guidance_end")


@dataclass(frozen=True)
class ControlNetRequest:
    """A ControlNet unit as the caller gave it: its image not uploaded yet."""

    model: str
    image: object
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0


def controlnet_requests(field: str, units: Iterable[object]) -> tuple[ControlNetRequest, ...]:
    """Units as `ControlNetUnit`s (their image a path), `(model, image)` or
    `(model, image, weight)`, or dicts with model, image and, optionally,
    weight, guidance_start and guidance_end."""
    found = []
    for index, unit in enumerate(units):
        name = f"{field}[{index}]"
        if isinstance(unit, ControlNetUnit):
            values: Mapping[str, object] = vars(unit)
        elif isinstance(unit, tuple) and len(unit) in (2, 3):
            values = dict(zip(("model", "image", "weight"), unit, strict=False))
        elif isinstance(unit, Mapping):
            values = unit
            unknown = sorted(set(values) - set(_UNIT_KEYS))
            if unknown:
                raise InvalidArgumentError(
                    f"{name}: unknown key {unknown[0]!r}; allowed: {', '.join(_UNIT_KEYS)}"
                )
        else:
            raise InvalidArgumentError(
                f"{name}: expected a dict with model and image, (model, image[, weight]) "
                "or a ControlNetUnit, "
                f"got {type(unit).__name__}"
            )
        model = values.get("model")
        if not isinstance(model, str) or "image" not in values:
            raise InvalidArgumentError(f"{name}: needs a model (a name) and an image")
        numbers = {
            key: _number(f"{name}.{key}", values[key])
            for key in ("weight", "guidance_start", "guidance_end")
            if key in values
        }
        found.append(ControlNetRequest(model, values["image"], **numbers))
    return tuple(found)


@dataclass(frozen=True)
class Prepared:
    """Submit options with every image replaced by its sha256, and the
    images to upload, each once, by sha256. Images given as an `InputInfo`
    are uploaded already."""

    options: dict[str, Any]
    to_upload: dict[str, LocalInput]
    fields: dict[str, str]  # the first field that named each image, for errors


def prepare(options: Mapping[str, Any]) -> Prepared:
    """Reads and checks every image the options name, before anything is
    sent; LoRAs and ControlNet units in their contract types."""
    values = dict(options)
    to_upload: dict[str, LocalInput] = {}
    named: dict[str, str] = {}

    def sha_of(field: str, image: object) -> str:
        if isinstance(image, InputInfo):
            return image.sha256
        local = read_input(field, image)
        to_upload.setdefault(local.sha256, local)
        named.setdefault(local.sha256, field)
        return local.sha256

    for name in IMAGE_OPTIONS:
        if values.get(name) not in (None, ""):
            values[name] = sha_of(name, values[name])
    if values.get("loras") is not None:
        values["loras"] = lora_weights("loras", values["loras"])
    if values.get("controlnets") is not None:
        values["controlnets"] = tuple(
            ControlNetUnit(
                unit.model,
                sha_of(f"controlnets[{index}].image", unit.image),
                unit.weight,
                unit.guidance_start,
                unit.guidance_end,
            )
            for index, unit in enumerate(controlnet_requests("controlnets", values["controlnets"]))
        )
    return Prepared(values, to_upload, named)


Send = Callable[[list[common_pb2.InputChunk]], Awaitable[InputInfo]]


class Uploads:
    """The input images one client has uploaded, by sha256: the same bytes
    go up once per process, however many jobs name them. `send` makes the
    UploadInput call (with the client's retries)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._done: dict[str, InputInfo] = {}

    async def upload(self, field: str, local: LocalInput) -> InputInfo:
        """An error from the scheduler names the field."""
        if local.sha256 in self._done:
            return self._done[local.sha256]
        try:
            info = await self._send(input_chunks(local.data))
        except InvalidArgumentError as exc:
            # The scheduler calls the upload "image"; the caller knows which.
            detail = str(exc).removeprefix(f"{UPLOAD_FIELD}: ")
            raise InvalidArgumentError(f"{field}: {detail}") from None
        if info.sha256 != local.sha256:
            raise SdmeshError(f"{field}: the upload arrived damaged; try again")
        self._done[local.sha256] = info
        return info

    async def upload_all(self, prepared: Prepared) -> set[str]:
        """Uploads what `prepared` needs; returns those uploaded before."""
        reused = set(prepared.to_upload) & set(self._done)
        for sha, local in prepared.to_upload.items():
            await self.upload(prepared.fields[sha], local)
        return reused

    async def again(self, prepared: Prepared, reused: set[str], error: SdmeshError) -> bool:
        """After a submit refused for an input uploaded earlier that the
        scheduler no longer has (deleted with its job): uploads those again
        and says whether the submit is worth retrying."""
        gone = [sha for sha in reused if sha[:12] in str(error)]
        for sha in gone:
            del self._done[sha]
            await self.upload(prepared.fields[sha], prepared.to_upload[sha])
        return bool(gone)
