"""engine.model against transformers on checkpoints transformers saved itself.

For Llama (untied, biases, explicit head_dim, llama3 RoPE), Qwen2 (tied, q/k/v biases, sliding window
on upper layers) and Mistral (sliding window, linear RoPE): the stage model run as 1, 2 and 3 stages
gives the final logits of transformers (fp32, abs 1e-4), greedy generation gives transformers'
generate() tokens, and sequences batched together (prefill and decode mixed) each get what they get
alone. bf16 and fp16 checkpoints run in their stored dtype, within a stated tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from butterfly.engine.generate import Pipeline, generate
from butterfly.engine.model import SeqChunk, StageModel, WeightError
from butterfly.engine.weights import ModelDir, open_model_dir
from butterfly.weights.layout import LayerRange
from tests.hfmodels import VARIANTS, make_hf_model, save_hf_model

FP32_ATOL = 1e-4
# Two processes share two cores under xdist: more threads per process only adds contention.
torch.set_num_threads(1)
KV_BYTES = 16 << 20
# 1, 2 and 3 stages over the 4-block models; uneven cuts included.
SPLITS = [(0, 4), (0, 1, 4), (0, 3, 4), (0, 1, 2, 4)]
PROMPT_LENGTHS = [1, 3, 9, 17]


@dataclass
class Ckpt:
    variant: str
    path: Path
    ref: Any
    opened: ModelDir


@pytest.fixture(scope="module", params=VARIANTS)
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ckpt]:
    variant = request.param
    path = save_hf_model(variant, tmp_path_factory.mktemp(variant) / "model")
    opened = open_model_dir(path)
    yield Ckpt(variant, path, make_hf_model(variant), opened)
    opened.close()


def prompt(n: int, seed: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def pipeline(md: ModelDir, cuts: tuple[int, ...]) -> Pipeline:
    stages = [
        StageModel(md.config, md.weights, a, b, md.layout.num_blocks)
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    return Pipeline(stages, KV_BYTES)


def ref_last_logits(ref: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = ref(ids[None]).logits[0, -1].float()
    return out


@pytest.mark.parametrize("cuts", SPLITS, ids=lambda c: "-".join(map(str, c)))
def test_logits_match_transformers(ckpt: Ckpt, cuts: tuple[int, ...]) -> None:
    pipe = pipeline(ckpt.opened, cuts)
    for i, n in enumerate(PROMPT_LENGTHS):
        ids = prompt(n, seed=i)
        pipe.reserve(i, n)
        got = pipe.step(ids, [SeqChunk(i, 0, n)])
        pipe.free(i)
        assert got.dtype == torch.float32 and got.shape == (1, 96)
        torch.testing.assert_close(got[0], ref_last_logits(ckpt.ref, ids), rtol=0, atol=FP32_ATOL)


def test_every_position_matches_while_decoding(ckpt: Ckpt, half_kernel: str) -> None:
    """Token by token through the KV cache (past every sliding window) equals the full-prefix logits."""
    pipe = pipeline(ckpt.opened, (0, 2, 4))
    ids = prompt(14, seed=7)
    with torch.no_grad():
        want = ckpt.ref(ids[None]).logits[0].float()
    pipe.reserve(0, 14)
    for pos in range(14):
        got = pipe.step(ids[pos : pos + 1], [SeqChunk(0, pos, 1)])
        torch.testing.assert_close(got[0], want[pos], rtol=0, atol=FP32_ATOL)


def test_greedy_generation_matches_transformers(ckpt: Ckpt, half_kernel: str) -> None:
    eos = ckpt.opened.config.eos_token_ids
    for cuts in [(0, 4), (0, 1, 2, 4)]:
        pipe = pipeline(ckpt.opened, cuts)
        for i, n in enumerate([2, 11]):
            ids = prompt(n, seed=20 + i)
            want = ckpt.ref.generate(ids[None], max_new_tokens=12, do_sample=False, pad_token_id=0)[
                0, n:
            ].tolist()
            got = generate(pipe, ids.tolist(), 12, stop_ids=eos)
            assert got == want, (cuts, n)


def test_mixed_batches_equal_each_sequence_alone(ckpt: Ckpt, half_kernel: str) -> None:
    """Continuous batching: sequences join (prefill) while others decode; each gets its solo logits."""
    md = ckpt.opened
    prompts = {10: prompt(6, 1), 11: prompt(13, 2), 12: prompt(1, 3), 13: prompt(8, 4)}
    solo_pipe = pipeline(md, (0, 4))

    def solo(seq: torch.Tensor) -> list[torch.Tensor]:
        """Logits after each position of ``seq`` fed as prompt then one token at a time."""
        out = []
        solo_pipe.reserve(99, seq.shape[0] + 1)
        out.append(solo_pipe.step(seq[:4], [SeqChunk(99, 0, min(4, seq.shape[0]))])[0])
        for p in range(4, seq.shape[0]):
            out.append(solo_pipe.step(seq[p : p + 1], [SeqChunk(99, p, 1)])[0])
        solo_pipe.free(99)
        return out

    # Every sequence: a prompt of up to 4 tokens, then decode steps with its own continuation.
    full = {s: torch.cat([p, prompt(5, s)]) for s, p in prompts.items()}
    want = {s: solo(full[s]) for s in full}

    pipe = pipeline(md, (0, 2, 4))
    pos = dict.fromkeys(full, 0)
    step_of = dict.fromkeys(full, 0)
    joined: list[int] = []
    for step in range(20):
        if step < len(full):
            joined.append(list(full)[step])  # one new sequence joins per step
        chunks, toks = [], []
        for s in joined:
            if pos[s] >= full[s].shape[0]:
                continue
            n = min(4, full[s].shape[0]) if pos[s] == 0 else 1
            if pos[s] == 0:
                pipe.reserve(s, full[s].shape[0] + 1)
            chunks.append(SeqChunk(s, pos[s], n))
            toks.append(full[s][pos[s] : pos[s] + n])
        if not chunks:
            break
        logits = pipe.step(torch.cat(toks), chunks)
        for row, c in zip(logits, chunks, strict=True):
            torch.testing.assert_close(row, want[c.seq_id][step_of[c.seq_id]], rtol=0, atol=1e-5)
            step_of[c.seq_id] += 1
            pos[c.seq_id] += c.n_tokens
    assert all(step_of[s] == len(want[s]) for s in full)


def test_chunked_prefill_equals_one_prefill(ckpt: Ckpt) -> None:
    """A prompt fed in pieces (positions > 0 with several tokens: the masked path) gives the same logits."""
    pipe = pipeline(ckpt.opened, (0, 4))
    ids = prompt(15, seed=5)
    pipe.reserve(1, 15)
    pipe.step(ids[:6], [SeqChunk(1, 0, 6)])
    got = pipe.step(ids[6:], [SeqChunk(1, 6, 9)])
    torch.testing.assert_close(got[0], ref_last_logits(ckpt.ref, ids), rtol=0, atol=FP32_ATOL)


# Stated tolerance for half precision: the engine's logits stay within HALF_ATOL of transformers' in
# the same dtype AND of the fp32 reference. Measured on these models (logits up to ~3.5): bf16 differs
# by up to 0.06 from either (transformers' own bf16 is 0.04-0.10 from fp32), fp16 by up to 0.01.
HALF_ATOL = {torch.bfloat16: 0.125, torch.float16: 0.02}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_runs_in_stored_dtype(
    variant: str, dtype: torch.dtype, tmp_path: Path, half_kernel: str
) -> None:
    path = save_hf_model(variant, tmp_path / "m", dtype=dtype)
    md = open_model_dir(path)
    stage = StageModel(md.config, md.weights, 0, 4, 4)
    assert stage.dtype == dtype
    # The weights are the mmap'd bytes themselves: not copied, not widened.
    w = md.weights["model.layers.0.mlp.down_proj.weight"]
    assert stage.blocks[0].down.ws[0].data_ptr() == w.data_ptr() and w.dtype == dtype
    ref32 = make_hf_model(variant)
    ref = make_hf_model(variant).to(dtype)
    pipe = Pipeline([stage], KV_BYTES)
    for i, n in enumerate([3, 12]):
        ids = prompt(n + 2, seed=40 + i)
        pipe.reserve(i, n + 2)
        got = pipe.step(ids[:n], [SeqChunk(i, 0, n)])[0]
        # Then two decode steps, which read the cache in the stored dtype.
        for p in (n, n + 1):
            torch.testing.assert_close(got, ref_last_logits(ref, ids[:p]), rtol=0, atol=HALF_ATOL[dtype])
            torch.testing.assert_close(got, ref_last_logits(ref32, ids[:p]), rtol=0, atol=HALF_ATOL[dtype])
            got = pipe.step(ids[p : p + 1], [SeqChunk(i, p, 1)])[0]
        torch.testing.assert_close(got, ref_last_logits(ref, ids), rtol=0, atol=HALF_ATOL[dtype])
        torch.testing.assert_close(got, ref_last_logits(ref32, ids), rtol=0, atol=HALF_ATOL[dtype])
    # The files cannot be unmapped under a stage that still uses them...
    with pytest.raises(BufferError):
        md.close()
    # ...and can once it is gone.
    del stage, pipe, w
    md.close()


@pytest.mark.x86
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_decode_step_multiplies_each_layer_in_four_kernel_calls(
    variant: str, tmp_path: Path, native_kernel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q, k and v in one call and gate and up in one (then o and down): the weights are checked once,
    when the stage is built, and a step passes them to the kernel together."""
    md = open_model_dir(save_hf_model(variant, tmp_path / "m", dtype=torch.bfloat16))
    stage = StageModel(md.config, md.weights, 0, 4, 4)
    calls: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            f = getattr(native_kernel, name)
            if name != "matmuls":
                return f
            return lambda *a: (calls.append(len(a[-1])), f(*a))[1]

    pipe = Pipeline([stage], KV_BYTES)
    pipe.reserve(0, 8)
    ids = prompt(6, seed=3)
    want = pipe.step(ids[:5], [SeqChunk(0, 0, 5)])
    monkeypatch.setattr("butterfly.engine.model.NATIVE", Counting())
    got = pipe.step(ids[5:6], [SeqChunk(0, 5, 1)])
    assert calls == [3, 1, 2, 1] * 4 + [1]  # and the LM head
    assert got.shape == want.shape and torch.isfinite(got).all()


