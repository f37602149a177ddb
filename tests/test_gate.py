"""The serving gate: every way a snapshot can say "do not serve" is tried, one at a time."""

from __future__ import annotations

import dataclasses

import pytest

from butterfly.board import BoardSnapshot, ClusterSection, HeaderSection, LoaderSection, NodeSection
from butterfly.board.layout import EngineSection, ValidatorSection
from butterfly.gate import STALE_AFTER_NS, may_serve
from butterfly.states import NodeState, Phase
from butterfly.supervisor.statusview import build_status

NOW = 1_000 * 10**9
EPOCH = 3


def serving() -> BoardSnapshot:
    """A node serving epoch 3, every process having just beaten."""
    beat = NOW - 10**8
    return BoardSnapshot(
        header=HeaderSection(node_id="n1"),
        node=NodeSection(
            state=int(NodeState.OPERATIONAL),
            phase=int(Phase.READY),
            serving_epoch=EPOCH,
            heartbeat_mono_ns=beat,
            started_mono_ns=NOW - 10**10,
        ),
        cluster=ClusterSection(
            heartbeat_mono_ns=beat,
            epoch=EPOCH,
            term=2,
            coordinator="n1",
            lease_until_mono_ns=NOW + 3 * 10**8,
            lease_epoch=EPOCH,
        ),
        loader=LoaderSection(heartbeat_mono_ns=beat),
        validator=ValidatorSection(heartbeat_mono_ns=beat),
        engine=EngineSection(heartbeat_mono_ns=beat, epoch=EPOCH, serving=1),
    )


def change(snap: BoardSnapshot, section: str, **fields: object) -> BoardSnapshot:
    return dataclasses.replace(snap, **{section: dataclasses.replace(getattr(snap, section), **fields)})


def test_a_serving_node_may_serve_its_epoch() -> None:
    v = may_serve(serving(), NOW)
    assert (v.ok, v.reason, v.epoch) == (True, "", EPOCH)


@pytest.mark.parametrize(
    ("section", "fields", "why"),
    [
        ("node", {"state": int(NodeState.READY)}, "state READY"),
        ("node", {"state": int(NodeState.FAILED)}, "state FAILED"),
        ("node", {"state": 99}, "unknown (99)"),
        ("node", {"serving_epoch": 0}, "no validated operational epoch"),
        ("cluster", {"epoch": EPOCH + 1}, "plan epoch 4 applied; this node validated epoch 3"),
        ("node", {"heartbeat_mono_ns": 0}, "supervisor has not started"),
        ("node", {"heartbeat_mono_ns": NOW - STALE_AFTER_NS - 1}, "supervisor silent for 1.0s"),
        ("cluster", {"heartbeat_mono_ns": NOW - 5 * 10**9}, "cluster child silent for 5.0s"),
        ("loader", {"heartbeat_mono_ns": NOW - 2 * 10**9}, "loader child silent for 2.0s"),
        ("validator", {"heartbeat_mono_ns": 0}, "validator child has not started"),
        ("validator", {"fault": 1}, "the validator found weights in memory that are not the model's"),
        ("engine", {"heartbeat_mono_ns": NOW - 2 * 10**9}, "engine child silent for 2.0s"),
        ("engine", {"heartbeat_mono_ns": 0}, "engine child has not started"),
        ("engine", {"serving": 0}, "the engine has not built its stage of epoch 3"),
        ("engine", {"epoch": EPOCH - 1}, "the engine has not built its stage of epoch 3"),
        ("cluster", {"lease_until_mono_ns": 0, "lease_epoch": 0}, "no serving lease for epoch 3"),
        ("cluster", {"lease_epoch": EPOCH - 1}, "no serving lease for epoch 3"),
        ("cluster", {"lease_until_mono_ns": NOW - 5 * 10**7}, "lease from the coordinator expired 0.05s"),
        ("cluster", {"lease_until_mono_ns": NOW}, "expired 0.00s ago"),
    ],
)
def test_each_fact_alone_stops_serving(section: str, fields: dict[str, object], why: str) -> None:
    v = may_serve(change(serving(), section, **fields), NOW)
    assert not v.ok and v.epoch == 0
    assert why in v.reason


