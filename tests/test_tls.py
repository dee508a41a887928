"""TLS end to end, on real in-process gRPC servers with certificates from
`make_cluster_certs`: the right CA is trusted and any other is not; with a
client CA (mutual TLS) only a current certificate that CA signed gets in;
files that cannot be used are one line naming their flag; and the SDK
says what is wrong with a handshake at once instead of retrying."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import shutil
import stat
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc import aio

from client import AsyncClient, InvalidArgumentError, TlsError, UnavailableError
from protos import scheduler_pb2, scheduler_pb2_grpc
from sdmesh.tls import TlsFiles, channel_credentials, make_cluster_certs, server_credentials
from tests.test_client_retry import FakeScheduler

Certs = dict[str, Path]


@asynccontextmanager
async def serving(credentials: grpc.ServerCredentials | None) -> AsyncIterator[int]:
    """A scheduler that answers GetHealth, over TLS when given credentials."""
    server = aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(FakeScheduler("r1"), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 30))


@dataclass(frozen=True)
class Cluster:
    certs: Certs  # the cluster's own CA and certificates
    other: Certs  # another cluster's: a CA nobody here trusts
    expired: Certs  # the cluster's CA, but certificates that ended yesterday


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("certs")
    certs = make_cluster_certs(root / "ours", ["sched.example", "10.1.2.3"], clients=("alice",))
    other = make_cluster_certs(root / "other", ["sched.example"], clients=("alice",))
    # The same CA in another folder: make_cluster_certs keeps it and signs
    # certificates that are already out of date.
    (root / "expired").mkdir()
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy(root / "ours" / name, root / "expired" / name)
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    expired = make_cluster_certs(
        root / "expired", ["sched.example"], clients=("alice",), not_after=yesterday
    )
    return Cluster(certs, other, expired)


def tls(certs: Certs, *, mutual: bool = False) -> grpc.ServerCredentials:
    return server_credentials(
        certs["scheduler"], certs["scheduler-key"], certs["ca"] if mutual else None
    )


# ---- the certificates --------------------------------------------------------


def test_make_cluster_certs_writes_a_ca_a_scheduler_and_each_peer(tmp_path: Path) -> None:
    certs = make_cluster_certs(
        tmp_path / "c", ["sched.example", "10.1.2.3", "[fd00::1]"], nodes=("gpu1", "gpu2")
    )
    assert sorted(certs) == sorted(
        f"{name}{suffix}"
        for name in ("ca", "scheduler", "gpu1", "gpu2", "client")
        for suffix in ("", "-key")
    )
    for name, path in certs.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if name.endswith("-key") else 0o644), name
    ca = x509.load_pem_x509_certificate(certs["ca"].read_bytes())
    scheduler = x509.load_pem_x509_certificate(certs["scheduler"].read_bytes())
    scheduler.verify_directly_issued_by(ca)
    sans = scheduler.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["sched.example", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
        "10.1.2.3", "fd00::1", "127.0.0.1", "::1",
    ]  # fmt: skip
    assert _usage(scheduler) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in ("gpu1", "gpu2", "client"):
        peer = x509.load_pem_x509_certificate(certs[name].read_bytes())
        peer.verify_directly_issued_by(ca)
        assert _usage(peer) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    # 365 days by default, from a few minutes back for clocks a little behind.
    lifetime = scheduler.not_valid_after_utc - scheduler.not_valid_before_utc
    assert dt.timedelta(days=365) < lifetime < dt.timedelta(days=365, minutes=10)


def _usage(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_a_second_run_keeps_the_ca_so_new_certificates_are_trusted(tmp_path: Path) -> None:
    first = make_cluster_certs(tmp_path, ["h"], nodes=("gpu1",), clients=())
    ca_before = first["ca"].read_bytes()
    second = make_cluster_certs(tmp_path, ["h"], nodes=("gpu2",), clients=())
    assert second["ca"].read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    x509.load_pem_x509_certificate(second["gpu2"].read_bytes()).verify_directly_issued_by(ca)
    # Without the CA's key, no new CA quietly replaces the one servers trust.
    first["ca-key"].unlink()
    with pytest.raises(ValueError, match=r"ca\.pem exists without ca-key\.pem: put the CA's key"):
        make_cluster_certs(tmp_path, ["h"], nodes=("gpu3",), clients=())
    assert first["ca"].read_bytes() == ca_before


@pytest.mark.parametrize(
    ("nodes", "clients", "message"),
    [
        (("ca",), (), "certificate name 'ca'"),
        (("../up",), (), "certificate name '../up'"),
        (("gpu-key",), (), "certificate name 'gpu-key'"),
        (("same",), ("same",), "certificate names repeat: same, same"),
    ],
)
def test_certificate_names_must_make_safe_distinct_files(
    tmp_path: Path, nodes: tuple[str, ...], clients: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        make_cluster_certs(tmp_path, ["h"], nodes=nodes, clients=clients)


# ---- files that cannot be used -----------------------------------------------


def test_unusable_server_files_are_one_line_naming_the_flag(
    cluster: Cluster, tmp_path: Path
) -> None:
    ours, other = cluster.certs, cluster.other
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    damaged = tmp_path / "damaged.pem"
    damaged.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    cases: list[tuple[tuple[Path, Path, Path | None], str]] = [
        ((missing, ours["scheduler-key"], None), f"--tls-cert: {missing} does not exist"),
        ((tmp_path, ours["scheduler-key"], None), f"--tls-cert: {tmp_path} is a directory"),
        ((garbage, ours["scheduler-key"], None), f"--tls-cert: {garbage} is not a PEM certificate"),
        # The key where the certificate goes: the message says what it holds.
        (
            (ours["scheduler-key"], ours["scheduler"], None),
            f"--tls-cert: {ours['scheduler-key']} is not a PEM certificate "
            "(it holds a PRIVATE KEY)",
        ),
        (
            (ours["scheduler"], ours["scheduler"], None),
            f"--tls-key: {ours['scheduler']} is not a PEM private key (it holds a CERTIFICATE)",
        ),
        ((damaged, ours["scheduler-key"], None), f"--tls-cert: {damaged} holds a damaged"),
        (
            (ours["scheduler"], other["scheduler-key"], None),
            "--tls-key: the key does not match the certificate in --tls-cert",
        ),
        (
            (cluster.expired["scheduler"], cluster.expired["scheduler-key"], None),
            f"--tls-cert: {cluster.expired['scheduler']} expired on ",
        ),
        ((ours["scheduler"], ours["scheduler-key"], missing), f"--client-ca: {missing} does not"),
    ]
    for (cert, key, client_ca), message in cases:
        with pytest.raises(ValueError, match="^" + re.escape(message)) as refused:
            server_credentials(cert, key, client_ca)
        assert "\n" not in str(refused.value)


def test_unusable_channel_files_name_the_caller_s_flags(cluster: Cluster, tmp_path: Path) -> None:
    ours = cluster.certs
    with pytest.raises(ValueError, match=r"^--client-cert needs --client-key too$"):
        channel_credentials(ours["ca"], ours["alice"], None)
    with pytest.raises(ValueError, match=r"^--tls-key: the key does not match"):
        channel_credentials(
            ours["ca"], ours["alice"], ours["node-key"],
            flags=("--ca-cert", "--tls-cert", "--tls-key"),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"^--client-cert: .* expired on "):
        channel_credentials(ours["ca"], cluster.expired["alice"], cluster.expired["alice-key"])
    with pytest.raises(ValueError, match=r"^--ca-cert: .* does not exist$"):
        TlsFiles(tmp_path / "ca.pem").credentials()
    assert TlsFiles(ours["ca"]).enabled and not TlsFiles().enabled
    with pytest.raises(ValueError, match=r"^--tls-key needs --ca-cert, the CA that signed"):
        TlsFiles(None, None, ours["alice-key"], flags=("--ca-cert", "--tls-cert", "--tls-key"))


def test_the_sdk_refuses_unusable_files_before_dialing(cluster: Cluster, tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidArgumentError, match=r"^--ca-cert: .* does not exist$"):
            AsyncClient("127.0.0.1:1", ca_cert=tmp_path / "nope.pem")
        with pytest.raises(InvalidArgumentError, match=r"^--client-cert needs --ca-cert"):
            AsyncClient(
                "127.0.0.1:1",
                client_cert=cluster.certs["alice"],
                client_key=cluster.certs["alice-key"],
            )

    run(scenario())


# ---- handshakes --------------------------------------------------------------


async def _health(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    """The replica id, or the status code's name when the call fails."""
    address = f"localhost:{port}"
    channel = (
        aio.secure_channel(address, credentials)
        if credentials is not None
        else aio.insecure_channel(address)
    )
    async with channel:
        try:
            health = await scheduler_pb2_grpc.SchedulerStub(channel).GetHealth(
                scheduler_pb2.GetHealthRequest(), timeout=10
            )
        except grpc.RpcError as error:
            return str(error.code().name)
        return health.replica_id