def test_stage_weights_are_views_of_the_mapped_files(ckpt: Ckpt) -> None:
    md = ckpt.opened
    stage = StageModel(md.config, md.weights, 1, 3, 4)
    assert not stage.first and not stage.last and stage.embed is None and stage.head is None
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"):
        assert md.weights[name].data_ptr() in {
            w.data_ptr() for b in stage.blocks for w in (b.qkv.ws[0], b.gate_up.ws[1])
        }


def test_only_the_ranges_weights_are_opened(ckpt: Ckpt) -> None:
    md = open_model_dir(ckpt.path, LayerRange(1, 3))
    try:
        assert {n.split(".")[2] for n in md.weights} == {"1", "2"}
        StageModel(md.config, md.weights, 1, 3, 4)
        with pytest.raises(WeightError, match="model.embed_tokens.weight is missing"):
            StageModel(md.config, md.weights, 0, 3, 4)
    finally:
        md.close()


def test_weight_problems_are_named(ckpt: Ckpt) -> None:
    md = ckpt.opened
    w = dict(md.weights)
    del w["model.layers.1.mlp.gate_proj.weight"]
    with pytest.raises(WeightError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight is missing"):
        StageModel(md.config, w, 0, 4, 4)
    w = dict(md.weights)
    w["model.layers.0.input_layernorm.weight"] = torch.ones(3)
    with pytest.raises(WeightError, match=r"input_layernorm\.weight has shape \[3\]"):
        StageModel(md.config, w, 0, 2, 4)
    w = dict(md.weights)
    w["model.layers.0.self_attn.o_proj.weight"] = w["model.layers.0.self_attn.o_proj.weight"].double()
    with pytest.raises(WeightError, match="float64"):
        StageModel(md.config, w, 0, 1, 4)
    w = dict(md.weights)
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"].half()
    with pytest.raises(WeightError, match="float16 but the stage's other weights are torch.float32"):
        StageModel(md.config, w, 0, 1, 4)
    w = dict(md.weights)
    if md.config.mlp_bias:
        del w["model.layers.0.mlp.up_proj.bias"]
        with pytest.raises(WeightError, match="up_proj.bias is missing"):
            StageModel(md.config, w, 0, 1, 4)
    else:
        w["model.layers.0.mlp.up_proj.bias"] = torch.zeros(md.config.intermediate_size)
        with pytest.raises(WeightError, match="no such bias"):
            StageModel(md.config, w, 0, 1, 4)
    w = dict(md.weights)
    w["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightError, match="not part of a"):
        StageModel(md.config, w, 0, 1, 4)
    if md.config.tie_word_embeddings:
        w = dict(md.weights)
        w["lm_head.weight"] = w["model.embed_tokens.weight"]
        with pytest.raises(WeightError, match="ties it to the embeddings"):
            StageModel(md.config, w, 3, 4, 4)
    with pytest.raises(ValueError, match="num_blocks=5"):
        StageModel(md.config, md.weights, 0, 4, 5)


def test_forward_refuses_inconsistent_steps(ckpt: Ckpt) -> None:
    md = ckpt.opened
    first = StageModel(md.config, md.weights, 0, 2, 4)
    second = StageModel(md.config, md.weights, 2, 4, 4)
    cache = first.new_cache(KV_BYTES)
    cache.reserve(1, 8)
    cache.reserve(2, 8)
    with pytest.raises(ValueError, match="at least one chunk"):
        first.forward(prompt(2, 0), [], cache)
    with pytest.raises(ValueError, match="takes 3 token ids"):
        first.forward(prompt(2, 0), [SeqChunk(1, 0, 3)], cache)
    with pytest.raises(ValueError, match="token ids must be in"):
        first.forward(torch.tensor([96]), [SeqChunk(1, 0, 1)], cache)
    with pytest.raises(ValueError, match="appears twice"):
        first.forward(prompt(2, 0), [SeqChunk(1, 0, 1), SeqChunk(1, 1, 1)], cache)
    with pytest.raises(ValueError, match="only 0 are cached"):
        first.forward(prompt(1, 0), [SeqChunk(1, 2, 1)], cache)
    with pytest.raises(ValueError, match="exceed its reservation of 8"):
        first.forward(prompt(9, 0), [SeqChunk(1, 0, 9)], cache)
    with pytest.raises(KeyError, match="sequence 3 has no KV cache reservation"):
        first.forward(prompt(1, 0), [SeqChunk(3, 0, 1)], cache)
    with pytest.raises(ValueError, match="the cache holds blocks"):
        second.forward(torch.zeros(1, 64), [SeqChunk(1, 0, 1)], cache)
    other = second.new_cache(KV_BYTES)
    other.reserve(1, 8)
    with pytest.raises(ValueError, match=r"takes hidden states \[1, 64\]"):
        second.forward(torch.zeros(2, 64), [SeqChunk(1, 0, 1)], other)
    # A failed step records nothing: the sequence still starts at position 0.
    assert cache.length(1) == 0
