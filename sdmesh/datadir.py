"""One process per data dir: agents keep their identity there and schedulers
their replica id, so two processes sharing one would pose as one."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class DataDirInUse(Exception):
    """Another live process holds the data dir; `holder` is its pid, as it
    wrote it."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class DataDirLock:
    """An exclusive lock on `<data-dir>/<role>.lock`, held while the agent or
    scheduler runs: one process per data dir."""

    def __init__(self, data_dir: Path, role: str = "agent") -> None:
        self.role = role
        self.path = data_dir / f"{role}.lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DataDirInUse(
                f"data dir {self.path.parent} is in use by another {self.role} (pid {holder}); "
                f"give each {self.role} its own --data-dir",
                holder,
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
