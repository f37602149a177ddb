"""A plain generation loop over stages chained in one process: for tests, benchmarks and warmup.

``Pipeline`` passes a step's activations from stage to stage in memory (the serving layer does the
same over the network); ``generate`` runs one sequence from a prompt to ``max_new_tokens`` or an end
token. Must not: schedule several requests (the serving layer's scheduler does) or read weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from butterfly.engine.kvcache import KVCache
from butterfly.engine.model import SeqChunk, StageModel
from butterfly.engine.sampler import SamplingParams, SeqSampler

__all__ = ["Pipeline", "generate"]


class Pipeline:
    """Stages covering a whole model in order, each with its own KV cache."""

    def __init__(self, stages: Sequence[StageModel], kv_cache_bytes: int) -> None:
        if not stages or not stages[0].first or not stages[-1].last:
            raise ValueError("a pipeline needs stages from the first block to the last")
        for a, b in zip(stages, stages[1:], strict=False):
            if a.stop != b.start:
                raise ValueError(f"stage [{a.start}, {a.stop}) is not followed by [{b.start}, {b.stop})")
        self.stages = list(stages)
        self.caches: list[KVCache] = [s.new_cache(kv_cache_bytes) for s in stages]

    def reserve(self, seq_id: int, max_tokens: int) -> None:
        done: list[KVCache] = []
        try:
            for c in self.caches:
                c.reserve(seq_id, max_tokens)
                done.append(c)
        except BaseException:
            for c in done:
                c.free(seq_id)
            raise

    def free(self, seq_id: int) -> None:
        for c in self.caches:
            c.free(seq_id)

    def step(self, tokens: torch.Tensor, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Float32 logits [len(chunks), vocab] of each chunk's last token."""
        x = tokens
        for stage, cache in zip(self.stages, self.caches, strict=True):
            x = stage.forward(x, chunks, cache)
        return x


def generate(
    pipe: Pipeline,
    prompt: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    seq_id: int = 0,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """The tokens generated after ``prompt`` (the stop token included when one ends it)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    sampler = SeqSampler(params or SamplingParams(temperature=0.0))
    pipe.reserve(seq_id, len(prompt) + max_new_tokens)
    try:
        out: list[int] = []
        tokens = torch.tensor(list(prompt), dtype=torch.long)
        pos = 0
        while len(out) < max_new_tokens:
            logits = pipe.step(tokens, [SeqChunk(seq_id, pos, tokens.shape[0])])
            pos += tokens.shape[0]
            tok = sampler(logits[0])
            out.append(tok)
            if tok in stop_ids:
                break
            tokens = torch.tensor([tok], dtype=torch.long)
        return out
    finally:
        pipe.free(seq_id)
