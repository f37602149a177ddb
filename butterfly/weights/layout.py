"""The model's layer map: which tensors, at which byte ranges of which files, make up each layer.

Owns: grouping a Hugging Face checkpoint's tensors (Llama, Mistral, Qwen2 naming) into ordered units —
``embed``, ``layers.0`` .. ``layers.{L-1}``, ``head`` — with absolute file offsets; checking that the
checkpoint is consistent (config.json, the shard index, every shard header), read through any
``Source`` (a directory, an S3 prefix) with small ranged reads of the headers only; and answering
"which tensors does a node holding blocks [start, stop) need".

Must not: read tensor data (only config.json, the index, and each shard's 8-byte length and header),
hash anything (the manifest does), decide who holds which blocks (the
planner does), or silently drop or guess about a tensor it does not recognise: an unknown name, a
missing block or an index that disagrees with a header is a ``ModelFormatError``.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from butterfly.weights.safetensors import (
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    ModelFormatError,
    SafetensorsHeader,
    looks_like_pickle,
    parse_header_bytes,
    refuse_pickle,
)
from butterfly.weights.sources import FilesystemSource, Source, SourceError, SourceNotFound

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "LayerRange",
    "LayerUnit",
    "ModelLayout",
    "TensorEntry",
    "load_layout",
    "load_layout_from_source",
]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# config.json and the index are small; a cap keeps a hostile directory from making us read gigabytes.
MAX_JSON_BYTES = 64 * 1024 * 1024
# Probed when a source has neither the index nor model.safetensors, to name a pickle checkpoint.
_PICKLE_NAMES = ("pytorch_model.bin.index.json", "pytorch_model.bin", "model.pt", "consolidated.00.pth")

UnitKind = Literal["embed", "block", "head"]

_EMBED = re.compile(r"model\.embed_tokens\.weight")
_HEAD = re.compile(r"model\.norm\.weight|lm_head\.weight")
# Block members of Llama/Mistral/Qwen2. Biases: Qwen2 has q/k/v ones, Llama's attention_bias and
# mlp_bias options add the rest. rotary_emb.inv_freq is a buffer older Llama conversions saved.
# The block number must be canonical ("01" is refused) so two spellings cannot name one block.
_BLOCK = re.compile(
    r"model\.layers\.(0|[1-9][0-9]{0,8})\."
    r"(self_attn\.[qkvo]_proj\.(?:weight|bias)"
    r"|mlp\.(?:gate|up|down)_proj\.(?:weight|bias)"
    r"|input_layernorm\.weight|post_attention_layernorm\.weight"
    r"|self_attn\.rotary_emb\.inv_freq)"
)
_LM_HEAD = "lm_head.weight"
_FINAL_NORM = "model.norm.weight"
# Shard names come from the index; a name with a path separator could point outside the model dir.
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\.safetensors")
_MAX_LISTED = 8


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: ``length`` bytes at ABSOLUTE byte ``offset`` of ``file`` (relative to the model dir)."""

    name: str
    file: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    unit: int


@dataclass(frozen=True)
class LayerUnit:
    """A unit of loading: the embeddings, one transformer block, or the head (final norm + lm_head)."""

    index: int
    name: str
    kind: UnitKind
    block: int
    tensors: tuple[TensorEntry, ...]
    nbytes: int


