"""Verifying bytes against a manifest: what a node and ``butterfly-admin manifest verify`` both check
(file sizes, per-chunk xxh3, per-tensor BLAKE3, the Merkle root recomputed from the tensor digests,
the config and tokenizer files), and reading those side files verified.

Must not: build or rewrite manifests (build.py) or decide what a mismatch means for a node.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

from butterfly.weights import merkle
from butterfly.weights.layout import (
    CONFIG_FILE,
)
from butterfly.weights.manifest import Manifest, ManifestError, TensorRecord, aux_digest, unit_digest
from butterfly.weights.scan import Span, scan_file
from butterfly.weights.sources import FilesystemSource, Source, SourceError

__all__ = ["Problem", "bytes_root", "read_aux_file", "verified_model_config", "verify_dir", "verify_source"]


# ---------------------------------------------------------------------------------------------------
# Verifying bytes against a manifest
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One way the bytes differ from the manifest. ``offset`` is an absolute file offset."""

    file: str
    detail: str
    tensor: str | None = None
    offset: int | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


def _compare_chunks(m: Manifest, file: str, t: TensorRecord, got: list[int]) -> Problem | None:
    bad = [i for i, (a, b) in enumerate(zip(got, t.chunks, strict=True)) if a != b]
    if not bad:
        return None
    first = bad[0]
    rel = first * m.chunk_bytes
    n = min(m.chunk_bytes, t.length - rel)
    return Problem(
        file,
        f"tensor {t.name!r}: chunk at tensor offset {rel} (file offset {t.offset + rel}, {n} bytes) "
        f"has xxh3 {got[first]:016x}, the manifest says {t.chunks[first]:016x}; "
        f"{len(bad)} of {len(t.chunks)} chunks differ",
        t.name,
        t.offset + rel,
    )


def _compare_tensor(file: str, t: TensorRecord, got: bytes) -> Problem | None:
    if got.hex() == t.blake3:
        return None
    return Problem(
        file,
        f"tensor {t.name!r} [{t.offset}, {t.offset + t.length}): BLAKE3 {got.hex()} differs from the "
        f"manifest's {t.blake3} although every chunk's xxh3 matches (the manifest's chunk digests do "
        "not describe the bytes its tensor digests and Merkle root name)",
        t.name,
        t.offset,
    )


def _verify_file(
    m: Manifest,
    src: Source,
    name: str,
    tensors: list[TensorRecord],
    buf: memoryview,
    found: dict[str, bytes],
) -> list[Problem]:
    """Problems of one file; ``tensors`` are its tensors sorted by offset. Each tensor read whole has
    its BLAKE3 put in ``found``."""
    record = m.files[name]
    try:
        size = src.size(name)
    except (SourceError, OSError) as e:
        return [Problem(name, f"missing or unreadable: {e}")]
    problems: list[Problem] = []
    if size != record.size:
        problems.append(Problem(name, f"is {size} bytes, the manifest says {record.size}"))
        cut = [t for t in tensors if t.offset + t.length > size]
        for t in cut[:8]:
            problems.append(
                Problem(
                    name,
                    f"tensor {t.name!r} [{t.offset}, {t.offset + t.length}) lies past the end of the file",
                    t.name,
                    t.offset,
                )
            )
        if len(cut) > 8:
            problems.append(Problem(name, f"and {len(cut) - 8} more tensors past the end of the file"))
        tensors = [t for t in tensors if t.offset + t.length <= size]
    spans = [Span(t.name, t.offset, t.length) for t in tensors]
    whole = size == record.size
    try:
        scan = scan_file(src, name, size, spans, m.chunk_bytes, buf, file_digest=whole, tensor_digests=True)
    except (SourceError, OSError) as e:
        return [*problems, Problem(name, f"read failed: {e}")]
    found.update(scan.tensor_digests)
    for t in tensors:
        # A differing chunk names the offset; with every chunk matching, the tensor digest (which the
        # Merkle root covers) still has to: chunk digests are only as good as the manifest's word.
        p = _compare_chunks(m, name, t, scan.chunks[t.name]) or _compare_tensor(
            name, t, scan.tensor_digests[t.name]
        )
        if p is not None:
            problems.append(p)
    if whole and scan.file_digest is not None and scan.file_digest.hex() != record.blake3 and not problems:
        # Every chunk matched, so the difference is in the header (or, adversarially, an xxh3
        # collision: the BLAKE3 file digest is what makes this check sound).
        problems.append(
            Problem(name, f"BLAKE3 {scan.file_digest.hex()} differs from the manifest's {record.blake3}")
        )
    return problems


