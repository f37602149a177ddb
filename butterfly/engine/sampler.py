"""Choosing the next token from a sequence's logits: greedy, temperature, top-p, a seed per sequence.

Owns ``SamplingParams`` (checked at construction, so a bad request fails before it takes a cache
reservation) and ``SeqSampler``, which holds one ``torch.Generator`` per sequence: a seeded sequence
draws the same tokens whatever else shares its batch. Must not: decide when a sequence stops (stop
strings, max_tokens and EOS are the caller's), or touch the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "SeqSampler", "sample_batch"]


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy (argmax); ``top_p`` keeps the smallest set of tokens whose
    probability reaches it; ``seed`` makes the draws reproducible (None: a random seed)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(p, int | float) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SeqSampler:
    """Samples one sequence's tokens; its generator lives as long as the sequence."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from a float32 row ``[vocab]`` of logits."""
        if logits.dim() != 1:
            raise ValueError(f"expected one row of logits, got shape {tuple(logits.shape)}")
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            # Keep a token while the mass before it is still short of top_p: the first always stays.
            sorted_probs = torch.where(before < p.top_p, sorted_probs, torch.zeros_like(sorted_probs))
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_batch(logits: torch.Tensor, samplers: Sequence[SeqSampler]) -> list[int]:
    """One token per row of ``logits`` ``[len(samplers), vocab]``, each with its own sampler."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(samplers)} samplers")
    if all(s.params.greedy for s in samplers):
        return [int(t) for t in torch.argmax(logits, dim=-1)]
    return [s(row) for s, row in zip(samplers, logits, strict=True)]
