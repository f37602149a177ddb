"""The decoder's hyper-parameters, read from a checkpoint's config.json (Llama, Mistral, Qwen2).

Owns ``ModelConfig.from_json``: every variant of config.json that ``transformers`` writes for these
three architectures (old and new: ``rope_theta`` at the top level or nested under ``rope_parameters``,
``rope_scaling`` with ``type`` or ``rope_type``, ``torch_dtype`` or ``dtype``, Qwen2's
``use_sliding_window``/``max_window_layers``/``layer_types``) becomes one frozen, typed value, and the
RoPE inverse frequencies (``inv_freq``) for the scaling types we implement exactly: default, linear,
llama3.

Anything we would compute differently from ``transformers`` is refused with a ``ConfigUnsupported``
naming the key and the file (dynamic/yarn/longrope RoPE, an activation other than SiLU, a partial
rotary factor, quantization...). Must not: read files (the caller hands the parsed JSON and says where
it came from), or guess a value that changes the maths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["ARCHITECTURES", "ConfigUnsupported", "ModelConfig", "RopeScaling"]

# architectures[0] -> model_type: the families whose blocks are all RMSNorm, GQA + RoPE, SwiGLU.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ROPE_TYPES = ("default", "linear", "llama3")
# RoPE types transformers knows but we do not implement: refused by name rather than approximated.
_ROPE_REFUSED = {
    "dynamic": "its frequencies depend on the running sequence length",
    "yarn": "not implemented here",
    "longrope": "not implemented here",
    "proportional": "not implemented here",
}
# Keys whose presence means the weights or the maths are not what this engine computes.
_REFUSED_KEYS = {"quantization_config": "quantized checkpoints are not supported"}
DEFAULT_ROPE_THETA = 10000.0

RopeType = Literal["default", "linear", "llama3"]


class ConfigUnsupported(ValueError):
    """config.json asks for something this engine does not compute; ``key`` names the setting."""

    def __init__(self, where: str, key: str, detail: str) -> None:
        super().__init__(f"{where}: {key}: {detail}")
        self.where = where
        self.key = key
        self.detail = detail


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are scaled: ``kind`` and the parameters that kind reads."""

    kind: RopeType = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """One decoder's shape and numerics. Build with ``from_json``; every field is checked there."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """q_proj, k_proj and v_proj carry biases (Qwen2 always; Llama with ``attention_bias``)."""
    o_bias: bool
    """o_proj carries a bias (Llama with ``attention_bias``)."""
    mlp_bias: bool
    """gate/up/down projections carry biases (Llama with ``mlp_bias``)."""
    sliding_window: tuple[int | None, ...]
    """Per layer: the attention window in tokens (a query sees itself and the W-1 before), or None."""
    dtype: torch.dtype | None
    """``torch_dtype``/``dtype`` as config.json says (informative: the engine runs in the stored dtype)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, raw: Mapping[str, object], where: str) -> ModelConfig:
        """Read a parsed config.json; ``where`` (a path or URL) is named in every error."""
        return _Reader(raw, where).read()

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, float32 [head_dim // 2], exactly as transformers computes them."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
        r = self.rope
        if r.kind == "linear":
            return inv / r.factor
        if r.kind == "llama3":
            old = r.original_max_position_embeddings
            low_wavelen = old / r.low_freq_factor
            high_wavelen = old / r.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / r.factor, inv)
            smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
            smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


