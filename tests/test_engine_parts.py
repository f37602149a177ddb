"""engine.kvcache, engine.sampler and engine.weights on their own (no transformers needed)."""

from __future__ import annotations

import concurrent.futures
import os
import uuid
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from butterfly.board.shm import create_segment, unlink_segment
from butterfly.engine import model
from butterfly.engine.config import ModelConfig
from butterfly.engine.kvcache import KVCache, KVCacheFull
from butterfly.engine.model import SeqChunk
from butterfly.engine.sampler import SamplingParams, SeqSampler, sample_batch
from butterfly.engine.weights import arena_weights, tensor_view
from butterfly.ipc import TensorPlacement
from butterfly.weights.layout import TensorEntry

CFG = ModelConfig.from_json(
    {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 1000,
    },
    "test",
)


def test_kv_budget_is_enforced_with_reasons() -> None:
    # Blocks 1..2: 2 layers x (k, v) x 2 kv heads x 16 dims x 2 bytes = 256 bytes per token.
    cache = KVCache(CFG, 1, 3, budget_bytes=256 * 100, dtype=torch.bfloat16)
    assert cache.bytes_per_token == 256
    cache.reserve(1, 60)
    st = cache.stats()
    assert (st.bytes_in_use, st.bytes_total, st.sequences, st.tokens_reserved) == (256 * 60, 256 * 100, 1, 60)
    with pytest.raises(KVCacheFull) as e:
        cache.reserve(2, 50)
    assert e.value.reason == "in_use" and e.value.seq_id == 2
    assert "15360 of 25600 bytes are in use by 1 sequences" in str(e.value)
    with pytest.raises(KVCacheFull) as e:
        cache.reserve(3, 101)
    assert e.value.reason == "budget" and "more than the whole budget" in str(e.value)
    cache.reserve(2, 40)  # exactly fills the budget
    assert cache.stats().bytes_in_use == 256 * 100
    with pytest.raises(KVCacheFull):
        cache.reserve(4, 1)
    cache.free(1)
    cache.free(1)  # a second free (a cancel racing a finish) is harmless
    cache.reserve(4, 60)
    assert cache.stats().sequences == 2 and cache.stats().bytes_in_use == 256 * 100
    assert cache.capacity(4) == 60 and cache.length(4) == 0 and 4 in cache and 1 not in cache


def test_kv_reserve_refuses_bad_requests() -> None:
    cache = KVCache(CFG, 0, 4, budget_bytes=1 << 30, dtype=torch.float32)
    cache.reserve(1, 10)
    with pytest.raises(ValueError, match="already holds a reservation"):
        cache.reserve(1, 10)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        cache.reserve(2, 0)
    with pytest.raises(ValueError, match="exceed the model's context of 1000"):
        cache.reserve(2, 1001)
    with pytest.raises(ValueError, match="not within the model's 4"):
        KVCache(CFG, 2, 5, 1, torch.float32)


def test_sampling_params_are_checked() -> None:
    for bad in [
        {"temperature": -1.0},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": -1},
    ]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]
    assert SamplingParams(temperature=0).greedy


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    samplers = [SeqSampler(SamplingParams(temperature=0.0)) for _ in range(2)]
    assert sample_batch(logits, samplers) == [1, 0]
    assert samplers[0](logits[0]) == 1


def test_seeded_sequences_are_reproducible_whatever_their_batch() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = [SeqSampler(params)(logits) for _ in range(1)]
    a, b = SeqSampler(params), SeqSampler(SamplingParams(temperature=1.0, seed=99))
    draws_a = []
    for _ in range(20):
        row = sample_batch(torch.stack([logits, logits]), [a, b])
        draws_a.append(row[0])
    solo = SeqSampler(params)
    assert draws_a == [solo(logits) for _ in range(20)]
    assert alone[0] == draws_a[0]


def test_temperature_and_top_p_shape_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = SeqSampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    counts = Counter(s(logits) for _ in range(2000))
    # top_p 0.7 keeps {0, 1} (0.5 + 0.3 >= 0.7); renormalised 0.625 / 0.375.
    assert set(counts) == {0, 1}
    assert 0.55 < counts[0] / 2000 < 0.70
    hot = SeqSampler(SamplingParams(temperature=100.0, seed=0))
    spread = Counter(hot(logits) for _ in range(2000))
    assert set(spread) == {0, 1, 2, 3} and min(spread.values()) > 350  # nearly uniform
    # A tiny top_p keeps only the most likely token, whatever the temperature.
    only = SeqSampler(SamplingParams(temperature=5.0, top_p=0.01, seed=0))
    assert {only(logits) for _ in range(50)} == {0}


