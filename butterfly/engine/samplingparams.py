"""How one sequence samples its tokens: ``SamplingParams``, checked at construction so a bad request
fails before it takes a cache reservation.

Kept free of torch: the API (in the supervisor's process) builds these for every request, and the
supervisor must not import torch. ``butterfly.engine.sampler`` applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SamplingParams"]


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
