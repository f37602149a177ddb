"""loader.warmup: the engine's forward pass over an arena filled as the loader fills it."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from butterfly.engine.config import ModelConfig
from butterfly.engine.generate import Pipeline
from butterfly.engine.model import SeqChunk, StageModel
from butterfly.engine.weights import arena_weights
from butterfly.ipc import TensorPlacement
from butterfly.loader.process import place
from butterfly.loader.warmup import WARMUP_TOKENS, WarmupError, warmup_stage
from butterfly.weights.layout import LayerRange, ModelLayout, TensorEntry, load_layout
from butterfly.weights.testmodel import make_test_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelLayout]:
    path = make_test_model(
        tmp_path_factory.mktemp("w") / "m", layers=4, hidden=64, heads=4, kv_heads=2, vocab=128
    )
    return path, load_layout(path)


def fill_arena(
    path: Path, layout: ModelLayout, rng: LayerRange
) -> tuple[bytearray, list[TensorPlacement], list[TensorEntry]]:
    """What the loader's download step leaves: the range's tensors back to back, aligned."""
    tensors = layout.tensors_for_blocks(rng)
    placements, size = place(tensors)
    arena = bytearray(size)
    for t, p in zip(tensors, placements, strict=True):
        with open(path / t.file, "rb") as f:
            f.seek(t.offset)
            arena[p.arena_offset : p.arena_offset + p.length] = f.read(t.length)
    return arena, placements, tensors


@pytest.mark.parametrize(
    "rng", [LayerRange(0, 4), LayerRange(0, 1), LayerRange(1, 3), LayerRange(3, 4)], ids=str
)
def test_warmup_runs_the_engine_over_the_arena(model: tuple[Path, ModelLayout], rng: LayerRange) -> None:
    path, layout = model
    arena, placements, tensors = fill_arena(path, layout, rng)
    beats = []
    stats = warmup_stage(
        memoryview(arena),
        placements,
        tensors,
        layout.model_config,
        "cfg",
        (rng.start, rng.stop),
        4,
        beat=lambda: beats.append(1),
    )
    assert stats.tokens == WARMUP_TOKENS + 1 and stats.dtype == "float16" and len(beats) == 2
    if rng.stop == 4:
        assert stats.logit_max is not None and stats.logit_max == stats.logit_max
    else:
        assert stats.logit_max is None and stats.activation_rms > 0


def test_warmup_logits_are_the_engines(model: tuple[Path, ModelLayout]) -> None:
    """The pass warmup makes is the engine's own: the same stage over the same arena gives the same
    logits for the tokens warmup feeds (so serving runs exactly what was warmed up)."""
    path, layout = model
    arena, placements, tensors = fill_arena(path, layout, LayerRange(0, 4))
    cfg = ModelConfig.from_json(layout.model_config, "cfg")
    stage = StageModel(cfg, arena_weights(memoryview(arena), placements, tensors), 0, 4, 4)
    pipe = Pipeline([stage], 1 << 20)
    pipe.reserve(0, WARMUP_TOKENS + 1)
    ids = (torch.arange(0, WARMUP_TOKENS + 1) * 7919 + 1) % cfg.vocab_size
    pipe.step(ids[:WARMUP_TOKENS], [SeqChunk(0, 0, WARMUP_TOKENS)])
    logits = pipe.step(ids[WARMUP_TOKENS:], [SeqChunk(0, WARMUP_TOKENS, 1)])
    stats = warmup_stage(memoryview(arena), placements, tensors, layout.model_config, "cfg", (0, 4), 4)
    assert stats.logit_max == float(logits.max())


def test_corrupt_bytes_fail_warmup(model: tuple[Path, ModelLayout]) -> None:
    path, layout = model
    arena, placements, tensors = fill_arena(path, layout, LayerRange(1, 2))
    p = next(p for p in placements if p.name.endswith("mlp.down_proj.weight"))
    arena[p.arena_offset : p.arena_offset + 64] = b"\xff" * 64  # fp16 NaNs
    with pytest.raises(WarmupError, match="non-finite activations"):
        warmup_stage(memoryview(arena), placements, tensors, layout.model_config, "cfg", (1, 2), 4)


def test_unsupported_config_and_misfit_weights_fail_warmup(model: tuple[Path, ModelLayout]) -> None:
    path, layout = model
    arena, placements, tensors = fill_arena(path, layout, LayerRange(0, 2))
    view = memoryview(arena)
    bad = {**layout.model_config, "hidden_act": "gelu"}
    with pytest.raises(WarmupError, match="cfg: hidden_act: only silu"):
        warmup_stage(view, placements, tensors, bad, "cfg", (0, 2), 4)
    bad = {**layout.model_config, "intermediate_size": 100}
    with pytest.raises(WarmupError, match=r"mlp\.gate_proj\.weight has shape"):
        warmup_stage(view, placements, tensors, bad, "cfg", (0, 2), 4)
    missing = [p for p in placements if not p.name.endswith("layers.1.input_layernorm.weight")]
    with pytest.raises(WarmupError, match=r"layers\.1\.input_layernorm\.weight is missing"):
        warmup_stage(view, missing, tensors, layout.model_config, "cfg", (0, 2), 4)


def test_no_view_of_the_arena_outlives_warmup(model: tuple[Path, ModelLayout]) -> None:
    """The loader unmaps the arena for its next assignment: warmup must leave no export behind."""
    import mmap

    path, layout = model
    arena, placements, tensors = fill_arena(path, layout, LayerRange(0, 2))
    m = mmap.mmap(-1, len(arena))
    m[:] = arena
    warmup_stage(m, placements, tensors, layout.model_config, "cfg", (0, 2), 4)
    with pytest.raises(WarmupError):
        warmup_stage(m, placements, tensors, {**layout.model_config, "hidden_act": "relu"}, "cfg", (0, 2), 4)
    gc.collect()  # what the loader does when a failed warmup's frames still hold views
    m.close()