def test_the_smallest_temperature_and_top_p_sample_the_top_token() -> None:
    """Any temperature > 0 and top_p > 0 is valid; the tiniest must not turn the logits into inf or
    keep no token at all (torch.multinomial then raises, failing the whole step)."""
    logits = torch.tensor([2.0, 9.0, -3.0, 8.5])
    for t, top_p in [(5e-324, 1.0), (1e-40, 1.0), (1e-300, 0.5), (2.0, 5e-324), (1e-45, 1e-45)]:
        s = SeqSampler(SamplingParams(temperature=t, top_p=top_p, seed=0))
        assert {s(logits) for _ in range(20)} == {1}, (t, top_p)
    assert sample_batch(
        torch.stack([logits, -logits]), [SeqSampler(SamplingParams(temperature=1e-320)) for _ in range(2)]
    ) == [1, 2]


def test_arena_weights_are_views_of_shared_memory() -> None:
    name = f"bf-engine-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    seg = create_segment(name, 4096)
    try:
        buf = memoryview(seg.buf)
        src = torch.arange(12, dtype=torch.float32).to(torch.bfloat16)
        buf[128 : 128 + 24] = src.view(torch.uint8).numpy().tobytes()
        entries = [TensorEntry("w", "f", 0, 24, "BF16", (3, 4), 1)]
        weights = arena_weights(buf, [TensorPlacement("w", 1, 128, 24)], entries)
        w = weights["w"]
        assert w.dtype == torch.bfloat16 and w.shape == (3, 4) and torch.equal(w.flatten(), src)
        # A view, not a copy: a byte written to the arena shows in the tensor.
        buf[128:130] = torch.tensor([7.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
        assert float(w[0, 0]) == 7.0
        with pytest.raises(ValueError, match="layout does not describe it"):
            arena_weights(buf, [TensorPlacement("x", 1, 0, 24)], entries)
        with pytest.raises(ValueError, match="26 bytes placed, the layout says 24"):
            arena_weights(buf, [TensorPlacement("w", 1, 0, 26)], entries)
        with pytest.raises(ValueError, match="cannot compute in I8"):
            tensor_view(buf, 0, "I8", [4])
        buf.release()
        # The tensors hold the mapping: unmapping under them is refused, never a dangling pointer.
        with pytest.raises(BufferError):
            seg.close()
        del w, weights
    finally:
        seg.close()
        unlink_segment(name)


# ---- linear: long prompt chunks of a half-precision weight in float32 tiles -------------------------


def _widen_from(monkeypatch: pytest.MonkeyPatch, per_thread: int) -> None:
    """Chunks of ``per_thread`` rows per thread or more are widened, whichever kernel is in use."""
    monkeypatch.setattr(model, "_WIDEN_ROWS_PER_THREAD", per_thread)
    monkeypatch.setattr(model, "_WIDEN_ROWS_PER_THREAD_NATIVE", per_thread)


def _rows(*sizes: int) -> tuple[list[SeqChunk], model._Rows]:
    chunks = [SeqChunk(i, 0, n) for i, n in enumerate(sizes)]
    return chunks, model._Rows.of(chunks, torch.bfloat16, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_linear_agrees_with_torch_and_a_float64_reference(
    dtype: torch.dtype, bias: bool, monkeypatch: pytest.MonkeyPatch, half_kernel: str
) -> None:
    _widen_from(monkeypatch, 1)
    monkeypatch.setattr(model, "_WIDEN_TILE_ELEMS", 131 * 1000)  # 131 rows a tile: 700 end in a part
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # chunks of 4 rows or more widen
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(700, 1000, generator=gen) / 30).to(dtype)
    b = torch.randn(700, generator=gen).to(dtype) if bias else None
    chunks = [SeqChunk(i, 0, n) for i, n in enumerate((37, 1, 3, 8, 1))]
    rows = model._Rows.of(chunks, dtype, torch.device("cpu"))
    assert rows.wide == ((0, 37), (41, 8)) and rows.narrow is not None
    assert rows.narrow.tolist() == [37, 38, 39, 40, 49]
    x = torch.randn(50, 1000, generator=gen).to(dtype)
    got = model.linear(x, w, b, rows)
    assert got.dtype == dtype and got.shape == (50, 700)
    # The narrow rows are rows_linear's, bit for bit; the wide ones round once from float32 too.
    assert torch.equal(got[rows.narrow], model.rows_linear(x[rows.narrow], w, b))
    tol = {"rtol": 2**-7 if dtype is torch.bfloat16 else 2**-10, "atol": 1e-3}
    torch.testing.assert_close(got, F.linear(x, w, b), **tol)  # type: ignore[arg-type]
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    torch.testing.assert_close(got, want.to(dtype), **tol)  # type: ignore[arg-type]


def test_a_widened_chunk_comes_out_the_same_whatever_shares_its_step(
    monkeypatch: pytest.MonkeyPatch, half_kernel: str
) -> None:
    _widen_from(monkeypatch, 1)
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(2048, 768, generator=gen) / 30).to(torch.bfloat16)
    x = torch.randn(70, 768, generator=gen).to(torch.bfloat16)
    alone = model.linear(x[:23], w, None, _rows(23)[1])
    for sizes in [(23, 47), (23, 1, 46), (23, 2, 2, 43)]:
        assert torch.equal(model.linear(x, w, None, _rows(*sizes)[1])[:23], alone), sizes
    # Decode rows do not depend on their step either.
    one = model.linear(x[:1], w, None, _rows(1)[1])
    assert torch.equal(model.linear(x[:9], w, None, _rows(*[1] * 9)[1])[:1], one)


def test_linear_widens_a_tile_never_the_weight_and_only_long_chunks_of_half_weights() -> None:
    least = model.widen_least()
    cpu = torch.device("cpu")
    assert model._Rows.of([SeqChunk(0, 0, least - 1)], torch.bfloat16, cpu).wide == ()
    assert model._Rows.of([SeqChunk(0, 0, least)], torch.float32, cpu).wide == ()
    assert model._Rows.of([SeqChunk(0, 0, least)], torch.bfloat16, torch.device("meta")).wide == ()
    rows = model._Rows.of([SeqChunk(0, 0, least)], torch.float16, cpu)
    assert rows.wide == ((0, least),) and rows.narrow is None
    w = torch.randn(4096, 512).to(torch.float16)
    model._scratch.buf = None
    model.linear(torch.randn(least, 512).to(torch.float16), w, None, rows)
    scratch = model._scratch.buf
    assert scratch is not None and scratch.dtype == torch.float32
    assert scratch.numel() <= model._WIDEN_TILE_ELEMS < w.numel()


def test_linear_scratch_is_per_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    _widen_from(monkeypatch, 0)
    gen = torch.Generator().manual_seed(5)
    ws = [(torch.randn(512, 256 + 64 * i, generator=gen) / 16).to(torch.bfloat16) for i in range(4)]
    xs = [torch.randn(6, 256 + 64 * i, generator=gen).to(torch.bfloat16) for i in range(4)]
    rows = _rows(6)[1]
    alone = [model.linear(x, w, None, rows) for x, w in zip(xs, ws, strict=True)]

    def run(i: int) -> bool:
        return all(torch.equal(model.linear(xs[i], ws[i], None, rows), alone[i]) for _ in range(50))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(4)))


