"""Servers that end with the process that started them. `sdctl up` (and
the test harness) start each server with `spawn_tied`; the child inherits
the read end of a pipe whose write end only the parent holds, and stops,
as a second SIGTERM stops it, when it reads EOF: however the parent ends,
SIGKILL and a closed terminal included, no child is left holding a port.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("sdctl")

PARENT_FD_ENV = "SDMESH_PARENT_FD"


def spawn_tied(command: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Starts `command` (an sdctl server) so that it stops when this process
    ends, however it ends."""
    read_end, _ = _parent_pipe()
    env = dict(popen.pop("env", None) or os.environ)
    env[PARENT_FD_ENV] = str(read_end)
    return subprocess.Popen(command, env=env, pass_fds=(read_end,), **popen)


_pipe: tuple[int, int] | None = None


def _parent_pipe() -> tuple[int, int]:
    """One pipe for every child: its write end stays open, unwritten, for as
    long as this process lives."""
    global _pipe
    if _pipe is None:
        read_end, write_end = os.pipe()
        os.set_inheritable(write_end, False)
        _pipe = (read_end, write_end)
    return _pipe


def stop_with_parent() -> None:
    """In a server started by `spawn_tied`: when the parent is gone, stop as
    a second SIGTERM stops (at once, handing running work back), since
    nobody is left to wait for."""
    fd_text = os.environ.pop(PARENT_FD_ENV, "")
    if not fd_text.isdigit():
        return
    fd = int(fd_text)

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        log.warning("the process that started this one is gone; stopping")
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
