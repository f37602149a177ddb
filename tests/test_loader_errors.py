"""Every way a load or a repair fails says what an operator needs, in the reason that reaches /status
(the supervisor keeps Failed.reason whole; tests/test_integrity_node.py follows it there); and a
re-plan's load, which copies what it keeps from the previous arena, never trusts those bytes."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import blake3
import pytest

from butterfly.board import Board, LoaderSection
from butterfly.board.shm import unlink_segment
from butterfly.config import parse_config
from butterfly.ipc import Landing, LoadAssignment, Loaded, RepairTensors, TensorsLanded
from butterfly.loader import process as loader_process
from butterfly.loader.process import Loader, LoadFailed
from butterfly.loader.warmup import WarmupError
from butterfly.supervisor.childproc import ChildContext, CommandInbox
from butterfly.weights.manifest import MANIFEST_FILE, read_manifest
from tests.tamper import flip_byte


class NoCommands:
    """The loader's inbox with nothing in it: a load is never interrupted."""

    def pending(self) -> None:
        return None


class Recorder:
    """The loader's channel to the supervisor: what it sends during a load, in order."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.on_send: Callable[[object], None] | None = None

    def send(self, msg: object) -> None:
        if self.on_send is not None:
            self.on_send(msg)
        self.sent.append(msg)


@pytest.fixture
def make_loader(tmp_path: Path) -> Iterator[object]:
    made: list[tuple[Loader, Board, str]] = []

    def make(model: Path, model_extra: str = "", downloaded_bytes: int = 0) -> Loader:
        base = f"butterfly-tl{os.getpid()}-{os.urandom(3).hex()}"
        board = Board.create(f"{base}-board", "tl")
        config = parse_config(
            f'[model]\nsource_type = "filesystem"\nsource_path = "{model}"\n{model_extra}\n'
            f'[node]\ngpu = "off"\ncache_dir = "{tmp_path / "cache"}"\n[loader]\nchunk_bytes = 65536\n'
        )
        ctx = SimpleNamespace(
            config=config,
            board=board,
            init=SimpleNamespace(arena_name=f"{base}-arena", downloaded_bytes=downloaded_bytes),
        )
        loader = Loader(cast(ChildContext, ctx), Recorder(), cast(CommandInbox, NoCommands()))  # type: ignore[arg-type]
        made.append((loader, board, f"{base}-arena"))
        return loader

    yield make
    for loader, board, arena in made:
        loader._drop_arena()
        board.close()
        board.unlink()
        unlink_segment(arena)


def failure(call: object) -> LoadFailed:
    with pytest.raises(LoadFailed) as caught:
        call()  # type: ignore[operator]
    return caught.value


@pytest.fixture
def model(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "m"))


def test_no_manifest_or_another_version_is_refused_before_anything_is_read(make_loader, model) -> None:  # type: ignore[no-untyped-def]
    (model / MANIFEST_FILE).rename(model / "elsewhere.json")
    e = failure(lambda: make_loader(model).load(LoadAssignment(1, 1, 0, 4)))
    assert e.fatal
    assert str(e) == (
        f"cannot use the model's manifest: no manifest at {model}/{MANIFEST_FILE}: run "
        "`butterfly-admin manifest build MODEL_DIR` and publish it beside the weights"
    )
    (model / "elsewhere.json").rename(model / MANIFEST_FILE)
    root = read_manifest(model / MANIFEST_FILE).merkle_root
    e = failure(lambda: make_loader(model, f'expected_root = "{"f" * 64}"').load(LoadAssignment(1, 1, 0, 4)))
    assert e.fatal and f"names model version {root}, but [model] expected_root pins {'f' * 64}" in str(e)


def test_an_assignment_past_the_model_is_named(make_loader, model) -> None:  # type: ignore[no-untyped-def]
    e = failure(lambda: make_loader(model).load(LoadAssignment(1, 1, 3, 6)))
    assert e.fatal and str(e) == "assignment 3-5 is past the model's 4 blocks"


def test_source_bytes_that_are_not_the_manifests_name_tensor_file_and_chunk(make_loader, model) -> None:  # type: ignore[no-untyped-def]
    rec = next(
        t
        for t in read_manifest(model / MANIFEST_FILE).tensors
        if t.name == "model.layers.1.mlp.gate_proj.weight"
    )
    flip_byte(model / rec.file, rec.offset + 65536 + 9)
    e = failure(lambda: make_loader(model).load(LoadAssignment(1, 1, 0, 4)))
    assert not e.fatal  # the supervisor retries once, bypassing the cache
    assert str(e).startswith(
        f"tensor {rec.name}: {rec.file} bytes [{rec.offset + 65536}, {rec.offset + rec.length}) (chunk 1, "
    )
    assert str(e).endswith("both reads agree, so the file is not the one the manifest describes")


def test_the_downloaded_bytes_count_on_from_earlier_loaders_and_failed_loads(
    make_loader, model, model_dir
) -> None:  # type: ignore[no-untyped-def]
    """model_bytes_downloaded_total is a counter of the node: a restarted loader counts on from what
    the supervisor hands it (its predecessors' bytes), and a load that fails half-way keeps the bytes
    it read, so the next load's count never falls back below what was published."""
    before = 10_000
    loader = make_loader(model, downloaded_bytes=before)
    board = loader.ctx.board
    assert loader.downloaded_total == before
    rec = next(
        t
        for t in read_manifest(model / MANIFEST_FILE).tensors
        if t.name == "model.layers.1.mlp.gate_proj.weight"
    )
    flip_byte(model / rec.file, rec.offset + 65536 + 9)
    failure(lambda: loader.load(LoadAssignment(1, 1, 0, 4)))
    read_by_failed = loader.downloaded_total - before
    assert read_by_failed > 0, "the bytes of a failed load were not counted"
    published = board.read(LoaderSection).bytes_downloaded_total
    assert before <= published <= loader.downloaded_total
    shutil.copyfile(model_dir / rec.file, model / rec.file)
    loaded = loader.load(LoadAssignment(2, 1, 0, 4))
    total = sum(t.length for t in loaded.tensors)
    assert board.read(LoaderSection).bytes_downloaded_total == before + read_by_failed + total


def test_a_failed_warmup_is_named_with_its_blocks(make_loader, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def broken(*args: object, **kwargs: object) -> object:
        raise WarmupError("activations are NaN after block 2")

    monkeypatch.setattr(loader_process, "warmup_stage", broken)
    loader = make_loader(model)
    e = failure(lambda: loader.load(LoadAssignment(1, 1, 0, 4)))
    assert e.fatal and str(e) == "warmup of blocks 0-3 failed: activations are NaN after block 2"
    # The decoded tensors may be views of the arena: the error must not keep them (and the mapping)
    # alive, or the next load could not unmap it. The error is still held here, by the test.
    assert loader.arena is not None
    loader.arena.close()


def test_an_engine_failure_in_warmup_leaves_no_view_of_the_arena(make_loader, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The engine fails after it made its views of the arena (a weight of the wrong shape): neither
    the error nor its traceback may keep those views, or the arena could not be unmapped."""
    real = loader_process.warmup_stage

    def misfit(arena, placements, tensors, config, *args, **kwargs):  # type: ignore[no-untyped-def]
        return real(arena, placements, tensors, {**config, "intermediate_size": 100}, *args, **kwargs)

    monkeypatch.setattr(loader_process, "warmup_stage", misfit)
    loader = make_loader(model)
    e = failure(lambda: loader.load(LoadAssignment(1, 1, 0, 4)))
    assert e.fatal and "warmup of blocks 0-3 failed: weights do not fit the model" in str(e)
    assert "mlp.gate_proj.weight has shape" in str(e)
    assert loader.arena is not None
    loader.arena.close()


def test_repairs_of_nothing_held_or_of_tensors_not_held_are_refused(make_loader, model) -> None:  # type: ignore[no-untyped-def]
    loader = make_loader(model)
    e = failure(lambda: loader.repair(RepairTensors(1, ["lm_head.weight"])))
    assert str(e) == "nothing of epoch 1 is loaded to repair"
    loader.load(LoadAssignment(1, 1, 0, 1))
    e = failure(lambda: loader.repair(RepairTensors(1, ["lm_head.weight"])))
    assert str(e) == "cannot repair tensors not loaded here: ['lm_head.weight']"
    done = loader.repair(RepairTensors(1, ["model.embed_tokens.weight"]))
    assert (done.tensors, done.from_cache, done.from_source) == (["model.embed_tokens.weight"], 1, 0)


# ---- a re-plan's load: what the new range keeps is copied from the previous arena, checked ----------


def _kept_and_read(caplog: pytest.LogCaptureFixture) -> tuple[int, int, int]:
    """(kept in memory, from cache, from the source) of the last load logged."""
    found = re.findall(
        r"tensors: (\d+) kept in memory from the previous range, (\d+) from cache, (\d+) from", caplog.text
    )
    assert found, caplog.text
    kept, cached, read = map(int, found[-1])
    return kept, cached, read


def _assert_arena_is_the_source(loader: Loader, loaded: Loaded, model: Path) -> None:
    records = {t.name: t for t in read_manifest(model / MANIFEST_FILE).tensors}
    assert loader.arena is not None
    for p in loaded.tensors:
        rec = records[p.name]
        with open(model / rec.file, "rb") as f:
            f.seek(rec.offset)
            want = f.read(rec.length)
        assert loader.arena.buf[p.arena_offset : p.arena_offset + p.length] == want, p.name


def _block_tensors(model: Path, block: int) -> list[str]:
    return [t.name for t in read_manifest(model / MANIFEST_FILE).tensors if f".layers.{block}." in t.name]


def test_a_new_range_copies_what_it_keeps_and_reads_only_what_it_gains(make_loader, model, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="butterfly.loader")
    loader = make_loader(model)
    loader.load(LoadAssignment(1, 1, 1, 3))
    loaded = loader.load(LoadAssignment(2, 1, 2, 4))  # keeps block 2, gains block 3 and the head
    kept, cached, read = _kept_and_read(caplog)
    assert kept == len(_block_tensors(model, 2)) > 0
    assert cached == 0 and read == len(loaded.tensors) - kept
    _assert_arena_is_the_source(loader, loaded, model)
    # The previous arena's name went to the new one, and nothing else of it is left named.
    assert loader.arena is not None and Path(loader.arena.path).stat().st_size == loaded.arena_bytes


def test_a_kept_tensor_changed_in_memory_is_read_from_the_source(make_loader, model, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="butterfly.loader")
    loader = make_loader(model)
    first = loader.load(LoadAssignment(1, 1, 1, 3))
    bad = next(p for p in first.tensors if p.name == "model.layers.2.mlp.up_proj.weight")
    assert loader.arena is not None
    loader.arena.buf[bad.arena_offset + 100] ^= 0x01  # a bit flipped in memory since validation
    loaded = loader.load(LoadAssignment(2, 1, 2, 4))
    assert f"{bad.name} as held in memory does not match the manifest (chunk 0): read from the source" in (
        caplog.text
    )
    kept, _, read = _kept_and_read(caplog)
    assert kept == len(_block_tensors(model, 2)) - 1 and read == len(loaded.tensors) - kept
    _assert_arena_is_the_source(loader, loaded, model)


def test_without_memory_for_both_arenas_everything_is_read_again(
    make_loader, model, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="butterfly.loader")
    loader = make_loader(model)
    loader.load(LoadAssignment(1, 1, 1, 3))
    monkeypatch.setattr(loader_process, "meminfo", lambda field: 1 << 20)
    loaded = loader.load(LoadAssignment(2, 1, 2, 4))
    assert "not enough memory to hold the previous range beside the new one" in caplog.text
    assert _kept_and_read(caplog) == (0, 0, len(loaded.tensors))
    _assert_arena_is_the_source(loader, loaded, model)


def _landed(loader: Loader, epoch: int) -> tuple[Landing, list[int]]:
    """The ``Landing`` of ``epoch``'s load and every tensor index its ``TensorsLanded`` named, in order."""
    sent = cast(Recorder, loader.chan).sent
    (landing,) = [m for m in sent if isinstance(m, Landing) and m.epoch == epoch]
    indices = [i for m in sent if isinstance(m, TensorsLanded) and m.epoch == epoch for i in m.indices]
    return landing, indices


def _check_landed_bytes(loader: Loader, model: Path) -> None:
    """At the moment each ``TensorsLanded`` is sent, the tensors it names must already be the model's
    bytes in the arena: what the validator hashes then is what the node serves."""
    digests = {t.name: t.blake3 for t in read_manifest(model / MANIFEST_FILE).tensors}
    landing: list[Landing] = []

    def check(msg: object) -> None:
        if isinstance(msg, Landing):
            landing.append(msg)
        elif isinstance(msg, TensorsLanded):
            assert loader.arena is not None
            for i in msg.indices:
                p = landing[-1].tensors[i]
                got = blake3.blake3(loader.arena.buf[p.arena_offset : p.arena_offset + p.length]).hexdigest()
                assert got == digests[p.name], f"{p.name} told landed before its bytes were right"

    cast(Recorder, loader.chan).on_send = check


def test_a_load_tells_the_validator_each_tensor_once_as_it_lands(make_loader, model) -> None:  # type: ignore[no-untyped-def]
    """What the validator hashes beside the stream (validator/follow.py): the load's placements first,
    then every tensor exactly once, each only once its bytes are right, all before the load is
    reported."""
    loader = make_loader(model)
    _check_landed_bytes(loader, model)
    loaded = loader.load(LoadAssignment(1, 1, 0, 4))
    landing, indices = _landed(loader, 1)
    assert landing.arena_name == loaded.arena_name and landing.tensors == loaded.tensors
    assert sorted(indices) == list(range(len(loaded.tensors)))
    sent = cast(Recorder, loader.chan).sent
    assert sent.index(landing) < min(k for k, m in enumerate(sent) if isinstance(m, TensorsLanded))
    # A re-plan's load: the kept tensors (copied from the old arena) and the gained ones alike.
    second = loader.load(LoadAssignment(2, 1, 2, 4))
    landing, indices = _landed(loader, 2)
    assert landing.tensors == second.tensors and sorted(indices) == list(range(len(second.tensors)))


def test_a_tensor_that_failed_its_copy_lands_only_once_read_again(make_loader, model) -> None:  # type: ignore[no-untyped-def]
    """A kept tensor whose old bytes do not match is read from the source: it is told landed once, after
    that read, never while its bad copy was in the arena."""
    loader = make_loader(model)
    first = loader.load(LoadAssignment(1, 1, 1, 3))
    bad = next(p for p in first.tensors if p.name == "model.layers.2.mlp.up_proj.weight")
    assert loader.arena is not None
    loader.arena.buf[bad.arena_offset + 100] ^= 0x01
    _check_landed_bytes(loader, model)
    loaded = loader.load(LoadAssignment(2, 1, 2, 4))
    _, indices = _landed(loader, 2)
    assert sorted(indices) == list(range(len(loaded.tensors)))
