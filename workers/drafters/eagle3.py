"""EAGLE-3 drafter: one autoregressive layer over fused target features and the token embedding.

Position t's input is `in_proj([embed(x_{t+1}); H_t])` with H_t the fused target features, so the
step that reads the anchor x_a is the one at position a−1. Drafting chains γ steps; past the anchor
there are no target features, so each step feeds the layer's own output in their place. Training
unrolls the same chain (training-time test), so the drafter learns from its own states.
"""

from __future__ import annotations

import torch
from torch import nn

from specray.kernels import sample_markov_block
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.feature_drafter import FeatureDrafter
from specray.workers.drafters.layers import KV, FeatureDrafterBackbone
from specray.workers.engine.drafter import DraftProposal, DraftRequest
from specray.workers.models.decoder import DecoderModel, RMSNorm


def chain_mask(anchors: torch.Tensor, context_len: int, steps: int) -> torch.Tensor:
    """[N·s, L + N·s] bool: step j of chain i sees context t < anchors[i] − 1 and steps ≤ j of chain i."""
    n = anchors.shape[0]
    device = anchors.device
    chain_of = torch.arange(n, device=device).repeat_interleave(steps)
    step_of = torch.arange(steps, device=device).repeat(n)
    sees_context = torch.arange(context_len, device=device).unsqueeze(0) < (anchors[chain_of] - 1).unsqueeze(
        1
    )
    same_chain = chain_of.unsqueeze(1) == chain_of.unsqueeze(0)
    sees_chain = same_chain & (step_of.unsqueeze(0) <= step_of.unsqueeze(1))
    return torch.cat((sees_context, sees_chain), dim=1)


class Eagle3Model(FeatureDrafterBackbone):
    def __init__(self, config: DrafterConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embed_norm = RMSNorm(d, config.rms_norm_eps, False)
        self.in_proj = nn.Linear(2 * d, d, bias=False)

    def step_inputs(self, token_embeds: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.in_proj(torch.cat((self.embed_norm(token_embeds), states), -1))

    def context_kv(self, inputs: torch.Tensor, start: int) -> list[KV]:
        """KV of step inputs [T, d] at positions start..; causal self-attention normalises them first."""
        rotary = self.rotary(torch.arange(start, start + inputs.shape[0], device=inputs.device), inputs.dtype)
        if len(self.layers) != 1:
            raise ValueError("EAGLE-3 caches context for its single layer only")
        layer = self.layers[0]
        return [layer.context_kv(layer.input_layernorm(inputs), rotary)]

    def chains(self, context: list[KV], anchors: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Layer outputs (pre-norm) [N, s, d] for chain inputs [N, s, d] starting at position anchor−1."""
        n, steps, d = inputs.shape
        positions = (anchors.unsqueeze(1) - 1 + torch.arange(steps, device=anchors.device)).reshape(-1)
        rotary = self.rotary(positions, inputs.dtype)
        mask = chain_mask(anchors, context[0][0].shape[0], steps)
        x = inputs.reshape(n * steps, d)
        for layer, kv in zip(self.layers, context):
            x = layer(x, rotary, kv, mask)
        return x.view(n, steps, d)

    def training_outputs(
        self, features: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor, target: DecoderModel
    ) -> tuple[torch.Tensor, None]:
        """Logits [N, γ, V] of the unrolled chain, teacher-forced on the true tokens."""
        block_len, length = self.config.draft_block_size, ids.shape[0]
        fused = self.fuse(features)
        # Step input at t pairs H_t with x_{t+1}; the last position has no next token (never used).
        next_ids = torch.cat((ids[1:], ids[-1:]))
        all_inputs = self.step_inputs(target.embed(next_ids), fused)
        context = self.context_kv(all_inputs, 0)
        inputs = all_inputs[anchors - 1].unsqueeze(1)
        for j in range(1, block_len):
            outputs = self.chains(context, anchors, inputs)
            token = ids[(anchors + j).clamp(max=length - 1)]
            inputs = torch.cat(
                (inputs, self.step_inputs(target.embed(token), outputs[:, -1]).unsqueeze(1)), 1
            )
        outputs = self.chains(context, anchors, inputs)
        return target.compute_logits(self.norm(outputs)), None


class Eagle3Drafter(FeatureDrafter):
    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        return [self._propose_one(r) for r in requests]

    def _propose_one(self, r: DraftRequest) -> DraftProposal:
        anchor_pos = len(r.token_ids) - 1
        if r.max_tokens <= 0 or anchor_pos < 1 or self.cache.num_features(r.seq_id) < anchor_pos:
            return DraftProposal(tokens=[])
        m, ids = self.model, r.token_ids
        device = next(self.target.parameters()).device

        def project(features: torch.Tensor, start: int) -> list[KV]:
            next_ids = torch.tensor(ids[start + 1 : start + 1 + features.shape[0]], device=device)
            return m.context_kv(m.step_inputs(self._embed(next_ids), m.fuse(features)), start)

        # Steps up to position anchor−2 are context; the step at anchor−1 (reading the anchor) drafts.
        context = self.cache.context_kv(r.seq_id, anchor_pos - 1, project)
        features = self._features(r.seq_id, anchor_pos - 1)
        inputs = m.step_inputs(
            self._embed(torch.tensor([ids[-1]], device=device)), m.fuse(features)
        ).unsqueeze(0)
        anchors = torch.tensor([anchor_pos], device=device)
        steps = min(r.max_tokens, self.config.draft_block_size)
        tokens, probs = [], []
        for j in range(steps):
            out = m.chains(context, anchors, inputs)[:, -1]
            logits = self.target.compute_logits(m.norm(out).to(self._dtype)).float().unsqueeze(1)
            prev = torch.tensor([tokens[-1] if tokens else ids[-1]], device=device)
            u = torch.rand(1, 1, generator=r.generator).to(device)
            temperature = torch.tensor([r.params.temperature], device=device)
            draft = sample_markov_block(logits, prev, temperature, u, return_probs=not r.params.greedy)
            tokens.append(int(draft.tokens[0, 0]))
            if not r.params.greedy:
                probs.append(draft.probs[0, 0])
            if j + 1 < steps:
                step = m.step_inputs(self._embed(torch.tensor([tokens[-1]], device=device)), out).unsqueeze(1)
                inputs = torch.cat((inputs, step), 1)
        return DraftProposal(tokens=tokens, probs=torch.stack(probs) if probs else None)

    def _features(self, seq_id: str, position: int) -> torch.Tensor:
        return self.cache.features(seq_id, position, position + 1)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed(ids).float()

    @property
    def _dtype(self) -> torch.dtype:
        return self.target.lm_head.weight.dtype