@dataclass(frozen=True)
class LayerRange:
    """Transformer blocks ``[start, stop)``. Printed in the seed's inclusive form: blocks 0..26 -> "0-26"."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        for value in (self.start, self.stop):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"LayerRange bounds must be int, got {value!r}")
        if not 0 <= self.start < self.stop:
            raise ValueError(f"LayerRange needs 0 <= start < stop, got [{self.start}, {self.stop})")

    def __str__(self) -> str:
        return f"{self.start}-{self.stop - 1}"

    def __len__(self) -> int:
        return self.stop - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.stop

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        """Parse the inclusive form ``"0-26"`` (or a single block ``"5"``)."""
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
        if m is None:
            raise ValueError(f"not a layer range: {text!r} (expected e.g. '0-26')")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ValueError(f"layer range {text!r} ends before it starts")
        return cls(first, last + 1)


@dataclass(frozen=True)
class ModelLayout:
    """A checked checkpoint: ordered units (embed, blocks 0..L-1, head) and the files they live in.

    ``root`` is the model directory (a ``Path``) for a filesystem source, else the source's description
    (an ``s3://bucket/prefix`` string).
    """

    root: Path | str
    model_config: dict[str, object]
    files: dict[str, int]
    units: tuple[LayerUnit, ...]
    num_blocks: int
    tied_embeddings: bool

    @property
    def embed_unit(self) -> LayerUnit:
        return self.units[0]

    @property
    def head_unit(self) -> LayerUnit:
        return self.units[-1]

    def block_unit(self, block: int) -> LayerUnit:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range 0..{self.num_blocks - 1}")
        return self.units[1 + block]

    def block_sizes(self) -> list[int]:
        """Bytes of each transformer block, in block order."""
        return [u.nbytes for u in self.units[1:-1]]

    @property
    def embed_bytes(self) -> int:
        return self.embed_unit.nbytes

    @property
    def head_bytes(self) -> int:
        """Bytes of the head unit itself (final norm, lm_head); tied embeddings are counted in embed."""
        return self.head_unit.nbytes

    @property
    def total_bytes(self) -> int:
        """Tensor bytes of the whole model, each tensor once (headers excluded)."""
        return sum(u.nbytes for u in self.units)

    def tensors_for_blocks(self, r: LayerRange) -> list[TensorEntry]:
        """Tensors a node holding blocks ``[r.start, r.stop)`` needs, unit by unit, each once.

        The first node also runs the embeddings, the last one the head; with tied embeddings the head
        multiplies by ``embed_tokens``, so the last node needs those bytes too.
        """
        if r.stop > self.num_blocks:
            raise ValueError(f"layer range {r} is beyond the model's {self.num_blocks} blocks")
        units = list(self.units[1 + r.start : 1 + r.stop])
        if r.start == 0:
            units.insert(0, self.embed_unit)
        if r.stop == self.num_blocks:
            units.append(self.head_unit)
            if self.tied_embeddings and r.start != 0:
                units.append(self.embed_unit)
        return [t for u in units for t in u.tensors]


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _where(source: Source, file: str) -> str:
    """How messages name ``file`` of ``source``: the path for a directory, the URL for S3."""
    return f"{source.description.rstrip('/')}/{file}"


def _exists(source: Source, file: str) -> bool:
    try:
        source.size(file)
    except SourceNotFound:
        return False
    return True


def _read_json_object(source: Source, file: str, what: str) -> dict[str, object]:
    """``file`` parsed as a JSON object. A missing file is ``SourceNotFound``; the caller words it."""
    where = _where(source, file)
    # Size first, so an oversized file gets the same message from every source.
    if source.size(file) > MAX_JSON_BYTES:
        raise ModelFormatError(where, f"{what} is larger than {MAX_JSON_BYTES} bytes")
    raw = source.read_small(file, MAX_JSON_BYTES)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(where, f"{what} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(where, f"{what} must be a JSON object")
    return value


def _num_hidden_layers(config: dict[str, object], source: str) -> int:
    value = config.get("num_hidden_layers")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelFormatError(source, f"num_hidden_layers must be a positive integer, got {value!r}")
    return value


def _shard_files(source: Source) -> dict[str, str] | None:
    """``tensor -> file`` from the index, or None when the model is a single model.safetensors."""
    where = _where(source, INDEX_FILE)
    try:
        index = _read_json_object(source, INDEX_FILE, "shard index")
    except SourceNotFound:
        return None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(where, "weight_map must be a non-empty object of tensor -> file")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not _SHARD_NAME.fullmatch(file):
            raise ModelFormatError(
                where,
                f"weight_map[{tensor!r}] = {file!r} is not a plain *.safetensors file name in the model dir",
            )
    return {str(k): str(v) for k, v in weight_map.items()}


def _refuse_unusable_dir(model_dir: Path) -> ModelFormatError:
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    pickles = [n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    others = [n for n in names if n.endswith(".safetensors")]
    if pickles and not others:
        return refuse_pickle(model_dir / pickles[0])
    if others:
        return ModelFormatError(
            str(model_dir),
            f"found {_listed(others)} but neither {INDEX_FILE} nor {SINGLE_FILE} to say which files "
            "make up the model",
        )
    return ModelFormatError(str(model_dir), f"no weights: neither {INDEX_FILE} nor {SINGLE_FILE} exists")


def _refuse_unusable_source(source: Source) -> ModelFormatError:
    # A source cannot be listed (an S3 prefix may hold millions of keys), so probe the usual names of
    # pickle checkpoints to give the clearer refusal when one is there.
    for name in _PICKLE_NAMES:
        if _exists(source, name):
            return ModelFormatError(_where(source, name), refuse_pickle(Path(name)).detail)
    return ModelFormatError(source.description, f"no weights: neither {INDEX_FILE} nor {SINGLE_FILE} exists")


def _read_exact(source: Source, file: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    source.read_into(file, offset, memoryview(buf))
    return bytes(buf)


def _read_header(source: Source, file: str, index_where: str) -> SafetensorsHeader:
    """A shard's header from two ranged reads: its 8-byte length, then exactly that many bytes."""
    where = _where(source, file)
    try:
        size = source.size(file)
    except SourceNotFound:
        raise ModelFormatError(index_where, f"shard {file!r} listed in weight_map is missing") from None
    prefix = _read_exact(source, file, 0, min(8, size))
    header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
        # parse_header_bytes words every bad length exactly as read_header would; a pickle is named
        # as such only after the bytes failed as safetensors (a valid length can look like one).
        try:
            parse_header_bytes(prefix, size, where)
        except ModelFormatError:
            if looks_like_pickle(prefix):
                raise ModelFormatError(where, refuse_pickle(Path(file)).detail) from None
            raise
        raise ModelFormatError(where, f"header length {header_len} is not usable")
    return parse_header_bytes(prefix + _read_exact(source, file, 8, header_len), size, where)


def _read_headers(source: Source, weight_map: dict[str, str] | None) -> dict[str, SafetensorsHeader]:
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    index_where = _where(source, INDEX_FILE)
    return {name: _read_header(source, name, index_where) for name in files}


def _check_index_matches(
    index_where: str, weight_map: dict[str, str], headers: dict[str, SafetensorsHeader]
) -> None:
    source = index_where
    seen: dict[str, str] = {}
    for file, header in headers.items():
        for t in header.tensors:
            if t.name in seen:
                raise ModelFormatError(
                    source, f"tensor {t.name!r} is stored in both {seen[t.name]!r} and {file!r}"
                )
            seen[t.name] = file
            mapped = weight_map.get(t.name)
            if mapped is None:
                raise ModelFormatError(source, f"tensor {t.name!r} in {file!r} is not in weight_map")
            if mapped != file:
                raise ModelFormatError(
                    source, f"weight_map puts tensor {t.name!r} in {mapped!r} but it is stored in {file!r}"
                )
    absent = sorted(set(weight_map) - set(seen))
    if absent:
        raise ModelFormatError(
            source, f"weight_map lists tensors no shard header contains: {_listed(absent)}"
        )


def _classify(name: str) -> tuple[UnitKind, int, str] | None:
    """(kind, block, member name within the block) for a known tensor name, else None."""
    if _EMBED.fullmatch(name):
        return "embed", -1, name
    if _HEAD.fullmatch(name):
        return "head", -1, name
    m = _BLOCK.fullmatch(name)
    if m:
        return "block", int(m.group(1)), m.group(2)
    return None


@dataclass(frozen=True)
class _Located:
    name: str
    file: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]