# ---- rows_linear: the native kernel for rows that must not depend on each other ---------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [5, 64, 777, 1000])  # all tail, no tail, a tail of 1 after the steps of 8
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_rows_linear_agrees_with_torch_and_a_float64_reference(
    dtype: torch.dtype, k: int, bias: bool, half_kernel: str
) -> None:
    gen = torch.Generator().manual_seed(k)
    w = (torch.randn(300, k, generator=gen) / 30).to(dtype)
    b = torch.randn(300, generator=gen).to(dtype) if bias else None
    x = torch.randn(9, k, generator=gen).to(dtype)
    got = model.rows_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (9, 300)
    tol = {"rtol": 2**-7 if dtype is torch.bfloat16 else 2**-10, "atol": 1e-3}
    torch.testing.assert_close(got, F.linear(x, w, b), **tol)  # type: ignore[arg-type]
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    torch.testing.assert_close(got, want.to(dtype), **tol)  # type: ignore[arg-type]


def test_rows_linear_gives_a_row_the_same_bits_in_any_batch_and_on_any_thread_count(half_kernel: str) -> None:
    gen = torch.Generator().manual_seed(3)
    # 2045 outputs: panels of 8 columns end in a part panel, and each thread's range starts mid-panel.
    w = (torch.randn(2045, 768, generator=gen) / 30).to(torch.bfloat16)
    b = torch.randn(2045, generator=gen).to(torch.bfloat16)
    x = torch.randn(16, 768, generator=gen).to(torch.bfloat16)
    # Every block height 1-8 (each its own tile shape), alone and after a full block of 8.
    slices = [(5, 5 + n) for n in range(1, 9)] + [(0, 8 + n) for n in range(1, 9)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = model.rows_linear(x, w, b)
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(model.rows_linear(x, w, b), whole), t
            for lo, hi in slices:
                assert torch.equal(model.rows_linear(x[lo:hi], w, b), whole[lo:hi]), (t, lo, hi)
    finally:
        torch.set_num_threads(threads)


def test_products_of_one_x_give_each_the_bits_of_its_own_call(half_kernel: str) -> None:
    """q, k and v (gate and up) in one call: their columns share one parallel region, and each comes
    out as its own call makes it, on any thread count, with a bias or without."""
    gen = torch.Generator().manual_seed(5)
    # Outputs that are not multiples of 8 either: a thread's range starts mid-panel, or mid-weight.
    shapes = [(77, 200), (19, 200), (19, 200)]
    ws = [(torch.randn(n, k, generator=gen) / 10).to(torch.bfloat16) for n, k in shapes]
    bs = [
        torch.randn(77, generator=gen).to(torch.bfloat16),
        None,
        torch.randn(19, generator=gen).to(torch.bfloat16),
    ]
    x = torch.randn(6, 200, generator=gen).to(torch.bfloat16)
    alone = [model.rows_linear(x, w, b) for w, b in zip(ws, bs, strict=True)]
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3, 5):
            torch.set_num_threads(t)
            got = model._Products.of(*zip(ws, bs, strict=True)).rows(x)
            assert all(torch.equal(g, a) for g, a in zip(got, alone, strict=True)), t
    finally:
        torch.set_num_threads(threads)
    # More weights than one call takes: each its own call, the same products.
    assert all(torch.equal(g, alone[0]) for g in model._Products.of(*[(ws[0], bs[0])] * 5).rows(x))
    if half_kernel != "native":
        return  # torch multiplies no float32 rows by a bf16 weight
    # A weight the kernel does not take (float32): each weight its own call, torch's for that one.
    xf = x.float()
    mixed = model._Products.of((ws[0].float(), None), (ws[1], None)).rows(xf)
    assert torch.equal(mixed[0], F.linear(xf, ws[0].float()))
    assert torch.equal(mixed[1], model.rows_linear(xf, ws[1]))


