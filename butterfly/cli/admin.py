"""`butterfly-admin`: operator commands.

Exit status: 0 success, 1 the command ran and found a problem (node not reachable, ...),
2 usage error, 78 bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from butterfly.model.testmodel import make_test_model

    out = make_test_model(
        Path(args.dir),
        layers=args.layers,
        hidden=args.hidden,
        vocab=args.vocab,
        shards=args.shards,
        dtype=args.dtype,
        seed=args.seed,
        tie_embeddings=args.tie_embeddings,
    )
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    print(f"wrote a {args.layers}-layer Llama test model ({size / 2**20:.1f} MiB) to {out}")
    return 0


def fetch_status(url: str, timeout: float = 3.0) -> dict[str, object]:
    with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as resp:
        data = json.loads(resp.read())
    if not isinstance(data, dict):
        raise ValueError("the node's /status is not a JSON object")
    return data


def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = fetch_status(args.url)
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"butterfly-admin: cannot read {args.url}/status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for key in (
        "node_id",
        "state",
        "phase",
        "progress_percent",
        "eta_seconds",
        "cluster_size",
        "coordinator",
        "term",
        "epoch",
        "model_root",
        "waiting_reason",
        "last_error",
    ):
        if st.get(key) is not None:
            print(f"{key:>18}: {st[key]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="butterfly-admin", description="Operate a Butterfly node.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-test-model", help="write a small deterministic Llama checkpoint (HF layout)")
    m.add_argument("dir")
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--vocab", type=int, default=2048)
    m.add_argument("--shards", type=int, default=2)
    m.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tie-embeddings", action="store_true")
    m.set_defaults(func=cmd_make_test_model)

    s = sub.add_parser("status", help="show a node's /status")
    s.add_argument("--url", default="http://127.0.0.1:8080")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    from butterfly.cli import admin_weights

    admin_weights.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:
        print(f"butterfly-admin: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
