"""EAGLE-3 drafter: one autoregressive layer over fused target features and the token embedding.

Position t's input is `in_proj([embed(x_{t+1}); H_t])` with H_t the fused target features, so the
step that reads the anchor x_a is the one at position a−1. Drafting chains γ steps; past the anchor
there are no target features, so each step feeds the layer's own output in their place. Training
unrolls the same chain (training-time test), so the drafter learns from its own states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from specray.kernels import cpu_attention, linear, sample_markov_block
from specray.kernels.cpu_linear import packed_weight
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.context_cache import Projection
from specray.workers.drafters.feature_drafter import FeatureDrafter
from specray.workers.drafters.layers import KV, FeatureDrafterBackbone
from specray.workers.engine.drafter import DraftProposal, DraftRequest
from specray.workers.models.decoder import DecoderModel, RMSNorm

FusedChainStep = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, KV], tuple[torch.Tensor, torch.Tensor, KV]
]


def chain_mask(anchors: torch.Tensor, context_len: int, steps: int) -> torch.Tensor:
    """[.., N·s, L + N·s] bool for anchors [.., N] (one row of chains per leading index): step j of
    chain i sees context t < anchors[i] − 1 and steps ≤ j of chain i."""
    n = anchors.shape[-1]
    device = anchors.device
    chain_of = torch.arange(n, device=device).repeat_interleave(steps)
    step_of = torch.arange(steps, device=device).repeat(n)
    sees_context = torch.arange(context_len, device=device) < (anchors[..., chain_of] - 1).unsqueeze(-1)
    same_chain = chain_of.unsqueeze(1) == chain_of.unsqueeze(0)
    sees_chain = same_chain & (step_of.unsqueeze(0) <= step_of.unsqueeze(1))
    return torch.cat((sees_context, sees_chain.expand(*sees_context.shape[:-1], -1)), dim=-1)


class Eagle3Model(FeatureDrafterBackbone):
    def __init__(self, config: DrafterConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embed_norm = RMSNorm(d, config.rms_norm_eps, False)
        self.in_proj = nn.Linear(2 * d, d, bias=False)

    def step_inputs(self, token_embeds: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return linear(torch.cat((self.embed_norm(token_embeds), states), -1), self.in_proj)

    def context_kv(self, inputs: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        """KV of step inputs [T, d] at `positions`; causal self-attention normalises them first."""
        rotary = self.rotary(positions, inputs.dtype)
        if len(self.layers) != 1:
            raise ValueError("EAGLE-3 caches context for its single layer only")
        layer = self.layers[0]
        return [layer.context_kv(layer.input_layernorm(inputs), rotary)]

    def chains(self, context: list[KV], anchors: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Layer outputs (pre-norm) [N, s, d] of one chain per row (inference): row i's inputs
        [N, s, d] start at position anchors[i]−1 and see its context KV [N, L, ...] before that."""
        steps = inputs.shape[1]
        positions = anchors.unsqueeze(1) - 1 + torch.arange(steps, device=anchors.device)
        context_len = context[0][0].shape[1]
        sees_context = torch.arange(context_len, device=anchors.device) < (anchors - 1).unsqueeze(1)
        causal = torch.ones(steps, steps, dtype=torch.bool, device=anchors.device).tril()
        mask = torch.cat(
            (
                sees_context.unsqueeze(1).expand(-1, steps, -1),
                causal.expand(anchors.shape[0], -1, -1),
            ),
            -1,
        )
        return self.run_layers(inputs, positions, context, mask)

    def fused_chain_step(self, head: nn.Linear, softcap: float) -> FusedChainStep:
        """One chain step per row as one C++ call (`kernels/cpu_draft_block.cpp`; bf16 inference
        where linear layers run our packed GEMM), bound once to the packed weights and `head`.

        step(token_embeds, states, positions, context): the step at positions[i] reads
        `token_embeds` and `states` [N, d] and sees rows j < positions[i] of its context KV
        [N, L, ...] (the context, then its earlier steps). → (layer output before the final norm
        [N, d], fp32 logits [N, K] through `head`, the step's own KV to append for the next step).
        """
        layer = self.layers[0]
        weights, sizes = layer.fused_weights()
        attn = layer.self_attn.config
        heads = [attn.num_heads, attn.num_kv_heads, attn.head_dim]
        in_proj, packed_head = packed_weight(self.in_proj), packed_weight(head)
        kernel = cpu_attention.extension().draft_chain_step

        def step(
            token_embeds: torch.Tensor, states: torch.Tensor, positions: torch.Tensor, context: KV
        ) -> tuple[torch.Tensor, torch.Tensor, KV]:
            out, logits, k, v = kernel(
                token_embeds,
                states,
                positions,
                self.embed_norm.weight,
                in_proj,
                self.rotary.inv_freq,
                weights,
                sizes,
                heads,
                self.config.rms_norm_eps,
                layer.mlp.gelu,
                context[0],
                context[1],
                positions,
                attn.head_dim**-0.5,
                self.norm.weight,
                packed_head,
                head.weight.shape[0],
                softcap,
            )
            return out, logits, (k, v)

        return step

    def packed_chains(self, context: list[KV], anchors: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Layer outputs (pre-norm) [B, N, s, d] of many chains per sequence (training: every chain
        of sequence b packed into row b under `chain_mask`, over its context KV [B, L, ...]);
        anchors [B, N], inputs [B, N, s, d]."""
        rows, n, steps, d = inputs.shape
        positions = (anchors.unsqueeze(-1) - 1 + torch.arange(steps, device=anchors.device)).view(rows, -1)
        mask = chain_mask(anchors, context[0][0].shape[1], steps)
        outputs = self.run_layers(inputs.view(rows, n * steps, d), positions, context, mask)
        return outputs.view(rows, n, steps, d)

    def training_outputs(
        self, features: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor, target: DecoderModel
    ) -> tuple[torch.Tensor, None]:
        """Logits [B, N, γ, K] over the output vocabulary of the unrolled chains at anchors [B, N]
        of each of B sequences (features [B, L, m·d], ids [B, L]; shorter sequences padded at the
        end), teacher-forced on the true tokens."""
        block_len = self.config.draft_block_size
        rows, length = ids.shape
        fused = self.fuse(features)
        # Step input at t pairs H_t with x_{t+1}; the last position has no next token (never used).
        next_ids = torch.cat((ids[:, 1:], ids[:, -1:]), 1)
        all_inputs = self.step_inputs(target.embed(next_ids), fused)
        positions = torch.arange(length, device=ids.device).repeat(rows)
        context = [
            (k.unflatten(0, (rows, length)), v.unflatten(0, (rows, length)))
            for k, v in self.context_kv(all_inputs.flatten(0, 1), positions)
        ]
        row = torch.arange(rows, device=ids.device).unsqueeze(1)
        inputs = all_inputs[row, anchors - 1].unsqueeze(2)
        for j in range(1, block_len):
            outputs = self.packed_chains(context, anchors, inputs)
            token = ids[row, (anchors + j).clamp(max=length - 1)]
            step = self.step_inputs(target.embed(token), outputs[:, :, -1])
            inputs = torch.cat((inputs, step.unsqueeze(2)), 2)
        outputs = self.packed_chains(context, anchors, inputs)
        return self.output_logits(self.norm(outputs), target), None


# (token embeddings, states) [N, d] → (layer outputs before the final norm [N, d], fp32 logits [N, K])
ChainStep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Eagle3Drafter(FeatureDrafter):
    """Serves an Eagle3Model: γ chain steps, each one forward and one LM head product for all
    ready sequences of a proposal (one C++ call per step where our packed bf16 GEMM runs)."""

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        proposals = [DraftProposal(tokens=[]) for _ in requests]
        ready = self.ready(requests)
        if not ready:
            return proposals
        batch = [requests[i] for i in ready]
        m, device = self.model, self.device
        seq_ids = [r.seq_id for r in batch]
        anchor_pos = [len(r.token_ids) - 1 for r in batch]

        def project(features: torch.Tensor, positions: torch.Tensor, owners: torch.Tensor) -> Projection:
            # Step input at t pairs H_t with x_{t+1}.
            next_ids = [batch[o].token_ids[p + 1] for o, p in zip(owners.tolist(), positions.tolist())]
            inputs = m.step_inputs(self._embed(torch.tensor(next_ids, device=device)), m.fuse(features))
            return Projection(m.context_kv(inputs, positions))

        # Steps up to position anchor−2 are context; the step at anchor−1 (reading the anchor) drafts.
        context = self.cache.context_kv(seq_ids, [p - 1 for p in anchor_pos], project)
        states = m.fuse(self.cache.features_at(seq_ids, [p - 1 for p in anchor_pos]))
        prev = torch.tensor([r.token_ids[-1] for r in batch], device=device)
        anchors = torch.tensor(anchor_pos, device=device)
        temperature = torch.tensor([r.params.temperature for r in batch], device=device)
        limits = [min(r.max_tokens, self.config.draft_block_size) for r in batch]
        sampled = bool((temperature > 0).any())
        step = self.fused_chain(context[0], anchors) if self.fused else self.module_chain(context, anchors)
        tokens, probs = [], []
        for j in range(max(limits)):
            # Past the anchor there are no target features: each step reads the previous one's output.
            states, logits = step(self._embed(prev), states)
            # One draw per step from each request's own stream, only while it still drafts.
            uniforms = torch.stack(
                [
                    torch.rand(1, generator=r.generator) if j < limit else torch.zeros(1)
                    for r, limit in zip(batch, limits)
                ]
            ).to(device)
            draft = sample_markov_block(
                logits.unsqueeze(1),
                prev,
                temperature,
                uniforms,
                return_probs=sampled,
                token_ids=self.token_ids,
            )
            prev = draft.tokens[:, 0]
            tokens.append(prev)
            if sampled:
                probs.append(draft.probs[:, 0])
        drafted = torch.stack(tokens, 1).tolist()
        chain_probs = torch.stack(probs, 1) if sampled else None
        for row, (i, r) in enumerate(zip(ready, batch)):
            k = limits[row]
            proposals[i] = DraftProposal(
                tokens=drafted[row][:k],
                probs=None if r.params.greedy else self.target_probs(chain_probs[row, :k]),
            )
        return proposals

    def module_chain(self, context: list[KV], anchors: torch.Tensor) -> ChainStep:
        """Chain steps through the Python modules: each step reruns the layer over all steps so far."""
        m, inputs = self.model, []

        def step(token_embeds: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            inputs.append(m.step_inputs(token_embeds, states))
            out = m.chains(context, anchors, torch.stack(inputs, 1))[:, -1]
            return out, self.logits(m.norm(out))

        return step

    def fused_chain(self, context: KV, anchors: torch.Tensor) -> ChainStep:
        """Chain steps as one C++ call each: a step's KV is appended to its row's context (in a copy
        with room for γ steps), so the next step runs only its own query."""
        k, v = context
        room = k.new_zeros(k.shape[0], self.config.draft_block_size, *k.shape[2:])
        keys, values = torch.cat((k, room), 1), torch.cat((v, room), 1)
        rows = torch.arange(k.shape[0], device=anchors.device)
        fused_step = self.model.fused_chain_step(self.head, self.target.config.final_logit_softcapping or 0.0)
        seen = anchors - 1  # step j sits at position anchor−1+j and sees the rows before it

        def step(token_embeds: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal seen
            out, logits, (k, v) = fused_step(token_embeds, states, seen, (keys, values))
            keys[rows, seen], values[rows, seen] = k, v
            seen = seen + 1
            return out, logits

        return step
