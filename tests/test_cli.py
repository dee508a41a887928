"""sdctl as a user runs it: exit codes, errors on one line, no torch."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from client._models import Model
from client.cli.commands import models
from client.cli.main import build_parser
from harness.processes import free_port, process_env, sdctl_command
from protos import scheduler_pb2
from sdmesh.flags import parse_duration


def sdctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sdctl_command(*args), capture_output=True, text=True, env=process_env(), timeout=60,
        check=False,
    )  # fmt: skip


def test_an_unreachable_scheduler_exits_3_with_one_line() -> None:
    result = sdctl("--scheduler", f"127.0.0.1:{free_port()}", "jobs")
    assert result.returncode == 3
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: scheduler 127.0.0.1:")
    assert "unreachable: connection refused" in line


def test_user_facing_commands_never_import_torch_or_pil() -> None:
    probe = (
        "import sys\n"
        "from client.cli.main import run\n"
        f"code = run(['--scheduler', '127.0.0.1:{free_port()}', 'jobs', '-o', 'json'])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'sqlalchemy', 'PIL') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "3 []"


def test_bad_flags_exit_2() -> None:
    assert sdctl("submit", "p", "--steps", "many").returncode == 2
    assert sdctl("submit", "p", "--memory-mode", "half").returncode == 2
    result = sdctl("--scheduler", f"127.0.0.1:{free_port()}", "submit", "p", "--label", "nokey")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --label: expected KEY=VALUE, got 'nokey'"


def test_every_printing_command_takes_output() -> None:
    parser = build_parser()
    for command in ("submit", "watch", "jobs", "job", "images", "cancel", "nodes", "models"):
        args = [command] + (
            ["x"] if command in ("submit", "watch", "job", "images", "cancel") else []
        )
        assert parser.parse_args([*args, "-o", "json"]).output == "json"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400), ("2d", 172800), ("5", 5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_help_lists_the_commands() -> None:
    result = sdctl("--help")
    assert result.returncode == 0
    for command in ("submit", "watch", "jobs", "job", "images", "cancel", "nodes", "models", "up"):
        assert command in result.stdout


GLOBAL = ["--scheduler", "h1:1,h2:2", "--user", "bob", "--reconnect-timeout", "5m", "-v"]


@pytest.mark.parametrize(
    "command",
    [["jobs"], ["job", "J"], ["submit", "p", "--steps", "4"], ["health"], ["drain", "n1"]],
)
def test_global_flags_go_before_or_after_the_command(command: list[str]) -> None:
    parser = build_parser()
    before = parser.parse_args([*GLOBAL, "-o", "json", *command])
    after = parser.parse_args([*command, *GLOBAL, "-o", "json"])
    mixed = parser.parse_args(["--user", "bob", *command, "--scheduler", "h1:1,h2:2", "-v",
                               "--reconnect-timeout", "5m", "--output", "json"])  # fmt: skip
    assert vars(before) == vars(after) == vars(mixed)
    assert (after.scheduler, after.user, after.reconnect_timeout, after.verbose, after.output) == (
        "h1:1,h2:2", "bob", 300.0, True, "json",
    )  # fmt: skip
    # Left out, each keeps its default, wherever the others were given.
    bare = parser.parse_args(command)
    assert (bare.scheduler, bare.user, bare.reconnect_timeout, bare.verbose, bare.output) == (
        None, None, 60.0, False, "table",
    )  # fmt: skip


def test_the_readme_s_node_line_parses() -> None:
    args = build_parser().parse_args(
        ["node", "--scheduler", "scheduler-host:50051", "--models-dir", "/models"]
    )
    assert (args.command, args.scheduler, str(args.models_dir)) == (
        "node", "scheduler-host:50051", "/models",
    )  # fmt: skip


def test_server_flags_come_from_the_config_and_keep_its_defaults() -> None:
    from dataclasses import fields

    from client.cli.options import config_from
    from gpu_node.config import AgentConfig
    from scheduler.config import SchedulerConfig

    parser = build_parser()
    args = parser.parse_args(
        ["scheduler", "--lease", "3s", "--heartbeat", "0.5", "--db", "postgres://u@db/x"]
    )
    config = config_from(SchedulerConfig, args, defaults={"data_dir": Path("/d")})
    assert (config.lease_seconds, config.heartbeat_seconds, config.db_url) == (
        3.0, 0.5, "postgresql+psycopg://u@db/x",
    )  # fmt: skip
    assert config.max_attempts == SchedulerConfig.max_attempts  # not given: the declared default
    # Every declared setting is a flag of its command.
    for command, cls in (("scheduler", SchedulerConfig), ("node", AgentConfig)):
        [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        dests = {action.dest for action in commands.choices[command]._actions}
        declared = {f.name for f in fields(cls) if "help" in f.metadata}
        assert declared <= dests, declared - dests
    node = config_from(
        AgentConfig,
        parser.parse_args(["node", "--label", "pool=a", "--gpus", "0,1"]),
        defaults={"data_dir": Path("/n")},
        scheduler="s:1",
    )
    assert (node.labels, node.gpus, node.shutdown_timeout) == ({"pool": "a"}, (0, 1), 30.0)


def test_a_missing_or_unusable_image_exits_2_naming_the_field_before_any_call(
    tmp_path: Path,
) -> None:
    """The scheduler is unreachable: exit 2, not 3, shows nothing was sent."""
    gif = tmp_path / "edges.gif"
    gif.write_bytes(b"GIF89a" + bytes(32))
    scheduler = ["--scheduler", f"127.0.0.1:{free_port()}"]
    missing = sdctl(*scheduler, "submit", "p", "--init-image", str(tmp_path / "x.png"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: init_image: no such file '{tmp_path / 'x.png'}'"
    control = sdctl(*scheduler, "submit", "p", "--controlnet", f"canny:{gif}:0.5")
    assert control.returncode == 2
    assert control.stderr.strip() == (
        f"error: controlnets[0].image: '{gif}' is a GIF; allowed: PNG, JPEG or WebP"
    )


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            ["--lora", "detail:high"],
            "error: --lora: expected NAME or NAME:WEIGHT, got 'detail:high'",
        ),
        (
            ["--controlnet", "canny"],
            "error: --controlnet: expected MODEL:IMAGE or MODEL:IMAGE:WEIGHT",
        ),
    ],
)
def test_bad_kind_flags_exit_2_with_one_line(flags: list[str], error: str) -> None:
    result = sdctl("--scheduler", f"127.0.0.1:{free_port()}", "submit", "p", *flags)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(error), result.stderr


class _Models:
    """What `sdctl models` asks of a client."""

    def __init__(self, models: list[Model]) -> None:
        self.models = models

    def list_models(self) -> list[Model]:
        return self.models


def _model(name: str, kind: str, family: str) -> Model:
    return Model.from_proto(
        scheduler_pb2.Model(
            name=name,
            weight_bytes=2**30,
            dtype="float16",
            node_ids=["n1"],
            kind=kind,
            family=family,
        )
    )


def test_models_json_and_table_carry_kind_and_family(capsys: pytest.CaptureFixture[str]) -> None:
    found = [
        _model("sd15", "", "sd1"),
        _model("detail", "lora", ""),
        _model("odd\x1b[31m", "inpaint", "fam\x1b[2J"),
    ]
    parser = build_parser()
    models(parser.parse_args(["models"]), _Models(found))  # type: ignore[arg-type]
    table = capsys.readouterr().out
    lines = [line.split() for line in table.strip().splitlines()]
    assert lines[0][:4] == ["NAME", "KIND", "FAMILY", "WEIGHTS"]
    assert [line[:3] for line in lines[-3:]] == [
        ["sd15", "base", "sd1"],
        ["detail", "lora", "-"],
        ["odd\\x1b[31m", "inpaint", "fam\\x1b[2J"],  # network text, escaped
    ]
    assert "\x1b" not in table
    models(parser.parse_args(["models", "-o", "json"]), _Models(found))  # type: ignore[arg-type]
    listed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["kind"], m["family"]) for m in listed] == [
        ("sd15", "base", "sd1"),
        ("detail", "lora", ""),
        ("odd\x1b[31m", "inpaint", "fam\x1b[2J"),
    ]


def test_sdctl_job_says_the_kind_and_its_settings() -> None:
    from client.cli.render import kind_lines
    from sdmesh.kinds import ControlNetUnit, LoraWeight
    from sdmesh.spec import JobSpec

    spec = partial(JobSpec, prompt="p", negative_prompt="", model="tiny", width=64, height=64,
                   steps=8, cfg_scale=7.0, seed=1, sampler_name="Euler a", batch_size=2)  # fmt: skip
    assert kind_lines(spec()) == [("Kind", "txt2img")]
    inpaint = spec(
        init_image="a" * 64,
        mask="b" * 64,
        denoising_strength=0.6,
        inpaint_full_res=True,
        loras=(LoraWeight("detail", 0.8),),
        controlnets=(ControlNetUnit("canny", "c" * 64, 0.5, 0.0, 0.8),),
        n_iter=3,
    )
    assert kind_lines(inpaint) == [
        ("Kind", "inpaint"),
        ("Init image", "aaaaaaaaaaaa, denoising 0.6, just resize"),
        ("Mask", "bbbbbbbbbbbb, blur 4, fill original, only masked (padding 32)"),
        ("LoRAs", "detail:0.8"),
        ("ControlNet 0", "canny, image cccccccccccc, weight 0.5, guidance 0-0.8"),
        ("Batches", "3 of 2, one after another"),
    ]
    hires = spec(enable_hr=True, hr_scale=1.5, denoising_strength=0.7)
    assert kind_lines(hires) == [
        ("Kind", "txt2img + hires fix"),
        ("Hires fix", "to 96x96 with Latent, 8 steps, denoising 0.7"),
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_is_one_line_for_a_pipe_and_indented_for_a_person() -> None:
    from sdmesh.output import write_json

    value = {"job_id": "j1", "state": "QUEUED", "images": []}
    piped, terminal = io.StringIO(), _Terminal()
    write_json(value, piped)
    write_json(value, terminal)
    assert piped.getvalue() == '{"job_id": "j1", "state": "QUEUED", "images": []}\n'
    assert terminal.getvalue() == json.dumps(value, indent=2) + "\n"
    assert json.loads(piped.getvalue()) == json.loads(terminal.getvalue()) == value


def test_ctrl_c_while_following_leaves_whole_commands_to_copy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from client.cli.commands import submit

    job_id = "3f9c2a7b5e3d4c6a"

    class Handle:
        id = job_id

        def events(self) -> Iterator[object]:
            raise KeyboardInterrupt
            yield

    class Interrupted:
        on_retry = None

        def submit(self, prompt: str, **options: object) -> Handle:
            return Handle()

    args = build_parser().parse_args(["submit", "a fox"])
    assert submit(args, Interrupted()) == 130  # type: ignore[arg-type]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"stopped watching; job {job_id} goes on",
        f"  follow it:  sdctl watch {job_id}",
        f"  cancel it:  sdctl cancel {job_id}",
    ]
    assert all(len(line) <= 80 for line in lines)
