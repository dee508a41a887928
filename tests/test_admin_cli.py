"""`sdctl admin` on a scheduler's SQLite database, before any scheduler has
run: keys (made, listed without their secrets, revoked), join tokens with
their labels, node removal, the audit trail and certificates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.cli.main import run
from scheduler.store import Store
from scheduler.tokens import API_KEY, JOIN_TOKEN, parse_token


def admin(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str, str]:
    code = run(["admin", "--data-dir", str(data_dir), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_are_made_shown_once_listed_and_revoked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = admin(capsys, tmp_path, "create-key", "--user", "alice", "--expires", "90d")
    assert code == 0
    token = parse_token(out.strip(), API_KEY)
    assert token is not None  # stdout holds the key alone
    assert "shown only now" in err
    code, out, _ = admin(capsys, tmp_path, "create-key", "--user", "root", "--admin")
    assert code == 0

    code, out, _ = admin(capsys, tmp_path, "list-keys", "-o", "json")
    keys = json.loads(out)
    assert [(k["user"], k["admin"], k["state"]) for k in keys] == [
        ("alice", False, "active"),
        ("root", True, "active"),
    ]
    assert token.secret not in out and "hash" not in out  # never the secret, nor its hash
    assert keys[0]["expires_at"] - keys[0]["created_at"] == pytest.approx(90 * 86400, abs=5)

    assert admin(capsys, tmp_path, "revoke-key", token.id)[0] == 0
    code, _, err = admin(capsys, tmp_path, "revoke-key", token.id)
    assert code == 1 and "no active API key" in err
    code, out, _ = admin(capsys, tmp_path, "list-keys")
    assert "alice" not in out and "root" in out
    code, out, _ = admin(capsys, tmp_path, "list-keys", "--all")
    assert "revoked" in out

    code, out, _ = admin(capsys, tmp_path, "audit", "-o", "json")
    actions = [(entry["action"], entry["target"]) for entry in json.loads(out)]
    assert actions[0] == ("create-key", token.id)
    assert actions[-1] == ("revoke-key", token.id)
    assert all(entry["actor"].startswith("admin-cli:") for entry in json.loads(out))


def test_a_bad_user_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = admin(capsys, tmp_path, "create-key", "--user", "\x1b[31mroot")
    assert code == 2 and out == ""
    assert err.startswith("error: --user")


def test_join_tokens_carry_their_labels_and_nodes_can_be_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = admin(
        capsys, tmp_path, "join-token", "--expires", "2h", "--label", "pool=a100", "--reusable"
    )
    assert code == 0 and "reusable" in err
    token = parse_token(out.strip(), JOIN_TOKEN)
    assert token is not None
    store = Store(f"sqlite:///{tmp_path / 'sdmesh.db'}")
    try:
        [record] = store.credentials.join_tokens()
        assert record.labels == {"pool": "a100"} and record.reusable
        store.credentials.enroll(token, "gpu-1", "gpu-1")
    finally:
        store.close()
    assert admin(capsys, tmp_path, "remove-node", "gpu-1")[0] == 0
    code, _, err = admin(capsys, tmp_path, "remove-node", "gpu-1")
    assert code == 1 and "no enrolled node" in err


def test_certs_are_made_for_the_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography import x509

    out_dir = tmp_path / "tls"
    code, out, _ = admin(
        capsys,
        tmp_path,
        "certs",
        "--out",
        str(out_dir),
        "--hosts",
        "sched.example,10.0.0.5",
        "--nodes",
        "gpu1,gpu2",
    )
    assert code == 0
    for name in ("ca", "scheduler", "gpu1", "gpu2", "client"):
        assert (out_dir / f"{name}.pem").exists(), out
        assert (out_dir / f"{name}-key.pem").stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate((out_dir / "scheduler.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "sched.example" in names.get_values_for_type(x509.DNSName)
