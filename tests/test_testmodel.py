"""The deterministic test checkpoint: byte-identical output, exact size oracle, loadable layout, a real
tokenizer with a chat template, and a manifest that covers it all."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from butterfly.weights import testmodel
from butterfly.weights.layout import load_layout
from butterfly.weights.manifest import MANIFEST_FILE, read_manifest
from butterfly.weights.safetensors import TensorValue, read_header
from butterfly.weights.testmodel import make_test_model, model_size_bytes
from butterfly.weights.verify import verify_dir

# Any: these are keyword arguments of differing types, checked by the functions they are passed to.
SMALL: dict[str, Any] = {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 96}


def _make(root: Path, **overrides: Any) -> Path:
    return make_test_model(root, **{**SMALL, **overrides})


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _tensor(root: Path, name: str) -> np.ndarray:
    """A tensor's values, found through the layout and read at its absolute offset."""
    lay = load_layout(root)
    t = next(t for u in lay.units for t in u.tensors if t.name == name)
    with open(root / t.file, "rb") as f:
        f.seek(t.offset)
        raw = f.read(t.length)
    if t.dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(t.shape)
    return np.frombuffer(raw, dtype={"F16": "<f2", "F32": "<f4"}[t.dtype]).reshape(t.shape)


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    a = _files(_make(tmp_path / "a", shards=3))
    b = _files(_make(tmp_path / "b", shards=3))
    assert list(a) == [
        "butterfly-manifest.json",
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert a == b
    c = _files(_make(tmp_path / "c", shards=3, seed=1))
    assert c["config.json"] == a["config.json"]
    assert c["model-00001-of-00003.safetensors"] != a["model-00001-of-00003.safetensors"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shards": 1},
        {"shards": 2},
        {"shards": 6},
        {"shards": 2, "tie_embeddings": True},
        {"shards": 2, "dtype": "bfloat16"},
        {"shards": 3, "dtype": "float32", "intermediate": 100},
        {"layers": 1, "hidden": 8, "heads": 2, "kv_heads": 1, "vocab": 21, "shards": 3},
    ],
    ids=["1-shard", "2-shards", "6-shards", "tied", "bf16", "f32-odd-intermediate", "minimal"],
)
def test_size_is_predicted_exactly_and_layout_loads(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    args = {**SMALL, **kwargs}
    root = make_test_model(tmp_path / "m", **args)
    assert model_size_bytes(**args) == sum(
        p.stat().st_size for p in root.iterdir() if p.name != MANIFEST_FILE
    )
    lay = load_layout(root)
    assert lay.num_blocks == args["layers"]
    assert lay.tied_embeddings == bool(args.get("tie_embeddings", False))
    assert len(lay.files) == args["shards"]
    for u in lay.units:  # embeddings, each block and the head are never split across shards
        assert len({t.file for t in u.tensors}) == 1, u.name
    if args["shards"] == 1:
        assert sorted(p.name for p in root.iterdir()) == [
            MANIFEST_FILE,
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    else:
        index = json.loads((root / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == lay.total_bytes
        assert set(index["weight_map"]) == {t.name for u in lay.units for t in u.tensors}


def test_shards_are_balanced_by_bytes(tmp_path: Path) -> None:
    root = make_test_model(tmp_path / "m", layers=8, hidden=64, heads=4, kv_heads=2, vocab=64, shards=3)
    lay = load_layout(root)
    data = {f: 0 for f in lay.files}
    for u in lay.units:
        data[u.tensors[0].file] += u.nbytes
    largest_unit = max(u.nbytes for u in lay.units)
    ideal = lay.total_bytes / 3
    assert all(abs(size - ideal) <= largest_unit for size in data.values()), data
    # Files are named in unit order: shard 1 starts with the embeddings, the last ends with the head.
    assert lay.embed_unit.tensors[0].file == "model-00001-of-00003.safetensors"
    assert lay.head_unit.tensors[0].file == "model-00003-of-00003.safetensors"


def test_config_and_default_sizes(tmp_path: Path) -> None:
    root = make_test_model(tmp_path / "m")
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    expected = {
        "hidden_size": 256,
        "intermediate_size": 704,  # 2.75 x 256, a multiple of 64
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    assert {k: cfg[k] for k in expected} == expected
    for key in ("rms_norm_eps", "rope_theta", "max_position_embeddings"):
        assert isinstance(cfg[key], (int, float))
    lay = load_layout(root)
    per_block = 2 * (256 * 256 * 2 + 128 * 256 * 2 + 3 * 704 * 256 + 2 * 256)
    assert lay.block_sizes() == [per_block] * 8
    assert lay.embed_bytes == 2048 * 256 * 2 and lay.head_bytes == 2 * 256 + 2048 * 256 * 2
    assert lay.total_bytes == 13_902_336
    assert model_size_bytes() == sum(p.stat().st_size for p in root.iterdir() if p.name != MANIFEST_FILE)
    shapes = {t.name: t.shape for t in lay.block_unit(0).tensors}
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (128, 256)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (256, 704)


def test_values(tmp_path: Path) -> None:
    f16 = _make(tmp_path / "f16")
    bf16 = _make(tmp_path / "bf16", dtype="bfloat16")
    one = _make(tmp_path / "one", shards=1)
    for name in ("model.norm.weight", "model.layers.2.input_layernorm.weight"):
        assert np.all(_tensor(f16, name) == 1.0) and np.all(_tensor(bf16, name) == 1.0)
    w = _tensor(f16, "model.embed_tokens.weight").astype(np.float64)
    assert abs(w.mean()) < 0.002 and 0.018 < w.std() < 0.022 and np.all(np.abs(w) <= 0.035)
    assert len(np.unique(w)) > 1000
    # Same values whatever the dtype (within bf16 precision) and whatever the sharding.
    q = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_allclose(_tensor(bf16, q), _tensor(f16, q), rtol=2**-7, atol=1e-6)
    np.testing.assert_array_equal(_tensor(one, q), _tensor(f16, q))
    # Per-name seeding: different tensors differ.
    assert not np.array_equal(_tensor(f16, q), _tensor(f16, "model.layers.2.self_attn.q_proj.weight"))


def test_reference_reads_the_shards(tmp_path: Path) -> None:
    st_numpy = pytest.importorskip("safetensors.numpy")
    root = _make(tmp_path / "m", shards=2)
    seen: dict[str, np.ndarray] = {}
    for f in sorted(root.glob("*.safetensors")):
        seen.update(st_numpy.load_file(str(f)))
        assert read_header(f).metadata == {"format": "pt"}
    assert len(seen) == 1 + 4 * 9 + 2
    np.testing.assert_array_equal(seen["lm_head.weight"], _tensor(root, "lm_head.weight"))


def test_existing_directories(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _make(empty) == empty
    assert (empty / "config.json").is_file()
    with pytest.raises(FileExistsError):
        _make(empty)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(FileExistsError):
        _make(afile)


def test_crash_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = testmodel.write_safetensors
    calls: list[Path] = []

    def failing(
        path: Path, tensors: Mapping[str, TensorValue], metadata: Mapping[str, str] | None = None
    ) -> int:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, tensors, metadata)

    monkeypatch.setattr(testmodel, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        _make(tmp_path / "m", shards=3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": 66}, r"hidden \(66\) must be a multiple of heads"),
        ({"kv_heads": 3}, r"heads \(4\) must be a multiple of kv_heads"),
        ({"shards": 7}, r"shards \(7\) exceeds the 6 units"),
        ({"dtype": "int8"}, r"dtype must be one of"),
        ({"layers": 0}, r"layers must be a positive integer"),
        ({"intermediate": 0}, r"intermediate must be a positive integer"),
        ({"seed": -1}, r"seed must be a non-negative integer"),
        ({"vocab": 20}, r"needs vocab >= 21"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        model_size_bytes(**args)
    with pytest.raises(ValueError, match=message):
        make_test_model(tmp_path / "m", **args)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("vocab", [21, 64, 96, 2048])
def test_tokenizer_is_real_and_fits_the_vocab(tmp_path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer

    root = _make(tmp_path / "m", vocab=vocab)
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert tok.get_vocab_size() == vocab  # every id the model can sample decodes
    cfg = json.loads((root / "config.json").read_text())
    assert tok.id_to_token(cfg["bos_token_id"]) == "<s>"
    assert [tok.id_to_token(i) for i in cfg["eos_token_id"]] == ["</s>", "<|im_end|>"]
    assert all(isinstance(tok.decode([i]), str) for i in range(vocab))
    text = "the quick robot"
    ids = tok.encode(text).ids
    assert ids and max(ids) < vocab
    if vocab >= 2048:  # byte-level: every text round-trips
        for t in (text, "Ünïcödé ✓ and 42 tabs\t!"):
            assert tok.decode(tok.encode(t).ids) == t


def test_transformers_reads_the_tokenizer_and_its_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    root = _make(tmp_path / "m", vocab=2048)
    tok = AutoTokenizer.from_pretrained(root)
    chat = [{"role": "user", "content": "Hello there"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.decode(tok.encode("Hello there")) == "Hello there"


def test_manifest_is_written_and_covers_config_and_tokenizer(tmp_path: Path) -> None:
    root = _make(tmp_path / "m", shards=2)
    m = read_manifest(root / MANIFEST_FILE)
    assert sorted(m.aux_files) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert verify_dir(m, root) == []
    assert _make(tmp_path / "n", shards=2, manifest=False).joinpath(MANIFEST_FILE).exists() is False