def _raw(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    """Credentials without our checks, to see what the server itself lets in."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def test_a_client_trusts_only_the_cluster_s_ca(cluster: Cluster) -> None:
    ours, other = cluster.certs, cluster.other

    async def scenario() -> None:
        async with serving(tls(ours)) as port:
            assert await _health(port, channel_credentials(ours["ca"])) == "r1"
            assert await _health(port, _raw(other["ca"])) == "UNAVAILABLE"
            for host in ("localhost", "127.0.0.1"):  # both always named by the certificate
                async with AsyncClient(f"{host}:{port}", ca_cert=ours["ca"]) as client:
                    assert (await client.health()).replica_id == "r1"

    run(scenario())


def test_mutual_tls_lets_in_only_a_current_certificate_from_the_cluster_s_ca(
    cluster: Cluster,
) -> None:
    ours, other, expired = cluster.certs, cluster.other, cluster.expired

    async def scenario() -> None:
        async with serving(tls(ours, mutual=True)) as port:
            assert await _health(port, _raw(ours["ca"])) == "UNAVAILABLE"  # no certificate
            wrong_ca = _raw(ours["ca"], other["alice"], other["alice-key"])
            assert await _health(port, wrong_ca) == "UNAVAILABLE"
            too_old = _raw(ours["ca"], expired["alice"], expired["alice-key"])
            assert await _health(port, too_old) == "UNAVAILABLE"
            for name in ("alice", "node"):
                right = channel_credentials(ours["ca"], ours[name], ours[f"{name}-key"])
                assert await _health(port, right) == "r1"
            async with AsyncClient(
                f"localhost:{port}",
                ca_cert=ours["ca"],
                client_cert=ours["alice"],
                client_key=ours["alice-key"],
            ) as client:
                assert (await client.health()).replica_id == "r1"

    run(scenario())


def test_the_sdk_names_a_failed_handshake_at_once_without_retrying(cluster: Cluster) -> None:
    ours, other = cluster.certs, cluster.other
    retried: list[str] = []

    async def scenario() -> None:
        async with serving(tls(ours)) as first, serving(tls(ours)) as second:
            addresses = [f"127.0.0.1:{first}", f"127.0.0.1:{second}"]
            started = time.monotonic()
            async with AsyncClient(
                addresses,
                ca_cert=other["ca"],
                on_retry=lambda address, error: retried.append(address),
            ) as client:
                with pytest.raises(TlsError) as failed:
                    await client.get_job("j")
            assert time.monotonic() - started < 5
        # Each replica tried once; the last one's failure is the message.
        assert retried == [addresses[0]]
        assert str(failed.value) == (
            f"TLS handshake with {addresses[1]} failed (its certificate is not signed by "
            "the CA in --ca-cert): check --ca-cert (and --client-cert for mutual TLS)"
        )
        assert failed.value.exit_code == 3

    run(scenario())


def test_the_sdk_says_when_one_side_has_no_tls(cluster: Cluster) -> None:
    ours = cluster.certs

    async def scenario() -> None:
        async with (
            serving(None) as port,
            AsyncClient(f"127.0.0.1:{port}", ca_cert=ours["ca"]) as client,
        ):
            with pytest.raises(TlsError, match=r"failed \(the scheduler does not speak TLS here\)"):
                await client.list_jobs()
        async with serving(tls(ours)) as port, AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(UnavailableError) as failed:
                await client.list_jobs()
            assert str(failed.value) == (
                f"scheduler 127.0.0.1:{port} unreachable: closed while connecting; "
                "a scheduler with TLS closes plain-text connections: pass --ca-cert"
            )
        async with (
            serving(tls(ours, mutual=True)) as port,
            AsyncClient(f"127.0.0.1:{port}", ca_cert=ours["ca"]) as client,
        ):
            with pytest.raises(UnavailableError, match=r"check --client-cert and --client-key$"):
                await client.list_jobs()

    run(scenario())
