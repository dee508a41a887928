"""The mistakes a newcomer is likely to make, each made for real against
real processes: each gets one line on stderr that says what is wrong and
what to do, the exit code the README gives, and never a traceback. The
last test sweeps every subcommand with bad values."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli.tied import spawn_tied
from harness.processes import LocalCluster, free_port, process_env, sdctl_command
from harness.waiting import until
from sdmesh.tls import make_cluster_certs
from tests.databases import postgres_database

pytestmark = pytest.mark.e2e


def sdctl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        sdctl_command(*args),
        capture_output=True,
        text=True,
        env=env or process_env(),
        timeout=timeout,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error line; it must be the only thing on stderr."""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: "), line
    return line


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error line of a server, after its log."""
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    return line


# ---- 1. the database ----------------------------------------------------------


@pytest.mark.postgres
def test_a_scheduler_on_a_database_that_is_not_there_says_how_to_make_it(tmp_path: Path) -> None:
    with postgres_database() as url:
        missing = url.rsplit("/", 1)[0] + "/sdmesh_no_such_database"
    missing = missing.replace("postgresql+psycopg://", "postgres://")  # as hosts write it
    result = sdctl("scheduler", "--data-dir", str(tmp_path), "--db", missing)
    assert result.returncode == 3
    assert last_line(result) == (
        "error: PostgreSQL at 127.0.0.1:5432 has no database 'sdmesh_no_such_database': "
        "create it (createdb -h 127.0.0.1 -p 5432 -U postgres sdmesh_no_such_database) "
        "or fix --db"
    )


def test_a_scheduler_on_a_database_server_that_is_down(tmp_path: Path) -> None:
    port = free_port()
    result = sdctl(
        "scheduler", "--data-dir", str(tmp_path), "--db", f"postgresql://u@127.0.0.1:{port}/x"
    )
    assert result.returncode == 3
    assert last_line(result) == (
        f"error: PostgreSQL at 127.0.0.1:{port} refused the connection: "
        "is PostgreSQL running there? check --db"
    )


def test_admin_on_a_fresh_host_as_the_readme_s_second_step(tmp_path: Path) -> None:
    data_dir = tmp_path / "var" / "lib" / "sdmesh"  # nothing there yet
    made = sdctl("admin", "--data-dir", str(data_dir), "create-key", "--user", "admin", "--admin")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("sdk_")
    typo = sdctl("admin", "--data-dir", str(tmp_path / "var" / "lib" / "sdmsh"), "list-keys")
    assert typo.returncode == 2
    assert "no scheduler database there" in one_line(typo)


# ---- 4. addresses ----------------------------------------------------------


def test_a_name_that_does_not_resolve_fails_at_once_with_a_hint() -> None:
    # .invalid never resolves (RFC 2606), with or without a DNS server.
    result = sdctl("--scheduler", "sdmesh-scheduler.invalid:50051", "jobs")
    assert result.returncode == 3
    assert one_line(result) == (
        "error: scheduler sdmesh-scheduler.invalid:50051 unreachable: the name does not "
        "resolve; check the host name"
    )  # and not "retrying for up to 60s": it gave up after one pass


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost", "'localhost' has no port; give HOST:PORT, e.g. localhost:50051"),
        ("::1", "'::1' has no port; give HOST:PORT, e.g. [::1]:50051"),
        (
            "http://localhost:50051",
            "'http://localhost:50051' is a URL; give HOST:PORT without http://, "
            "e.g. localhost:50051",
        ),
        ("localhost:port", "'localhost:port': the port must be a number from 1 to 65535"),
    ],
)
def test_an_address_without_a_port_is_refused_before_dialing(address: str, expected: str) -> None:
    for command in (["jobs"], ["node", "--data-dir", "/nonexistent"]):
        result = sdctl("--scheduler", address, *command)
        assert result.returncode == 2
        assert last_line(result) == f"error: --scheduler: {expected}"


# ---- 5 and 8. TLS: the agent's hint, and no gRPC log lines ----------------------


@pytest.fixture
def tls_scheduler(tmp_path: Path) -> Iterator[tuple[LocalCluster, dict[str, Path]]]:
    """A scheduler that serves TLS only (no client certificates needed)."""
    files = make_cluster_certs(tmp_path / "tls", ["127.0.0.1"])
    cluster = LocalCluster(
        tmp_path,
        scheduler_args=(
            "--tls-cert",
            str(files["scheduler"]),
            "--tls-key",
            str(files["scheduler-key"]),
        ),
    )
    process = cluster.start_scheduler()
    until(lambda: "listening on" in process.log.read_text(), "the scheduler to listen", timeout=60)
    try:
        yield cluster, files
    finally:
        cluster.stop()


def test_an_agent_without_the_ca_says_why_and_gives_up(
    tls_scheduler: tuple[LocalCluster, dict[str, Path]], tmp_path: Path
) -> None:
    cluster, _ = tls_scheduler
    result = sdctl(
        "node", "--scheduler", cluster.address, "--data-dir", str(tmp_path / "node"),
        "--reconnect-timeout", "1s",
    )  # fmt: skip
    assert result.returncode == 3
    assert last_line(result) == (
        f"error: scheduler {cluster.address}: closed while connecting; a scheduler with TLS "
        "closes plain-text connections: pass --ca-cert (gave up after 1s; see --reconnect-timeout)"
    )
    # Each failed try was logged with the same hint, not as "Socket closed".
    assert "Socket closed" not in result.stderr
    tries = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert tries
    assert all(line.endswith("closes plain-text connections: pass --ca-cert") for line in tries)


def test_a_wrong_ca_is_one_line_and_grpc_s_own_log_stays_out(
    tls_scheduler: tuple[LocalCluster, dict[str, Path]], tmp_path: Path
) -> None:
    cluster, _ = tls_scheduler
    other = make_cluster_certs(tmp_path / "other", ["127.0.0.1"])
    result = sdctl("--scheduler", cluster.address, "--ca-cert", str(other["ca"]), "jobs")
    assert result.returncode == 3
    assert one_line(result) == (
        f"error: TLS handshake with {cluster.address} failed (its certificate is not signed "
        "by the CA in --ca-cert): check --ca-cert (and --client-cert for mutual TLS)"
    )
    plain = sdctl("--scheduler", cluster.address, "jobs")
    assert plain.returncode == 3
    assert one_line(plain).endswith(
        "a scheduler with TLS closes plain-text connections: pass --ca-cert"
    )
    # The scheduler refused both handshakes; its log has our lines only.
    log = cluster.processes[0].log.read_text()
    assert "ssl_transport_security" not in log and "Handshake failed" not in log


# ---- 6. a second cluster on the same port or data dir -------------------------


def test_a_second_sdctl_up_says_the_first_holds_the_port(tmp_path: Path) -> None:
    port = free_port()
    env = process_env() | {"SDMESH_HOME": str(tmp_path / "home")}
    log = tmp_path / "up.log"
    with open(log, "wb") as handle:
        first = spawn_tied(
            sdctl_command("up", "--port", str(port)), stdout=handle, stderr=handle, env=env
        )

    def running() -> None:
        if first.poll() is not None:
            pytest.fail(f"the first `sdctl up` ended:\n{log.read_text()}")

    try:
        until(
            lambda: "sdmesh is up" in log.read_text(),
            "the first `sdctl up` to be up",
            timeout=180,
            while_alive=running,
        )
        same_port = sdctl("up", "--port", str(port), "--data-dir", str(tmp_path / "b"), env=env)
        assert same_port.returncode == 2
        assert one_line(same_port) == (
            f"error: --port {port}: an sdmesh scheduler (another `sdctl up`, or `sdctl "
            f"scheduler`) already listens on 127.0.0.1:{port}: stop it, or pass another "
            "--port (and --data-dir, for a second cluster)"
        )
        same_dir = sdctl("up", "--port", str(free_port()), env=env)
        assert same_dir.returncode == 1
        assert one_line(same_dir) == (
            f"error: another `sdctl up` (pid {first.pid}) runs with the data dir "
            f"{tmp_path / 'home' / 'up'}: stop it (Ctrl-C where it runs), or give this one "
            "its own --data-dir and --port"
        )
        scheduler = sdctl("scheduler", "--port", str(port), "--data-dir", str(tmp_path / "s"))
        assert scheduler.returncode == 2
        assert last_line(scheduler).startswith(f"error: --port {port}: 127.0.0.1:{port} is already")
    finally:
        first.terminate()
        first.wait(timeout=120)


# ---- 7. help and flags ------------------------------------------------------------


def test_help_offers_only_what_each_command_takes() -> None:
    up = sdctl("up", "--help").stdout
    assert "0.0.0.0" not in up
    for server in ("scheduler", "up", "admin"):
        shown = sdctl(server, "--help").stdout
        for client_only in ("--user", "--reconnect-timeout", "--scheduler", "--api-key"):
            assert client_only not in shown, (server, client_only)
    node = sdctl("node", "--help").stdout
    assert "--user" not in node and "--api-key" not in node
    assert "--scheduler" in node  # what a node dials


def test_submit_s_help_is_grouped_with_metavars_a_user_writes() -> None:
    shown = sdctl("submit", "--help").stdout
    for heading in ("the picture:", "scheduling:", "img2img and inpainting:", "hires fix:"):
        assert heading in shown
    for flag in ("--width PX", "--steps N", "--hires-width PX", "--sampler NAME", "--seed SEED"):
        assert flag in shown
    # No field names in capitals (HR_RESIZE_X), and no client flags repeated.
    assert "_" not in "".join(word for word in shown.split() if word.isupper())
    assert "  --api-key" not in shown  # named once, in the epilog, not described again
    assert len(shown.splitlines()) < 80


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["submit", "a fox", "--step", "4"],
            "error: sdctl submit: no flag --step; did you mean --steps? "
            "(see `sdctl submit --help`)",
        ),
        (
            ["submit", "a fox", "--stpes", "4"],
            "error: sdctl submit: no flag --stpes; did you mean --steps? "
            "(see `sdctl submit --help`)",
        ),
        (["submit"], "error: sdctl submit: missing PROMPT (see `sdctl submit --help`)"),
        (
            ["jobs", "--limit", "-1"],
            "error: sdctl jobs: argument --limit: must be at least 1, got -1 "
            "(see `sdctl jobs --help`)",
        ),
        (
            ["admin", "create-key"],
            "error: sdctl admin create-key: missing --user (see `sdctl admin create-key --help`)",
        ),
    ],
)
def test_a_mistyped_command_line_is_one_line_from_its_command(
    args: list[str], expected: str
) -> None:
    result = sdctl(*args)
    assert result.returncode == 2
    assert one_line(result) == expected


# ---- the sweep ---------------------------------------------------------------

MISSING = "/nonexistent/sdmesh"
USER_COMMANDS = [
    ["submit", "p"],
    ["watch", "j"],
    ["jobs"],
    ["job", "j"],
    ["images", "j"],
    ["cancel", "j"],
    ["delete", "j"],
    ["nodes"],
    ["models"],
    ["drain", "n"],
    ["undrain", "n"],
    ["health"],
]
# Each user command with a wrong address, key or file; in-process, where an
# exception that escaped `run` would fail the test as a traceback would.
CLIENT_MISTAKES: list[list[str]] = [
    *[
        [*prefix, *command]
        for prefix in (
            ["--scheduler", "127.0.0.1:1"],
            ["--scheduler", "no-such-host.invalid:1"],
            ["--scheduler", "127.0.0.1"],
            ["--scheduler", "grpc://x:1"],
            ["--api-key", "sdk_not a key"],
            ["--ca-cert", MISSING + ".pem"],
            ["--client-cert", MISSING + ".pem"],
            ["--reconnect-timeout", "soon"],
        )
        for command in USER_COMMANDS
    ],
    ["--scheduler", "127.0.0.1:1", "submit", "p", "--init-image", MISSING + ".png"],
    ["--scheduler", "127.0.0.1:1", "submit", "p", "--mask", "x.png"],
    ["--scheduler", "127.0.0.1:1", "submit", "p", "--controlnet", "nope"],
    ["--scheduler", "127.0.0.1:1", "submit", "p", "--lora", "x:heavy"],
    ["--scheduler", "127.0.0.1:1", "submit", "p", "--width", "wide"],
    ["--scheduler", "127.0.0.1:1", "submit", "p", "--label", "novalue"],
    ["--scheduler", "127.0.0.1:1", "drain", "n", "--timeout", "later"],
    [],
    ["frobnicate"],
    ["--output", "yaml", "jobs"],
    # admin works in-process too: it is the scheduler's store, not a server
    ["admin", "--data-dir", MISSING, "list-keys"],
    ["admin", "--data-dir", MISSING, "audit", "--since", "forever"],
    ["admin", "--db", "postgres://u@127.0.0.1:1/x", "list-keys"],
    ["admin", "--db", "nonsense", "list-keys"],
    ["admin", "--data-dir", "{tmp}/a", "create-key", "--user", "bad name!"],
    ["admin", "--data-dir", "{tmp}/a", "join-token", "--label", "=x"],
    ["admin", "--data-dir", "{tmp}/a", "revoke-key", "nope"],
    ["admin", "--data-dir", "{tmp}/a", "remove-node", "nope"],
    ["admin", "certs", "--out", "/proc/sdmesh-certs", "--hosts", "a"],
    ["admin", "certs", "--out", "{tmp}/c", "--hosts", ""],
]
# The servers, each failing before it would serve: as processes.
SERVER_MISTAKES: list[list[str]] = [
    ["scheduler", "--data-dir", "/proc/sdmesh"],
    ["scheduler", "--db", "mysql://root:pw@db/x"],
    ["scheduler", "--db", "postgresql://u@127.0.0.1:1/x", "--data-dir", "{tmp}/s"],
    ["scheduler", "--port", "http"],
    ["scheduler", "--tls-cert", MISSING + ".pem", "--tls-key", MISSING + ".pem"],
    ["scheduler", "--host", "0.0.0.0", "--data-dir", "{tmp}/s2"],
    ["scheduler", "--lease", "soon"],
    ["node", "--scheduler", "localhost"],
    ["node", "--ca-cert", MISSING + ".pem", "--data-dir", "{tmp}/n"],
    ["node", "--tls-cert", MISSING + ".pem", "--data-dir", "{tmp}/n"],
    ["node", "--gpus", "first"],
    ["node", "--simulate-hang", "1:1", "--data-dir", "{tmp}/n"],
    ["node", "--models-dir", MISSING, "--data-dir", "{tmp}/n"],
    ["up", "--host", "0.0.0.0"],
    ["up", "--port", "99999"],
]


@pytest.mark.parametrize("args", CLIENT_MISTAKES, ids=" ".join)
def test_no_bad_value_to_a_command_shows_a_traceback(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever is wrong, the answer is one line that starts with `error:`
    and a non-zero exit."""
    from client.cli.main import run

    try:
        code = run([arg.replace("{tmp}", str(tmp_path)) for arg in args])
    except SystemExit as exited:  # argparse's, after its one line
        code = exited.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in out + err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: "), err


@pytest.mark.parametrize("args", SERVER_MISTAKES, ids=" ".join)
def test_no_bad_value_to_a_server_shows_a_traceback(args: list[str], tmp_path: Path) -> None:
    result = sdctl(*(arg.replace("{tmp}", str(tmp_path)) for arg in args), timeout=180)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
