"""What the validator decides about the bytes in memory, as values: digests, and the mismatches it found.

Owns the check of a node's weights in memory against what they must be, with the fault named the way
an operator needs it (tensor, layer, offset, expected and found digest):
- every tensor's BLAKE3 (all cores, ``butterfly.weights.hashing``) against the manifest's digest carried in
  its placement, and the unit digests (``butterfly.weights.manifest.unit_digest``) that become this node's
  Merkle leaves;
- a tensor whose digest differs is located: its chunks' xxh3 against the digests the loader checked
  (the manifest's) name the first differing chunk's offset. A placement without a manifest digest
  falls back to the chunk digests alone, over every chunk.

A mismatch is a result (``butterfly.ipc.Mismatch``), never an exception: the check holds views of
shared memory, and an exception's traceback would keep them alive past the mapping's close (the
BufferError that used to replace the real fault). This module must not map, write or release memory
itself; callers pass a view whose lifetime they own (``butterfly.board.shm.Segment.view``).
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
import xxhash

from butterfly.ipc import ChunkDigest, Mismatch, TensorPlacement
from butterfly.weights.hashing import Span, blake3_regions
from butterfly.weights.manifest import unit_digest

__all__ = [
    "ArenaDigests",
    "Mismatch",
    "arena_end",
    "changed_chunks",
    "describe",
    "digest_arena",
    "digest_tensors",
    "layer_of",
    "locate",
    "mismatches",
]

_BLOCK = re.compile(r"model\.layers\.([0-9]+)\.")
# A reason lists this many mismatching tensors in full and counts the rest.
_LISTED = 4


def layer_of(tensor: TensorPlacement) -> str:
    """The layer a tensor belongs to, as an operator names it: ``layer 12``, ``embed`` or ``head``."""
    m = _BLOCK.match(tensor.name)
    if m:
        return f"layer {m.group(1)}"
    return "embed" if tensor.unit == 0 else "head"


def describe(found: Sequence[Mismatch], what: str) -> str:
    """The whole reason an operator sees: ``what`` happened, then each mismatching tensor."""
    listed = "; ".join(str(m) for m in found[:_LISTED])
    more = f"; and {len(found) - _LISTED} more tensor(s)" if len(found) > _LISTED else ""
    return f"{what}: {len(found)} tensor(s) differ: {listed}{more}"


def _chunks_of(tensor: TensorPlacement, chunks: Sequence[ChunkDigest]) -> list[ChunkDigest]:
    end = tensor.arena_offset + tensor.length
    return [c for c in chunks if tensor.arena_offset <= c.arena_offset < end]


def locate(
    buf: memoryview, tensor: TensorPlacement, chunks: Sequence[ChunkDigest], expected: str, found: str
) -> Mismatch | None:
    """``tensor``'s mismatch with its first differing chunk named; None when nothing differs (its
    digest matches and so does every chunk)."""
    first: tuple[ChunkDigest, int] | None = None
    bad = 0
    for c in _chunks_of(tensor, chunks):
        with buf[c.arena_offset : c.arena_offset + c.length] as view:
            got = xxhash.xxh3_64_intdigest(view)
        if got != c.xxh3:
            bad += 1
            if first is None:
                first = (c, got)
    if first is None and expected == found:
        return None
    m = Mismatch(
        tensor=tensor.name,
        unit=tensor.unit,
        layer=layer_of(tensor),
        arena_offset=tensor.arena_offset,
        expected=expected,
        found=found,
    )
    if first is None:
        return m
    c, got = first
    return msgspec.structs.replace(
        m,
        offset=c.arena_offset - tensor.arena_offset,
        length=c.length,
        chunk_expected=f"{c.xxh3:016x}",
        chunk_found=f"{got:016x}",
        chunks_bad=bad,
    )


def arena_end(tensors: Sequence[TensorPlacement]) -> int:
    """The arena bytes ``tensors`` need: the end of the last one."""
    return max((t.arena_offset + t.length for t in tensors), default=0)


def changed_chunks(
    buf: memoryview, tensors: Sequence[TensorPlacement], chunks: Sequence[ChunkDigest], threads: int
) -> set[int]:
    """Indices of ``tensors`` with a chunk whose xxh3 now differs from what the loader read (``chunks``):
    bytes changed since they landed. xxh3 on every core runs at ~10x BLAKE3's speed: a followed load's
    tensors, whose BLAKE3 was taken as they landed, are re-checked this way when the load is reported."""
    spans = sorted((t.arena_offset, t.arena_offset + t.length, i) for i, t in enumerate(tensors))
    starts = [a for a, _, _ in spans]

    def owner(c: ChunkDigest) -> int | None:
        k = bisect.bisect_right(starts, c.arena_offset) - 1
        if k >= 0 and c.arena_offset < spans[k][1]:
            return spans[k][2]
        return None

    def differs(c: ChunkDigest) -> bool:
        with buf[c.arena_offset : c.arena_offset + c.length] as view:
            return xxhash.xxh3_64_intdigest(view) != c.xxh3

    mine = [(c, i) for c in chunks if (i := owner(c)) is not None]
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="xxh3") as pool:
        bad = pool.map(differs, [c for c, _ in mine])
        return {i for (_, i), b in zip(mine, bad, strict=True) if b}


@dataclass(frozen=True)
class ArenaDigests:
    """Every tensor's BLAKE3 (placement order) and each unit's digest (ascending unit index)."""

    tensor_digests: list[bytes]
    units: list[int]
    unit_digests: list[bytes]


def digest_tensors(buf: memoryview, tensors: Sequence[TensorPlacement], threads: int) -> list[bytes]:
    """BLAKE3 of each tensor on all cores at once (blake3_regions balances big and small tensors)."""
    return blake3_regions(buf, [[Span(t.arena_offset, t.length)] for t in tensors], threads=threads)


def digest_arena(
    buf: memoryview,
    tensors: Sequence[TensorPlacement],
    threads: int,
    known: Mapping[int, bytes] | None = None,
) -> ArenaDigests:
    """BLAKE3 of every tensor (``known[i]``: tensor i's, taken from these bytes already), then the
    per-unit combination (butterfly.weights.manifest.unit_digest, the manifest's own definition)."""
    known = known or {}
    rest = [i for i in range(len(tensors)) if i not in known]
    fresh = dict(zip(rest, digest_tensors(buf, [tensors[i] for i in rest], threads), strict=True))
    digests = [known[i] if i in known else fresh[i] for i in range(len(tensors))]
    by_unit: dict[int, list[tuple[str, int, bytes]]] = defaultdict(list)
    for t, d in zip(tensors, digests, strict=True):
        by_unit[t.unit].append((t.name, t.length, d))
    units = sorted(by_unit)
    return ArenaDigests(digests, units, [unit_digest(by_unit[u]) for u in units])


def mismatches(
    buf: memoryview,
    tensors: Sequence[TensorPlacement],
    chunks: Sequence[ChunkDigest],
    digests: Sequence[bytes],
) -> list[Mismatch]:
    """Tensors whose bytes are not what they must be, each located.

    With a manifest digest in the placement, a tensor is checked by it (which covers the chunk digests:
    they were checked against the same manifest as the bytes landed), and only a differing tensor's
    chunks are re-hashed, to name the offset. Without one, every chunk is compared with what the loader
    read: then bytes changed after loading are caught, bytes that were wrong at the source are not.
    """
    out: list[Mismatch] = []
    for t, d in zip(tensors, digests, strict=True):
        found = d.hex()
        expected = t.blake3.hex()
        if expected and expected == found:
            continue
        m = locate(buf, t, chunks, expected, found if expected else "")
        if m is not None:
            out.append(m)
    return out
