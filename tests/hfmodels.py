"""Tiny checkpoints saved by transformers itself, the engine's correctness reference (tests and bench).

Each variant exercises what its family's config.json can ask for: Llama untied with attention and MLP
biases, an explicit head_dim and llama3 RoPE scaling; Qwen2 tied with its q/k/v biases and a sliding
window on the upper layers; Mistral with a sliding window and linear RoPE scaling. Weights are random
(seeded) and larger than transformers' init, biases and norms included, so every term shows in the
logits. Imports transformers, so only tests and benchmarks may use this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VARIANTS = ("llama", "qwen2", "mistral")

_COMMON: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}


def hf_config(variant: str, **overrides: Any) -> Any:
    import transformers

    kw = dict(_COMMON)
    if variant == "llama":
        kw.update(
            head_dim=24,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
        kw.update(overrides)
        return transformers.LlamaConfig(**kw)
    if variant == "qwen2":
        kw.update(tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=2)
        kw.update(overrides)
        return transformers.Qwen2Config(**kw)
    if variant == "mistral":
        kw.update(
            sliding_window=4,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
        )
        kw.update(overrides)
        return transformers.MistralConfig(**kw)
    raise ValueError(variant)


def make_hf_model(variant: str, seed: int = 0, **overrides: Any) -> Any:
    """A transformers model of ``variant`` in float32, eval mode, with every parameter randomised."""
    import transformers

    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[variant]
    torch.manual_seed(seed)
    cfg = hf_config(variant, **overrides)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def save_hf_model(variant: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """``make_hf_model`` saved with save_pretrained (safetensors) into ``out``, in ``dtype``."""
    model = make_hf_model(variant, seed).to(dtype)
    model.save_pretrained(out)
    return out
