"""Faults while serving: every /ready answer during the fault is recorded and checked against the rule.

Real node processes on 127.0.0.x. A poller per node asks /ready as fast as it can and keeps each
answer with when its request left. The rule (butterfly.gate): once a fault makes serving unsafe, a
request sent later than the fault plus the documented bound must not get 200; a node serves again
only for an epoch the cluster committed after the fault.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from butterfly.cluster.driver import CYCLE_S, PROMISE_S, SILENT_STOPS_SERVING_S
from tests.clusterharness import Cluster

# A Raft message already in flight when the fault struck can land (and be processed) a little later
# on a busy machine; its promise counts from then. Generous on purpose: the checks are about safety.
SLACK_S = 0.3

Factory = Callable[..., Cluster]


@dataclass(frozen=True)
class Answer:
    node: str
    sent: float
    code: int | None  # None: no answer (node frozen or gone)
    epoch: int
    term: int


class ReadyLog:
    """One thread per node polls /ready and records every answer until ``close``."""

    def __init__(self, c: Cluster, nodes: list[str]) -> None:
        self.c = c
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(n,), daemon=True) for n in nodes]
        for t in self._threads:
            t.start()

    def _poll(self, node: str) -> None:
        url = self.c.nodes[node].url + "/ready"
        while not self._stop.is_set():
            sent = time.monotonic()
            code, doc = None, {}
            try:
                with urllib.request.urlopen(url, timeout=0.5) as r:
                    code, doc = r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                code, doc = e.code, json.loads(e.read() or b"{}")
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.01)
            with self._lock:
                self.answers.append(
                    Answer(node, sent, code, int(doc.get("epoch", 0)), int(doc.get("term", 0)))
                )

    def close(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join()
        return list(self.answers)

    def served(self, after: float) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.code == 200 and a.sent > after]


def first_stop(answers: list[Answer], node: str, after: float) -> float | None:
    """How long after ``after`` the node first answered not-200 (for the report)."""
    for a in answers:
        if a.node == node and a.sent >= after and a.code != 200:
            return a.sent - after
    return None


def tree(pid: int) -> list[int]:
    """pid and all its descendants (the node's supervisor, fork server and children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def wait_nodes(c: Cluster, ids: list[str], pred: Any, what: str, timeout: float = 60.0) -> None:
    """Like Cluster.wait, for some nodes only (a frozen one cannot answer)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = {n: c.nodes[n].status() for n in ids}
        if all(s is not None and pred(s) for s in last.values()):
            return
        time.sleep(0.1)
    logs = "\n".join(f"--- {k}\n{n.log()[-3000:]}" for k, n in c.nodes.items())
    raise AssertionError(f"timed out waiting for {what}: {last}\n{logs}")


@pytest.fixture
def cluster_factory(tmp_path: Path, model_dir: Path, secret_file: Path):  # type: ignore[no-untyped-def]
    made: list[Cluster] = []

    def make(n: int, quorum: int, **kw) -> Cluster:  # type: ignore[no-untyped-def]
        c = Cluster(tmp_path, model_dir, secret_file, n, quorum=quorum, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        for node in c.nodes.values():
            if node.proc.poll() is None:
                for p in tree(node.proc.pid):
                    try:
                        os.kill(p, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
        c.stop_all()


def test_quorum_loss_stops_the_surviving_voter_and_the_worker(cluster_factory: Factory) -> None:
    """Before leases, a worker kept /ready 200 for good once the coordinator and a quorum were gone."""
    c = cluster_factory(4, quorum=3, roles=["coordinator", "coordinator", "coordinator", "worker"])
    c.start_all()
    st = c.wait_operational(timeout=90)
    coord = next(iter(st.values()))["coordinator"]
    voters = [n for n in c.ids[:3] if n != coord]
    survivors = [voters[1], c.ids[3]]
    log = ReadyLog(c, survivors)
    c.wait(lambda st: all(a in {x.node for x in log.served(0)} for a in survivors), what="polled serving")
    c.kill(coord)
    c.kill(voters[0])
    killed = time.monotonic()
    time.sleep(PROMISE_S + SLACK_S + 1.5)
    answers = log.close()
    late = [a for a in answers if a.code == 200 and a.sent > killed + PROMISE_S + SLACK_S]
    assert not late, f"served after quorum loss: {late[:5]}"
    for n in survivors:
        mine = [a for a in answers if a.node == n and a.sent > killed + PROMISE_S + SLACK_S]
        assert mine and all(a.code == 503 for a in mine), n
        print(f"{n}: stopped serving {first_stop(answers, n, killed)}s after the quorum was lost")
    st = c.statuses()
    assert all(s is not None and s["waiting_reason"] for s in st.values()), st


def test_a_worker_killed_while_serving_stops_everyone_then_the_rest_serve_a_new_epoch(
    cluster_factory: Factory,
) -> None:
    c = cluster_factory(4, quorum=3, roles=["coordinator", "coordinator", "coordinator", "worker"])
    c.start_all()
    st = c.wait_operational(timeout=90)
    old_epoch = next(iter(st.values()))["epoch"]
    old_layers = {n: s["layers"] for n, s in st.items()}
    survivors = c.ids[:3]
    log = ReadyLog(c, survivors)
    c.wait(lambda st: all(a in {x.node for x in log.served(0)} for a in survivors), what="polled serving")
    c.kill(c.ids[3])
    killed = time.monotonic()
    st = c.wait(
        lambda st: all(s["state"] == "OPERATIONAL" and s["epoch"] > old_epoch for s in st.values()),
        timeout=60,
        what="survivors operational at a new epoch",
    )
    back = time.monotonic() - killed
    answers = log.close()
    # Nobody serves the old epoch past the death's detection plus the lease bound.
    bound = killed + SILENT_STOPS_SERVING_S + CYCLE_S + PROMISE_S + SLACK_S
    late = [a for a in answers if a.code == 200 and a.sent > bound and a.epoch == old_epoch]
    assert not late, f"served the dead node's epoch: {late[:5]}"
    # And everyone stopped before serving again (the pipeline lost its layers).
    for n in survivors:
        assert first_stop(answers, n, killed) is not None, n
    assert {s["cluster_size"] for s in st.values()} == {3}
    print(f"worker death -> OPERATIONAL again in {back:.2f}s (polled)")
    # Survivors load only what they gain: a survivor whose range is unchanged only re-validates; what
    # a new range keeps of the old is copied from the old arena (checked against the manifest like
    # any read), not read from the source again.
    for n in survivors:
        (a, b), (x, y) = (map(int, old_layers[n].split("-")), map(int, st[n]["layers"].split("-")))
        loads = re.findall(
            r"tensors: (\d+) kept in memory from the previous range, \d+ from cache, (\d+) from",
            c.nodes[n].log(),
        )
        assert len(loads) == (1 if (a, b) == (x, y) else 2), (n, old_layers[n], st[n]["layers"], loads)
        if (a, b) != (x, y) and max(a, x) <= min(b, y):
            assert int(loads[-1][0]) > 0, (n, old_layers[n], st[n]["layers"], loads)
    # The worker comes back (systemd restarts it): it is planned in again, not left waiting.
    epoch = next(iter(st.values()))["epoch"]
    c.start(3)
    st = c.wait(
        lambda st: (
            len(st) == 4 and all(s["state"] == "OPERATIONAL" and s["epoch"] > epoch for s in st.values())
        ),
        timeout=90,
        what="the restarted worker planned in and everyone operational",
    )
    assert st[c.ids[3]]["bytes_total"] > 0
    # Status tells the truth: the role each plays, every node's layers, consistent counts.
    st = c.wait(lambda st: len({s["epoch"] for s in st.values()}) == 1, what="one epoch everywhere")
    roles = sorted(s["cluster_role"] for s in st.values())
    assert roles == ["coordinator", "voter", "voter", "worker"], roles
    plans = [[(r["node_id"], r["layers"]) for r in s["plan"]] for s in st.values()]
    assert all(p == plans[0] for p in plans) and {n for n, _ in plans[0]} == set(c.ids)
    for n, s in st.items():
        assert s["layers"] == dict(plans[0])[n]
        assert s["waiting_reason"] is None
        assert s["cluster_operational_nodes"] <= s["cluster_size"] == 4


@pytest.mark.parametrize("what", ["node", "cluster child"])
def test_a_frozen_coordinator_stops_serving_and_the_others_move_on(
    cluster_factory: Factory, what: str
) -> None:
    c = cluster_factory(3, quorum=3, heartbeat_timeout_s=30.0)
    c.start_all()
    st = c.wait_operational(timeout=90)
    coord = next(iter(st.values()))["coordinator"]
    old_epoch, old_term = st[coord]["epoch"], st[coord]["term"]
    log = ReadyLog(c, c.ids)
    c.wait(lambda st: all(a in {x.node for x in log.served(0)} for a in c.ids), what="polled serving")
    if what == "node":
        frozen = tree(c.nodes[coord].proc.pid)
    else:
        frozen = [next(ch["pid"] for ch in st[coord]["children"] if ch["name"] == "cluster")]
    for p in frozen:
        os.kill(p, signal.SIGSTOP)
    stopped = time.monotonic()
    others = [n for n in c.ids if n != coord]
    try:
        wait_nodes(
            c,
            others,
            lambda s: s["state"] == "OPERATIONAL" and s["term"] > old_term and s["epoch"] > old_epoch,
            "the others operational under a new coordinator",
        )
    finally:
        for p in frozen:
            os.kill(p, signal.SIGCONT)
    resumed = time.monotonic()
    # It rejoins: the rebalanced plan gives it layers again (it used to wait, "no layers assigned").
    now_epoch = max(c.nodes[n].status()["epoch"] for n in others)  # type: ignore[index]
    c.wait(
        lambda st: all(s["state"] == "OPERATIONAL" and s["epoch"] > now_epoch for s in st.values()),
        timeout=90,
        what="the resumed coordinator planned in again and everyone operational",
    )
    answers = log.close()
    late = [
        a
        for a in answers
        if a.code == 200 and a.sent > stopped + PROMISE_S + SLACK_S and a.epoch <= old_epoch
    ]
    assert not late, f"served the frozen coordinator's epoch: {late[:5]}"
    # The resumed node serves nothing until it holds a lease again from the new coordinator.
    again = [a for a in answers if a.node == coord and a.sent > resumed and a.code == 200]
    assert all(a.term > old_term for a in again), again[:5]
