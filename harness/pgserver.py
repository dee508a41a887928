"""A throwaway PostgreSQL cluster that tests may stop, restart or kill: its
own data directory under /tmp, its own free port on 127.0.0.1, trust
authentication. It never touches the shared server on port 5432.

As root, initdb and pg_ctl run as the `postgres` user (initdb refuses root),
which is why the data lives under a /tmp directory that user owns rather than
under pytest's tmp_path (which it cannot traverse)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

from harness.processes import alive, free_port

# fsync=off: committed data survives a crash of PostgreSQL (the OS still has
# it), just not one of the machine.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "shared_buffers": "16MB",
    "max_connections": "100",
}
START_TIMEOUT = 60


def bin_dir() -> Path | None:
    """The bin directory of the newest PostgreSQL under /usr/lib/postgresql."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


def available() -> str | None:
    """Why a throwaway cluster cannot be made here, or None if it can."""
    if bin_dir() is None:
        return "no PostgreSQL server binaries (initdb) under /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and there is no `runuser` to run initdb as postgres"
    return None


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _remove(root: Path, pg_ctl: Path) -> None:
    """Stops a server still running in root and deletes root (also at exit)."""
    data = root / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(
            _as_owner([str(pg_ctl), "stop", "-D", str(data), "-m", "immediate", "-w"]),
            capture_output=True,
            cwd=root,
            check=False,
        )
    shutil.rmtree(root, ignore_errors=True)


def sweep_stale() -> None:
    """Removes clusters left behind by test processes that have died."""
    pg_ctl = (bin_dir() or Path()) / "pg_ctl"
    for root in Path("/tmp").glob("sdmesh-pg-*-*"):
        owner = root.name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _remove(root, pg_ctl)


class ThrowawayPostgres:
    """One PostgreSQL cluster; the data survives stop/start until close()."""

    def __init__(self, database: str = "sdmesh") -> None:
        problem = available()
        if problem is not None:
            raise RuntimeError(problem)
        self.bin = bin_dir() or Path()
        self.database = database
        self.port = free_port()
        sweep_stale()
        self.root = Path(tempfile.mkdtemp(prefix=f"sdmesh-pg-{os.getpid()}-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._finalizer = weakref.finalize(self, _remove, self.root, self.bin / "pg_ctl")
        self._initialized = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _run(self, argv: list[str], what: str, owner: bool = True) -> None:
        command = _as_owner(argv) if owner else argv
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.root, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                f"--- {self.log} ---\n{self.tail()}"
            )

    def _initdb(self) -> None:
        initdb = [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres"]
        self._run([*initdb, "--auth=trust", "-E", "UTF8", "--no-sync"], "initdb")
        settings = {**SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.root}'"}
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        """Starts the server and waits until it accepts connections."""
        first = not self._initialized
        if first:
            self._initdb()
            self._initialized = True
        pg_ctl = [str(self.bin / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log)]
        self._run([*pg_ctl, "-w", "-t", str(START_TIMEOUT)], "pg_ctl start")
        if first:
            createdb = [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
            self._run([*createdb, "-U", "postgres", self.database], "createdb", owner=False)

    def stop(self, mode: str = "fast") -> None:
        """Stops the server: mode is pg_ctl's smart, fast or immediate."""
        if self.running:
            pg_ctl = [str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode]
            self._run([*pg_ctl, "-w", "-t", str(START_TIMEOUT)], "pg_ctl stop")

    def restart(self, mode: str = "fast") -> None:
        """Stops and starts again on the same port with the same data."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILLs the postmaster and its backends, as a crash would; the
        next start() runs crash recovery."""
        pid = self.pid
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGKILL)  # pg_ctl starts the postmaster in its own session
        except ProcessLookupError:
            return
        # PostgreSQL will not start while the old postmaster's pid exists, even
        # as a zombie; init reaps it (here after about a second).
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"killed postmaster {pid} was not reaped in 30 s")
            time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while the server runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def close(self) -> None:
        """Stops the server (immediately) and deletes its data."""
        self._finalizer()

    def __enter__(self) -> ThrowawayPostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
