"""A Llama-family decoder stage: blocks [start, stop) over weight tensors it does not own.

Owns the maths of Llama, Mistral and Qwen2 (RMSNorm, grouped-query attention with RoPE and an
optional sliding window, SwiGLU MLP, the biases each variant has), written to match ``transformers``
operation for operation so fp32 logits agree to ~1e-5 and greedy tokens are identical. One
``forward`` runs several sequences at once, each a ``SeqChunk`` of new tokens at its own position:
prefill and decode chunks mix freely, which is what continuous batching needs.

Weights are whatever tensors the caller maps (views of the loader's arena, of mmap'd safetensors, or
GPU copies); the stage never copies or widens a whole weight, and computes in the weights' stored
dtype (bf16/fp16/fp32) except for the norms' and RoPE's float32 steps, as transformers does, and
for the matrix products of long prompt chunks on the CPU, which ``linear`` does in float32 tiles.

Must not: read files, know about processes or the network, or sample (``sampler`` does).
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from butterfly.engine.config import ModelConfig
from butterfly.engine.kvcache import KVCache

__all__ = ["SeqChunk", "StageModel", "WeightError"]

_MATMUL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class WeightError(ValueError):
    """A weight the stage needs is missing, has the wrong shape or dtype, or is not expected."""


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's new tokens in a step: positions ``[start_pos, start_pos + n_tokens)``."""

    seq_id: int
    start_pos: int
    n_tokens: int


@dataclass(frozen=True)
class _Block:
    index: int
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: _Products
    o: _Products
    gate_up: _Products
    down: _Products
    window: int | None


class _Weights:
    """Takes named tensors out of the mapping with their shape checked; remembers what it took."""

    def __init__(self, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.weights = weights
        self.device = device
        self.taken: set[str] = set()
        self.dtype: torch.dtype | None = None

    def take(self, name: str, shape: tuple[int, ...], *, matrix: bool = True) -> torch.Tensor:
        t = self.weights.get(name)
        if t is None:
            raise WeightError(f"weight {name} is missing")
        if tuple(t.shape) != shape:
            raise WeightError(f"weight {name} has shape {list(t.shape)}, the config implies {list(shape)}")
        if t.dtype not in _MATMUL_DTYPES:
            raise WeightError(f"weight {name} is {t.dtype}; supported: float32, float16, bfloat16")
        if matrix:
            if self.dtype is None:
                self.dtype = t.dtype
            elif t.dtype != self.dtype:
                raise WeightError(
                    f"weight {name} is {t.dtype} but the stage's other weights are {self.dtype}"
                )
        self.taken.add(name)
        # On the CPU this is the caller's tensor itself (a view of the arena); on a GPU the copy.
        return t.to(self.device)

    def maybe(self, name: str, shape: tuple[int, ...], present: bool) -> torch.Tensor | None:
        if not present:
            if name in self.weights:
                raise WeightError(f"weight {name} is present but config.json says there is no such bias")
            return None
        return self.take(name, shape, matrix=False)


def _native_rows(*ts: torch.Tensor) -> bool:
    """The row kernels (csrc/rowops.h) take these: in use, on the CPU, contiguous, not empty, all of one
    dtype they compute."""
    if NATIVE is None:
        return False
    dtype = ts[0].dtype
    if dtype not in _KERNEL_DTYPES:
        return False
    # is_cpu, not device.type: a step makes ~100 of these checks, and device.type costs ~1 us.
    return all(t.is_cpu and t.is_contiguous() and t.numel() and t.dtype == dtype for t in ts)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, back to x's dtype, then scale. One native call
    for a 2-D ``x`` (csrc/rowops.h), else torch's operators, its plain twin."""
    if x.dim() == 2 and w.shape == (x.shape[1],) and _native_rows(x, w):
        y = torch.empty_like(x)
        NATIVE.rms_norm(
            x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], _KERNEL_DTYPES[x.dtype], eps
        )
        return y
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