def test_rows_linear_leaves_what_the_kernel_does_not_take_to_torch(half_kernel: str) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=gen)
    w32 = torch.randn(40, 64, generator=gen)
    assert torch.equal(model.rows_linear(x, w32), F.linear(x, w32))  # float32: torch's kernel
    strided = w32.t().contiguous().t().to(torch.bfloat16)  # not contiguous
    xb = x.to(torch.bfloat16)
    assert torch.equal(model.rows_linear(xb, strided), F.linear(xb, strided))
    # A mismatch is torch's clear error, never the kernel reading past the weight.
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model.rows_linear(xb[:, :60], w32.to(torch.bfloat16))
    with pytest.raises(RuntimeError):
        model.rows_linear(xb, w32.to(torch.bfloat16), torch.zeros(39, dtype=torch.bfloat16))


@pytest.mark.x86
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_kernel_rounds_its_output_as_torchs_to_does(dtype: torch.dtype, native_kernel: Any) -> None:
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(5, 100, generator=gen)
    x[0] *= 3e3  # outputs past fp16's range: inf, as .to() makes them
    w = torch.randn(70, 100, generator=gen).to(dtype)
    wide = torch.empty(5, 70)
    narrow = torch.empty(5, 70, dtype=dtype)
    for y, code in ((wide, 0), (narrow, model._KERNEL_DTYPES[dtype])):
        native_kernel.matmul(
            x.data_ptr(), 5, 100, w.data_ptr(), 0, y.data_ptr(), 70, dtype is torch.float16, 2, code
        )
    assert torch.equal(narrow, wide.to(dtype))
    assert dtype is torch.bfloat16 or narrow[0].isinf().any()
    with pytest.raises(ValueError, match="y_dtype=3"):
        native_kernel.matmul(x.data_ptr(), 5, 100, w.data_ptr(), 0, wide.data_ptr(), 70, False, 2, 3)


