"""`butterfly-admin` subcommands for weights: ``manifest build``, ``manifest verify``, ``clear-cache``.

Owns the command-line surface of butterfly.manifest and butterfly.cache: arguments, what is printed
and the exit status (0 success, 1 the command ran and found a problem, 2 usage error, 78 bad config
for ``clear-cache --config``). The work itself is in those modules; this one must not hash, parse
manifests or touch cache entries on its own.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

# butterfly.manifest and butterfly.cache pull in numpy and blake3 (~0.25 s): they are imported by the
# commands that need them, so `butterfly-admin status` stays quick. The help texts below restate two of
# their constants; test_admin_weights checks they agree.
MANIFEST_FILE_NAME = "butterfly-manifest.json"
DEFAULT_CHUNK_TEXT = "8M"

_SIZE = re.compile(r"(\d+)\s*([KMG]i?B?|)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _err(message: str) -> None:
    print(f"butterfly-admin: {message}", file=sys.stderr)


def parse_size(text: str) -> int:
    """``8388608``, ``8M``, ``8MiB`` or ``64K`` -> bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8M, 8MiB or 8388608)")
    return int(m.group(1)) * _UNITS[m.group(2)[:1].upper()]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_manifest_build(args: argparse.Namespace) -> int:
    from butterfly.manifest import MANIFEST_FILE, ManifestError, build_manifest, write_manifest
    from butterfly.model.safetensors import ModelFormatError
    from butterfly.sources import SourceError

    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        _err(f"{model_dir} is not a directory")
        return 2
    out = Path(args.output) if args.output else model_dir / MANIFEST_FILE
    started = time.monotonic()

    def on_file(name: str, size: int) -> None:
        print(f"  hashed {name} ({_mib(size)})", file=sys.stderr)

    try:
        manifest, stats = build_manifest(model_dir, args.chunk_bytes, on_file=on_file)
        write_manifest(manifest, out)
    except (ModelFormatError, ManifestError, SourceError, OSError) as e:
        _err(f"cannot build a manifest: {e}")
        return 1
    except ValueError as e:  # a bad --chunk-bytes
        _err(str(e))
        return 2
    seconds = time.monotonic() - started
    print(f"root:   {manifest.merkle_root}")
    print(f"units:  {manifest.num_units} (embed, {manifest.num_blocks} blocks, head)")
    print(
        f"bytes:  {stats.bytes_read} in {len(manifest.files)} files, {len(manifest.tensors)} tensors, "
        f"{manifest.chunk_bytes}-byte chunks"
    )
    print(f"time:   {seconds:.2f} s ({stats.bytes_read / max(seconds, 1e-9) / 1e6:.0f} MB/s)")
    print(f"wrote:  {out}")
    return 0


def cmd_manifest_verify(args: argparse.Namespace) -> int:
    from butterfly.manifest import MANIFEST_FILE, ManifestError, read_manifest, verify_dir

    if args.model.startswith("s3://"):
        _err("verifying an S3 prefix is not supported by this build yet; pass a model directory")
        return 2
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        _err(f"{model_dir} is not a directory")
        return 2
    path = Path(args.manifest) if args.manifest else model_dir / MANIFEST_FILE
    if not path.is_file():
        _err(f"no manifest at {path}: build one with `butterfly-admin manifest build` or pass --manifest")
        return 2
    try:
        manifest = read_manifest(path)
    except ManifestError as e:
        _err(f"refusing the manifest: {e}")
        return 1
    started = time.monotonic()
    problems = verify_dir(manifest, model_dir)
    seconds = time.monotonic() - started
    for p in problems:
        print(p)
    total = sum(f.size for f in manifest.files.values())
    if problems:
        _err(f"{model_dir} does NOT match {path}: {len(problems)} problems")
        return 1
    print(
        f"ok: {len(manifest.files)} files, {len(manifest.tensors)} tensors, {total} bytes match root "
        f"{manifest.merkle_root} ({seconds:.2f} s, {total / max(seconds, 1e-9) / 1e6:.0f} MB/s)"
    )
    return 0


def cmd_clear_cache(args: argparse.Namespace) -> int:
    from butterfly.cache import CacheBusy, CacheError, clear_cache
    from butterfly.config import EX_CONFIG, ConfigError, load_config

    if args.config is not None:
        try:
            cache_dir = load_config(args.config).node.cache_dir
        except ConfigError as e:
            _err(str(e))
            return EX_CONFIG
    else:
        cache_dir = Path(args.cache_dir)
    if not cache_dir.exists():
        print(f"{cache_dir} does not exist: nothing to remove")
        return 0
    try:
        result = clear_cache(cache_dir)
    except CacheBusy:
        _err(f"a node is using the cache in {cache_dir} (it holds the cache lock); stop it first")
        return 1
    except (CacheError, OSError) as e:
        _err(f"cannot clear {cache_dir}: {e}")
        return 1
    if args.verbose:
        for digest, size in sorted(result.removed):
            print(f"removed {digest} ({size} bytes)")
    print(
        f"removed {len(result.removed)} entries and {result.tmp_files} temp files from {cache_dir}, "
        f"freed {result.bytes_freed} bytes ({_mib(result.bytes_freed)})"
    )
    if result.left_alone:
        shown = ", ".join(str(p) for p in result.left_alone[:5])
        print(f"left alone {len(result.left_alone)} paths that are not cache entries: {shown}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``manifest`` and ``clear-cache`` to butterfly-admin's subcommands."""
    m = sub.add_parser("manifest", help="build or verify a model's manifest (digests and Merkle root)")
    msub = m.add_subparsers(dest="manifest_command", required=True)

    b = msub.add_parser("build", help=f"hash a model directory and write {MANIFEST_FILE_NAME} beside it")
    b.add_argument("model_dir", metavar="MODEL_DIR")
    b.add_argument(
        "--chunk-bytes",
        type=parse_size,
        default=parse_size(DEFAULT_CHUNK_TEXT),
        metavar="N",
        help=f"bytes per xxh3 chunk, a power of two from 64K to 256M (default {DEFAULT_CHUNK_TEXT})",
    )
    b.add_argument("--output", metavar="PATH", help=f"write here instead of MODEL_DIR/{MANIFEST_FILE_NAME}")
    b.set_defaults(func=cmd_manifest_build)

    v = msub.add_parser("verify", help="check a model directory's bytes against its manifest")
    v.add_argument("model", metavar="MODEL_DIR")
    v.add_argument("--manifest", metavar="PATH", help=f"default: MODEL_DIR/{MANIFEST_FILE_NAME}")
    v.set_defaults(func=cmd_manifest_verify)

    c = sub.add_parser("clear-cache", help="empty the weight cache (refused while a node uses it)")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="FILE", help="the node's config; clears its node.cache_dir")
    where.add_argument("--cache-dir", metavar="DIR")
    c.add_argument("-v", "--verbose", action="store_true", help="list every removed entry")
    c.set_defaults(func=cmd_clear_cache)
