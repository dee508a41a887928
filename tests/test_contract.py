"""One job spec, the same on every side: the .proto, the contract's
dataclasses, the SDK's submit options and `sdctl submit`'s flags. A field
added to one and forgotten in another fails here."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields
from typing import Any

import grpc
import pytest

from client._inputs import SubmitOptions, spec_request
from client.cli.commands import submit_options
from client.cli.main import build_parser
from client.cli.options import options_from
from protos import common_pb2
from sdmesh.convert import (
    spec_from_proto,
    spec_request_from_proto,
    spec_request_to_proto,
    spec_to_proto,
)
from sdmesh.kinds import ControlNetUnit, LoraWeight
from sdmesh.spec import JobSpec, MemoryMode, SpecRequest, resolve
from sdmesh.wire import is_standby, leader_hint, parse_addresses, standby_metadata

PROTO_FIELDS = [field.name for field in common_pb2.JobSpec.DESCRIPTOR.fields]


def test_the_proto_and_both_spec_dataclasses_have_the_same_fields() -> None:
    assert [f.name for f in fields(SpecRequest)] == PROTO_FIELDS
    assert [f.name for f in fields(JobSpec)] == PROTO_FIELDS


def test_the_sdk_takes_every_field_as_a_submit_option() -> None:
    options = typing.get_type_hints(SubmitOptions)
    assert sorted(["prompt", *options]) == sorted(PROTO_FIELDS)


def test_sdctl_submit_has_a_flag_for_every_field() -> None:
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    destinations = {action.dest for action in commands.choices["submit"]._actions}
    assert set(PROTO_FIELDS) <= destinations


def test_flags_become_a_spec_request_field_by_field() -> None:
    args = build_parser().parse_args(
        ["submit", "a fox", "--negative", "blur", "--model", "tiny", "--width", "640",
         "--height", "384", "--steps", "9", "--cfg-scale", "4.5", "--seed", "12",
         "--sampler", "DDIM", "--batch-size", "2", "--priority", "5",
         "--memory-mode", "model_offload", "--request-id", "r1", "--label", "team=a",
         "--selector", "pool=sdxl", "--selector", "zone=b"]
    )  # fmt: skip
    options = options_from(SpecRequest, args, skip=("prompt",))
    assert spec_request(args.prompt, options) == SpecRequest(
        prompt="a fox",
        negative_prompt="blur",
        model="tiny",
        width=640,
        height=384,
        steps=9,
        cfg_scale=4.5,
        seed=12,
        sampler_name="DDIM",
        batch_size=2,
        priority=5,
        memory_mode=MemoryMode.MODEL_OFFLOAD,
        request_id="r1",
        labels={"team": "a"},
        selector={"pool": "sdxl", "zone": "b"},
    )
    # Flags left out stay out: the scheduler applies its own defaults.
    bare = build_parser().parse_args(["submit", "p"])
    assert options_from(SpecRequest, bare, skip=("prompt",)) == {}


def test_the_kinds_flags_become_a_spec_request_field_by_field() -> None:
    """The image flags stay paths here: the SDK uploads them at submit."""
    args = build_parser().parse_args(
        ["submit", "a fox", "--lora", "a:0.5", "--lora", "b", "--controlnet", "cn:c.png:0.7",
         "--controlnet", "depth:d.png", "--hires-scale", "2", "--hires-steps", "10",
         "--hires-upscaler", "Latent (nearest)", "--hires-width", "1024", "--hires-height", "768",
         "--n-iter", "3", "--init-image", "x.png", "--denoising-strength", "0.6",
         "--resize-mode", "1", "--mask", "m.png", "--mask-blur", "8", "--inpainting-fill", "2",
         "--only-masked", "--only-masked-padding", "16", "--invert-mask", "--request-id", "r"]
    )  # fmt: skip
    assert spec_request(args.prompt, submit_options(args)) == SpecRequest(
        prompt="a fox",
        request_id="r",
        loras=(LoraWeight("a", 0.5), LoraWeight("b", 1.0)),
        controlnets=(ControlNetUnit("cn", "c.png", 0.7), ControlNetUnit("depth", "d.png", 1.0)),
        enable_hr=True,  # implied by the --hires-* flags
        hr_scale=2.0,
        hr_second_pass_steps=10,
        hr_upscaler="Latent (nearest)",
        hr_resize_x=1024,
        hr_resize_y=768,
        n_iter=3,
        init_image="x.png",
        denoising_strength=0.6,
        resize_mode=1,
        mask="m.png",
        mask_blur=8,
        inpainting_fill=2,
        inpaint_full_res=True,
        inpaint_full_res_padding=16,
        inpainting_mask_invert=True,
    )


@pytest.mark.parametrize(
    ("flags", "enable_hr"),
    [
        ([], None),
        (["--hires"], True),
        (["--hires-steps", "5"], True),
        (["--hires-width", "1024"], True),
        (["--denoising-strength", "0.5"], None),  # img2img's too: no hires fix
    ],
)
def test_any_hires_flag_turns_the_hires_fix_on(flags: list[str], enable_hr: bool | None) -> None:
    args = build_parser().parse_args(["submit", "p", *flags])
    assert submit_options(args).get("enable_hr") == enable_hr


def test_a_spec_request_crosses_the_wire_unset_fields_unset() -> None:
    request = SpecRequest("p", steps=0, labels={"a": "b"}, memory_mode=MemoryMode.FULL)
    message = spec_request_to_proto(request)
    assert not message.HasField("width")
    assert message.HasField("steps")
    assert spec_request_from_proto(message) == request


def test_a_resolved_spec_crosses_the_wire_and_the_json_column_unchanged() -> None:
    spec = resolve(
        SpecRequest("p", selector={"pool": "x"}, request_id="r"),
        known_models=(),
        random_seed=lambda: 99,
    )
    assert spec_from_proto(spec_to_proto(spec)) == spec
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert set(spec.to_dict()) == set(PROTO_FIELDS)


class _Answered(grpc.RpcError):
    def __init__(self, trailing: tuple[tuple[str, str], ...]) -> None:
        self._trailing = trailing

    def trailing_metadata(self) -> Any:
        return self._trailing


def test_a_standby_says_so_in_trailing_metadata_not_in_text() -> None:
    standby = _Answered(standby_metadata("10.0.0.2:50051"))
    assert is_standby(standby)
    assert leader_hint(standby) == "10.0.0.2:50051"
    assert not is_standby(_Answered(()))
    assert leader_hint(_Answered(())) == ""


@pytest.mark.parametrize(
    ("text", "addresses"),
    [
        ("a:1", ["a:1"]),
        (" a:1, b:2 ,a:1,", ["a:1", "b:2"]),
        (["a:1,b:2", "c:3"], ["a:1", "b:2", "c:3"]),
        ("", []),
    ],
)
def test_address_lists_parse_the_same_for_agents_and_clients(
    text: str | list[str], addresses: list[str]
) -> None:
    assert parse_addresses(text) == addresses


def test_a_job_without_a_resolved_spec_is_one_readable_error_in_the_sdk() -> None:
    from client import Job, SdmeshError
    from protos import scheduler_pb2

    with pytest.raises(
        SdmeshError, match="job j: the scheduler sent an incomplete spec: batch_size"
    ):
        Job.from_proto(scheduler_pb2.Job(id="j", spec=common_pb2.JobSpec(prompt="p")))
