"""The coordinator's decisions: when to plan, re-plan, and open the serving gate."""

from __future__ import annotations

import os

from butterfly.cluster.coordinator import DEAD_AFTER_S, SETTLE_S, Coordinator, ModelInfo
from butterfly.cluster.messages import (
    NodeReport,
    OperationalEntry,
    PlanEntry,
    ValidationReport,
    ValidationVerdict,
)
from butterfly.planner import ModelSizes
from butterfly.weights import merkle
from butterfly.weights.layout import LayerRange
from butterfly.weights.manifest import unit_range_for_blocks

BLOCKS = 6
DIGESTS = [os.urandom(32) for _ in range(BLOCKS + 2)]
# The units' leaves, then the aux files' (config.json, tokenizer) last leaf, as a manifest's tree has.
LEAVES = [merkle.leaf_hash(d) for d in DIGESTS] + [merkle.leaf_hash(os.urandom(32))]
ROOT = merkle.merkle_root(LEAVES).hex()
MODEL = ModelInfo(ROOT, BLOCKS + 2, ModelSizes(block_bytes=(100,) * BLOCKS, embed_bytes=50, head_bytes=50))
GiB = 2**30


def report(node: str, role: str = "coordinator") -> NodeReport:
    return NodeReport(node_id=node, cluster_name="c", role=role, memory_bytes=GiB, throughput=1.0)


def reports(nodes: list[str], at: float) -> dict[str, tuple[NodeReport, float]]:
    return {n: (report(n), at) for n in nodes}


def cycle(c: Coordinator, now: float, reps, plan=None, operational=0, members=None):  # type: ignore[no-untyped-def]
    return c.run_cycle(
        now, 2, reps, members if members is not None else set(reps), plan, operational, MODEL, ""
    )


def valid_report(plan: PlanEntry, node: str, digests: list[bytes] = DIGESTS) -> ValidationReport:
    a = plan.range_of(node)
    assert a is not None
    first, last = unit_range_for_blocks(plan.num_blocks, LayerRange(a.start, a.stop))
    return ValidationReport(
        plan.epoch,
        node,
        a.start,
        a.stop,
        plan.manifest_root,
        first,
        digests[first:last],
        merkle.range_proof(LEAVES, first, last),
    )


def first_plan(c: Coordinator, nodes: list[str]) -> PlanEntry:
    reps = reports(nodes, 10.0)
    cycle(c, 10.0, reps)
    res = cycle(c, 10.0 + SETTLE_S + 0.01, reps)
    plans = [p for p in res.proposals if isinstance(p, PlanEntry)]
    assert len(plans) == 1, res.description
    return plans[0]


def test_waits_visibly_below_quorum_and_plans_once_quorum_is_alive_and_settled() -> None:
    c = Coordinator("a", quorum_size=3, reserve_bytes=0)
    res = cycle(c, 1.0, reports(["a", "b"], 1.0))
    assert res.proposals == [] and "only 2 node(s) alive; forming needs 3" in res.waiting_reason
    reps = reports(["a", "b", "c"], 2.0)
    assert cycle(c, 2.0, reps).proposals == []  # membership just changed: settle first
    res = cycle(c, 2.0 + SETTLE_S + 0.01, reps)
    (plan,) = res.proposals
    assert isinstance(plan, PlanEntry) and plan.epoch == 1 and plan.manifest_root == ROOT
    covered = sorted((a.start, a.stop) for a in plan.assignments)
    assert covered[0][0] == 0 and covered[-1][1] == BLOCKS
    assert all(x[1] == y[0] for x, y in zip(covered, covered[1:], strict=False))
    assert {a.node_id for a in plan.assignments} == {"a", "b", "c"}


def test_operational_is_proposed_once_only_after_every_range_is_proven() -> None:
    c = Coordinator("a", quorum_size=3, reserve_bytes=0)
    plan = first_plan(c, ["a", "b", "c"])
    reps = reports(["a", "b", "c"], 20.0)
    for i, node in enumerate(["a", "b", "c"]):
        res = cycle(c, 20.0, reps, plan)
        assert not any(isinstance(p, OperationalEntry) for p in res.proposals)
        assert "waiting for validation" in res.description
        assert _verdict(c, valid_report(plan, node), plan).ok, i
    res = cycle(c, 20.0, reps, plan)
    assert res.proposals == [OperationalEntry(plan.epoch, 2)]
    assert cycle(c, 20.1, reps, plan).proposals == []


