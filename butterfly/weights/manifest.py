"""The model manifest: what every byte of one model version must be, and the Merkle root that names it.

Owns:

* the ONE definition of a layer unit's digest, used by the manifest builder and by the validator
  (which re-hashes the arena): ``tensor_digest`` is plain BLAKE3 of a tensor's bytes, and
  ``unit_digest`` is BLAKE3 over the unit's tensors in name order, each contributing
  ``name (UTF-8) || 0x00 || length (8 bytes, little endian) || tensor_digest (32 bytes)``. Hashing
  tensor digests rather than the concatenated bytes lets the builder read each file once in offset
  order (real checkpoints do not store a unit's tensors in name order, nor in one file), lets the
  validator hash tensors in parallel, and lets a reader check that every unit digest in a manifest
  follows from its tensor digests without the weights. Tensor names cannot hold 0x00 (safetensors
  names with control characters are refused) and the other two fields are fixed-width, so the
  encoding is unambiguous: moving bytes between tensors, or renaming one, changes the digest.
* the manifest format (``Manifest``, JSON on disk as ``butterfly-manifest.json`` beside the model),
  building it from a model directory (or any ``butterfly.weights.sources.Source``) in one sequential pass
  per file, hashing file, tensors and chunks from the same bytes, encoding it in one canonical
  form, and reading it back as hostile input: caps, types, every tensor inside its file, files exactly
  covered, units as the layout rules say, unit digests recomputed from tensor digests and the root
  recomputed from the unit digests. A manifest that fails any check is a ``ManifestError``.
* checking a model's bytes against a manifest over any ``Source`` (``verify_source``; ``verify_dir``
  for a directory: file BLAKE3 plus chunk xxh3s, which name the tensor and offset), range proofs
  for the units a block range maps to, and the layer map rebuilt from a manifest alone
  (``layout_from_manifest``, the S3 case).
* the model's other files (``AUX_FILES``: config.json, the tokenizer's files, generation_config.json):
  size and BLAKE3 of each one present (``aux_files``), and ``read_aux_file``, the one way to fetch
  such a file from any source: its bytes are returned only if they are the manifest's, so weights
  are never paired with another version's config or tokenizer.

The leaves are ``merkle.leaf_hash(unit_digest)`` in unit order (embed, layers.0 .. layers.L-1, head),
then one last leaf for the aux files (``aux_digest``: the unit-digest encoding over their name, size
and BLAKE3), and ``merkle_root`` is their RFC 6962 root: ``tree_size(num_units)`` leaves. That root
does not bind the number of leaves, so the manifest records ``num_units`` beside it, and verifiers
must take the tree size from the manifest. The root names the weights (names, lengths and bytes),
config.json and the tokenizer; dtype and shape are bound by the manifest's tensor records.

Must not: know where the bytes of a node live (arena, GPU), talk to peers, decide who holds which
blocks, or write anything but the manifest file itself (atomically).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import blake3
import msgspec

from butterfly.weights import merkle

# _check_blocks, _group, _Located and _unit: the grouping rules are the layout module's, and a manifest
# must group tensors exactly as load_layout does, so it calls the same code rather than restating the
# rules. They are private to layout.py today; a public "layout from located tensors" there is better.
from butterfly.weights.layout import (
    CONFIG_FILE,
    LayerRange,
    LayerUnit,
    ModelLayout,
    _check_blocks,
    _group,
    _Located,
    _unit,
)
from butterfly.weights.safetensors import DTYPE_SIZES, MAX_NDIM, ModelFormatError

__all__ = [
    "AUX_FILES",
    "DEFAULT_CHUNK_BYTES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "FileRecord",
    "Manifest",
    "ManifestError",
    "RangeProof",
    "TensorRecord",
    "UnitRecord",
    "aux_digest",
    "check_chunk_bytes",
    "decode_manifest",
    "encode_manifest",
    "layout_from_manifest",
    "range_proof_for_blocks",
    "read_manifest",
    "tensor_digest",
    "tree_size",
    "unit_digest",
    "unit_digest_of_buffers",
    "unit_range_for_blocks",
    "verify_blocks",
    "write_manifest",
]

# 2: config.json and the tokenizer files (aux_files) are the Merkle tree's last leaf.
FORMAT_VERSION = 2
MANIFEST_FILE = "butterfly-manifest.json"
# The model's files beside the weights that the manifest covers when present; config.json must be.
AUX_FILES = (
    CONFIG_FILE,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# A tokenizer.json of a 256k-token vocabulary is ~30 MB.
MAX_AUX_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 8 << 20
# Same bounds as [loader] chunk_bytes: the loader compares its chunks with these digests.
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 256 << 20
# Caps for hostile input. 256 MiB of JSON holds ~12M chunk digests: 100 TB of weights at 8 MiB chunks.
MAX_MANIFEST_BYTES = 256 << 20
MAX_TENSORS = 1_000_000
MAX_FILES = 100_000
MAX_NAME_CHARS = 1024
# Bytes travel as int64/off_t downstream (pread, numpy, C).
_MAX_SIZE = 2**63 - 1
# Below this, blake3's thread pool costs more than it saves.
_PARALLEL_HASH_BYTES = 1 << 20

Buffer = bytes | bytearray | memoryview
UnitKind = Literal["embed", "block", "head"]

_Hex32 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
_Size = Annotated[int, msgspec.Meta(ge=0, le=_MAX_SIZE)]
# msgspec bounds stop at int64, so _check_tensors checks the upper end (2**64 - 1).
_U64 = Annotated[int, msgspec.Meta(ge=0)]
_Index = Annotated[int, msgspec.Meta(ge=0, le=MAX_TENSORS)]
# A shard name with no path separator: verify opens files by these names under the model dir.
_FileName = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*\.safetensors\Z", max_length=255)
]
_AuxName = Annotated[
    str, msgspec.Meta(pattern="^(" + "|".join(n.replace(".", r"\.") for n in AUX_FILES) + r")\Z")
]
_TensorName = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x1f\x7f]+\Z", max_length=MAX_NAME_CHARS)]


class ManifestError(ValueError):
    """A manifest is malformed, inconsistent or tampered with; the message says where and how."""

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail


class FileRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One weight file: its size and the BLAKE3 of all its bytes (``b3sum`` prints the same)."""

    size: _Size
    blake3: _Hex32


class TensorRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One tensor: ``length`` bytes at absolute ``offset`` of ``file``, and its digests.

    ``chunks[i]`` is the xxh3_64 of tensor bytes ``[i * chunk_bytes, (i + 1) * chunk_bytes)`` (the
    last one shorter): chunks are per tensor, starting at the tensor's first byte, so a loader that
    streams a tensor chunk by chunk compares each as it lands.
    """

    name: _TensorName
    file: _FileName
    offset: _Size
    length: _Size
    dtype: str
    shape: Annotated[tuple[_Size, ...], msgspec.Meta(max_length=MAX_NDIM)]
    unit: _Index
    blake3: _Hex32
    chunks: tuple[_U64, ...]


class UnitRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A layer unit (embed, one block, head) and its digest, the data of its Merkle leaf."""

    name: str
    kind: UnitKind
    block: Annotated[int, msgspec.Meta(ge=-1, le=MAX_TENSORS)]
    digest: _Hex32


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A model version. Build with ``build_manifest``; read with ``read_manifest`` (which checks it)."""

    format: int
    merkle_root: _Hex32
    num_units: _Index
    chunk_bytes: int
    aux_files: Annotated[dict[_AuxName, FileRecord], msgspec.Meta(max_length=len(AUX_FILES))]
    """config.json (always) and the other ``AUX_FILES`` the model has: size and BLAKE3 of each."""
    model_config: dict[str, object]
    files: Annotated[dict[_FileName, FileRecord], msgspec.Meta(max_length=MAX_FILES)]
    units: Annotated[tuple[UnitRecord, ...], msgspec.Meta(max_length=MAX_TENSORS)]
    tensors: Annotated[tuple[TensorRecord, ...], msgspec.Meta(max_length=MAX_TENSORS)]

    @property
    def total_bytes(self) -> int:
        """Tensor bytes of the whole model, each tensor once (headers excluded)."""
        return sum(t.length for t in self.tensors)

    @property
    def num_blocks(self) -> int:
        return self.num_units - 2

    @property
    def num_leaves(self) -> int:
        return tree_size(self.num_units)

    def root_bytes(self) -> bytes:
        return bytes.fromhex(self.merkle_root)


class _FormatProbe(msgspec.Struct):
    # Read first, alone, so a manifest of another format gets "format N", not a field-by-field error.
    format: int


# ---------------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------------


def tensor_hasher(nbytes: int) -> blake3.blake3:
    return blake3.blake3(max_threads=blake3.blake3.AUTO if nbytes >= _PARALLEL_HASH_BYTES else 1)


def tensor_digest(data: Buffer) -> bytes:
    """BLAKE3 of a tensor's bytes (multi-threaded for large tensors); any C-contiguous buffer."""
    view = memoryview(data).cast("B")  # blake3 takes bytes only, not e.g. a float16 array's items
    return tensor_hasher(view.nbytes).update(view).digest()


