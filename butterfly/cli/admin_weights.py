"""`butterfly-admin` subcommands for weights: ``manifest build|verify|show|keygen|sign``, ``clear-cache``.

Owns the command-line surface of butterfly.weights (manifest, provenance, cache):
arguments, what is printed and the exit status (0 success, 1 the command ran and found a problem, 2
usage error, 78 bad config for ``--config``). The work itself is in those modules; this one must not
hash, parse manifests, sign or touch cache entries on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path

from butterfly.cli.admin_client import DEFAULT_CONFIG, print_error

# butterfly.weights.manifest and .cache pull in numpy and blake3 (~0.25 s): they are imported by
# the commands that need them, so `butterfly-admin status` stays quick. The help texts below restate two of
# their constants; test_admin_weights checks they agree.
MANIFEST_FILE_NAME = "butterfly-manifest.json"
DEFAULT_CHUNK_TEXT = "8M"

_SIZE = re.compile(r"(\d+)\s*([KMG]i?B?|)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``8388608``, ``8M``, ``8MiB`` or ``64K`` -> bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8M, 8MiB or 8388608)")
    return int(m.group(1)) * _UNITS[m.group(2)[:1].upper()]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_manifest_build(args: argparse.Namespace) -> int:
    from butterfly.weights.build import build_manifest
    from butterfly.weights.manifest import MANIFEST_FILE, ManifestError, write_manifest
    from butterfly.weights.safetensors import ModelFormatError
    from butterfly.weights.sources import SourceError

    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        print_error(f"{model_dir} is not a directory")
        return 2
    out = Path(args.output) if args.output else model_dir / MANIFEST_FILE
    started = time.monotonic()

    def on_file(name: str, size: int) -> None:
        print(f"  hashed {name} ({_mib(size)})", file=sys.stderr)

    try:
        manifest, stats = build_manifest(model_dir, args.chunk_bytes, on_file=on_file)
        write_manifest(manifest, out)
    except (ModelFormatError, ManifestError, SourceError, OSError) as e:
        print_error(f"cannot build a manifest: {e}")
        return 1
    except ValueError as e:  # a bad --chunk-bytes
        print_error(str(e))
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


def _manifest_path(args: argparse.Namespace) -> Path | None:
    """MODEL_DIR/butterfly-manifest.json or --manifest; None (said why) when there is none."""
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        print_error(f"{model_dir} is not a directory")
        return None
    path = Path(args.manifest) if args.manifest else model_dir / MANIFEST_FILE_NAME
    if not path.is_file():
        print_error(
            f"no manifest at {path}: build one with `butterfly-admin manifest build` or pass --manifest"
        )
        return None
    return path


def _signature_of(path: Path) -> bytes | None:
    from butterfly.weights.provenance import MAX_SIGNATURE_BYTES, SIGNATURE_SUFFIX

    sig = path.with_name(path.name + SIGNATURE_SUFFIX)
    if not sig.is_file():
        return None
    with open(sig, "rb") as f:
        return f.read(MAX_SIGNATURE_BYTES + 1)


def _pins(args: argparse.Namespace) -> tuple[str | None, str | None] | int:
    """(expected root, public key) from --config, overridden by the flags; an exit status on error."""
    from butterfly.config import EX_CONFIG, ConfigError, load_config
    from butterfly.weights.provenance import is_root, parse_public_key

    root = key = None
    if args.config is not None:
        try:
            model = load_config(args.config).model
        except ConfigError as e:
            print_error(str(e))
            return EX_CONFIG
        root, key = model.expected_root, model.manifest_public_key
    if args.expected_root is not None:
        if not is_root(args.expected_root):
            print_error(f"--expected-root must be 64 lowercase hex digits, not {args.expected_root!r}")
            return 2
        root = args.expected_root
    if args.public_key is not None:
        try:
            parse_public_key(args.public_key)
        except ValueError as e:
            print_error(f"--public-key is not an Ed25519 public key in base64: {e}")
            return 2
        key = args.public_key
    return root, key


def cmd_manifest_verify(args: argparse.Namespace) -> int:
    from butterfly.weights.manifest import ManifestError, decode_manifest
    from butterfly.weights.provenance import ManifestRefused, check_pins
    from butterfly.weights.verify import verify_dir

    if args.model.startswith("s3://"):
        print_error("verifying an S3 prefix is not supported by this build yet; pass a model directory")
        return 2
    pins = _pins(args)
    if isinstance(pins, int):
        return pins
    path = _manifest_path(args)
    if path is None:
        return 2
    model_dir = Path(args.model)
    try:
        raw = path.read_bytes()
        manifest = decode_manifest(raw, str(path))
        check_pins(
            raw,
            manifest.merkle_root,
            _signature_of(path),
            expected_root=pins[0],
            public_key=pins[1],
            where=str(path),
        )
    except (ManifestError, ManifestRefused, OSError) as e:
        print_error(f"refusing the manifest: {e}")
        return 1
    started = time.monotonic()
    problems = verify_dir(manifest, model_dir)
    seconds = time.monotonic() - started
    for p in problems:
        print(p)
    total = sum(f.size for f in manifest.files.values())
    if problems:
        print_error(f"{model_dir} does NOT match {path}: {len(problems)} problems")
        return 1
    print(
        f"ok: {len(manifest.files)} files, {len(manifest.tensors)} tensors, {total} bytes match root "
        f"{manifest.merkle_root} ({seconds:.2f} s, {total / max(seconds, 1e-9) / 1e6:.0f} MB/s)"
    )
    if pins[0] is not None:
        print("ok: the root is the pinned expected_root")
    if pins[1] is not None:
        print("ok: signed by the configured manifest_public_key")
    return 0


def cmd_manifest_show(args: argparse.Namespace) -> int:
    from butterfly.weights.manifest import ManifestError, read_manifest

    path = _manifest_path(args)
    if path is None:
        return 2
    try:
        manifest = read_manifest(path)
    except ManifestError as e:
        print_error(f"refusing the manifest: {e}")
        return 1
    signed = _signature_of(path) is not None
    print(f"root:     {manifest.merkle_root}")
    print(f"units:    {manifest.num_units} (embed, {manifest.num_blocks} blocks, head)")
    print(
        f"bytes:    {manifest.total_bytes} of tensors in {len(manifest.files)} files, "
        f"{len(manifest.tensors)} tensors"
    )
    print(f"signed:   {'yes, ' + path.name + '.sig' if signed else 'no'}")
    print(f'to pin this version, in [model]: expected_root = "{manifest.merkle_root}"')
    return 0


def cmd_manifest_keygen(args: argparse.Namespace) -> int:
    from butterfly.weights.provenance import generate_key_pair

    out = Path(args.private_key)
    pair = generate_key_pair()
    try:
        # O_EXCL: never overwrite a key (the manifests it signed would become unverifiable).
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print_error(f"{out} exists; refusing to overwrite a key")
        return 1
    except OSError as e:
        print_error(f"cannot write {out}: {e.strerror or e}")
        return 1
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pair.private_pem)
    except OSError as e:
        out.unlink()  # ours (O_EXCL); an empty key left behind would be refused as existing next time
        print_error(f"cannot write {out}: {e.strerror or e}")
        return 1
    print(f"wrote private key {out} (keep it off the nodes; sign with `butterfly-admin manifest sign`)")
    print("nodes verify with, in [model]:")
    print(f'manifest_public_key = "{pair.public_text}"')
    return 0


def cmd_manifest_sign(args: argparse.Namespace) -> int:
    from butterfly.weights.manifest import ManifestError, decode_manifest
    from butterfly.weights.provenance import SIGNATURE_SUFFIX, load_private_key, sign

    path = _manifest_path(args)
    if path is None:
        return 2
    try:
        key = load_private_key(Path(args.key).read_bytes())
    except (OSError, ValueError) as e:
        print_error(f"cannot use {args.key} as the signing key: {e}")
        return 1
    try:
        raw = path.read_bytes()
        manifest = decode_manifest(raw, str(path))  # never sign what a node would refuse to read
    except (ManifestError, OSError) as e:
        print_error(f"refusing to sign: {e}")
        return 1
    sig = path.with_name(path.name + SIGNATURE_SUFFIX)
    tmp = sig.with_name(f".{sig.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(sign(raw, key))
        os.replace(tmp, sig)
    except OSError as e:
        with contextlib.suppress(OSError):  # on a read-only file system unlink fails too (EROFS)
            tmp.unlink(missing_ok=True)
        print_error(f"cannot write {sig}: {e.strerror or e}")
        return 1
    print(f"signed root {manifest.merkle_root}: wrote {sig}")
    return 0


def cmd_clear_cache(args: argparse.Namespace) -> int:
    from butterfly.config import EX_CONFIG, ConfigError, load_config
    from butterfly.weights.cache import CacheBusy, CacheError, clear_cache

    if args.cache_dir is None:
        try:
            cache_dir = load_config(args.config or DEFAULT_CONFIG).node.cache_dir
        except ConfigError as e:
            print_error(str(e))
            return EX_CONFIG
    else:
        cache_dir = Path(args.cache_dir)
    if not cache_dir.exists():
        print(f"{cache_dir} does not exist: nothing to remove")
        return 0
    try:
        result = clear_cache(cache_dir)
    except CacheBusy:
        print_error(f"a node is using the cache in {cache_dir} (it holds the cache lock); stop it first")
        return 1
    except (CacheError, OSError) as e:
        print_error(f"cannot clear {cache_dir}: {e}")
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

    v = msub.add_parser(
        "verify", help="check a model directory's bytes against its manifest, as a node does (and its pins)"
    )
    v.add_argument("model", metavar="MODEL_DIR")
    v.add_argument("--manifest", metavar="PATH", help=f"default: MODEL_DIR/{MANIFEST_FILE_NAME}")
    v.add_argument("--config", metavar="FILE", help="check the pins of this node config's [model] too")
    v.add_argument("--expected-root", metavar="HEX", help="refuse a manifest with another root")
    v.add_argument("--public-key", metavar="BASE64", help="require a signature by this Ed25519 key")
    v.set_defaults(func=cmd_manifest_verify)

    s = msub.add_parser("show", help="print a manifest's root (the model version to pin) and what it holds")
    s.add_argument("model", metavar="MODEL_DIR")
    s.add_argument("--manifest", metavar="PATH", help=f"default: MODEL_DIR/{MANIFEST_FILE_NAME}")
    s.set_defaults(func=cmd_manifest_show)

    k = msub.add_parser("keygen", help="make an Ed25519 key pair for signing manifests")
    k.add_argument(
        "private_key", metavar="PRIVATE_KEY", help="where to write the private key (PEM, mode 0600)"
    )
    k.set_defaults(func=cmd_manifest_keygen)

    g = msub.add_parser("sign", help=f"sign a model's manifest (writes {MANIFEST_FILE_NAME}.sig beside it)")
    g.add_argument("model", metavar="MODEL_DIR")
    g.add_argument("--key", metavar="PRIVATE_KEY", required=True, help="from `manifest keygen`")
    g.add_argument("--manifest", metavar="PATH", help=f"default: MODEL_DIR/{MANIFEST_FILE_NAME}")
    g.set_defaults(func=cmd_manifest_sign)

    c = sub.add_parser("clear-cache", help="empty the weight cache (refused while a node uses it)")
    where = c.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        metavar="FILE",
        help=f"the node's config; clears its node.cache_dir (default {DEFAULT_CONFIG})",
    )
    where.add_argument("--cache-dir", metavar="DIR")
    c.add_argument("-v", "--verbose", action="store_true", help="list every removed entry")
    c.set_defaults(func=cmd_clear_cache)
