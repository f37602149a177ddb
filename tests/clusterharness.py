"""Starts several real butterfly-node processes on 127.0.0.x as one cluster."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from tests.nodeharness import Node, free_port, segments_of, write_config


class Cluster:
    def __init__(
        self,
        root: Path,
        model: Path,
        secret: Path,
        n: int,
        *,
        quorum: int,
        env: dict[str, str] | None = None,
        roles: list[str] | None = None,
        heartbeat_timeout_s: float = 3.0,
    ) -> None:
        self.root = root
        self.model = model
        self.secret = secret
        self.quorum = quorum
        self.env = env or {}
        stamp = f"{int(time.time() * 1000) % 100000:05d}"
        # Ids sort in start order: the bootstrap voters are the quorum_size lowest ids.
        self.ids = [f"c{stamp}-n{i}" for i in range(n)]
        self.addrs = [f"127.0.0.{i + 1}:{free_port()}" for i in range(n)]
        self.api_ports = [free_port() for _ in range(n)]
        self.roles = roles or ["coordinator"] * n
        # Tests that are not about hung children raise it: a busy machine starts a child slowly.
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.nodes: dict[str, Node] = {}
        # Set to (srv_name, "127.0.0.1:port") to find peers through DNS SRV instead of seed lists.
        self.dns: tuple[str, str] | None = None
        # Per-node model directories (index -> dir), e.g. one node holding another model version.
        self.models: dict[int, Path] = {}
        # Per-node seed lists (index -> the indices it is seeded with); by default every other node.
        self.seeded_with: dict[int, list[int]] = {}

    def config(self, i: int) -> Path:
        d = self.root / self.ids[i]
        d.mkdir(exist_ok=True)
        seeds = [
            self.addrs[j] for j in self.seeded_with.get(i, [j for j in range(len(self.addrs)) if j != i])
        ]
        path = write_config(
            d / "node.toml",
            self.models.get(i, self.model),
            node_id=self.ids[i],
            api_port=self.api_ports[i],
            quorum=self.quorum,
            role=self.roles[i],
            secret=self.secret,
            bind=self.addrs[i],
            seeds=[] if self.dns else seeds,
        )
        text = path.read_text()
        path.write_text(
            text.replace("heartbeat_timeout_s = 3.0", f"heartbeat_timeout_s = {self.heartbeat_timeout_s}")
        )
        if self.dns:
            name, server = self.dns
            text = path.read_text().replace(
                'discovery_method = "static"',
                f'discovery_method = "dns"\ndns_srv_name = "{name}"\ndns_servers = ["{server}"]\n'
                f'discovery_interval_s = 0.5\nfounder = "{min(self.addrs)}"',
            )
            path.write_text(text)
        return path

    def start(self, i: int) -> Node:
        node = Node(self.config(i), self.api_ports[i], env=self.env)
        self.nodes[self.ids[i]] = node
        return node

    def start_all(self, order: list[int] | None = None) -> None:
        for i in order or range(len(self.ids)):
            self.start(i)

    def alive(self) -> dict[str, Node]:
        return {k: n for k, n in self.nodes.items() if n.proc.poll() is None}

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {k: n.status() for k, n in self.alive().items()}

    def wait(self, pred: Any, timeout: float = 60.0, what: str = "cluster condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.statuses()
            if all(s is not None for s in last.values()) and pred(last):
                return last
            time.sleep(0.1)
        logs = "\n".join(f"--- {k}\n{n.log()[-3000:]}" for k, n in self.nodes.items())
        summary = {k: (s or {}).get("state") for k, s in last.items()}
        raise AssertionError(f"timed out waiting for {what}: {summary}\n{logs}")

    def wait_operational(self, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait(
            lambda st: all(s["state"] == "OPERATIONAL" for s in st.values()),
            timeout,
            "every live node OPERATIONAL",
        )

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        self.nodes[node_id].stop(sig)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.stop(signal.SIGTERM)
        for node_id in self.ids:
            for seg in segments_of(node_id):
                Path("/dev/shm", seg).unlink(missing_ok=True)