def unit_digest(tensors: Iterable[tuple[str, int, bytes]]) -> bytes:
    """Digest of a unit from its tensors' ``(name, length, tensor_digest)``, given in any order.

    "Name order" is Python's str order (code points), which is also the UTF-8 byte order.
    """
    h = blake3.blake3()
    previous: str | None = None
    for name, length, digest in sorted(tensors):
        if name == previous:
            raise ValueError(f"tensor {name!r} appears twice in one unit")
        if "\0" in name:
            raise ValueError(f"tensor name {name!r} holds NUL, the separator of the digest's encoding")
        if len(digest) != merkle.HASH_SIZE or not 0 <= length <= _MAX_SIZE:
            raise ValueError(f"tensor {name!r}: bad length {length} or digest of {len(digest)} bytes")
        h.update(name.encode("utf-8") + b"\0" + length.to_bytes(8, "little") + bytes(digest))
        previous = name
    return h.digest()


def tree_size(num_units: int) -> int:
    """Leaves of a model version's Merkle tree: one per unit, then the aux files' leaf."""
    return num_units + 1


def aux_digest(files: dict[str, FileRecord]) -> bytes:
    """Digest of the aux files (the tree's last leaf's data), in the unit-digest encoding."""
    return unit_digest((name, f.size, bytes.fromhex(f.blake3)) for name, f in files.items())


def merkle_leaves(units: Sequence[UnitRecord], aux_files: dict[str, FileRecord]) -> list[bytes]:
    leaves = [merkle.leaf_hash(bytes.fromhex(u.digest)) for u in units]
    return [*leaves, merkle.leaf_hash(aux_digest(aux_files))]


def unit_digest_of_buffers(tensors: Iterable[tuple[str, Buffer]]) -> bytes:
    """Digest of a unit from its tensors' ``(name, bytes)``: what the validator computes on the arena."""
    return unit_digest((name, memoryview(data).nbytes, tensor_digest(data)) for name, data in tensors)


# ---------------------------------------------------------------------------------------------------
# Encoding, reading, writing
# ---------------------------------------------------------------------------------------------------


def encode_manifest(manifest: Manifest) -> bytes:
    """The canonical bytes of ``manifest``: compact JSON, fields in declaration order, newline-ended."""
    return msgspec.json.encode(manifest) + b"\n"


