"""`butterfly-admin`: operator commands.

Exit status: 0 success, 1 the command ran and found a problem (node FAILED, a check failed, ...),
2 usage error, 3 node unreachable, 4 ``watch`` timed out, 78 bad config (see ``admin_client``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from butterfly.weights.testmodel import make_test_model

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
    except OSError as e:  # a full or read-only disk: the partial directory is already gone
        where = f": {e.filename}" if e.filename else ""
        print(
            f"butterfly-admin make-test-model: cannot write {args.dir}: {e.strerror or e}{where}",
            file=sys.stderr,
        )
        return 1
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    print(
        f"wrote a {args.layers}-layer Llama test model ({size / 2**20:.1f} MiB) with its tokenizer and "
        f"manifest to {out}"
    )
    return 0


def cmd_secret_create(args: argparse.Namespace) -> int:
    from butterfly.net.auth import generate_secret

    if not args.path.strip():
        print("butterfly-admin secret create: the path is empty; name the file to write", file=sys.stderr)
        return 2
    path = Path(args.path)
    if path.is_dir():
        print(f"butterfly-admin secret create: {path} is a directory; name a file in it", file=sys.stderr)
        return 1
    try:
        generate_secret(path)
    except FileExistsError:
        print(
            f"butterfly-admin secret create: {path} already exists; a cluster's secret is never overwritten "
            "(remove it first if you mean to replace it on every node)",
            file=sys.stderr,
        )
        return 1
    except OSError as e:
        print(f"butterfly-admin secret create: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(
        f"wrote a new cluster secret to {path} (mode 0600); copy the same file to every node and set "
        "[security] secret_file to it"
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

    sec = sub.add_parser("secret", help="the cluster secret every node authenticates with")
    secsub = sec.add_subparsers(dest="secret_command", required=True)
    sc = secsub.add_parser(
        "create", help="write a new random cluster secret (32 bytes as hex, mode 0600); never overwrites"
    )
    sc.add_argument("path", metavar="PATH")
    sc.set_defaults(func=cmd_secret_create)

    from butterfly.cli import admin_diagnose, admin_generate, admin_raft, admin_status, admin_weights

    admin_status.register(sub)
    admin_diagnose.register(sub)
    admin_weights.register(sub)
    admin_raft.register(sub)
    admin_generate.register(sub)
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