def _locate(headers: dict[str, SafetensorsHeader]) -> list[_Located]:
    return [
        _Located(t.name, file, h.absolute_offset(t), t.nbytes, t.dtype, t.shape)
        for file, h in headers.items()
        for t in h.tensors
    ]


def _group(
    located: list[_Located], source: str
) -> tuple[list[_Located], dict[int, list[_Located]], list[_Located]]:
    embed: list[_Located] = []
    head: list[_Located] = []
    blocks: dict[int, list[_Located]] = {}
    unknown: list[str] = []
    for t in located:
        kind = _classify(t.name)
        if kind is None:
            unknown.append(t.name)
        elif kind[0] == "embed":
            embed.append(t)
        elif kind[0] == "head":
            head.append(t)
        else:
            blocks.setdefault(kind[1], []).append(t)
    if unknown:
        raise ModelFormatError(
            source,
            f"{len(unknown)} tensors match no known Llama/Mistral/Qwen2 name and would be dropped: "
            f"{_listed(sorted(unknown))}",
        )
    return embed, blocks, head


def _check_blocks(blocks: dict[int, list[_Located]], num_blocks: int, source: str) -> None:
    found = sorted(blocks)
    extra = [b for b in found if b >= num_blocks]
    # Lazily, stopping at a few: a hostile config.json may claim 10**12 layers.
    missing = list(itertools.islice((b for b in range(num_blocks) if b not in blocks), _MAX_LISTED))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing blocks {missing}")
        if extra:
            parts.append(f"unexpected blocks {extra[:_MAX_LISTED]}")
        raise ModelFormatError(
            source,
            f"config.json says num_hidden_layers={num_blocks} but the weights hold blocks "
            f"{_span(found)}: {'; '.join(parts)}",
        )
    # Every block of these architectures has the same members; one that lacks a weight the others have
    # is a truncated or mixed-up conversion, and the forward pass would fail far from the cause.
    members = [{_member(t.name) for t in blocks[b]} for b in range(num_blocks)]
    for b in range(1, num_blocks):
        if members[b] != members[0]:
            lacks = sorted(members[0] - members[b])
            adds = sorted(members[b] - members[0])
            raise ModelFormatError(
                source,
                f"block {b} differs from block 0: lacks {lacks or 'nothing'}, has extra {adds or 'nothing'}",
            )


