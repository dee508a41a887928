"""Packaging: sdmesh built from this repository as a user gets it (a wheel,
not an editable install) and installed into fresh virtual environments, one
per extra, each running the commands that extra is for as real processes.

- the SDK alone (`pip install sdmesh`): every client, sdmesh and protos
  module imports, `sdctl --help` and the client commands work, importing the
  SDK loads no server library, and each server command (`up`, `scheduler`,
  `admin`) says in one line which extra to install;
- `sdmesh[scheduler]`: `sdctl admin` makes a key, `sdctl scheduler` serves
  (and takes that key), and `sdctl node` names the `node` extra;
- `sdmesh[node]` (CPU torch first, as the Makefile installs it): `sdctl node`
  joins a scheduler run from the scheduler's venv, and a job submitted from
  the SDK's venv comes back as a PNG.

The venvs are built once per session. They install through pip's own
configured indexes, so the package index must be reachable: when it is not,
these tests fail, saying so, rather than skip.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from client import Client
from client.cli.tied import spawn_tied
from harness.processes import START_TIMEOUT, Process, free_port, process_env
from harness.waiting import until

# Building the venvs (the node's holds torch) takes most of a minute; the
# first test to use each one pays for it within its own timeout.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
PIP_QUIET = ("--disable-pip-version-check", "-q")
PIP_INSTALL = ("-m", "pip", "install", *PIP_QUIET)
# One tested set of versions, as `make venv` installs them; a package an
# extra forgets is still missing, since constraints install nothing.
CONSTRAINTS = ("-c", str(REPO_ROOT / "constraints.txt"))
TORCH = "torch==2.13.0"  # the CPU build pip finds locally, installed first
INSTALL_TIMEOUT = 600.0
COMMAND_TIMEOUT = 120.0
JOB_TIMEOUT = 300.0
TINY_JOB = ("--width", "64", "--height", "64", "--steps", "4")
# Libraries only the servers need, which the SDK must never load.
SERVER_LIBRARIES = ("torch", "diffusers", "transformers", "sqlalchemy", "alembic", "PIL")

# What a fresh copy of the source tree leaves out: what builds, tests and
# editable installs leave behind, which a user's checkout has not.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".import_linter_cache",
    "outputs",
    ".sdmesh",
)

# Run inside a venv: imports every module of the packages named in argv[1]
# (comma-separated) but those under argv[2:] and __main__, and prints the
# failures.
_IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    skip = tuple(sys.argv[2:])
    failed = {}
    def note(name):
        failed[name] = repr(sys.exc_info()[1])
    for package in sys.argv[1].split(","):
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, package + ".", onerror=note):
            if info.name.endswith(".__main__"):  # runs sdctl
                continue
            if info.name in skip or info.name.startswith(tuple(s + "." for s in skip)):
                continue
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                failed[info.name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(failed))
    """
)

# Run inside a venv: imports the SDK as a user does, and prints where it was
# imported from and which server libraries came with it.
_IMPORT_SDK = textwrap.dedent(
    """
    import json, sys
    import client, client.cli.main, sdmesh
    from client import AsyncClient, Client
    heavy = {heavy!r}
    print(json.dumps({{
        "file": client.__file__,
        "loaded": sorted(name for name in heavy if name in sys.modules),
    }}))
    """
)


# ---- processes ------------------------------------------------------------


