"""What the coordinator (the Raft leader) decides, as plain functions of what it knows.

Each cycle the driver hands in the membership it sees (reports and when they arrived), the Raft view
and the committed plan; `Coordinator.run_cycle` answers with proposals and a one-line description of
its decision (logged when it changes, Patroni style). It decides:
- which reporting nodes to add to the log as learners;
- when to plan: once quorum_size nodes are alive and the view has been stable for a settle period,
  and again when a planned node is declared dead (survivors keep their layers where the planner can),
  and when a node joins or returns to an operational cluster and planning it in makes the pipeline's
  bottleneck at least ``REBALANCE_GAIN`` faster (otherwise it stays a spare, and says so);
  with fewer than quorum_size nodes alive it proposes nothing and says why. A node that reports
  itself failed (its NodeReport's ``failed``) is alive for Raft but not for planning: it cannot hold
  a range, so the others are planned around it and the waiting reason names it;
- the serving gate: each assigned node's Merkle leaves must prove into the manifest root for exactly
  its assigned range; when every assigned node is accepted it proposes "operational at epoch E".

This module must not do I/O, read clocks or talk to Raft directly: it only returns decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from butterfly.cluster.messages import (
    Assignment,
    NodeReport,
    OperationalEntry,
    PlanEntry,
    ValidationReport,
    ValidationVerdict,
)
from butterfly.planner import Assignment as PlanAssignment
from butterfly.planner import ModelSizes, NodeCapacity, Plan, PlanError, plan_bottleneck, plan_partition
from butterfly.weights.layout import LayerRange
from butterfly.weights.manifest import tree_size, unit_range_for_blocks
from butterfly.weights.merkle import leaf_hash, verify_range

# A node silent for this long is dead to the coordinator (reports come every REPORT_INTERVAL_S).
DEAD_AFTER_S = 1.5
# Membership must be unchanged this long before a first plan, so nodes starting together share one.
SETTLE_S = 0.2
# An operational cluster re-plans for a node that joins (or returns) only when that makes the
# pipeline's bottleneck at least this much faster: a re-plan stops serving while ranges reload.
REBALANCE_GAIN = 0.1


@dataclass(frozen=True)
class ModelInfo:
    """What the coordinator knows of the model: from the manifest, the only source of the root."""

    manifest_root: str
    num_units: int
    sizes: ModelSizes


@dataclass
class CycleResult:
    description: str
    learners: list[str] = field(default_factory=list)
    proposals: list[PlanEntry | OperationalEntry] = field(default_factory=list)
    waiting_reason: str = ""


def check_validation(report: ValidationReport, plan: PlanEntry) -> str:
    """'' when the report proves the node holds exactly its assigned part of ``plan`` (the report's
    epoch) of the manifest root."""
    assert report.epoch == plan.epoch
    mine = plan.range_of(report.node_id)
    if mine is None:
        return f"{report.node_id} has no assignment in epoch {plan.epoch}"
    if (report.start, report.stop) != (mine.start, mine.stop):
        return f"validated blocks {report.start}-{report.stop - 1}, assigned {mine.start}-{mine.stop - 1}"
    if report.manifest_root != plan.manifest_root:
        return (
            f"node's manifest root {report.manifest_root[:16]}… is not the plan's {plan.manifest_root[:16]}…"
        )
    first, last = unit_range_for_blocks(plan.num_blocks, LayerRange(mine.start, mine.stop))
    if report.unit_start != first or len(report.unit_digests) != last - first:
        return (
            f"leaves cover units {report.unit_start}+{len(report.unit_digests)}, expected {first}-{last - 1}"
        )
    leaves = [leaf_hash(d) for d in report.unit_digests]
    root = bytes.fromhex(plan.manifest_root)
    if not verify_range(leaves, first, tree_size(plan.num_units), report.proof, root):
        return "the loaded weights' Merkle leaves do not prove into the manifest root"
    return ""


class Coordinator:
    def __init__(self, node_id: str, quorum_size: int, reserve_bytes: int) -> None:
        self.node_id = node_id
        self.quorum_size = quorum_size
        self.reserve_bytes = reserve_bytes
        self.accepted: dict[int, set[str]] = {}
        self.proposed_learners: set[str] = set()
        self.proposed_epoch = 0
        self.proposed_operational = 0
        self.membership_changed_at = 0.0
        self._last_members: frozenset[str] = frozenset()
        self._rebalance_checked: tuple[int, frozenset[str]] | None = None
        self._spare_note = ""

    def on_validation(self, report: ValidationReport, plan: PlanEntry | None) -> ValidationVerdict | None:
        """The verdict on a node's proof of its range; None (no verdict) for a report of another epoch
        than the plan this coordinator has applied: that is not a fault of the node's weights (its
        plan was superseded while it validated, or this coordinator has not applied the newest plan
        yet). The node validates the newer plan, or sends its report again."""
        if plan is None or report.epoch != plan.epoch:
            return None
        reason = check_validation(report, plan)
        if not reason:
            self.accepted.setdefault(plan.epoch, set()).add(report.node_id)
        return ValidationVerdict(report.epoch, report.node_id, ok=not reason, reason=reason)

    @staticmethod
    def _planned(plan: PlanEntry | None) -> set[str]:
        return {a.node_id for a in plan.assignments} if plan else set()

    def alive(self, reports: dict[str, tuple[NodeReport, float]], now: float) -> dict[str, NodeReport]:
        return {n: r for n, (r, seen) in reports.items() if n == self.node_id or now - seen <= DEAD_AFTER_S}

    def run_cycle(
        self,
        now: float,
        term: int,
        reports: dict[str, tuple[NodeReport, float]],
        members: set[str],
        plan: PlanEntry | None,
        operational_epoch: int,
        model: ModelInfo | None,
        model_error: str,
    ) -> CycleResult:
        alive = self.alive(reports, now)
        res = CycleResult(description="")
        for n in sorted(set(alive) - members - self.proposed_learners):
            res.learners.append(n)
            self.proposed_learners.add(n)
        failed = {n: r for n, r in alive.items() if r.failed}
        alive = {n: r for n, r in alive.items() if not r.failed}
        names = frozenset(alive)
        if names != self._last_members:
            self._last_members = names
            self.membership_changed_at = now
        # Forming needs quorum_size nodes; once formed the cluster carries on (re-plans for the
        # survivors) while a majority of quorum_size is alive, as Raft itself does.
        need = self.quorum_size if plan is None else self.quorum_size // 2 + 1
        if len(alive) < need:
            doing = "forming" if plan is None else "continuing"
            res.waiting_reason = (
                f"only {len(alive)} node(s) alive; {doing} needs {need} (quorum_size {self.quorum_size})"
            ) + "".join(f"; {n} failed: {r.fault}" for n, r in sorted(failed.items()))
            res.description = f"waiting: {res.waiting_reason}"
            return res
        if model is None:
            res.waiting_reason = model_error or "the model manifest is not loaded yet"
            res.description = f"waiting: {res.waiting_reason}"
            return res

        planned = {a.node_id for a in plan.assignments} if plan else set()
        dead = planned - set(alive)
        needs_plan = plan is None or bool(dead) or (operational_epoch != plan.epoch and set(alive) != planned)
        if needs_plan and plan is not None and plan.epoch < self.proposed_epoch:
            res.description = f"waiting for plan epoch {self.proposed_epoch} to commit"
            return res
        if needs_plan and now - self.membership_changed_at < SETTLE_S:
            res.description = "membership changed; letting it settle before planning"
            return res
        if needs_plan:
            return self._plan(res, term, alive, plan, model, dead)

        assert plan is not None
        spare = sorted(set(alive) - planned)
        if (
            spare
            and operational_epoch == plan.epoch
            and plan.epoch >= self.proposed_epoch
            and now - self.membership_changed_at >= SETTLE_S
            and self._rebalance_checked != (plan.epoch, names)
        ):
            self._rebalance_checked = (plan.epoch, names)
            self._plan(res, term, alive, plan, model, dead, rebalance=True)
            if res.proposals or res.waiting_reason:
                return res
            self._spare_note = res.description
        accepted = self.accepted.get(plan.epoch, set())
        missing = sorted(planned - accepted)
        if operational_epoch == plan.epoch:
            res.description = f"operational at epoch {plan.epoch} with {len(planned)} node(s)"
            if spare and self._spare_note:
                res.description += f"; {self._spare_note}"
        elif missing:
            ranges = {a.node_id: f"{a.start}-{a.stop - 1}" for a in plan.assignments}
            res.waiting_reason = f"epoch {plan.epoch}: waiting for validation from " + ", ".join(
                f"{n} (blocks {ranges[n]})" for n in missing
            )
            res.description = res.waiting_reason
        elif self.proposed_operational < plan.epoch:
            self.proposed_operational = plan.epoch
            res.proposals.append(OperationalEntry(plan.epoch, term))
            res.description = f"epoch {plan.epoch}: every range validated; proposing operational"
        else:
            res.waiting_reason = f"epoch {plan.epoch}: operational proposed, waiting for it to commit"
            res.description = res.waiting_reason
        return res

    def _plan(
        self,
        res: CycleResult,
        term: int,
        alive: dict[str, NodeReport],
        previous: PlanEntry | None,
        model: ModelInfo,
        dead: set[str],
        rebalance: bool = False,
    ) -> CycleResult:
        """Plan for ``alive``; with ``rebalance``, only when that beats ``previous`` by REBALANCE_GAIN
        (otherwise ``res`` gets no proposal and a description of why not)."""
        caps = [
            NodeCapacity(
                node_id=r.node_id,
                memory_bytes=r.memory_bytes,
                throughput=r.throughput,
                cached_blocks=frozenset(r.cached_blocks),
            )
            for r in alive.values()
        ]
        epoch = max(previous.epoch if previous else 0, self.proposed_epoch) + 1
        prev_plan = None
        if previous is not None:
            kept = [a for a in previous.assignments if a.node_id in alive]
            if kept:
                prev_plan = Plan(
                    previous.epoch,
                    tuple(
                        PlanAssignment(a.node_id, LayerRange(a.start, a.stop)) for a in previous.assignments
                    ),
                )
        try:
            plan = plan_partition(
                caps, model.sizes, epoch=epoch, reserve_bytes=self.reserve_bytes, previous=prev_plan
            )
        except PlanError as e:
            if rebalance:  # the current plan still stands
                res.description = (
                    f"cannot plan in {', '.join(sorted(set(alive) - self._planned(previous)))}: {e}"
                )
                return res
            res.waiting_reason = f"cannot plan: {e}"
            res.description = f"waiting: {res.waiting_reason}"
            return res
        if rebalance and prev_plan is not None:
            now_cost = plan_bottleneck(prev_plan, caps, model.sizes)
            new_cost = plan_bottleneck(plan, caps, model.sizes)
            if not new_cost < now_cost * (1 - REBALANCE_GAIN):
                idle = ", ".join(sorted(set(alive) - self._planned(previous)))
                res.description = (
                    f"{idle} kept spare: planning it in would make the bottleneck {new_cost:.4g}, "
                    f"now {now_cost:.4g} (a re-plan needs {REBALANCE_GAIN:.0%} better)"
                )
                return res
        entry = PlanEntry(
            epoch=epoch,
            term=term,
            manifest_root=model.manifest_root,
            num_units=model.num_units,
            num_blocks=len(model.sizes.block_bytes),
            assignments=tuple(Assignment(a.node_id, a.layers.start, a.layers.stop) for a in plan.assignments),
        )
        self.proposed_epoch = epoch
        res.proposals.append(entry)
        why = (
            f"{', '.join(sorted(dead))} dead"
            if dead
            else "first plan"
            if previous is None
            else f"rebalancing for {', '.join(sorted(set(alive) - self._planned(previous)))}"
            if rebalance
            else "membership"
        )
        res.description = f"planning epoch {epoch} ({why}): " + ", ".join(
            f"{a.node_id} {a.start}-{a.stop - 1}" for a in entry.assignments
        )
        return res
