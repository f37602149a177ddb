"""The Source contract over a directory, open_source, and the layer map read through any Source.

The S3 source runs the same contract against a real server in test_s3.py.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from butterfly.config import parse_config
from butterfly.weights.layout import CONFIG_FILE, INDEX_FILE, load_layout, load_layout_from_source
from butterfly.weights.safetensors import ModelFormatError
from butterfly.weights.sources import (
    FilesystemSource,
    Source,
    SourceError,
    SourceNotFound,
    open_source,
)
from butterfly.weights.testmodel import make_test_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("src") / "m", layers=3, hidden=64, vocab=256, shards=2)


def _shards(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.safetensors"))


class MemorySource:
    """A Source over a dict, recording every range read: checks what layout reads, not just what it gets."""

    def __init__(self, files: dict[str, bytes], description: str = "mem://model") -> None:
        self.files = files
        self.description = description
        self.reads: list[tuple[str, int, int]] = []
        self.small: list[str] = []

    def _data(self, file: str) -> bytes:
        if file not in self.files:
            raise SourceNotFound(f"{self.description}/{file}: no such file")
        return self.files[file]

    def size(self, file: str) -> int:
        return len(self._data(file))

    def read_into(self, file: str, offset: int, buf: memoryview) -> None:
        data = self._data(file)
        if offset + len(buf) > len(data):
            raise SourceError(f"{file}: range past the end")
        self.reads.append((file, offset, len(buf)))
        buf[:] = data[offset : offset + len(buf)]

    def read_small(self, file: str, limit: int) -> bytes:
        data = self._data(file)
        if len(data) > limit:
            raise SourceError(f"{file}: larger than {limit}")
        self.small.append(file)
        return data

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# FilesystemSource
# ---------------------------------------------------------------------------------------------------


def test_filesystem_source_ranges_equal_file_bytes(model: Path) -> None:
    src = FilesystemSource(model)
    rng = random.Random(7)
    try:
        assert isinstance(src, Source)
        assert src.description == str(model) and src.root == model
        for name in _shards(model):
            data = (model / name).read_bytes()
            assert src.size(name) == len(data)
            for _ in range(50):
                a = rng.randrange(len(data))
                b = rng.randint(a, len(data))
                buf = bytearray(b - a)
                src.read_into(name, a, memoryview(buf))
                assert buf == data[a:b]
            last = bytearray(1)
            src.read_into(name, len(data) - 1, memoryview(last))
            assert last == data[-1:]
    finally:
        src.close()


def test_filesystem_source_writes_only_the_given_view(model: Path) -> None:
    name = _shards(model)[0]
    data = (model / name).read_bytes()
    arena = bytearray(b"\xee" * 300)
    src = FilesystemSource(model)
    src.read_into(name, 1000, memoryview(arena)[100:200])
    src.close()
    assert arena[:100] == b"\xee" * 100 and arena[200:] == b"\xee" * 100
    assert arena[100:200] == data[1000:1100]


def test_filesystem_short_read_names_file_and_range(model: Path) -> None:
    name = _shards(model)[0]
    size = (model / name).stat().st_size
    src = FilesystemSource(model)
    with pytest.raises(SourceError, match=rf"{name} ended at offset {size}, 10 bytes short of the range"):
        src.read_into(name, size - 5, memoryview(bytearray(15)))
    with pytest.raises(SourceError, match="invalid range"):
        src.read_into(name, -1, memoryview(bytearray(1)))
    src.close()
    with pytest.raises(SourceError, match="closed"):
        src.read_into(name, 0, memoryview(bytearray(1)))


def test_filesystem_missing_file_is_source_not_found(tmp_path: Path) -> None:
    src = FilesystemSource(tmp_path)
    for call in (
        lambda: src.size("nope.safetensors"),
        lambda: src.read_small("manifest.json", 100),
        lambda: src.read_into("nope.safetensors", 0, memoryview(bytearray(1))),
    ):
        with pytest.raises(SourceNotFound, match=r"nope.safetensors|manifest.json"):
            call()


def test_filesystem_read_small(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"x" * 100)
    src = FilesystemSource(tmp_path)
    assert src.read_small("config.json", 100) == b"x" * 100
    with pytest.raises(SourceError, match="100 bytes, larger than the 99-byte limit") as info:
        src.read_small("config.json", 99)
    assert not isinstance(info.value, SourceNotFound)
    (tmp_path / "empty").write_bytes(b"")
    assert src.read_small("empty", 0) == b""


def test_filesystem_refuses_fifos_and_directories_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    src = FilesystemSource(tmp_path)
    for name in ("fifo.safetensors", "dir.safetensors"):
        with pytest.raises(SourceError, match="not a regular file"):
            src.size(name)
        with pytest.raises(SourceError, match="not a regular file"):
            src.read_small(name, 10)


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "a/../../b", "", "a//b", "./x", "a\\b"])
def test_file_names_cannot_leave_the_model(tmp_path: Path, name: str) -> None:
    src = FilesystemSource(tmp_path / "m")
    with pytest.raises(SourceError, match="refusing file name"):
        src.size(name)
    with pytest.raises(SourceError, match="refusing file name"):
        src.read_into(name, 0, memoryview(bytearray(1)))


def test_filesystem_concurrent_reads_share_descriptors(model: Path) -> None:
    names = _shards(model)
    files = {n: (model / n).read_bytes() for n in names}
    src = FilesystemSource(model)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                name = rng.choice(names)
                a = rng.randrange(len(files[name]))
                n = rng.randint(0, min(50_000, len(files[name]) - a))
                buf = bytearray(n)
                src.read_into(name, a, memoryview(buf))
                assert buf == files[name][a : a + n]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    src.close()
    assert not errors
    assert len(src._fds) == 0


def test_open_source_filesystem(model: Path) -> None:
    cfg = parse_config(f'[model]\nsource_type = "filesystem"\nsource_path = "{model}"\n')
    src = open_source(cfg)
    assert isinstance(src, FilesystemSource) and src.root == model
    assert src.size(CONFIG_FILE) == (model / CONFIG_FILE).stat().st_size
    src.close()


# ---------------------------------------------------------------------------------------------------
# load_layout_from_source
# ---------------------------------------------------------------------------------------------------


def test_layout_from_filesystem_source_equals_load_layout(model: Path) -> None:
    src = FilesystemSource(model)
    via_source = load_layout_from_source(src)
    src.close()
    assert via_source == load_layout(model)
    assert via_source.root == model


def test_layout_reads_headers_only(model: Path) -> None:
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    src = MemorySource(files)
    lay = load_layout_from_source(src)
    assert lay.root == "mem://model"
    assert sorted(src.small) == sorted([CONFIG_FILE, INDEX_FILE])
    # Per shard: the 8-byte length, then exactly the header; nothing at or past the data section.
    for name in _shards(model):
        header_len = int.from_bytes(files[name][:8], "little")
        assert [r for r in src.reads if r[0] == name] == [(name, 0, 8), (name, 8, header_len)]
    local = load_layout(model)
    assert (lay.units, lay.files, lay.model_config, lay.num_blocks) == (
        local.units,
        local.files,
        local.model_config,
        local.num_blocks,
    )


def test_layout_from_source_errors_name_the_source(model: Path) -> None:
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    shard = _shards(model)[1]

    missing = dict(files)
    del missing[shard]
    with pytest.raises(ModelFormatError, match=rf"shard '{shard}' listed in weight_map is missing") as info:
        load_layout_from_source(MemorySource(missing, "s3://b/m"))
    assert info.value.source == f"s3://b/m/{INDEX_FILE}"

    truncated = dict(files)
    truncated[shard] = files[shard][:-1]
    with pytest.raises(ModelFormatError, match="run past the end") as info:
        load_layout_from_source(MemorySource(truncated, "s3://b/m"))
    assert info.value.source == f"s3://b/m/{shard}"

    huge = dict(files)
    huge[shard] = (2**40).to_bytes(8, "little") + files[shard][8:]
    with pytest.raises(ModelFormatError, match="exceeds the"):
        load_layout_from_source(MemorySource(huge))

    no_config = dict(files)
    del no_config[CONFIG_FILE]
    with pytest.raises(ModelFormatError, match="config.json is missing"):
        load_layout_from_source(MemorySource(no_config))


def test_layout_from_source_refuses_pickle_and_empty() -> None:
    with pytest.raises(ModelFormatError, match="pickle.*unsafe") as info:
        load_layout_from_source(
            MemorySource({"pytorch_model.bin": b"PK\x03\x04", CONFIG_FILE: b"{}"}, "s3://b/m")
        )
    assert info.value.source == "s3://b/m/pytorch_model.bin"
    with pytest.raises(ModelFormatError, match="no weights: neither"):
        load_layout_from_source(MemorySource({CONFIG_FILE: b"{}"}))
    # A pickle saved under the safetensors name is refused as a pickle, not as a bad header length.
    torch_zip = b"PK\x03\x04" + b"\x00" * 100
    with pytest.raises(ModelFormatError, match="pickle"):
        load_layout_from_source(
            MemorySource({"model.safetensors": torch_zip, CONFIG_FILE: b'{"num_hidden_layers": 1}'})
        )


def test_layout_store_failures_stay_source_errors(model: Path) -> None:
    """A failing store is not a malformed model: the loader retries one and gives up on the other."""
    files = {p.name: p.read_bytes() for p in model.iterdir()}

    class Flaky(MemorySource):
        def read_into(self, file: str, offset: int, buf: memoryview) -> None:
            raise SourceError(f"{file}: connection reset")

    with pytest.raises(SourceError, match="connection reset"):
        load_layout_from_source(Flaky(files))
