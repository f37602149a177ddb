"""`butterfly-admin`: operator commands.

Exit status: 0 success, 1 the command ran and found a problem (node FAILED, a check failed, ...),
2 usage error, 3 node unreachable, 4 ``watch`` timed out, 78 bad config (see ``admin_ops``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from butterfly.model.testmodel import make_test_model

    try:
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
    except (ValueError, FileExistsError) as e:
        print(f"butterfly-admin make-test-model: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    print(
        f"wrote a {args.layers}-layer Llama test model ({size / 2**20:.1f} MiB) with its tokenizer and "
        f"manifest to {out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="butterfly-admin", description="Operate a Butterfly node.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "make-test-model",
        help="write a small deterministic Llama checkpoint (HF layout), its tokenizer and manifest",
    )
    m.add_argument("dir")
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--vocab", type=int, default=2048)
    m.add_argument("--shards", type=int, default=2)
    m.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tie-embeddings", action="store_true")
    m.set_defaults(func=cmd_make_test_model)

    from butterfly.cli import admin_ops, admin_weights

    admin_ops.register(sub)
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
