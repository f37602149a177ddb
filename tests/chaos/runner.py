"""One chaos run: real node processes, one per network namespace, a fault injected in a chosen phase
into the coordinator or a worker, healed, and the recorded history judged by ``history.check``.

A run: make the namespaces; start ``n`` nodes in one of the ``TOPOLOGIES`` and a poller beside each;
wait for the phase (``formation``: a coordinator is known, no plan yet served; ``loading``: a plan is
committed and some node is not OPERATIONAL yet; ``operational``: every node serves); inject the fault
into the target for ``hold_s``; heal it; wait for every node to serve again; record a little longer;
stop everything and delete the namespaces, whatever happened.

Topologies: ``mesh`` (every node role coordinator, seeded with all the others, ``quorum_size = n``);
``1coord`` (the spec's start: node 1 role coordinator with no seeds, the others role worker seeded
with node 1 only, ``quorum_size = 3``: the coordinator and two workers vote, only the coordinator may
lead, and nobody can while it is down); ``2coord`` (nodes 1 and 2 role coordinator, the rest workers,
everyone but node 1 seeded with node 1 only, ``quorum_size = 3``: the other coordinator takes over).

Faults: ``kill`` (SIGKILL the node's supervisor, whose children die with it; restarted on heal),
``crash`` (the same, never restarted: the rest must carry on without it, or, when it was the only
coordinator-eligible node, serve nothing and say why),
``stop_node`` (SIGSTOP the supervisor and every child; SIGCONT on heal), ``stop_cluster_child`` /
``stop_loader_child`` / ``stop_engine_child`` (SIGSTOP one child; the supervisor kills it as hung after
``heartbeat_timeout_s`` and starts another), ``isolate`` (its link to the bridge down), ``drop_in`` (the
target stops receiving from one peer, nft, one way: the coordinator's packets for a worker, a
worker's for the coordinator).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.history import Bounds, Fault, History, check, load, recovery_time
from tests.chaos.netns import Topology
from tests.nodeharness import REPO, segments_of, write_config

FAULTS = (
    "kill",
    "crash",
    "stop_node",
    "stop_cluster_child",
    "stop_loader_child",
    "stop_engine_child",
    "isolate",
    "drop_in",
)
CHILD_STOPS = ("stop_cluster_child", "stop_loader_child", "stop_engine_child")
PHASES = ("formation", "loading", "operational")
TARGETS = ("coordinator", "worker")
TOPOLOGIES = ("mesh", "1coord", "2coord")
LEADERLESS_WATCH_S = 8.0
"""How long a run with no coordinator-eligible node left watches the rest (leases run out in ~3 s)."""
API_PORT = 8080
PEER_PORT = 7000


@dataclass(frozen=True)
class Scenario:
    fault: str
    target: str
    phase: str
    n: int = 3
    hold_s: float = 5.0
    seed: int = 0
    topology: str = "mesh"

    def __str__(self) -> str:
        shape = "" if self.topology == "mesh" else f"-{self.topology}"
        return f"{self.fault}-{self.target}-{self.phase}-n{self.n}{shape}-seed{self.seed}"

    def roles(self) -> list[str]:
        """Each node's configured role, node 1 first."""
        eligible = {"mesh": self.n, "1coord": 1, "2coord": 2}[self.topology]
        return ["coordinator" if i < eligible else "worker" for i in range(self.n)]

    def quorum(self) -> int:
        return self.n if self.topology == "mesh" else min(3, self.n)

    def seeds(self, i: int) -> list[int]:
        """The nodes (1-based) node ``i`` is seeded with."""
        if self.topology == "mesh":
            return [j for j in range(1, self.n + 1) if j != i]
        return [] if i == 1 else [1]


@dataclass
class Outcome:
    scenario: Scenario
    violations: list[str]
    recovery_s: float | None
    fault_phase_seen: str
    """The phase the cluster was really in when the fault struck (a fast phase can be missed)."""
    workdir: Path
    prefix: str
    """The run's namespace name prefix (all deleted at the end)."""
    history: History = field(repr=False, default_factory=lambda: History([]))


