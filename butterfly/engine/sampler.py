"""Choosing the next token from a sequence's logits: greedy, temperature, top-p, a seed per sequence.

Owns ``SeqSampler``, which holds one ``torch.Generator`` per sequence: a seeded sequence draws the
same tokens whatever else shares its batch. ``SamplingParams`` lives in ``samplingparams``, free of
torch, so the API can build requests in the supervisor without importing torch; it is re-exported
here. Must not: decide when a sequence stops (stop strings, max_tokens and EOS are the caller's), or
touch the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from butterfly.engine.samplingparams import SamplingParams

__all__ = ["SamplingParams", "SeqSampler", "sample_batch"]


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
        # Any temperature > 0 is valid, however small: dividing the raw logits by 1e-300 overflows to
        # inf (and softmax of inf is NaN), so scale the logits less their maximum (all <= 0, the top
        # one 0), in float64, where such a temperature does not round to 0 as it would in float32.
        row = logits.detach().to(device="cpu", dtype=torch.float64)
        probs = torch.softmax((row - row.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            # Keep a token while the mass before it is still short of top_p: the first always stays.
            keep = before < p.top_p
            keep[0] = True
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
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
