"""TLS for every sdmesh process: the credentials a server listens with and a
channel dials with, checked up front so that a wrong file is one line naming
its flag rather than a failed handshake later, and `make_cluster_certs`, a
small cluster's CA and certificates.

The `cryptography` package (the checks, the certificates) loads only when
TLS is used, so that plain-text commands start as fast as before.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

# The flags each file comes from, named in errors: the scheduler's, and a
# client's (sdctl, the SDK). Agents pass their own.
SERVER_FLAGS = ("--tls-cert", "--tls-key", "--client-ca")
CLIENT_FLAGS = ("--ca-cert", "--client-cert", "--client-key")

# Every scheduler certificate names these, so that `sdctl up` and a client
# on the same machine always match it.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# A certificate is valid from a few minutes before it is made, for clocks
# a little behind.
CLOCK_SKEW = dt.timedelta(minutes=5)
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = ("ca", "scheduler")


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files a channel dials with: the CA that signed the server's
    certificate, and for mutual TLS this process's own certificate and key.
    `flags` name them in errors. Without a CA the channel is plain text, so
    a certificate or key without one raises ValueError rather than go
    unused while the caller believes it is in use."""

    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    flags: tuple[str, str, str] = field(default=CLIENT_FLAGS, compare=False, repr=False)

    def __post_init__(self) -> None:
        ca_flag, cert_flag, key_flag = self.flags
        if self.ca_cert is None and (self.cert is not None or self.key is not None):
            given = cert_flag if self.cert is not None else key_flag
            raise ValueError(
                f"{given} needs {ca_flag}, the CA that signed the scheduler's certificate"
            )

    @property
    def enabled(self) -> bool:
        return self.ca_cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """Checks the files and reads them; raises ValueError naming the flag."""
        return channel_credentials(self.ca_cert, self.cert, self.key, flags=self.flags)


def server_credentials(
    cert: Path,
    key: Path,
    client_ca: Path | None = None,
    *,
    flags: tuple[str, str, str] = SERVER_FLAGS,
) -> grpc.ServerCredentials:
    """A server's TLS: its certificate chain and key, and with `client_ca`,
    mutual TLS: every peer must present a certificate that CA signed.
    Raises ValueError, naming the flag, for a file that is missing,
    unreadable or not PEM, a key that is not the certificate's, or a
    certificate that has expired."""
    cert_flag, key_flag, ca_flag = flags
    cert_pem = _read_pem(cert, cert_flag, "CERTIFICATE")
    key_pem = _read_pem(key, key_flag, "PRIVATE KEY")
    _check_pair(cert_pem, key_pem, cert, (cert_flag, key_flag))
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read_pem(client_ca, ca_flag, "CERTIFICATE")
        _certificates(ca_pem, client_ca, ca_flag)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