@pytest.mark.x86
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_kernel_reads_half_inputs_as_their_float32_values(dtype: torch.dtype, native_kernel: Any) -> None:
    """x and b of half precision are read as they are (x widened into the caller's scratch): the same
    bits as their float32 copies, with no torch operator to make those copies."""
    gen = torch.Generator().manual_seed(23)
    w = torch.randn(37, 203, generator=gen).to(dtype)
    x, b = torch.randn(9, 203, generator=gen).to(dtype), torch.randn(37, generator=gen).to(dtype)
    code, fp16 = model._KERNEL_DTYPES[dtype], dtype is torch.float16
    xf, bf, want = x.float(), b.float(), torch.empty(9, 37)
    native_kernel.matmul(xf.data_ptr(), 9, 203, w.data_ptr(), bf.data_ptr(), want.data_ptr(), 37, fp16, 2)
    scratch = torch.full((9 * 203,), float("nan"))
    got = torch.empty(9, 37)
    native_kernel.matmul(
        x.data_ptr(),
        9,
        203,
        w.data_ptr(),
        b.data_ptr(),
        got.data_ptr(),
        37,
        fp16,
        2,
        0,
        code,
        code,
        scratch.data_ptr(),
    )
    assert torch.equal(got, want)
    assert torch.equal(scratch.view(9, 203), xf)
    with pytest.raises(ValueError, match="scratch=0x0"):
        native_kernel.matmul(x.data_ptr(), 9, 203, w.data_ptr(), 0, got.data_ptr(), 37, fp16, 2, 0, code)
    # The engine's entry: the same product as from float32 rows, rounded once to x's dtype.
    assert torch.equal(model.rows_linear(x, w, b), want.to(dtype))
    assert model.rows_linear(x.double(), w).dtype == torch.float64


# ---- RMS norm and rotary embedding: one native call each (csrc/rowops.h) ----------------------------

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.x86
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "heads", "d"), [(1, 12, 64), (5, 3, 6), (40, 2, 128), (2, 2, 40)])
def test_rope_gives_the_bits_of_torchs_operators(
    dtype: torch.dtype, rows: int, heads: int, d: int, native_kernel: object
) -> None:
    gen = torch.Generator().manual_seed(rows * d + heads)
    x = (torch.randn(rows, heads, d, generator=gen) * 4).to(dtype)
    angle = torch.randn(rows, 1, d, generator=gen) * 3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    want = x * cos + model._rotate_half(x) * sin  # the plain twin, torch's operators
    given = x.clone()
    got = model.rope(given, cos, sin)
    assert got.data_ptr() == given.data_ptr()  # in place: no allocation
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.x86
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("n", [768, 771, 5])  # steps of 8 only, and a tail, and a tail only
def test_rms_norm_agrees_with_torchs_operators_and_gives_a_row_the_same_bits_in_any_batch(
    dtype: torch.dtype, n: int, native_kernel: object
) -> None:
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(9, n, generator=gen) * 3).to(dtype)
    x[4] *= 1e-3  # a small row: eps matters
    w = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    eps = 1e-5
    got = model.rms_norm(x, w, eps)
    xf = x.float()
    twin = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    exact = (w.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    assert got.dtype == dtype and got.shape == x.shape
    # Only the mean's summation order differs from torch's: an ulp of float32 at most, which the
    # rounding to a half dtype hides for nearly every element.
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(got, twin, rtol=tol, atol=0)
    torch.testing.assert_close(got, exact, rtol=2 * tol, atol=0)
    if dtype is not torch.float32:
        assert (got != twin).float().mean() < 0.01
    for i in range(x.shape[0]):
        assert torch.equal(model.rms_norm(x[i : i + 1], w, eps), got[i : i + 1]), i


def test_rms_norm_with_a_weight_of_another_dtype_promotes_as_torch_does(half_kernel: str) -> None:
    # A checkpoint may store its norms in float32 beside bf16 matrices: the kernel does not take them.
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    w = torch.rand(64, generator=gen) + 0.5
    got = model.rms_norm(x, w, 1e-6)
    xf = x.float()
    assert got.dtype == torch.float32
    assert torch.equal(got, w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype))


