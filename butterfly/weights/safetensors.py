"""Safetensors headers, parsed as hostile input, and a small deterministic writer.

Owns: the on-disk safetensors format (8-byte little-endian header length, a JSON header, a data
section), every check that a header is sane before any of its numbers is used as a file offset, the
refusal of pickle checkpoints, and ``write_safetensors`` for test models.

Must not: read tensor data (the loader streams byte ranges; this module only says where they are),
import torch, trust any number in a header before checking it, or raise anything but
``ModelFormatError`` for a malformed file (an ``OSError`` from the file system still propagates).
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "PICKLE_SUFFIXES",
    "LazyTensor",
    "ModelFormatError",
    "SafetensorsHeader",
    "TensorInfo",
    "TensorValue",
    "encode_header",
    "looks_like_pickle",
    "parse_header_bytes",
    "read_header",
    "refuse_pickle",
    "write_safetensors",
]

# Element sizes in bytes. The brief's list plus the unsigned ints the format also defines, so a real
# checkpoint holding e.g. U32 packed weights is not refused as "unknown".
DTYPE_SIZES: Mapping[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# The reference implementation caps headers at 100 MB; a real 400-shard checkpoint's header is a few
# hundred KiB, so this only bounds what a hostile file can make us allocate and JSON-decode.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# numpy's own limit on dimensions; a shape longer than this is not a tensor anyone can use.
MAX_NDIM = 64
# Byte counts travel as int64/off_t everywhere downstream (pread, numpy, C): keep them representable.
MAX_TENSOR_BYTES = 2**63 - 1

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})

_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

_NUMPY_TO_DTYPE: Mapping[np.dtype[np.generic], str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


class ModelFormatError(ValueError):
    """A checkpoint file or directory is malformed, inconsistent or refused.

    ``source`` names the file (or model directory); ``detail`` says exactly what is wrong with it, naming
    the tensor and offsets where there is one. ``str()`` gives both, ready for a log line.
    """

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file. ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors sorted by offset, covering ``[data_start, file_size)`` exactly."""

    source: str
    file_size: int
    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str]

    def absolute_offset(self, tensor: TensorInfo) -> int:
        """Byte offset of ``tensor``'s first byte from the start of the file."""
        return self.data_start + tensor.begin


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def looks_like_pickle(prefix: bytes) -> bool:
    """True when the file starts like ``torch.save`` output (zip archive or a protocol 2-5 pickle).

    Only consulted after a file has already failed to parse as safetensors: a valid header length
    can begin with the same bytes (0x0280 is ``b"\\x80\\x02"``), so sniffing first would refuse good files.
    """
    if prefix.startswith(b"PK\x03\x04"):
        return True
    return len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5


def refuse_pickle(path: Path) -> ModelFormatError:
    """The error for a pickle checkpoint (returned, so the caller's ``raise`` shows in its traceback)."""
    return ModelFormatError(
        str(path),
        "refusing a pickle-based checkpoint (.bin/.pt/.pth/.ckpt): unpickling runs arbitrary code, so it "
        "is unsafe to load; convert it to safetensors first (e.g. load it once in a trusted sandbox and "
        "save it with safetensors' save_file, or use the Hugging Face convert tool)",
    )


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path`` (never its tensor data)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    source = str(path)
    # O_NONBLOCK: a FIFO planted under a model name must not hang the open; it is refused just below.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        # Size from the open descriptor, so a file swapped after the open cannot disagree with it.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFormatError(source, "not a regular file")
        file_size = st.st_size
        prefix = f.read(8)
        try:
            header_len = _check_header_length(prefix, file_size, source)
        except ModelFormatError:
            if looks_like_pickle(prefix):
                raise refuse_pickle(path) from None
            raise
        buf = prefix + f.read(header_len)
    return parse_header_bytes(buf, file_size, source)


def parse_header_bytes(buf: bytes, file_size: int, source: str) -> SafetensorsHeader:
    """Validate a header given the file's leading bytes (``buf``, at least the whole header).

    ``file_size`` is the size of the whole file; bytes of ``buf`` past the header are ignored, so a
    whole small file can be passed as is (the fuzz tests do).
    """
    header_len = _check_header_length(buf[:8], file_size, source)
    data_start = 8 + header_len
    if len(buf) < data_start:
        raise ModelFormatError(
            source, f"truncated header: {header_len} header bytes declared, only {len(buf) - 8} readable"
        )
    raw = _decode_json(buf[8:data_start], source)
    metadata: dict[str, str] = {}
    tensors: list[TensorInfo] = []
    data_len = file_size - data_start
    for name, entry in raw.items():
        if name == _METADATA_KEY:
            metadata = _check_metadata(entry, source)
        else:
            tensors.append(_check_entry(name, entry, data_len, source))
    tensors.sort(key=lambda t: (t.begin, t.end, t.name))
    _check_coverage(tensors, data_len, source)
    return SafetensorsHeader(source, file_size, data_start, tuple(tensors), metadata)


