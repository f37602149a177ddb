"""The GPU path: the checksum's host reference and the plumbing always; the CuPy upload, the NVRTC
kernel and the warmup only where cupy sees a CUDA device (skipped otherwise: the CPU path, tested in
test_streamer.py, is what runs there)."""

from __future__ import annotations

import mmap
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from butterfly.loader import gpu
from butterfly.loader.gpu import checksum_host, padded, pieces

REPO = Path(__file__).resolve().parent.parent


def reference_checksum(data: bytes, first_word: int = 0) -> int:
    """The definition, word by word, in plain Python."""
    data = data + b"\0" * (-len(data) % 4)
    total = 0
    for i in range(len(data) // 4):
        w = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        total += w * (2 * (first_word + i) + 1)
    return total % (1 << 64)


@dataclass(frozen=True)
class P:
    name: str
    arena_offset: int
    length: int


def test_checksum_host_matches_the_definition() -> None:
    rng = random.Random(5)
    for n in [0, 1, 2, 3, 4, 5, 7, 8, 9, 1000, 4097]:
        b = rng.randbytes(n)
        assert checksum_host(b) == reference_checksum(b), n
        assert checksum_host(b, first_word=12345) == reference_checksum(b, 12345), n


def test_checksum_known_values() -> None:
    assert checksum_host(b"") == 0
    assert checksum_host(b"\x01") == 1
    assert checksum_host(b"\x01\x00\x00\x00\x01") == 1 + 3
    assert checksum_host(b"\xff" * 8) == 0xFFFFFFFF * 1 + 0xFFFFFFFF * 3
    # Wraps mod 2**64 like the device's unsigned long long.
    big = np.full(1 << 16, 0xFFFFFFFF, dtype="<u4").tobytes()
    assert checksum_host(big) == reference_checksum(big)


def test_checksum_of_chunks_adds_up_to_the_tensor() -> None:
    b = random.Random(6).randbytes(3 * 65536 + 10)
    parts = [checksum_host(b[o : o + n], first_word=o // 4) for o, n in pieces(0, len(b), 65536)]
    assert sum(parts) % (1 << 64) == checksum_host(b)


def test_checksum_catches_moved_words_and_single_flips() -> None:
    b = bytearray(random.Random(8).randbytes(4096))
    base = checksum_host(b)
    swapped = bytearray(b)
    swapped[0:4], swapped[4:8] = b[4:8], b[0:4]
    assert b[0:4] == b[4:8] or checksum_host(swapped) != base
    for at in (0, 1, 2047, 4095):
        flipped = bytearray(b)
        flipped[at] ^= 0x80
        assert checksum_host(flipped) != base


def test_checksum_host_steps_through_long_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_HOST_STEP_WORDS", 3)
    b = random.Random(9).randbytes(101)
    assert checksum_host(b) == reference_checksum(b)
    arena = mmap.mmap(-1, 4096)
    try:
        arena[:101] = b
        assert checksum_host(arena[:101]) == reference_checksum(b)
        with memoryview(arena)[:101] as view:
            assert checksum_host(view) == reference_checksum(b)
    finally:
        arena.close()


def test_padding_and_pieces() -> None:
    assert [padded(n) for n in (0, 1, 4, 5, 8)] == [4, 4, 4, 8, 8]
    assert list(pieces(10, 25, 10)) == [(10, 10), (20, 10), (30, 5)]
    assert list(pieces(0, 0, 10)) == []


def test_index_locates_chunks_inside_one_tensor() -> None:
    idx = gpu._Index([P("b", 100, 50), P("a", 0, 64), P("c", 150, 0), P("d", 192, 8)])
    assert idx.locate(0, 64) == (P("a", 0, 64), 0)
    assert idx.locate(120, 30) == (P("b", 100, 50), 20)
    assert idx.locate(196, 4) == (P("d", 192, 8), 4)
    for off, n in [(60, 8), (64, 1), (140, 20), (200, 1), (-1, 1)]:
        with pytest.raises(ValueError, match="not inside one tensor"):
            idx.locate(off, n)


def test_cpu_path_never_imports_cupy() -> None:
    code = (
        "import sys; import butterfly.loader.gpu as g, butterfly.loader.streamer, butterfly.hashing; "
        "g.checksum_host(b'abc'); print('cupy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gpu_available_never_raises() -> None:
    assert gpu.gpu_available() in (True, False)


# --- on a GPU ---------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not gpu.gpu_available(), reason="no cupy or no CUDA device: the CPU path runs")


@needs_gpu
def test_device_checksum_matches_the_host() -> None:
    import cupy as cp

    gpu.compile_kernels()
    rng = random.Random(10)
    for n in [4, 8, 1024, 4 * 257, (1 << 20) + 4, (64 << 20) + 12]:
        b = rng.randbytes(n)
        d = cp.asarray(np.frombuffer(b, dtype=np.uint8))
        got = int(gpu.checksum_device(d).get()[0])
        assert got == checksum_host(b), n


def _arena_with(placements: list[P], seed: int) -> tuple[mmap.mmap, dict[str, bytes]]:
    size = max(p.arena_offset + p.length for p in placements) + 4096
    arena = mmap.mmap(-1, size)
    rng = random.Random(seed)
    data = {}
    for p in placements:
        data[p.name] = rng.randbytes(p.length)
        arena[p.arena_offset : p.arena_offset + p.length] = data[p.name]
    return arena, data


@needs_gpu
@pytest.mark.parametrize("register", [True, False])
def test_upload_lands_every_byte_and_verifies(register: bool) -> None:
    placements = [P("w0", 0, 5_000_001), P("w1", 5_000_064, 3), P("w2", 5_000_128, (40 << 20) + 2)]
    arena, data = _arena_with(placements, 11)
    try:
        with gpu.GpuUploader(arena, placements, register=register, streams=3) as up:
            for p in placements:
                for off, n in pieces(p.arena_offset, p.length, 1 << 20):
                    up.submit(off, n)
            res = up.finish(placements)
        assert res.registered == register
        assert res.bytes_uploaded == sum(p.length for p in placements)
        for p in placements:
            assert res.tensors[p.name][: p.length].get().tobytes() == data[p.name]
            assert res.checksums[p.name] == checksum_host(data[p.name])
        del res
    finally:
        arena.close()  # BufferError if the uploader kept a reference to the arena


@needs_gpu
def test_a_corrupted_device_byte_is_named() -> None:
    placements = [P("model.layers.0.mlp.up_proj.weight", 0, 1 << 20)]
    arena, _ = _arena_with(placements, 12)
    try:
        with gpu.GpuUploader(arena, placements) as up:
            up.submit(0, 1 << 20)
            for s in up.streams:
                s.synchronize()
            up.buffers[placements[0].name][12345] ^= 1
            import cupy as cp

            cp.cuda.Stream.null.synchronize()  # the flip ran on the default stream
            with pytest.raises(gpu.GpuVerifyError, match="up_proj.weight"):
                up.finish(placements)
    finally:
        arena.close()


@needs_gpu
def test_upload_overlaps_the_stream_and_warms_up(tmp_path: Path) -> None:
    from butterfly.loader.streamer import ReadJob, open_files, stream_into
    from butterfly.model.layout import LayerRange, load_layout
    from butterfly.model.testmodel import make_test_model

    model = make_test_model(tmp_path / "m", layers=2, hidden=128, vocab=512, shards=1, dtype="bfloat16")
    layout = load_layout(model)
    tensors = layout.tensors_for_blocks(LayerRange(0, 2))
    placements, off = [], 0
    for t in tensors:
        off = (off + 63) // 64 * 64
        placements.append(P(t.name, off, t.length))
        off += t.length
    arena = mmap.mmap(-1, off)
    try:
        jobs = [
            ReadJob(t.file, t.offset, t.length, p.arena_offset, t.name)
            for t, p in zip(tensors, placements, strict=True)
        ]
        with open_files(model, {t.file for t in tensors}) as fds, gpu.GpuUploader(arena, placements) as up:
            stream_into(
                jobs, arena, fds, chunk_bytes=1 << 16,
                on_chunk=lambda r: up.submit(r.chunk.arena_offset, r.chunk.length),
            )  # fmt: skip
            res = up.finish(placements)
        stats = gpu.gpu_warmup(res, tensors)
        assert stats.matmuls > 0 and stats.units >= 2
        del res
    finally:
        arena.close()
