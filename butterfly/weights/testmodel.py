"""A small, deterministic Llama-architecture checkpoint for tests, benchmarks and demos.

Owns: ``make_test_model`` (writes config.json, safetensors shards and the shard index in Hugging Face
layout, a small real tokenizer (``testtokenizer``: tokenizer.json, tokenizer_config.json with a chat
template) and the model's manifest, so the model loads as it is, all byte-identical for identical
arguments) and ``model_size_bytes`` (the exact bytes it would write apart from the manifest, without
writing). Tensor values come from numpy's ``default_rng`` seeded per tensor name (uniform with std
0.02; norms 1.0), so a tensor's values do not depend on how the model is sharded or how many layers
surround it.

Must not: import torch, hold the whole model in memory (tensors are streamed in chunks), or leave a
directory that looks complete after a crash: the model is built in a hidden sibling directory and
renamed into place only when every file is written and fsync'd.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from butterfly.weights.layout import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from butterfly.weights.safetensors import DTYPE_SIZES, LazyTensor, encode_header, write_safetensors
from butterfly.weights.testtokenizer import TokenizerFiles, tokenizer_files

__all__ = ["SUPPORTED_DTYPES", "make_test_model", "model_size_bytes"]

# config.json torch_dtype -> safetensors dtype code.
SUPPORTED_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# Elements generated per chunk: bounds peak memory (~16 MiB of float32) for any tensor size.
_CHUNK = 1 << 22
_INIT_STD = 0.02
_UNIFORM_HALF_WIDTH = _INIT_STD * 3**0.5
_SHARD_METADATA = {"format": "pt"}

Init = Literal["normal", "ones"]


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    init: Init


@dataclass(frozen=True)
class _Shard:
    file: str
    specs: tuple[_Spec, ...]
    header: bytes
    data_bytes: int


@dataclass(frozen=True)
class _Plan:
    """Everything about the checkpoint except tensor values: shared by the writer and the size oracle."""

    dtype: str
    seed: int
    config: bytes
    index: bytes | None
    shards: tuple[_Shard, ...]
    tokenizer: dict[str, bytes]

    @property
    def size(self) -> int:
        files = sum(len(s.header) + s.data_bytes for s in self.shards)
        small = len(self.config) + sum(len(b) for b in self.tokenizer.values())
        return files + small + (len(self.index) if self.index is not None else 0)


def _default_intermediate(hidden: int) -> int:
    # Llama's MLP is ~2.7x hidden; rounding to 64 keeps shapes GEMM-friendly like real checkpoints.
    return max(64, round(hidden * 2.75 / 64) * 64)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _units(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tie: bool
) -> list[list[_Spec]]:
    kv_dim = kv_heads * (hidden // heads)
    units = [[_Spec("model.embed_tokens.weight", (vocab, hidden), "normal")]]
    for i in range(layers):
        p = f"model.layers.{i}."
        units.append(
            [
                _Spec(p + "self_attn.q_proj.weight", (hidden, hidden), "normal"),
                _Spec(p + "self_attn.k_proj.weight", (kv_dim, hidden), "normal"),
                _Spec(p + "self_attn.v_proj.weight", (kv_dim, hidden), "normal"),
                _Spec(p + "self_attn.o_proj.weight", (hidden, hidden), "normal"),
                _Spec(p + "mlp.gate_proj.weight", (intermediate, hidden), "normal"),
                _Spec(p + "mlp.up_proj.weight", (intermediate, hidden), "normal"),
                _Spec(p + "mlp.down_proj.weight", (hidden, intermediate), "normal"),
                _Spec(p + "input_layernorm.weight", (hidden,), "ones"),
                _Spec(p + "post_attention_layernorm.weight", (hidden,), "ones"),
            ]
        )
    head = [_Spec("model.norm.weight", (hidden,), "ones")]
    if not tie:
        head.append(_Spec("lm_head.weight", (vocab, hidden), "normal"))
    units.append(head)
    return units


def _nbytes(spec: _Spec, dtype: str) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * DTYPE_SIZES[dtype]


def _split(sizes: Sequence[int], shards: int) -> list[int]:
    """Cut points (unit counts) splitting ``sizes`` into ``shards`` contiguous, non-empty, byte-balanced runs.

    Each cut goes at the unit boundary nearest its ideal share of the bytes (earliest on a tie), so a
    unit (a whole block) never straddles two files.
    """
    cumulative = [0]
    for s in sizes:
        cumulative.append(cumulative[-1] + s)
    total, n = cumulative[-1], len(sizes)
    cuts = [0]
    for k in range(1, shards):
        target = total * k / shards
        lo, hi = cuts[-1] + 1, n - (shards - k)
        cuts.append(min(range(lo, hi + 1), key=lambda c: (abs(cumulative[c] - target), c)))
    cuts.append(n)
    return cuts


def _plan(
    *,
    layers: int,
    hidden: int,
    intermediate: int | None,
    heads: int,
    kv_heads: int,
    vocab: int,
    shards: int,
    dtype: str,
    seed: int,
    tie_embeddings: bool,
) -> _Plan:
    for name, value in (
        ("layers", layers),
        ("hidden", hidden),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("vocab", vocab),
        ("shards", shards),
    ):
        _positive(name, value)
    inter = _default_intermediate(hidden) if intermediate is None else intermediate
    _positive("intermediate", inter)
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {dtype!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    units = _units(layers, hidden, inter, heads, kv_heads, vocab, tie_embeddings)
    if shards > len(units):
        raise ValueError(f"shards ({shards}) exceeds the {len(units)} units (embed, {layers} blocks, head)")
    code = SUPPORTED_DTYPES[dtype]
    max_positions = 2048
    tok = _tokenizer(vocab, max_positions)

    cuts = _split([sum(_nbytes(s, code) for s in u) for u in units], shards)
    plan_shards = []
    for k in range(shards):
        specs = tuple(s for u in units[cuts[k] : cuts[k + 1]] for s in u)
        file = SINGLE_FILE if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header = encode_header({s.name: (code, s.shape) for s in specs}, _SHARD_METADATA)
        plan_shards.append(_Shard(file, specs, header, sum(_nbytes(s, code) for s in specs)))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_positions,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": _INIT_STD,
        "tie_word_embeddings": tie_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_ids,
    }
    index = None
    if shards > 1:
        weight_map = {s.name: sh.file for sh in plan_shards for s in sh.specs}
        total = sum(sh.data_bytes for sh in plan_shards)
        index = _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})
    return _Plan(code, seed, _json_bytes(config), index, tuple(plan_shards), tok.files())


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab: int, max_positions: int) -> TokenizerFiles:
    # Cached: sizing loops (bench) ask for the same model's size many times.
    return tokenizer_files(vocab, max_positions)


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _tensor_seed(seed: int, name: str) -> np.random.SeedSequence:
    # Seeding per name (not one stream for the whole model) makes values independent of write order,
    # shard count and layer count: block 3 of an 8-layer model equals block 3 of a 4-layer one.
    key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([seed, key])


def _to_dtype(x: npt.NDArray[np.float32], code: str) -> npt.NDArray[np.generic]:
    if code == "F32":
        return x
    if code == "F16":
        return x.astype(np.float16)
    # BF16 is the top half of the float32 bits; add the round-to-nearest-even bias before truncating.
    bits = x.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _values(spec: _Spec, code: str, seed: int) -> Iterator[npt.NDArray[np.generic]]:
    count = int(np.prod(spec.shape, dtype=np.int64))
    rng = np.random.default_rng(_tensor_seed(seed, spec.name))
    for start in range(0, count, _CHUNK):
        m = min(_CHUNK, count - start)
        if spec.init == "ones":
            x = np.ones(m, dtype=np.float32)
        else:
            # Uniform on [-a, a) with a = std * sqrt(3) has the std HF initialises with; it is 4x
            # cheaper to draw than a normal, which dominated writing a 500 MB model.
            x = rng.random(m, dtype=np.float32)
            x *= np.float32(2 * _UNIFORM_HALF_WIDTH)
            x -= np.float32(_UNIFORM_HALF_WIDTH)
        yield _to_dtype(x, code)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_size_bytes(
    *,
    layers: int = 8,
    hidden: int = 256,
    intermediate: int | None = None,
    heads: int = 8,
    kv_heads: int = 4,
    vocab: int = 2048,
    shards: int = 2,
    dtype: str = "float16",
    seed: int = 0,
    tie_embeddings: bool = False,
) -> int:
    """Exact total bytes of every file ``make_test_model`` writes with the same arguments, except the
    manifest (its size follows from the digests)."""
    return _plan(
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        shards=shards,
        dtype=dtype,
        seed=seed,
        tie_embeddings=tie_embeddings,
    ).size


def make_test_model(
    out_dir: Path,
    *,
    layers: int = 8,
    hidden: int = 256,
    intermediate: int | None = None,
    heads: int = 8,
    kv_heads: int = 4,
    vocab: int = 2048,
    shards: int = 2,
    dtype: str = "float16",
    seed: int = 0,
    tie_embeddings: bool = False,
    manifest: bool = True,
) -> Path:
    """Write a deterministic Llama checkpoint in Hugging Face layout to ``out_dir`` and return it.

    ``out_dir`` must not exist or be empty (a FileExistsError otherwise: never mix files of two models).
    With ``shards == 1`` the weights go to model.safetensors and no index is written; otherwise to
    model-0000K-of-0000N.safetensors plus model.safetensors.index.json. Units (embeddings, each block,
    the head) are never split across shards. ``manifest``: also write butterfly-manifest.json (the
    default; a newcomer's model then loads without ``manifest build``).
    """
    plan = _plan(
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        shards=shards,
        dtype=dtype,
        seed=seed,
        tie_embeddings=tie_embeddings,
    )
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a model dir is read by other users (the daemon).
        for shard in plan.shards:
            tensors = {
                s.name: LazyTensor(plan.dtype, s.shape, partial(_values, s, plan.dtype, plan.seed))
                for s in shard.specs
            }
            write_safetensors(tmp / shard.file, tensors, _SHARD_METADATA)
        if plan.index is not None:
            _write_bytes(tmp / INDEX_FILE, plan.index)
        _write_bytes(tmp / CONFIG_FILE, plan.config)
        for name, data in plan.tokenizer.items():
            _write_bytes(tmp / name, data)
        if manifest:
            # Imported here: the manifest module imports butterfly.weights, which imports this one.
            from butterfly.weights.build import build_manifest
            from butterfly.weights.manifest import MANIFEST_FILE, write_manifest

            write_manifest(build_manifest(tmp)[0], tmp / MANIFEST_FILE)
        _fsync_dir(tmp)
        # rename(2) atomically replaces an empty directory, so readers see no model or a whole one.
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out_dir.parent)
    return out_dir