@pytest.mark.x86
def test_row_kernels_refuse_shapes_and_dtypes_they_do_not_compute(native_kernel: Any) -> None:
    t = torch.zeros(4, 8)
    p = t.data_ptr()
    for bad in [dict(d=7), dict(rows=0), dict(dtype=3)]:
        args = {"rows": 1, "heads": 1, "d": 8, "dtype": 0, **bad}
        with pytest.raises(ValueError, match="bad"):
            native_kernel.rope(p, p, p, args["rows"], args["heads"], args["d"], args["dtype"])
    for m, n, dtype in [(0, 8, 0), (1, 0, 0), (1, 8, -1)]:
        with pytest.raises(ValueError, match="bad"):
            native_kernel.rms_norm(p, p, p, m, n, dtype, 1e-5)
    # What the kernel does not take goes to torch's operators: angles broadcast over the rows, a
    # strided x.
    x = torch.randn(3, 2, 8)
    cs = torch.randn(1, 1, 8)
    assert torch.equal(model.rope(x.clone(), cs, cs), x * cs + model._rotate_half(x) * cs)
    wide = torch.randn(3, 2, 16)[..., :8]
    cs = torch.randn(3, 1, 8)
    assert torch.equal(model.rope(wide, cs, cs), wide * cs + model._rotate_half(wide) * cs)


# ---- decode attention: the native kernel for one-token chunks (csrc/attention.h) --------------------

_LAYERS, _CAP = 2, 32


