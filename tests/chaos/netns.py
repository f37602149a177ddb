"""Hosts on one machine, each in its own network namespace, wired to a bridge in a namespace of its
own (so nothing touches the host's network), and the faults the chaos suite injects into them.

Names carry a per-run prefix so concurrent runs (and other suites) never collide, and ``close()``
deletes every namespace it made, also when a run fails. Needs root, iproute2 and, for one-way drops,
nftables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field


class NetnsUnavailable(RuntimeError):
    """This machine cannot host the chaos suite (not root, or ip/nft missing)."""


def require_netns(*, nft: bool = True) -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool in ("ip", "nft") if nft else ("ip",):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` is not installed (apt-get install iproute2 nftables)")


def _run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), input=input, text=True, capture_output=True, check=check, timeout=30)


@dataclass
class Topology:
    """``n`` hosts ``<prefix>-h1..n`` at ``10.<subnet>.0.1..n``/24 on a bridge in ``<prefix>-sw``."""

    n: int
    prefix: str = field(default_factory=lambda: f"bfc{os.getpid() % 100000}-{time.monotonic_ns() % 10000}")
    subnet: int = 77
    made: list[str] = field(default_factory=list)

    def host(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def address(self, i: int) -> str:
        return f"10.{self.subnet}.0.{i}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def create(self) -> None:
        sw = self.switch
        _run("ip", "netns", "add", sw)
        self.made.append(sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for i in range(1, self.n + 1):
            ns = self.host(i)
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            _run(
                "ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", sw
            )
            _run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0")
            _run("ip", "-n", sw, "link", "set", f"p{i}", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``i`` (``ip netns exec`` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.host(i), *argv]

    # ---- faults ----------------------------------------------------------------------------------

    def link(self, i: int, up: bool) -> None:
        """Cut host ``i`` off the bridge (both directions), or restore it."""
        _run("ip", "-n", self.switch, "link", "set", f"p{i}", "up" if up else "down")

    def drop_from(self, i: int, j: int) -> None:
        """Host ``i`` stops receiving anything from host ``j`` (one way: ``j`` still hears ``i``)."""
        rules = (
            "table inet chaos {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
            f"  ip saddr {self.address(j)} drop\n }}\n}}\n"
        )
        _run("ip", "netns", "exec", self.host(i), "nft", "-f", "-", input=rules)

    def heal_drops(self, i: int) -> None:
        _run("ip", "netns", "exec", self.host(i), "nft", "delete", "table", "inet", "chaos", check=False)

    def close(self) -> None:
        """Kill whatever still runs in the namespaces and delete them all."""
        for ns in reversed(self.made):
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.made):
            _run("ip", "netns", "del", ns, check=False)
        self.made.clear()
