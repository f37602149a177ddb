"""The GPU path: the checksum's host reference and the plumbing always; the CuPy upload, the NVRTC
kernel and the warmup only where cupy sees a CUDA device (skipped otherwise: the CPU path, tested in
test_streamer.py, is what runs there)."""

from __future__ import annotations

import gc
import mmap
import random
import subprocess
import sys
from collections.abc import Callable
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
        "import sys; import butterfly.loader.gpu as g, butterfly.weights.streamer, "
        "butterfly.weights.hashing; "
        "g.checksum_host(b'abc'); print('cupy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gpu_available_never_raises() -> None:
    assert gpu.gpu_available() in (True, False)


# --- on a GPU ---------------------------------------------------------------------------------------

_no_gpu = pytest.mark.skipif(not gpu.gpu_available(), reason="no cupy or no CUDA device: the CPU path runs")


def needs_gpu(test: Callable[..., None]) -> Callable[..., None]:
    """Runs only on a CUDA device; marked ``gpu``, the one kind of skip .ci/run accepts."""
    return pytest.mark.gpu(_no_gpu(test))


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


def _loaded_model(tmp_path: Path, dtype: str) -> tuple[Path, object, list, list, mmap.mmap]:
    """The test model's whole range in a fresh arena, as the loader's download step leaves it."""
    from butterfly.loader.process import place
    from butterfly.weights.layout import LayerRange, load_layout
    from butterfly.weights.testmodel import make_test_model

    model = make_test_model(tmp_path / "m", layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, dtype=dtype)
    layout = load_layout(model)
    tensors = layout.tensors_for_blocks(LayerRange(0, 2))
    placements, size = place(tensors)
    arena = mmap.mmap(-1, size)
    for t, p in zip(tensors, placements, strict=True):
        with open(model / t.file, "rb") as f:
            f.seek(t.offset)
            arena[p.arena_offset : p.arena_offset + p.length] = f.read(t.length)
    return model, layout, tensors, placements, arena


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_device_weights_are_views_in_the_stored_dtype(tmp_path: Path, dtype: str) -> None:
    """The views the GPU warmup and engine compute from (DLPack over the device copies) give the same
    tensors as the arena's, in the stored dtype: run here over numpy buffers, which speak DLPack too,
    laid out as the uploader lays out device buffers (padded to 4 bytes with zeros)."""
    import torch

    from butterfly.engine.weights import arena_weights
    from butterfly.loader.warmup import warmup_stage, warmup_weights

    _, layout, tensors, placements, arena = _loaded_model(tmp_path, dtype)
    try:
        raw = {}
        for p in placements:
            buf = np.zeros(padded(p.length), dtype=np.uint8)
            buf[: p.length] = np.frombuffer(arena, dtype=np.uint8, count=p.length, offset=p.arena_offset)
            raw[p.name] = buf
        result = gpu.GpuUploadResult(0, raw, {}, 0, 0.0, False)  # type: ignore[arg-type]
        views = gpu.device_weights(result, tensors)
        host = arena_weights(memoryview(arena), placements, tensors)
        assert views.keys() == host.keys()
        for name, v in views.items():
            assert v.dtype == host[name].dtype == {"float32": torch.float32, "float16": torch.float16,
                                                   "bfloat16": torch.bfloat16}[dtype]  # fmt: skip
            assert torch.equal(v, host[name]), name
            assert v.data_ptr() == raw[name].ctypes.data  # a view, not a copy
        a = warmup_weights(lambda: gpu.device_weights(result, tensors), layout.model_config, "cfg", (0, 2), 2)
        b = warmup_stage(memoryview(arena), placements, tensors, layout.model_config, "cfg", (0, 2), 2)
        assert a.dtype == b.dtype and a.logit_max == b.logit_max
        del views, host
    finally:
        gc.collect()
        arena.close()


def test_dlpack_view_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        gpu.dlpack_view(np.zeros(10, dtype=np.uint8), "F32", (3,))
    with pytest.raises(ValueError, match="cannot compute in I8"):
        gpu.dlpack_view(np.zeros(10, dtype=np.uint8), "I8", (3,))
    with pytest.raises(ValueError, match="flat uint8"):
        gpu.dlpack_view(np.zeros(10, dtype=np.float32), "F32", (3,))


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_upload_overlaps_the_stream_and_the_engine_warms_up_on_the_device(tmp_path: Path, dtype: str) -> None:
    """Chunks upload as they land; the engine then runs on the device copies, and its logits match the
    CPU engine's over the arena (fp32: 1e-4; bf16: 5e-2 relative to the logit scale)."""
    import torch

    from butterfly.engine.config import ModelConfig
    from butterfly.engine.generate import Pipeline
    from butterfly.engine.model import SeqChunk, StageModel
    from butterfly.engine.weights import arena_weights
    from butterfly.weights.streamer import ReadJob, open_files, stream_into

    model, layout, tensors, placements, arena = _loaded_model(tmp_path, dtype)
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
        stats = gpu.gpu_warmup(res, tensors, layout.model_config, "cfg", (0, 2), 2)
        assert stats.dtype == {"float32": "float32", "bfloat16": "bfloat16"}[dtype]
        cfg = ModelConfig.from_json(layout.model_config, "cfg")
        ids = torch.arange(0, 12) * 7 % cfg.vocab_size
        logits = []
        for weights, device in ((gpu.device_weights(res, tensors), "cuda:0"),
                                (arena_weights(memoryview(arena), placements, tensors), "cpu")):  # fmt: skip
            pipe = Pipeline([StageModel(cfg, weights, 0, 2, 2, device)], 1 << 20)
            pipe.reserve(0, 12)
            logits.append(pipe.step(ids, [SeqChunk(0, 0, 12)]).cpu())
            del pipe, weights
        tol = 1e-4 if dtype == "float32" else 5e-2 * float(logits[1].abs().max())
        assert torch.allclose(logits[0], logits[1], atol=tol, rtol=0), (logits[0] - logits[1]).abs().max()
        del res
    finally:
        gc.collect()
        arena.close()


def test_a_node_advertises_only_the_gpu_it_uses() -> None:
    """The loader places a node's range on one device: advertising the others' memory would let the
    planner hand it a range that fits only across all of them. ``gpu = "off"`` advertises none."""
    from butterfly.hardware import SERVING_DEVICE, GpuInfo, usable_gpus

    gpus = [GpuInfo(i, "H100", 80 << 30) for i in range(4)]
    assert usable_gpus(gpus, "auto") == [gpus[SERVING_DEVICE]]
    assert usable_gpus(gpus, "required") == [gpus[SERVING_DEVICE]]
    assert usable_gpus(gpus, "off") == []
    assert usable_gpus([], "auto") == []
