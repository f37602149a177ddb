"""Safetensors header parsing as hostile input, pickle refusal, and the writer (cross-checked)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from butterfly.weights.safetensors import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    LazyTensor,
    ModelFormatError,
    SafetensorsHeader,
    looks_like_pickle,
    parse_header_bytes,
    read_header,
    write_safetensors,
)

SRC = "t.safetensors"


def _file(header: object, data: bytes | int = 0) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    payload = bytes(data) if isinstance(data, int) else data
    return len(body).to_bytes(8, "little") + body + payload


def _parse(buf: bytes) -> SafetensorsHeader:
    return parse_header_bytes(buf, len(buf), SRC)


def _e(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict[str, object]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


# ---------------------------------------------------------------------------------------------------
# Valid headers
# ---------------------------------------------------------------------------------------------------


def test_valid_header_sorted_by_offset_with_metadata() -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "z.first": _e("F16", (2, 2), (0, 8)),
        "a.second": _e("I64", (1,), (8, 16)),
        "m.empty": _e("F32", (0, 3), (16, 16)),
        "s.scalar": _e("U8", (), (16, 17)),
    }
    buf = _file(header, 17)
    h = _parse(buf)
    assert [t.name for t in h.tensors] == ["z.first", "a.second", "m.empty", "s.scalar"]
    assert h.metadata == {"format": "pt"}
    assert h.file_size == len(buf)
    assert h.data_start == len(buf) - 17
    assert h.tensors[0].shape == (2, 2) and h.tensors[0].dtype == "F16" and h.tensors[0].nbytes == 8
    assert h.tensors[3].shape == () and h.tensors[3].nbytes == 1
    assert h.absolute_offset(h.tensors[1]) == h.data_start + 8


def test_empty_object_header_with_no_data_is_valid() -> None:
    h = _parse(_file(b"{}"))
    assert h.tensors == () and h.metadata == {}


def test_trailing_space_padding_is_accepted() -> None:
    assert (
        _parse(_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}   ', 1)).tensors[0].name == "w"
    )


def test_every_known_dtype_size() -> None:
    for dtype, size in DTYPE_SIZES.items():
        h = _parse(_file({"w": _e(dtype, (3,), (0, 3 * size))}, 3 * size))
        assert h.tensors[0].nbytes == 3 * size


# ---------------------------------------------------------------------------------------------------
# Malformed corpus: each defect has its own, specific message
# ---------------------------------------------------------------------------------------------------

_OVERSIZE = (2**63).to_bytes(8, "little") + b"{}"
_CORPUS: list[tuple[str, bytes, str]] = [
    ("empty file", b"", r"truncated file: 0 bytes"),
    ("short length prefix", b"\x02\x00\x00", r"truncated file: 3 bytes"),
    ("header length past file", (100).to_bytes(8, "little") + b"{}", r"header length 100 runs past the end"),
    ("huge header length 2**63", _OVERSIZE, rf"header length {2**63} exceeds the {MAX_HEADER_BYTES}-byte"),
    ("header length zero", (0).to_bytes(8, "little"), r"too short to hold a JSON object"),
    ("not JSON", _file(b"{not json}"), r"header is not valid JSON"),
    ("non-UTF8 header bytes", _file(b'{"\xff\xfe":1}'), r"header is not valid UTF-8 \(byte 2"),
    ("JSON array", _file([1, 2]), r"header must be a JSON object, got array"),
    ("JSON string", _file("x"), r"header must be a JSON object, got string"),
    ("JSON null", _file(None), r"header must be a JSON object, got null"),
    ("NaN constant", _file(b'{"__metadata__":{"a":NaN}}'), r"not strict JSON \(NaN"),
    ("duplicate key", _file(b'{"w":{},"w":{}}'), r"duplicate key 'w'"),
    ("deep nesting", _file(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"), r"nested too deeply"),
    ("entry not object", _file({"w": [0, 4]}, 4), r"tensor 'w': entry must be an object, got array"),
    (
        "missing key",
        _file({"w": {"dtype": "F32", "shape": [2]}}, 8),
        r"tensor 'w': entry must have exactly dtype, shape, data_offsets; missing \['data_offsets'\]",
    ),
    ("extra key", _file({"w": {**_e(), "note": 1}}, 8), r"tensor 'w': .*unexpected \['note'\]"),
    ("unknown dtype", _file({"w": _e("F128")}, 8), r"tensor 'w': unknown dtype 'F128'"),
    ("lowercase dtype", _file({"w": _e("f32")}, 8), r"unknown dtype 'f32'"),
    ("dtype not string", _file({"w": _e(4)}, 8), r"unknown dtype 4"),
    (
        "negative shape",
        _file({"w": _e(shape=[-2])}, 8),
        r"tensor 'w': shape \[-2\] must hold non-negative .* -2",
    ),
    ("float shape", _file({"w": _e(shape=[2.0])}, 8), r"tensor 'w': shape \[2\.0\] .* found 2\.0"),
    ("bool shape", _file({"w": _e("U8", [True], (0, 1))}, 1), r"tensor 'w': shape \[True\] .* found True"),
    ("shape not array", _file({"w": _e(shape=2)}, 8), r"tensor 'w': shape must be an array, got number"),
    ("too many dims", _file({"w": _e(shape=[1] * 65, offsets=(0, 4))}, 4), r"65 dimensions, more than 64"),
    (
        "shape product overflow",
        _file({"w": _e(shape=[2**40, 2**40], offsets=(0, 8))}, 8),
        r"tensor 'w': shape \[1099511627776, 1099511627776\] x F32 overflows",
    ),
    (
        "dtype x shape != length",
        _file({"w": _e("F32", (3,), (0, 8))}, 8),
        r"tensor 'w': shape \[3\] x F32 is 12 bytes but data_offsets \[0, 8\] span 8",
    ),
    (
        "offsets past the end",
        _file({"w": _e("F32", (2,), (0, 8))}, 4),
        r"tensor 'w': data_offsets \[0, 8\] run past the end of the 4-byte data section",
    ),
    ("begin > end", _file({"w": _e(offsets=(8, 0))}, 8), r"tensor 'w': data_offsets begin 8 > end 0"),
    ("one offset", _file({"w": _e(offsets=[0])}, 8), r"tensor 'w': data_offsets must be \[begin, end\]"),
    ("negative offset", _file({"w": _e(offsets=(-8, 0))}, 8), r"data_offsets must be .* got \[-8, 0\]"),
    ("float offset", _file({"w": _e(offsets=[0, 8.0])}, 8), r"data_offsets must be .* got \[0, 8\.0\]"),
    ("bool offset", _file({"w": _e("U8", (1,), [False, True])}, 1), r"got \[False, True\]"),
    (
        "overlapping tensors",
        _file({"a": _e(offsets=(0, 8)), "b": _e(offsets=(4, 12))}, 12),
        r"tensor 'b' \[4, 12\] overlaps tensor 'a' \[0, 8\]",
    ),
    (
        "identical ranges",
        _file({"a": _e(), "b": _e()}, 8),
        r"tensor 'b' \[0, 8\] overlaps tensor 'a' \[0, 8\]",
    ),
    (
        "empty tensor inside another",
        _file({"a": _e(offsets=(0, 8)), "b": _e(shape=(0,), offsets=(4, 4))}, 8),
        r"tensor 'b' \[4, 4\] overlaps tensor 'a'",
    ),
    (
        "gap between tensors",
        _file({"a": _e("U8", (4,), (0, 4)), "b": _e("U8", (4,), (8, 12))}, 12),
        r"gap of 4 bytes \[4, 8\) after tensor 'a', before 'b'",
    ),
    (
        "gap at start",
        _file({"a": _e("U8", (4,), (4, 8))}, 8),
        r"gap of 4 bytes \[0, 4\) at the start of the data section, before 'a'",
    ),
    (
        "data not fully covered",
        _file({"a": _e()}, 12),
        r"data section not fully covered: tensors end at 8 but the data section is 12 bytes \(4 bytes",
    ),
    ("data but no tensors", _file(b"{}", 3), r"data section not fully covered: tensors end at 0"),
    ("empty tensor name", _file({"": _e()}, 8), r"tensor with an empty name"),
    ("lone surrogate name", _file(b'{"\\ud800":{}}'), r"tensor name '\\ud800' is not valid UTF-8"),
    ("control char name", _file({"a\nb": _e()}, 8), r"tensor name 'a\\nb' contains control characters"),
    (
        "metadata not object",
        _file({"__metadata__": ["a"]}),
        r"__metadata__ must be an object of strings, got array",
    ),
    (
        "metadata non-string",
        _file({"__metadata__": {"k": 1}}),
        r"__metadata__\['k'\] must be a string, got number",
    ),
    (
        "metadata null value",
        _file({"__metadata__": {"k": None}}),
        r"__metadata__\['k'\] must be a string, got null",
    ),
    (
        "metadata surrogate",
        _file(b'{"__metadata__":{"k":"\\udfff"}}'),
        r"__metadata__ holds a string that is not",
    ),
]


@pytest.mark.parametrize(("buf", "expected"), [(b, e) for _, b, e in _CORPUS], ids=[n for n, _, _ in _CORPUS])
def test_malformed_corpus(buf: bytes, expected: str) -> None:
    with pytest.raises(ModelFormatError) as info:
        _parse(buf)
    assert info.value.source == SRC
    assert re.search(expected, info.value.detail), info.value.detail
    assert str(info.value).startswith(f"{SRC}: ")


def test_header_longer_than_buffer_is_truncation() -> None:
    buf = _file({"w": _e()}, 8)
    with pytest.raises(
        ModelFormatError, match=r"truncated header: \d+ header bytes declared, only 10 readable"
    ):
        parse_header_bytes(buf[:18], len(buf), SRC)


# ---------------------------------------------------------------------------------------------------
# Files on disk and pickle refusal
# ---------------------------------------------------------------------------------------------------


def test_read_header_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(_file({"w": _e()}, 8))
    assert read_header(good).tensors[0].name == "w"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_file({"w": _e()}, 8)[:-3])  # truncated in the data section
    with pytest.raises(ModelFormatError, match=r"run past the end of the 5-byte data section") as info:
        read_header(bad)
    assert info.value.source == str(bad)


def test_read_header_truncated_inside_header(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    p.write_bytes(_file({"w": _e()}, 8)[:20])
    with pytest.raises(ModelFormatError, match=r"header length \d+ runs past the end of the 20-byte file"):
        read_header(p)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".PT", ".pkl"])
def test_pickle_suffix_refused_without_reading(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"pytorch_model{suffix}"
    p.write_bytes(_file({"w": _e()}, 8))  # even valid safetensors bytes: the name says pickle
    with pytest.raises(ModelFormatError, match=r"pickle.*unsafe.*convert it to safetensors"):
        read_header(p)


@pytest.mark.parametrize(
    "content",
    [b"PK\x03\x04\x00\x00\x08\x08archive/data.pkl", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02"],
    ids=["torch-zip", "legacy-torch-pickle"],
)
def test_pickle_content_named_safetensors_is_refused_as_pickle(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "model.safetensors"
    p.write_bytes(content + bytes(64))
    with pytest.raises(ModelFormatError, match=r"pickle.*unsafe"):
        read_header(p)
    assert looks_like_pickle(content)


def test_valid_file_whose_length_looks_like_pickle_is_not_refused(tmp_path: Path) -> None:
    # A 640-byte header has length bytes 80 02 ..., the pickle protocol-2 opcode: only sniff on failure.
    body = json.dumps({"w": _e()}).encode()
    body += b" " * (0x0280 - len(body))
    p = tmp_path / "model.safetensors"
    p.write_bytes(_file(body, 8))
    assert p.read_bytes()[:2] == b"\x80\x02"
    assert read_header(p).data_start == 8 + 0x0280


# ---------------------------------------------------------------------------------------------------
# Fuzzing: hostile bytes only ever produce ModelFormatError, quickly
# ---------------------------------------------------------------------------------------------------

_VALID = _file(
    {
        "__metadata__": {"format": "pt"},
        "a": _e("F16", (2, 3), (0, 12)),
        "b": _e("I8", (4,), (12, 16)),
        "c": _e("F32", (0,), (16, 16)),
        "d": _e("BF16", (2,), (16, 20)),
    },
    bytes(range(20)),
)
_FUZZ = settings(
    max_examples=250,
    deadline=timedelta(seconds=2),  # generous for shared CI cores; a hang would still trip it
    suppress_health_check=[HealthCheck.too_slow],
)


def _check_invariants(h: SafetensorsHeader) -> None:
    cursor = 0
    for t in h.tensors:
        assert t.name and t.begin == cursor and t.end >= t.begin
        cursor = t.end
    assert h.data_start + cursor == h.file_size


def _parse_or_reject(buf: bytes, file_size: int | None = None) -> None:
    try:
        h = parse_header_bytes(buf, len(buf) if file_size is None else file_size, "fuzz")
    except ModelFormatError as exc:
        event("rejected: " + re.sub(r"[\d'\[].*", "", exc.detail)[:40])  # --hypothesis-show-statistics
        return
    event("accepted")
    _check_invariants(h)


_VALID_DATA_START = 8 + int.from_bytes(_VALID[:8], "little")
# Half the edits land in the JSON text with JSON-ish characters, so the fuzzer gets past the decoder and
# reaches the semantic checks (dtype, shape, offsets, coverage) instead of dying on non-UTF-8 bytes.
_edit = st.one_of(
    st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)),
    st.tuples(st.integers(8, _VALID_DATA_START - 1), st.sampled_from(b'0123456789[]{}",:-. eEF')),
)


@pytest.mark.timeout(60)
@_FUZZ
@given(
    edits=st.lists(_edit, min_size=1, max_size=6),
    cut=st.integers(0, len(_VALID)),
    tail=st.binary(max_size=16),
)
def test_fuzz_byte_mutations(edits: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    buf = bytearray(_VALID)
    for pos, value in edits:
        buf[pos] = value
    _parse_or_reject(bytes(buf))
    _parse_or_reject(bytes(buf[:cut]) + tail)


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=6),
)
_json = st.recursive(
    _json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4),
    max_leaves=12,
)
_dim = st.one_of(
    st.integers(-2, 5), st.integers(2**30, 2**66), st.floats(0, 4), st.booleans(), st.text(max_size=2)
)
_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(
            st.sampled_from(sorted(DTYPE_SIZES)), st.sampled_from(["F128", "", "f16"]), _json_leaf
        ),
        "shape": st.one_of(st.lists(_dim, max_size=4), _json),
        "data_offsets": st.one_of(
            st.lists(st.one_of(st.integers(-4, 48), st.integers(2**62, 2**65)), max_size=3), _json
        ),
    },
    optional={"extra": _json},
)
_header = st.dictionaries(
    st.one_of(st.sampled_from(["__metadata__", "", "w", "x.y", "\x00"]), st.text(max_size=8)),
    st.one_of(_entry, _json, st.dictionaries(st.text(max_size=3), _json_leaf, max_size=3)),
    max_size=5,
)


@pytest.mark.timeout(60)
@_FUZZ
@given(header=_header, data_len=st.integers(0, 48), pad=st.integers(0, 9))
def test_fuzz_random_headers(header: dict[str, object], data_len: int, pad: int) -> None:
    body = json.dumps(header).encode("utf-8", "surrogatepass") + b" " * pad
    _parse_or_reject(_file(body, data_len))


@pytest.mark.timeout(60)
@_FUZZ
@given(raw=st.binary(max_size=64), length=st.integers(0, 2**64 - 1), file_size=st.integers(0, 2**64))
def test_fuzz_random_bytes_and_sizes(raw: bytes, length: int, file_size: int) -> None:
    _parse_or_reject(raw)
    # A lying file size (e.g. from a racing writer) must still only produce ModelFormatError.
    _parse_or_reject(length.to_bytes(8, "little") + raw, file_size)


@pytest.mark.timeout(60)
@settings(max_examples=40, deadline=timedelta(seconds=2))
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4)
)
def test_fuzz_read_header_files(edits: list[tuple[int, int]]) -> None:
    buf = bytearray(_VALID)
    for pos, value in edits:
        buf[pos] = value
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.safetensors"
        p.write_bytes(bytes(buf))
        try:
            _check_invariants(read_header(p))
        except ModelFormatError:
            pass


# ---------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------


def _sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "f64": rng.standard_normal((3, 2)),
        "f32": rng.standard_normal((5,)).astype(np.float32),
        "f16": rng.standard_normal((2, 3, 1)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (4,)),
        "i32": rng.integers(-1000, 1000, (3,), dtype=np.int32),
        "i16": rng.integers(-1000, 1000, (3,), dtype=np.int16),
        "i8": rng.integers(-100, 100, (7,), dtype=np.int8),
        "u8": rng.integers(0, 255, (3, 3), dtype=np.uint8),
        "bool": rng.integers(0, 2, (5,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "strided": rng.standard_normal((4, 6)).astype(np.float32).T,
        "bigendian": np.arange(6, dtype=">i4").reshape(2, 3),
    }


def test_write_roundtrip_layout_and_alignment(tmp_path: Path) -> None:
    arrays = _sample_arrays()
    p = tmp_path / "x.safetensors"
    size = write_safetensors(p, arrays, {"format": "pt", "b": "2"})
    assert size == p.stat().st_size
    h = read_header(p)
    assert h.data_start % 8 == 0
    assert h.metadata == {"format": "pt", "b": "2"}
    assert [t.name for t in h.tensors] == sorted(arrays)  # laid out in sorted-name order
    raw = p.read_bytes()
    for t in h.tensors:
        a = arrays[t.name]
        assert t.shape == a.shape
        got = np.frombuffer(raw[h.absolute_offset(t) : h.data_start + t.end], dtype=a.dtype.newbyteorder("<"))
        np.testing.assert_array_equal(got.reshape(a.shape), a)
    assert not list(tmp_path.glob(".*tmp*"))


def test_write_is_deterministic(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a", _sample_arrays(), {"k": "v"})
    write_safetensors(tmp_path / "b", dict(reversed(list(_sample_arrays().items()))), {"k": "v"})
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_lazy_tensor_chunks_and_bf16(tmp_path: Path) -> None:
    bits = np.array([0x3F80, 0xBF80, 0x0000, 0x4000], dtype=np.uint16)  # bf16 1, -1, 0, 2
    lazy = LazyTensor("BF16", (2, 2), lambda: iter([bits[:1], bits[1:]]))
    p = tmp_path / "bf.safetensors"
    write_safetensors(p, {"w": lazy})
    h = read_header(p)
    assert h.tensors[0].dtype == "BF16" and h.tensors[0].shape == (2, 2)
    assert p.read_bytes()[h.data_start :] == bits.astype("<u2").tobytes()


def test_lazy_tensor_wrong_size_leaves_no_file(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    bad = LazyTensor("F32", (4,), lambda: [np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match=r"produced 12 bytes, F32 x \[4\] needs 16"):
        write_safetensors(p, {"w": bad})
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_unrepresentable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no safetensors equivalent"):
        write_safetensors(tmp_path / "c", {"c": np.zeros(2, np.complex64)})
    for name in ["__metadata__", "", "a\nb", "\ud800"]:
        with pytest.raises(ValueError, match="invalid tensor name"):
            write_safetensors(tmp_path / "m", {name: np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="unknown dtype 'F128'"):
        write_safetensors(tmp_path / "m", {"w": LazyTensor("F128", (1,), lambda: [])})
    with pytest.raises(ValueError, match=r"invalid shape \[-1\]"):
        write_safetensors(tmp_path / "m", {"w": LazyTensor("F32", (-1,), lambda: [])})
    with pytest.raises(ValueError, match="metadata must map"):
        write_safetensors(tmp_path / "m", {}, {"k": 1})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Cross-check with the reference implementation (the `safetensors` package)
# ---------------------------------------------------------------------------------------------------

st_numpy = pytest.importorskip("safetensors.numpy")


def test_reference_loads_what_we_write(tmp_path: Path) -> None:
    arrays = _sample_arrays()
    p = tmp_path / "ours.safetensors"
    write_safetensors(p, arrays, {"format": "pt"})
    loaded = st_numpy.load_file(str(p))
    assert sorted(loaded) == sorted(arrays)
    for name, a in arrays.items():
        assert loaded[name].shape == a.shape
        np.testing.assert_array_equal(loaded[name], a)


def test_we_parse_what_the_reference_writes(tmp_path: Path) -> None:
    arrays = _sample_arrays()
    p = tmp_path / "ref.safetensors"
    st_numpy.save_file(
        {k: np.ascontiguousarray(v.astype(v.dtype.newbyteorder("="))) for k, v in arrays.items()}, str(p)
    )
    h = read_header(p)
    assert {t.name for t in h.tensors} == set(arrays)
    raw = p.read_bytes()
    for t in h.tensors:
        a = arrays[t.name]
        got = np.frombuffer(
            raw[h.data_start + t.begin : h.data_start + t.end], dtype=a.dtype.newbyteorder("<")
        )
        np.testing.assert_array_equal(got.reshape(t.shape), a)


def test_single_dtype_output_is_byte_identical_to_reference(tmp_path: Path) -> None:
    # The reference orders by dtype then name; with one dtype that is name order, so bytes must match.
    rng = np.random.default_rng(1)
    arrays = {
        n: rng.standard_normal(s).astype(np.float16) for n, s in [("b", (3, 5)), ("a", (7,)), ("c", ())]
    }
    write_safetensors(tmp_path / "ours", arrays, {"format": "pt"})
    st_numpy.save_file(arrays, str(tmp_path / "ref"), metadata={"format": "pt"})
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()


def _reference_rejects(buf: bytes) -> bool:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.safetensors"
        p.write_bytes(buf)
        try:
            st_numpy.load_file(str(p))
        except Exception:
            return True
        return False


@pytest.mark.parametrize(
    "name",
    ["overlapping tensors", "gap between tensors", "data not fully covered", "dtype x shape != length"],
)
def test_reference_agrees_these_are_malformed(name: str) -> None:
    buf = next(b for n, b, _ in _CORPUS if n == name)
    assert _reference_rejects(buf)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    os.mkfifo(p)
    with pytest.raises(ModelFormatError, match="not a regular file"):
        read_header(p)
