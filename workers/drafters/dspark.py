"""DSpark drafter (and DFlash, which is DSpark with Markov rank 0 and no confidence head).

A parallel backbone drafts a whole block `[anchor, MASK × (γ−1)]` in one forward: every slot k
predicts the token at anchor+k+1, attending bidirectionally inside its block and, through KV
injection, to the fused target features of the context strictly before the anchor. The low-rank
Markov head then adds `W2·W1[x_{k−1}]` to slot k's logits and the block is sampled left to right, so
each draft token has an exact draft probability; the confidence head `c_k = σ(w·[h_k; W1[x_{k−1}]])`
reads the previous token, never x_k. Embedding and LM head are the target's, frozen, and not stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specray.kernels import sample_markov_block
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.feature_drafter import FeatureDrafter
from specray.workers.drafters.layers import KV, FeatureDrafterBackbone
from specray.workers.engine.drafter import DraftProposal, DraftRequest
from specray.workers.models.decoder import DecoderModel, RMSNorm


def block_mask(anchors: torch.Tensor, context_len: int, draft_block_size: int) -> torch.Tensor:
    """[N·γ, L + N·γ] bool: slot of block i sees context j < anchors[i] and all of block i only."""
    n = anchors.shape[0]
    block_of = torch.arange(n, device=anchors.device).repeat_interleave(draft_block_size)
    sees_context = torch.arange(context_len, device=anchors.device).unsqueeze(0) < anchors[
        block_of
    ].unsqueeze(1)
    sees_block = block_of.unsqueeze(1) == block_of.unsqueeze(0)
    return torch.cat((sees_context, sees_block), dim=1)


class DSparkModel(FeatureDrafterBackbone):
    def __init__(self, config: DrafterConfig) -> None:
        super().__init__(config)
        d, r = config.hidden_size, config.markov_rank
        if config.state_input:
            self.embed_norm = RMSNorm(d, config.rms_norm_eps, False)
            self.in_proj = nn.Linear(2 * d, d, bias=False)
        if r and config.markov_tied:
            self.markov_norm = RMSNorm(d, config.rms_norm_eps, False)
            self.markov_in = nn.Linear(d, r, bias=False)
            self.markov_out = nn.Linear(r, d, bias=False)
            # Zero B (hence W2): training starts from the plain backbone distribution.
            nn.init.zeros_(self.markov_out.weight)
        elif r:
            self.markov_w1 = nn.Embedding(config.vocab_size, r)
            self.markov_w2 = nn.Linear(r, config.vocab_size, bias=False)
            nn.init.normal_(self.markov_w1.weight, std=r**-0.5)
            nn.init.zeros_(self.markov_w2.weight)
        if config.confidence:
            self.confidence_head = nn.Linear(d + r, 1)

    def context_kv(self, features: torch.Tensor, start: int) -> list[KV]:
        """Per-layer KV of raw target features [T, m·d] at positions start..start+T−1."""
        return self._fused_kv(self.fuse(features), start)

    def _fused_kv(self, fused: torch.Tensor, start: int) -> list[KV]:
        rotary = self.rotary(torch.arange(start, start + fused.shape[0], device=fused.device), fused.dtype)
        return [layer.context_kv(fused, rotary) for layer in self.layers]

    def blocks(
        self,
        context: list[KV],
        anchors: torch.Tensor,
        anchor_embeds: torch.Tensor,
        mask_embed: torch.Tensor,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed slot states [N, γ, d] for blocks at `anchors` over a shared context.

        `states` [N, d] is H_ctx at anchor−1 (zeros where there is none), read when `state_input`.
        """
        n, block_len = anchors.shape[0], self.config.draft_block_size
        x = mask_embed.expand(n, block_len, -1).clone()
        x[:, 0] = anchor_embeds
        if self.config.state_input:
            x = self.in_proj(
                torch.cat((self.embed_norm(x), states.unsqueeze(1).expand(-1, block_len, -1)), -1)
            )
        x = x.reshape(n * block_len, -1)
        positions = (anchors.unsqueeze(1) + torch.arange(block_len, device=anchors.device)).reshape(-1)
        rotary = self.rotary(positions, x.dtype)
        mask = block_mask(anchors, context[0][0].shape[0], block_len)
        for layer, kv in zip(self.layers, context):
            x = layer(x, rotary, kv, mask)
        return self.norm(x).view(n, block_len, -1)

    def markov_code(self, prev: torch.Tensor, target: DecoderModel) -> torch.Tensor | None:
        """W1[x_{k−1}]: the r-dim code of the previous token that the Markov and confidence heads read."""
        if not self.config.markov_rank:
            return None
        if self.config.markov_tied:
            return self.markov_in(self.markov_norm(target.embed(prev).to(self.markov_in.weight.dtype)))
        return self.markov_w1(prev)

    def markov_bias(self, code: torch.Tensor, target: DecoderModel) -> torch.Tensor:
        """W2·W1[x_{k−1}] [.., V], the Markov head's logit correction."""
        if self.config.markov_tied:
            return F.linear(self.markov_out(code), target.lm_head.weight.to(code.dtype))
        return self.markov_w2(code)

    def markov_tables(self, target: DecoderModel) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W1, W2), both [V, r] fp32, the tables the block sampler reads."""
        if not self.config.markov_rank:
            return None
        if not self.config.markov_tied:
            return self.markov_w1.weight.float(), self.markov_w2.weight.float()
        vocab = torch.arange(self.config.vocab_size, device=self.markov_in.weight.device)
        w1 = self.markov_code(vocab, target).float()
        w2 = target.lm_head.weight.float() @ self.markov_out.weight.float()
        return w1, w2

    def confidence_logits(self, hidden: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor | None:
        if not self.config.confidence:
            return None
        inputs = hidden if code is None else torch.cat((hidden, code), -1)
        return self.confidence_head(inputs).squeeze(-1)

    def training_outputs(
        self, features: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor, target: DecoderModel
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits [N, γ, V] and confidence logits [N, γ] for many anchors at once.

        Slot k's previous token is the true token at anchor+k (the anchor itself for k = 0): the
        Markov and confidence heads see what inference sees when the earlier drafts were accepted.
        """
        block_len = self.config.draft_block_size
        fused = self.fuse(features)
        context = self._fused_kv(fused, 0)
        mask_embed = target.embed(torch.tensor([self.config.mask_token_id], device=ids.device))[0]
        states = torch.cat((torch.zeros_like(fused[:1]), fused))[anchors]  # H_ctx at anchor−1
        hidden = self.blocks(context, anchors, target.embed(ids[anchors]), mask_embed, states)
        prev_pos = (anchors.unsqueeze(1) + torch.arange(block_len, device=ids.device)).clamp(
            max=ids.shape[0] - 1
        )
        logits = target.compute_logits(hidden)
        code = self.markov_code(ids[prev_pos], target)
        if code is not None:
            logits = logits + self.markov_bias(code, target)
        return logits, self.confidence_logits(hidden, code)


