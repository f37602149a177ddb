"""The key/value cache of one stage's layers, with a byte budget.

Owns the memory where each sequence's keys and values live between steps, and the budget that bounds
it (``[engine] kv_cache_bytes``). A sequence reserves its whole capacity up front (prompt plus the
tokens it may generate), so a step can never run out of cache half-way: a request that does not fit
is refused at ``reserve`` with a ``KVCacheFull`` that says why (larger than the whole budget, or the
budget is in use), and the caller queues it or answers 429/503. ``free`` gives the memory back.

Layout: per sequence one tensor ``[layers, 2 (k, v), kv_heads, capacity, head_dim]`` in the model's
dtype on the stage's device, so attention reads one contiguous ``[kv_heads, tokens, head_dim]`` slice
per layer. Sliding-window layers keep every position too; the model masks what lies outside the
window (the memory a ring buffer would save is not worth the indexing yet).

Must not: compute attention (the model does), or decide who waits (the scheduler does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from butterfly.engine.config import ModelConfig

__all__ = ["KVCache", "KVCacheFull", "KVStats", "kv_bytes_per_token"]


def kv_bytes_per_token(cfg: ModelConfig, layers: int, dtype: torch.dtype) -> int:
    """Cache bytes one position of one sequence takes over ``layers`` layers (keys and values)."""
    return layers * 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class KVCacheFull(Exception):
    """A sequence's reservation does not fit; ``reason`` is "budget" (it never will) or "in_use"."""

    def __init__(self, seq_id: int, need: int, in_use: int, total: int, sequences: int) -> None:
        self.seq_id = seq_id
        self.need_bytes = need
        self.bytes_in_use = in_use
        self.bytes_total = total
        self.reason = "budget" if need > total else "in_use"
        if self.reason == "budget":
            msg = f"needs {need} bytes of KV cache, more than the whole budget of {total} bytes"
        else:
            msg = (
                f"needs {need} bytes of KV cache; {in_use} of {total} bytes are in use by "
                f"{sequences} sequences (free: {total - in_use})"
            )
        super().__init__(f"sequence {seq_id} {msg}")


@dataclass(frozen=True)
class KVStats:
    bytes_total: int
    bytes_in_use: int
    sequences: int
    tokens_reserved: int


@dataclass
class _Seq:
    kv: torch.Tensor
    capacity: int
    length: int = 0


class KVCache:
    """KV memory for blocks ``[start, stop)`` of a model, within ``budget_bytes``."""

    def __init__(
        self,
        cfg: ModelConfig,
        start: int,
        stop: int,
        budget_bytes: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 <= start < stop <= cfg.num_layers:
            raise ValueError(f"blocks [{start}, {stop}) are not within the model's {cfg.num_layers}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.cfg = cfg
        self.start = start
        self.stop = stop
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.device = torch.device(device)
        self.bytes_per_token = kv_bytes_per_token(cfg, stop - start, dtype)
        self._seqs: dict[int, _Seq] = {}
        self._in_use = 0

    def reserve(self, seq_id: int, max_tokens: int) -> None:
        """Room for ``max_tokens`` positions of ``seq_id``; ``KVCacheFull`` when it does not fit."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already holds a reservation")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_tokens > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence {seq_id}: {max_tokens} tokens exceed the model's context of "
                f"{self.cfg.max_position_embeddings} (max_position_embeddings)"
            )
        need = max_tokens * self.bytes_per_token
        if self._in_use + need > self.budget_bytes:
            raise KVCacheFull(seq_id, need, self._in_use, self.budget_bytes, len(self._seqs))
        shape = (self.stop - self.start, 2, self.cfg.num_kv_heads, max_tokens, self.cfg.head_dim)
        self._seqs[seq_id] = _Seq(torch.empty(shape, dtype=self.dtype, device=self.device), max_tokens)
        self._in_use += need

    def free(self, seq_id: int) -> None:
        """Give back ``seq_id``'s memory; freeing an unknown sequence is a no-op (cancel races)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self._in_use -= seq.capacity * self.bytes_per_token

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: int) -> int:
        """Positions of ``seq_id`` already written (the next chunk starts at or before this)."""
        return self._get(seq_id).length

    def capacity(self, seq_id: int) -> int:
        return self._get(seq_id).capacity

    def stats(self) -> KVStats:
        return KVStats(
            bytes_total=self.budget_bytes,
            bytes_in_use=self._in_use,
            sequences=len(self._seqs),
            tokens_reserved=sum(s.capacity for s in self._seqs.values()),
        )

    def _get(self, seq_id: int) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id} has no KV cache reservation") from None

    def check_chunk(self, seq_id: int, start_pos: int, n_tokens: int) -> torch.Tensor:
        """The sequence's cache tensor, after checking the chunk fits: no gap, within capacity."""
        seq = self._get(seq_id)
        if n_tokens < 1 or start_pos < 0:
            raise ValueError(f"sequence {seq_id}: bad chunk start {start_pos}, {n_tokens} tokens")
        if start_pos > seq.length:
            raise ValueError(
                f"sequence {seq_id}: chunk starts at position {start_pos} but only {seq.length} are cached"
            )
        if start_pos + n_tokens > seq.capacity:
            raise ValueError(
                f"sequence {seq_id}: positions up to {start_pos + n_tokens} exceed its reservation of "
                f"{seq.capacity} tokens"
            )
        return seq.kv

    def advance(self, seq_id: int, end: int) -> None:
        """Record that positions ``[0, end)`` of ``seq_id`` are written (after a forward pass)."""
        self._get(seq_id).length = end
