"""What this installation of sdmesh has, for the server commands: the
packages each extra brings (`pip install 'sdmesh[scheduler]'` for the
scheduler and `sdctl admin`, `[node]` for an agent), checked before a
server starts so that a missing one is one line saying what to install,
and where the servers keep their data by default."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

from client._errors import SdmeshError

_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class MissingExtra(SdmeshError):
    """A server command without the packages of its extra."""

    def __init__(self, command: str, extras: str, missing: str) -> None:
        super().__init__(
            f"`{command}` needs sdmesh's {extras} packages, which are not installed "
            f"({missing}): pip install 'sdmesh[{extras}]'"
        )


def _extra_packages(extra: str) -> list[str]:
    """The distributions `extra` asks for, as the installed metadata says
    (pyproject.toml declares them once); [] when sdmesh runs from a source
    tree without being installed."""
    try:
        requirements = metadata.requires("sdmesh") or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        found = _EXTRA_MARKER.search(marker)
        name = _NAME.match(spec.strip())
        if found and found.group(1) == extra and name and name.group() != "sdmesh":
            names.append(name.group())
    return names


def require(extras: str, command: str) -> None:
    """Raises MissingExtra when a package of one of `extras` ("scheduler",
    or "scheduler,node") is not installed."""
    for extra in extras.split(","):
        for name in _extra_packages(extra):
            try:
                metadata.version(name)
            except metadata.PackageNotFoundError:
                raise MissingExtra(command, extras, f"{name} is missing") from None


def missing_module(command: str, extras: str, error: ModuleNotFoundError) -> MissingExtra:
    """The same for an import that failed after all (a package removed by
    hand, or a source tree run without installing)."""
    return MissingExtra(command, extras, f"no module named {error.name!r}")


def default_data_dir(kind: str) -> Path:
    root = os.environ.get("SDMESH_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "sdmesh"
    )
    return Path(root) / kind