def channel_credentials(
    ca_cert: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    flags: tuple[str, str, str] = CLIENT_FLAGS,
) -> grpc.ChannelCredentials:
    """A channel's TLS: the server is verified against `ca_cert` (without
    it, the system's roots), and `cert` with `key` are presented for mutual
    TLS. Raises ValueError, naming the flag, as `server_credentials` does."""
    ca_flag, cert_flag, key_flag = flags
    if (cert is None) != (key is None):
        given, missing = (cert_flag, key_flag) if key is None else (key_flag, cert_flag)
        raise ValueError(f"{given} needs {missing} too")
    ca_pem = None
    if ca_cert is not None:
        ca_pem = _read_pem(ca_cert, ca_flag, "CERTIFICATE")
        _certificates(ca_pem, ca_cert, ca_flag)
    cert_pem = key_pem = None
    if cert is not None and key is not None:
        cert_pem = _read_pem(cert, cert_flag, "CERTIFICATE")
        key_pem = _read_pem(key, key_flag, "PRIVATE KEY")
        _check_pair(cert_pem, key_pem, cert, (cert_flag, key_flag))
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def _read_pem(path: Path, flag: str, kind: str) -> bytes:
    """The file's bytes, if it holds a PEM block of `kind` (CERTIFICATE, or
    any PRIVATE KEY)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{flag}: {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{flag}: {path} is a directory, not a PEM file") from None
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    begin = re.search(rb"-----BEGIN ([A-Z ]+)-----", data)
    found = begin.group(1).decode() if begin else ""
    if not found.endswith(kind):
        what = "a PEM certificate" if kind == "CERTIFICATE" else "a PEM private key"
        seen = f" (it holds a {found})" if found else ""
        raise ValueError(f"{flag}: {path} is not {what}{seen}")
    return data


def _certificates(pem: bytes, path: Path, flag: str) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{flag}: {path} holds a damaged certificate: {exc}") from None


def _check_pair(cert_pem: bytes, key_pem: bytes, cert: Path, flags: tuple[str, str]) -> None:
    """The key belongs to the first certificate, which is in date."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_flag, key_flag = flags
    leaf = _certificates(cert_pem, cert, cert_flag)[0]
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # a password-protected key
        raise ValueError(f"{key_flag}: the key is encrypted; sdmesh needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{key_flag}: not a usable private key: {exc}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise ValueError(f"{key_flag}: the key does not match the certificate in {cert_flag}")
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc < now:
        raise ValueError(
            f"{cert_flag}: {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )


# ---- a small cluster's certificates --------------------------------------------


def make_cluster_certs(
    out_dir: Path,
    hosts: Sequence[str],
    *,
    days: int = 365,
    nodes: Sequence[str] = ("node",),
    clients: Sequence[str] = ("client",),
    not_after: dt.datetime | None = None,
) -> dict[str, Path]:
    """Writes a CA and the certificates a cluster needs into `out_dir`:

    - `ca.pem`, `ca-key.pem`: the CA (kept when both exist already, so that
      certificates made later are trusted by servers running now);
    - `scheduler.pem`, `scheduler-key.pem`: for every name and address in
      `hosts` (and always localhost, 127.0.0.1 and ::1);
    - `<name>.pem`, `<name>-key.pem` for each of `nodes` and `clients`:
      certificates for mutual TLS, each naming its holder.

    Keys are ECDSA P-256, written readable by the owner only. Certificates
    are valid for `days`, or until `not_after` (tests give a past date for
    an expired one); the CA for ten years. Returns each file by its name
    without `.pem`: {"ca": ..., "ca-key": ..., "scheduler": ..., ...}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    names = [*nodes, *clients]
    for name in names:
        if not FILE_NAME.match(name) or name in RESERVED_NAMES or name.endswith("-key"):
            raise ValueError(
                f"certificate name {name!r}: use letters, digits, '.', '_' or '-' "
                f"(not {', '.join(RESERVED_NAMES)}, nor ending in -key)"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"certificate names repeat: {', '.join(names)}")
    if days < 1:
        raise ValueError(f"days: must be at least 1, got {days}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before = now - CLOCK_SKEW
    until = not_after if not_after is not None else now + dt.timedelta(days=days)
    if until <= not_before:  # an expired certificate, on purpose
        not_before = until - dt.timedelta(days=days)
    written: dict[str, Path] = {}

    ca_path, ca_key_path = out_dir / "ca.pem", out_dir / "ca-key.pem"
    if ca_path.exists() and not ca_key_path.exists():
        # A new CA here would leave every certificate signed by the old one
        # untrusted, and the servers running now trusting none of the new.
        raise ValueError(
            f"{ca_path} exists without {ca_key_path.name}: put the CA's key back to sign "
            "more certificates, or choose an empty folder for a new CA"
        )
    if ca_path.exists():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path}: not the ECDSA key sdmesh makes")
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _ca_certificate(ca_key, now - CLOCK_SKEW, now + dt.timedelta(days=3650))
        _write_key(ca_key_path, ca_key)
        _write_cert(ca_path, ca)
    written["ca"], written["ca-key"] = ca_path, ca_key_path

    leaves: list[tuple[str, str, list[x509.GeneralName] | None]] = [
        ("scheduler", "scheduler", _sans([*hosts, *LOCAL_HOSTS]))
    ]
    leaves += [(name, "node", None) for name in nodes]
    leaves += [(name, "client", None) for name in clients]
    for name, role, sans in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = _host_name(hosts[0]) if role == "scheduler" and hosts else name
        cert = _leaf_certificate(ca, ca_key, key, common_name, role, sans, (not_before, until))
        cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}-key.pem"
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        written[name], written[f"{name}-key"] = cert_path, key_path
    return written


def _host_name(host: str) -> str:
    return host.strip().removeprefix("[").removesuffix("]")


def _sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Each host once, as an IP address or a DNS name."""
    from cryptography import x509

    seen: list[x509.GeneralName] = []
    for host in (_host_name(h) for h in hosts):
        if not host:
            continue
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        if name not in seen:
            seen.append(name)
    return seen


def _subject(common_name: str, role: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sdmesh"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    key: EllipticCurvePrivateKey, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    name = _subject("sdmesh cluster CA", "ca")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    ca: x509.Certificate,
    ca_key: EllipticCurvePrivateKey,
    key: EllipticCurvePrivateKey,
    common_name: str,
    role: str,
    sans: list[x509.GeneralName] | None,
    validity: tuple[dt.datetime, dt.datetime],
) -> x509.Certificate:
    """A scheduler's certificate (serverAuth, for `sans`) or a node's or
    client's (clientAuth), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if role == "scheduler" else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(common_name, role))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _write_key(path: Path, key: EllipticCurvePrivateKey) -> None:
    """Owner-only from the start: the key is never readable by others, not
    even between creating the file and setting its mode."""
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