class _Reader:
    def __init__(self, raw: Mapping[str, object], where: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigUnsupported(where, "(file)", "config.json must be a JSON object")
        self.raw = raw
        self.where = where

    def fail(self, key: str, detail: str) -> ConfigUnsupported:
        return ConfigUnsupported(self.where, key, detail)

    def int_(self, key: str, default: int | None = None, *, minimum: int = 1, src: object = None) -> int:
        table = self.raw if src is None else src
        assert isinstance(table, Mapping)
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def float_(self, key: str, default: float | None = None, *, src: object = None) -> float:
        table = self.raw if src is None else src
        assert isinstance(table, Mapping)
        value = table.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {value!r}")
        if value <= 0:
            raise self.fail(key, f"must be positive, got {value!r}")
        return float(value)

    def bool_(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def read(self) -> ModelConfig:
        arch, model_type = self.architecture()
        for key, why in _REFUSED_KEYS.items():
            if self.raw.get(key) is not None:
                raise self.fail(key, why)
        act = self.raw.get("hidden_act", "silu")
        # transformers' ACT2FN maps "swish" to the same SiLU module.
        if act not in ("silu", "swish"):
            raise self.fail("hidden_act", f"only silu is supported, got {act!r}")
        hidden = self.int_("hidden_size")
        heads = self.int_("num_attention_heads")
        kv_heads = self.int_("num_key_value_heads", heads)
        if heads % kv_heads:
            raise self.fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
        head_dim_raw = self.raw.get("head_dim")
        if head_dim_raw is None:
            if hidden % heads:
                raise self.fail("head_dim", f"absent, and hidden_size={hidden} is not a multiple of {heads}")
            head_dim = hidden // heads
        else:
            head_dim = self.int_("head_dim")
        if head_dim % 2:
            raise self.fail("head_dim", f"RoPE needs an even head_dim, got {head_dim}")
        layers = self.int_("num_hidden_layers")
        theta, rope = self.rope()
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
            for key in ("attention_bias", "mlp_bias"):
                if self.raw.get(key):
                    raise self.fail(key, "Qwen2 has fixed biases (q/k/v only); this key is not Qwen2's")
        elif model_type == "llama":
            attn_bias = self.bool_("attention_bias", False)
            qkv_bias, o_bias, mlp_bias = attn_bias, attn_bias, self.bool_("mlp_bias", False)
        else:
            qkv_bias = o_bias = mlp_bias = False
            for key in ("attention_bias", "mlp_bias"):
                if self.raw.get(key):
                    raise self.fail(key, "Mistral has no biases; this key is not Mistral's")
        return ModelConfig(
            architecture=arch,
            model_type=model_type,
            vocab_size=self.int_("vocab_size"),
            hidden_size=hidden,
            intermediate_size=self.int_("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=self.float_("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope=rope,
            max_position_embeddings=self.int_("max_position_embeddings", 2048),
            tie_word_embeddings=self.bool_("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=self.windows(model_type, layers),
            dtype=self.dtype(),
            bos_token_id=self.token_id("bos_token_id"),
            eos_token_ids=self.eos_ids(),
        )

    def architecture(self) -> tuple[str, str]:
        archs = self.raw.get("architectures")
        model_type = self.raw.get("model_type")
        if archs is None:
            # Configs saved from a bare config object carry only model_type.
            by_type = {v: k for k, v in ARCHITECTURES.items()}
            if model_type not in by_type:
                raise self.fail(
                    "model_type", f"unsupported model_type {model_type!r} (supported: {sorted(by_type)})"
                )
            assert isinstance(model_type, str)
            return by_type[model_type], model_type
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise self.fail(
                "architectures",
                f"unsupported architectures {archs!r} (supported: one of {sorted(ARCHITECTURES)})",
            )
        arch = archs[0]
        expected = ARCHITECTURES[arch]
        if model_type is not None and model_type != expected:
            raise self.fail(
                "model_type", f"{model_type!r} does not match architectures {arch} ({expected!r})"
            )
        return arch, expected

    def rope(self) -> tuple[float, RopeScaling]:
        top_theta = self.raw.get("rope_theta")
        params = self.raw.get("rope_parameters")
        key = "rope_parameters"
        if params is None:
            params, key = self.raw.get("rope_scaling"), "rope_scaling"
        elif self.raw.get("rope_scaling") is not None and self.raw.get("rope_scaling") != params:
            raise self.fail("rope_scaling", "differs from rope_parameters; which one holds is ambiguous")
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise self.fail(key, f"must be an object, got {params!r}")
        if any(isinstance(v, Mapping) for v in params.values()):
            raise self.fail(key, "per-layer-type RoPE parameters are not supported")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind in _ROPE_REFUSED:
            raise self.fail(f"{key}.rope_type", f"{kind!r} RoPE is not supported: {_ROPE_REFUSED[kind]}")
        if kind not in _ROPE_TYPES:
            raise self.fail(
                f"{key}.rope_type", f"unknown RoPE type {kind!r} (supported: {list(_ROPE_TYPES)})"
            )
        for table, name in ((params, f"{key}.partial_rotary_factor"), (self.raw, "partial_rotary_factor")):
            if table.get("partial_rotary_factor", 1.0) not in (None, 1.0):
                raise self.fail(name, "partial rotary embeddings are not supported")
        nested_theta = params.get("rope_theta")
        if nested_theta is not None and top_theta is not None and nested_theta != top_theta:
            raise self.fail("rope_theta", f"{top_theta!r} differs from {key}.rope_theta={nested_theta!r}")
        if nested_theta is not None:
            theta = self.float_("rope_theta", src=params)
        else:
            theta = self.float_("rope_theta", DEFAULT_ROPE_THETA)
        if kind == "default":
            return theta, RopeScaling()
        factor = self.float_("factor", src=params)
        if kind == "linear":
            return theta, RopeScaling("linear", factor)
        low = self.float_("low_freq_factor", src=params)
        high = self.float_("high_freq_factor", src=params)
        if high <= low:
            raise self.fail(f"{key}.high_freq_factor", f"must exceed low_freq_factor ({high} <= {low})")
        default_old = self.int_("max_position_embeddings", 2048)
        old = self.int_("original_max_position_embeddings", default_old, src=params)
        return theta, RopeScaling("llama3", factor, low, high, old)

    def windows(self, model_type: str, layers: int) -> tuple[int | None, ...]:
        window = self.raw.get("sliding_window")
        if window is not None:
            window = self.int_("sliding_window")
        if model_type == "llama":
            # Llama has no sliding window; a config that asks for one would be computed without it.
            if window is not None:
                raise self.fail("sliding_window", "Llama does not use a sliding window")
            return (None,) * layers
        if model_type == "mistral":
            return (window,) * layers
        # Qwen2: the window applies only with use_sliding_window, to the layers layer_types names
        # (or, in configs older than layer_types, to layers >= max_window_layers).
        if not self.bool_("use_sliding_window", False):
            window = None
        types = self.raw.get("layer_types")
        if types is None:
            first = self.int_("max_window_layers", layers, minimum=0)
            types = [
                "sliding_attention" if window is not None and i >= first else "full_attention"
                for i in range(layers)
            ]
        if not isinstance(types, list) or len(types) != layers:
            raise self.fail("layer_types", f"must list one type per layer ({layers}), got {types!r}")
        for i, t in enumerate(types):
            if t not in ("full_attention", "sliding_attention"):
                raise self.fail(f"layer_types[{i}]", f"unknown attention type {t!r}")
        return tuple(window if t == "sliding_attention" else None for t in types)

    def dtype(self) -> torch.dtype | None:
        for key in ("dtype", "torch_dtype"):
            value = self.raw.get(key)
            if value is None:
                continue
            if value not in _DTYPES:
                raise self.fail(key, f"unsupported dtype {value!r} (supported: {sorted(_DTYPES)})")
            assert isinstance(value, str)
            return _DTYPES[value]
        return None

    def token_id(self, key: str) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return None
        return self.int_(key, minimum=0)

    def eos_ids(self) -> tuple[int, ...]:
        value = self.raw.get("eos_token_id")
        if value is None:
            return ()
        if isinstance(value, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                raise self.fail("eos_token_id", f"must be token ids, got {value!r}")
            return tuple(value)
        return (self.int_("eos_token_id", minimum=0),)
