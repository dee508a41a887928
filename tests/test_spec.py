"""Input checks, defaults, sampler names and A1111 infotext."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sdmesh.errors import InvalidArgument, quote
from sdmesh.infotext import infotext
from sdmesh.kinds import InputInfo
from sdmesh.samplers import SAMPLERS, find_sampler
from sdmesh.spec import MAX_PROMPT_CHARS, MemoryMode, SpecRequest, check_labels, resolve
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
        ({"prompt": "a\x00b"}, "prompt", "found '\\x00' at offset 1"),
        ({"prompt": "a\x1bb"}, "prompt", "control characters"),
        ({"negative_prompt": "\x00"}, "negative_prompt", "NUL"),
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
        ({"model": " "}, "model", "must be 1-128 printable characters, got ''"),
        ({"model": "m" * 129}, "model", "must be 1-128 printable characters"),
        ({"model": "sd\x00xl"}, "model", "printable characters, got 'sd\\x00xl'"),
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
        ({"request_id": "r" * 129}, "request_id", "at most 128 printable characters"),
        ({"request_id": "r-\x00"}, "request_id", "printable characters, got 'r-\\x00'"),
        ({"labels": {"bad key!": "x"}}, "labels", "key 'bad key!'"),
        ({"labels": {"k" * 64: "x"}}, "labels", "must be 1-63 letters"),
        ({"labels": {"pool\n": "x"}}, "labels", "key 'pool\\n'"),
        ({"labels": {"pool": "a b"}}, "labels[pool]", "value 'a b'"),
        ({"labels": {"pool": "v" * 64}}, "labels[pool]", "at most 63 letters"),
        ({"labels": {"pool": "a\x00"}}, "labels[pool]", "value 'a\\x00'"),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "labels", "at most 32 labels, got 33"),
        ({"selector": {f"k{i}": "v" for i in range(100)}}, "selector", "at most 32 labels"),
        ({"selector": {"pool": "sdxl\n"}}, "selector[pool]", "value 'sdxl\\n'"),
    ],
)
def test_each_bad_field_is_named(fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check(**fields)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert message in str(raised.value)


def test_the_bounds_are_inclusive_and_tabs_and_line_breaks_are_fine() -> None:
    longest = "x" * (MAX_PROMPT_CHARS - 2) + "\t\n"
    spec = check(prompt=longest, negative_prompt="a\r\nb", request_id="r" * 128,
                 labels={"k" * 63: "v" * 63, "example.com/pool": ""},
                 selector={f"k{i}": "v" for i in range(32)})  # fmt: skip
    assert spec.prompt == longest
    assert spec.labels == {"k" * 63: "v" * 63, "example.com/pool": ""}


MEGABYTE = "\x00" + "x" * 2**20


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": MEGABYTE}, "prompt"),
        ({"negative_prompt": MEGABYTE}, "negative_prompt"),
        ({"model": MEGABYTE}, "model"),
        ({"sampler_name": MEGABYTE}, "sampler_name"),
        ({"request_id": MEGABYTE}, "request_id"),
        ({"labels": {MEGABYTE: "v"}}, "labels"),
        ({"labels": {"pool": MEGABYTE}}, "labels[pool]"),
        ({"selector": {MEGABYTE: "v"}}, "selector"),
    ],
)
def test_a_megabyte_of_input_gives_a_short_error(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check(**fields)
    assert raised.value.field == field
    # The message names the field and the rule and quotes a short prefix;
    # the sampler's lists the names allowed.
    assert len(str(raised.value)) < 400


def test_node_labels_have_the_same_bounds() -> None:
    with pytest.raises(InvalidArgument, match=r"^hello\.labels: at most 32 labels, got 100$"):
        check_labels({f"k{i}": "v" for i in range(100)}, "hello.labels")
    with pytest.raises(InvalidArgument, match=r"^hello\.labels: key 'kkkk"):
        check_labels({"k" * 64: "v"}, "hello.labels")


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("", "''"),
        ("short", "'short'"),
        ("x" * 40, repr("x" * 40)),
        ("x" * 41, f"{'x' * 40!r}…(41 chars)"),
        ("\x00" * 2**20, repr("\x00" * 40) + "…(1048576 chars)"),
    ],
)
def test_quote_cuts_to_a_prefix(value: str, quoted: str) -> None:
    assert quote(value) == quoted


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


def test_second_pass_steps_do_not_count_without_the_hires_fix() -> None:
    """img2img runs int(steps * strength) steps whatever hr_second_pass_steps
    says: one step at 0.5 runs none, and is refused."""
    sha = "ab" * 32
    inputs = {sha: InputInfo(sha, 100, 64, 64, "PNG")}
    request = SpecRequest(
        "p", steps=1, init_image=sha, denoising_strength=0.5, hr_second_pass_steps=100
    )
    with pytest.raises(InvalidArgument, match="denoising_strength"):
        resolve(request, known_models=[], random_seed=lambda: 1, inputs=inputs)
