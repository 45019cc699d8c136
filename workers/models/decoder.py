"""One decoder-only transformer for the Llama, Qwen3 and Gemma 3 families.

Parameter names follow Hugging Face's so checkpoints load without renaming. The forward runs a
ragged batch: all new tokens of all sequences concatenated ([T]), each at its own position, with
attention over the paged KV cache described by `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specray.kernels import AttentionMetadata, cpu_attention, cpu_rowwise, linear, paged_attention, write_kv
from specray.kernels.cpu_linear import cpu_decoder_layer, packed_weight
from specray.workers.models.config import ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, adds_one: bool) -> None:
        super().__init__()
        self.eps = eps
        self.adds_one = adds_one
        self.weight = nn.Parameter(torch.zeros(dim) if adds_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := cpu_rowwise(x, self.weight)) is not None:
            rows = x.reshape(-1, x.shape[-1])
            return ops.rms_norm(rows, self.weight, self.eps, self.adds_one).view(x.shape)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.adds_one:
            # Gemma scales in fp32 and casts last; Llama casts first, then scales.
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.type_as(x)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if rope.scaling_type == "linear":
            inv_freq = inv_freq / rope.factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.unsqueeze(0)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, D] by per-token angles (Hugging Face's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def fuse_on_load(module: nn.Module, parts: tuple[str, ...], fused: str) -> None:
    """Load Hugging Face's separate projections `parts` into the one linear layer `fused` (their
    rows stacked in that order): one GEMM instead of several at every step."""

    def hook(module, state_dict, prefix, *_) -> None:  # noqa: ANN001 - torch's hook signature
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{part}.{suffix}" for part in parts]
            if all(key in state_dict for key in keys):
                state_dict[f"{prefix}{fused}.{suffix}"] = torch.cat([state_dict.pop(key) for key in keys])

    module.register_load_state_dict_pre_hook(hook)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.window = config.layer_window(layer)
        d, h, kvh, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_sizes = (h * hd, kvh * hd, kvh * hd)
        self.qkv_proj = nn.Linear(d, sum(self.qkv_sizes), bias=config.attention_bias)
        fuse_on_load(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, config.norm_adds_one)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, config.norm_adds_one)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        c = self.config
        rows = x.shape[0]
        # Rows past the batch's tokens pad a captured step's shape (`engine/cuda_graphs.py`).
        tokens = meta.slot_mapping.shape[0]
        q, k, v = linear(x, self.qkv_proj)[:tokens].split(self.qkv_sizes, dim=-1)
        q = q.view(tokens, c.num_heads, c.head_dim)
        k = k.view(tokens, c.num_kv_heads, c.head_dim)
        v = v.view(tokens, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary[0][:tokens], rotary[1][:tokens]
        if (ops := cpu_rowwise(q, cos)) is not None:
            ops.rotary_(q, cos, sin)
            ops.rotary_(k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv(kv[0], kv[1], k, v, meta)
        out = paged_attention(q, kv[0], kv[1], meta, c.attention_scale, self.window, c.attn_logit_softcapping)
        out = out.reshape(tokens, c.num_heads * c.head_dim)
        if rows > tokens:
            out = torch.cat((out, out.new_zeros(rows - tokens, out.shape[1])))
        return linear(out, self.o_proj)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        fuse_on_load(self, ("gate_proj", "up_proj"), "gate_up_proj")
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_proj)
        if (ops := cpu_rowwise(gate_up)) is not None:
            rows = gate_up.reshape(-1, gate_up.shape[-1])
            gated = ops.gated_activation(rows, self.gelu).view(*gate_up.shape[:-1], self.intermediate_size)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            gated = (F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up
        return linear(gated, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        eps, adds_one = config.rms_norm_eps, config.norm_adds_one
        self.sandwich = config.sandwich_norm
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, adds_one)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, adds_one)
        # Llama-style layers (no sandwich or q/k norms, no softcap, plain norm weights) may run as
        # one C++ call where bf16 runs our packed GEMM (`_fused_forward`).
        self.fused_on_cpu = (
            not (config.sandwich_norm or config.qk_norm or adds_one or config.attn_logit_softcapping)
            and config.hidden_size % 2 == 0
            and config.intermediate_size % 2 == 0
        )
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, adds_one)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, adds_one)

    def forward(self, x, rotary, kv, meta) -> torch.Tensor:  # noqa: ANN001 - internal hot path
        if self.fused_on_cpu and x.shape[0] == meta.slot_mapping.shape[0] and cpu_decoder_layer(x):
            return self._fused_forward(x, rotary, kv, meta)
        attn = self.self_attn(self.input_layernorm(x), rotary, kv, meta)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))

    def _fused_forward(self, x, rotary, kv, meta) -> torch.Tensor:  # noqa: ANN001 - internal hot path
        """The same layer as one C++ call (`kernels/cpu_layer.cpp`): the same kernels in the same
        order, so the same bits, without ~20 Python-level ops per layer."""
        weights, sizes, qkv_bias, heads, eps, gelu, scale, window = self._fused_arguments()
        return cpu_attention.extension().decoder_layer(
            x,
            weights,
            sizes,
            qkv_bias,
            heads,
            eps,
            gelu,
            rotary[0],
            rotary[1],
            kv[0],
            kv[1],
            meta.slot_mapping,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            window,
        )

    def _fused_arguments(self) -> tuple:
        """The C++ layer's weight arguments (packed GEMM weights included), built once and kept
        while the same weights stand unchanged: rebuilding them cost ~2 ms of a ~18 ms decode step."""
        attn, mlp = self.self_attn, self.mlp
        layers = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        sources = (
            self.input_layernorm.weight,
            self.post_attention_layernorm.weight,
            attn.qkv_proj.bias,
            *(layer.weight for layer in layers),
        )
        versions = tuple(t._version if t is not None else None for t in sources)
        cached = self.__dict__.get("_fused_cache")
        if cached is not None and cached[1] == versions and all(a is b for a, b in zip(cached[0], sources)):
            return cached[2]
        c = attn.config
        packed = [packed_weight(layer) for layer in layers]
        arguments = (
            [sources[0], packed[0], packed[1], sources[1], *packed[2:]],
            [layer.weight.shape[0] for layer in layers],
            attn.qkv_proj.bias,
            [c.num_heads, c.num_kv_heads, c.head_dim],
            self.input_layernorm.eps,
            mlp.gelu,
            c.attention_scale,
            attn.window or 0,
        )
        self.__dict__["_fused_cache"] = (sources, versions, arguments)
        return arguments


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [N, V] at the requested token rows
    features: torch.Tensor | None  # [T, m*d]: outputs of the feature layers, concatenated
    final_hidden: torch.Tensor | None  # [T, d]: final-normed hidden state (what the LM head reads)


class DecoderBackbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_adds_one)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = build_rotary(config)
        self.layer_rope_keys = [_rope_key(config.layer_rope(i)) for i in range(config.num_layers)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        scale = self.config.embedding_scale
        return x * torch.tensor(scale, dtype=x.dtype) if scale != 1.0 else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.lm_head)
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
        feature_layers: tuple[int, ...] = (),
        return_final_hidden: bool = False,
    ) -> ForwardOutput:
        tokens = input_ids.shape[0]
        x = self.embed(input_ids)
        rotary = {key: rope(positions, x.dtype) for key, rope in self.rotary.items()}
        features = []
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rotary[self.layer_rope_keys[i]], kv_caches[i], meta)
            if i in feature_layers:
                features.append(x[:tokens])
        hidden = self.model.norm(x)
        # Every linear layer computes each row with the same bits whatever shares its step
        # (`kernels.linear`), so speculative decoding is lossless in every dtype.
        logits = self.compute_logits(hidden[logits_indices])
        return ForwardOutput(
            logits=logits,
            features=torch.cat(features, dim=-1) if features else None,
            final_hidden=hidden[:tokens] if return_final_hidden else None,
        )


def build_rotary(config: ModelConfig) -> nn.ModuleDict:
    """One rotary table per distinct RoPE setting among the layers (Gemma 3 has two)."""
    ropes = {config.layer_rope(i) for i in range(config.num_layers)}
    return nn.ModuleDict({_rope_key(r): RotaryEmbedding(config.head_dim, r) for r in ropes})


def _rope_key(rope: RopeConfig) -> str:
    return f"{rope.scaling_type}_{rope.theta:g}_{rope.factor:g}".replace(".", "p")
