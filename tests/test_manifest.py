"""The manifest: building, the canonical encoding, hostile reads, verification, proofs, layout, digests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import blake3
import msgspec
import numpy as np
import pytest
import xxhash

from butterfly.ipc import Loaded, TensorPlacement, ValidateArena
from butterfly.loader.process import place
from butterfly.validator.check import digest_arena
from butterfly.weights import merkle
from butterfly.weights.build import build_manifest, build_manifest_from_source
from butterfly.weights.layout import LayerRange, load_layout
from butterfly.weights.manifest import (
    MANIFEST_FILE,
    FileRecord,
    Manifest,
    ManifestError,
    RangeProof,
    aux_digest,
    decode_manifest,
    encode_manifest,
    layout_from_manifest,
    range_proof_for_blocks,
    read_manifest,
    tensor_digest,
    unit_digest,
    unit_digest_of_buffers,
    unit_range_for_blocks,
    verify_blocks,
    write_manifest,
)
from butterfly.weights.safetensors import ModelFormatError, write_safetensors
from butterfly.weights.sources import Source, SourceError, SourceNotFound
from butterfly.weights.testmodel import make_test_model
from butterfly.weights.verify import read_aux_file, verify_dir, verify_source

CHUNK = 64 << 10  # the smallest chunk size, so the embeddings (128 KiB) span two chunks
LAYERS = 4
EMBED = "model.embed_tokens.weight"


def _model(path: Path, **kw: object) -> Path:
    args: dict[str, object] = {"layers": LAYERS, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 1024}
    args.update(kw)
    return make_test_model(path, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(tmp_path_factory.mktemp("manifest") / "m", shards=2)


@pytest.fixture(scope="module")
def built(model: Path) -> Manifest:
    return build_manifest(model, CHUNK)[0]


@pytest.fixture
def copy(model: Path, tmp_path: Path) -> Path:
    """A private copy of the model that a test may damage."""
    return Path(shutil.copytree(model, tmp_path / "copy"))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


# ---------------------------------------------------------------------------------------------------
# Building and the canonical form
# ---------------------------------------------------------------------------------------------------


def test_build_records_every_byte(model: Path, built: Manifest) -> None:
    layout = load_layout(model)
    assert built.num_units == LAYERS + 2 == len(built.units)
    assert [u.name for u in built.units] == ["embed"] + [f"layers.{b}" for b in range(LAYERS)] + ["head"]
    assert built.chunk_bytes == CHUNK
    assert built.model_config == json.loads((model / "config.json").read_bytes())
    assert sorted(built.aux_files) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    for name, rec in built.aux_files.items():
        data = (model / name).read_bytes()
        assert rec == FileRecord(len(data), blake3.blake3(data).hexdigest())
    for name, rec in built.files.items():
        data = (model / name).read_bytes()
        assert rec.size == len(data) and rec.blake3 == blake3.blake3(data).hexdigest()
    assert set(built.files) == set(layout.files)
    for t in built.tensors:
        with open(model / t.file, "rb") as f:
            f.seek(t.offset)
            data = f.read(t.length)
        assert t.blake3 == blake3.blake3(data).hexdigest()
        assert list(t.chunks) == [
            xxhash.xxh3_64_intdigest(data[i : i + CHUNK]) for i in range(0, t.length, CHUNK)
        ]
    embed = next(t for t in built.tensors if t.name == EMBED)
    assert embed.length == 2 * CHUNK and len(embed.chunks) == 2
    # The unit digest, spelled out from its definition, and the root over the leaves.
    for unit in layout.units:
        h = blake3.blake3()
        for entry in sorted(unit.tensors, key=lambda e: e.name):
            digest = next(r.blake3 for r in built.tensors if r.name == entry.name)
            h.update(entry.name.encode() + b"\0" + entry.length.to_bytes(8, "little") + bytes.fromhex(digest))
        assert built.units[unit.index].digest == h.hexdigest()
    leaves = [merkle.leaf_hash(bytes.fromhex(u.digest)) for u in built.units]
    # The last leaf: the aux files (config.json, tokenizer), spelled out in the same encoding.
    h = blake3.blake3()
    for name in sorted(built.aux_files):
        rec = built.aux_files[name]
        h.update(name.encode() + b"\0" + rec.size.to_bytes(8, "little") + bytes.fromhex(rec.blake3))
    leaves.append(merkle.leaf_hash(h.digest()))
    assert built.merkle_root == merkle.merkle_root(leaves).hex() and built.num_leaves == len(leaves)
    assert built.total_bytes == layout.total_bytes


def test_round_trip_and_atomic_write(model: Path, built: Manifest, tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_FILE
    size = write_manifest(built, path)
    assert path.stat().st_size == size
    assert read_manifest(path) == built
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE]  # no temp file left behind
    write_manifest(built, path)  # replacing is fine too
    assert read_manifest(path) == built


def test_build_is_deterministic_and_the_root_ignores_sharding(
    model: Path, built: Manifest, tmp_path: Path
) -> None:
    again = build_manifest(Path(shutil.copytree(model, tmp_path / "elsewhere")), CHUNK)[0]
    assert encode_manifest(again) == encode_manifest(built)
    one_file = build_manifest(_model(tmp_path / "single", shards=1), CHUNK)[0]
    # Same tensors in one file instead of two: other files and offsets, the same model version.
    assert one_file.files.keys() != built.files.keys()
    assert one_file.merkle_root == built.merkle_root
    assert [u.digest for u in one_file.units] == [u.digest for u in built.units]


def test_root_changes_with_one_byte(copy: Path, built: Manifest) -> None:
    t = next(t for t in built.tensors if t.name == "model.layers.2.mlp.up_proj.weight")
    _flip(copy / t.file, t.offset + 7)
    changed = build_manifest(copy, CHUNK)[0]
    assert changed.merkle_root != built.merkle_root
    differ = [a.name for a, b in zip(built.units, changed.units, strict=True) if a.digest != b.digest]
    assert differ == ["layers.2"]


def test_chunk_size_is_checked(model: Path) -> None:
    for bad in (1000, 32 << 10, 3 << 20, 512 << 20):
        with pytest.raises(ValueError, match="power of two"):
            build_manifest(model, bad)


def test_config_json_cannot_carry_nan(copy: Path) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rope_scaling_factor"] = float("nan")
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match="NaN"):
        build_manifest(copy, CHUNK)


def test_build_refuses_a_broken_model(copy: Path) -> None:
    (copy / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json"):
        build_manifest(copy, CHUNK)


# ---------------------------------------------------------------------------------------------------
# Layout from a manifest
# ---------------------------------------------------------------------------------------------------

BLOCK_MEMBERS = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
]


def _round_robin_model(root: Path, layers: int, shards: int) -> Path:
    """A checkpoint whose units are spread over every shard (each unit's tensors in several files)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    names += [f"model.layers.{i}.{m}" for i in range(layers) for m in BLOCK_MEMBERS]
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {n: files[i % shards] for i, n in enumerate(names)}
    for f in files:
        arrays = {n: (np.arange(8 + len(n)) + sum(n.encode())).astype(np.float16) for n in names}
        write_safetensors(root / f, {n: a for n, a in arrays.items() if weight_map[n] == f})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


@pytest.mark.parametrize("kind", ["sharded", "single", "tied", "round_robin"])
def test_layout_from_manifest_equals_load_layout(tmp_path: Path, kind: str) -> None:
    if kind == "round_robin":
        root = _round_robin_model(tmp_path / kind, layers=3, shards=3)
    else:
        root = _model(tmp_path / kind, shards=1 if kind == "single" else 3, tie_embeddings=kind == "tied")
    manifest = build_manifest(root, CHUNK)[0]
    raw = encode_manifest(manifest)
    assert layout_from_manifest(decode_manifest(raw), root) == load_layout(root)


# ---------------------------------------------------------------------------------------------------
# Hostile and tampered manifests
# ---------------------------------------------------------------------------------------------------

Doc = dict[str, object]


def _doc(m: Manifest) -> Doc:
    doc = json.loads(encode_manifest(m))
    assert isinstance(doc, dict)
    return doc


def _raw(doc: Doc) -> bytes:
    # The canonical encoding of an edited document, so that the edit itself is what gets refused.
    return msgspec.json.encode(doc) + b"\n"


def _reseal(doc: Doc) -> Doc:
    """Recompute unit digests and the root from the (edited) tensors, as a careful forger would."""
    units: list[dict[str, object]] = doc["units"]  # type: ignore[assignment]
    members: list[list[tuple[str, int, bytes]]] = [[] for _ in units]
    for t in doc["tensors"]:  # type: ignore[attr-defined]
        members[t["unit"]].append((t["name"], t["length"], bytes.fromhex(t["blake3"])))
    for unit, m in zip(units, members, strict=True):
        unit["digest"] = unit_digest(m).hex()
    leaves = [merkle.leaf_hash(bytes.fromhex(str(u["digest"]))) for u in units]
    aux: dict[str, dict[str, object]] = doc["aux_files"]  # type: ignore[assignment]
    records = {n: FileRecord(int(str(f["size"])), str(f["blake3"])) for n, f in aux.items()}
    leaves.append(merkle.leaf_hash(aux_digest(records)))
    doc["merkle_root"] = merkle.merkle_root(leaves).hex()
    return doc


def _tensor(doc: Doc, name: str) -> dict[str, object]:
    return next(t for t in doc["tensors"] if t["name"] == name)  # type: ignore[attr-defined]


def test_untouched_document_reads_back(built: Manifest) -> None:
    # Guards the tamper tests below: the edit, not the helper's re-encoding, is what they catch.
    assert decode_manifest(_raw(_doc(built))) == built
    assert decode_manifest(_raw(_reseal(_doc(built)))) == built


def _edit_tensor_digest(d: Doc) -> None:
    t = _tensor(d, EMBED)
    t["blake3"] = ("0" if t["blake3"][0] != "0" else "1") + t["blake3"][1:]  # type: ignore[index]


def _edit_file_size(d: Doc) -> None:
    f = next(iter(d["files"].values()))  # type: ignore[attr-defined]
    f["size"] += 1


def _edit_tensor_length(d: Doc) -> None:
    _tensor(d, EMBED)["length"] += 2  # type: ignore[operator]


def _edit_reorder_units(d: Doc) -> None:
    u = d["units"]
    u[1], u[2] = u[2], u[1]  # type: ignore[index]


def _edit_root(d: Doc) -> None:
    d["merkle_root"] = "ab" * 32


def _edit_num_units(d: Doc) -> None:
    d["num_units"] += 1  # type: ignore[operator]


def _edit_num_units_down(d: Doc) -> None:
    d["num_units"] -= 1  # type: ignore[operator]


def _edit_drop_unit(d: Doc) -> None:
    d["units"].pop(2)  # type: ignore[attr-defined]
    d["num_units"] -= 1  # type: ignore[operator]


def _edit_unit_digest(d: Doc) -> None:
    d["units"][3]["digest"] = "cd" * 32  # type: ignore[index]


def _edit_format(d: Doc) -> None:
    d["format"] = 3


def _edit_aux_digest(d: Doc) -> None:
    d["aux_files"]["tokenizer.json"]["blake3"] = "ab" * 32  # type: ignore[index]


def _edit_aux_name(d: Doc) -> None:
    aux: dict[str, object] = d["aux_files"]  # type: ignore[assignment]
    aux["../secrets.json"] = aux.pop("tokenizer.json")


def _edit_unknown_field(d: Doc) -> None:
    d["signed_by"] = "me"


def _edit_missing_field(d: Doc) -> None:
    del d["aux_files"]


def _edit_path_traversal(d: Doc) -> None:
    files: dict[str, object] = d["files"]  # type: ignore[assignment]
    name = next(iter(files))
    files["../../etc/passwd.safetensors"] = files.pop(name)
    for t in d["tensors"]:  # type: ignore[attr-defined]
        if t["file"] == name:
            t["file"] = "../../etc/passwd.safetensors"


def _edit_chunk_count(d: Doc) -> None:
    _tensor(d, EMBED)["chunks"].pop()  # type: ignore[attr-defined]


def _edit_chunk_too_wide(d: Doc) -> None:
    _tensor(d, EMBED)["chunks"][0] = 2**64  # type: ignore[index]


def _edit_chunk_bytes(d: Doc) -> None:
    d["chunk_bytes"] = 100_000


def _edit_dtype(d: Doc) -> None:
    _tensor(d, EMBED)["dtype"] = "F12"


def _edit_shape(d: Doc) -> None:
    _tensor(d, EMBED)["shape"] = [2**62, 2**62]


def _edit_unknown_file(d: Doc) -> None:
    _tensor(d, EMBED)["file"] = "other.safetensors"


def _edit_negative_offset(d: Doc) -> None:
    _tensor(d, EMBED)["offset"] = -8


def _edit_num_layers(d: Doc) -> None:
    d["model_config"]["num_hidden_layers"] = LAYERS + 1  # type: ignore[index]


def _edit_listed_twice(d: Doc) -> None:
    d["tensors"].append(dict(_tensor(d, EMBED)))  # type: ignore[attr-defined]


TAMPERS: dict[str, tuple[Callable[[Doc], None], str]] = {
    "tensor digest flipped": (_edit_tensor_digest, "does not follow from its tensors"),
    "file size changed": (_edit_file_size, "end at byte"),
    "tensor length changed": (_edit_tensor_length, "is not .* bytes"),
    "units reordered": (_edit_reorder_units, "listed as 'layers.1'"),
    "wrong root": (_edit_root, "not the root of its units"),
    "num_units too big": (_edit_num_units, "num_units"),
    "num_units too small": (_edit_num_units_down, "num_units"),
    "unit dropped": (_edit_drop_unit, "but num_units is 5"),
    "unit digest replaced": (_edit_unit_digest, "does not follow from its tensors"),
    "format 3": (_edit_format, "format 3"),
    "aux file digest replaced": (_edit_aux_digest, "not the root of its units' and aux files'"),
    "unknown field": (_edit_unknown_field, "signed_by"),
    "missing field": (_edit_missing_field, "aux_files"),
    "unknown aux file": (_edit_aux_name, "aux_files"),
    "path traversal": (_edit_path_traversal, "regex"),
    "chunk digest dropped": (_edit_chunk_count, "chunk digests"),
    "chunk digest wider than 64 bits": (_edit_chunk_too_wide, "64 bits"),
    "chunk bytes not a power of two": (_edit_chunk_bytes, "power of two"),
    "unknown dtype": (_edit_dtype, "unknown dtype"),
    "shape overflow": (_edit_shape, "is not .* bytes"),
    "unknown file": (_edit_unknown_file, "not in files"),
    "negative offset": (_edit_negative_offset, ">= 0"),
    "num_hidden_layers changed": (_edit_num_layers, "num_hidden_layers=5"),
    "tensor listed twice": (_edit_listed_twice, "listed twice"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_manifest_is_refused(built: Manifest, case: str) -> None:
    edit, message = TAMPERS[case]
    doc = _doc(built)
    edit(doc)
    with pytest.raises(ManifestError, match=message):
        decode_manifest(_raw(doc), "m.json")


def _reseal_move_tensor(d: Doc) -> None:
    _tensor(d, "model.layers.1.mlp.up_proj.weight")["unit"] = 3


def _reseal_rename_tensor(d: Doc) -> None:
    _tensor(d, "model.layers.1.mlp.up_proj.weight")["name"] = "model.layers.1.mlp.sideways.weight"


def _reseal_overlap(d: Doc) -> None:
    a = _tensor(d, "model.layers.0.mlp.down_proj.weight")
    b = _tensor(d, "model.layers.0.mlp.gate_proj.weight")
    b["offset"] = a["offset"]


def _reseal_reorder_tensors(d: Doc) -> None:
    t = d["tensors"]
    t[1], t[2] = t[2], t[1]  # type: ignore[index]


RESEALED: dict[str, tuple[Callable[[Doc], None], str]] = {
    "tensor moved to another unit": (_reseal_move_tensor, "in unit order"),
    "tensor renamed": (_reseal_rename_tensor, "match no known"),
    "overlapping tensors": (_reseal_overlap, "overlaps"),
    "tensors reordered": (_reseal_reorder_tensors, "in unit order"),
}


@pytest.mark.parametrize("case", list(RESEALED))
def test_consistently_forged_manifest_is_refused(built: Manifest, case: str) -> None:
    """Digests and root recomputed after the edit: the layout rules still catch it."""
    edit, message = RESEALED[case]
    doc = _doc(built)
    edit(doc)
    with pytest.raises(ManifestError, match=message):
        decode_manifest(_raw(_reseal(doc)), "m.json")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format": 1}',
        b'{"format": "1"}',
        b'{"format": 1, "model_config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["empty", "not-json", "array", "only-format", "format-string", "deep-nesting"],
)
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        decode_manifest(raw)


def test_non_canonical_encodings_are_refused(built: Manifest) -> None:
    raw = encode_manifest(built)
    pretty = msgspec.json.format(raw, indent=2)
    with pytest.raises(ManifestError, match="canonical"):
        decode_manifest(pretty)
    # A duplicate key: msgspec keeps the last value silently; the canonical check refuses it.
    dup = raw.replace(b'{"format":2,', b'{"format":2,"format":2,', 1)
    with pytest.raises(ManifestError, match="canonical"):
        decode_manifest(dup)


def test_oversized_manifest_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import butterfly.weights.manifest as mod

    monkeypatch.setattr(mod, "MAX_MANIFEST_BYTES", 1000)
    path = tmp_path / "big.json"
    path.write_bytes(b" " * 5000)
    with pytest.raises(ManifestError, match="limit"):
        read_manifest(path)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------------
# Verifying bytes
# ---------------------------------------------------------------------------------------------------


def test_verify_clean_dir(model: Path, built: Manifest) -> None:
    assert verify_dir(built, model) == []


def test_verify_names_tensor_and_chunk_of_a_flipped_byte(copy: Path, built: Manifest) -> None:
    t = next(t for t in built.tensors if t.name == EMBED)
    _flip(copy / t.file, t.offset + CHUNK + 5)  # in the embeddings' second chunk
    problems = verify_dir(built, copy)
    assert len(problems) == 2
    p = problems[0]
    assert (p.file, p.tensor, p.offset) == (t.file, EMBED, t.offset + CHUNK)
    # The root recomputed from the bytes' tensor digests says what that means for the model version.
    assert problems[1].file == "<merkle root>" and f"the manifest names {built.merkle_root}" in str(
        problems[1]
    )
    assert f"chunk at tensor offset {CHUNK} (file offset {t.offset + CHUNK}" in str(p)
    assert "1 of 2 chunks differ" in str(p)


def test_verify_catches_a_header_change(copy: Path, built: Manifest) -> None:
    name = sorted(built.files)[0]
    _flip(copy / name, 20)  # inside the JSON header: no tensor byte changes
    problems = verify_dir(built, copy)
    assert len(problems) == 1 and problems[0].tensor is None
    assert "BLAKE3" in str(problems[0]) and name in str(problems[0])


def test_verify_truncated_shard(copy: Path, built: Manifest) -> None:
    name = sorted(built.files)[-1]
    size = built.files[name].size
    with open(copy / name, "r+b") as f:
        f.truncate(size - 100)
    problems = verify_dir(built, copy)
    assert f"is {size - 100} bytes, the manifest says {size}" in str(problems[0])
    last = max((t for t in built.tensors if t.file == name), key=lambda t: t.offset)
    assert any(p.tensor == last.name and "past the end" in str(p) for p in problems)
    assert all(p.file == name for p in problems)


def test_verify_missing_file_and_changed_config(copy: Path, built: Manifest) -> None:
    name = sorted(built.files)[0]
    (copy / name).unlink()
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    # Same size, other bytes: another version's tokenizer beside these weights.
    tok = (copy / "tokenizer.json").read_bytes()
    (copy / "tokenizer.json").write_bytes(tok.replace(b"<unk>", b"<UNK>", 1))
    problems = verify_dir(built, copy)
    assert [p.file for p in problems] == [name, "config.json", "tokenizer.json"]
    assert "missing" in str(problems[0])
    assert "the manifest says" in str(problems[1]) and "not the one of model version" in str(problems[1])
    assert "BLAKE3" in str(problems[2])


def test_verify_reports_a_tampered_chunk_digest(model: Path, built: Manifest) -> None:
    # Chunk digests are not bound by the root (they are a fast pre-check); bytes that disagree with
    # them are still reported, never accepted.
    doc = _doc(built)
    _tensor(doc, EMBED)["chunks"][1] ^= 1  # type: ignore[index]
    forged = decode_manifest(_raw(doc))
    problems = verify_dir(forged, model)
    assert len(problems) == 1 and problems[0].tensor == EMBED


class _MemorySource:
    """A ``Source`` over files held in memory, recording its reads and failing where told."""

    def __init__(self, files: dict[str, bytes], fail_at: tuple[str, int] | None = None) -> None:
        self.files = files
        self.fail_at = fail_at
        self.reads: list[tuple[str, int, int]] = []

    @property
    def description(self) -> str:
        return "mem://model"

    def size(self, file: str) -> int:
        if file not in self.files:
            raise SourceNotFound(f"no such object: {file}")
        return len(self.files[file])

    def read_into(self, file: str, offset: int, buf: memoryview) -> None:
        if self.fail_at is not None and self.fail_at[0] == file and offset >= self.fail_at[1]:
            raise SourceError(f"injected failure at {file}:{offset}")
        data = self.files[file][offset : offset + len(buf)]
        if len(data) != len(buf):
            raise SourceError("short read")
        buf[:] = data
        self.reads.append((file, offset, len(buf)))

    def read_small(self, file: str, limit: int) -> bytes:
        if self.size(file) > limit:
            raise SourceError(f"{file} is larger than {limit} bytes")
        return self.files[file]

    def close(self) -> None:
        pass


def test_verify_over_any_source(model: Path, built: Manifest) -> None:
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    src = _MemorySource(files)
    assert verify_source(built, src) == []
    # Each file read once, front to back, in chunk-sized pieces.
    for name, rec in built.files.items():
        reads = [(off, n) for f, off, n in src.reads if f == name]
        assert [off for off, _ in reads] == sorted(off for off, _ in reads)
        assert sum(n for _, n in reads) == rec.size and max(n for _, n in reads) <= CHUNK
    t = next(t for t in built.tensors if t.name == "lm_head.weight")
    data = bytearray(files[t.file])
    data[t.offset + 3] ^= 0xFF
    problems = verify_source(built, _MemorySource({**files, t.file: bytes(data)}))
    assert [(p.tensor, p.offset) for p in problems] == [("lm_head.weight", t.offset), (None, None)]
    failing = verify_source(built, _MemorySource(files, fail_at=(t.file, t.offset)))
    assert len(failing) == 1 and "injected failure" in str(failing[0])


def test_build_over_any_source(model: Path, built: Manifest) -> None:
    src = _MemorySource({p.name: p.read_bytes() for p in model.iterdir()})
    assert isinstance(src, Source)
    manifest, stats = build_manifest_from_source(src, CHUNK)
    assert encode_manifest(manifest) == encode_manifest(built)
    assert stats.bytes_read == sum(f.size for f in built.files.values())
    assert layout_from_manifest(manifest, src.description).root == "mem://model"


# ---------------------------------------------------------------------------------------------------
# Proofs
# ---------------------------------------------------------------------------------------------------


def test_unit_ranges_for_blocks() -> None:
    assert unit_range_for_blocks(4, LayerRange(0, 4)) == (0, 6)
    assert unit_range_for_blocks(4, LayerRange(0, 2)) == (0, 3)
    assert unit_range_for_blocks(4, LayerRange(1, 3)) == (2, 4)
    assert unit_range_for_blocks(4, LayerRange(2, 4)) == (3, 6)
    with pytest.raises(ValueError, match="beyond"):
        unit_range_for_blocks(4, LayerRange(2, 5))


def test_range_proofs_for_every_block_range(built: Manifest) -> None:
    digests = [bytes.fromhex(u.digest) for u in built.units]
    ranges = [LayerRange(s, t) for s in range(LAYERS) for t in range(s + 1, LAYERS + 1)]
    for r in ranges:
        proof = range_proof_for_blocks(built, r)
        held = digests[proof.start : proof.stop]
        assert verify_blocks(built, r, held, proof)
        # What a peer might get wrong or forge: each is refused, never raises.
        wrong = [held[0][:-1] + bytes([held[0][-1] ^ 1]), *held[1:]]
        assert not verify_blocks(built, r, wrong, proof)
        assert not verify_blocks(built, r, held[:-1], proof)
        if proof.hashes:
            bad = (proof.hashes[0][::-1], *proof.hashes[1:])
            assert not verify_blocks(built, r, held, RangeProof(proof.start, proof.stop, bad))
        for other in ranges:
            if other != r:
                assert not verify_blocks(built, other, held, proof)
    # A range proof travels over the wire as a msgspec message.
    proof = range_proof_for_blocks(built, LayerRange(1, 3))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(proof), type=RangeProof) == proof


# ---------------------------------------------------------------------------------------------------
# One digest definition: the validator and the manifest agree
# ---------------------------------------------------------------------------------------------------


def _arena_for(model: Path, r: LayerRange) -> tuple[bytearray, ValidateArena]:
    """What the loader would leave in the arena for blocks ``r``, built by hand from the files."""
    layout = load_layout(model)
    tensors = layout.tensors_for_blocks(r)
    placements, size = place(tensors)
    arena = bytearray(size)
    for t, p in zip(tensors, placements, strict=True):
        with open(model / t.file, "rb") as f:
            f.seek(t.offset)
            arena[p.arena_offset : p.arena_offset + p.length] = f.read(t.length)
    loaded = Loaded(
        epoch=1,
        start=r.start,
        stop=r.stop,
        arena_name="test",
        arena_bytes=size,
        tensors=[TensorPlacement(p.name, p.unit, p.arena_offset, p.length) for p in placements],
        chunks=[],
        step_seconds={},
    )
    return arena, ValidateArena(epoch=1, loaded=loaded)


@pytest.mark.parametrize("tied", [False, True])
def test_validator_digests_equal_the_manifests(tmp_path: Path, tied: bool) -> None:
    model = _model(tmp_path / "m", shards=2, tie_embeddings=tied)
    manifest = build_manifest(model, CHUNK)[0]
    for r in (LayerRange(0, 2), LayerRange(2, 4), LayerRange(0, 4)):
        arena, cmd = _arena_for(model, r)
        got = digest_arena(memoryview(arena), cmd.loaded.tensors, threads=2)
        units, digests = got.units, got.unit_digests
        assert [d.hex() for d in digests] == [manifest.units[u].digest for u in units]
        start, stop = unit_range_for_blocks(LAYERS, r)
        held = dict(zip(units, digests, strict=True))
        proof = range_proof_for_blocks(manifest, r)
        assert verify_blocks(manifest, r, [held[u] for u in range(start, stop)], proof)
        # The tied head's copy of the embeddings is unit 0, outside [start, stop) for a later node.
        assert (0 in units) == (r.start == 0 or tied)
        # A flipped arena byte changes exactly its unit's digest.
        p = cmd.loaded.tensors[-1]
        arena[p.arena_offset + p.length // 2] ^= 0x10
        after = digest_arena(memoryview(arena), cmd.loaded.tensors, threads=2).unit_digests
        changed = [u for u, a, b in zip(units, digests, after, strict=True) if a != b]
        assert changed == [p.unit]


def test_unit_digest_definition() -> None:
    a, b = b"\x01" * 10, b"\x02" * 20
    expect = blake3.blake3(
        b"a\0"
        + (10).to_bytes(8, "little")
        + blake3.blake3(a).digest()
        + b"b\0"
        + (20).to_bytes(8, "little")
        + blake3.blake3(b).digest()
    ).digest()
    assert unit_digest_of_buffers([("b", b), ("a", a)]) == expect  # order of arrival does not matter
    assert unit_digest([("a", 10, tensor_digest(a)), ("b", 20, tensor_digest(b))]) == expect
    # Moving a byte from one tensor to the other, or renaming one, changes the digest.
    assert unit_digest_of_buffers([("a", a + b[:1]), ("b", b[1:])]) != expect
    assert unit_digest_of_buffers([("a", a), ("c", b)]) != expect
    with pytest.raises(ValueError, match="twice"):
        unit_digest_of_buffers([("a", a), ("a", b)])
    big = bytes(range(256)) * 16384  # 4 MiB: the multi-threaded path gives the same digest
    assert tensor_digest(memoryview(big)) == blake3.blake3(big).digest()


def test_read_aux_file_returns_only_the_manifests_bytes(model: Path, built: Manifest, tmp_path: Path) -> None:
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    assert read_aux_file(built, _MemorySource(files), "tokenizer.json") == files["tokenizer.json"]
    # Another model's tokenizer of the very same size: refused by its digest.
    other = files["tokenizer.json"].replace(b"<unk>", b"<UNK>", 1)
    with pytest.raises(ManifestError, match="mem://model/tokenizer.json: .* not the one of model version"):
        read_aux_file(built, _MemorySource({**files, "tokenizer.json": other}), "tokenizer.json")
    with pytest.raises(ManifestError, match="the manifest says"):
        read_aux_file(
            built, _MemorySource({**files, "config.json": files["config.json"] + b" "}), "config.json"
        )
    with pytest.raises(ManifestError, match="is not covered by the manifest"):
        read_aux_file(built, _MemorySource(files), "special_tokens_map.json")
    with pytest.raises(SourceNotFound):
        read_aux_file(
            built,
            _MemorySource({k: v for k, v in files.items() if k != "tokenizer_config.json"}),
            "tokenizer_config.json",
        )
    # The same from a directory.
    from butterfly.weights.sources import FilesystemSource

    src = FilesystemSource(model)
    try:
        assert read_aux_file(built, src, "config.json") == files["config.json"]
    finally:
        src.close()


def test_tokenizer_changes_the_model_version(tmp_path: Path) -> None:
    """The root names the tokenizer: the same weights with another tokenizer are another version."""
    a = _model(tmp_path / "a", manifest=False)
    ma = build_manifest(a, CHUNK)[0]
    tok = (a / "tokenizer_config.json").read_text()
    (a / "tokenizer_config.json").write_text(tok.replace("<|im_end|>", "<|end|>"))
    mb = build_manifest(a, CHUNK)[0]
    assert ma.units == mb.units and ma.merkle_root != mb.merkle_root
    # A model without tokenizer files still has a manifest: config.json alone is covered.
    (a / "tokenizer_config.json").unlink()
    (a / "tokenizer.json").unlink()
    assert sorted(build_manifest(a, CHUNK)[0].aux_files) == ["config.json"]


def test_node_refuses_a_manifest_whose_model_config_is_not_the_config_json(tmp_path: Path) -> None:
    """model_config is not bound by the root; the node checks it against config.json fetched through
    the manifest, so an edited manifest cannot make a node run another shape or RoPE."""
    from butterfly.config import parse_config
    from butterfly.weights.modelsource import load_manifest

    model = _model(tmp_path / "m")
    config = parse_config(f'[model]\nsource_type = "filesystem"\nsource_path = "{model}"\n')
    good = load_manifest(config)
    assert good.model_config["num_hidden_layers"] == LAYERS
    doc = _doc(good)
    doc["model_config"]["rope_theta"] = 1.0  # type: ignore[index]
    write_manifest(decode_manifest(_raw(doc)), model / MANIFEST_FILE)  # the root still checks out
    with pytest.raises(ManifestError, match="does not say what the manifest's model_config says"):
        load_manifest(config)
