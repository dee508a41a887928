"""The whole path with everything on, over real processes: TLS with client
certificates (mutual TLS), API keys and node enrollment, on SQLite and on
PostgreSQL. Agents join with a join token and keep the credential they are
issued; users see only their own jobs; `sdctl admin` makes keys and
removes nodes; callers without a key, with a revoked one, or with a
certificate from another CA are refused."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from client import AuthenticationError, Client, NotFoundError
from harness.processes import LocalCluster, process_env, sdctl_command
from harness.waiting import until
from protos import scheduler_pb2, scheduler_pb2_grpc
from sdmesh.tls import make_cluster_certs
from tests.e2e.test_whole_path import check_png

pytestmark = pytest.mark.e2e


def admin(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`sdctl admin ...` on the scheduler's host: on its database."""
    where = (
        ["--db", cluster.db_url]
        if cluster.db_url
        else ["--data-dir", str(cluster.root / "scheduler")]
    )
    return subprocess.run(
        sdctl_command("admin", *where, *args),
        capture_output=True,
        text=True,
        env=process_env(),
        timeout=60,
        check=False,
    )


def test_everything_on_the_whole_path(secure: LocalCluster, tmp_path: Path) -> None:
    security = secure.security
    assert security is not None
    secure.start_agent("agent-a")
    secure.start_agent("agent-b")
    secure.wait_for_nodes(2)
    # Each agent enrolled once and keeps its own credential.
    for name in ("agent-a", "agent-b"):
        stored = json.loads((secure.root / name / "credential.json").read_text())
        assert stored["credential"].startswith("sdn_")
        assert (secure.root / name / "credential.json").stat().st_mode & 0o077 == 0

    with secure.client() as client:
        handles = [
            client.submit(f"a lighthouse, take {i}", width=64, height=64, steps=4) for i in range(4)
        ]
        for handle in handles:
            job = handle.wait()
            assert job.state == "SUCCEEDED", job.reason
            assert job.owner == "tester"
            [image] = handle.images()
            check_png(image.data, 64, 64, job.spec.seed, job.spec.prompt)

    # sdctl, with the key and certificates from the environment.
    done = secure.sdctl(
        "submit",
        "a lighthouse from sdctl",
        "--steps",
        "4",
        "--width",
        "64",
        "--height",
        "64",
        "--output-dir",
        str(tmp_path / "cli"),
        "-o",
        "json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "SUCCEEDED"

    # A key made with `sdctl admin` works at once; another user sees none of tester's jobs.
    made = admin(secure, "create-key", "--user", "mallory")
    assert made.returncode == 0, made.stderr
    mallory_key = made.stdout.strip()
    options = security.client_options("tester") | {"api_key": mallory_key}
    with Client(secure.addresses, timeout=10, **options) as mallory:
        assert mallory.list_jobs() == []
        with pytest.raises(NotFoundError):
            mallory.get_job(handles[0].id)
        with pytest.raises(NotFoundError):
            mallory.cancel(handles[0].id)
    # ... until it is revoked.
    key_id = mallory_key.split("_")[1]
    assert admin(secure, "revoke-key", key_id).returncode == 0
    with Client(secure.addresses, timeout=10, **options) as mallory:

        def refused() -> bool:
            try:
                mallory.list_jobs()
            except AuthenticationError:
                return True
            return False

        until(refused, "the revoked key to be refused", timeout=20)
    # No key at all: refused with its own exit code.
    env = process_env() | security.env()
    env.pop("SDMESH_API_KEY")
    bare = subprocess.run(
        sdctl_command("--scheduler", secure.addresses, "jobs"),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert bare.returncode == 4, bare.stderr
    assert "API key" in bare.stderr

    # Removing a node closes its stream; its jobs would go back to the queue.
    removed = admin(secure, "remove-node", _node_id(secure, "agent-b"))
    assert removed.returncode == 0, removed.stderr
    with secure.client("admin") as root:
        until(
            lambda: [n.name for n in root.list_nodes() if n.connected] == ["agent-a"],
            "agent-b to be cut off",
            timeout=30,
        )
    audit = admin(secure, "audit", "-o", "json")
    actions = [entry["action"] for entry in json.loads(audit.stdout)]
    for action in ("create-key", "revoke-key", "enroll-node", "remove-node"):
        assert action in actions


def _node_id(cluster: LocalCluster, name: str) -> str:
    return str(json.loads((cluster.root / name / "node.json").read_text())["node_id"])


def test_unenrolled_agents_and_foreign_certificates_are_refused(
    secure: LocalCluster, tmp_path: Path
) -> None:
    security = secure.security
    assert security is not None
    files = security.files
    # An agent with the right certificate but no join token exits non-zero.
    tls = [
        "--ca-cert",
        str(files["ca"]),
        "--tls-cert",
        str(files["node"]),
        "--tls-key",
        str(files["node-key"]),
    ]
    stranger = subprocess.run(
        sdctl_command(
            "node", "--scheduler", secure.address, "--data-dir", str(tmp_path / "stranger"), *tls
        ),
        capture_output=True,
        text=True,
        env=process_env(),
        timeout=180,
        check=False,
    )
    assert stranger.returncode != 0
    assert "not enrolled" in stranger.stderr

    # A client certificate from another CA fails the handshake; so does an expired one.
    other = make_cluster_certs(tmp_path / "other-ca", ["127.0.0.1"])
    # An expired certificate signed by the cluster's own CA (its key copied
    # aside, so the cluster's own files stay as they are).
    aside = tmp_path / "stale"
    aside.mkdir()
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy(files["ca"].parent / name, aside / name)
    stale = make_cluster_certs(
        aside,
        ["127.0.0.1"],
        nodes=(),
        clients=("stale",),
        not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
    )
    for cert, cert_key in (
        (other["client"], other["client-key"]),
        (stale["stale"], stale["stale-key"]),
        (None, None),
    ):
        assert handshake_refused(secure.address, files["ca"], cert, cert_key)
    # A client that does not trust the scheduler's CA refuses it.
    assert handshake_refused(secure.address, other["ca"], files["client"], files["client-key"])
    assert not handshake_refused(secure.address, files["ca"], files["client"], files["client-key"])


def handshake_refused(address: str, ca: Path, cert: Path | None, key: Path | None) -> bool:
    """Whether the TLS handshake fails, with raw gRPC (the SDK itself
    refuses to present an expired certificate)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    with grpc.secure_channel(address, credentials) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            stub.GetHealth(scheduler_pb2.GetHealthRequest(), timeout=5)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code == grpc.StatusCode.UNAVAILABLE
    return False
