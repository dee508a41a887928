"""`make demo`: starts an embedded cluster (`sdctl up`: a scheduler on
SQLite and one agent on this machine's CPU or GPU), submits a few jobs with
`sdctl submit` so that their progress shows, saves the PNGs under outputs/,
and stops the cluster with Ctrl-C's signal."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from client import Client, SdmeshError

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".sdmesh" / "demo"
OUTPUTS = ROOT / "outputs"
JOBS = [
    ["a lighthouse at dusk, oil painting"],
    ["a red fox in the snow", "--sampler", "DPM++ 2M Karras", "--steps", "15", "--batch-size", "2",
     "--width", "384", "--height", "384"],
    ["a harbour at night", "--width", "768", "--height", "512", "--seed", "1234"],
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sdctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "client.cli", *args]


def wait_for_agent(address: str, up: subprocess.Popen[bytes], log: Path) -> None:
    print("waiting for the agent (its first start builds the tiny model)...", flush=True)
    deadline = time.monotonic() + 300
    with Client(address, timeout=2) as client:
        while time.monotonic() < deadline:
            if up.poll() is not None:
                sys.exit(f"the cluster exited early; see {log}")
            try:
                if any(node.connected for node in client.list_nodes()):
                    return
            except SdmeshError:
                pass
            time.sleep(0.25)
    sys.exit(f"the agent did not connect within 300 s; see {log}")


def main() -> None:
    started = time.monotonic()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    log = DATA_DIR / "up.log"
    print(f"starting an embedded cluster on {address} (log: {log})", flush=True)
    with open(log, "ab") as handle:
        up = subprocess.Popen(
            sdctl("up", "--port", address.split(":")[1], "--data-dir", str(DATA_DIR)),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    failed = 0
    try:
        wait_for_agent(address, up, log)
        for job in JOBS:
            print(f"\n$ sdctl submit {' '.join(job)}", flush=True)
            result = subprocess.run(
                sdctl("--scheduler", address, "submit", *job, "--output-dir", str(OUTPUTS)),
                check=False,
            )
            failed += result.returncode != 0
        print("\n$ sdctl jobs", flush=True)
        subprocess.run(sdctl("--scheduler", address, "jobs"), check=False)
        print("\n$ sdctl nodes", flush=True)
        subprocess.run(sdctl("--scheduler", address, "nodes"), check=False)
    finally:
        print("\nstopping the cluster", flush=True)
        up.send_signal(signal.SIGINT)
        up.wait(timeout=120)
    print(f"\ndemo finished in {time.monotonic() - started:.1f}s; images are in {OUTPUTS}/")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
