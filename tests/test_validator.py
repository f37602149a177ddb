"""The validator's verdicts on a real shared-memory arena: every way the bytes can be wrong is named
(tensor, layer, offset, expected and found digest), and no error of its own hides a verdict."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import xxhash

from butterfly.board import Board, ValidatorSection
from butterfly.board.shm import Segment, create_segment, open_segment_count, unlink_segment
from butterfly.ipc import (
    ChunkDigest,
    Failed,
    Landing,
    Loaded,
    TensorPlacement,
    TensorsLanded,
    ValidateArena,
    Validated,
)
from butterfly.loader.process import place
from butterfly.supervisor.childproc import ChildContext
from butterfly.validator import check
from butterfly.validator import process as validator
from butterfly.validator.follow import Follow
from butterfly.weights.layout import LayerRange, load_layout
from butterfly.weights.manifest import MANIFEST_FILE, Manifest, read_manifest


class Arena:
    """What the loader leaves for blocks [start, stop): the bytes, placements and chunk digests."""

    def __init__(self, model: Path, manifest: Manifest, r: LayerRange, name: str) -> None:
        tensors = load_layout(model).tensors_for_blocks(r)
        self.placements, size = place(tensors, manifest)
        self.seg: Segment = create_segment(name, size)
        self.chunks: list[ChunkDigest] = []
        for t, p in zip(tensors, self.placements, strict=True):
            with open(model / t.file, "rb") as f:
                f.seek(t.offset)
                self.seg.buf[p.arena_offset : p.arena_offset + p.length] = f.read(t.length)
            for off in range(0, p.length, manifest.chunk_bytes):
                n = min(manifest.chunk_bytes, p.length - off)
                a = p.arena_offset + off
                self.chunks.append(ChunkDigest(a, n, xxhash.xxh3_64_intdigest(self.seg.buf[a : a + n])))
        self.cmd = ValidateArena(1, Loaded(1, r.start, r.stop, name, size, self.placements, self.chunks, {}))

    def flip(self, at: int) -> None:
        self.seg.buf[at] ^= 0x40


Env = tuple[ChildContext, Manifest, str]


@pytest.fixture
def env(model_dir: Path) -> Iterator[Env]:
    base = f"butterfly-tv{os.getpid()}-{os.urandom(3).hex()}"
    board = Board.create(f"{base}-board", "tv")
    ctx = cast(ChildContext, SimpleNamespace(board=board))
    segments_before = open_segment_count()
    yield ctx, read_manifest(model_dir / MANIFEST_FILE), f"{base}-arena"
    board.close()
    board.unlink()
    unlink_segment(f"{base}-arena")
    # Every arena the validator mapped was unmapped again (the board is closed above).
    assert open_segment_count() == segments_before - 1


def test_a_clean_arena_gives_the_manifests_unit_digests(env: Env, model_dir: Path) -> None:
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(0, 4), name)
    try:
        got = validator.answer(ctx, arena.cmd)
    finally:
        arena.seg.close()
    assert isinstance(got, Validated)
    assert [d.hex() for d in got.unit_digests] == [manifest.units[u].digest for u in got.units]
    assert got.units == list(range(manifest.num_units))


def test_a_byte_flipped_in_the_arena_is_named_not_hidden_by_a_buffer_error(env: Env, model_dir: Path) -> None:
    # Regression: the chunk check raised with the arena view in its frame; closing the mapping then
    # raised BufferError, which replaced the mismatch and crashed the child.
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(1, 3), name)
    victim = next(p for p in arena.placements if p.name == "model.layers.2.mlp.up_proj.weight")
    assert victim.length > manifest.chunk_bytes + 5
    at = victim.arena_offset + manifest.chunk_bytes + 5
    arena.flip(at)
    try:
        got = validator.answer(ctx, arena.cmd)
    finally:
        arena.seg.close()
    assert isinstance(got, Failed) and got.what == "validate"
    record = next(t for t in manifest.tensors if t.name == victim.name)
    assert "the weights in memory for blocks 1-2 are not the model's: 1 tensor(s) differ" in got.reason
    assert f"tensor {victim.name} (layer 2, arena offset {victim.arena_offset})" in got.reason
    tail = victim.length - manifest.chunk_bytes  # the flip is in the tensor's second, last chunk
    assert f"at byte {manifest.chunk_bytes} ({tail}-byte chunk" in got.reason
    assert f"xxh3 expected {record.chunks[1]:016x}" in got.reason
    assert f"BLAKE3 expected {record.blake3}, found " in got.reason
    assert ctx.board.read(ValidatorSection).mismatches == 1


def test_chunk_digests_rewritten_to_match_tampered_bytes_are_caught_by_the_tensor_digest(
    env: Env, model_dir: Path
) -> None:
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(0, 1), name)
    victim = arena.placements[0]
    arena.flip(victim.arena_offset + 7)
    # The loader checked its chunks against a manifest whose chunk digests were rewritten: they match
    # the tampered bytes. Only the per-tensor BLAKE3 (which the Merkle root covers) can tell.
    buf = arena.seg.buf
    chunks = [
        ChunkDigest(
            c.arena_offset,
            c.length,
            xxhash.xxh3_64_intdigest(buf[c.arena_offset : c.arena_offset + c.length]),
        )
        for c in arena.chunks
    ]
    loaded = Loaded(1, 0, 1, name, arena.seg.size, arena.placements, chunks, {})
    try:
        got = validator.answer(ctx, ValidateArena(1, loaded))
    finally:
        arena.seg.close()
    assert isinstance(got, Failed)
    assert f"tensor {victim.name} (embed, arena offset 0) (every chunk matches" in got.reason
    assert f"BLAKE3 expected {victim.blake3.hex()}, found " in got.reason


def test_without_manifest_digests_the_chunks_still_catch_a_change(env: Env, model_dir: Path) -> None:
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(3, 4), name)
    bare = [TensorPlacement(p.name, p.unit, p.arena_offset, p.length) for p in arena.placements]
    victim = bare[-1]
    arena.flip(victim.arena_offset + victim.length - 1)
    loaded = Loaded(1, 3, 4, name, arena.seg.size, bare, arena.chunks, {})
    try:
        got = validator.answer(ctx, ValidateArena(1, loaded))
    finally:
        arena.seg.close()
    assert isinstance(got, Failed)
    assert f"tensor {victim.name} (head, arena offset {victim.arena_offset}) at byte" in got.reason
    assert "BLAKE3" not in got.reason  # nothing to compare it with


def test_a_vanished_or_short_arena_is_named(env: Env, model_dir: Path) -> None:
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(0, 2), name)
    arena.seg.close()
    unlink_segment(name)
    got = validator.answer(ctx, arena.cmd)
    assert isinstance(got, Failed)
    assert got.reason == f"the arena {name} of blocks 0-1 is gone (its loader exited)"
    short = create_segment(name, 4096)
    short.close()
    got = validator.answer(ctx, arena.cmd)
    assert isinstance(got, Failed)
    assert got.reason.startswith(f"the arena {name} is 4096 bytes; the tensors of blocks 0-1 need ")


def test_an_error_of_the_validator_itself_is_reported_as_such(
    env: Env, model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(0, 1), name)

    def broken(*args: object, **kw: object) -> object:
        raise RuntimeError("out of threads")

    monkeypatch.setattr(validator, "digest_arena", broken)
    try:
        got = validator.answer(ctx, arena.cmd)
    finally:
        arena.seg.close()
    assert isinstance(got, Failed)
    assert got.reason == "the validator could not check the weights: RuntimeError: out of threads"
    assert "validation of epoch 1 failed: the validator could not check" in caplog.text


# ---- hashing beside the stream (butterfly.validator.follow) -----------------------------------------


def _follow(arena: Arena, name: str, landed: list[int]) -> Follow:
    """A follow of ``arena``'s load with ``landed`` told landed and hashed."""
    follow = Follow(Landing(1, name, arena.placements), threads=2)
    follow.landed(TensorsLanded(1, landed))
    follow.landed(TensorsLanded(7, [0]))  # another epoch's: ignored
    while follow.step(max_bytes=1 << 16):
        pass
    return follow


