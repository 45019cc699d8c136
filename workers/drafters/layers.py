"""The drafter's transformer layer with KV injection, shared by DSpark/DFlash and EAGLE-3.

Queries come only from the drafted tokens; keys and values are [proj(context); proj(drafted)] with
the same projections for both. The context is projected raw (it skips the layer's input norm), so
its keys/values depend only on the fused target features and can be cached across steps.
Layers run on a batch of independent rows: training packs all blocks of a sequence into one row,
inference gives every sequence its own row over its context, padded to the longest. Masks are
explicit booleans [rows, queries, context + queries] (True = may attend). On CPUs where bf16 runs
our packed GEMM, inference runs a DSpark block's layers in C++ (`kernels/cpu_draft_block.cpp`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specray.kernels import linear
from specray.kernels.cpu_linear import packed_weight
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.draft_vocab import DraftVocab
from specray.workers.models.config import ModelConfig
from specray.workers.models.decoder import MLP, DecoderModel, RMSNorm, RotaryEmbedding, apply_rotary

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
        k = linear(x, self.k_proj).view(x.shape[0], c.num_kv_heads, c.head_dim)
        v = linear(x, self.v_proj).view(x.shape[0], c.num_kv_heads, c.head_dim)
        return apply_rotary(k, *rotary), v

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], context: KV, mask: torch.Tensor
    ) -> torch.Tensor:
        """x [B, T, d], rotary of the B·T queries, context KV [B, L, kv_heads, head_dim] each,
        mask [B, T, L + T]."""
        c = self.config
        rows, length, _ = x.shape
        flat = x.reshape(rows * length, -1)
        q = apply_rotary(linear(flat, self.q_proj).view(rows * length, c.num_heads, c.head_dim), *rotary)
        k, v = self.project_kv(flat, rotary)
        keys = torch.cat((context[0], k.view(rows, length, *k.shape[1:])), 1).transpose(1, 2)
        values = torch.cat((context[1], v.view(rows, length, *v.shape[1:])), 1).transpose(1, 2)
        q = q.view(rows, length, c.num_heads, c.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(1), enable_gqa=True)
        return linear(out.transpose(1, 2).reshape(rows, length, c.num_heads * c.head_dim), self.o_proj)


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

    def fused_weights(self) -> tuple[list[torch.Tensor], list[int]]:
        """The layer's weights for the C++ injected layer (`kernels/cpu_layer.cpp`): (norm 1, packed
        [q | k | v], packed o, norm 2, packed [gate | up], packed down) and the packed widths."""
        attn, mlp = self.self_attn, self.mlp
        stacks = (
            (attn.q_proj, attn.k_proj, attn.v_proj),
            (attn.o_proj,),
            (mlp.gate_up_proj,),
            (mlp.down_proj,),
        )
        packed = [packed_weight(*stack) for stack in stacks]
        weights = [
            self.input_layernorm.weight,
            *packed[:2],
            self.post_attention_layernorm.weight,
            *packed[2:],
        ]
        return weights, [sum(layer.weight.shape[0] for layer in stack) for stack in stacks]


class FeatureDrafterBackbone(nn.Module):
    """What DSpark/DFlash and EAGLE-3 share: the target's fused features projected to the drafter's
    width (H_ctx), injected layers over them, a final norm, the target's RoPE, and the output head:
    the target's frozen LM head, restricted to the draft vocabulary when the config has one."""

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
        if config.draft_vocab_size:
            # Overwritten by `set_draft_vocab` (training) or the checkpoint (loading).
            self.register_buffer("draft_ids", torch.arange(config.draft_vocab_size))

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """H_ctx: raw target features [T, m·d] → [T, d]."""
        return self.context_norm(linear(features, self.fc))

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, context: list[KV], mask: torch.Tensor
    ) -> torch.Tensor:
        """Layer outputs (pre-norm) [B, T, d] of queries x [B, T, d] at `positions` [B, T] over
        per-layer context KV [B, L, ...] under `mask` [B, T, L + T]."""
        rotary = self.rotary(positions.reshape(-1), x.dtype)
        for layer, kv in zip(self.layers, context):
            x = layer(x, rotary, kv, mask)
        return x

    def draft_vocab(self) -> DraftVocab | None:
        if not self.config.draft_vocab_size:
            return None
        return DraftVocab(self.draft_ids, self.config.vocab_size)

    def set_draft_vocab(self, vocab: DraftVocab) -> None:
        if vocab.size != self.config.draft_vocab_size or vocab.target_vocab_size != self.config.vocab_size:
            raise ValueError(
                f"a draft vocabulary of {vocab.size} of {vocab.target_vocab_size} tokens for a drafter "
                f"configured with {self.config.draft_vocab_size} of {self.config.vocab_size}"
            )
        self.draft_ids.copy_(vocab.ids)

    def output_head(self, target: DecoderModel) -> torch.Tensor:
        """The LM head rows [K, d] (or [V, d]) of the tokens the drafter may propose."""
        weight = target.lm_head.weight
        return weight[self.draft_ids] if self.config.draft_vocab_size else weight

    def output_layer(self, target: DecoderModel) -> nn.Linear:
        """The output head as a frozen linear layer for inference: the target's own LM head, or its
        draft vocabulary's rows gathered once (so the CPU GEMM packs them once)."""
        if not self.config.draft_vocab_size:
            return target.lm_head
        rows = self.output_head(target).detach()
        layer = nn.Linear(rows.shape[1], rows.shape[0], bias=False, device=rows.device, dtype=rows.dtype)
        layer.weight = nn.Parameter(rows, requires_grad=False)
        return layer

    def output_logits(
        self, hidden: torch.Tensor, target: DecoderModel, head: nn.Linear | None = None
    ) -> torch.Tensor:
        """Logits over the output vocabulary, as the target's own head computes them (softcap
        included); through `head` (an `output_layer`) where one is given."""
        if head is not None:
            logits = linear(hidden, head)
        elif self.config.draft_vocab_size:
            logits = F.linear(hidden, self.output_head(target))
        else:
            return target.compute_logits(hidden)
        cap = target.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits
