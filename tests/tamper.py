"""Ways to damage a model on disk the way a faulty disk or an attacker would, for integrity tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import blake3
import msgspec
import xxhash

from butterfly.weights.manifest import MANIFEST_FILE, read_manifest, write_manifest


def flip_byte(path: Path, at: int) -> None:
    """XOR one bit of the byte at offset ``at`` of ``path``."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x20]))


def copy_model(model: Path, to: Path) -> Path:
    shutil.copytree(model, to)
    return to


def tamper_with_cheap_digests(model: Path, tensor: str, at: int = 100) -> None:
    """Flip a byte of ``tensor`` and rewrite what is cheap to rewrite in the manifest to match: the
    tensor's chunk xxh3s and its file's size and BLAKE3. Tensor digests, unit digests and the Merkle
    root stay those of the real model, so the manifest is still self-consistent and reads back."""
    path = model / MANIFEST_FILE
    m = read_manifest(path)
    rec = next(t for t in m.tensors if t.name == tensor)
    shard = model / rec.file
    flip_byte(shard, rec.offset + at)
    data = shard.read_bytes()
    body = data[rec.offset : rec.offset + rec.length]
    chunks = tuple(
        xxhash.xxh3_64_intdigest(body[i : i + m.chunk_bytes]) for i in range(0, rec.length, m.chunk_bytes)
    )
    tensors = tuple(msgspec.structs.replace(t, chunks=chunks) if t is rec else t for t in m.tensors)
    files = dict(m.files)
    files[rec.file] = msgspec.structs.replace(files[rec.file], blake3=blake3.blake3(data).hexdigest())
    write_manifest(msgspec.structs.replace(m, tensors=tensors, files=files), path)
