"""The hashing pass shared by building and verifying a manifest: each shard read once through its
source, xxh3 per chunk and BLAKE3 per tensor computed on the way.

Must not: decide what the digests mean (build.py records them, verify.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from butterfly.weights.manifest import tensor_hasher
from butterfly.weights.sources import Source

__all__ = ["Scan", "Span", "scan_file"]


# ---------------------------------------------------------------------------------------------------
# Sources and the hashing pass
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A tensor's place in its file, as the hashing pass needs it."""

    name: str
    offset: int
    length: int


@dataclass
class Scan:
    file_digest: bytes | None
    tensor_digests: dict[str, bytes]
    chunks: dict[str, list[int]]


def scan_file(
    src: Source,
    file: str,
    size: int,
    spans: Sequence[Span],
    chunk_bytes: int,
    buf: memoryview,
    *,
    file_digest: bool,
    tensor_digests: bool,
) -> Scan:
    """Read ``file`` once, front to back, in chunks; hash the file, each tensor and each chunk.

    ``spans`` are sorted by offset and back to back (safetensors leaves no gaps); the bytes before the
    first one are the header, hashed only into the file digest.
    """
    fh = tensor_hasher(size) if file_digest else None
    header_end = spans[0].offset if spans else size
    if fh is not None:
        for off in range(0, header_end, chunk_bytes):
            view = buf[: min(chunk_bytes, header_end - off)]
            src.read_into(file, off, view)
            fh.update(view)
    scan = Scan(None, {}, {})
    for t in spans:
        th = tensor_hasher(t.length) if tensor_digests else None
        chunks: list[int] = []
        for off in range(0, t.length, chunk_bytes):
            view = buf[: min(chunk_bytes, t.length - off)]
            src.read_into(file, t.offset + off, view)
            if fh is not None:
                fh.update(view)
            if th is not None:
                th.update(view)
            chunks.append(xxhash.xxh3_64_intdigest(view))
        scan.chunks[t.name] = chunks
        if th is not None:
            scan.tensor_digests[t.name] = th.digest()
    if fh is not None:
        scan.file_digest = fh.digest()
    return scan
