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

from client._async import SubmitOptions, spec_request
from client.cli.main import build_parser
from client.cli.options import options_from
from protos import common_pb2
from sdmesh.convert import (
    spec_from_proto,
    spec_request_from_proto,
    spec_request_to_proto,
    spec_to_proto,
)
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
    assert spec_request(args.prompt, options) == SpecRequest(  # type: ignore[arg-type]
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
