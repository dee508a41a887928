"""Network partitions for tests: a Linux network namespace joined to the root
namespace by a veth pair on its own 10.213.x.y/30 subnet. Run a process in it
with `command(argv)`; `partition()` then drops every packet both ways,
silently, until `heal()`.

A process inside reaches a server in the root namespace at `host_ip`, so that
server must listen on 0.0.0.0 or host_ip, not 127.0.0.1: inside the namespace
127.0.0.1 is the namespace's own loopback. Likewise a server inside is reached
at `ns_ip`. Needs root and iproute2."""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

POOL = ipaddress.IPv4Network("10.213.0.0/16")
LOCK_FILE = "/tmp/sdmesh-netns.lock"
_counter = itertools.count()


def _run(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


@contextmanager
def _locked() -> Iterator[None]:
    """Serializes picking subnets and names across processes on this host."""
    with open(LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep_stale() -> None:
    """Deletes namespaces left behind by test processes that have died."""
    for line in _run("ip", "netns", "list").splitlines():
        match = re.match(r"(sdm-(\d+)-\d+)\b", line)
        if match and not _pid_alive(int(match[2])):
            _delete(match[1], f"sdm{match[1][4:]}")


def _delete(name: str, host_veth: str) -> None:
    for pid in _run("ip", "netns", "pids", name, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)  # else the namespace outlives `netns del`
        except (ProcessLookupError, ValueError):
            pass
    _run("ip", "link", "del", host_veth, check=False)
    _run("ip", "netns", "del", name, check=False)


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    addresses = re.findall(r"\binet (\S+)", _run("ip", "-4", "-o", "addr"))
    taken = [ipaddress.ip_interface(address).network for address in addresses]
    subnets = list(POOL.subnets(new_prefix=30))
    for offset in range(len(subnets)):
        subnet = subnets[(seed + offset) % len(subnets)]
        if not any(subnet.overlaps(net) for net in taken):
            return subnet
    raise RuntimeError(f"no free /30 left in {POOL}")


class NetworkNamespace:
    """A namespace `name` with address `ns_ip`, joined to the root namespace
    (address `host_ip`) by a veth pair; a context manager."""

    NS_VETH = "veth0"

    def __init__(self) -> None:
        pid, n = os.getpid(), next(_counter)
        self.name = f"sdm-{pid}-{n}"
        self.host_veth = f"sdm{pid}-{n}"  # interface names have at most 15 characters
        self.host_ip = self.ns_ip = ""
        with _locked():
            sweep_stale()
            _delete(self.name, self.host_veth)
            try:
                self._create(_free_subnet(pid * 31 + n))
            except BaseException:
                _delete(self.name, self.host_veth)
                raise

    def _create(self, subnet: ipaddress.IPv4Network) -> None:
        host, inside = (str(ip) for ip in subnet.hosts())
        index = (int(subnet.network_address) - int(POOL.network_address)) // 4
        host_mac, ns_mac = (f"02:53:44:{index >> 8:02x}:{index & 255:02x}:0{e}" for e in "12")
        _run("ip", "netns", "add", self.name)
        _run(
            "ip", "link", "add", self.host_veth, "address", host_mac, "type", "veth",
            "peer", "name", self.NS_VETH, "address", ns_mac, "netns", self.name,
        )  # fmt: skip
        _run("ip", "-n", self.name, "link", "set", "lo", "up")
        for (ip, dev), own_ip, peer_ip, peer_mac in zip(
            self._ends("ip"), (host, inside), (inside, host), (ns_mac, host_mac), strict=True
        ):
            _run(*ip, "addr", "add", f"{own_ip}/30", "dev", dev)
            _run(*ip, "link", "set", dev, "up")
            # Static neighbours: a partition must not turn into ARP failures,
            # which the kernel reports to sockets as "No route to host".
            _run(
                *ip, "neigh", "replace", peer_ip, "lladdr", peer_mac, "dev", dev, "nud", "permanent"
            )
        _run("ip", "-n", self.name, "route", "add", "default", "via", host)
        self.host_ip, self.ns_ip = host, inside

    def _ends(self, tool: str) -> list[tuple[list[str], str]]:
        """The command prefix and device name for each end of the veth pair."""
        return [([tool], self.host_veth), ([tool, "-n", self.name], self.NS_VETH)]

    def command(self, argv: list[str]) -> list[str]:
        """argv, run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def partition(self) -> None:
        """Drops every packet both ways, silently: a blackhole qdisc on both
        veth ends discards packets yet tells the sender they were sent, so
        there are no resets or ICMP errors and TCP just keeps retransmitting."""
        for tc, dev in self._ends("tc"):
            _run(*tc, "qdisc", "replace", "dev", dev, "root", "blackhole")

    def heal(self) -> None:
        """Lets packets through again; retransmissions then get through."""
        for tc, dev in self._ends("tc"):
            _run(*tc, "qdisc", "del", "dev", dev, "root", check=False)

    def close(self) -> None:
        """Kills any process left inside, then deletes the namespace and veth."""
        _delete(self.name, self.host_veth)

    def __enter__(self) -> NetworkNamespace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@functools.cache
def available() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` binary (iproute2)"
    try:
        with NetworkNamespace() as netns:
            netns.partition()
            netns.heal()
    except (RuntimeError, OSError) as exc:
        return f"cannot make a network namespace: {exc}"
    return None
