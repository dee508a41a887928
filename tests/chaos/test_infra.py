"""Checks the chaos tests' own tools: a PostgreSQL cluster that can be
restarted and killed, and network namespaces that can be partitioned."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from harness import pgserver
from harness.pgserver import ThrowawayPostgres
from tests.chaos import netns
from tests.chaos.netns import NetworkNamespace


@pytest.fixture
def postgres() -> Iterator[ThrowawayPostgres]:
    reason = pgserver.available()
    if reason is not None:
        pytest.skip(reason)
    with ThrowawayPostgres() as server:
        yield server


def test_postgres_keeps_data_across_restart(postgres: ThrowawayPostgres) -> None:
    engine = sa.create_engine(postgres.url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
            conn.execute(sa.text("CREATE TABLE kept (x int)"))
            conn.execute(sa.text("INSERT INTO kept VALUES (7)"))
        engine.dispose()
        postgres.restart()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT x FROM kept")).scalars().all() == [7]
    finally:
        engine.dispose()


def test_pool_pre_ping_recovers_after_restart(postgres: ThrowawayPostgres) -> None:
    plain = sa.create_engine(postgres.url)
    pinged = sa.create_engine(postgres.url, pool_pre_ping=True)
    try:
        for engine in (plain, pinged):
            with engine.connect() as conn:  # leaves a connection in each pool
                conn.execute(sa.text("SELECT 1"))
        postgres.restart()
        with pytest.raises(sa.exc.OperationalError), plain.connect() as conn:
            conn.execute(sa.text("SELECT 1"))  # the restart really broke pooled connections
        with pinged.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        plain.dispose()
        pinged.dispose()


def test_postgres_recovers_from_kill(postgres: ThrowawayPostgres) -> None:
    engine = sa.create_engine(postgres.url, pool_pre_ping=True)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE kept AS SELECT 7 AS x"))
        postgres.kill()
        assert not postgres.running
        with pytest.raises(sa.exc.OperationalError), engine.connect():
            pass
        postgres.start()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT x FROM kept")).scalar() == 7
    finally:
        engine.dispose()


class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


# Runs inside the namespace; reads "connect KEY TIMEOUT", "send KEY TEXT" and
# "recv KEY TIMEOUT" lines and prints one result line for each.
CLIENT = """
import socket, sys
conns = {}
for line in sys.stdin:
    op, key, arg = line.split()
    try:
        if op == "connect":
            conns[key] = socket.create_connection((sys.argv[1], int(sys.argv[2])), float(arg))
            result = "connected"
        elif op == "send":
            conns[key].sendall(arg.encode() + b"\\n")
            result = "sent"
        else:
            conns[key].settimeout(float(arg))
            result = conns[key].recv(100).decode().strip() or "closed"
    except TimeoutError:
        result = "timeout"
    except OSError as exc:
        result = type(exc).__name__
    print(result, flush=True)
"""


@pytest.fixture
def namespace() -> Iterator[NetworkNamespace]:
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    with NetworkNamespace() as space:
        yield space


def test_partition_drops_packets_silently_and_heals(namespace: NetworkNamespace) -> None:
    server = socketserver.ThreadingTCPServer((namespace.host_ip, 0), EchoHandler)
    server.daemon_threads = True
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    argv = [sys.executable, "-c", CLIENT, namespace.host_ip, str(server.server_address[1])]
    client = subprocess.Popen(
        namespace.command(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert client.stdin is not None and client.stdout is not None
    stdin, stdout = client.stdin, client.stdout

    def ask(line: str) -> str:
        stdin.write(line + "\n")
        stdin.flush()
        return stdout.readline().strip()

    try:
        assert ask("connect a 2") == "connected"
        assert ask("send a ping") == "sent"
        assert ask("recv a 2") == "ping"

        namespace.partition()
        assert ask("send a lost") == "sent"
        assert ask("recv a 1") == "timeout"  # no reply, and no reset: the socket is still open
        assert ask("connect b 1") == "timeout"  # not refused
        with pytest.raises(TimeoutError):  # the other way too, to a port nobody listens on
            socket.create_connection((namespace.ns_ip, 9), timeout=1).close()

        namespace.heal()
        assert ask("recv a 10") == "lost"  # TCP retransmitted it
        assert ask("send a again") == "sent"
        assert ask("recv a 2") == "again"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((namespace.ns_ip, 9), timeout=1).close()
    finally:
        stdin.close()
        try:
            client.wait(10)
        finally:
            client.kill()
            client.wait()
            stdout.close()
            server.shutdown()
            server.server_close()