def _validate_followed(ctx: ChildContext, arena: Arena, follow: Follow) -> Validated | Failed:
    """The validation of ``arena``'s load as the supervisor asks for it after following it; the follow
    and the arena are closed after."""
    try:
        return validator.answer(ctx, ValidateArena(1, arena.cmd.loaded, follow=True), follow)
    finally:
        follow.close()
        arena.seg.close()


def _count_hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tensors the validation itself hashes from now on."""
    hashed: list[str] = []
    real = check.digest_tensors

    def counting(buf: memoryview, tensors: list[TensorPlacement], threads: int) -> list[bytes]:
        hashed.extend(t.name for t in tensors)
        return real(buf, tensors, threads)

    monkeypatch.setattr(check, "digest_tensors", counting)
    return hashed


def test_a_followed_load_hashes_only_what_had_not_landed(
    env: Env, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(0, 4), name)
    half = list(range(0, len(arena.placements), 2))
    follow = _follow(arena, name, half)
    hashed = _count_hashed(monkeypatch)
    got = _validate_followed(ctx, arena, follow)
    assert isinstance(got, Validated)
    assert [d.hex() for d in got.unit_digests] == [manifest.units[u].digest for u in got.units]
    rest = [p.name for k, p in enumerate(arena.placements) if k not in half]
    assert sorted(hashed) == sorted(rest) and rest


def test_a_tensor_wrong_when_it_landed_is_named_as_ever(env: Env, model_dir: Path) -> None:
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(1, 3), name)
    victim = next(k for k, p in enumerate(arena.placements) if p.name == "model.layers.2.mlp.up_proj.weight")
    arena.flip(arena.placements[victim].arena_offset + 3)
    follow = _follow(arena, name, list(range(len(arena.placements))))
    got = _validate_followed(ctx, arena, follow)
    assert isinstance(got, Failed)
    assert "1 tensor(s) differ: tensor model.layers.2.mlp.up_proj.weight (layer 2" in got.reason
    assert "at byte 0 (" in got.reason


def test_digests_of_another_arena_file_or_without_follow_are_never_used(
    env: Env, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follow hashed the good bytes of one arena file. A load that replaced the file under the same
    name (same epoch, same placements) must be hashed whole, and so must a validation that does not say
    it followed (a repair's): a byte wrong there is found either way."""
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(1, 3), name)
    follow = _follow(arena, name, list(range(len(arena.placements))))
    arena.flip(arena.placements[0].arena_offset)  # after it was hashed: a "repair" case
    try:
        got = validator.answer(ctx, ValidateArena(1, arena.cmd.loaded, follow=False), follow)
        assert isinstance(got, Failed) and arena.placements[0].name in got.reason
        arena.seg.close()
        unlink_segment(name)
        again = Arena(model_dir, manifest, LayerRange(1, 3), name)  # a new file under the name
        again.flip(again.placements[0].arena_offset)
        try:
            hashed = _count_hashed(monkeypatch)
            got = validator.answer(ctx, ValidateArena(1, again.cmd.loaded, follow=True), follow)
        finally:
            again.seg.close()
    finally:
        follow.close()
        if arena.seg._mmap is not None:
            arena.seg.close()
    assert isinstance(got, Failed) and arena.placements[0].name in got.reason
    assert len(hashed) == len(arena.placements)


def test_a_byte_changed_after_it_was_hashed_is_still_caught_and_named(
    env: Env, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing as tensors land must not open a window: a flip between a tensor's landing and the load's
    report (warmup runs in between) is found by the xxh3 re-check of every chunk, and only that tensor
    is hashed again, so its mismatch reads as it always did."""
    ctx, manifest, name = env
    arena = Arena(model_dir, manifest, LayerRange(1, 3), name)
    follow = _follow(arena, name, list(range(len(arena.placements))))
    victim = next(p for p in arena.placements if p.name == "model.layers.2.mlp.up_proj.weight")
    arena.flip(victim.arena_offset + manifest.chunk_bytes + 5)
    hashed = _count_hashed(monkeypatch)
    got = _validate_followed(ctx, arena, follow)
    assert isinstance(got, Failed)
    where = f"(layer 2, arena offset {victim.arena_offset})"
    assert f"1 tensor(s) differ: tensor {victim.name} {where}" in got.reason
    assert f"at byte {manifest.chunk_bytes} (" in got.reason
    assert hashed == [victim.name]
