"""engine.config: every config.json variant transformers writes for Llama, Mistral and Qwen2 reads right,
RoPE frequencies equal transformers' own, and every unsupported setting is refused by key and file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from butterfly.engine.config import ConfigUnsupported, ModelConfig
from tests.hfmodels import hf_config

WHERE = "/models/x/config.json"


def saved_json(variant: str, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """config.json exactly as transformers' save_pretrained writes it."""
    hf_config(variant, **overrides).save_pretrained(tmp_path)
    raw: dict[str, Any] = json.loads((tmp_path / "config.json").read_text())
    return raw


def hf_inv_freq(variant: str, raw: dict[str, Any]) -> torch.Tensor:
    """transformers' RoPE inverse frequencies for a config.json dict, through its own rotary module."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }
    cfg = cls[variant].from_dict(dict(raw))
    inv: torch.Tensor = LlamaRotaryEmbedding(cfg).inv_freq
    return inv


def test_llama_saved_by_transformers(tmp_path: Path) -> None:
    raw = saved_json("llama", tmp_path)
    assert "rope_parameters" in raw and "rope_theta" not in raw  # the newer, nested form
    c = ModelConfig.from_json(raw, WHERE)
    assert (c.architecture, c.model_type) == ("LlamaForCausalLM", "llama")
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 4, 2, 24)
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings) == (True, True, True, False)
    assert c.rope.kind == "llama3" and c.rope.original_max_position_embeddings == 32
    assert c.sliding_window == (None,) * 4
    assert c.dtype is None and c.eos_token_ids == (2,)  # a bare config records no dtype
    torch.testing.assert_close(c.inv_freq(), hf_inv_freq("llama", raw), rtol=0, atol=0)


def test_qwen2_saved_by_transformers(tmp_path: Path) -> None:
    raw = saved_json("qwen2", tmp_path)
    c = ModelConfig.from_json(raw, WHERE)
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings) == (True, False, False, True)
    assert c.sliding_window == (None, None, 5, 5)
    assert c.head_dim == 16 and c.rope.kind == "default"
    torch.testing.assert_close(c.inv_freq(), hf_inv_freq("qwen2", raw), rtol=0, atol=0)


def test_mistral_saved_by_transformers(tmp_path: Path) -> None:
    raw = saved_json("mistral", tmp_path)
    c = ModelConfig.from_json(raw, WHERE)
    assert (c.qkv_bias, c.o_bias, c.mlp_bias) == (False, False, False)
    assert c.sliding_window == (4,) * 4
    assert c.rope.kind == "linear" and c.rope.factor == 2.0 and c.rope_theta == 5000.0
    torch.testing.assert_close(c.inv_freq(), hf_inv_freq("mistral", raw), rtol=0, atol=0)


LEGACY_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 100,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    "extra",
    [
        {"rope_theta": 500000.0},
        {"rope_theta": 500000.0, "rope_scaling": None},
        {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        },
        # llama3 without original_max_position_embeddings: transformers falls back to the context.
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        },
        {},  # no rope_theta at all: the default base
    ],
)
def test_legacy_top_level_rope_matches_transformers(extra: dict[str, Any]) -> None:
    raw = {**LEGACY_LLAMA, **extra}
    c = ModelConfig.from_json(raw, WHERE)
    assert c.dtype == torch.bfloat16
    assert c.rope_theta == extra.get("rope_theta", 10000.0)
    torch.testing.assert_close(c.inv_freq(), hf_inv_freq("llama", raw), rtol=0, atol=0)


def test_dtype_key_and_explicit_head_dim_and_eos_list() -> None:
    raw = {**LEGACY_LLAMA, "dtype": "float16", "head_dim": 32, "eos_token_id": [5, 7], "bos_token_id": 1}
    del raw["torch_dtype"]
    c = ModelConfig.from_json(raw, WHERE)
    assert c.dtype == torch.float16 and c.head_dim == 32 and c.eos_token_ids == (5, 7) and c.bos_token_id == 1


def test_qwen2_window_variants(tmp_path: Path) -> None:
    # Sliding window off: no layer has a window although sliding_window has a value.
    raw = saved_json("qwen2", tmp_path, use_sliding_window=False)
    assert ModelConfig.from_json(raw, WHERE).sliding_window == (None,) * 4
    # Configs written before layer_types existed: max_window_layers decides.
    raw = saved_json("qwen2", tmp_path, max_window_layers=1)
    del raw["layer_types"]
    assert ModelConfig.from_json(raw, WHERE).sliding_window == (None, 5, 5, 5)
    raw["use_sliding_window"] = False
    assert ModelConfig.from_json(raw, WHERE).sliding_window == (None,) * 4


def test_mistral_without_window() -> None:
    raw = {
        **LEGACY_LLAMA,
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "sliding_window": None,
    }
    assert ModelConfig.from_json(raw, WHERE).sliding_window == (None, None)


def test_model_type_only_config() -> None:
    raw = dict(LEGACY_LLAMA)
    del raw["architectures"]
    assert ModelConfig.from_json(raw, WHERE).architecture == "LlamaForCausalLM"


REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures", "unsupported architectures"),
    ({"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]}, "architectures", "unsupported"),
    ({"model_type": "qwen2"}, "model_type", "does not match"),
    ({"hidden_act": "gelu"}, "hidden_act", "only silu"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type", "'dynamic' RoPE"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type", "'yarn' RoPE"),
    (
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
        "rope_parameters.rope_type",
        "'longrope'",
    ),
    ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "rope_scaling.rope_type", "unknown RoPE type"),
    ({"rope_scaling": {"rope_type": "linear"}}, "factor", "finite number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor", "finite number"),
    (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
            }
        },
        "rope_scaling.high_freq_factor",
        "must exceed",
    ),
    (
        {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
        "rope_theta",
        "differs",
    ),
    (
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "default"},
                "sliding_attention": {"rope_type": "default"},
            }
        },
        "rope_parameters",
        "per-layer-type",
    ),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor", "partial rotary"),
    (
        {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
        "rope_parameters.partial_rotary_factor",
        "partial",
    ),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config", "quantized"),
    ({"num_key_value_heads": 3}, "num_key_value_heads", "does not divide"),
    ({"hidden_size": 66}, "head_dim", "not a multiple"),
    ({"head_dim": 15}, "head_dim", "even head_dim"),
    ({"sliding_window": 128}, "sliding_window", "Llama does not use a sliding window"),
    ({"num_hidden_layers": 0}, "num_hidden_layers", "integer >= 1"),
    ({"vocab_size": "many"}, "vocab_size", "integer >= 1"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps", "finite number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "true or false"),
    ({"attention_bias": 1}, "attention_bias", "true or false"),
    ({"torch_dtype": "float8_e4m3fn"}, "torch_dtype", "unsupported dtype"),
    ({"eos_token_id": [1, "x"]}, "eos_token_id", "token ids"),
]


@pytest.mark.parametrize(("change", "key", "words"), REFUSALS)
def test_refusals_name_the_key_and_the_file(change: dict[str, Any], key: str, words: str) -> None:
    raw = {**LEGACY_LLAMA, **change}
    with pytest.raises(ConfigUnsupported) as e:
        ModelConfig.from_json(raw, WHERE)
    assert e.value.key == key
    assert words in str(e.value)
    assert str(e.value).startswith(WHERE)


@pytest.mark.parametrize(
    ("model_type", "change", "key"),
    [
        ("qwen2", {"attention_bias": True}, "attention_bias"),
        ("mistral", {"mlp_bias": True}, "mlp_bias"),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention"]},
            "layer_types",
        ),
        ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types[1]"),
    ],
)
def test_family_specific_refusals(model_type: str, change: dict[str, Any], key: str) -> None:
    arch = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    raw = {**LEGACY_LLAMA, "architectures": [arch], "model_type": model_type, **change}
    with pytest.raises(ConfigUnsupported) as e:
        ModelConfig.from_json(raw, WHERE)
    assert e.value.key == key


def test_not_an_object() -> None:
    with pytest.raises(ConfigUnsupported, match="JSON object"):
        ModelConfig.from_json([], WHERE)  # type: ignore[arg-type]