def _member(name: str) -> str:
    m = _BLOCK.fullmatch(name)
    assert m is not None
    return m.group(2)


def _span(blocks: list[int]) -> str:
    if not blocks:
        return "none"
    return f"{blocks[0]}..{blocks[-1]} ({len(blocks)} blocks)"


def _unit(index: int, name: str, kind: UnitKind, block: int, located: list[_Located]) -> LayerUnit:
    ordered = sorted(located, key=lambda t: (t.file, t.offset, t.name))
    tensors = tuple(TensorEntry(t.name, t.file, t.offset, t.length, t.dtype, t.shape, index) for t in ordered)
    return LayerUnit(index, name, kind, block, tensors, sum(t.length for t in tensors))


def load_layout(model_dir: Path) -> ModelLayout:
    """Read and check ``model_dir`` (config.json plus safetensors shards) and build its layer map.

    The filesystem form of ``load_layout_from_source``: a directory can be listed, so a model without
    an index or model.safetensors gets the more specific refusal, and any read failure is a
    ``ModelFormatError`` naming the path (what callers of this function have always caught).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFormatError(str(model_dir), "model directory does not exist or is not a directory")
    if not (model_dir / INDEX_FILE).exists() and not (model_dir / SINGLE_FILE).is_file():
        raise _refuse_unusable_dir(model_dir)
    source = FilesystemSource(model_dir)
    try:
        return load_layout_from_source(source)
    except SourceError as exc:
        raise ModelFormatError(str(model_dir), str(exc)) from None
    finally:
        source.close()


def load_layout_from_source(source: Source) -> ModelLayout:
    """Read and check the checkpoint ``source`` holds and build its layer map.

    Reads config.json and the shard index whole (each capped at ``MAX_JSON_BYTES``) and, per shard,
    its size, its 8-byte header length and the header itself: never a byte of tensor data. A malformed
    or inconsistent checkpoint is a ``ModelFormatError``; a failing store is a ``SourceError`` (which
    a caller may retry), except a missing file, which is a ``ModelFormatError`` saying which.
    """
    desc = source.description
    weight_map = _shard_files(source)
    if weight_map is None and not _exists(source, SINGLE_FILE):
        raise _refuse_unusable_source(source)
    config_where = _where(source, CONFIG_FILE)
    try:
        config = _read_json_object(source, CONFIG_FILE, CONFIG_FILE)
    except SourceNotFound:
        raise ModelFormatError(desc, f"{CONFIG_FILE} is missing") from None
    num_blocks = _num_hidden_layers(config, config_where)
    tie = config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ModelFormatError(config_where, f"tie_word_embeddings must be true or false, got {tie!r}")

    headers = _read_headers(source, weight_map)
    if weight_map is not None:
        _check_index_matches(_where(source, INDEX_FILE), weight_map, headers)
    embed, blocks, head = _group(_locate(headers), desc)
    if not embed:
        raise ModelFormatError(desc, "model.embed_tokens.weight is missing")
    head_names = {t.name for t in head}
    if _FINAL_NORM not in head_names:
        raise ModelFormatError(desc, f"{_FINAL_NORM} (the final norm) is missing")
    _check_blocks(blocks, num_blocks, desc)

    units = [_unit(0, "embed", "embed", -1, embed)]
    units += [_unit(1 + b, f"layers.{b}", "block", b, blocks[b]) for b in range(num_blocks)]
    units.append(_unit(1 + num_blocks, "head", "head", -1, head))
    return ModelLayout(
        root=source.root if isinstance(source, FilesystemSource) else desc,
        model_config=config,
        files={name: h.file_size for name, h in headers.items()},
        units=tuple(units),
        num_blocks=num_blocks,
        tied_embeddings=tie or _LM_HEAD not in head_names,
    )