# On the CPU torch multiplies bf16 and fp16 matrices a row at a time (no AVX-512 BF16 or AMX on the
# machines measured): a prefill of n tokens cost n decode steps. A prompt chunk of enough tokens is
# multiplied in float32 instead, the weight widened a tile at a time (about _WIDEN_TILE_ELEMS
# elements, 2 MiB) into a per-thread scratch buffer: never a float32 copy of the weight.
# Accumulation is float32 either way and the result is rounded once to the stored dtype, as torch's
# kernel does; only the summation order differs. Widening costs a read and a write of each weight
# element. Against torch's kernel it pays from about 4 rows per thread (1.1-1.5x there, 2-5x for 32
# rows, at 1 and 2 threads here); against the native kernel below, which widens in registers, only
# from about 32 (a 32-row chunk costs the same either way at 1 thread; at 2 threads the native kernel
# is 1.6x faster at 32 rows and 1.25x at 64, even at 128).
#
# A request must get the same tokens alone as beside others (the tests hold the engine to it), so a
# row's arithmetic may not depend on its neighbours: torch's kernel treats rows independently, but a
# float32 product of m rows can round a row differently for another m. Each widened chunk is
# therefore multiplied on its own, and the scheduler cuts prompts at the same places under any load
# (serving/stage.py): a chunk is widened, or not, and multiplied exactly the same way alone or not.
# Decode steps are never widened, whatever their batch: their rows go to ``rows_linear`` (below).
_WIDEN_ROWS_PER_THREAD = 4
_WIDEN_ROWS_PER_THREAD_NATIVE = 32
_WIDEN_TILE_ELEMS = 1 << 19
_scratch = threading.local()

# The other rows (decode steps, short chunks, the LM head's one row per sequence) go through
# csrc/halfmm.h where this CPU has AVX2, FMA and F16C: it widens the weight in registers, a tile of
# up to 8 rows of the step at a time, and sums every output in one fixed order, so a batch reads the
# weight once and a row comes out the same in any batch. It runs on torch's own OpenMP team (the
# output columns split over torch's thread count, which changes no sum). torch's kernel, its plain
# twin, does the same rows a row at a time (the tests run the engine on both; BUTTERFLY_PURE=1 makes
# it the one used).
NATIVE_KERNEL: Any = None
"""``butterfly._native.halfmm`` where it is built and this CPU runs it, else None."""
try:
    # importlib: the extension has no stub.
    _halfmm = importlib.import_module("butterfly._native.halfmm")
except ImportError:  # built without extensions (BUTTERFLY_NO_EXT=1)
    pass
else:
    if _halfmm.available():
        NATIVE_KERNEL = _halfmm
        _halfmm.bind_threads()
NATIVE: Any = None if os.environ.get("BUTTERFLY_PURE") == "1" else NATIVE_KERNEL
"""The native kernels ``rows_linear``, ``_Decode``, ``rms_norm`` and ``rope`` use (None: torch's
operators, their twins)."""


def widen_least() -> int:
    """The fewest tokens a chunk must have to be multiplied in float32 tiles (see above)."""
    per_thread = _WIDEN_ROWS_PER_THREAD if NATIVE is None else _WIDEN_ROWS_PER_THREAD_NATIVE
    return per_thread * torch.get_num_threads()


def rows_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D ``x`` whose rows must not depend on each other: the native
    kernel for a contiguous half-precision weight on the CPU (see above), else torch's."""
    return _Products.of((w, b)).rows(x)[0]


