"""The chaos checker judged on hand-made histories: a clean one passes, and each kind of bad history
fails on the rule it breaks (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.history import Answer, Bounds, Fault, History, check, load, recovery_time

NODES = ["n1", "n2", "n3"]


def status(
    t: float,
    node: str,
    *,
    term: int = 2,
    epoch: int = 1,
    coordinator: str | None = "n1",
    state: str = "OPERATIONAL",
) -> Answer:
    body = {"node_id": node, "state": state, "term": term, "epoch": epoch, "coordinator": coordinator}
    return Answer(t, node, "status", 200, body)


def ready(t: float, node: str, *, epoch: int = 1, code: int = 200, state: str = "OPERATIONAL") -> Answer:
    return Answer(t, node, "ready", code, {"ready": code == 200, "state": state, "epoch": epoch, "term": 2})


def clean() -> History:
    """Three nodes serve epoch 1; n3 is killed at t=10 and restarted at t=15; the others stop serving
    at once, commit epoch 2 at t=11 and serve it; n3 comes back in epoch 2 at t=20."""
    h = History(nodes=list(NODES), healed_at=15.0, ended_at=25.0)
    a = h.answers
    for t in range(0, 10):
        for n in NODES:
            a += [status(t, n), ready(t + 0.5, n)]
    a += [ready(10.5, "n1", code=503, state="READY"), ready(10.5, "n2", code=503, state="READY")]
    a += [Answer(10.5, "n3", "ready", None, None)]
    for t in range(11, 25):
        for n in ("n1", "n2"):
            a += [status(t, n, epoch=2), ready(t + 0.5, n, epoch=2)]
    a += [
        status(16, "n3", term=0, epoch=0, coordinator=None, state="COLD"),
        ready(16.5, "n3", code=503, state="COLD"),
    ]
    for t in range(20, 25):
        a += [status(t, "n3", epoch=2), ready(t + 0.5, "n3", epoch=2)]
    h.faults.append(Fault("kill", "n3", 10.0, 15.0))
    h.answers.sort(key=lambda x: x.t)
    return h


def test_a_clean_history_passes_and_its_recovery_is_measured() -> None:
    h = clean()
    assert check(h) == []
    assert recovery_time(h) == pytest.approx(20.5 - 15.0)


def _with(h: History, *extra: Answer) -> History:
    h.answers = sorted([*h.answers, *extra], key=lambda x: x.t)
    return h


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        (
            "two leaders in one term",
            lambda: _with(clean(), status(5.2, "n2", coordinator="n2")),
            "term 2 had 2 leaders",
        ),
        (
            "ready 200 while not operational",
            lambda: _with(clean(), ready(5.3, "n2", state="READY")),
            "in state READY",
        ),
        (
            "ready 200 for an epoch never committed",
            lambda: _with(clean(), ready(12.3, "n2", epoch=7)),
            "never committed",
        ),
        (
            "ready 200 for epoch 0",
            lambda: _with(clean(), ready(3.3, "n2", epoch=0)),
            "epoch 0, never committed",
        ),
        (
            "a stale epoch served after a newer one",
            lambda: _with(clean(), ready(14.0, "n1", epoch=1)),
            "after epoch 2 was reported",
        ),
        (
            "a node serves through its own isolation",
            lambda: _isolated(serve_through=True),
            "into its own isolate",
        ),
        (
            "a survivor serves the dead node's epoch",
            lambda: _with(clean(), ready(12.6, "n2", epoch=1)),
            "whose layers epoch 1 needs",
        ),
        (
            "an epoch goes back",
            lambda: _with(clean(), status(13.2, "n1", epoch=1)),
            "epoch went back from 2 to 1",
        ),
        (
            "a term goes back",
            lambda: _with(clean(), status(13.2, "n1", term=1, epoch=2)),
            "term went back from 2 to 1",
        ),
        ("a committed epoch is lost at the end", lambda: _lost(), "below committed epoch 2"),
        ("never operational again", lambda: _never_recovers(), "not OPERATIONAL on every node"),
        ("operational again too late", lambda: _late(), "took 95.5 s"),
    ],
)
def test_a_bad_history_fails_on_the_broken_rule(name: str, make: Any, expected: str) -> None:
    violations = check(make())
    assert violations, name
    assert any(expected in v for v in violations), violations


def _isolated(*, serve_through: bool) -> History:
    h = History(nodes=list(NODES), healed_at=8.0, ended_at=12.0)
    for t in range(0, 12):
        for n in NODES:
            h.answers += [status(t, n), ready(t + 0.5, n)]
    if not serve_through:
        h.answers = [x for x in h.answers if not (x.node == "n3" and x.kind == "ready" and 3 < x.t < 8)]
    h.faults.append(Fault("isolate", "n3", 2.0, 8.0))
    h.answers.sort(key=lambda x: x.t)
    return h


def test_a_node_may_answer_within_the_bound_of_its_fault_but_not_after() -> None:
    within = _isolated(serve_through=False)  # its last 200 is at 2.5 s, 0.5 s into the fault
    assert [v for v in check(within) if "into its own" in v] == []
    tight = check(_isolated(serve_through=False), Bounds(serve_bound_s=0.1))
    assert any("0.50 s into its own isolate" in v for v in tight)


def _lost() -> History:
    h = clean()
    h.answers = [x for x in h.answers if not (x.node == "n3" and x.t >= 20)]
    h.answers += [status(22, "n3", epoch=1), ready(22.5, "n3", epoch=1)]
    h.answers.sort(key=lambda x: x.t)
    return h


def _never_recovers() -> History:
    h = clean()
    h.answers = [x for x in h.answers if not (x.node == "n3" and x.t >= 20)]
    return h


def _late() -> History:
    h = clean()
    for x in list(h.answers):
        if x.node == "n3" and x.t >= 20:
            h.answers.remove(x)
    h.answers += [status(110, "n3", epoch=2), ready(110.5, "n3", epoch=2)]
    for n in ("n1", "n2"):
        h.answers += [status(110, n, epoch=2), ready(110.5, n, epoch=2)]
    h.answers.sort(key=lambda x: x.t)
    return h


def test_a_history_round_trips_through_its_files(tmp_path: Path) -> None:
    h = clean()
    h.save(tmp_path / "history.json")
    for n in NODES:
        lines = [
            json.dumps({"t": x.t, "node": x.node, "kind": x.kind, "code": x.code, "body": x.body})
            for x in h.answers
            if x.node == n
        ]
        (tmp_path / f"{n}.answers").write_text(
            "\n".join(lines) + '\n{"t": 99, "node": "n1", "ki'
        )  # torn line
    back = load(tmp_path / "history.json", [tmp_path / f"{n}.answers" for n in NODES])
    assert back.faults == h.faults and back.healed_at == h.healed_at
    assert sorted(back.answers, key=lambda x: (x.t, x.node, x.kind)) == sorted(
        h.answers, key=lambda x: (x.t, x.node, x.kind)
    )
    assert check(back) == []


def serve(t: float, node: str, code: int = 200) -> Answer:
    return Answer(t, node, "serve", code, None)


def test_served_requests_are_judged_by_the_ready_answers_around_them() -> None:
    # Between a 503 and a 200 the gate may have opened: fine. Between two 503s: served while closed.
    h = clean()
    h.answers = [x for x in h.answers if not (x.node == "n2" and x.kind == "ready" and 5 < x.t < 7)]
    h = _with(h, ready(5.5, "n2", code=503, state="READY"), serve(5.7, "n2"), ready(6.5, "n2"))
    assert check(h) == []
    h = _with(
        clean(), serve(10.6, "n1", code=503), serve(11.55, "n1")
    )  # before: 503 at 10.5; after: 200 at 11.5
    assert check(h) == []
    h = clean()
    h.answers = [x for x in h.answers if not (x.node == "n2" and x.kind == "ready" and 5 < x.t < 7)]
    h = _with(
        h,
        ready(5.5, "n2", code=503, state="READY"),
        serve(5.7, "n2"),
        ready(6.0, "n2", code=503, state="READY"),
    )
    assert any("n2 served a request at 5.700 in state READY (/ready 503)" in v for v in check(h))


def test_a_request_served_through_a_fault_is_a_violation() -> None:
    h = _with(_isolated(serve_through=False), serve(6.1, "n3"))
    assert any("n3 served a request" in v and "into its own isolate" in v for v in check(h))
    h = clean()  # n2 keeps answering in epoch 1 after n3's death, and serves in it
    h.answers = [x for x in h.answers if not (x.node == "n2" and 12 < x.t < 14)]
    h = _with(h, ready(12.5, "n2", epoch=1), serve(12.7, "n2"), ready(13.5, "n2", epoch=1))
    assert any("n2 served a request for epoch 1" in v and "whose layers epoch 1 needs" in v for v in check(h))


@pytest.mark.parametrize("child", ["loader", "engine"])
def test_a_frozen_child_replaced_by_the_supervisor_ends_its_fault(child: str) -> None:
    def history(replaced: bool) -> History:
        h = History(nodes=list(NODES), healed_at=8.0, ended_at=12.0)
        for t in range(0, 12):
            for n in NODES:
                pid = 200 if replaced and n == "n3" and t >= 5 else 100  # a fresh child from t=5
                a = status(t, n)
                body = {**(a.body or {}), "children": [{"name": child, "pid": pid, "alive": True}]}
                h.answers += [Answer(a.t, a.node, a.kind, a.code, body), ready(t + 0.5, n)]
        h.answers = [x for x in h.answers if not (x.node == "n3" and x.kind == "ready" and 2.5 < x.t < 5)]
        h.answers.sort(key=lambda x: x.t)
        h.faults.append(Fault(f"stop_{child}_child", "n3", 1.0, 8.0, pid=100))
        return h

    assert check(history(replaced=True)) == []  # serving again from t=5.5 with a fresh child: fine
    killed = history(replaced=False)  # the status at t=5 sees the frozen child dead (killed)
    killed.answers = [
        Answer(
            x.t,
            x.node,
            x.kind,
            x.code,
            {**(x.body or {}), "children": [{"name": child, "pid": 100, "alive": False}]},
        )
        if x.node == "n3" and x.kind == "status" and x.t == 5
        else x
        for x in killed.answers
    ]
    assert check(killed) == []
    violations = check(history(replaced=False))  # the frozen child is still the one: 5.5 s is too late
    assert any(
        f"n3 answered /ready 200 at 5.500, 4.50 s into its own stop_{child}_child" in v for v in violations
    )


def test_a_spare_of_the_current_epoch_counts_as_recovered_but_not_of_an_older_one() -> None:
    def spare_history(spare_epoch: int) -> History:
        h = _never_recovers()  # n3 back at 16 s, never serving again
        reason = f"no layers assigned to this node in epoch {spare_epoch}"
        a = status(20, "n3", epoch=2, state="JOINING")
        h.answers += [Answer(20, "n3", "status", 200, {**(a.body or {}), "waiting_reason": reason})]
        h.answers += [ready(20.5, "n3", code=503, state="JOINING", epoch=2)]
        h.answers.sort(key=lambda x: x.t)
        return h

    assert recovery_time(spare_history(2)) == pytest.approx(20.0 - 15.0)
    assert check(spare_history(2)) == []
    assert recovery_time(spare_history(1)) is None


SPEC_ROLES = {"n1": "coordinator", "n2": "worker", "n3": "worker"}


def test_a_worker_named_coordinator_is_a_violation() -> None:
    h = clean()
    h.roles, h.topology = dict(SPEC_ROLES), "1coord"
    assert check(h) == []  # n1, the coordinator, leads throughout
    h = _with(h, status(12.2, "n1", term=3, epoch=2, coordinator="n2"))
    assert any("named worker n2 coordinator in term 3" in v for v in check(h))
    h = clean()
    h.roles = dict(SPEC_ROLES)
    said = Answer(
        12.3, "n3", "status", 200, {**(status(12.3, "n3", epoch=2).body or {}), "role": "coordinator"}
    )
    assert any("worker n3 said it was coordinator" in v for v in check(_with(h, said)))


def leaderless() -> History:
    """The spec's cluster: n1 (the only coordinator) serves epoch 1 with workers n2 and n3, and crashes
    for good at t=10; n2 and n3 stop serving and say why until the end."""
    h = History(nodes=list(NODES), roles=dict(SPEC_ROLES), topology="1coord", healed_at=15.0, ended_at=30.0)
    for t in range(0, 10):
        for n in NODES:
            h.answers += [status(t, n), ready(t + 0.5, n)]
    for t in range(10, 30):
        for n in ("n2", "n3"):
            body = {"ready": False, "state": "READY", "epoch": 1, "term": 2, "waiting_reason": "no leader"}
            h.answers += [
                status(t, n, coordinator=None, state="READY"),
                Answer(t + 0.5, n, "ready", 503, body),
            ]
    h.faults.append(Fault("crash", "n1", 10.0, 30.0))
    h.answers.sort(key=lambda x: x.t)
    return h


def test_a_cluster_left_without_coordinators_must_serve_nothing_and_say_why() -> None:
    h = leaderless()
    assert h.leaderless() and recovery_time(h) is None
    assert check(h) == []  # never recovering is right here, not a missed bound
    served = _with(leaderless(), ready(20.7, "n2", epoch=1))
    assert any("with no coordinator-eligible node left" in v for v in check(served))
    silent = leaderless()
    silent.answers = [
        Answer(x.t, x.node, x.kind, x.code, {**(x.body or {}), "waiting_reason": ""})
        if x.kind == "ready" and x.code == 503 and x.t > 20
        else x
        for x in silent.answers
    ]
    assert any("without a waiting_reason" in v for v in check(silent))


def test_a_crashed_node_is_left_out_of_recovery_but_the_rest_must_recover() -> None:
    # The mesh: n3 crashes for good at t=10; n1 and n2 serve epoch 2 without it from t=11.
    h = clean()
    h.faults = [Fault("crash", "n3", 10.0, 25.0)]
    h.answers = [x for x in h.answers if not (x.node == "n3" and x.t >= 10)]
    assert not h.leaderless()
    assert check(h) == []
    assert recovery_time(h) == pytest.approx(0.0)  # n1 and n2 served epoch 2 before the heal
    stuck = clean()
    stuck.faults = [Fault("crash", "n3", 10.0, 25.0)]
    stuck.answers = [x for x in stuck.answers if not (x.node == "n3" and x.t >= 10) and not x.t >= 11]
    assert any("not OPERATIONAL on every node" in v for v in check(stuck))