def bytes_root(manifest: Manifest, tensor_digests: dict[str, bytes]) -> bytes | None:
    """The Merkle root of the bytes read, recomputed from their tensor digests exactly as the manifest's
    root is from its own (unit digests, leaves, RFC 6962 root); None if a tensor was not read whole."""
    by_unit: list[list[tuple[str, int, bytes]]] = [[] for _ in manifest.units]
    for t in manifest.tensors:
        if t.name not in tensor_digests:
            return None
        by_unit[t.unit].append((t.name, t.length, tensor_digests[t.name]))
    leaves = [merkle.leaf_hash(unit_digest(members)) for members in by_unit]
    # The aux files' leaf from their records; their bytes are checked on their own (_verify_side_files).
    return merkle.merkle_root([*leaves, merkle.leaf_hash(aux_digest(manifest.aux_files))])


def verify_source(
    manifest: Manifest, src: Source, *, on_file: Callable[[str, int], None] | None = None
) -> list[Problem]:
    """Check ``src`` against ``manifest`` as a node does, and then some; [] means all match.

    What a node checks, in one pass per file, front to back: every file's size, every chunk's xxh3,
    every tensor's BLAKE3, and the Merkle root recomputed from those tensor digests (the node proves
    the same leaves to its coordinator); what only this can check: every file's BLAKE3 (headers
    included) and the side files the manifest names (config.json, the tokenizer). A differing chunk is
    reported once per tensor, naming the tensor, the chunk's tensor and file offsets and how many of
    its chunks differ.
    """
    problems: list[Problem] = []
    buf = memoryview(bytearray(manifest.chunk_bytes))
    by_file: dict[str, list[TensorRecord]] = {name: [] for name in manifest.files}
    for t in manifest.tensors:
        by_file[t.file].append(t)
    found: dict[str, bytes] = {}
    for name in sorted(manifest.files):
        problems += _verify_file(
            manifest, src, name, sorted(by_file[name], key=lambda t: t.offset), buf, found
        )
        if on_file is not None:
            on_file(name, manifest.files[name].size)
    root = bytes_root(manifest, found)
    if root is not None and root.hex() != manifest.merkle_root:
        problems.append(
            Problem(
                "<merkle root>",
                f"the bytes' tensor digests give root {root.hex()}, the manifest names "
                f"{manifest.merkle_root}: they are not that model version",
            )
        )
    problems += _verify_side_files(manifest, src)
    return problems


def _verify_side_files(manifest: Manifest, src: Source) -> list[Problem]:
    """The files beside the weights that the manifest pins (``aux_files``: config.json, the tokenizer's
    files), each fetched as a node fetches it (``read_aux_file``): missing or different."""
    problems: list[Problem] = []
    for name in manifest.aux_files:
        try:
            read_aux_file(manifest, src, name)
        except ManifestError as e:
            problems.append(Problem(name, e.detail))
        except (SourceError, OSError) as e:
            problems.append(Problem(name, f"missing or unreadable: {e}"))
    return problems


def verify_dir(
    manifest: Manifest, model_dir: Path, *, on_file: Callable[[str, int], None] | None = None
) -> list[Problem]:
    """``verify_source`` over a local model directory."""
    src = FilesystemSource(Path(model_dir))
    try:
        return verify_source(manifest, src, on_file=on_file)
    finally:
        src.close()


def read_aux_file(manifest: Manifest, src: Source, name: str) -> bytes:
    """The bytes of aux file ``name`` (config.json, tokenizer.json...) from ``src``, only if they are
    the manifest's: size and BLAKE3 checked. A file the manifest does not cover, or whose bytes differ
    (another model version's tokenizer beside these weights), is a ``ManifestError``; a failing or
    missing file is the source's ``SourceError``."""
    where = f"{src.description.rstrip('/')}/{name}"
    record = manifest.aux_files.get(name)
    if record is None:
        covered = ", ".join(sorted(manifest.aux_files))
        raise ManifestError(where, f"is not covered by the manifest (it covers {covered})")
    size = src.size(name)
    if size != record.size:
        raise ManifestError(
            where,
            f"is {size} bytes; the manifest says {record.size}: this file is not the one of model "
            f"version {manifest.merkle_root[:16]}",
        )
    raw = src.read_small(name, record.size)
    digest = blake3.blake3(raw).hexdigest()
    if len(raw) != record.size or digest != record.blake3:
        raise ManifestError(
            where,
            f"{len(raw)} bytes with BLAKE3 {digest}; the manifest says {record.size} bytes with BLAKE3 "
            f"{record.blake3}: this file is not the one of model version {manifest.merkle_root[:16]}",
        )
    return raw


def verified_model_config(manifest: Manifest, src: Source) -> dict[str, object]:
    """config.json fetched from ``src`` through ``read_aux_file``, checked to be the manifest's
    ``model_config`` (which the root does not bind by itself: only config.json's bytes are)."""
    raw = read_aux_file(manifest, src, CONFIG_FILE)
    where = f"{src.description.rstrip('/')}/{CONFIG_FILE}"
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(where, f"is not valid JSON: {e}") from None
    if parsed != manifest.model_config:
        raise ManifestError(where, "does not say what the manifest's model_config says (edited manifest?)")
    config: dict[str, object] = parsed
    return config
