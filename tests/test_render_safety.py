"""Text from the network reaches the terminal escaped: a node, device or
model name, a prompt or a reason with escape sequences, C1 controls,
newlines or bidi overrides in it shows them as escapes in `sdctl nodes`,
`models`, `jobs`, `job`, `health` and `drain`, and `-o json` escapes them
too."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from client._models import Attempt, Device, Health, Job, Model, Node
from client.cli import render
from sdmesh.spec import MemoryMode
from tests.factories import make_spec

NOW = datetime(2025, 1, 1, tzinfo=UTC)
# What a rogue agent or user put in names and prompts: a colour and clear
# screen, a window-title OSC ending in BEL, a C1 CSI, a fake second row, a
# right-to-left override, DEL and NUL.
EVIL = "x\x1b[31m\x1b[2J\x1b]0;pwned\x07\x9b1m\nFAKE ROW\u202etxt.exe\x7f\x00"
SHOWN = r"x\x1b[31m\x1b[2J\x1b]0;pwned\x07\x9b1m\x0aFAKE ROW\u202etxt.exe\x7f\x00"
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def evil_node() -> Node:
    device = Device(
        index=0, name="GPU " + EVIL, uuid="GPU-0", kind="cuda", total_bytes=2**34,
        free_bytes=2**33, used_bytes=2**33, utilization_percent=5.0, active_jobs=1,
        resident_models=["tiny" + EVIL], speeds={}, healthy=False, health_detail=EVIL,
    )  # fmt: skip
    return Node(
        id="n1" + EVIL, name="node" + EVIL, hostname="h" + EVIL, connected=True,
        devices=[device], models=["model" + EVIL], labels={"pool": EVIL},
        agent_version=EVIL, last_seen=NOW, draining=True,
    )  # fmt: skip


def evil_job() -> Job:
    attempt = Attempt(
        attempt=1, node_id="n1" + EVIL, node_name="node" + EVIL, gpu_index=0,
        memory_mode=MemoryMode.FULL, outcome="failed", reason=EVIL, placement="on " + EVIL,
        vram_estimate_bytes=2**30, queued_seconds=1.0, load_seconds=1.0,
        mean_step_seconds=0.1, peak_vram_bytes=2**30, assigned_at=NOW, started_at=NOW,
        ended_at=NOW,
    )  # fmt: skip
    spec = make_spec(
        prompt="a lighthouse" + EVIL, negative_prompt="blurry" + EVIL, model="tiny" + EVIL,
        selector={"pool": EVIL},
    )  # fmt: skip
    return Job(
        id="job" + EVIL, state="FAILED", owner="mallory" + EVIL, spec=spec, attempt=1,
        failures=1, max_attempts=3, node_id="n1" + EVIL, node_name="node" + EVIL,
        gpu_index=0, memory_mode=MemoryMode.FULL, reason="failed: " + EVIL, images=[],
        created_at=NOW, updated_at=NOW, started_at=NOW, finished_at=NOW, progress=None,
        attempts=[attempt],
    )  # fmt: skip


def test_safe_text_escapes_every_control_character() -> None:
    assert render.safe_text(EVIL) == SHOWN
    assert (
        render.safe_text("\u2066a\u2069 \u200f \u2028 \u061c")
        == r"\u2066a\u2069 \u200f \u2028 \u061c"
    )
    # Everything else is left as it is: accents, CJK, emoji with joiners, [brackets].
    kept = "café 灯台 👩\u200d🚀 [masterpiece:1.2] tab-free"
    assert render.safe_text(kept) == kept
    assert render.safe_text(SHOWN) == SHOWN  # escaping twice changes nothing


def printed(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out
    assert not UNSAFE.search(out), [c for c in out if UNSAFE.match(c)]
    return out


@pytest.mark.parametrize(
    "show",
    [
        lambda: render.nodes_table([evil_node()]),
        lambda: render.models_table(
            [Model("tiny" + EVIL, 2**30, "float16" + EVIL, ["n1" + EVIL], NOW)]
        ),
        lambda: render.jobs_table([evil_job()]),
        lambda: render.job_detail(evil_job()),
        lambda: render.health_table(
            [
                render.HealthRow("a:1", Health("a:1", "leader", 3, "r" + EVIL, EVIL, EVIL)),
                render.HealthRow("b:2", None, EVIL, reachable=False),
            ]
        ),
        lambda: print(render.drained_line(evil_node(), 30.0)),
    ],
    ids=["nodes", "models", "jobs", "job", "health", "drain"],
)
def test_tables_and_text_show_escapes_not_controls(
    show: object, capsys: pytest.CaptureFixture[str]
) -> None:
    show()  # type: ignore[operator]
    out = printed(capsys)
    assert r"\x1b[31m" in out
    # The newline shows as an escape: no line of its own starts with the fake row.
    assert not any(line.lstrip().startswith("FAKE ROW") for line in out.splitlines())


def test_every_field_of_sdctl_job_is_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    render.job_detail(evil_job())
    out = printed(capsys)
    lines = out.splitlines()
    # No fake line: every line is one of job_detail's own labels.
    assert all(re.match(r"^[A-Z][A-Za-z0-9 ]*:", line) for line in lines), lines
    for expected in ("a lighthouse" + SHOWN, "blurry" + SHOWN, "mallory" + SHOWN):
        assert expected in out


def test_json_output_escapes_controls_and_keeps_the_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    render.print_json(render.node_json(evil_node()))
    node_out = capsys.readouterr().out
    render.print_json_line(render.job_json(evil_job()))
    job_out = capsys.readouterr().out
    for out in (node_out, job_out):
        assert not UNSAFE.search(out)
        assert out.isascii()
    # Escaped on the way out, the text comes back exactly as it was.
    assert json.loads(node_out)["name"] == "node" + EVIL
    assert json.loads(job_out)["spec"]["prompt"] == "a lighthouse" + EVIL
    assert len(job_out.splitlines()) == 1
