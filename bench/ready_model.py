"""A time-to-ready model for planning big clusters: start -> OPERATIONAL from per-node throughputs.

Run: ``python bench/ready_model.py --from out/bench_load.json`` (the ``--json`` of a bench_load run:
its S3, validation, loading-phase and node rows supply the figures) or give them by hand:
``python bench/ready_model.py --s3-gbps 2.5 --model-gb 140 --nodes 8``. Asserts nothing.

The model, per node i of N holding b_i = M / N bytes (the planner splits by capacity; equal nodes):

    T(N) = T_start + T_form(N) + b / min(s3, A / N) + max(0, b / v - overlap) + b / w + T_commit

  T_start   process start to the cluster child listening (fork server): measured by bench_load's node
            rows (start -> READY less the node's own loading and validation);
  T_form    discovery, election and the first plan (bench_cluster: "cluster protocol" p50 ~1.1 s at
            3 nodes; it grows with the slowest node's start, not with N, up to tens of nodes);
  s3        one node's S3 throughput (S3Source, GB/s), A the store's aggregate bandwidth (a bucket
            prefix serves several GB/s; by default unlimited);
  v         validation (BLAKE3 over the node's bytes, all cores), w warmup (one forward pass reads
            every weight once), both per node; today validation follows the stream (``--overlap``
            shows what hashing each tensor as it lands would leave: only what the stream leaves over);
  T_commit  the coordinator collecting N Merkle range proofs and committing "operational": one round
            trip and an fsync (~0.1 s).

Loading is the only term that shrinks with N; the store's aggregate bandwidth and the fixed terms
set the floor. Must not: pretend to measure; every figure it prints is computed from its inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

GB = 1e9


def _median_gbps(results: dict[str, dict[str, object]], key: str) -> float | None:
    r = results.get(key)
    if not r or not r.get("seconds"):
        return None
    secs = [float(s) for s in r["seconds"]]  # type: ignore[attr-defined]
    return float(r["bytes"]) / statistics.median(secs) / GB  # type: ignore[arg-type]


def predict(
    model_gb: float,
    nodes: int,
    s3_gbps: float,
    validate_gbps: float,
    warmup_gbps: float,
    start_s: float,
    form_s: float,
    commit_s: float,
    aggregate_gbps: float | None,
    overlap: bool,
) -> dict[str, float]:
    per_node = model_gb / nodes
    rate = s3_gbps if aggregate_gbps is None else min(s3_gbps, aggregate_gbps / nodes)
    load = per_node / rate
    validate = per_node / validate_gbps
    if overlap:
        validate = max(0.0, validate - load)
    warm = per_node / warmup_gbps
    total = start_s + form_s + load + validate + warm + commit_s
    return {"per_node_gb": per_node, "load": load, "validate": validate, "warmup": warm, "total": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", help="bench_load --json output to take figures from")
    p.add_argument("--model-gb", type=float, default=140.0, help="70B parameters in bf16: 140 GB")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--s3-gbps", type=float, help="one node's S3 throughput, GB/s")
    p.add_argument("--validate-gbps", type=float, help="validation throughput per node, GB/s")
    p.add_argument("--warmup-gbps", type=float, help="warmup throughput per node, GB/s")
    p.add_argument("--start-s", type=float, default=1.0, help="process start to listening")
    p.add_argument("--form-s", type=float, default=1.1, help="discovery + election + plan")
    p.add_argument("--commit-s", type=float, default=0.1)
    p.add_argument("--aggregate-gbps", type=float, default=None, help="the store's total bandwidth")
    p.add_argument(
        "--overlap", action="store_true", help="validation beside the stream (not yet how the node runs it)"
    )
    args = p.parse_args()

    measured: dict[str, float] = {}
    if args.source:
        results = json.loads(Path(args.source).read_text())
        for name, key in (("s3", "s3_ours"), ("validate", "validation"), ("load", "ours_alloc")):
            g = _median_gbps(results, key)
            if g is not None:
                measured[name] = g
        warm = results.get("node_warmup_gbps")
        if isinstance(warm, dict) and warm.get("seconds"):
            measured["warmup"] = float(warm["bytes"]) / statistics.median(warm["seconds"]) / GB
    s3 = args.s3_gbps or measured.get("s3") or 1.0
    validate = args.validate_gbps or measured.get("validate") or 5.0
    warmup = args.warmup_gbps or measured.get("warmup") or 5.0
    print(
        f"inputs: model {args.model_gb:.0f} GB; per node S3 {s3:.2f} GB/s, validation {validate:.2f} GB/s, "
        f"warmup {warmup:.2f} GB/s; start {args.start_s:.2f} s, formation {args.form_s:.2f} s, commit "
        f"{args.commit_s:.2f} s; store aggregate "
        f"{'unlimited' if args.aggregate_gbps is None else f'{args.aggregate_gbps:.1f} GB/s'}"
        + (f"  (measured: {', '.join(f'{k} {v:.2f} GB/s' for k, v in measured.items())})" if measured else "")
    )
    print(f"{'nodes':>5} {'GB/node':>8} {'load s':>8} {'valid. s':>8} {'warmup s':>8} {'total s':>8}")
    for n in sorted({1, 2, 3, 4, 8, 16, 32, args.nodes}):
        r = predict(
            args.model_gb,
            n,
            s3,
            validate,
            warmup,
            args.start_s,
            args.form_s,
            args.commit_s,
            args.aggregate_gbps,
            args.overlap,
        )
        mark = "  <-" if n == args.nodes else ""
        print(
            f"{n:5d} {r['per_node_gb']:8.1f} {r['load']:8.1f} {r['validate']:8.1f} {r['warmup']:8.1f} "
            f"{r['total']:8.1f}{mark}"
        )


if __name__ == "__main__":
    main()
