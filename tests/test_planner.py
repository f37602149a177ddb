"""Planner: examples, error messages, and brute-force property tests over small clusters.

The brute force below enumerates every plan for a node order (every subset of the nodes, in order,
times every split of the blocks into that many non-empty contiguous ranges) and computes stage bytes,
fit, cost and kept units itself, so the planner is checked against an independent oracle.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from butterfly.planner import (
    Assignment,
    LayerRange,
    ModelSizes,
    NodeCapacity,
    Plan,
    PlanError,
    candidate_orders,
    plan_bottleneck,
    plan_for_order,
    plan_partition,
    stage_bytes,
    validate_plan,
)

GiB = 1 << 30


def sizes_of(plan: Plan) -> list[int]:
    return [len(a.layers) for a in plan.assignments]


# ---------------------------------------------------------------- value types


def test_layer_range_prints_the_seed_form_and_parses_back() -> None:
    r = LayerRange(27, 54)
    assert str(r) == "27-53"
    assert LayerRange.parse("27-53") == r
    assert len(r) == 27 and 27 in r and 54 not in r and 26 not in r
    for bad in [(5, 5), (-1, 3), (4, 2)]:
        with pytest.raises(ValueError):
            LayerRange(*bad)
    assert LayerRange.parse("5") == LayerRange(5, 6)
    for text in ["a-b", "-3", "3-", "5-3", ""]:
        with pytest.raises(ValueError):
            LayerRange.parse(text)
    with pytest.raises(TypeError):
        LayerRange(0, 2.0)  # type: ignore[arg-type]


def test_plan_rejects_gaps_overlaps_and_repeats() -> None:
    a, b = Assignment("a", LayerRange(0, 3)), Assignment("b", LayerRange(3, 5))
    assert Plan(1, (a, b)).num_blocks == 5
    with pytest.raises(ValueError, match="expected 3"):
        Plan(1, (a, Assignment("b", LayerRange(4, 5))))
    with pytest.raises(ValueError, match="expected 3"):
        Plan(1, (a, Assignment("b", LayerRange(2, 5))))
    with pytest.raises(ValueError, match="expected 0"):
        Plan(1, (Assignment("a", LayerRange(1, 3)),))
    with pytest.raises(ValueError, match="twice"):
        Plan(1, (a, Assignment("a", LayerRange(3, 5))))
    with pytest.raises(ValueError):
        Plan(1, ())
    plan = Plan(7, (a, b))
    assert plan.range_of("b") == LayerRange(3, 5) and plan.range_of("zz") is None
    assert str(plan) == "epoch 7: a=0-2 b=3-4"


def test_node_capacity_validates_and_stays_hashable() -> None:
    n = NodeCapacity("a", 10, 1.0, cached_blocks={1, 2})
    assert n.cached_blocks == frozenset({1, 2}) and hash(n) == hash(NodeCapacity("a", 10, 1.0, {2, 1}))
    for tp in [0.0, -1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="throughput"):
            NodeCapacity("a", 10, tp)
    with pytest.raises(ValueError):
        NodeCapacity("a", -1, 1.0)
    with pytest.raises(ValueError):
        NodeCapacity("", 1, 1.0)
    with pytest.raises(ValueError):
        ModelSizes(block_bytes=(), embed_bytes=0, head_bytes=0)
    with pytest.raises(ValueError):
        ModelSizes(block_bytes=(1, -1), embed_bytes=0, head_bytes=0)


def test_stage_bytes_counts_embeddings_head_and_tied_embeddings_once_per_stage() -> None:
    m = ModelSizes(block_bytes=(10, 20, 30), embed_bytes=5, head_bytes=3, tied_embeddings=True)
    assert stage_bytes(m, LayerRange(0, 1), first=True, last=False) == 15
    assert stage_bytes(m, LayerRange(1, 2), first=False, last=False) == 20
    assert stage_bytes(m, LayerRange(2, 3), first=False, last=True) == 38  # head + tied embeddings
    assert stage_bytes(m, LayerRange(0, 3), first=True, last=True) == 68  # embeddings held once


# ---------------------------------------------------------------- examples


def test_seed_example_three_equal_nodes_eighty_layers() -> None:
    nodes = [NodeCapacity(i, 100 * GiB, 1.0) for i in "abc"]
    model = ModelSizes(block_bytes=(GiB,) * 80, embed_bytes=0, head_bytes=0)
    plan = plan_partition(nodes, model, epoch=1)
    assert sorted(sizes_of(plan)) == [26, 27, 27]
    assert plan_bottleneck(plan, nodes, model) == 27 * GiB


def test_seventy_b_on_two_80_gb_gpus_is_memory_bound() -> None:
    nodes = [NodeCapacity("gpu0", 80 * 10**9, 1.0), NodeCapacity("gpu1", 80 * 10**9, 1.0)]
    model = ModelSizes(block_bytes=(1_750_000_000,) * 80, embed_bytes=500_000_000, head_bytes=500_000_000)
    plan = plan_partition(nodes, model, epoch=1)
    assert sizes_of(plan) == [40, 40]
    validate_plan(plan, nodes, model)
    # 4 GB of reserve each leaves 152 GB for 141 GB of weights, but 40 blocks + embeddings = 70.5
    # GB and the rest 71.5 GB: still fits at 76 GB per node.
    validate_plan(
        plan_partition(nodes, model, epoch=1, reserve_bytes=4 * 10**9), nodes, model, reserve_bytes=4 * 10**9
    )


def test_a_node_is_left_out_only_when_using_it_would_worsen_the_bottleneck() -> None:
    model = ModelSizes(block_bytes=(10,) * 4, embed_bytes=0, head_bytes=0)
    fast = [NodeCapacity("f1", 1000, 10.0), NodeCapacity("f2", 1000, 10.0)]
    slow = NodeCapacity("slow", 1000, 1.0)
    plan = plan_partition([*fast, slow], model, epoch=1)
    assert plan.node_ids == ("f1", "f2")  # one block on "slow" would cost 10 > 2
    assert plan_bottleneck(plan, [*fast, slow], model) == 2.0
    # Four equal nodes and ten blocks: the bottleneck is 3 blocks either way, so all four are used.
    four = [NodeCapacity(f"n{i}", 1000, 1.0) for i in range(4)]
    plan = plan_partition(four, ModelSizes(block_bytes=(10,) * 10, embed_bytes=0, head_bytes=0), epoch=1)
    assert len(plan.assignments) == 4 and sorted(sizes_of(plan)) == [2, 2, 3, 3]


def test_slack_is_spread_instead_of_piled_on_the_first_nodes() -> None:
    # The embeddings force the bottleneck (embeddings + 1 block on whoever is first); every other
    # node could take 11 blocks, but the 19 remaining blocks are shared out evenly.
    nodes = [NodeCapacity(f"n{i}", 10**6, 1.0) for i in range(5)]
    model = ModelSizes(block_bytes=(10,) * 20, embed_bytes=100, head_bytes=0)
    plan = plan_partition(nodes, model, epoch=1)
    assert plan_bottleneck(plan, nodes, model) == 110
    rest = sizes_of(plan)[1:]
    assert len(rest) == 4 and max(rest) - min(rest) <= 1


def test_heterogeneous_throughput_gets_proportional_shares() -> None:
    nodes = [NodeCapacity("big", 10**9, 3.0), NodeCapacity("small", 10**9, 1.0)]
    model = ModelSizes(block_bytes=(100,) * 40, embed_bytes=0, head_bytes=0)
    plan = plan_partition(nodes, model, epoch=1)
    assert dict(zip(plan.node_ids, sizes_of(plan), strict=True)) == {"big": 30, "small": 10}


# ---------------------------------------------------------------- impossible plans


def test_model_larger_than_the_cluster_reports_needed_and_available() -> None:
    nodes = [NodeCapacity("a", 100, 1.0), NodeCapacity("b", 100, 1.0)]
    model = ModelSizes(block_bytes=(50,) * 4, embed_bytes=10, head_bytes=10)
    with pytest.raises(PlanError, match=r"needs at least 220 bytes.*offer 180 bytes.*reserve of 10 bytes"):
        plan_partition(nodes, model, epoch=1, reserve_bytes=10)


def test_a_block_larger_than_every_node_names_the_block() -> None:
    nodes = [NodeCapacity("a", 100, 1.0), NodeCapacity("b", 120, 1.0)]
    model = ModelSizes(block_bytes=(10, 130, 10), embed_bytes=0, head_bytes=0)
    with pytest.raises(PlanError, match=r"block 1 alone needs 130 bytes.*largest node \(b\) offers 120"):
        plan_partition(nodes, model, epoch=1)


def test_embeddings_and_head_that_fit_nowhere_are_named() -> None:
    nodes = [NodeCapacity("a", 100, 1.0)] * 1 + [NodeCapacity("b", 100, 1.0)]
    with pytest.raises(PlanError, match=r"first stage needs embeddings \+ block 0 = 101 bytes"):
        plan_partition(nodes, ModelSizes(block_bytes=(10,) * 3, embed_bytes=91, head_bytes=0), epoch=1)
    tied = ModelSizes(block_bytes=(10,) * 3, embed_bytes=50, head_bytes=45, tied_embeddings=True)
    with pytest.raises(PlanError, match=r"last stage needs head \+ tied embeddings \+ block 2 = 105 bytes"):
        plan_partition(nodes, tied, epoch=1)


def test_fragmentation_is_reported_when_the_total_would_fit() -> None:
    # 3 blocks of 60 bytes, two nodes of 100: 180 <= 200, but no node holds two blocks.
    nodes = [NodeCapacity("a", 100, 1.0), NodeCapacity("b", 100, 1.0)]
    with pytest.raises(PlanError, match=r"whole contiguous ranges.*180 bytes.*offer 200 bytes"):
        plan_partition(nodes, ModelSizes(block_bytes=(60,) * 3, embed_bytes=0, head_bytes=0), epoch=1)


def test_malformed_input_is_a_value_error() -> None:
    model = ModelSizes(block_bytes=(1,), embed_bytes=0, head_bytes=0)
    with pytest.raises(PlanError, match="no nodes"):
        plan_partition([], model, epoch=1)
    with pytest.raises(ValueError, match="duplicate"):
        plan_partition([NodeCapacity("a", 9, 1.0), NodeCapacity("a", 9, 2.0)], model, epoch=1)
    with pytest.raises(ValueError, match="reserve"):
        plan_partition([NodeCapacity("a", 9, 1.0)], model, epoch=1, reserve_bytes=-1)
    with pytest.raises(ValueError, match="cached block 3"):
        plan_partition([NodeCapacity("a", 9, 1.0, {3})], model, epoch=1)


def test_validate_plan_catches_a_stage_that_does_not_fit() -> None:
    nodes = [NodeCapacity("a", 100, 1.0), NodeCapacity("b", 30, 1.0)]
    model = ModelSizes(block_bytes=(20,) * 4, embed_bytes=0, head_bytes=0)
    bad = Plan(1, (Assignment("a", LayerRange(0, 2)), Assignment("b", LayerRange(2, 4))))
    with pytest.raises(PlanError, match="node b needs 40 bytes for blocks 2-3 but offers 30"):
        validate_plan(bad, nodes, model)
    with pytest.raises(PlanError, match="covers 4 blocks"):
        validate_plan(bad, nodes, ModelSizes(block_bytes=(1,) * 5, embed_bytes=0, head_bytes=0))


# ---------------------------------------------------------------- re-plans


def test_replan_after_losing_a_node_keeps_the_most_blocks_in_place() -> None:
    nodes = [NodeCapacity(f"n{i}", 10**6, 1.0) for i in range(4)]
    model = ModelSizes(block_bytes=(10,) * 80, embed_bytes=5, head_bytes=5)
    before = plan_partition(nodes, model, epoch=1)
    assert sizes_of(before) == [20, 20, 20, 20]
    survivors = nodes[:3]
    after = plan_partition(survivors, model, epoch=2, previous=before)
    fresh = plan_partition(survivors, model, epoch=2)
    assert plan_bottleneck(after, survivors, model) == plan_bottleneck(fresh, survivors, model)
    best = max(
        _kept(p, survivors, model, before)
        for p in _all_plans(survivors, model, 0)
        if p.cost <= plan_bottleneck(fresh, survivors, model) * 1.01
    )
    assert _kept(_as_brute(after, survivors, model), survivors, model, before) == best
    assert best > _kept(_as_brute(fresh, survivors, model), survivors, model, before)


def test_tolerance_trades_a_little_bottleneck_for_fewer_moves() -> None:
    # Big embeddings make "embeddings + 1 block" the bottleneck. When the first node dies, a fresh
    # plan shifts most blocks by one node; the sticky optimum moves two nodes; 1% worse moves one.
    nodes = [NodeCapacity(f"n{i:02d}", 10**9, 1.0) for i in range(20)]
    model = ModelSizes(block_bytes=(10**3,) * 20, embed_bytes=400 * 10**3, head_bytes=0)
    before = plan_partition(nodes, model, epoch=1)
    assert sizes_of(before) == [1] * 20
    survivors = nodes[1:]

    def moved(plan: Plan) -> list[str]:
        return [a.node_id for a in plan.assignments if a.layers != before.range_of(a.node_id)]

    fresh = plan_partition(survivors, model, epoch=2)
    strict = plan_partition(survivors, model, epoch=2, previous=before, stickiness_tolerance=0.0)
    sticky = plan_partition(survivors, model, epoch=2, previous=before)
    optimum = plan_bottleneck(strict, survivors, model)
    assert optimum == plan_bottleneck(fresh, survivors, model) == 401 * 10**3
    assert len(moved(fresh)) > 10
    assert moved(strict) == ["n01", "n02"]  # n02 takes over block 1 beside its own block 2
    assert moved(sticky) == ["n01"]  # n01 keeps block 1 and adds block 0 with the embeddings
    assert plan_bottleneck(sticky, survivors, model) == 402 * 10**3 <= optimum * 1.01


def test_unchanged_inputs_replan_to_the_same_plan_at_scale() -> None:
    rng = random.Random(7)
    nodes = [
        NodeCapacity(f"n{i:03d}", rng.randint(5, 60) * GiB, rng.choice([1.0, 2.0, 4.0])) for i in range(60)
    ]
    model = ModelSizes(
        block_bytes=tuple(rng.randint(8, 12) * GiB // 10 for _ in range(200)),
        embed_bytes=GiB,
        head_bytes=GiB,
        tied_embeddings=True,
    )
    first = plan_partition(nodes, model, epoch=1)
    again = plan_partition(list(reversed(nodes)), model, epoch=2, previous=first)
    assert again.assignments == first.assignments and again.epoch == 2
    validate_plan(again, nodes, model)


def test_cached_blocks_attract_their_blocks_when_the_bottleneck_allows() -> None:
    nodes = [NodeCapacity("a", 1000, 1.0), NodeCapacity("b", 1000, 1.0, cached_blocks={0, 1, 2, 3})]
    model = ModelSizes(block_bytes=(10,) * 8, embed_bytes=0, head_bytes=0)
    plan = plan_partition(nodes, model, epoch=1, stickiness_tolerance=0.0)
    assert plan.range_of("b") == LayerRange(0, 4)


def test_a_previous_plan_for_another_model_is_ignored() -> None:
    nodes = [NodeCapacity(f"n{i}", 1000, 1.0) for i in range(3)]
    model = ModelSizes(block_bytes=(10,) * 9, embed_bytes=0, head_bytes=0)
    old = Plan(1, (Assignment("n2", LayerRange(0, 6)), Assignment("n0", LayerRange(6, 7))))
    assert plan_partition(nodes, model, epoch=2, previous=old) == plan_partition(nodes, model, epoch=2)


# ---------------------------------------------------------------- brute force oracle


@dataclass(frozen=True)
class Brute:
    stages: tuple[tuple[str, int, int], ...]  # (node id, start, stop) in pipeline order
    cost: float

    @property
    def used(self) -> int:
        return len(self.stages)


def _stage_size(model: ModelSizes, q: int, p: int, first: bool, last: bool) -> int:
    size = sum(model.block_bytes[q:p])
    size += model.embed_bytes if first else 0
    size += model.head_bytes if last else 0
    size += model.embed_bytes if (last and not first and model.tied_embeddings) else 0
    return size


def _all_plans(order: Sequence[NodeCapacity], model: ModelSizes, reserve: int) -> Iterator[Brute]:
    L = len(model.block_bytes)
    for k in range(1, min(len(order), L) + 1):
        for chosen in itertools.combinations(order, k):
            for cuts in itertools.combinations(range(1, L), k - 1):
                bounds = (0, *cuts, L)
                stages, cost, ok = [], 0.0, True
                for s, node in enumerate(chosen):
                    q, p = bounds[s], bounds[s + 1]
                    size = _stage_size(model, q, p, s == 0, s == k - 1)
                    if size > node.memory_bytes - reserve:
                        ok = False
                        break
                    cost = max(cost, size / node.throughput)
                    stages.append((node.node_id, q, p))
                if ok:
                    yield Brute(tuple(stages), cost)


def _kept(plan: Brute, nodes: Sequence[NodeCapacity], model: ModelSizes, previous: Plan | None) -> int:
    L = len(model.block_bytes)
    prev = previous if previous is not None and previous.num_blocks == L else None
    by_id = {n.node_id: n for n in nodes}
    kept = 0
    for node_id, q, p in plan.stages:
        old = prev.range_of(node_id) if prev else None
        for b in range(q, p):
            kept += b in by_id[node_id].cached_blocks or (old is not None and b in old)
        if prev and q == 0 and prev.assignments[0].node_id == node_id:
            kept += 1
        if prev and p == L and prev.assignments[-1].node_id == node_id:
            kept += 1
    return kept


def _as_brute(plan: Plan, nodes: Sequence[NodeCapacity], model: ModelSizes) -> Brute:
    return Brute(
        tuple((a.node_id, a.layers.start, a.layers.stop) for a in plan.assignments),
        plan_bottleneck(plan, nodes, model),
    )


def _expected(
    orders: Sequence[Sequence[NodeCapacity]],
    model: ModelSizes,
    reserve: int,
    previous: Plan | None,
    tolerance: float,
) -> tuple[float, float, int, int] | None:
    """(optimum, bound the plan must meet, kept units, nodes used) per the documented objectives."""
    plans = [p for order in orders for p in _all_plans(order, model, reserve)]
    if not plans:
        return None
    nodes = list(orders[0])
    optimum = min(p.cost for p in plans)
    k0 = max(_kept(p, nodes, model, previous) for p in plans if p.cost <= optimum)
    allowed = optimum * (1.0 + tolerance)
    k1 = max(_kept(p, nodes, model, previous) for p in plans if p.cost <= allowed)
    bound, kept = (allowed, k1) if (tolerance > 0 and k1 > k0) else (optimum, k0)
    used = max(p.used for p in plans if p.cost <= bound and _kept(p, nodes, model, previous) == kept)
    return optimum, bound, kept, used


THROUGHPUTS = [0.5, 1.0, 1.5, 2.0, 3.0]


@st.composite
def clusters(
    draw: st.DrawFn, max_nodes: int = 4, max_blocks: int = 7
) -> tuple[list[NodeCapacity], ModelSizes, int]:
    L = draw(st.integers(1, max_blocks))
    blocks = tuple(draw(st.lists(st.integers(0, 20), min_size=L, max_size=L)))
    model = ModelSizes(
        block_bytes=blocks,
        embed_bytes=draw(st.integers(0, 15)),
        head_bytes=draw(st.integers(0, 15)),
        tied_embeddings=draw(st.booleans()),
    )
    n = draw(st.integers(1, max_nodes))
    nodes = [
        NodeCapacity(
            f"n{i}",
            draw(st.integers(0, 100)),
            draw(st.sampled_from(THROUGHPUTS)),
            frozenset(draw(st.sets(st.integers(0, L - 1), max_size=2)))
            if draw(st.booleans())
            else frozenset(),
        )
        for i in range(n)
    ]
    return nodes, model, draw(st.integers(0, 10))


def _check_plan_against(
    plan: Plan,
    expect: tuple[float, float, int, int],
    nodes: Sequence[NodeCapacity],
    model: ModelSizes,
    reserve: int,
    previous: Plan | None,
) -> None:
    optimum, bound, kept, used = expect
    validate_plan(plan, nodes, model, reserve_bytes=reserve)  # covers [0, L) in order, every stage fits
    got = _as_brute(plan, nodes, model)
    assert got.cost <= bound
    assert _kept(got, nodes, model, previous) == kept
    assert got.used == used
    if bound == optimum:
        assert got.cost == optimum  # no better bottleneck exists


@settings(max_examples=250, deadline=None)
@given(cluster=clusters(), data=st.data())
def test_fixed_order_plan_is_optimal_against_brute_force(
    cluster: tuple[list[NodeCapacity], ModelSizes, int], data: st.DataObject
) -> None:
    nodes, model, reserve = cluster
    order = data.draw(st.permutations(nodes))
    expect = _expected([order], model, reserve, None, 0.01)
    if expect is None:
        with pytest.raises(PlanError):
            plan_for_order(order, model, epoch=3, reserve_bytes=reserve)
        return
    plan = plan_for_order(order, model, epoch=3, reserve_bytes=reserve)
    assert plan.epoch == 3
    ids = [n.node_id for n in order]
    assert [ids.index(i) for i in plan.node_ids] == sorted(ids.index(i) for i in plan.node_ids)
    _check_plan_against(plan, expect, order, model, reserve, None)


@st.composite
def previous_plans(draw: st.DrawFn, nodes: Sequence[NodeCapacity], L: int) -> Plan | None:
    if not draw(st.booleans()):
        return None
    ids = [n.node_id for n in nodes] + ["gone"]  # a node that has since left the cluster
    chosen = draw(st.permutations(ids))[: draw(st.integers(1, min(len(ids), L)))]
    cuts = (
        sorted(draw(st.sets(st.integers(1, L - 1), min_size=len(chosen) - 1, max_size=len(chosen) - 1)))
        if L > 1
        else []
    )
    if len(cuts) != len(chosen) - 1:
        return None
    bounds = [0, *cuts, L]
    return Plan(0, tuple(Assignment(i, LayerRange(bounds[k], bounds[k + 1])) for k, i in enumerate(chosen)))


@settings(max_examples=250, deadline=None)
@given(cluster=clusters(), data=st.data())
def test_replan_stickiness_matches_brute_force(
    cluster: tuple[list[NodeCapacity], ModelSizes, int], data: st.DataObject
) -> None:
    nodes, model, reserve = cluster
    previous = data.draw(previous_plans(nodes, len(model.block_bytes)))
    tolerance = data.draw(st.sampled_from([0.0, 0.01, 0.25]))
    expect = _expected([nodes], model, reserve, previous, tolerance)
    if expect is None:
        return
    plan = plan_for_order(
        nodes, model, epoch=1, reserve_bytes=reserve, previous=previous, stickiness_tolerance=tolerance
    )
    _check_plan_against(plan, expect, nodes, model, reserve, previous)


@settings(max_examples=200, deadline=None)
@given(cluster=clusters(), data=st.data())
def test_partition_is_best_over_its_candidate_orders_and_order_independent(
    cluster: tuple[list[NodeCapacity], ModelSizes, int], data: st.DataObject
) -> None:
    nodes, model, reserve = cluster
    previous = data.draw(previous_plans(nodes, len(model.block_bytes)))
    by_id = {n.node_id: n for n in nodes}
    orders = [[by_id[i] for i in o] for o in candidate_orders(nodes, previous)]
    expect = _expected(orders, model, reserve, previous, 0.01)
    if expect is None:
        with pytest.raises(PlanError):
            plan_partition(nodes, model, epoch=1, reserve_bytes=reserve, previous=previous)
        return
    plan = plan_partition(nodes, model, epoch=1, reserve_bytes=reserve, previous=previous)
    _check_plan_against(plan, expect, nodes, model, reserve, previous)
    shuffled = data.draw(st.permutations(nodes))
    assert plan_partition(shuffled, model, epoch=1, reserve_bytes=reserve, previous=previous) == plan
    # Re-planning the unchanged cluster with this plan as the previous one is never worse: the
    # previous plan's order is the re-plan's first candidate (and may beat the first plan's orders,
    # which are a heuristic), and ties on bottleneck and kept units may resolve otherwise when
    # cached blocks count as kept too (both found by this property in CI).
    again = plan_partition(shuffled, model, epoch=2, reserve_bytes=reserve, previous=plan)
    assert plan_bottleneck(again, nodes, model) <= plan_bottleneck(plan, nodes, model)


def test_a_replan_moves_an_unchanged_cluster_only_for_a_strictly_smaller_bottleneck() -> None:
    # Found by the property above in CI: the first plan's candidate orders (canonical, memory first)
    # missed n1, n0, n2; the re-plan tries the previous plan's order first and finds 2.0 instead of 3.0.
    nodes = [
        NodeCapacity("n0", 4, 0.5, frozenset()),
        NodeCapacity("n1", 3, 1.0, frozenset()),
        NodeCapacity("n2", 1, 1.5, frozenset()),
    ]
    model = ModelSizes(block_bytes=(0, 1, 0), embed_bytes=2, head_bytes=1, tied_embeddings=False)
    first = plan_partition(nodes, model, epoch=1, reserve_bytes=0)
    again = plan_partition(nodes, model, epoch=2, reserve_bytes=0, previous=first)
    assert plan_bottleneck(again, nodes, model) < plan_bottleneck(first, nodes, model)
    assert (
        plan_partition(nodes, model, epoch=3, reserve_bytes=0, previous=again).assignments
        == again.assignments
    )


@settings(max_examples=80, deadline=None)
@given(cluster=clusters(max_nodes=5, max_blocks=8), data=st.data())
def test_losing_a_node_keeps_as_much_as_any_plan_could(
    cluster: tuple[list[NodeCapacity], ModelSizes, int], data: st.DataObject
) -> None:
    nodes, model, reserve = cluster
    try:
        before = plan_partition(nodes, model, epoch=1, reserve_bytes=reserve)
    except PlanError:
        return
    lost = data.draw(st.sampled_from(before.node_ids))
    survivors = [n for n in nodes if n.node_id != lost]
    by_id = {n.node_id: n for n in survivors}
    orders = [[by_id[i] for i in o] for o in candidate_orders(survivors, before)] if survivors else []
    expect = _expected(orders, model, reserve, before, 0.01) if orders else None
    if expect is None:
        return
    after = plan_partition(survivors, model, epoch=2, reserve_bytes=reserve, previous=before)
    _check_plan_against(after, expect, survivors, model, reserve, before)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 4),
    L=st.integers(1, 7),
    block=st.integers(1, 20),
    mems=st.lists(st.integers(0, 100), min_size=4, max_size=4),
    tps=st.lists(st.sampled_from(THROUGHPUTS), min_size=4, max_size=4),
)
def test_uniform_blocks_without_extras_match_the_best_over_all_orders(
    n: int, L: int, block: int, mems: list[int], tps: list[float]
) -> None:
    # With equal blocks and no embeddings/head, a node's share is floor(cap / block) whatever its
    # position, so the canonical order loses nothing against every permutation.
    nodes = [NodeCapacity(f"n{i}", mems[i], tps[i]) for i in range(n)]
    model = ModelSizes(block_bytes=(block,) * L, embed_bytes=0, head_bytes=0)
    costs = [p.cost for order in itertools.permutations(nodes) for p in _all_plans(order, model, 0)]
    if not costs:
        with pytest.raises(PlanError):
            plan_partition(nodes, model, epoch=1)
        return
    assert plan_bottleneck(plan_partition(nodes, model, epoch=1), nodes, model) == min(costs)