def describe(result: subprocess.CompletedProcess[str]) -> str:
    command = " ".join(str(part) for part in result.args)
    return (
        f"`{command}` exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def assert_no_traceback(output: str, what: str) -> None:
    assert "Traceback" not in output, f"{what} printed a traceback:\n{output}"


def run(
    command: Sequence[str | Path],
    env: dict[str, str],
    cwd: Path,
    *,
    timeout: float = COMMAND_TIMEOUT,
    check_output: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Runs a command to its end (killed after `timeout`), and checks that it
    printed no traceback (unless `check_output` is false: then the caller
    does)."""
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    if check_output:
        assert_no_traceback(result.stdout + result.stderr, describe(result))
    return result


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@contextmanager
def serving(name: str, command: Sequence[str | Path], env: dict[str, str], cwd: Path):
    """A server (`sdctl scheduler`, `sdctl node`) as a process tied to this
    one, so that it ends with the test run however that ends; stopped at
    the end of the block, and then its log checked for tracebacks."""
    log = cwd / f"{name}.log"
    with open(log, "ab") as handle:
        popen = spawn_tied(
            [str(part) for part in command],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
    process = Process(name, popen, log)
    try:
        yield process
    finally:
        code = process.stop()
    output = log.read_text(errors="replace")
    assert code in (0, -signal.SIGTERM), f"{name} exited with {code}:\n{output}"
    assert_no_traceback(output, name)


def while_running(*processes: Process):
    def check() -> None:
        for process in processes:
            if not process.alive:
                raise AssertionError(
                    f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}"
                )

    return check


def logs(*processes: Process) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.tail(80)}" for p in processes)


# ---- the venvs ------------------------------------------------------------


@dataclass(frozen=True)
class Venv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def sdctl(self, *args: str | Path) -> list[str | Path]:
        return [self.root / "bin" / "sdctl", *args]


def pip(
    doing: str, command: Sequence[str | Path], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Runs pip to do what `doing` says ("install X into a fresh venv"); a
    failure (most often: the package index is unreachable) fails the test,
    saying so, with pip's own words."""
    try:
        result = run(command, env, cwd, timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"pip did not {doing} within {INSTALL_TIMEOUT:g}s: is the package index "
            "reachable? These tests need it (CI has it).",
            pytrace=False,
        )
    if result.returncode != 0:
        pytest.fail(
            f"pip could not {doing}: is the package index reachable? "
            f"These tests need it (CI has it).\n{describe(result)}",
            pytrace=False,
        )
    return result


def make_venv(root: Path, env: dict[str, str], *steps: tuple[str, Sequence[str | Path]]) -> Venv:
    """A fresh venv at `root`, with each of `steps` (what, pip arguments)
    installed in turn."""
    created = run([sys.executable, "-m", "venv", root], env, root.parent)
    assert created.returncode == 0, describe(created)
    venv = Venv(root)
    for what, args in steps:
        pip(f"install {what} into a fresh venv", [venv.python, *PIP_INSTALL, *args], env, root)
    return venv


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of every process here: the harness's (one thread for
    the agent's torch), with nothing that would point a venv's Python at the
    source tree or at this session's venv, and a home of its own for the
    servers' default data dirs."""
    variables = process_env()
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        variables.pop(name, None)
    for name in ("SDMESH_API_KEY", "SDMESH_CA_CERT", "SDMESH_CLIENT_CERT", "SDMESH_CLIENT_KEY"):
        variables.pop(name, None)
    variables["SDMESH_HOME"] = str(tmp_path_factory.mktemp("sdmesh-home"))
    return variables


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """sdmesh's wheel, built once from a clean copy of the source tree (as
    `pip install .` builds it, without writing build/ into the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "sdmesh"
    shutil.copytree(REPO_ROOT, source, ignore=_NOT_SOURCE)
    out = root / "dist"
    pip(
        "build sdmesh's wheel (its build requirements come from the index)",
        [sys.executable, "-m", "pip", "wheel", *PIP_QUIET, "--no-deps", "-w", out, source],
        env,
        root,
    )
    [built] = out.glob("sdmesh-*.whl")
    return built


@pytest.fixture(scope="session")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the venvs go; removed at the end (the node's is over 1 GB)."""
    root = tmp_path_factory.mktemp("venvs")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sdk(venvs: Path, wheel: Path, env: dict[str, str]) -> Venv:
    return make_venv(venvs / "sdk", env, ("sdmesh", [*CONSTRAINTS, wheel]))


@pytest.fixture(scope="session")
def scheduler_venv(venvs: Path, wheel: Path, env: dict[str, str]) -> Venv:
    return make_venv(
        venvs / "scheduler", env, ("sdmesh[scheduler]", [*CONSTRAINTS, f"{wheel}[scheduler]"])
    )


@pytest.fixture(scope="session")
def node_venv(venvs: Path, wheel: Path, env: dict[str, str]) -> Venv:
    # --no-compile: byte-compiling torch's and diffusers' ~15,000 files
    # takes half a minute more than the one agent's imports ever need.
    return make_venv(
        venvs / "node",
        env,
        (TORCH, ["--no-compile", TORCH]),
        ("sdmesh[node]", ["--no-compile", *CONSTRAINTS, f"{wheel}[node]"]),
    )


def import_everything(venv: Venv, packages: str, cwd: Path, env: dict[str, str], *skip: str):
    result = run([venv.python, "-c", _IMPORT_ALL, packages, *skip], env, cwd)
    assert result.returncode == 0, describe(result)
    failed = json.loads(result.stdout)
    assert failed == {}, f"modules of {packages} that do not import in {venv.root.name}: {failed}"


def import_sdk(venv: Venv, cwd: Path, env: dict[str, str]) -> None:
    """Importing the SDK works from the venv's own copy and loads no server
    library, whatever else the venv holds."""
    script = _IMPORT_SDK.format(heavy=SERVER_LIBRARIES)
    result = run([venv.python, "-c", script], env, cwd)
    assert result.returncode == 0, describe(result)
    found = json.loads(result.stdout)
    assert Path(found["file"]).is_relative_to(venv.root), found["file"]  # not the source tree
    assert found["loaded"] == [], f"importing the SDK loaded {found['loaded']}"


def assert_names_extra(result: subprocess.CompletedProcess[str], extra: str) -> None:
    """The contract for a server command whose extra is not installed: one
    line on stderr, saying what to install, and exit code 1."""
    lines = stderr_lines(result)
    assert result.returncode == 1, describe(result)
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith("error: "), describe(result)
    assert f"pip install 'sdmesh[{extra}]'" in lines[0], describe(result)


def wait_for_leader(sdk: Venv, address: str, env: dict[str, str], cwd: Path, *servers: Process):
    """`sdctl health` from the SDK's venv, until it exits 0; returns the
    rows it printed."""
    command = sdk.sdctl("--scheduler", address, "health", "-o", "json")
    asked: list[subprocess.CompletedProcess[str]] = []

    def ask() -> subprocess.CompletedProcess[str]:
        # Unchecked here (`until` takes an error for "not yet"), checked below.
        asked.append(run(command, env, cwd, check_output=False))
        return asked[-1]

    health = until(
        ask,
        f"the scheduler at {address} to answer `sdctl health`",
        done=lambda result: result.returncode == 0 or "Traceback" in result.stderr + result.stdout,
        timeout=START_TIMEOUT,
        interval=0.5,
        while_alive=while_running(*servers),
    )
    for result in asked:
        assert_no_traceback(result.stdout + result.stderr, describe(result))
    assert health.returncode == 0, describe(health)
    rows = json.loads(health.stdout)
    assert [row["role"] for row in rows] == ["leader"], health.stdout
    return rows


# ---- the SDK alone ----------------------------------------------------------


def test_the_sdk_alone_runs_the_client(sdk: Venv, tmp_path: Path, env: dict[str, str]) -> None:
    import_sdk(sdk, tmp_path, env)
    # Every module the SDK's dependencies must cover; protos.codegen is a
    # developer's tool (`make protos`), with grpcio-tools from the dev extra.
    import_everything(sdk, "client,sdmesh,protos", tmp_path, env, "protos.codegen")

    helped = run(sdk.sdctl("--help"), env, tmp_path)
    assert helped.returncode == 0, describe(helped)
    assert helped.stdout.startswith("usage: sdctl"), helped.stdout
    for command in ("submit", "jobs", "health", "scheduler", "node", "up", "admin"):
        assert command in helped.stdout

    # Nobody listens there: exit 3, one line.
    nobody = f"127.0.0.1:{free_port()}"
    listed = run(sdk.sdctl("--scheduler", nobody, "jobs"), env, tmp_path)
    assert listed.returncode == 3, describe(listed)
    [line] = stderr_lines(listed)
    assert line.startswith("error: ") and nobody in line, describe(listed)
    assert listed.stdout == ""


# ---- sdmesh[scheduler] ------------------------------------------------------


def test_the_scheduler_extra_makes_keys_and_serves(
    scheduler_venv: Venv, sdk: Venv, tmp_path: Path, env: dict[str, str]
) -> None:
    import_sdk(scheduler_venv, tmp_path, env)
    # The migrations' env.py runs only under alembic.
    import_everything(scheduler_venv, "scheduler", tmp_path, env, "scheduler.store.migrations")

    data_dir = tmp_path / "scheduler"
    made = run(
        scheduler_venv.sdctl(
            "admin", "--data-dir", data_dir, "create-key", "--user", "admin", "--admin"
        ),
        env,
        tmp_path,
    )
    assert made.returncode == 0, describe(made)
    [key] = made.stdout.split()  # stdout holds the key alone
    assert len(key) > 20, made.stdout

    port = free_port()
    address = f"127.0.0.1:{port}"
    command = scheduler_venv.sdctl("scheduler", "--data-dir", data_dir, "--port", str(port))
    with serving("scheduler", command, env, tmp_path) as scheduler:
        rows = wait_for_leader(sdk, address, env, tmp_path, scheduler)
        assert rows[0]["address"] == address

        # It checks keys: none is refused, the one `sdctl admin` made is taken.
        refused = run(sdk.sdctl("--scheduler", address, "jobs"), env, tmp_path)
        assert refused.returncode == 4, describe(refused)
        keyed = run(
            sdk.sdctl("--scheduler", address, "jobs", "-o", "json"),
            env | {"SDMESH_API_KEY": key},
            tmp_path,
        )
        assert keyed.returncode == 0, describe(keyed)
        assert json.loads(keyed.stdout) == []


# ---- sdmesh[node] -------------------------------------------------------------


def test_the_node_extra_runs_a_job_from_the_sdk(
    node_venv: Venv, scheduler_venv: Venv, sdk: Venv, tmp_path: Path, env: dict[str, str]
) -> None:
    import_sdk(node_venv, tmp_path, env)
    import_everything(node_venv, "gpu_node", tmp_path, env)

    port = free_port()
    address = f"127.0.0.1:{port}"
    scheduler_command = scheduler_venv.sdctl(
        "scheduler", "--no-auth", "--port", str(port), "--data-dir", tmp_path / "scheduler"
    )
    node_command = node_venv.sdctl(
        "node", "--scheduler", address, "--data-dir", tmp_path / "node", "--name", "packaged"
    )
    with (
        serving("scheduler", scheduler_command, env, tmp_path) as scheduler,
        serving("node", node_command, env, tmp_path) as node,
    ):
        wait_for_leader(sdk, address, env, tmp_path, scheduler)
        with Client(address, timeout=5.0) as client:
            until(
                lambda: any(n.connected and n.name == "packaged" for n in client.list_nodes()),
                "the node from the node's venv to join",
                timeout=START_TIMEOUT,
                interval=0.5,
                while_alive=while_running(scheduler, node),
            )

        out = tmp_path / "outputs"
        submitted = run(
            sdk.sdctl(
                "--scheduler", address, "submit", "a lighthouse", *TINY_JOB, "--output-dir", out
            ),
            env,
            tmp_path,
            timeout=JOB_TIMEOUT,
        )
        assert submitted.returncode == 0, f"{describe(submitted)}\n{logs(scheduler, node)}"
        [png] = out.glob("*.png")
        with Image.open(png) as picture:
            assert picture.format == "PNG"
            assert picture.size == (64, 64)


# ---- a server command without its extra -------------------------------------
# Last in this module: `pytest -x` runs everything above first.


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        pytest.param(["up"], "scheduler,node", id="up"),
        pytest.param(["scheduler"], "scheduler", id="scheduler"),
        pytest.param(["admin", "list-keys"], "scheduler", id="admin"),
    ],
)
def test_the_sdk_alone_names_the_extra_a_server_needs(
    sdk: Venv, tmp_path: Path, env: dict[str, str], command: list[str], extra: str
) -> None:
    if command[0] in ("up", "scheduler"):  # should it start after all: not on 50051
        command = [*command, "--port", str(free_port()), "--data-dir", str(tmp_path / "data")]
    assert_names_extra(run(sdk.sdctl(*command), env, tmp_path), extra)


def test_the_scheduler_extra_names_the_node_extra(
    scheduler_venv: Venv, tmp_path: Path, env: dict[str, str]
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    command = scheduler_venv.sdctl("node", "--scheduler", nobody, "--data-dir", tmp_path / "node")
    assert_names_extra(run(command, env, tmp_path), "node")