def _verdict(c: Coordinator, report: ValidationReport, plan: PlanEntry | None) -> ValidationVerdict:
    v = c.on_validation(report, plan)
    assert v is not None
    return v


def test_wrong_weights_or_range_are_rejected_with_reasons_another_epoch_gets_no_verdict() -> None:
    c = Coordinator("a", quorum_size=2, reserve_bytes=0)
    plan = first_plan(c, ["a", "b"])
    a = plan.range_of("b")
    assert a is not None
    tampered = list(DIGESTS)
    tampered[a.start + 1] = bytes(32)  # unit of b's first block
    v = _verdict(c, valid_report(plan, "b", tampered), plan)
    assert not v.ok and "do not prove into the manifest root" in v.reason
    good = valid_report(plan, "b")
    import msgspec

    shifted = msgspec.structs.replace(good, start=good.start + 1)
    assert "assigned" in _verdict(c, shifted, plan).reason
    other_root = msgspec.structs.replace(good, manifest_root="00" * 32)
    assert "manifest root" in _verdict(c, other_root, plan).reason
    # Regression (chaos soak): a report of a superseded plan's epoch (its node validated while the
    # coordinator, not hearing it, re-planned) or of a plan this coordinator has not applied yet is
    # no fault of the weights: a rejection failed that node for good. No verdict; it re-validates.
    for epoch in (plan.epoch - 1, plan.epoch + 1):
        assert c.on_validation(msgspec.structs.replace(good, epoch=epoch), plan) is None
    assert c.on_validation(good, None) is None
    assert "b" not in c.accepted.get(plan.epoch, set())


def test_a_dead_planned_node_triggers_a_replan_for_the_survivors() -> None:
    c = Coordinator("a", quorum_size=2, reserve_bytes=0)
    plan = first_plan(c, ["a", "b", "c"])
    later = 30.0
    reps = {
        "a": (report("a"), later),
        "b": (report("b"), later),
        "c": (report("c"), later - DEAD_AFTER_S - 1),
    }
    cycle(c, later, reps, plan)
    res = cycle(
        c,
        later + SETTLE_S + 0.01,
        {**reps, "a": (report("a"), later + 0.3), "b": (report("b"), later + 0.3)},
        plan,
    )
    (new,) = [p for p in res.proposals if isinstance(p, PlanEntry)]
    assert new.epoch == plan.epoch + 1
    assert {a.node_id for a in new.assignments} == {"a", "b"}
    assert "c dead" in res.description


def test_below_quorum_after_deaths_waits_instead_of_replanning() -> None:
    c = Coordinator("a", quorum_size=3, reserve_bytes=0)
    plan = first_plan(c, ["a", "b", "c"])
    reps = {"a": (report("a"), 50.0), "b": (report("b"), 10.0), "c": (report("c"), 10.0)}
    res = cycle(c, 50.0 + SETTLE_S + 1, reps, plan)
    assert res.proposals == [] and "only 1 node(s) alive; continuing needs 2" in res.waiting_reason


def test_a_formed_cluster_carries_on_with_a_majority_of_quorum_size() -> None:
    c = Coordinator("a", quorum_size=3, reserve_bytes=0)
    plan = first_plan(c, ["a", "b", "c"])
    reps = {"a": (report("a"), 50.0), "b": (report("b"), 50.0), "c": (report("c"), 10.0)}
    cycle(c, 50.0, reps, plan)
    res = cycle(c, 50.0 + SETTLE_S + 0.1, reps, plan)
    (new,) = res.proposals
    assert isinstance(new, PlanEntry) and {a.node_id for a in new.assignments} == {"a", "b"}


def test_reporting_nodes_outside_the_log_are_added_as_learners_once() -> None:
    c = Coordinator("a", quorum_size=1, reserve_bytes=0)
    reps = reports(["a", "w1", "w2"], 5.0)
    res = cycle(c, 5.0, reps, members={"a"})
    assert res.learners == ["w1", "w2"]
    assert cycle(c, 5.1, reps, members={"a"}).learners == []


