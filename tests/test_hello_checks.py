"""What a node may say of its models in a hello: names unique within a
kind, a known kind, a bounded family and a sha256 of hex digits. Anything
else is INVALID_ARGUMENT naming the field, never a database error."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.agents import check_hello
from sdmesh.domain import ModelInfo
from sdmesh.errors import InvalidArgument
from tests.factories import make_node

GIB = 2**30


def test_a_lora_may_share_a_model_s_name() -> None:
    models = (ModelInfo("detail", GIB, "float16"), ModelInfo("detail", GIB, "float16", "lora"))
    check_hello(replace(make_node(), models=models))


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (ModelInfo("tiny", GIB, "float16", "base"), "hello.models"),  # tiny twice
        (ModelInfo("x", GIB, "float16", "vae"), "hello.models.kind"),
        (ModelInfo("x", GIB, "float16", "lora", "f" * 33), "hello.models.family"),
        (ModelInfo("x", GIB, "float16", "lora", "sd1\x00"), "hello.models.family"),
        (ModelInfo("x", GIB, "float16", "lora", "sd1", "G" * 64), "hello.models.sha256"),
        (ModelInfo("x", GIB, "float16", "lora", "sd1", "ab"), "hello.models.sha256"),
    ],
)
def test_a_bad_model_in_a_hello_is_refused_naming_the_field(model: ModelInfo, field: str) -> None:
    node = make_node(models=("tiny",))
    with pytest.raises(InvalidArgument) as caught:
        check_hello(replace(node, models=(*node.models, model)))
    assert caught.value.field == field
