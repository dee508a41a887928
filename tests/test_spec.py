"""Input checks, defaults, sampler names and A1111 infotext."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sdmesh.errors import InvalidArgument
from sdmesh.samplers import SAMPLERS, find_sampler
from sdmesh.spec import MemoryMode, SpecRequest, infotext, resolve
from tests.factories import make_spec


def check(**fields: Any) -> Any:
    request = SpecRequest(**{"prompt": "a lighthouse", **fields})
    return resolve(request, known_models={"sdxl"}, random_seed=lambda: 424242)


def test_defaults_are_a1111s() -> None:
    spec = check()
    assert (spec.model, spec.width, spec.height, spec.steps) == ("tiny", 512, 512, 20)
    assert (spec.cfg_scale, spec.sampler_name, spec.batch_size) == (7.0, "Euler a", 1)
    assert (spec.priority, spec.memory_mode, spec.request_id) == (0, MemoryMode.AUTO, "")
    assert spec.seed == 424242  # -1 was fixed at submit


def test_given_values_are_kept() -> None:
    spec = check(model="sdxl", width=1024, height=768, steps=30, cfg_scale=4.5, seed=7,
                 sampler_name="dpm++ 2m karras", batch_size=3, priority=-100,
                 labels={"team": "art"})  # fmt: skip
    assert (spec.model, spec.width, spec.height, spec.steps, spec.seed) == (
        "sdxl",
        1024,
        768,
        30,
        7,
    )
    assert spec.sampler_name == "DPM++ 2M Karras"  # canonical spelling
    assert spec.seeds == [7, 8, 9]
    assert spec.labels == {"team": "art"}


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": " \n\t"}, "prompt", "must not be empty"),
        ({"prompt": "x" * 4001}, "prompt", "at most 4000 characters, got 4001"),
        ({"prompt": "a\x00b"}, "prompt", "NUL"),
        ({"negative_prompt": "x" * 4001}, "negative_prompt", "at most 4000"),
        ({"steps": 0}, "steps", "between 1 and 150, got 0"),
        ({"steps": 151}, "steps", "between 1 and 150, got 151"),
        ({"width": 100}, "width", "multiple of 8, got 100"),
        ({"height": 513}, "height", "multiple of 8"),
        ({"width": 56}, "width", "between 64 and 2048"),
        ({"height": 4096}, "height", "between 64 and 2048"),
        (
            {"model": "no-such"},
            "model",
            "unknown model 'no-such'; models seen on nodes recently: sdxl, tiny",
        ),
        ({"model": " "}, "model", "must be 1-128 characters"),
        (
            {"sampler_name": "Euler b"},
            "sampler_name",
            "unknown sampler 'Euler b'; allowed: Euler a, Euler,",
        ),
        ({"cfg_scale": 0.5}, "cfg_scale", "between 1 and 30"),
        ({"cfg_scale": math.nan}, "cfg_scale", "must be a number"),
        ({"batch_size": 0}, "batch_size", "between 1 and 8"),
        ({"batch_size": 9}, "batch_size", "between 1 and 8"),
        ({"seed": -2}, "seed", "-1 (random) or between 0 and 4294967295"),
        ({"seed": 2**32}, "seed", "-1 (random) or between 0 and 4294967295"),
        ({"priority": 101}, "priority", "between -100 and 100"),
        ({"request_id": "r" * 129}, "request_id", "at most 128"),
        ({"labels": {"bad key!": "x"}}, "labels", "key 'bad key!'"),
        ({"labels": {"pool": "a b"}}, "labels[pool]", "value 'a b'"),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "labels", "at most 32 labels"),
    ],
)
def test_each_bad_field_is_named(fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check(**fields)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert message in str(raised.value)


def test_sampler_names_and_aliases() -> None:
    assert find_sampler("Euler a") is find_sampler("k_euler_a") is find_sampler("EULER A")
    assert find_sampler("DPM++ 2M").scheduler_class == "DPMSolverMultistepScheduler"  # type: ignore[union-attr]
    karras = find_sampler("DPM++ 2M Karras")
    assert karras is not None
    assert karras.options == {"use_karras_sigmas": True}
    assert find_sampler("DDIM").scheduler_class == "DDIMScheduler"  # type: ignore[union-attr]
    assert find_sampler("nope") is None
    names = [s.name for s in SAMPLERS]
    assert len(names) == len(set(names))
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(names)


def test_infotext_is_a1111s_format() -> None:
    spec = make_spec(prompt="a lighthouse at dusk", negative_prompt="fog", steps=20,
                     cfg_scale=7.0, width=512, height=512, seed=1234)  # fmt: skip
    assert infotext(spec, 1235) == (
        "a lighthouse at dusk\n"
        "Negative prompt: fog\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1235, Size: 512x512, Model: tiny"
    )
    plain = make_spec(prompt="p", cfg_scale=4.5, width=768, height=512, sampler_name="DDIM")
    assert infotext(plain, 1) == (
        "p\nSteps: 4, Sampler: DDIM, CFG scale: 4.5, Seed: 1, Size: 768x512, Model: tiny"
    )


def test_spec_survives_storage() -> None:
    spec = make_spec(labels={"a": "b"}, memory_mode=MemoryMode.FULL)
    assert type(spec).from_dict(spec.to_dict()) == spec