class DSparkDrafter(FeatureDrafter):
    """Serves a DSparkModel through the engine's drafter interface."""

    def __init__(self, model: DSparkModel, target: DecoderModel) -> None:
        super().__init__(model, target)
        with torch.inference_mode():
            self.markov_tables = model.markov_tables(target)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        proposals = [DraftProposal(tokens=[]) for _ in requests]
        # The anchor's own features come with the next verify; all earlier ones must be here.
        ready = [
            i
            for i, r in enumerate(requests)
            if r.max_tokens > 0 and self.cache.num_features(r.seq_id) >= len(r.token_ids) - 1 > 0
        ]
        if not ready:
            return proposals
        device = next(self.target.parameters()).device
        mask_embed = self.target.embed(torch.tensor([self.config.mask_token_id], device=device))[0].float()
        hidden = []
        for i in ready:
            r = requests[i]
            anchor_pos = len(r.token_ids) - 1
            context = self.cache.context_kv(r.seq_id, anchor_pos, self.model.context_kv)
            anchor_embed = self.target.embed(torch.tensor([r.token_ids[-1]], device=device)).float()
            anchor_at = torch.tensor([anchor_pos], device=device)
            state = (
                self.model.fuse(self.cache.features(r.seq_id, anchor_pos - 1, anchor_pos))
                if self.config.state_input
                else None
            )
            hidden.append(self.model.blocks(context, anchor_at, anchor_embed, mask_embed, state)[0])
        # Slot k's hidden state depends on the whole block (bidirectional attention), but nothing
        # after slot k depends on its logits: only the slots asked for get the LM head, a draft's
        # largest cost, so drafting to a smaller verify budget is cheaper.
        width = max(min(requests[i].max_tokens, self.config.draft_block_size) for i in ready)
        hidden = torch.stack(hidden)[:, :width]
        logits = self.target.compute_logits(hidden.to(self._target_dtype)).float()
        anchors = torch.tensor([requests[i].token_ids[-1] for i in ready], device=device)
        temperature = torch.tensor([requests[i].params.temperature for i in ready], device=device)
        # A whole block's worth of draws whatever the width: a request's random stream advances alike.
        uniforms = torch.stack(
            [torch.rand(self.config.draft_block_size, generator=requests[i].generator) for i in ready]
        )[:, :width].to(device)
        m = self.model
        w1, w2 = self.markov_tables or (None, None)
        draft = sample_markov_block(
            logits,
            anchors,
            temperature,
            uniforms,
            w1=w1,
            w2=w2,
            hidden=hidden,
            conf_weight=m.confidence_head.weight[0] if self.config.confidence else None,
            conf_bias=float(m.confidence_head.bias) if self.config.confidence else 0.0,
            conf_temperature=torch.tensor(self.config.confidence_temperatures[:width], device=device),
            return_probs=bool((temperature > 0).any()),
        )
        for row, i in enumerate(ready):
            r = requests[i]
            k = min(r.max_tokens, self.config.draft_block_size)
            proposals[i] = DraftProposal(
                tokens=draft.tokens[row, :k].tolist(),
                probs=None if r.params.greedy else draft.probs[row, :k],
                confidence=draft.confidence[row, :k].tolist() if draft.confidence is not None else None,
            )
        return proposals

    @property
    def _target_dtype(self) -> torch.dtype:
        return self.target.lm_head.weight.dtype
