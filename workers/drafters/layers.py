"""The drafter's transformer layer with KV injection, shared by DSpark/DFlash and EAGLE-3.

Queries come only from the drafted tokens; keys and values are [proj(context); proj(drafted)] with
the same projections for both. The context is projected raw (it skips the layer's input norm), so
its keys/values depend only on the fused target features and can be cached across steps.
Masks are explicit booleans [queries, context + queries] (True = may attend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specray.workers.drafters.config import DrafterConfig
from specray.workers.models.config import ModelConfig
from specray.workers.models.decoder import MLP, RMSNorm, RotaryEmbedding, apply_rotary

KV = tuple[torch.Tensor, torch.Tensor]  # [T, kv_heads, head_dim] each, RoPE applied to keys


class InjectedAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, h, kvh, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kvh * hd, bias=False)
        self.v_proj = nn.Linear(d, kvh * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def project_kv(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> KV:
        c = self.config
        k = self.k_proj(x).view(x.shape[0], c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(x.shape[0], c.num_kv_heads, c.head_dim)
        return apply_rotary(k, *rotary), v

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], context: KV, mask: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        q = apply_rotary(self.q_proj(x).view(x.shape[0], c.num_heads, c.head_dim), *rotary)
        k, v = self.project_kv(x, rotary)
        keys = torch.cat((context[0], k)).transpose(0, 1)
        values = torch.cat((context[1], v)).transpose(0, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(0, 1).reshape(x.shape[0], c.num_heads * c.head_dim))


class InjectedLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = InjectedAttention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, False)

    def context_kv(self, context: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> KV:
        return self.self_attn.project_kv(context, rotary)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], context: KV, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, context, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class FeatureDrafterBackbone(nn.Module):
    """What DSpark/DFlash and EAGLE-3 share: the target's fused features projected to the drafter's
    width (H_ctx), injected layers over them, a final norm and the target's RoPE."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = config
        layer_config = config.layer_config()
        d = config.hidden_size
        self.fc = nn.Linear(len(config.feature_layers) * d, d, bias=False)
        self.context_norm = RMSNorm(d, config.rms_norm_eps, False)
        self.layers = nn.ModuleList(InjectedLayer(layer_config) for _ in range(config.num_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps, False)
        self.rotary = RotaryEmbedding(config.head_dim, layer_config.rope)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """H_ctx: raw target features [T, m·d] → [T, d]."""
        return self.context_norm(self.fc(features))
