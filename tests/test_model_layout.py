"""The layer map: grouping tensors into units, checkpoint consistency, and per-range tensor sets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from butterfly.weights.layout import LayerRange, ModelLayout, TensorEntry, load_layout
from butterfly.weights.safetensors import ModelFormatError, write_safetensors
from butterfly.weights.testmodel import make_test_model

H = 4  # hidden size of the hand-built models: tiny, only names and offsets matter here
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
QWEN2_BIASES = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]


def _names(layers: int, *, lm_head: bool = True, biases: bool = False) -> list[str]:
    members = BLOCK_MEMBERS + (QWEN2_BIASES if biases else [])
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{m}" for i in range(layers) for m in members]
    names += ["model.norm.weight"] + (["lm_head.weight"] if lm_head else [])
    return names


def _array(name: str) -> np.ndarray:
    # Distinct contents per tensor (and per-name sizes) so a wrong offset cannot read the right bytes.
    n = H if name.endswith(("bias", "norm.weight", "layernorm.weight")) else H * (2 + len(name) % 3)
    seed = sum(name.encode())
    return (np.arange(n, dtype=np.float32) + seed).astype(np.float16)


def _write_model(
    root: Path,
    names: list[str],
    *,
    layers: int,
    shards: int = 1,
    config: dict[str, object] | None = None,
    index: bool | None = None,
) -> Path:
    """A checkpoint of ``names`` split round-robin over ``shards`` files, with an index when sharded."""
    root.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, object] = {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": H}
    cfg.update(config or {})
    (root / "config.json").write_text(json.dumps(cfg))
    use_index = shards > 1 if index is None else index
    files = (
        [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
        if use_index
        else ["model.safetensors"]
    )
    weight_map = {n: files[i % len(files)] for i, n in enumerate(names)}
    for f in files:
        write_safetensors(
            root / f, {n: _array(n) for n, wf in weight_map.items() if wf == f}, {"format": "pt"}
        )
    if use_index:
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return root


def _index(root: Path) -> dict[str, object]:
    value = json.loads((root / "model.safetensors.index.json").read_text())
    assert isinstance(value, dict)
    return value


def _set_index(root: Path, weight_map: dict[str, str]) -> None:
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# ---------------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------------


def test_llama_test_model_grouping(tmp_path: Path) -> None:
    root = make_test_model(tmp_path / "m", layers=3, hidden=64, heads=4, kv_heads=2, vocab=128, shards=2)
    lay = load_layout(root)
    assert lay.num_blocks == 3 and not lay.tied_embeddings
    assert [u.name for u in lay.units] == ["embed", "layers.0", "layers.1", "layers.2", "head"]
    assert [u.kind for u in lay.units] == ["embed", "block", "block", "block", "head"]
    assert [u.block for u in lay.units] == [-1, 0, 1, 2, -1]
    assert [t.name for t in lay.embed_unit.tensors] == ["model.embed_tokens.weight"]
    assert {t.name for t in lay.head_unit.tensors} == {"model.norm.weight", "lm_head.weight"}
    for b in range(3):
        unit = lay.block_unit(b)
        assert {t.name for t in unit.tensors} == {f"model.layers.{b}.{m}" for m in BLOCK_MEMBERS}
    for u in lay.units:
        assert u.nbytes == sum(t.length for t in u.tensors)
        assert all(t.unit == u.index for t in u.tensors)
    assert lay.files == {f: (root / f).stat().st_size for f in lay.files}
    assert len(lay.files) == 2
    index_meta = _index(root)["metadata"]
    assert isinstance(index_meta, dict)
    assert lay.total_bytes == index_meta["total_size"]
    assert lay.total_bytes == lay.embed_bytes + sum(lay.block_sizes()) + lay.head_bytes
    assert lay.model_config["num_hidden_layers"] == 3


@pytest.mark.parametrize(
    ("model_type", "biases"),
    [("llama", False), ("mistral", False), ("qwen2", True)],
    ids=["llama", "mistral", "qwen2"],
)
def test_architectures_group_and_offsets_are_absolute(tmp_path: Path, model_type: str, biases: bool) -> None:
    names = _names(2, biases=biases)
    root = _write_model(tmp_path / model_type, names, layers=2, shards=3, config={"model_type": model_type})
    lay = load_layout(root)
    assert {t.name for u in lay.units for t in u.tensors} == set(names)
    expected_block = len(BLOCK_MEMBERS) + (3 if biases else 0)
    assert [len(lay.block_unit(b).tensors) for b in range(2)] == [expected_block] * 2
    if biases:
        assert "model.layers.1.self_attn.k_proj.bias" in {t.name for t in lay.block_unit(1).tensors}
    for u in lay.units:
        for t in u.tensors:
            with open(root / t.file, "rb") as f:
                f.seek(t.offset)
                raw = f.read(t.length)
            assert raw == _array(t.name).tobytes()
            assert t.dtype == "F16" and t.shape == _array(t.name).shape


def test_single_file_model_without_index(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "m", _names(2), layers=2, shards=1)
    lay = load_layout(root)
    assert list(lay.files) == ["model.safetensors"]
    assert all(t.file == "model.safetensors" for u in lay.units for t in u.tensors)


def test_index_wins_and_unreferenced_files_are_ignored(tmp_path: Path) -> None:
    # Mistral repos ship consolidated.safetensors (other naming) beside the HF shards.
    root = _write_model(tmp_path / "m", _names(2), layers=2, shards=2)
    write_safetensors(root / "consolidated.safetensors", {"tok_embeddings.weight": np.zeros(2, np.float16)})
    assert "consolidated.safetensors" not in load_layout(root).files


def test_inv_freq_buffers_of_old_llama_conversions_are_known(tmp_path: Path) -> None:
    names = _names(2) + [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]
    lay = load_layout(_write_model(tmp_path / "m", names, layers=2))
    assert len(lay.block_unit(0).tensors) == len(BLOCK_MEMBERS) + 1


# ---------------------------------------------------------------------------------------------------
# Tied embeddings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tie_flag", "lm_head"),
    [(True, False), (False, False), (True, True)],
    ids=["flag", "lm_head-absent", "both"],
)
def test_tied_embeddings(tmp_path: Path, tie_flag: bool, lm_head: bool) -> None:
    root = _write_model(
        tmp_path / "m",
        _names(4, lm_head=lm_head),
        layers=4,
        shards=2,
        config={"tie_word_embeddings": tie_flag},
    )
    lay = load_layout(root)
    assert lay.tied_embeddings
    assert ("lm_head.weight" in {t.name for t in lay.head_unit.tensors}) == lm_head
    last = [t.name for t in lay.tensors_for_blocks(LayerRange(2, 4))]
    assert last.count("model.embed_tokens.weight") == 1 and "model.norm.weight" in last
    whole = [t.name for t in lay.tensors_for_blocks(LayerRange(0, 4))]
    assert whole.count("model.embed_tokens.weight") == 1
    assert "model.embed_tokens.weight" not in [t.name for t in lay.tensors_for_blocks(LayerRange(1, 3))]


def test_untied_last_range_does_not_need_embeddings(tmp_path: Path) -> None:
    lay = load_layout(_write_model(tmp_path / "m", _names(4), layers=4))
    assert not lay.tied_embeddings
    assert "model.embed_tokens.weight" not in [t.name for t in lay.tensors_for_blocks(LayerRange(2, 4))]


# ---------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
        "vision_tower.patch_embed.weight",
        "model.layers.01.input_layernorm.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.embed_tokens.bias",
    ],
)
def test_unknown_tensor_is_refused_by_name(tmp_path: Path, extra: str) -> None:
    root = _write_model(tmp_path / "m", [*_names(2), extra], layers=2, shards=2)
    with pytest.raises(ModelFormatError, match=r"1 tensors match no known .* would be dropped") as info:
        load_layout(root)
    assert repr(extra) in info.value.detail


def test_many_unknown_tensors_are_counted(tmp_path: Path) -> None:
    extras = [f"extra.{i}" for i in range(12)]
    with pytest.raises(ModelFormatError, match=r"12 tensors match no known .* and 4 more"):
        load_layout(_write_model(tmp_path / "m", _names(1) + extras, layers=1))


def test_missing_block(tmp_path: Path) -> None:
    names = [n for n in _names(3) if not n.startswith("model.layers.1.")]
    with pytest.raises(
        ModelFormatError,
        match=r"num_hidden_layers=3 but the weights hold blocks 0..2 \(2 blocks\): missing blocks \[1\]",
    ):
        load_layout(_write_model(tmp_path / "m", names, layers=3))


def test_absurd_layer_count_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(
        ModelFormatError,
        match=r"num_hidden_layers=1000000000000 .* missing blocks \[2, 3, 4, 5, 6, 7, 8, 9\]",
    ):
        load_layout(_write_model(tmp_path / "m", _names(2), layers=10**12))


def test_more_blocks_than_config(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"num_hidden_layers=2 .* unexpected blocks \[2\]"):
        load_layout(_write_model(tmp_path / "m", _names(3), layers=2))


def test_incomplete_block(tmp_path: Path) -> None:
    names = [n for n in _names(3) if n != "model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(
        ModelFormatError, match=r"block 1 differs from block 0: lacks \['self_attn.q_proj.weight'\]"
    ):
        load_layout(_write_model(tmp_path / "m", names, layers=3))


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("model.embed_tokens.weight", "model.embed_tokens.weight is missing"),
        ("model.norm.weight", "final norm"),
    ],
)
def test_missing_embed_or_final_norm(tmp_path: Path, drop: str, message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        load_layout(_write_model(tmp_path / "m", [n for n in _names(2) if n != drop], layers=2))


def test_index_maps_tensor_to_wrong_file(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "m", _names(2), layers=2, shards=2)
    wm = _index(root)["weight_map"]
    assert isinstance(wm, dict)
    wm["model.norm.weight"] = next(f for f in set(wm.values()) if f != wm["model.norm.weight"])
    _set_index(root, wm)
    with pytest.raises(
        ModelFormatError, match=r"weight_map puts tensor 'model.norm.weight' in .* but it is stored in"
    ):
        load_layout(root)


def test_index_lists_tensor_no_header_has(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "m", _names(2), layers=2, shards=2)
    wm = _index(root)["weight_map"]
    assert isinstance(wm, dict)
    wm["model.layers.5.input_layernorm.weight"] = "model-00001-of-00002.safetensors"
    _set_index(root, wm)
    with pytest.raises(
        ModelFormatError,
        match=r"weight_map lists tensors no shard header contains: 'model.layers.5.input_layernorm",
    ):
        load_layout(root)


def test_header_tensor_missing_from_index(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "m", _names(2), layers=2, shards=2)
    wm = _index(root)["weight_map"]
    assert isinstance(wm, dict)
    del wm["lm_head.weight"]
    _set_index(root, wm)
    with pytest.raises(ModelFormatError, match=r"tensor 'lm_head.weight' in .* is not in weight_map") as info:
        load_layout(root)
    assert info.value.source.endswith("model.safetensors.index.json")


def test_tensor_stored_in_two_shards(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "m", _names(1), layers=1, shards=2)
    wm = _index(root)["weight_map"]
    assert isinstance(wm, dict)
    write_safetensors(root / "dup.safetensors", {"model.norm.weight": _array("model.norm.weight")})
    wm["model.norm.weight"] = "dup.safetensors"
    _set_index(root, wm)
    with pytest.raises(ModelFormatError, match=r"tensor 'model.norm.weight' is stored in both"):
        load_layout(root)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "m", _names(2), layers=2, shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ModelFormatError, match=r"shard 'model-00002-of-00002.safetensors' listed in weight_map is missing"
    ):
        load_layout(root)


@pytest.mark.parametrize(
    "file", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "x.bin", ".hidden.safetensors", 3]
)
def test_index_file_names_must_be_plain(tmp_path: Path, file: object) -> None:
    root = _write_model(tmp_path / "m", _names(1), layers=1, shards=2)
    wm = _index(root)["weight_map"]
    assert isinstance(wm, dict)
    wm["model.norm.weight"] = file
    _set_index(root, wm)
    with pytest.raises(
        ModelFormatError, match=r"weight_map\['model.norm.weight'\] = .* is not a plain \*.safetensors"
    ):
        load_layout(root)


@pytest.mark.parametrize("index", ["[]", '{"weight_map": {}}', '{"weight_map": []}', "{not json"])
def test_malformed_index(tmp_path: Path, index: str) -> None:
    root = _write_model(tmp_path / "m", _names(1), layers=1, shards=2)
    (root / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ModelFormatError, match=r"shard index|weight_map must be"):
        load_layout(root)


def test_corrupt_shard_header_names_the_shard(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "m", _names(2), layers=2, shards=2)
    shard = root / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ModelFormatError, match=r"run past the end") as info:
        load_layout(root)
    assert info.value.source == str(shard)


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "config.json").write_text('{"num_hidden_layers": 1}')
    (root / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelFormatError, match=r"pickle.*unsafe.*convert it to safetensors") as info:
        load_layout(root)
    assert info.value.source.endswith("pytorch_model.bin")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, r"no weights: neither model.safetensors.index.json nor model.safetensors exists"),
        ({"consolidated.safetensors": b"x"}, r"found 'consolidated.safetensors' but neither"),
    ],
)
def test_directory_without_usable_weights(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    with pytest.raises(ModelFormatError, match=message):
        load_layout(root)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="not a directory"):
        load_layout(tmp_path / "nope")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, r"config.json is missing"),
        ("[1]", r"config.json must be a JSON object"),
        ("{bad", r"config.json is not valid UTF-8 JSON"),
        ('{"hidden_size": 4}', r"num_hidden_layers must be a positive integer, got None"),
        ('{"num_hidden_layers": true}', r"num_hidden_layers must be a positive integer, got True"),
        ('{"num_hidden_layers": 0}', r"got 0"),
        (
            '{"num_hidden_layers": 1, "tie_word_embeddings": "yes"}',
            r"tie_word_embeddings must be true or false",
        ),
    ],
)
def test_bad_config(tmp_path: Path, config: str | None, message: str) -> None:
    root = _write_model(tmp_path / "m", _names(1), layers=1)
    if config is None:
        (root / "config.json").unlink()
    else:
        (root / "config.json").write_text(config)
    with pytest.raises(ModelFormatError, match=message):
        load_layout(root)


# ---------------------------------------------------------------------------------------------------
# tensors_for_blocks
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    return load_layout(_write_model(tmp_path_factory.mktemp("six"), _names(6), layers=6, shards=3))


def _blocks_of(entries: list[TensorEntry]) -> list[int]:
    return sorted({int(t.name.split(".")[2]) for t in entries if t.name.startswith("model.layers.")})


def test_first_middle_last_whole(six: ModelLayout) -> None:
    first = six.tensors_for_blocks(LayerRange(0, 2))
    assert first[0].name == "model.embed_tokens.weight" and _blocks_of(first) == [0, 1]
    assert not {"model.norm.weight", "lm_head.weight"} & {t.name for t in first}

    middle = six.tensors_for_blocks(LayerRange(2, 4))
    assert _blocks_of(middle) == [2, 3] and len(middle) == 2 * len(BLOCK_MEMBERS)

    last = six.tensors_for_blocks(LayerRange(4, 6))
    assert _blocks_of(last) == [4, 5]
    assert {t.name for t in last[-2:]} == {"model.norm.weight", "lm_head.weight"}
    assert "model.embed_tokens.weight" not in {t.name for t in last}

    whole = six.tensors_for_blocks(LayerRange(0, 6))
    assert [t.name for t in whole] == [t.name for u in six.units for t in u.tensors]
    # unit order is preserved: embed, blocks ascending, head
    assert [t.unit for t in whole] == sorted(t.unit for t in whole)


def _partitions(n: int) -> list[list[LayerRange]]:
    out = []
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        out.append([LayerRange(a, b) for a, b in itertools.pairwise(bounds)])
    return out


def test_every_partition_covers_every_tensor_exactly_once(six: ModelLayout) -> None:
    everything = sorted(t.name for u in six.units for t in u.tensors)
    parts = _partitions(6)
    assert len(parts) == 32
    for partition in parts:
        got = sorted(t.name for r in partition for t in six.tensors_for_blocks(r))
        assert got == everything, [str(r) for r in partition]


def test_tied_partition_loads_embeddings_on_first_and_last_only(tmp_path: Path) -> None:
    lay = load_layout(_write_model(tmp_path / "m", _names(5, lm_head=False), layers=5, shards=2))
    everything = sorted(t.name for u in lay.units for t in u.tensors)
    for partition in _partitions(5):
        got = sorted(t.name for r in partition for t in lay.tensors_for_blocks(r))
        extra = ["model.embed_tokens.weight"] if len(partition) > 1 else []
        assert got == sorted(everything + extra)


def test_range_beyond_model_is_refused(six: ModelLayout) -> None:
    with pytest.raises(ValueError, match=r"layer range 4-6 is beyond the model's 6 blocks"):
        six.tensors_for_blocks(LayerRange(4, 7))
    with pytest.raises(IndexError):
        six.block_unit(6)


def test_sizes(six: ModelLayout) -> None:
    sizes = six.block_sizes()
    assert len(sizes) == 6 and len(set(sizes)) == 1
    assert six.embed_bytes == six.embed_unit.nbytes > 0
    assert six.head_bytes == sum(t.length for t in six.head_unit.tensors)
    assert six.total_bytes == sum(t.length for t in six.tensors_for_blocks(LayerRange(0, 6)))


# ---------------------------------------------------------------------------------------------------
# LayerRange
# ---------------------------------------------------------------------------------------------------


def test_layer_range_seed_form() -> None:
    r = LayerRange(0, 27)
    assert str(r) == "0-26" and len(r) == 27
    assert str(LayerRange(54, 80)) == "54-79" and len(LayerRange(54, 80)) == 26
    assert 26 in r and 27 not in r and -1 not in r
    assert LayerRange.parse("27-53") == LayerRange(27, 54)
    assert LayerRange.parse("5") == LayerRange(5, 6)
    assert LayerRange.parse(str(LayerRange(3, 9))) == LayerRange(3, 9)


@pytest.mark.parametrize(("start", "stop"), [(-1, 3), (3, 3), (4, 2)])
def test_layer_range_validation(start: int, stop: int) -> None:
    with pytest.raises(ValueError, match="0 <= start < stop"):
        LayerRange(start, stop)


def test_layer_range_types_and_parse_errors() -> None:
    with pytest.raises(TypeError):
        LayerRange(True, 2)
    for text in ["", "a-b", "3-1", "-1-2", "1-2-3"]:
        with pytest.raises(ValueError):
            LayerRange.parse(text)
