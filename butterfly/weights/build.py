"""Building a manifest: one hashing pass over a model directory or source (xxh3 per chunk, BLAKE3 per
tensor, the Merkle root over the layer units and the config/tokenizer files).

Must not: write anything but what ``write_manifest`` writes; the format itself is manifest.py's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

from butterfly.weights import merkle
from butterfly.weights.layout import (
    CONFIG_FILE,
    MAX_JSON_BYTES,
    ModelLayout,
    TensorEntry,
    load_layout,
    load_layout_from_source,
)
from butterfly.weights.manifest import (
    AUX_FILES,
    DEFAULT_CHUNK_BYTES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_AUX_BYTES,
    FileRecord,
    Manifest,
    ManifestError,
    TensorRecord,
    UnitRecord,
    check_chunk_bytes,
    decode_manifest,
    encode_manifest,
    merkle_leaves,
    unit_digest,
)
from butterfly.weights.scan import Span, scan_file
from butterfly.weights.sources import FilesystemSource, Source, SourceNotFound

__all__ = ["BuildStats", "build_manifest", "build_manifest_from_source"]


# ---------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildStats:
    """What a build read: bytes of every weight file and the seconds it took."""

    bytes_read: int
    seconds: float


def build_manifest(
    model_dir: Path,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    on_file: Callable[[str, int], None] | None = None,
) -> tuple[Manifest, BuildStats]:
    """Hash every weight file of ``model_dir`` (one sequential pass each) and build its manifest.

    ``on_file(name, size)`` is called after each file, for progress. Raises ``ModelFormatError`` for a
    checkpoint load_layout refuses, ``SourceError`` when a file cannot be read whole, and
    ``ManifestError`` if the result would not pass ``decode_manifest`` (e.g. config.json holding
    NaN, which JSON cannot carry).
    """
    check_chunk_bytes(chunk_bytes)
    started = time.monotonic()
    # load_layout, not load_layout_from_source: a directory can be listed, which words refusals better.
    layout = load_layout(Path(model_dir))
    src = FilesystemSource(Path(model_dir))
    try:
        return _build(src, layout, chunk_bytes, on_file, started)
    finally:
        src.close()


def build_manifest_from_source(
    src: Source,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    on_file: Callable[[str, int], None] | None = None,
) -> tuple[Manifest, BuildStats]:
    """``build_manifest`` over any source (an S3 prefix, ...); the caller closes ``src``."""
    check_chunk_bytes(chunk_bytes)
    started = time.monotonic()
    return _build(src, load_layout_from_source(src), chunk_bytes, on_file, started)


def _build(
    src: Source,
    layout: ModelLayout,
    chunk_bytes: int,
    on_file: Callable[[str, int], None] | None,
    started: float,
) -> tuple[Manifest, BuildStats]:
    where = f"{src.description.rstrip('/')}/{CONFIG_FILE}"
    config_raw = src.read_small(CONFIG_FILE, MAX_JSON_BYTES)
    try:
        config_now = json.loads(config_raw)
    except ValueError:
        config_now = None
    if config_now != layout.model_config:
        raise ManifestError(where, "changed while the manifest was being built")
    aux_files = {CONFIG_FILE: FileRecord(len(config_raw), blake3.blake3(config_raw).hexdigest())}
    for name in AUX_FILES[1:]:
        try:
            raw = src.read_small(name, MAX_AUX_BYTES)
        except SourceNotFound:
            continue
        aux_files[name] = FileRecord(len(raw), blake3.blake3(raw).hexdigest())

    by_file: dict[str, list[TensorEntry]] = {name: [] for name in layout.files}
    for unit in layout.units:
        for t in unit.tensors:
            by_file[t.file].append(t)
    buf = memoryview(bytearray(chunk_bytes))
    files: dict[str, FileRecord] = {}
    tensor_b3: dict[str, bytes] = {}
    chunks: dict[str, list[int]] = {}
    for name in sorted(layout.files):
        size = layout.files[name]
        spans = [Span(t.name, t.offset, t.length) for t in sorted(by_file[name], key=lambda t: t.offset)]
        scan = scan_file(src, name, size, spans, chunk_bytes, buf, file_digest=True, tensor_digests=True)
        assert scan.file_digest is not None
        files[name] = FileRecord(size, scan.file_digest.hex())
        tensor_b3.update(scan.tensor_digests)
        chunks.update(scan.chunks)
        if on_file is not None:
            on_file(name, size)

    units: list[UnitRecord] = []
    tensors: list[TensorRecord] = []
    for unit in layout.units:
        units.append(
            UnitRecord(
                unit.name,
                unit.kind,
                unit.block,
                unit_digest((t.name, t.length, tensor_b3[t.name]) for t in unit.tensors).hex(),
            )
        )
        tensors += [
            TensorRecord(
                t.name,
                t.file,
                t.offset,
                t.length,
                t.dtype,
                t.shape,
                t.unit,
                tensor_b3[t.name].hex(),
                tuple(chunks[t.name]),
            )
            for t in unit.tensors
        ]
    root = merkle.merkle_root(merkle_leaves(units, aux_files))
    manifest = Manifest(
        format=FORMAT_VERSION,
        merkle_root=root.hex(),
        num_units=len(units),
        chunk_bytes=chunk_bytes,
        aux_files=aux_files,
        model_config=layout.model_config,
        files=files,
        units=tuple(units),
        tensors=tuple(tensors),
    )
    # What we write must read back: the reader's checks double as the builder's self-check.
    back = decode_manifest(encode_manifest(manifest), f"{src.description.rstrip('/')}/{MANIFEST_FILE}")
    if back != manifest:
        raise ManifestError(where, "holds values JSON cannot carry faithfully (NaN or Infinity?)")
    return manifest, BuildStats(sum(layout.files.values()), time.monotonic() - started)
