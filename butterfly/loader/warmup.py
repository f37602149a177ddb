"""Warmup: a real forward pass of the inference engine through this node's layers, on the loaded bytes.

The stage is built exactly as serving builds it (``butterfly.engine``: config.json read and checked,
weights as views of the arena in their stored dtype, no copy and no widening), then runs a short
prefill and one decode step through the KV cache. That touches every weight of the stage, so a first
request finds them hot, and proves before the node says READY that the config is one the engine
computes, that every tensor the stage needs is there with the right shape and dtype, and that the
activations stay finite: a checkpoint whose bytes decode to NaN/Inf, or whose shapes do not fit
together, fails here and not on a user's request.

Must not: read files or the network (the loader hands it the arena and the layout), or keep anything
alive after it returns (the views hold the arena mapping).
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from butterfly.engine.config import ConfigUnsupported, ModelConfig
from butterfly.engine.kvcache import kv_bytes_per_token
from butterfly.engine.model import SeqChunk, StageModel, WeightError
from butterfly.engine.weights import arena_weights
from butterfly.ipc import TensorPlacement
from butterfly.weights.layout import TensorEntry

__all__ = ["WARMUP_TOKENS", "WarmupError", "WarmupStats", "warmup_stage", "warmup_weights"]

# Prefill this many tokens, then decode one more: both attention paths run (a causal prefill over
# more than one token, a decode step over the cache). Two, not more: a CPU's half-precision prefill is
# compute-bound (4 GiB model, 2 cores: 8 tokens 1.3-1.6 s, 2 tokens 0.43 s), while every weight is
# read by any count.
WARMUP_TOKENS = 2
_SEQ = 0


class WarmupError(Exception):
    """The stage cannot run: unsupported config, missing or misshapen weights, non-finite output."""


@dataclass(frozen=True)
class WarmupStats:
    tokens: int
    dtype: str
    activation_rms: float
    logit_max: float | None
    seconds: float


def _input(stage: StageModel, n: int, start: int, seed: int) -> torch.Tensor:
    cfg = stage.cfg
    if stage.first:
        return (torch.arange(start, start + n, dtype=torch.long) * 7919 + 1) % cfg.vocab_size
    # A middle stage gets its predecessor's activations; a fixed pseudo-input stands in.
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, cfg.hidden_size), generator=g).to(stage.dtype)


def warmup_stage(
    arena: memoryview | mmap.mmap,
    placements: Iterable[TensorPlacement],
    entries: Iterable[TensorEntry],
    model_config: Mapping[str, object],
    where: str,
    blocks: tuple[int, int],
    num_blocks: int,
    *,
    beat: Callable[[], None] | None = None,
) -> WarmupStats:
    """Build the engine's stage for ``blocks`` = (start, stop) over the arena and run it once.

    ``where`` names config.json in errors; ``beat`` is called between passes (heartbeats). A failure
    is a ``WarmupError`` raised here, outside any handler, so neither it nor its traceback holds the
    stage's views of the arena (the loader unmaps the arena for its next assignment).
    """
    return warmup_weights(
        lambda: arena_weights(arena, placements, entries), model_config, where, blocks, num_blocks, beat=beat
    )


def warmup_weights(
    weights: Callable[[], Mapping[str, torch.Tensor]],
    model_config: Mapping[str, object],
    where: str,
    blocks: tuple[int, int],
    num_blocks: int,
    *,
    device: torch.device | str = "cpu",
    beat: Callable[[], None] | None = None,
) -> WarmupStats:
    """``warmup_stage`` over any weights: ``weights()`` gives name -> tensor views on ``device`` (the
    arena's on the CPU, the device copies on a GPU: ``butterfly.loader.gpu.device_weights``)."""
    started = time.monotonic()
    failed = ""
    try:
        stats = _run(weights, model_config, where, blocks, num_blocks, device, beat)
    except ConfigUnsupported as e:
        failed = f"the engine cannot run this model: {e}"
    except WeightError as e:
        failed = f"weights do not fit the model: {e}"
    except (ValueError, RuntimeError) as e:
        # torch reports what it cannot compute (shapes, dtypes) as RuntimeError.
        failed = f"{type(e).__name__}: {e}"
    if failed:
        raise WarmupError(failed)
    return WarmupStats(
        stats.tokens, stats.dtype, stats.activation_rms, stats.logit_max, time.monotonic() - started
    )


def _run(
    weights: Callable[[], Mapping[str, torch.Tensor]],
    model_config: Mapping[str, object],
    where: str,
    blocks: tuple[int, int],
    num_blocks: int,
    device: torch.device | str,
    beat: Callable[[], None] | None,
) -> WarmupStats:
    start, stop = blocks
    cfg = ModelConfig.from_json(model_config, where)
    stage = StageModel(cfg, weights(), start, stop, num_blocks, device)
    per_token = kv_bytes_per_token(cfg, stop - start, stage.dtype)
    cache = stage.new_cache((WARMUP_TOKENS + 1) * per_token)
    cache.reserve(_SEQ, WARMUP_TOKENS + 1)
    out = stage.forward(_input(stage, WARMUP_TOKENS, 0, start), [SeqChunk(_SEQ, 0, WARMUP_TOKENS)], cache)
    if beat is not None:
        beat()
    out = stage.forward(_input(stage, 1, WARMUP_TOKENS, start + 1), [SeqChunk(_SEQ, WARMUP_TOKENS, 1)], cache)
    if beat is not None:
        beat()
    if not bool(torch.isfinite(out).all()):
        raise ValueError("warmup produced non-finite activations: the weights are corrupt or mis-decoded")
    outf = out.float()
    return WarmupStats(
        tokens=WARMUP_TOKENS + 1,
        dtype=str(stage.dtype).removeprefix("torch."),
        activation_rms=0.0 if stage.last else float(outf.pow(2).mean().sqrt()),
        logit_max=float(outf.max()) if stage.last else None,
        seconds=0.0,
    )
