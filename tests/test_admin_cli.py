"""`sdctl admin` on a scheduler's SQLite database, before any scheduler has
run: keys (made, listed without their secrets, revoked), join tokens with
their labels, node removal, the audit trail and certificates."""

from __future__ import annotations

import json
from datetime import datetime
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
    # Times are ISO 8601 with their offset, as in job JSON.
    lifetime = datetime.fromisoformat(keys[0]["expires_at"]) - datetime.fromisoformat(
        keys[0]["created_at"]
    )
    assert lifetime.total_seconds() == pytest.approx(90 * 86400, abs=5)

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


def test_a_fresh_host_gets_its_database_from_the_first_key_or_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hardened cluster's second step runs before the scheduler ever
    has: making a key or a token creates the data dir and its database."""
    fresh = tmp_path / "var" / "lib" / "sdmesh"
    code, out, err = admin(capsys, fresh, "create-key", "--user", "admin", "--admin")
    assert code == 0, err
    assert parse_token(out.strip(), API_KEY) is not None
    assert (fresh / "sdmesh.db").exists()
    other = tmp_path / "other"
    code, out, err = admin(capsys, other, "join-token")
    assert code == 0, err
    assert parse_token(out.strip(), JOIN_TOKEN) is not None


@pytest.mark.parametrize("action", [["list-keys"], ["audit"], ["revoke-key", "k"]])
def test_reading_a_data_dir_without_a_database_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    missing = tmp_path / "typo"
    code, out, err = admin(capsys, missing, *action)
    assert (code, out) == (2, "")
    assert err == (
        f"error: --data-dir {missing}: no scheduler database there (sdmesh.db); "
        "give the scheduler's --data-dir, or --db for PostgreSQL\n"
    )
    assert not missing.exists()  # a mistyped path is not created


def test_the_database_flags_go_before_or_after_the_action(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(["admin", "create-key", "--data-dir", str(tmp_path), "--user", "alice"])
    assert code == 0
    capsys.readouterr()
    code = run(["admin", "list-keys", "-o", "json", "--data-dir", str(tmp_path)])
    assert code == 0
    assert [key["user"] for key in json.loads(capsys.readouterr().out)] == ["alice"]


def test_keys_and_tokens_come_as_json_for_scripts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = admin(capsys, tmp_path, "create-key", "--user", "bot", "-o", "json")
    assert (code, err) == (0, "")
    made = json.loads(out)
    assert out.count("\n") == 1  # one line: stdout is not a terminal here
    token = parse_token(made["key"], API_KEY)
    assert token is not None and token.id == made["id"]
    assert (made["user"], made["admin"], made["state"], made["expires_at"]) == (
        "bot", False, "active", None,
    )  # fmt: skip
    code, out, err = admin(
        capsys, tmp_path, "join-token", "--label", "pool=a", "--expires", "2h", "-o", "json"
    )
    assert (code, err) == (0, "")
    joined = json.loads(out)
    assert parse_token(joined["token"], JOIN_TOKEN) is not None
    assert (joined["labels"], joined["reusable"]) == ({"pool": "a"}, False)
    lifetime = datetime.fromisoformat(joined["expires_at"]) - datetime.fromisoformat(
        joined["created_at"]
    )
    assert lifetime.total_seconds() == pytest.approx(7200, abs=5)
    # The audit trail says when a token expires in words a person reads.
    code, out, _ = admin(capsys, tmp_path, "audit", "-o", "json")
    [_, made_token] = json.loads(out)
    assert made_token["detail"] == f"single-use, expires {joined['expires_at']}"
    datetime.fromisoformat(made_token["at"])


def test_a_node_is_removed_by_its_name_or_its_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdmesh.domain import DeviceInfo, NodeInfo

    _, out, _ = admin(capsys, tmp_path, "join-token", "--reusable")
    token = parse_token(out.strip(), JOIN_TOKEN)
    assert token is not None
    store = Store(f"sqlite:///{tmp_path / 'sdmesh.db'}")
    try:
        for node_id, name in (("gpu-a-1", "gpu-a"), ("twin-1", "twin"), ("twin-2", "twin")):
            store.credentials.enroll(token, node_id, name)
            store.nodes.upsert(
                NodeInfo(node_id, name, "host", "0.1.0", (DeviceInfo(0, "d", "u", "cpu", 1),), ())
            )
    finally:
        store.close()
    code, _, err = admin(capsys, tmp_path, "remove-node", "gpu-a")  # by name
    assert code == 0 and "node gpu-a-1 removed" in err
    code, _, err = admin(capsys, tmp_path, "remove-node", "twin")  # two nodes share it
    assert code == 2
    assert err == "error: NODE: 'twin' names several nodes (twin-1, twin-2); give the id\n"
    assert admin(capsys, tmp_path, "remove-node", "twin-2")[0] == 0  # by id


@pytest.mark.postgres
def test_postgres_urls_in_every_spelling_and_what_a_wrong_one_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from harness.processes import free_port
    from tests.databases import postgres_database

    with postgres_database() as url:
        for scheme in ("postgres", "postgresql", "postgresql+psycopg"):
            plain = scheme + "://" + url.split("://", 1)[1]
            code = run(["admin", "--db", plain, "create-key", "--user", scheme.replace("+", "-")])
            _, err = capsys.readouterr()
            assert code == 0, err
        name = url.rsplit("/", 1)[1]
        gone = url.replace(name, "no_such_database")
        assert run(["admin", "--db", gone, "list-keys"]) == 3
        _, err = capsys.readouterr()
        assert err.startswith(
            "error: PostgreSQL at 127.0.0.1:5432 has no database 'no_such_database'"
        )
        assert "createdb" in err and err.count("\n") == 1
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    assert run(["admin", "--db", down, "list-keys"]) == 3
    _, err = capsys.readouterr()
    assert "refused the connection: is PostgreSQL running there? check --db" in err
    with pytest.raises(SystemExit) as exited:
        run(["admin", "--db", "mysql://root:hunter2@db/x", "list-keys"])
    assert exited.value.code == 2
    _, err = capsys.readouterr()
    assert "mysql:// is not a database sdmesh supports" in err and "hunter2" not in err