class _Node:
    def __init__(self, topo: Topology, i: int, node_id: str, config: Path) -> None:
        self.topo, self.i, self.node_id, self.config = topo, i, node_id, config
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        log = open(self.config.parent / f"node.{self.restarts}.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            self.topo.exec_argv(
                self.i, [sys.executable, "-m", "butterfly.cli.node", "--config", str(self.config)]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        log.close()
        self.restarts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tree(self) -> list[int]:
        """The supervisor and every process below it."""
        pids, frontier = [self.pid], [self.pid]
        while frontier:
            parent = frontier.pop()
            try:
                kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                pids.append(kid)
                frontier.append(kid)
        return pids

    def signal_tree(self, sig: int) -> None:
        for pid in self.tree():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal_tree(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.signal_tree(signal.SIGKILL)
            self.proc.wait(10)


class _Watch:
    """The latest answers of every node, read from the pollers' files as they grow."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.offsets = dict.fromkeys(files, 0)
        self.status: dict[str, dict[str, Any]] = {}
        self.ready: dict[str, int | None] = {}

    def refresh(self) -> None:
        for node, path in self.files.items():
            try:
                with path.open("rb") as f:
                    f.seek(self.offsets[node])
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            self.offsets[node] += end
            for line in data[:end].splitlines():
                raw = json.loads(line)
                if raw["kind"] == "status" and raw["code"] == 200 and raw["body"]:
                    self.status[node] = raw["body"]
                elif raw["kind"] == "ready":
                    self.ready[node] = raw["code"]

    def coordinator(self) -> str | None:
        named = [s.get("coordinator") for s in self.status.values() if s.get("coordinator")]
        return max(set(named), key=named.count) if named else None

    def wait(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.refresh()
            if predicate(self):
                return True
            time.sleep(0.05)
        return False


def _phase_reached(phase: str, nodes: list[str]) -> Any:
    def formation(w: _Watch) -> bool:
        return w.coordinator() is not None

    def loading(w: _Watch) -> bool:
        states = [w.status.get(n, {}) for n in nodes]
        planned = any(int(s.get("epoch") or 0) > 0 for s in states)
        return planned and any(s.get("state") != "OPERATIONAL" for s in states) or operational(w)

    def operational(w: _Watch) -> bool:
        return all(w.ready.get(n) == 200 for n in nodes)

    return {"formation": formation, "loading": loading, "operational": operational}[phase]


def _phase_now(w: _Watch, nodes: list[str]) -> str:
    if all(w.ready.get(n) == 200 for n in nodes):
        return "operational"
    if any(int(w.status.get(n, {}).get("epoch") or 0) > 0 for n in nodes):
        return "loading"
    return "formation" if w.coordinator() else "discovery"


def _child_pid(w: _Watch, node: str, name: str) -> int | None:
    for child in w.status.get(node, {}).get("children") or []:
        if child.get("name") == name and child.get("alive") and child.get("pid"):
            return int(child["pid"])
    return None


def run(
    scenario: Scenario,
    workdir: Path,
    model_dir: Path,
    secret: Path,
    bounds: Bounds | None = None,
    *,
    start_timeout_s: float = 120.0,
) -> Outcome:
    bounds = bounds or Bounds()
    rng = random.Random(scenario.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    topo = Topology(scenario.n)
    tag = f"x{os.getpid() % 10000}{time.monotonic_ns() % 10000:04d}"
    ids = [f"{tag}-n{i}" for i in range(1, scenario.n + 1)]
    nodes: dict[str, _Node] = {}
    pollers: list[subprocess.Popen[bytes]] = []
    files = {node_id: workdir / f"{node_id}.answers" for node_id in ids}
    roles = dict(zip(ids, scenario.roles(), strict=True))
    history = History(nodes=ids, roles=roles, topology=scenario.topology)
    watch = _Watch(files)
    seen_phase = "none"
    try:
        topo.create()
        for i, node_id in enumerate(ids, start=1):
            d = workdir / node_id
            d.mkdir(exist_ok=True)
            config = write_config(
                d / "node.toml",
                model_dir,
                node_id=node_id,
                api_port=API_PORT,
                quorum=scenario.quorum(),
                role=roles[node_id],
                secret=secret,
                bind=f"{topo.address(i)}:{PEER_PORT}",
                seeds=[f"{topo.address(j)}:{PEER_PORT}" for j in scenario.seeds(i)],
            )
            nodes[node_id] = _Node(topo, i, node_id, config)
        for i, node_id in enumerate(ids, start=1):
            poller = [sys.executable, "-m", "tests.chaos.poller", "--port", str(API_PORT)]
            poller += ["--node", node_id, "--out", str(files[node_id])]
            pollers.append(subprocess.Popen(topo.exec_argv(i, poller), cwd=REPO))
        for node in nodes.values():
            node.start()
        if not watch.wait(_phase_reached(scenario.phase, ids), start_timeout_s):
            raise RuntimeError(f"{scenario}: the cluster never reached {scenario.phase}")
        seen_phase = _phase_now(watch, ids)
        coordinator = watch.coordinator() or ids[0]
        workers = [n for n in ids if n != coordinator]
        target = coordinator if scenario.target == "coordinator" else rng.choice(workers)
        peer = rng.choice(workers if target == coordinator else [coordinator])
        node = nodes[target]
        hold = scenario.hold_s * rng.uniform(0.6, 1.4)
        t0 = time.monotonic()
        stopped: int | None = None
        if scenario.fault in ("kill", "crash"):
            os.kill(node.pid, signal.SIGKILL)
        elif scenario.fault == "stop_node":
            node.signal_tree(signal.SIGSTOP)
        elif scenario.fault in CHILD_STOPS:
            kind = scenario.fault.split("_")[1]
            # At a node's start the cluster child comes first: the loader may still be starting.
            watch.wait(lambda w: _child_pid(w, target, kind) is not None, 15)
            stopped = _child_pid(watch, target, kind)
            if stopped is None:
                raise RuntimeError(f"{scenario}: {target} has no live {scenario.fault} to stop")
            os.kill(stopped, signal.SIGSTOP)
        elif scenario.fault == "isolate":
            topo.link(topo_index(ids, target), up=False)
        elif scenario.fault == "drop_in":
            topo.drop_from(topo_index(ids, target), topo_index(ids, peer))
        else:
            raise ValueError(f"unknown fault {scenario.fault!r}")
        time.sleep(hold)
        if scenario.fault == "kill":
            assert node.proc is not None
            node.proc.wait(10)
            node.start()  # as systemd would; the killed run's shared memory is still there to reclaim
        elif scenario.fault == "crash":
            assert node.proc is not None
            node.proc.wait(10)
        elif scenario.fault == "stop_node":
            node.signal_tree(signal.SIGCONT)
        elif stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the supervisor killed the hung child meanwhile
        elif scenario.fault == "isolate":
            topo.link(topo_index(ids, target), up=True)
        elif scenario.fault == "drop_in":
            topo.heal_drops(topo_index(ids, target))
        t1 = time.monotonic()
        fault = Fault(scenario.fault, target, t0, t1, peer if scenario.fault == "drop_in" else None, stopped)
        history.faults.append(fault)
        history.healed_at = t1
        live = [n for n in ids if not (scenario.fault == "crash" and n == target)]
        if history.leaderless():
            time.sleep(LEADERLESS_WATCH_S)  # nothing to wait for: watch them serve nothing, saying why
        else:
            watch.wait(_phase_reached("operational", live), bounds.recover_bound_s + 5.0)
        time.sleep(1.5)
        history.ended_at = time.monotonic()
        if scenario.fault == "crash":  # never healed: the fault lasts the whole history
            history.faults[-1] = dataclasses.replace(fault, t1=history.ended_at)
    finally:
        for p in pollers:
            p.send_signal(signal.SIGTERM)
        for node in nodes.values():
            try:
                node.stop()
            except (OSError, subprocess.TimeoutExpired):
                pass
        for p in pollers:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        topo.close()
        for node_id in ids:
            for seg in segments_of(node_id):
                Path("/dev/shm", seg).unlink(missing_ok=True)
    history.save(workdir / "history.json")
    full = load(workdir / "history.json", list(files.values()))
    return Outcome(scenario, check(full, bounds), recovery_time(full), seen_phase, workdir, topo.prefix, full)


def topo_index(ids: list[str], node_id: str) -> int:
    return ids.index(node_id) + 1