def _decode_case(
    dtype: torch.dtype, heads: int, kv_heads: int, hd: int, positions: list[int], seed: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches [layers, 2, kv_heads, capacity, hd] holding random earlier keys and values, and a step's
    q [n, heads, hd], k and v [n, kv_heads, hd]."""
    gen = torch.Generator().manual_seed(seed)
    caches = [torch.randn(_LAYERS, 2, kv_heads, _CAP, hd, generator=gen).to(dtype) for _ in positions]
    n = len(positions)
    q, k, v = (torch.randn(n, h, hd, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads))
    return caches, q, k, v


def _native_attend(
    caches: list[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: list[int],
    layer: int,
    window: int | None,
) -> torch.Tensor:
    chunks = [SeqChunk(i, p, 1) for i, p in enumerate(positions)]
    decode = model._Decode.of(chunks, caches, q.dtype, k.shape[1], q.shape[2])
    assert decode is not None and decode.rows is None
    out = torch.empty(q.shape, dtype=q.dtype)
    decode.attend(q, k, v, layer, window, out)
    return out


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "hd"), [(4, 4, 64), (6, 2, 12), (8, 1, 20)])
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.x86
def test_decode_attention_agrees_with_sdpa_and_a_float64_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, hd: int, window: int | None, native_kernel: object
) -> None:
    positions, layer = [0, 7, 31], 1
    caches, q, k, v = _decode_case(dtype, heads, kv_heads, hd, positions, seed=hd + heads)
    want_caches = [c.clone() for c in caches]
    got = _native_attend(caches, q, k, v, positions, layer, window)
    for i, (c, p) in enumerate(zip(want_caches, positions, strict=True)):
        c[layer, 0, :, p] = k[i]
        c[layer, 1, :, p] = v[i]
    # The new keys and values are in place, nothing else moved.
    assert all(torch.equal(a, b) for a, b in zip(caches, want_caches, strict=True))
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for i, (c, p) in enumerate(zip(caches, positions, strict=True)):
        lo = 0 if window is None else max(0, p - window + 1)
        keys, vals = c[layer, 0, :, lo : p + 1], c[layer, 1, :, lo : p + 1]
        sdpa = F.scaled_dot_product_attention(
            q[i][:, None][None], keys[None], vals[None], scale=hd**-0.5, enable_gqa=True
        )[0, :, 0]
        torch.testing.assert_close(got[i], sdpa, rtol=0, atol=tol)
        rep = heads // kv_heads
        kd, vd = keys.double().repeat_interleave(rep, 0), vals.double().repeat_interleave(rep, 0)
        weights = torch.softmax((q[i].double()[:, None] * kd).sum(-1) * hd**-0.5, -1)
        exact = (weights[..., None] * vd).sum(1)
        torch.testing.assert_close(got[i].double(), exact, rtol=0, atol=tol)


@pytest.mark.x86
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_attention_rounds_its_float32_sums_once_into_the_dtype(
    dtype: torch.dtype, native_kernel: Any
) -> None:
    """The kernel sums in float32 and stores each output rounded to the step's dtype: the bits of the
    same step in float32 (its inputs are the half values, widened exactly), then .to(dtype)."""
    positions = [3, 30, 11]
    caches, q, k, v = _decode_case(dtype, 6, 2, 40, positions, seed=31)
    wide = _native_attend([c.float() for c in caches], q.float(), k.float(), v.float(), positions, 1, 4)
    got = _native_attend(caches, q, k, v, positions, 1, 4)
    assert got.dtype == dtype and torch.equal(got, wide.to(dtype))
    # A head wider than the kernel's stack buffer is left to torch; the kernel refuses it.
    widest = native_kernel.MAX_HEAD_DIM
    chunks = [SeqChunk(0, 3, 1)]
    assert (
        model._Decode.of(chunks, [torch.zeros(1, 2, 1, 4, widest + 8)], torch.float32, 1, widest + 8) is None
    )
    p = q.data_ptr()
    with pytest.raises(ValueError, match="bad shape"):
        native_kernel.decode_attention(p, p, p, 1, 1, 1, widest + 1, 0, p, p, p, 0, 0, 1.0, p, 1)


@pytest.mark.x86
def test_decode_attention_gives_a_sequence_the_same_bits_beside_any_others_and_on_any_thread_count(
    native_kernel: object,
) -> None:
    positions = [9, 30, 0, 17, 5]
    caches, q, k, v = _decode_case(torch.bfloat16, 12, 4, 64, positions, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = _native_attend([caches[0].clone()], q[:1], k[:1], v[:1], positions[:1], 1, None)
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            step = _native_attend([c.clone() for c in caches], q, k, v, positions, 1, None)
            assert torch.equal(step[:1], alone), t
    finally:
        torch.set_num_threads(threads)


def test_a_mixed_step_attends_its_one_token_chunks_natively_and_the_rest_as_before(half_kernel: str) -> None:
    chunks = [SeqChunk(0, 0, 3), SeqChunk(1, 4, 1), SeqChunk(2, 0, 2), SeqChunk(3, 9, 1)]
    kvs = [torch.zeros(_LAYERS, 2, 2, _CAP, 8) for _ in chunks]
    decode = model._Decode.of(chunks, kvs, torch.float32, 2, 8)
    if model.NATIVE is None:  # the plain twin (and all a CPU other than x86-64 has)
        assert decode is None  # torch's attention, a sequence at a time
        return
    assert decode is not None and decode.rows is not None
    assert decode.rows.tolist() == [3, 6]  # the rows of the one-token chunks in the step
    assert decode.pos.tolist() == [4, 9] and decode.capacity.tolist() == [_CAP, _CAP]
    assert decode.caches.tolist() == [kvs[1].data_ptr(), kvs[3].data_ptr()]
    # A step of a dtype the kernel does not compute is left whole to torch.
    assert model._Decode.of(chunks, [kv.double() for kv in kvs], torch.float64, 2, 8) is None


@pytest.mark.x86
def test_decode_attention_refuses_a_cache_of_another_shape(native_kernel: object) -> None:
    caches, q, k, v = _decode_case(torch.float32, 4, 2, 16, [3], seed=1)
    for bad, layer in [(caches[0][:, :, :1].contiguous(), 1), (caches[0], _LAYERS), (caches[0].half(), 1)]:
        with pytest.raises(ValueError, match="does not fit"):
            _native_attend([bad], q, k, v, [3], layer, None)