def decode_manifest(raw: bytes, source: str = "<manifest>") -> Manifest:
    """Parse and check a manifest; any problem is a ``ManifestError`` naming what is wrong."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(source, f"is {len(raw)} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        fmt = msgspec.json.decode(raw, type=_FormatProbe).format
    except (msgspec.DecodeError, RecursionError) as e:
        raise ManifestError(source, f"is not a butterfly manifest: {e}") from None
    if fmt != FORMAT_VERSION:
        raise ManifestError(source, f"has format {fmt}; this build reads format {FORMAT_VERSION}")
    try:
        manifest = msgspec.json.decode(raw, type=Manifest)
    except (msgspec.DecodeError, RecursionError) as e:
        raise ManifestError(source, f"is malformed: {e}") from None
    # One manifest, one encoding: this refuses duplicate JSON keys (msgspec keeps the last one
    # silently, so two readers could disagree) and hand edits, and makes the file's bytes a name too.
    if encode_manifest(manifest) != raw:
        raise ManifestError(
            source,
            "is not in canonical form (duplicate keys, reordered fields or edited by hand); "
            "rebuild it with `butterfly-admin manifest build`",
        )
    _check(manifest, source)
    return manifest


def read_manifest(path: Path) -> Manifest:
    """Read and check the manifest at ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ManifestError(str(path), f"cannot read: {e.strerror or e}") from None
    return decode_manifest(raw, str(path))


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(manifest: Manifest, path: Path) -> int:
    """Write ``manifest`` to ``path`` atomically (temp file, fsync, rename, fsync dir); return its size."""
    path = Path(path)
    data = encode_manifest(manifest)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return len(data)


def check_chunk_bytes(chunk_bytes: int) -> None:
    if (
        not isinstance(chunk_bytes, int)
        or isinstance(chunk_bytes, bool)
        or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES
        or chunk_bytes & (chunk_bytes - 1)
    ):
        raise ValueError(
            f"chunk_bytes must be a power of two from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES}, "
            f"got {chunk_bytes!r}"
        )


# ---------------------------------------------------------------------------------------------------
# Checks on read
# ---------------------------------------------------------------------------------------------------


def _check(m: Manifest, source: str) -> None:
    try:
        check_chunk_bytes(m.chunk_bytes)
    except ValueError as e:
        raise ManifestError(source, str(e)) from None
    if CONFIG_FILE not in m.aux_files:
        raise ManifestError(source, f"aux_files lacks {CONFIG_FILE}")
    _check_tensors(m, source)
    _check_files_covered(m, source)
    try:
        layout = layout_from_manifest(m, source)
    except ModelFormatError as e:
        raise ManifestError(source, f"tensors do not form a model: {e.detail}") from None
    _check_units(m, layout, source)
    _check_digests(m, source)


