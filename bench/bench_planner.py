"""Planner timings: fresh plans and re-plans for 10x80, 100x1000 and 1000x1000 (nodes x blocks).

Run: ``python bench/bench_planner.py [--repeat N]``. Prints the best and median wall time of
``plan_partition`` per case; asserts nothing (the target, "1,000 nodes x 1,000 layers well under a
second", is read off the table). Clusters are generated from a fixed seed so runs compare.

Cases per size:
  fresh        heterogeneous memory and throughput, no previous plan
  replan-same  the same cluster with its own plan as ``previous`` (the common no-op re-plan)
  replan-minus a middle node of the plan has died; the survivors re-plan with ``previous``
  warm-cache   cold start where every node has the blocks of a reference plan cached
  wide         embeddings force the bottleneck, so every node has a lot of slack (widest DP band)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from butterfly.planner import (  # noqa: E402
    ModelSizes,
    NodeCapacity,
    Plan,
    plan_bottleneck,
    plan_partition,
)

GB = 10**9


def cluster(n: int, layers: int, seed: int) -> tuple[list[NodeCapacity], ModelSizes]:
    rng = random.Random(seed)
    nodes = [
        NodeCapacity(
            f"node-{i:04d}", rng.choice([16, 24, 40, 80, 141]) * GB, rng.choice([1.0, 2.5, 4.0, 10.0])
        )
        for i in range(n)
    ]
    # Block size so the model needs about 60% of the cluster's memory: planning is not trivial.
    total_mem = sum(nd.memory_bytes for nd in nodes)
    block = int(total_mem * 0.6 / layers)
    blocks = tuple(int(block * rng.uniform(0.95, 1.05)) for _ in range(layers))
    return nodes, ModelSizes(blocks, embed_bytes=block // 2, head_bytes=block // 2, tied_embeddings=False)


def timed(fn: Callable[[], Plan], repeat: int) -> tuple[list[float], Plan]:
    times, plan = [], fn()
    for _ in range(repeat):
        t0 = time.perf_counter()
        plan = fn()
        times.append(time.perf_counter() - t0)
    return times, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    print(f"{'case':<26}{'best ms':>10}{'median ms':>11}{'stages':>8}  bottleneck")
    for n, layers in [(10, 80), (100, 1000), (1000, 1000)]:
        nodes, model = cluster(n, layers, seed=n * 7919 + layers)
        base = plan_partition(nodes, model, epoch=1)
        victim = base.assignments[len(base.assignments) // 2].node_id
        survivors = [nd for nd in nodes if nd.node_id != victim]
        warm = [
            NodeCapacity(
                nd.node_id,
                nd.memory_bytes,
                nd.throughput,
                frozenset(range(r.start, r.stop)) if (r := base.range_of(nd.node_id)) else frozenset(),
            )
            for nd in nodes
        ]
        wide_nodes = [NodeCapacity(f"w-{i:04d}", 10**13, 1.0) for i in range(n)]
        wide_model = ModelSizes((10**6,) * layers, embed_bytes=layers * 10**6 // 2, head_bytes=10**6)
        # (name, nodes, model, previous): bound per case so each timing sees exactly its own inputs
        cases: list[tuple[str, list[NodeCapacity], ModelSizes, Plan | None]] = [
            ("fresh", nodes, model, None),
            ("replan-same", nodes, model, base),
            ("replan-minus", survivors, model, base),
            ("warm-cache", warm, model, None),
            ("wide", wide_nodes, wide_model, None),
        ]
        for name, cnodes, cmodel, previous in cases:
            times, plan = timed(
                partial(plan_partition, cnodes, cmodel, epoch=2, previous=previous), args.repeat
            )
            label = f"{n}x{layers} {name}"
            print(
                f"{label:<26}{min(times) * 1e3:>10.1f}{statistics.median(times) * 1e3:>11.1f}"
                f"{len(plan.assignments):>8}  {plan_bottleneck(plan, cnodes, cmodel):.4g}"
            )


if __name__ == "__main__":
    main()