@dataclass(frozen=True)
class _Products:
    """Weights that multiply the same rows (q, k and v; gate and up; or one alone), with what the native
    kernel needs of them, checked once, when the model is built. The kernel takes them all in one call:
    their output columns split over one parallel region, each with the bits of a call of its own."""

    ws: tuple[torch.Tensor, ...]
    bs: tuple[torch.Tensor | None, ...]
    k: int
    native: tuple[tuple[int, int, int, int, bool], ...] | None
    """(weight, bias (0: none), the bias's dtype code, outputs, fp16) of each; None when the kernel does
    not take them all: contiguous half-precision weights of one input width on the CPU, at most
    ``_MAX_PRODUCTS``."""
    kept: tuple[torch.Tensor, ...]
    """The biases the kernel reads (a float64 one narrowed to float32), kept alive for their addresses."""

    @staticmethod
    def of(*products: tuple[torch.Tensor, torch.Tensor | None]) -> _Products:
        ws = tuple(w for w, _ in products)
        bs = tuple(b for _, b in products)
        k = ws[0].shape[-1]
        takes = len(ws) <= _MAX_PRODUCTS and all(
            w.dtype in _HALF
            and w.is_cpu
            and w.is_contiguous()
            and w.dim() == 2
            and w.shape[1] == k
            # F.linear says what is wrong with a bias of another shape; the kernel would read past it.
            and (b is None or (b.is_cpu and b.shape == (w.shape[0],)))
            for w, b in products
        )
        if not takes:
            return _Products(ws, bs, k, None, ())
        native = []
        kept = []
        for w, b in products:
            if b is not None:
                b = (b if b.dtype in _KERNEL_DTYPES else b.float()).contiguous()
                kept.append(b)
            native.append(
                (
                    w.data_ptr(),
                    0 if b is None else b.data_ptr(),
                    0 if b is None else _KERNEL_DTYPES[b.dtype],
                    w.shape[0],
                    w.dtype is torch.float16,
                )
            )
        return _Products(ws, bs, k, tuple(native), tuple(kept))

    def rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each ``F.linear(x, w, b)``: one native call for all where the kernel takes them and ``x`` (2-D,
        of their input width, not empty), else one ``rows_linear`` each (torch's for a weight the
        kernel does not take)."""
        native = NATIVE
        if native is None or self.native is None or x.dim() != 2 or x.shape[1] != self.k or not x.shape[0]:
            if len(self.ws) == 1:
                return [F.linear(x, self.ws[0], self.bs[0])]
            return [rows_linear(x, w, b) for w, b in zip(self.ws, self.bs, strict=True)]
        m, k = x.shape
        # x as it is (the kernel widens a half-precision x into this thread's scratch); a dtype the
        # kernel does not read (float64) is narrowed here, and the results given back in it.
        given = x.dtype
        x = (x if given in _KERNEL_DTYPES else x.float()).contiguous()
        x_dtype = _KERNEL_DTYPES[x.dtype]
        # Each output rounded to x's dtype by the kernel, as torch's .to() would round a float32 result.
        ys = [torch.empty((m, spec[3]), dtype=x.dtype) for spec in self.native]
        products = [
            (w, b, b_dtype, y.data_ptr(), x_dtype, n, fp16)
            for (w, b, b_dtype, n, fp16), y in zip(self.native, ys, strict=True)
        ]
        scratch = _x_scratch(m * k).data_ptr() if x_dtype else 0
        native.matmuls(x.data_ptr(), m, k, x_dtype, scratch, torch.get_num_threads(), products)
        return ys if given == x.dtype else [y.to(given) for y in ys]


def _x_scratch(elems: int) -> torch.Tensor:
    """This thread's float32 buffer of at least ``elems`` for the kernel's widened rows (grown, never
    shrunk: a step's rows times the widest input)."""
    buf: torch.Tensor | None = getattr(_scratch, "rows", None)
    if buf is None or buf.numel() < elems:
        buf = _scratch.rows = torch.empty(elems, dtype=torch.float32)
    return buf


@dataclass(frozen=True)
class _Rows:
    """How a step's rows are multiplied (see above): ``wide`` holds (offset, rows) of the chunks
    multiplied in float32 tiles, each on its own; the other rows, ``narrow`` (None when all), go
    through ``rows_linear`` together."""

    wide: tuple[tuple[int, int], ...]
    narrow: torch.Tensor | None

    @staticmethod
    def of(chunks: Sequence[SeqChunk], dtype: torch.dtype, device: torch.device) -> _Rows:
        if dtype is torch.float32 or device.type != "cpu":
            return _Rows((), None)
        least = widen_least()
        wide: list[tuple[int, int]] = []
        narrow: list[int] = []
        off = 0
        for c in chunks:
            if c.n_tokens >= least:
                wide.append((off, c.n_tokens))
            else:
                narrow.extend(range(off, off + c.n_tokens))
            off += c.n_tokens
        return _Rows(tuple(wide), torch.tensor(narrow, dtype=torch.long) if wide and narrow else None)


def linears(x: torch.Tensor, products: _Products, rows: _Rows) -> list[torch.Tensor]:
    """``linear`` of one ``x`` by each of ``products``: without wide chunks, one native call."""
    if not rows.wide:
        return products.rows(x)
    return [linear(x, w, b, rows) for w, b in zip(products.ws, products.bs, strict=True)]


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: _Rows) -> torch.Tensor:
    """``F.linear(x, w, b)``, with ``rows.wide`` chunks of ``x`` multiplied in float32 tiles."""
    if not rows.wide:
        return rows_linear(x, w, b)
    out_features, in_features = w.shape
    tile_rows = max(1, min(out_features, _WIDEN_TILE_ELEMS // in_features))
    scratch: torch.Tensor | None = getattr(_scratch, "buf", None)
    if scratch is None or scratch.numel() < tile_rows * in_features:
        scratch = _scratch.buf = torch.empty(tile_rows * in_features, dtype=torch.float32)
    xf = x.float()
    wide = torch.empty((x.shape[0], out_features), dtype=torch.float32)
    for start in range(0, out_features, tile_rows):
        stop = min(start + tile_rows, out_features)
        tile = scratch[: (stop - start) * in_features].view(stop - start, in_features)
        tile.copy_(w[start:stop])
        for off, n in rows.wide:
            torch.mm(xf[off : off + n], tile.t(), out=wide[off : off + n, start:stop])
    if b is not None:
        wide += b
    out = wide.to(x.dtype)
    if rows.narrow is not None:
        out[rows.narrow] = rows_linear(x[rows.narrow], w, b)
    return out


_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_HALF = (torch.bfloat16, torch.float16)
_MAX_PRODUCTS = 4
"""The most weights ``native.matmuls`` takes in one call (csrc/halfmm.h's HK_MAX_JOBS)."""


@dataclass(frozen=True)
class _Decode:
    """A step's one-token chunks, whose attention the native kernel computes in one call per layer
    (csrc/attention.h: each sequence's new key and value written into its cache, then its heads
    attended, in one fixed order per sequence and head; torch's ``scaled_dot_product_attention``, a
    sequence at a time, is its plain twin). ``rows``: their rows in the step, None when all are;
    ``layers``: how many layers their caches hold."""

    rows: torch.Tensor | None
    caches: torch.Tensor
    capacity: torch.Tensor
    pos: torch.Tensor
    layers: int

    @staticmethod
    def of(
        chunks: Sequence[SeqChunk],
        kvs: Sequence[torch.Tensor],
        dtype: torch.dtype,
        kv_heads: int,
        head_dim: int,
    ) -> _Decode | None:
        """None when the kernel is not in use, the step is not one it computes (another device or
        dtype), or no chunk is one token. The kernel reads and writes the caches by address, so one
        of another dtype or shape than the step's is refused here, never read past."""
        if (
            NATIVE is None
            or dtype not in _KERNEL_DTYPES
            or head_dim > NATIVE.MAX_HEAD_DIM
            or not all(kv.is_cpu and kv.is_contiguous() for kv in kvs)
        ):
            return None
        picked = [i for i, c in enumerate(chunks) if c.n_tokens == 1]
        if not picked:
            return None
        for i in picked:
            kv = kvs[i]
            if (
                kv.dtype != dtype
                or kv.dim() != 5
                or (kv.shape[1], kv.shape[2], kv.shape[4]) != (2, kv_heads, head_dim)
            ):
                raise ValueError(
                    f"a KV cache {kv.dtype} {list(kv.shape)} does not fit a step {dtype} with {kv_heads} KV "
                    f"heads of {head_dim}"
                )
        rows = None  # every chunk is one token: row r of the step is chunk r's
        if len(picked) < len(chunks):
            rows = torch.cumsum(torch.tensor([0] + [c.n_tokens for c in chunks[:-1]]), 0)[picked]
        return _Decode(
            rows=rows,
            caches=torch.tensor([kvs[i].data_ptr() for i in picked], dtype=torch.int64),
            capacity=torch.tensor([kvs[i].shape[3] for i in picked], dtype=torch.int64),
            pos=torch.tensor([chunks[i].start_pos for i in picked], dtype=torch.int64),
            layers=min(kvs[i].shape[0] for i in picked),
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        window: int | None,
        out: torch.Tensor,
    ) -> None:
        """Their attention in ``layer`` into their rows of ``out`` ([T, heads, head_dim]); q, k and v
        of the dtype and shape ``of`` was given."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} does not fit KV caches of {self.layers} layers")
        if self.rows is not None:
            q, k, v = q[self.rows], k[self.rows], v[self.rows]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        n, heads, hd = q.shape
        # Every row of the step is this call's: the kernel writes out itself, else rows of its own.
        whole = self.rows is None and out.is_contiguous() and out.dtype == q.dtype
        got = out if whole else torch.empty((n, heads, hd), dtype=q.dtype)
        NATIVE.decode_attention(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            n,
            heads,
            k.shape[1],
            hd,
            _KERNEL_DTYPES[q.dtype],
            self.caches.data_ptr(),
            self.capacity.data_ptr(),
            self.pos.data_ptr(),
            layer,
            window or 0,
            hd**-0.5,
            got.data_ptr(),
            torch.get_num_threads(),
        )
        if got is not out:
            out[self.rows if self.rows is not None else slice(None)] = got


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x [T, heads, head_dim] and cos, sin [T, 1, head_dim]:
    the same bits from one native call (csrc/rowops.h), which writes them over ``x`` and returns it, or
    from torch's operators, its plain twin, into a new tensor. The caller must not use ``x`` after."""
    t, _, d = x.shape
    if cos.shape == sin.shape == (t, 1, d) and d % 2 == 0 and _native_rows(x, cos, sin):
        NATIVE.rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), t, x.shape[1], d, _KERNEL_DTYPES[x.dtype])
        return x
    return x * cos + _rotate_half(x) * sin