def _check_tensors(m: Manifest, source: str) -> None:
    seen: set[str] = set()
    for t in m.tensors:
        where = f"tensor {t.name!r}"
        if t.name in seen:
            raise ManifestError(source, f"{where} is listed twice")
        seen.add(t.name)
        if t.file not in m.files:
            raise ManifestError(source, f"{where} is in file {t.file!r}, which is not in files")
        if t.dtype not in DTYPE_SIZES:
            raise ManifestError(source, f"{where} has unknown dtype {t.dtype!r}")
        if DTYPE_SIZES[t.dtype] * math.prod(t.shape) != t.length:
            raise ManifestError(source, f"{where}: {t.dtype} x {list(t.shape)} is not {t.length} bytes")
        if t.unit >= m.num_units:
            raise ManifestError(source, f"{where} is in unit {t.unit}, but num_units is {m.num_units}")
        if any(c >> 64 for c in t.chunks):
            raise ManifestError(source, f"{where} has a chunk digest wider than 64 bits")
        expected = -(-t.length // m.chunk_bytes)
        if len(t.chunks) != expected:
            raise ManifestError(
                source,
                f"{where} has {len(t.chunks)} chunk digests; {t.length} bytes in {m.chunk_bytes}-byte "
                f"chunks need {expected}",
            )


def _check_files_covered(m: Manifest, source: str) -> None:
    # Tensors must tile each file from the end of its header to its last byte, as safetensors does:
    # then every byte is covered by a chunk digest, and no two tensors alias the same bytes.
    by_file: dict[str, list[TensorRecord]] = {name: [] for name in m.files}
    for t in m.tensors:
        by_file[t.file].append(t)
    for name, tensors in by_file.items():
        size = m.files[name].size
        if not tensors:
            raise ManifestError(source, f"file {name!r} holds no tensor")
        tensors.sort(key=lambda t: (t.offset, t.length))
        # 8-byte header length plus at least "{}".
        if tensors[0].offset < 10:
            raise ManifestError(source, f"tensor {tensors[0].name!r} starts inside the header of {name!r}")
        for a, b in zip(tensors, tensors[1:], strict=False):
            if a.offset + a.length != b.offset:
                how = "overlaps" if a.offset + a.length > b.offset else "leaves a gap before"
                raise ManifestError(
                    source,
                    f"in {name!r}, tensor {a.name!r} [{a.offset}, {a.offset + a.length}) {how} "
                    f"tensor {b.name!r} at {b.offset}",
                )
        end = tensors[-1].offset + tensors[-1].length
        if end != size:
            raise ManifestError(source, f"tensors of {name!r} end at byte {end} but the file is {size} bytes")


def _check_units(m: Manifest, layout: ModelLayout, source: str) -> None:
    if m.num_units != len(m.units):
        raise ManifestError(source, f"num_units is {m.num_units} but {len(m.units)} units are listed")
    if len(m.units) != len(layout.units):
        raise ManifestError(
            source,
            f"{len(m.units)} units are listed; num_hidden_layers={layout.num_blocks} makes "
            f"{len(layout.units)} (embed, the blocks, head)",
        )
    for rec, unit in zip(m.units, layout.units, strict=True):
        if (rec.name, rec.kind, rec.block) != (unit.name, unit.kind, unit.block):
            raise ManifestError(
                source,
                f"unit {unit.index} is listed as {rec.name!r} ({rec.kind}, block {rec.block}); "
                f"its tensors make it {unit.name!r}",
            )
    expected = [(t.name, t.unit) for u in layout.units for t in u.tensors]
    listed = [(t.name, t.unit) for t in m.tensors]
    if listed != expected:
        bad = next(i for i, (a, b) in enumerate(zip(listed, expected, strict=True)) if a != b)
        raise ManifestError(
            source,
            f"tensor {bad} is listed as {listed[bad][0]!r} in unit {listed[bad][1]}; in unit order "
            f"(then file, offset) it must be {expected[bad][0]!r} in unit {expected[bad][1]}",
        )


def _check_digests(m: Manifest, source: str) -> None:
    by_unit: list[list[tuple[str, int, bytes]]] = [[] for _ in m.units]
    for t in m.tensors:
        by_unit[t.unit].append((t.name, t.length, bytes.fromhex(t.blake3)))
    for rec, members in zip(m.units, by_unit, strict=True):
        if unit_digest(members).hex() != rec.digest:
            raise ManifestError(
                source, f"unit {rec.name!r}: digest {rec.digest} does not follow from its tensors' digests"
            )
    root = merkle.merkle_root(merkle_leaves(m.units, m.aux_files))
    if root.hex() != m.merkle_root:
        raise ManifestError(
            source,
            f"merkle_root {m.merkle_root} is not the root of its units' and aux files' digests "
            f"({root.hex()})",
        )


# ---------------------------------------------------------------------------------------------------
# The layer map from a manifest
# ---------------------------------------------------------------------------------------------------


def layout_from_manifest(manifest: Manifest, root: Path | str) -> ModelLayout:
    """The layer map ``load_layout`` would give, built from the manifest alone (no file reads).

    ``root`` becomes ``ModelLayout.root``: the model directory, or a remote source's description
    (``s3://bucket/prefix``) as ``load_layout_from_source`` records it.

    Raises ``ModelFormatError`` when the manifest's tensors break the layout rules; ``read_manifest``
    has already refused such a manifest, so this only fires on one built by hand in memory.
    """
    source = f"{root} (manifest)"
    config = manifest.model_config
    num_blocks = config.get("num_hidden_layers")
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
        raise ModelFormatError(source, f"num_hidden_layers must be a positive integer, got {num_blocks!r}")
    tie = config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ModelFormatError(source, f"tie_word_embeddings must be true or false, got {tie!r}")
    located = [
        _Located(t.name, t.file, t.offset, t.length, t.dtype, tuple(t.shape)) for t in manifest.tensors
    ]
    embed, blocks, head = _group(located, source)
    head_names = {t.name for t in head}
    if not embed or "model.norm.weight" not in head_names:
        raise ModelFormatError(source, "model.embed_tokens.weight or model.norm.weight is missing")
    _check_blocks(blocks, num_blocks, source)
    units: list[LayerUnit] = [_unit(0, "embed", "embed", -1, embed)]
    units += [_unit(1 + b, f"layers.{b}", "block", b, blocks[b]) for b in range(num_blocks)]
    units.append(_unit(1 + num_blocks, "head", "head", -1, head))
    return ModelLayout(
        root=root,
        model_config=config,
        files={name: f.size for name, f in manifest.files.items()},
        units=tuple(units),
        num_blocks=num_blocks,
        tied_embeddings=tie or "lm_head.weight" not in head_names,
    )


# ---------------------------------------------------------------------------------------------------
# Proofs
# ---------------------------------------------------------------------------------------------------


class RangeProof(msgspec.Struct, frozen=True):
    """Proof that units ``[start, stop)`` belong to the tree: ``merkle.range_proof``'s hashes."""

    start: int
    stop: int
    hashes: tuple[bytes, ...]


def unit_range_for_blocks(num_blocks: int, blocks: LayerRange) -> tuple[int, int]:
    """Units ``[start, stop)`` a node holding ``blocks`` is responsible for.

    Block b is unit b + 1; the node with block 0 also runs the embeddings (unit 0) and the one with
    the last block the head (the last unit), so the range is always contiguous. With tied embeddings
    the last node also keeps a copy of unit 0; that unit is proven by the first node's range.
    """
    if blocks.stop > num_blocks:
        raise ValueError(f"layer range {blocks} is beyond the model's {num_blocks} blocks")
    start = 0 if blocks.start == 0 else blocks.start + 1
    stop = num_blocks + 2 if blocks.stop == num_blocks else blocks.stop + 1
    return start, stop


def range_proof_for_blocks(manifest: Manifest, blocks: LayerRange) -> RangeProof:
    """The compact Merkle proof for the units of ``blocks``, from the manifest's unit digests."""
    start, stop = unit_range_for_blocks(manifest.num_blocks, blocks)
    leaves = merkle_leaves(manifest.units, manifest.aux_files)
    return RangeProof(start, stop, tuple(merkle.range_proof(leaves, start, stop)))


def verify_blocks(
    manifest: Manifest, blocks: LayerRange, unit_digests: Sequence[bytes], proof: RangeProof
) -> bool:
    """True iff ``unit_digests`` (a peer's, for ``blocks``) belong to the manifest's tree.

    Root and tree size come from the verifier's own manifest, never from the peer; the leaf prefix is
    applied here. Never raises on what a peer sent.
    """
    try:
        start, stop = unit_range_for_blocks(manifest.num_blocks, blocks)
    except ValueError:
        return False
    if (proof.start, proof.stop) != (start, stop) or len(unit_digests) != stop - start:
        return False
    if not all(isinstance(d, bytes) and len(d) == merkle.HASH_SIZE for d in unit_digests):
        return False
    leaves = [merkle.leaf_hash(d) for d in unit_digests]
    return merkle.verify_range(leaves, start, manifest.num_leaves, proof.hashes, manifest.root_bytes())
