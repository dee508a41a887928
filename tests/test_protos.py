"""The committed generated code matches what `make protos` would write."""

from __future__ import annotations

from pathlib import Path

from protos.codegen import REPO_ROOT, generate, generated_files


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    fresh = {path.name: path.read_bytes() for path in generate(tmp_path)}
    committed = {path.name: path.read_bytes() for path in generated_files(REPO_ROOT)}
    assert sorted(fresh) == sorted(committed), "generated file set differs; run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code in protos/: {stale}; run `make protos`"


def test_the_contract_is_versioned() -> None:
    protos = sorted((REPO_ROOT / "protos").glob("*.proto"))
    assert [proto.name for proto in protos] == ["agent.proto", "common.proto", "scheduler.proto"]
    for proto in protos:
        assert "package sdmesh.v1;" in proto.read_text(), proto.name
