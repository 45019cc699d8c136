"""Typed configuration of the decoder families specray runs (Llama, Qwen3, Gemma 3).

The three families share one implementation; these fields are the switches between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["llama", "qwen3", "gemma3"]
LayerType = Literal["full_attention", "sliding_attention"]

_MODEL_TYPE_TO_FAMILY: dict[str, Family] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling_type: Literal["default", "linear"] = "default"
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self.theta}, {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    # Gemma 3 runs sliding layers with their own (local) RoPE base.
    rope_local: RopeConfig | None = None
    layer_types: tuple[LayerType, ...] = ()
    sliding_window: int | None = None
    tie_word_embeddings: bool = True
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"
    attention_bias: bool = False
    # Softmax scale is query_pre_attn_scalar ** -0.5 (Gemma) instead of head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)} layer types for {self.num_layers} layers")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding-attention layers need a sliding_window")

    # Family switches, named for what they change.
    @property
    def qk_norm(self) -> bool:
        return self.family in ("qwen3", "gemma3")

    @property
    def sandwich_norm(self) -> bool:
        return self.family == "gemma3"

    @property
    def norm_adds_one(self) -> bool:
        """Gemma stores RMSNorm weights as offsets from 1."""
        return self.family == "gemma3"

    @property
    def embedding_scale(self) -> float:
        return math.sqrt(self.hidden_size) if self.family == "gemma3" else 1.0

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def layer_rope(self, layer: int) -> RopeConfig:
        if self.layer_types[layer] == "sliding_attention" and self.rope_local is not None:
            return self.rope_local
        return self.rope

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict (text part for multimodal Gemma 3)."""
        if "text_config" in hf:
            hf = {**hf["text_config"], "model_type": hf["text_config"].get("model_type", "gemma3_text")}
        model_type = hf.get("model_type", "")
        if model_type not in _MODEL_TYPE_TO_FAMILY:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {sorted(_MODEL_TYPE_TO_FAMILY)}"
            )
        family = _MODEL_TYPE_TO_FAMILY[model_type]
        rope_params = hf.get("rope_parameters") or {}
        if family == "gemma3":
            rope = _rope_from_hf(rope_params.get("full_attention", {}), hf, hf.get("rope_theta", 1_000_000.0))
            rope_local = _rope_from_hf(
                rope_params.get("sliding_attention", {}), {}, hf.get("rope_local_base_freq", 10_000.0)
            )
        else:
            rope = _rope_from_hf(rope_params, hf, hf.get("rope_theta", 10_000.0))
            rope_local = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        num_heads = hf["num_attention_heads"]
        layer_types = tuple(hf.get("layer_types") or ())
        uses_sliding = "sliding_attention" in layer_types
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            rope=rope,
            rope_local=rope_local,
            layer_types=layer_types,
            sliding_window=hf.get("sliding_window") if uses_sliding else None,
            tie_word_embeddings=hf.get("tie_word_embeddings", family == "gemma3"),
            hidden_act="gelu_pytorch_tanh" if family == "gemma3" else "silu",
            attention_bias=hf.get("attention_bias", False),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if family == "gemma3" else None,
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            eos_token_ids=eos_ids,
        )


def _rope_from_hf(params: dict[str, Any], hf: dict[str, Any], default_theta: float) -> RopeConfig:
    legacy = hf.get("rope_scaling") or {}
    scaling_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if scaling_type not in ("default", "linear"):
        raise ValueError(f"unsupported rope type {scaling_type!r}: specray implements 'default' and 'linear'")
    return RopeConfig(
        theta=float(params.get("rope_theta", default_theta)),
        scaling_type=scaling_type,
        factor=float(params.get("factor", legacy.get("factor", 1.0))),
    )
