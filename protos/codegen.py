"""Regenerates the Python code for the .proto files in this folder.

`make protos` writes it in place; the stale-code test writes it to a temporary
folder and compares. The generated modules import each other as
`from protos import common_pb2`, because protoc runs with the repository root
as its include path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generated_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "protos").iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(f"{name} not found next to {sys.executable}; install mypy-protobuf")
    return found


def generate(out_root: Path) -> list[Path]:
    """Writes the generated modules under out_root/protos and returns their paths."""
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p.relative_to(REPO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return generated_files(out_root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="root to write protos/ under")
    written = generate(parser.parse_args().out)
    print(f"generated {len(written)} files under {parser.parse_args().out / 'protos'}")


if __name__ == "__main__":
    main()
