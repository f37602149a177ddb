"""Warmup: one real forward pass of this node's stage over a few tokens, on the loaded bytes.

It touches every weight matrix of the stage (so a later request finds them hot) and checks the
activations stay finite: a checkpoint whose bytes decode to NaN/Inf, or whose shapes do not fit
together, fails here instead of on a user's request. The CPU path uses numpy in float32; the GPU
path (weights issue) runs the same maths on the device.

Llama-family block: RMSNorm -> GQA attention with RoPE -> residual -> RMSNorm -> SwiGLU MLP ->
residual. Qwen2's q/k/v biases are applied when present. This module must not read files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

WARMUP_TOKENS = 4


class WarmupError(Exception):
    pass


def decode(raw: memoryview | bytes, dtype: str, shape: list[int]) -> F32:
    """Bytes of one tensor as float32 (bfloat16 widened by shifting into the high half)."""
    if dtype == "BF16":
        u16 = np.frombuffer(raw, dtype="<u2")
        out = (u16.astype(np.uint32) << 16).view(np.float32)
    elif dtype in ("F16", "F32", "F64"):
        out = np.frombuffer(raw, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]).astype(np.float32)
    else:
        raise WarmupError(f"warmup cannot run {dtype} weights")
    return out.reshape(shape)


def _rms_norm(x: F32, w: F32, eps: float) -> F32:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps) * w).astype(np.float32)


def _rope(x: F32, theta: float) -> F32:
    t, _, d = x.shape
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    ang = np.outer(np.arange(t, dtype=np.float32), inv)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)


def _block(x: F32, w: Mapping[str, F32], cfg: Mapping[str, Any]) -> F32:
    eps = float(cfg.get("rms_norm_eps", 1e-5))
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    hd = int(cfg.get("head_dim", int(cfg["hidden_size"]) // heads))
    t = x.shape[0]

    h = _rms_norm(x, w["input_layernorm.weight"], eps)

    def proj(name: str) -> F32:
        y = h @ w[f"self_attn.{name}.weight"].T
        bias = w.get(f"self_attn.{name}.bias")
        return y + bias if bias is not None else y

    q = _rope(proj("q_proj").reshape(t, heads, hd), float(cfg.get("rope_theta", 10000.0)))
    k = _rope(proj("k_proj").reshape(t, kv_heads, hd), float(cfg.get("rope_theta", 10000.0)))
    v = proj("v_proj").reshape(t, kv_heads, hd)
    rep = heads // kv_heads
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    scores = scores + np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    attn = np.einsum("hts,shd->thd", probs, v).reshape(t, heads * hd)
    x = x + attn @ w["self_attn.o_proj.weight"].T

    h = _rms_norm(x, w["post_attention_layernorm.weight"], eps)
    gate = h @ w["mlp.gate_proj.weight"].T
    up = h @ w["mlp.up_proj.weight"].T
    x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ w["mlp.down_proj.weight"].T
    return x.astype(np.float32)


def run_stage(
    tensors: Mapping[str, F32], cfg: Mapping[str, Any], start: int, stop: int, num_blocks: int
) -> dict[str, float]:
    """Run blocks [start, stop) (with embeddings if first, head if last); returns a few statistics."""
    hidden = int(cfg["hidden_size"])
    try:
        if start == 0:
            ids = np.arange(1, WARMUP_TOKENS + 1) % int(cfg["vocab_size"])
            x = tensors["model.embed_tokens.weight"][ids].astype(np.float32)
        else:
            # A middle stage gets activations from its predecessor; a fixed pseudo-input stands in.
            x = np.random.default_rng(start).standard_normal((WARMUP_TOKENS, hidden)).astype(np.float32)
        for b in range(start, stop):
            prefix = f"model.layers.{b}."
            w = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            x = _block(x, w, cfg)
        stats = {"activation_rms": float(np.sqrt(np.mean(x * x)))}
        if stop == num_blocks:
            x = _rms_norm(x, tensors["model.norm.weight"], float(cfg.get("rms_norm_eps", 1e-5)))
            head = tensors.get("lm_head.weight", tensors.get("model.embed_tokens.weight"))
            if head is None:
                raise WarmupError("the last stage has neither lm_head.weight nor tied embeddings")
            logits = x @ head.T
            stats["logit_max"] = float(np.max(logits))
            x = logits
    except KeyError as e:
        raise WarmupError(f"warmup needs tensor {e.args[0]!r}, which this stage did not load") from e
    except ValueError as e:
        raise WarmupError(f"weights do not fit together: {e}") from e
    if not np.all(np.isfinite(x)):
        raise WarmupError("warmup produced non-finite activations: the weights are corrupt or mis-decoded")
    return stats
