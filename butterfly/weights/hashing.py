"""Multi-threaded BLAKE3 of many regions of one buffer: the validator's per-unit digests, the bench.

Owns the split of the work between blake3's own threads (its rayon pool, for a region big enough to
unbalance a pool of one-region-per-thread) and a pool of Python threads that hash the other regions one
each, single-threaded, largest first (blake3 releases the GIL while it hashes, so they run in parallel).
A region is a sequence of parts hashed as one stream: ``Span``s of the buffer and literal ``bytes``
(framing such as a tensor's name and length), so a digest can cover several tensors without copying.

It must not copy the buffer, keep a view of it after returning, or know what a region means.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import blake3

__all__ = ["MT_MIN_BYTES", "Region", "RegionPart", "Span", "blake3_regions", "region_bytes"]

# Below this, splitting one region across threads costs more in rayon's joins than it saves; the
# pool of single-threaded hashes is faster (bench/README.md: "validation").
MT_MIN_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Span:
    """``length`` bytes of the buffer at ``offset``."""

    offset: int
    length: int


RegionPart = Span | bytes
Region = Sequence[RegionPart]


def region_bytes(region: Region) -> int:
    """Bytes of the buffer a region covers (its literal parts not counted)."""
    return sum(p.length for p in region if isinstance(p, Span))


def _digest(mv: memoryview, region: Region, max_threads: int) -> bytes:
    h = blake3.blake3(max_threads=max_threads)
    for part in region:
        if isinstance(part, Span):
            with mv[part.offset : part.offset + part.length] as view:
                h.update(view)
        else:
            h.update(part)
    return h.digest()


def blake3_regions(
    buf: bytes | bytearray | memoryview, regions: Sequence[Region], threads: int | None = None
) -> list[bytes]:
    """The 32-byte BLAKE3 digest of each region of ``buf``, in order, on up to ``threads`` threads
    (default: one per CPU). A region's digest equals ``blake3`` of its parts concatenated."""
    threads = threads if threads is not None else os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    with memoryview(buf) as raw, raw.cast("B") as mv:
        for k, region in enumerate(regions):
            for part in region:
                if isinstance(part, Span) and (
                    part.offset < 0 or part.length < 0 or part.offset + part.length > len(mv)
                ):
                    raise ValueError(
                        f"region {k}: span [{part.offset}, {part.offset} + {part.length}) is outside the "
                        f"buffer of {len(mv)} bytes"
                    )
        sizes = [region_bytes(r) for r in regions]
        total = sum(sizes)
        out: list[bytes] = [b""] * len(regions)
        # A region over half a thread's fair share would leave the pool waiting on one thread: it gets
        # every thread to itself instead, before the pool starts (so the two never compete for cores).
        big_from = max(MT_MIN_BYTES, total / (2 * threads))
        pooled = []
        for k, size in enumerate(sizes):
            if threads > 1 and size >= big_from:
                out[k] = _digest(mv, regions[k], threads)
            else:
                pooled.append(k)
        pooled.sort(key=lambda k: -sizes[k])
        if threads == 1 or len(pooled) <= 1:
            for k in pooled:
                out[k] = _digest(mv, regions[k], 1)
        else:
            with ThreadPoolExecutor(
                max_workers=min(threads, len(pooled)), thread_name_prefix="blake3"
            ) as pool:
                for k, digest in zip(
                    pooled, pool.map(lambda k: _digest(mv, regions[k], 1), pooled), strict=True
                ):
                    out[k] = digest
        return out
