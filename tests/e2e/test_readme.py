"""The README is a promise: every command in it runs as written. These tests
walk its shell blocks, in order, against real processes, and fail on any
command that exits non-zero, prints a traceback, or does not print what the
README says it prints. A README edit that breaks a command breaks CI.

How the walk works (the decisions, in one place):

- **What is walked.** The ```sh blocks of the sections in WALKS, in README
  order, parsed by `harness.readme`: backslash continuations joined,
  comments (`#` at the start of a word, outside quotes) cut off. Every other
  section with shell lines must be in NOT_WALKED with its reason, and the
  lines that cannot run inside the suite are in SKIPPED with theirs;
  `test_every_shell_line_is_walked_or_excused` fails on a block that is
  neither, so a new README section cannot slip past the walk.
- **Walks.** Each walk is one test with a world of its own: a copy of the
  source tree in tmp (less .git, caches and build outputs; `.venv` a
  symlink to the dev venv), which is the one working directory of every
  line, as the README has the reader in the repo root (`make demo` writes
  outputs/ and .sdmesh/ there, not in the checkout); HOME in tmp, SDMESH_*
  and XDG_* unset, so nothing of the user's is read or touched; and, for
  the walks that need it, one throwaway PostgreSQL database
  (tests/databases.py: with SDMESH_REQUIRE_POSTGRES=1 an unreachable server
  fails them). "Using it" and the job kinds share a world, as do "Several
  machines" and "Failover" (the failover section continues that cluster:
  the same database, the node enrolled there); "A hardened cluster" starts
  from nothing, as its text does. The sections of a walk run in README
  order, and the walks too (try-it, using-it, several-machines, hardened).
- **PATH.** Where the README has the reader in a fresh clone ("Try it",
  "Using it"), the walk starts with no sdctl on PATH (any folder holding one
  is dropped, in case the suite runs in an activated venv): the README's own
  `source .venv/bin/activate` line must put it there, so losing that line
  fails the walk with "sdctl: command not found". The later sections are
  on hosts where sdmesh is installed: those walks start with the venv's bin
  on PATH.
- **Running a line.** Each line runs with `bash -c` in the working
  directory. What it exports (`export DB=...`, `source .venv/bin/activate`)
  carries to the next line: the walk keeps bash's environment after each.
  stdout is a pipe (so `-o json` prints one line), stderr apart; each line
  has LINE_TIMEOUT seconds (then its process group is killed), stdin is
  /dev/null, and it must exit 0 (no walked line is announced to fail).
  Neither stream may hold a Python traceback or a line of gRPC's own C-core
  log (`I1206 ... ssl_transport_security.cc:...]`).
- **Servers.** `sdctl up`, `sdctl scheduler` and `sdctl node` run in the
  foreground for a user; here each starts in the background, tied to the
  test (harness `spawn_tied` and a parent-death signal, so that a killed
  test run leaves no server behind), with its output in a log. The next
  line waits until the server says it is ready in its own words: `sdctl up`
  "sdmesh is up" (which it prints once `sdctl nodes` would list its agent
  connected), a scheduler "listening on" (after which it answers health),
  an agent "connected to scheduler" (after the scheduler's welcome, when
  `sdctl nodes` lists it connected). A server that exits before the end of
  its section fails the walk with its log. At the end of the section that
  started it, it is stopped as a user stops it, `sdctl up` with Ctrl-C's
  SIGINT and the others with SIGTERM, agents first, and must exit 0 with
  a clean log; `sdctl up` must leave its port free.
- **Substitutions.** Only what cannot be literal on a test machine, in
  SUBSTITUTIONS (text) and ENVIRONMENT (variables) below: host names to
  loopback, ports to free ones, absolute paths to tmp, the PostgreSQL URL to
  a throwaway database, and the README's placeholders (JOB, NODE, sdj_...,
  sdk_...) to the values the walk has seen; `make` never rebuilds the
  shared dev venv. photo.png, mask.png and edges.png are real files the
  walk writes into the working directory first, as the README asks of the
  reader. Where the README has the reader copy certificates to the hosts
  that use them, the walk copies the *.pem files of each `sdctl admin
  certs --out DIR` (all but ca-key.pem) into the working directory, the
  one "host" here.
- **What is checked beyond the exit code.** CHECKS: what the README says a
  line prints, where that is cheap (the one-line `--no-wait -o json`, the
  images a submit saves with their sizes and seeds, keys and tokens on
  stdout alone, the health table's roles).
- **Skipped.** SKIPPED: `make test` (it is this very suite).
- **Time.** 3 to 4.5 minutes on 2 CPU cores, nearly all of it the jobs at
  the README's own sizes on the CPU (a hires fix to 1024 px, six images
  of n_iter, a ControlNet job) and `make demo`'s three jobs; every walk
  prints its lines' times (pytest -s).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from client.cli.tied import spawn_tied
from harness.processes import free_port
from harness.readme import Section, ShellLine, section, sections
from tests.databases import postgres_database

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

LINE_TIMEOUT = 300.0  # seconds for one foreground line
READY_TIMEOUT = 300.0  # for a server to say it is ready (the agent builds tiny first)
STOP_TIMEOUT = 90.0  # for a server to stop (an agent hands its work back)


@dataclass(frozen=True)
class Walk:
    """README sections walked in order in one world; `sdctl_on_path`: the
    walk starts with the venv's bin on PATH, as on a host where sdmesh is
    installed (where the README has the reader activate the venv itself,
    it starts without, and the README's own line must put it there)."""

    id: str
    sections: tuple[str, ...]
    postgres: bool = False
    sdctl_on_path: bool = True


WALKS = (
    Walk("try-it", ("Try it on any machine (no GPU needed)",), sdctl_on_path=False),
    Walk(
        "using-it",
        ("Using it", "img2img, inpainting, hires fix, LoRA and ControlNet"),
        sdctl_on_path=False,
    ),
    Walk("several-machines", ("Several machines", "Failover: scheduler replicas"), postgres=True),
    Walk("hardened", ("A hardened cluster, step by step",), postgres=True),
)

# Sections with shell lines that are not walked, and why.
NOT_WALKED = {
    "Development": "developer commands: CI runs `make lint` and `make test` itself (.ci/run); "
    "`make bench` takes many minutes; `make protos` and `make format` rewrite the checkout",
}

# Lines of walked sections that cannot run inside the suite, and why.
SKIPPED = {
    "make test": "it is this very suite: it would run the walk inside itself",
}


# ---- the world a walk runs in ------------------------------------------------


@dataclass
class Server:
    kind: str  # up, scheduler or node
    line: ShellLine
    command: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None  # the port it listens on (up and scheduler)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def describe(self) -> str:
        return f"README line {self.line.number} ({self.line.text})\n  ran as: {self.command}"


@dataclass
class Ran:
    line: ShellLine
    command: str  # after substitution
    code: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (
            f"README line {self.line.number} ({self.line.text})\n  ran as: {self.command}\n"
            f"  exit {self.code} after {self.seconds:.1f}s\n--- stdout ---\n{self.stdout}"
            f"--- stderr ---\n{self.stderr}"
        )


@dataclass
class World:
    root: Path
    cwd: Path  # the copy of the checkout every line runs in
    home: Path
    fs: Path  # stands for / in the README's absolute paths
    env: dict[str, str]
    port: int  # the first scheduler replica (50051 in the README)
    port2: int  # a second replica
    db: str = ""
    servers: list[Server] = field(default_factory=list)
    job: str = ""  # the job id of the last submit
    secrets: dict[str, str] = field(default_factory=dict)  # "sdk"/"sdj" -> the last one printed
    timings: list[tuple[float, str]] = field(default_factory=list)

    def known(self, what: str, value: str) -> str:
        if not value:
            raise AssertionError(f"the README uses {what} before any line printed one")
        return value

    def node(self, key: str) -> str:
        """A connected node's name or id, as `sdctl nodes -o json` lists it."""
        listed = subprocess.run(
            ["bash", "-c", "sdctl nodes -o json"],
            cwd=self.cwd,
            env=self.env | {"PATH": f"{self.cwd / '.venv' / 'bin'}:{self.env['PATH']}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, f"sdctl nodes, to fill in NODE: {listed.stderr}"
        connected = [n for n in json.loads(listed.stdout) if n["connected"]]
        assert connected, f"NODE: no connected node in {listed.stdout}"
        return str(connected[0][key])


# ---- what cannot be literal on a test machine ------------------------------


@dataclass(frozen=True)
class Substitution:
    pattern: str
    value: Callable[[World, re.Match[str]], str]
    why: str


FIRST_REPLICA = r"(?:localhost|scheduler-host|sched\.example\.com|host1|a|10\.0\.0\.5)"
SECOND_REPLICA = r"(?:host2|b)"
HOST_START = r"(?<![\w.-])"  # a host name starts a word: not inside a path or another name

# Applied in this order to each line (after the comment is cut off).
SUBSTITUTIONS = (
    Substitution(
        r"postgresql\+psycopg://sdmesh:secret@db-host/sdmesh",
        lambda w, m: w.known("a database", w.db),
        "the job store: a throwaway database on the local PostgreSQL server",
    ),
    Substitution(
        HOST_START + FIRST_REPLICA + r":50051\b",
        lambda w, m: f"127.0.0.1:{w.port}",
        "the scheduler (or the first replica): a free port on loopback",
    ),
    Substitution(
        HOST_START + SECOND_REPLICA + r":50051\b",
        lambda w, m: f"127.0.0.1:{w.port2}",
        "a second replica: another free port on loopback (nothing listens there in 'Using it')",
    ),
    Substitution(
        r"(?<=--hosts )\S+",
        lambda w, m: "127.0.0.1",
        "the names the scheduler's certificate covers: all of them are loopback here "
        "(and it always covers 127.0.0.1)",
    ),
    Substitution(
        r"(?<=--port )50051\b",
        lambda w, m: str(w.port),
        "the scheduler's port",
    ),
    Substitution(
        r"(?<![\w./~-])(?:/etc/sdmesh|/var/lib/sdmesh[\w-]*|/models|/shared/sdmesh-images)"
        r"(?![\w.-])",
        lambda w, m: f"{w.fs}{m.group(0)}",
        "absolute paths: the same paths under a folder in tmp",
    ),
    Substitution(
        r"\bJOB\b",
        lambda w, m: w.known("JOB", w.job),
        "the job id of the last submit",
    ),
    Substitution(r"\bNODE_ID\b", lambda w, m: w.node("id"), "the connected node's id"),
    Substitution(r"\bNODE\b", lambda w, m: w.node("name"), "the connected node's name"),
    Substitution(
        r"\bsdj_\.\.\.",
        lambda w, m: w.known("a join token", w.secrets.get("sdj", "")),
        "the join token the last `sdctl admin join-token` printed",
    ),
    Substitution(
        r"\bsdk_\.\.\.",
        lambda w, m: w.known("an API key", w.secrets.get("sdk", "")),
        "the API key the last `sdctl admin create-key` printed",
    ),
    Substitution(
        r"\bKEY_ID\b",
        lambda w, m: w.known("an API key", w.secrets.get("sdk", "")).split("_")[1],
        "the id of that key",
    ),
    Substitution(
        r"^make (?=\w)",
        lambda w, m: "make -o .venv/.installed ",
        "the dev venv as it is, never rebuilt: the walk must not pip-install into a venv "
        "others use (and cannot download); building it is `make test`'s, in CI",
    ),
    Substitution(
        r"^(?=.*\bsdctl (?:up|scheduler)\b)(?!.*--port\b).*$",
        lambda w, m: f"{m.group(0)} --port {listen_port(w, m.group(0))}",
        "a server without --port would take 50051: it gets its free port, the one its "
        "--advertise names (a second replica's), else the first",
    ),
)

# The environment of every line, over the test's own (less SDMESH_* and XDG_*).
ENVIRONMENT: dict[str, Callable[[World], str]] = {
    # The default scheduler address, localhost:50051, is the first replica's port here.
    "SDMESH_SCHEDULER": lambda w: f"127.0.0.1:{w.port}",
    # ~/.local/share/sdmesh/... and every other file under HOME land in tmp.
    "HOME": lambda w: str(w.home),
    "PYTHONUNBUFFERED": lambda w: "1",  # servers' logs as they happen
}


def listen_port(world: World, line: str) -> int:
    advertised = re.search(r"--advertise 127\.0\.0\.1:(\d+)", line)
    return int(advertised.group(1)) if advertised else world.port


def substitute(world: World, text: str) -> str:
    for substitution in SUBSTITUTIONS:
        text = re.sub(substitution.pattern, partial(substitution.value, world), text)
    return text


# ---- what the README says lines print ------------------------------------


@dataclass(frozen=True)
class Check:
    pattern: str  # on the README's line, as written
    check: Callable[[World, Ran], None]
    says: str


def one_line_queued(world: World, ran: Ran) -> None:
    lines = ran.stdout.splitlines()
    assert len(lines) == 1, f"one line of JSON when piped, got:\n{ran.stdout}"
    created = json.loads(lines[0])
    assert set(created) == {"job_id", "state"}, created
    assert created["state"] == "QUEUED", created


def flag(words: list[str], name: str, default: str) -> str:
    return words[words.index(name) + 1] if name in words else default


def images_saved(world: World, ran: Ran) -> None:
    """A submit that waits prints the path of each PNG it saved under
    outputs/<job>-<i>.png: batch size x n_iter of them, at the job's final
    size, with consecutive seeds (from --seed, if given) in their infotext."""
    words = shlex.split(ran.command)
    count = int(flag(words, "--batch-size", "1")) * int(flag(words, "--n-iter", "1"))
    scale = float(flag(words, "--hires-scale", "1"))
    size = tuple(
        round(int(flag(words, f"--{side}", "512")) * scale) for side in ("width", "height")
    )
    paths = [Path(line) for line in ran.stdout.splitlines()]
    assert len(paths) == count, f"{count} image paths on stdout, got:\n{ran.stdout}"
    seeds = []
    for index, path in enumerate(paths):
        assert path.parent.name == "outputs" and path.name == f"{world.job}-{index}.png", path
        with Image.open(world.cwd / path) as picture:
            assert picture.size == size, f"{path}: {picture.size}, not {size}"
            seed = re.search(r"\bSeed: (\d+)", str(picture.info.get("parameters", "")))
            assert seed, f"{path}: no seed in its infotext"
            seeds.append(int(seed.group(1)))
    first = int(flag(words, "--seed", str(seeds[0])))
    assert seeds == list(range(first, first + count)), seeds


def images_downloaded(world: World, ran: Ran) -> None:
    paths = ran.stdout.splitlines()
    assert paths, "no image paths"
    for path in paths:
        assert (world.cwd / path).is_file(), path


def health_table(world: World, ran: Ran) -> None:
    """A table with a row per --scheduler address; one of them leads (exit 0)."""
    header, *rows = [line.split() for line in ran.stdout.splitlines() if line.strip("─ ")]
    assert header[:5] == ["ADDRESS", "ROLE", "EPOCH", "REPLICA", "LEADER"], ran.stdout
    roles = [row[1] for row in rows]
    assert roles.count("leader") == 1, ran.stdout


def leader_and_standby(world: World, ran: Ran) -> None:
    _, *rows = [line.split() for line in ran.stdout.splitlines() if line.strip("─ ")]
    assert sorted(row[1] for row in rows) == ["leader", "standby"], ran.stdout


def printed_once(prefix: str) -> Callable[[World, Ran], None]:
    def check(world: World, ran: Ran) -> None:
        assert re.fullmatch(rf"{prefix}_\S+\n", ran.stdout), f"one {prefix}_ line:\n{ran.stdout}"

    return check


def demo_saved_pngs(world: World, ran: Ran) -> None:
    pngs = sorted((world.cwd / "outputs").glob("*.png"))
    assert len(pngs) >= 3, f"three jobs' PNGs in outputs/, found {pngs}"


def up_says_where(world: World, ran: Ran) -> None:
    data = world.home / ".local" / "share" / "sdmesh" / "up"
    said = f"sdmesh is up: scheduler at 127.0.0.1:{world.port}, data in {data}"
    assert said in ran.stdout, f"expected {said!r} in:\n{ran.stdout}"


def drained(world: World, ran: Ran) -> None:
    assert "draining: takes no new work" in ran.stdout, ran.stdout


def undrained(world: World, ran: Ran) -> None:
    assert "takes work again" in ran.stdout, ran.stdout


CHECKS = (
    Check(r"^make demo$", demo_saved_pngs, "saves PNGs in outputs/"),
    Check(r"^\.venv/bin/sdctl up$", up_says_where, "scheduler on 127.0.0.1:50051, data in ~/..."),
    Check(r"^sdctl submit .*--no-wait -o json$", one_line_queued, '{"job_id": ..., "QUEUED"}'),
    Check(r"^sdctl submit (?!.*--no-wait)(?!.*-o json)", images_saved, "outputs/<job>-0.png"),
    Check(r"^sdctl images JOB", images_downloaded, "the job's PNGs"),
    Check(r"^sdctl drain NODE", drained, "no new work"),
    Check(r"^sdctl undrain NODE", undrained, "take work again"),
    Check(r"\bhealth$", health_table, "each replica's role; exit 3 if none leads"),
    Check(r"a:50051,b:50051 .*health$", leader_and_standby, "one leader, one standby"),
    Check(
        r"^sdctl admin .*\bcreate-key\b", printed_once("sdk"), "keys are printed once, on stdout"
    ),
    Check(r"^sdctl admin .*\bjoin-token\b", printed_once("sdj"), "the token, on stdout"),
)

TRACEBACK = "Traceback (most recent call last)"
# gRPC C-core's own log lines, e.g. "I1206 05:01:02.123456  4242 ssl_transport_security.cc:1659] ..."
GRPC_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ +\S+:\d+\]", re.MULTILINE)


def assert_clean(text: str, what: str) -> None:
    assert TRACEBACK not in text, f"a traceback from {what}"
    found = GRPC_LOG.search(text)
    assert found is None, f"gRPC's own log line from {what}: {found.group(0) if found else ''}"


# ---- running lines ----------------------------------------------------------

SERVERS = {"up": "sdmesh is up", "scheduler": "listening on", "node": "connected to scheduler"}
# sdctl's global flags that take a value, to find the command after them.
GLOBAL_VALUE_FLAGS = {
    "--scheduler",
    "--api-key",
    "--ca-cert",
    "--client-cert",
    "--client-key",
    "--user",
    "--reconnect-timeout",
    "-o",
    "--output",
}


def server_kind(command: str) -> str | None:
    """`up`, `scheduler` or `node` for an sdctl server line, else None."""
    words = shlex.split(command)
    while words and re.match(r"^\w+=", words[0]):
        words = words[1:]
    if not words or Path(words[0]).name != "sdctl":
        return None
    index = 1
    while index < len(words) and words[index].startswith("-"):
        index += 2 if words[index] in GLOBAL_VALUE_FLAGS else 1
    return words[index] if index < len(words) and words[index] in SERVERS else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the test process dies, for the
    servers that do not watch spawn_tied's pipe themselves (`sdctl up`;
    its own children then stop with it)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for entry in path.read_bytes().split(b"\0"):
        name, sep, value = entry.decode(errors="surrogateescape").partition("=")
        if sep and name not in ("_", "SHLVL", "PWD", "OLDPWD", "WALK_ENV_FILE"):
            env[name] = value
    return env


def run_line(world: World, line: ShellLine, command: str) -> Ran:
    """Runs a foreground line to its end, in a process group of its own so
    that a line past its timeout goes with everything it started."""
    env_file = world.root / "env.bin"
    script = f'{command}\n__walk_rc=$?\nenv -0 > "$WALK_ENV_FILE"\nexit $__walk_rc\n'
    started = time.monotonic()
    with subprocess.Popen(
        ["bash", "-c", script],
        cwd=world.cwd,
        env=world.env | {"WALK_ENV_FILE": str(env_file)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=LINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(
                f"README line {line.number} ({line.text}) ran past {LINE_TIMEOUT:g}s as: "
                f"{command}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
                f"{servers_logs(world)}"
            ) from None
    ran = Ran(line, command, popen.returncode, stdout, stderr, time.monotonic() - started)
    if env_file.exists():
        world.env = read_env(env_file)
        env_file.unlink()
    return ran


def start_server(world: World, line: ShellLine, command: str, kind: str) -> Ran:
    log = world.root / f"server-{len(world.servers)}-{kind}.log"
    started = time.monotonic()
    with open(log, "wb") as handle:
        popen = spawn_tied(
            ["bash", "-c", f"exec {command}"],
            cwd=world.cwd,
            env=world.env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    port = re.search(r"--port (\d+)", command)
    server = Server(kind, line, command, popen, log, int(port.group(1)) if port else None)
    world.servers.append(server)
    deadline = time.monotonic() + READY_TIMEOUT
    while SERVERS[kind] not in server.text():
        if popen.poll() is not None:
            raise AssertionError(
                f"{server.describe()}\nexited with {popen.returncode} before it was ready:\n"
                f"{server.tail()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{server.describe()}\nnot ready ({SERVERS[kind]!r}) after {READY_TIMEOUT:g}s:\n"
                f"{server.tail()}"
            )
        time.sleep(0.2)
    return Ran(line, command, 0, server.text(), "", time.monotonic() - started)


def servers_logs(world: World) -> str:
    return "\n".join(
        f"--- {s.kind}: {s.command} ---\n{s.tail()}" for s in world.servers if s.log.exists()
    )


def check_servers_alive(world: World, after: ShellLine) -> None:
    for server in world.servers:
        if server.popen.poll() is not None:
            raise AssertionError(
                f"{server.describe()}\nexited with {server.popen.returncode} during README "
                f"line {after.number} ({after.text}):\n{server.tail()}"
            )


def stop_servers(world: World) -> None:
    """As a user stops them: Ctrl-C for `sdctl up`, SIGTERM for the others,
    agents first; each must exit 0 with a clean log."""
    problems = []
    order = sorted(world.servers, key=lambda s: s.kind != "node")  # agents first, else in order
    for server in order:
        wrong = stop_server(server)
        if wrong:
            problems.append(f"{server.describe()}\n{'; '.join(wrong)}:\n{server.tail()}")
    world.servers.clear()
    assert not problems, "\n\n".join(problems)


def stop_server(server: Server) -> list[str]:
    """Stops one server; what went wrong, if anything."""
    popen = server.popen
    if popen.poll() is None:
        popen.send_signal(signal.SIGINT if server.kind == "up" else signal.SIGTERM)
    try:
        popen.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
        return [f"did not stop within {STOP_TIMEOUT:g}s"]
    wrong = [] if popen.returncode == 0 else [f"exited with {popen.returncode}"]
    try:
        assert_clean(server.text(), "its log")
    except AssertionError as exc:
        wrong.append(str(exc))
    if server.kind == "up" and server.port is not None:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", server.port))
            except OSError as exc:
                wrong.append(f"left its port {server.port} taken: {exc}")
    return wrong


def harvest(world: World, ran: Ran) -> None:
    """What later lines refer to: the job id of a submit, the keys and join
    tokens printed, and the certificates a reader copies where they are used."""
    words = shlex.split(ran.command)
    if "submit" in words:
        try:
            world.job = str(json.loads(ran.stdout)["job_id"])
        except (ValueError, KeyError, TypeError):
            said = re.search(r"^(\w+) QUEUED$", ran.stderr, re.MULTILINE)
            assert said, f"no job id in the submit's output:\n{ran.describe()}"
            world.job = said.group(1)
    for found in re.finditer(r"\b(sdk|sdj)_[\w-]+", ran.stdout):
        world.secrets[found.group(1)] = found.group(0)
    if server_kind(ran.command) is None and "admin" in words and "certs" in words:
        # "Keep ca-key.pem offline; the other files go where they are used":
        # on this one host, the working directory of every line.
        out = Path(flag(words, "--out", ""))
        for pem in out.glob("*.pem"):
            if pem.name != "ca-key.pem":
                shutil.copy(pem, world.cwd / pem.name)


def walk_section(world: World, titled: Section) -> None:
    for line in titled.lines:
        if line.text not in SKIPPED:
            walk_line(world, line)


def walk_line(world: World, line: ShellLine) -> None:
    """Runs one line (starts it, for a server) and checks what it did."""
    command = substitute(world, line.text)
    kind = server_kind(command)
    if kind is not None:
        ran = start_server(world, line, command, kind)
    else:
        ran = run_line(world, line, command)
    world.timings.append((ran.seconds, f"{line.number}: {line.text}"))
    context = f"{ran.describe()}\n{servers_logs(world)}"
    assert ran.code == 0, f"exit {ran.code}:\n{context}"
    assert_clean(ran.stdout + ran.stderr, f"README line {line.number}\n{context}")
    if kind is None:
        harvest(world, ran)
    for check in CHECKS:
        if re.search(check.pattern, line.text):
            try:
                check.check(world, ran)
            except AssertionError as exc:
                raise AssertionError(
                    f"README line {line.number} should print {check.says}: {exc}\n{context}"
                ) from None
    check_servers_alive(world, line)


# ---- the world's files --------------------------------------------------------

COPY_IGNORES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.egg-info",
    ".*_cache",
    "outputs",
    ".sdmesh",
    "build",
    "dist",
)


def write_pictures(folder: Path) -> None:
    """photo.png (64x64 RGB), mask.png (the same size, a white square to
    repaint) and edges.png (white lines on black, as a canny map)."""
    photo = Image.new("RGB", (64, 64))
    photo.putdata([(x * 4, y * 4, (x + y) * 2) for y in range(64) for x in range(64)])
    photo.save(folder / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    mask.save(folder / "mask.png")
    edges = Image.new("L", (64, 64), 0)
    draw = ImageDraw.Draw(edges)
    draw.rectangle((12, 20, 52, 60), outline=255)
    draw.line((12, 20, 32, 4, 52, 20), fill=255)
    edges.save(folder / "edges.png")


def base_path(walk: Walk, cwd: Path) -> str:
    """PATH without any folder that holds an sdctl (the test may run in an
    activated venv), plus the venv's bin where the walk starts with it."""
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    kept = [d for d in kept if not (Path(d) / "sdctl").exists()]
    if walk.sdctl_on_path:
        kept.insert(0, str(cwd / ".venv" / "bin"))
    return os.pathsep.join(kept)


@contextmanager
def world_for(walk: Walk, tmp_path: Path) -> Iterator[World]:
    cwd = tmp_path / "sdmesh"
    shutil.copytree(ROOT, cwd, ignore=COPY_IGNORES, symlinks=True)
    (cwd / ".venv").symlink_to(ROOT / ".venv")
    write_pictures(cwd)
    fs = tmp_path / "fs"
    for folder in ("models", "shared/sdmesh-images"):  # a models folder, a network share
        (fs / folder).mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SDMESH_", "XDG_")) and name not in ("VIRTUAL_ENV", "PS1")
    }
    env["PATH"] = base_path(walk, cwd)
    world = World(tmp_path, cwd, home, fs, env, port=free_port(), port2=free_port())
    world.env |= {name: value(world) for name, value in ENVIRONMENT.items()}
    with ExitStack() as stack:
        if walk.postgres:
            world.db = stack.enter_context(postgres_database())
        try:
            yield world
        finally:
            if world.servers:  # a failed walk: stop what runs, whatever it says
                for server in world.servers:
                    if server.popen.poll() is None:
                        server.popen.kill()
                    server.popen.wait()


# ---- the tests ----------------------------------------------------------------


def readme_sections() -> list[Section]:
    return sections(README.read_text())


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "walk",
    [
        pytest.param(walk, id=walk.id, marks=[pytest.mark.postgres] if walk.postgres else [])
        for walk in WALKS
    ],
)
def test_walk_the_readme(walk: Walk, tmp_path: Path) -> None:
    """Every shell line of the walk's sections, in order, as written but for
    the substitutions; see the module's docstring."""
    found = readme_sections()
    started = time.monotonic()
    with world_for(walk, tmp_path) as world:
        for title in walk.sections:
            walk_section(world, section(found, title))
            stop_servers(world)
    timings = "\n".join(f"{seconds:6.1f}s  {what}" for seconds, what in world.timings)
    print(f"walk {walk.id}: {time.monotonic() - started:.1f}s\n{timings}")


def test_every_shell_line_is_walked_or_excused() -> None:
    """A README section with shell lines is walked or says why not; every
    walked section has lines; SKIPPED and CHECKS name lines that exist."""
    found = readme_sections()
    walked = {title for walk in WALKS for title in walk.sections}
    with_lines = {s.title for s in found if s.lines}
    assert with_lines - walked - set(NOT_WALKED) == set(), "shell lines nobody walks"
    assert set(NOT_WALKED) <= with_lines, "NOT_WALKED names a section without shell lines"
    lines = [line.text for title in walked for line in section(found, title).lines]
    for title in walked:
        assert section(found, title).lines, f"{title!r} has no shell lines"
    assert set(SKIPPED) <= set(lines), "SKIPPED names a line the walked sections lack"
    for check in CHECKS:
        assert any(re.search(check.pattern, line) for line in lines), f"unused: {check.pattern}"