def _check_header_length(prefix: bytes, file_size: int, source: str) -> int:
    if file_size < 8 or len(prefix) < 8:
        raise ModelFormatError(
            source, f"truncated file: {file_size} bytes, too short for the 8-byte header length"
        )
    header_len = int.from_bytes(prefix[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise ModelFormatError(
            source, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    if header_len > file_size - 8:
        raise ModelFormatError(
            source, f"header length {header_len} runs past the end of the {file_size}-byte file"
        )
    if header_len < 2:
        # "{}" is the smallest JSON object; catching this here gives a clearer message than the decoder.
        raise ModelFormatError(source, f"header length {header_len} is too short to hold a JSON object")
    return header_len


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of duplicate keys silently; two readers could then disagree on which
    # bytes a tensor owns, so a duplicate is a defect, not a choice.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_constant(token: str) -> object:
    raise _BadConstant(token)


class _BadConstant(Exception):
    pass


def _decode_json(raw: bytes, source: str) -> dict[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(
            source, f"header is not valid UTF-8 (byte {exc.start} of the header)"
        ) from None
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise ModelFormatError(source, f"header has duplicate key {exc.key!r}") from None
    except _BadConstant as exc:
        raise ModelFormatError(source, f"header is not strict JSON ({exc} is not allowed)") from None
    except RecursionError:
        raise ModelFormatError(source, "header JSON is nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, and the int-digit limit for absurdly long integer literals.
        raise ModelFormatError(source, f"header is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(source, f"header must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_metadata(entry: object, source: str) -> dict[str, str]:
    if not isinstance(entry, dict):
        raise ModelFormatError(source, f"__metadata__ must be an object of strings, got {_json_type(entry)}")
    for key, value in entry.items():
        if not isinstance(value, str):
            raise ModelFormatError(source, f"__metadata__[{key!r}] must be a string, got {_json_type(value)}")
        for text in (key, value):
            if not _is_utf8(text):
                raise ModelFormatError(
                    source, f"__metadata__ holds a string that is not valid UTF-8: {text!r}"
                )
    return dict(entry)


def _is_utf8(text: str) -> bool:
    # JSON "\ud800" escapes decode to lone surrogates, which no UTF-8 consumer downstream can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_plain_int(value: object) -> bool:
    # bool is an int subclass in Python, and JSON true must not pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(name: str, entry: object, data_len: int, source: str) -> TensorInfo:
    if name == "":
        raise ModelFormatError(source, "tensor with an empty name")
    if not _is_utf8(name):
        raise ModelFormatError(source, f"tensor name {name!r} is not valid UTF-8")
    if _CONTROL_CHARS.search(name):
        raise ModelFormatError(source, f"tensor name {name!r} contains control characters")
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelFormatError(source, f"{where}: entry must be an object, got {_json_type(entry)}")
    keys = set(entry)
    if keys != _ENTRY_KEYS:
        missing = sorted(_ENTRY_KEYS - keys)
        extra = sorted(keys - _ENTRY_KEYS)
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise ModelFormatError(
            source, f"{where}: entry must have exactly dtype, shape, data_offsets; {'; '.join(parts)}"
        )
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ModelFormatError(source, f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    shape = _check_shape(entry["shape"], where, source)
    begin, end = _check_offsets(entry["data_offsets"], data_len, where, source)
    nbytes = DTYPE_SIZES[dtype]
    for dim in shape:
        nbytes *= dim
        if nbytes > MAX_TENSOR_BYTES:
            raise ModelFormatError(
                source, f"{where}: shape {list(shape)} x {dtype} overflows {MAX_TENSOR_BYTES} bytes"
            )
    if nbytes != end - begin:
        raise ModelFormatError(
            source,
            f"{where}: shape {list(shape)} x {dtype} is {nbytes} bytes but data_offsets "
            f"[{begin}, {end}] span {end - begin}",
        )
    return TensorInfo(name, dtype, shape, begin, end)


def _check_shape(shape: object, where: str, source: str) -> tuple[int, ...]:
    if not isinstance(shape, list):
        raise ModelFormatError(source, f"{where}: shape must be an array, got {_json_type(shape)}")
    if len(shape) > MAX_NDIM:
        raise ModelFormatError(source, f"{where}: shape has {len(shape)} dimensions, more than {MAX_NDIM}")
    for dim in shape:
        if not _is_plain_int(dim) or dim < 0:
            raise ModelFormatError(
                source, f"{where}: shape {shape!r} must hold non-negative integers, found {dim!r}"
            )
    return tuple(shape)


def _check_offsets(offsets: object, data_len: int, where: str, source: str) -> tuple[int, int]:
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_plain_int(v) and v >= 0 for v in offsets)
    ):
        raise ModelFormatError(
            source, f"{where}: data_offsets must be [begin, end] of non-negative integers, got {offsets!r}"
        )
    begin, end = offsets
    if begin > end:
        raise ModelFormatError(source, f"{where}: data_offsets begin {begin} > end {end}")
    if end > data_len:
        raise ModelFormatError(
            source,
            f"{where}: data_offsets [{begin}, {end}] run past the end of the {data_len}-byte data section",
        )
    return begin, end


def _check_coverage(tensors: list[TensorInfo], data_len: int, source: str) -> None:
    # Sorted by offset, every tensor must start exactly where the previous ended: anything else is an
    # overlap (two tensors aliasing bytes) or a gap (bytes no tensor owns, which hashing would skip).
    cursor = 0
    previous: TensorInfo | None = None
    for t in tensors:
        if t.begin < cursor:
            assert previous is not None
            raise ModelFormatError(
                source,
                f"tensor {t.name!r} [{t.begin}, {t.end}] overlaps tensor {previous.name!r} "
                f"[{previous.begin}, {previous.end}]",
            )
        if t.begin > cursor:
            after = f"after tensor {previous.name!r}" if previous else "at the start of the data section"
            raise ModelFormatError(
                source, f"gap of {t.begin - cursor} bytes [{cursor}, {t.begin}) {after}, before {t.name!r}"
            )
        cursor = t.end
        previous = t
    if cursor != data_len:
        raise ModelFormatError(
            source,
            f"data section not fully covered: tensors end at {cursor} but the data section is "
            f"{data_len} bytes ({data_len - cursor} bytes unaccounted for)",
        )


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

TensorChunks = Iterable[npt.NDArray[np.generic]]


@dataclass(frozen=True)
class LazyTensor:
    """A tensor whose bytes are produced only while it is written, as one or more chunks.

    Lets a writer stream a large tensor without holding it whole, and carries dtypes numpy has no
    native type for (BF16, F8): ``produce`` yields arrays of any dtype whose raw little-endian bytes,
    concatenated, are the tensor's bytes (e.g. uint16 bit patterns for BF16).
    """

    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], TensorChunks]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


TensorValue = npt.NDArray[np.generic] | LazyTensor


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_SIZES[dtype]
    for dim in shape:
        n *= dim
    return n


def _check_writable(name: str, dtype: str, shape: tuple[int, ...]) -> None:
    # Refuse here what read_header would refuse, so the writer never produces a file we cannot load.
    if name == "" or name == _METADATA_KEY or not _is_utf8(name) or _CONTROL_CHARS.search(name):
        raise ValueError(f"invalid tensor name {name!r}")
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if len(shape) > MAX_NDIM or not all(_is_plain_int(d) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: invalid shape {list(shape)!r}")


def _describe(name: str, value: TensorValue) -> tuple[str, tuple[int, ...]]:
    if isinstance(value, LazyTensor):
        return value.dtype, tuple(value.shape)
    code = _NUMPY_TO_DTYPE.get(value.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"tensor {name!r}: numpy dtype {value.dtype} has no safetensors equivalent")
    return code, tuple(int(d) for d in value.shape)


def encode_header(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> bytes:
    """The 8-byte length plus padded JSON header for ``name -> (dtype, shape)``, laid out in name order.

    Deterministic: the same input always gives the same bytes. Padded with spaces so the data section
    starts 8-byte aligned, as the reference implementation does.
    """
    obj: dict[str, object] = {}
    if metadata:
        if not all(isinstance(v, str) and _is_utf8(k) and _is_utf8(v) for k, v in metadata.items()):
            raise ValueError("metadata must map UTF-8 strings to UTF-8 strings")
        obj[_METADATA_KEY] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        _check_writable(name, dtype, shape)
        nbytes = _nbytes(dtype, shape)
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def _little_endian_bytes(arr: npt.NDArray[np.generic]) -> memoryview:
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # reshape(-1) so 0-d arrays work; ascontiguousarray copies only when the input is strided.
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


def write_safetensors(
    path: Path, tensors: Mapping[str, TensorValue], metadata: Mapping[str, str] | None = None
) -> int:
    """Write ``tensors`` to ``path`` as safetensors; return the file size.

    Tensors are laid out in sorted-name order and the output is byte-identical for identical input.
    Written to a temporary name, fsync'd and renamed, so ``path`` never holds a half-written file.
    Arrays go straight to the file: peak memory is one chunk, not the whole file.
    """
    path = Path(path)
    described = {name: _describe(name, value) for name, value in tensors.items()}
    header = encode_header(described, metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for name in sorted(tensors):
                value = tensors[name]
                dtype, shape = described[name]
                expected = _nbytes(dtype, shape)
                chunks: TensorChunks = value.produce() if isinstance(value, LazyTensor) else (value,)
                written = 0
                for chunk in chunks:
                    written += f.write(_little_endian_bytes(chunk))
                if written != expected:
                    raise ValueError(
                        f"tensor {name!r}: produced {written} bytes, {dtype} x {list(shape)} needs {expected}"
                    )
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is on disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size