def test_a_model_that_does_not_fit_is_reported_and_nothing_is_planned() -> None:
    c = Coordinator("a", quorum_size=1, reserve_bytes=0)
    tiny = {
        "a": (
            NodeReport(node_id="a", cluster_name="c", role="coordinator", memory_bytes=10, throughput=1.0),
            1.0,
        )
    }
    c.run_cycle(1.0, 1, tiny, {"a"}, None, 0, MODEL, "")
    res = c.run_cycle(1.0 + SETTLE_S + 0.1, 1, tiny, {"a"}, None, 0, MODEL, "")
    assert res.proposals == [] and res.waiting_reason.startswith("cannot plan")


def failed_report(node: str, reason: str) -> NodeReport:
    return NodeReport(
        node_id=node,
        cluster_name="c",
        role="coordinator",
        memory_bytes=GiB,
        throughput=1.0,
        fault=reason,
        failed=True,
        fault_start=2,
        fault_stop=4,
    )


def test_a_failed_node_is_planned_around_while_it_keeps_reporting() -> None:
    c = Coordinator("a", quorum_size=3, reserve_bytes=0)
    plan = first_plan(c, ["a", "b", "c"])
    # c still reports every interval (it is alive for Raft), but it has failed and cannot hold a range.
    reps = {**reports(["a", "b"], 50.0), "c": (failed_report("c", "tensor x differs"), 50.0)}
    cycle(c, 50.0, reps, plan)
    res = cycle(c, 50.0 + SETTLE_S + 0.1, reps, plan)
    (new,) = res.proposals
    assert isinstance(new, PlanEntry) and {a.node_id for a in new.assignments} == {"a", "b"}
    assert new.epoch == plan.epoch + 1


def test_a_failed_node_does_not_count_toward_forming_and_is_named() -> None:
    c = Coordinator("a", quorum_size=3, reserve_bytes=0)
    reps = {**reports(["a", "b"], 10.0), "c": (failed_report("c", "no manifest at /m"), 10.0)}
    res = cycle(c, 10.0, reps)
    cycle(c, 10.0 + SETTLE_S + 0.1, reps)
    res = cycle(c, 10.0 + SETTLE_S + 0.2, reps)
    assert res.proposals == []
    assert res.waiting_reason == (
        "only 2 node(s) alive; forming needs 3 (quorum_size 3); c failed: no manifest at /m"
    )


def test_a_node_returning_to_an_operational_cluster_is_planned_in_when_that_is_faster() -> None:
    """A node that died and came back used to wait forever with "no layers assigned"."""
    c = Coordinator("a", quorum_size=3, reserve_bytes=0)
    plan = first_plan(c, ["a", "b", "c"])
    two = reports(["a", "b"], 20.0)
    assert cycle(c, 20.0, two, plan, operational=plan.epoch).proposals == []  # c dead: settling
    (replan,) = cycle(c, 20.0 + SETTLE_S + 0.01, two, plan, operational=plan.epoch).proposals
    assert isinstance(replan, PlanEntry) and {a.node_id for a in replan.assignments} == {"a", "b"}
    # c returns while the two serve epoch 2: six blocks on three nodes beat six on two.
    reps = reports(["a", "b", "c"], 30.0)
    assert cycle(c, 30.0, reps, replan, operational=replan.epoch).proposals == []  # settling
    res = cycle(c, 30.0 + SETTLE_S + 0.01, reps, replan, operational=replan.epoch)
    (again,) = res.proposals
    assert isinstance(again, PlanEntry) and again.epoch == replan.epoch + 1
    assert {a.node_id for a in again.assignments} == {"a", "b", "c"}
    assert "rebalancing for c" in res.description


def test_a_node_that_would_not_speed_the_pipeline_up_stays_spare_and_says_why() -> None:
    c = Coordinator("a", quorum_size=1, reserve_bytes=0)
    slow = NodeReport(node_id="d", cluster_name="c", role="worker", memory_bytes=GiB, throughput=0.01)
    plan = first_plan(c, ["a", "b", "c"])
    reps = {**reports(["a", "b", "c"], 30.0), "d": (slow, 30.0)}
    cycle(c, 30.0, reps, plan, operational=plan.epoch)
    res = cycle(c, 30.0 + SETTLE_S + 0.01, reps, plan, operational=plan.epoch)
    assert res.proposals == []
    assert "d kept spare" in res.description and "operational at epoch 1" in res.description
    # Decided once for this membership: the planner is not rerun every cycle.
    res = cycle(c, 31.0, {**reports(["a", "b", "c"], 31.0), "d": (slow, 31.0)}, plan, operational=plan.epoch)
    assert res.proposals == [] and "d kept spare" in res.description