def test_a_heartbeat_just_inside_the_bound_still_serves() -> None:
    snap = change(serving(), "loader", heartbeat_mono_ns=NOW - STALE_AFTER_NS)
    assert may_serve(snap, NOW).ok
    # A beat written after the reader read its clock is fresh, not negative-aged garbage.
    assert may_serve(change(serving(), "loader", heartbeat_mono_ns=NOW + 5), NOW).ok


def test_status_follows_the_gate() -> None:
    st = build_status(serving(), "coordinator", [], 10.0, NOW)
    assert (st.state, st.may_serve, st.waiting_reason) == ("OPERATIONAL", True, None)
    # Committed and validated, but a child went silent: READY, not serving, and it says why.
    hung = change(serving(), "validator", heartbeat_mono_ns=1)
    st = build_status(hung, "coordinator", [], 10.0, NOW)
    assert (st.state, st.may_serve) == ("READY", False)
    assert st.waiting_reason is not None and "validator child silent" in st.waiting_reason


def test_status_says_the_role_the_node_plays_now_not_the_configured_one() -> None:
    from butterfly.status import Notes

    base = serving()
    leader = change(base, "cluster", is_coordinator=1, membership=1)
    voter = change(base, "cluster", membership=1)
    learner = change(base, "cluster", membership=2)
    assert build_status(leader, "coordinator", [], 10.0, NOW).cluster_role == "coordinator"
    assert build_status(voter, "coordinator", [], 10.0, NOW).cluster_role == "voter"
    assert build_status(learner, "coordinator", [], 10.0, NOW).cluster_role == "learner"
    assert build_status(learner, "worker", [], 10.0, NOW).cluster_role == "worker"
    assert build_status(base, "coordinator", [], 10.0, NOW, Notes()).cluster_role == "none"


def test_status_shows_every_node_layers_of_the_current_plan_only() -> None:
    from butterfly.ipc import NodeLayers, PlanView
    from butterfly.status import Notes

    notes = Notes(plan=PlanView(EPOCH, [NodeLayers("n0", 0, 3), NodeLayers("n1", 3, 8)]))
    st = build_status(serving(), "coordinator", [], 10.0, NOW, notes)
    assert st.layers == "3-7"
    assert [(r.node_id, r.layers) for r in st.plan] == [("n0", "0-2"), ("n1", "3-7")]
    # A plan view of another epoch than the board's is not shown as the current one.
    old = Notes(plan=PlanView(EPOCH - 1, [NodeLayers("n1", 0, 8)]))
    st = build_status(serving(), "coordinator", [], 10.0, NOW, old)
    assert st.layers is None and st.plan == []


def test_waiting_reason_is_current_whole_and_names_what_blocks() -> None:
    from butterfly.status import Notes

    long = "epoch 3: waiting for validation from " + ", ".join(f"n{i} (blocks {i}-{i})" for i in range(40))
    # Serving: no reason at all, whatever was said before.
    assert (
        build_status(serving(), "coordinator", [], 10.0, NOW, Notes(waiting_reason=long)).waiting_reason
        is None
    )
    # Not yet operational: the cluster's reason, whole (never cut).
    loading = change(
        serving(), "node", state=int(NodeState.LOADING), phase=int(Phase.VALIDATION), serving_epoch=0
    )
    st = build_status(loading, "coordinator", [], 10.0, NOW, Notes(waiting_reason=long))
    assert st.waiting_reason == long and len(long) > 500
    # Committed and validated, but the lease ran out: the gate's reason first, then the cluster's.
    expired = change(serving(), "cluster", lease_until_mono_ns=NOW - 10**8)
    why = "n2 (blocks 4-5) is not reporting"
    st = build_status(expired, "coordinator", [], 10.0, NOW, Notes(waiting_reason=why))
    assert st.state == "READY" and st.waiting_reason is not None
    assert st.waiting_reason.startswith(
        "serving lease from the coordinator expired"
    ) and st.waiting_reason.endswith(why)


def test_operational_nodes_never_exceed_the_cluster_size() -> None:
    snap = change(serving(), "cluster", operational_nodes=3, cluster_size=2)
    assert build_status(snap, "coordinator", [], 10.0, NOW).cluster_operational_nodes == 2