def _attention_mask(
    start: int, n: int, kv_from: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [n, start + n - kv_from]: query at start+i sees key j iff j <= start+i and, with a
    window W, start+i - j < W (transformers' sliding-window mask)."""
    q = torch.arange(start, start + n, device=device)[:, None]
    k = torch.arange(kv_from, start + n, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    return mask


class StageModel:
    """Blocks ``[start, stop)`` of a ``num_blocks``-block model, with the embeddings when ``first`` and
    the final norm and LM head when ``last``."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        start: int,
        stop: int,
        num_blocks: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks != cfg.num_layers:
            raise ValueError(
                f"num_blocks={num_blocks} but config.json says num_hidden_layers={cfg.num_layers}"
            )
        if not 0 <= start < stop <= num_blocks:
            raise ValueError(f"blocks [{start}, {stop}) are not within the model's {num_blocks}")
        self.cfg = cfg
        self.start = start
        self.stop = stop
        self.num_blocks = num_blocks
        self.first = start == 0
        self.last = stop == num_blocks
        self.device = torch.device(device)
        w = _Weights(weights, self.device)
        hidden, vocab = cfg.hidden_size, cfg.vocab_size
        self.embed = w.take("model.embed_tokens.weight", (vocab, hidden)) if self.first else None
        self.blocks = [self._block(w, b) for b in range(start, stop)]
        self.final_norm: torch.Tensor | None = None
        self.head: torch.Tensor | None = None
        if self.last:
            self.final_norm = w.take("model.norm.weight", (hidden,), matrix=False)
            if cfg.tie_word_embeddings:
                if "lm_head.weight" in weights:
                    raise WeightError("lm_head.weight is present but config.json ties it to the embeddings")
                self.head = w.take("model.embed_tokens.weight", (vocab, hidden))
            else:
                self.head = w.take("lm_head.weight", (vocab, hidden))
        self._refuse_unexpected(weights, w.taken)
        assert w.dtype is not None
        self.dtype = w.dtype
        self.inv_freq = cfg.inv_freq().to(self.device)

    def _block(self, w: _Weights, b: int) -> _Block:
        cfg = self.cfg
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        p = f"model.layers.{b}."
        attn, mlp = p + "self_attn.", p + "mlp."

        def product(prefix: str, out: int, into: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            return w.take(prefix + ".weight", (out, into)), w.maybe(prefix + ".bias", (out,), bias)

        return _Block(
            index=b,
            ln1=w.take(p + "input_layernorm.weight", (hidden,), matrix=False),
            ln2=w.take(p + "post_attention_layernorm.weight", (hidden,), matrix=False),
            qkv=_Products.of(
                product(attn + "q_proj", q_dim, hidden, cfg.qkv_bias),
                product(attn + "k_proj", kv_dim, hidden, cfg.qkv_bias),
                product(attn + "v_proj", kv_dim, hidden, cfg.qkv_bias),
            ),
            o=_Products.of(product(attn + "o_proj", hidden, q_dim, cfg.o_bias)),
            gate_up=_Products.of(
                product(mlp + "gate_proj", inter, hidden, cfg.mlp_bias),
                product(mlp + "up_proj", inter, hidden, cfg.mlp_bias),
            ),
            down=_Products.of(product(mlp + "down_proj", hidden, inter, cfg.mlp_bias)),
            window=cfg.sliding_window[b],
        )

    def _refuse_unexpected(self, weights: Mapping[str, torch.Tensor], taken: set[str]) -> None:
        prefixes = tuple(f"model.layers.{b}." for b in range(self.start, self.stop))
        for name in weights:
            if name.startswith(prefixes) and name not in taken and not name.endswith("rotary_emb.inv_freq"):
                raise WeightError(f"weight {name} is not part of a {self.cfg.architecture} block")

    def new_cache(self, budget_bytes: int) -> KVCache:
        """A KV cache for this stage's layers in its dtype and on its device."""
        return KVCache(self.cfg, self.start, self.stop, budget_bytes, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, chunks: Sequence[SeqChunk], cache: KVCache) -> torch.Tensor:
        """Run one step for ``chunks`` (their tokens back to back in ``x``).

        ``x``: token ids [T] (LongTensor) on the first stage, else hidden states [T, hidden] in the
        stage's dtype, with T = sum of n_tokens. Returns hidden states [T, hidden], or on the last
        stage float32 logits [len(chunks), vocab] of each chunk's last token. The cache records the
        chunks' positions only once the whole step succeeded.
        """
        total = self._check(x, chunks, cache)
        kvs = [cache.check_chunk(c.seq_id, c.start_pos, c.n_tokens) for c in chunks]
        positions = torch.cat([torch.arange(c.start_pos, c.start_pos + c.n_tokens) for c in chunks])
        freqs = positions.to(self.device, torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(self.dtype)[:, None, :]
        sin = emb.sin().to(self.dtype)[:, None, :]
        if self.first:
            assert self.embed is not None
            h = F.embedding(x.to(self.device), self.embed)
        else:
            h = x.to(self.device, self.dtype)
        rows = _Rows.of(chunks, self.dtype, self.device)
        decode = _Decode.of(chunks, kvs, self.dtype, self.cfg.num_kv_heads, self.cfg.head_dim)
        for i, blk in enumerate(self.blocks):
            h = self._block_forward(h, blk, i, chunks, kvs, cos, sin, total, rows, decode)
        for c in chunks:
            cache.advance(c.seq_id, c.start_pos + c.n_tokens)
        if not self.last:
            return h
        assert self.final_norm is not None and self.head is not None
        ends = torch.cumsum(torch.tensor([c.n_tokens for c in chunks]), 0) - 1
        last = rms_norm(h[ends.to(self.device)], self.final_norm, self.cfg.rms_norm_eps)
        return rows_linear(last, self.head).float()

    __call__ = forward

    def _check(self, x: torch.Tensor, chunks: Sequence[SeqChunk], cache: KVCache) -> int:
        if not chunks:
            raise ValueError("a step needs at least one chunk")
        if len({c.seq_id for c in chunks}) != len(chunks):
            raise ValueError("a sequence appears twice in one step")
        if (cache.start, cache.stop) != (self.start, self.stop):
            raise ValueError(
                f"the cache holds blocks [{cache.start}, {cache.stop}), the stage [{self.start}, {self.stop})"
            )
        total = sum(c.n_tokens for c in chunks)
        if self.first:
            if x.dim() != 1 or x.shape[0] != total or x.dtype != torch.long:
                raise ValueError(
                    f"the first stage takes {total} token ids (int64), got {x.dtype} {list(x.shape)}"
                )
            if total and (int(x.min()) < 0 or int(x.max()) >= self.cfg.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
        elif x.dim() != 2 or tuple(x.shape) != (total, self.cfg.hidden_size):
            raise ValueError(
                f"this stage takes hidden states [{total}, {self.cfg.hidden_size}], got {list(x.shape)}"
            )
        return total

    def _block_forward(
        self,
        h: torch.Tensor,
        blk: _Block,
        layer: int,
        chunks: Sequence[SeqChunk],
        kvs: Sequence[torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        total: int,
        rows: _Rows,
        decode: _Decode | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        y = rms_norm(h, blk.ln1, cfg.rms_norm_eps)
        q, k, v = linears(y, blk.qkv, rows)
        q, k, v = q.view(total, heads, hd), k.view(total, kv_heads, hd), v.view(total, kv_heads, hd)
        q = rope(q, cos, sin)
        k = rope(k, cos, sin)
        out = torch.empty((total, heads, hd), dtype=h.dtype, device=h.device)
        off = 0
        if decode is not None:
            decode.attend(q, k, v, layer, blk.window, out)
        for c, kv in zip(chunks, kvs, strict=True):
            s, n = c.start_pos, c.n_tokens
            if decode is not None and n == 1:
                off += 1  # attended above
                continue
            end = s + n
            kv[layer, 0, :, s:end] = k[off : off + n].transpose(0, 1)
            kv[layer, 1, :, s:end] = v[off : off + n].transpose(0, 1)
            # Keys before the first query's window are invisible to every query of the chunk.
            kv_from = 0 if blk.window is None else max(0, s - blk.window + 1)
            keys = kv[layer, 0, :, kv_from:end]
            vals = kv[layer, 1, :, kv_from:end]
            qq = q[off : off + n].transpose(0, 1)
            mask: torch.Tensor | None = None
            causal = False
            if n > 1:
                if s == 0 and kv_from == 0 and (blk.window is None or n <= blk.window):
                    causal = True
                else:
                    mask = _attention_mask(s, n, kv_from, blk.window, h.device)
            # 4-D (batch of one): on the CPU only 4-D inputs reach the fused (flash) kernel; 3-D ones
            # take the unfused path, several times slower.
            o = F.scaled_dot_product_attention(
                qq[None],
                keys[None],
                vals[None],
                attn_mask=mask,
                is_causal=causal,
                scale=hd**-0.5,
                enable_gqa=heads != kv_heads,
            )
            out[off : off + n] = o[0].transpose(0, 1)
            off += n
        h = h + linears(out.view(total, heads * hd), blk.o, rows)[0]
        y = rms_norm(h, blk.ln2, cfg.rms_norm_eps)
        gate, up = linears(y, blk.gate_up, rows)
        act = F.silu(gate) * up
        return h + linears(act, blk.down, rows)[0]
