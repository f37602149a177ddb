"""Coordinator failover with real processes: SIGKILL the coordinator -> a new coordinator commits.

Run: ``python bench/bench_failover.py [--runs 100] [--sizes 3,5,7] [--json FILE]``. Prints p50/p90/p99/
max per cluster size against the goal (failover p99 <= 1.0 s) and writes every sample to ``--json``
(default ``out/bench_failover.json``, ignored by git).

What runs: N member processes (``python bench/bench_failover.py --member ...``), each one production
``ClusterDriver`` (role coordinator, quorum_size N) with its own real ``Transport`` on 127.0.0.(i+1)
(fixed free port, one generated cluster secret) and its own state dir (real ``RaftStorage``, fsync'd).
What is left out of a ``butterfly-node``: the supervisor and the loader/validator children (the model
is "unavailable", so the coordinator plans nothing); the consensus, transport, timers and disk are the
production ones. Each member prints a JSON line, stamped with CLOCK_MONOTONIC (one clock for every
process on the host), when its view of (term, leader) changes and when, as leader, it first commits an
entry of its own term (its no-op: the moment it can commit plans).

One run: the cluster is stable (every member follows one leader that has committed in its term); after
a further 0.1-0.2 s (random, so the kill lands anywhere in the heartbeat cycle) the parent SIGKILLs the
leader's process. failover = kill -> another member, leader at a higher term, has committed an entry of
that term. detect = kill -> the first survivor that has no leader or a new one. The killed member is
restarted from its state dir (same id, address and Raft log) and the next run waits until all N follow
one committed leader again. The cluster is formed once per size; every process and directory is removed
at the end.

``--node-death RUNS`` (real ``butterfly-node`` processes, ``tests.clusterharness.Cluster``): 4 nodes,
quorum_size 3, all coordinators, on bench_cluster's generated 16-layer test model (~106 MiB), /status
polled every 50 ms. Each run: every node OPERATIONAL; SIGKILL one node that is not the coordinator
(in turn a voter and the learner); replan = kill -> every survivor OPERATIONAL again at a later epoch;
then the node is restarted and rejoin = restart -> all 4 OPERATIONAL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL_FAILOVER_P99_S = 1.0
CLUSTER_NAME = "bench"
STABLE_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 10.0


# --- the member process ---------------------------------------------------------------------------------


def member_main(args: argparse.Namespace) -> None:
    from butterfly.cluster.coordinator import ModelInfo
    from butterfly.cluster.driver import ClusterDriver, Progress, choose_founder
    from butterfly.cluster.messages import NodeReport, PlanEntry
    from butterfly.cluster.process import NetAdapter
    from butterfly.config import HostPort
    from butterfly.ipc import PeerFault
    from butterfly.net.auth import load_secret
    from butterfly.net.transport import Transport
    from butterfly.raft import Role

    addrs = [HostPort(h, int(p)) for h, p in (a.rsplit(":", 1) for a in args.addrs.split(","))]
    ids = [f"n{i}" for i in range(len(addrs))]
    me = args.member
    node_id = ids[me]

    def say(**fields: Any) -> None:
        print(json.dumps({"t": time.monotonic(), "node": node_id, **fields}), flush=True)

    class Events:
        def __init__(self) -> None:
            self.view: tuple[int, str] = (0, "")

        async def progress(self, p: Progress) -> None:
            return None

        async def plan(self, plan: PlanEntry, term: int) -> bool:
            return True

        async def operational(self, epoch: int, term: int) -> None:
            return None

        async def validation_rejected(self, epoch: int, reason: str) -> None:
            return None

        async def range_accepted(self, epoch: int) -> None:
            return None

        async def waiting(self, reason: str) -> None:
            return None

        async def peer_faults(self, faults: list[PeerFault]) -> None:
            return None

        async def plan_applied(self, plan: PlanEntry) -> None:
            return None

        def board(self, **fields: object) -> None:
            term, leader = fields.get("term"), fields.get("coordinator")
            if isinstance(term, int) and isinstance(leader, str) and (term, leader) != self.view:
                self.view = (term, leader)
                say(ev="view", term=term, leader=leader)

    class Driver(ClusterDriver):
        committed_term = 0

        async def _process_ready(self) -> None:
            await super()._process_ready()
            raft = self.raft
            if (
                raft is not None
                and raft.role is Role.LEADER
                and raft.term > self.committed_term
                and raft.log_term(raft.commit) == raft.term
            ):
                self.committed_term = raft.term
                say(ev="committed", term=raft.term)

    async def no_model() -> ModelInfo:
        raise RuntimeError("no model in the failover bench")

    report = NodeReport(node_id, CLUSTER_NAME, "coordinator", 16 << 30, 1.0)

    async def main() -> None:
        transport = Transport(node_id, load_secret(Path(args.secret)), addrs[me], cluster_name=CLUSTER_NAME)
        await transport.start()
        transport.set_peers({a: ids[j] for j, a in enumerate(addrs) if j != me})
        driver = Driver(
            node_id=node_id,
            cluster_name=CLUSTER_NAME,
            role="coordinator",
            quorum_size=len(addrs),
            state_dir=Path(args.root) / node_id,
            net=NetAdapter(transport),
            events=Events(),
            local_report=lambda: report,
            load_model=no_model,
            reserve_bytes=0,
        )
        driver.is_founder, driver.founder = choose_founder("static", tuple(addrs), None, addrs[me])

        async def follow_cluster_id() -> None:
            while True:  # as the cluster child's discovery loop does
                if driver.raft is not None and driver.raft.cluster_id:
                    transport.set_cluster_id(driver.raft.cluster_id)
                    return
                await asyncio.sleep(0.05)

        say(ev="started")
        await asyncio.gather(driver.run(), follow_cluster_id())

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# --- the parent -----------------------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Member:
    def __init__(self, i: int, argv: list[str], events: queue.Queue[dict[str, Any]]) -> None:
        self.i = i
        self.node_id = f"n{i}"
        self.argv = argv
        self.events = events
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO
        )
        proc = self.proc
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["pid"] = proc.pid
            self.events.put(ev)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class Cluster:
    """The parent's view, folded from the members' events."""

    def __init__(self, members: list[Member], events: queue.Queue[dict[str, Any]]) -> None:
        self.members = members
        self.events = events
        self.views: dict[str, tuple[int, str]] = {}
        self.committed: dict[int, tuple[str, float]] = {}
        self.pids = {m.node_id: m.proc.pid for m in members if m.proc is not None}
        self.log: list[dict[str, Any]] = []

    def pump(self, timeout: float) -> None:
        try:
            ev = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        if ev.get("pid") != self.pids.get(ev["node"]):
            return  # a line from a process killed since
        self.log.append(ev)
        if ev["ev"] == "view":
            self.views[ev["node"]] = (ev["term"], ev["leader"])
        elif ev["ev"] == "committed":
            self.committed.setdefault(ev["term"], (ev["node"], ev["t"]))

    def stable(self) -> tuple[int, str] | None:
        """(term, leader) when every member follows one leader that committed in its term."""
        views = {self.views.get(m.node_id) for m in self.members}
        if len(views) != 1:
            return None
        view = views.pop()
        if view is None or not view[1] or view[0] not in self.committed:
            return None
        return view

    def wait(self, cond: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: views {self.views}")
            self.pump(min(left, 0.05))


@dataclass
class SizeResult:
    n: int
    failover_s: list[float] = field(default_factory=list)
    detect_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    form_s: float = 0.0


def bench_size(n: int, runs: int, secret_file: Path, progress: bool) -> SizeResult:
    res = SizeResult(n)
    root = Path(tempfile.mkdtemp(prefix=f"bench-failover{n}-"))
    addrs = [f"127.0.0.{i + 1}:{free_port(f'127.0.0.{i + 1}')}" for i in range(n)]
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    members: list[Member] = []
    try:
        t0 = time.monotonic()
        for i in range(n):
            argv = [sys.executable, __file__, "--member", str(i), "--addrs", ",".join(addrs)]
            argv += ["--root", str(root), "--secret", str(secret_file)]
            members.append(Member(i, argv, events))
        cluster = Cluster(members, events)
        cluster.wait(cluster.stable, STABLE_TIMEOUT_S, "formation")
        res.form_s = time.monotonic() - t0
        for run in range(runs):
            term, leader = cluster.wait(cluster.stable, STABLE_TIMEOUT_S, "stable before a kill")
            # Let heartbeats flow, and land the kill anywhere in the heartbeat cycle.
            end = time.monotonic() + 0.1 + random.uniform(0.0, 0.1)
            while time.monotonic() < end:
                cluster.pump(max(0.0, end - time.monotonic()))
            if cluster.stable() != (term, leader):
                continue  # leadership moved on its own: not a kill sample
            victim = next(m for m in members if m.node_id == leader)
            t_kill = time.monotonic()
            victim.kill()
            del cluster.views[leader]

            def failed_over(term: int = term, leader: str = leader) -> tuple[str, float] | None:
                for t, (node, when) in cluster.committed.items():
                    if t > term and node != leader:
                        return node, when
                return None

            try:
                _, t_commit = cluster.wait(failed_over, FAILOVER_TIMEOUT_S, "a new leader committing")
            except TimeoutError as e:
                res.errors.append(str(e))
            else:
                res.failover_s.append(t_commit - t_kill)
                moved = [
                    ev["t"]
                    for ev in cluster.log
                    if ev["ev"] == "view" and ev["t"] >= t_kill and ev["node"] != leader
                ]
                if moved:
                    res.detect_s.append(min(moved) - t_kill)
            victim.start()
            assert victim.proc is not None
            cluster.pids[leader] = victim.proc.pid
            if progress:
                last = f"{res.failover_s[-1]:.3f}" if res.failover_s else "-"
                print(f"  {n} nodes run {run + 1}/{runs}: failover {last} s", file=sys.stderr, flush=True)
        return res
    finally:
        for m in members:
            m.kill()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class DeathRun:
    victim: str = ""
    was_voter: bool = False
    stop_s: float | None = None
    replan_s: float | None = None
    rejoin_s: float | None = None
    error: str = ""


def node_death_bench(runs: int, progress: bool) -> list[DeathRun]:
    from bench.bench_cluster import make_model
    from butterfly.config import SupervisorConfig
    from tests.clusterharness import Cluster
    from tests.nodeharness import segments_of

    root = Path(tempfile.mkdtemp(prefix="bench-death-"))
    out: list[DeathRun] = []

    class BenchCluster(Cluster):
        def config(self, i: int) -> Path:  # the production child watchdog (see bench_cluster)
            path = super().config(i)
            default = SupervisorConfig().heartbeat_timeout_s
            path.write_text(
                path.read_text().replace("heartbeat_timeout_s = 3.0", f"heartbeat_timeout_s = {default}")
            )
            return path

    from butterfly.net.auth import generate_secret

    secret = root / "cluster.key"
    generate_secret(secret)
    model = make_model(root)
    cluster = BenchCluster(root, model, secret, 4, quorum=3)

    def statuses() -> dict[str, dict[str, Any] | None]:
        return {k: n.status() for k, n in cluster.alive().items()}

    def wait(pred: Any, timeout: float) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = statuses()
            t = time.monotonic()
            if all(v is not None for v in st.values()) and pred(st):
                return t, st
            time.sleep(0.05)
        raise TimeoutError(f"states { ({k: (v or {}).get('state') for k, v in statuses().items()}) }")

    def all_operational(st: dict[str, Any], after: int = 0) -> bool:
        return all(v["state"] == "OPERATIONAL" and v["epoch"] > after for v in st.values())

    try:
        cluster.start_all()
        wait(all_operational, 120.0)
        for r in range(runs):
            res = DeathRun()
            try:
                _, st = wait(all_operational, 60.0)
                coord = next(iter(st.values()))["coordinator"]
                epoch = max(v["epoch"] for v in st.values())
                candidates = [k for k in cluster.ids if k != coord]
                res.victim = candidates[r % len(candidates)]
                voters = sorted(cluster.ids)[:3]
                res.was_voter = res.victim in voters
                t_kill = time.monotonic()
                cluster.kill(res.victim)
                deadline = t_kill + 60.0
                while True:  # one poll loop for both ends: a fast re-plan must not hide the stop
                    st = statuses()
                    t = time.monotonic()
                    seen = [v for v in st.values() if v is not None]
                    if res.stop_s is None and any(v["state"] != "OPERATIONAL" for v in seen):
                        res.stop_s = t - t_kill
                    if len(seen) == len(st) and all_operational(st, epoch):
                        res.replan_s = t - t_kill
                        break
                    if t > deadline:
                        states = {k: (v or {}).get("state") for k, v in st.items()}
                        raise TimeoutError(f"not OPERATIONAL again: {states}")
                    time.sleep(0.05)
                t_restart = time.monotonic()
                cluster.start(cluster.ids.index(res.victim))
                t_all, _ = wait(lambda st: len(st) == 4 and all_operational(st), 90.0)
                res.rejoin_s = t_all - t_restart
            except Exception as e:
                res.error = f"{type(e).__name__}: {e}"
                if res.victim and res.victim not in cluster.alive():
                    cluster.start(cluster.ids.index(res.victim))
            out.append(res)
            if progress:
                print(f"  node death run {r + 1}/{runs}: {res}", file=sys.stderr, flush=True)
        return out
    finally:
        cluster.stop_all()
        for node_id in cluster.ids:
            for seg in segments_of(node_id):
                Path("/dev/shm", seg).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--member", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--addrs", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--secret", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--sizes", default="3,5,7")
    ap.add_argument("--json", default=str(REPO / "out" / "bench_failover.json"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--node-death", type=int, default=0, metavar="RUNS", help="node death runs (real nodes)")
    args = ap.parse_args()
    if args.member is not None:
        member_main(args)
        return
    if args.node_death:
        deaths = node_death_bench(args.node_death, not args.quiet)
        print(f"\n{'seconds':<40} {'runs':>4} {'p50':>7} {'p90':>7} {'max':>7}")
        for name, key in (
            ("kill -> a survivor stops serving", "stop_s"),
            ("kill -> survivors OPERATIONAL again", "replan_s"),
            ("restart -> all 4 OPERATIONAL", "rejoin_s"),
        ):
            values = [v for d in deaths if (v := getattr(d, key)) is not None]
            if values:
                print(
                    f"  {name:<38} {len(values):>4} {pct(values, 50):>7.3f} {pct(values, 90):>7.3f} "
                    f"{max(values):>7.3f}"
                )
        for d in deaths:
            print(f"  {d}")
        return

    from butterfly.cluster.driver import ELECTION_JITTER_TICKS, ELECTION_TICKS, HEARTBEAT_TICKS, TICK_S
    from butterfly.net.auth import generate_secret

    sizes = [int(s) for s in args.sizes.split(",")]
    load0 = os.getloadavg()[0]
    print(
        f"bench_failover: sizes {sizes}, {args.runs} kills each; TICK_S {TICK_S}, ELECTION_TICKS "
        f"{ELECTION_TICKS} (+ jitter < {ELECTION_JITTER_TICKS}), HEARTBEAT_TICKS {HEARTBEAT_TICKS}; "
        f"{os.cpu_count()} CPUs, load average {load0:.1f}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-failover-secret-"))
    results: list[SizeResult] = []
    t0 = time.monotonic()
    try:
        secret = tmp / "cluster.key"
        generate_secret(secret)
        for n in sizes:
            results.append(bench_size(n, args.runs, secret, not args.quiet))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'seconds':<40} {'runs':>4} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  goal")
    for r in results:
        print(f"{r.n} member processes (formed in {r.form_s:.2f} s)")
        for name, values, goal in (
            ("failover (SIGKILL -> new leader commits)", r.failover_s, GOAL_FAILOVER_P99_S),
            ("detect (SIGKILL -> a survivor moves)", r.detect_s, None),
        ):
            if not values:
                print(f"  {name:<38} (no samples)")
                continue
            verdict = f"p99 <= {goal:g}s: {'PASS' if pct(values, 99) <= goal else 'MISS'}" if goal else ""
            print(
                f"  {name:<38} {len(values):>4} {pct(values, 50):>7.3f} {pct(values, 90):>7.3f} "
                f"{pct(values, 99):>7.3f} {max(values):>7.3f}  {verdict}"
            )
        if r.errors:
            print(f"  {len(r.errors)} run(s) without a new leader committing within {FAILOVER_TIMEOUT_S:g} s")
    print(f"total {time.monotonic() - t0:.0f} s; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "results": [asdict(r) for r in results],
                "summary": {
                    r.n: {"mean": statistics.fmean(r.failover_s)} if r.failover_s else {} for r in results
                },
            },
            indent=1,
        )
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
