"""DSpark drafter (and DFlash, which is DSpark with Markov rank 0 and no confidence head).

A parallel backbone drafts a whole block `[anchor, MASK × (γ−1)]` in one forward: every slot k
predicts the token at anchor+k+1, attending bidirectionally inside its block and, through KV
injection, to the fused target features of the context strictly before the anchor. The low-rank
Markov head then adds `W2·W1[x_{k−1}]` to slot k's logits and the block is sampled left to right, so
each draft token has an exact draft probability; the confidence head `c_k = σ(w·[h_k; W1[x_{k−1}]])`
reads the previous token, never x_k. Embedding and LM head are the target's, frozen, and not stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specray.kernels import MarkovDraft, cpu_attention, linear, sample_markov_block
from specray.kernels.cpu_linear import packed_weight
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.context_cache import Projection
from specray.workers.drafters.feature_drafter import FeatureDrafter
from specray.workers.drafters.layers import KV, FeatureDrafterBackbone
from specray.workers.engine.drafter import DraftProposal, DraftRequest
from specray.workers.models.decoder import DecoderModel, RMSNorm


def block_mask(anchors: torch.Tensor, context_len: int, draft_block_size: int) -> torch.Tensor:
    """[.., N·γ, L + N·γ] bool for anchors [.., N] (one row of blocks per leading index): slot of
    block i sees context j < anchors[i] and all of block i only."""
    n = anchors.shape[-1]
    block_of = torch.arange(n, device=anchors.device).repeat_interleave(draft_block_size)
    sees_context = torch.arange(context_len, device=anchors.device) < anchors[..., block_of].unsqueeze(-1)
    sees_block = block_of.unsqueeze(1) == block_of.unsqueeze(0)
    return torch.cat((sees_context, sees_block.expand(*sees_context.shape[:-1], -1)), dim=-1)


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
            # W1 reads any previous token (the anchor may lie outside a draft vocabulary); W2 writes
            # only the tokens the drafter may propose.
            self.markov_w1 = nn.Embedding(config.vocab_size, r)
            self.markov_w2 = nn.Linear(r, config.output_vocab_size, bias=False)
            nn.init.normal_(self.markov_w1.weight, std=r**-0.5)
            nn.init.zeros_(self.markov_w2.weight)
        if config.confidence:
            self.confidence_head = nn.Linear(d + r, 1)

    def context_kv(self, fused: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        """Per-layer KV of fused target features H_ctx [T, d] at `positions` [T]."""
        rotary = self.rotary(positions, fused.dtype)
        return [layer.context_kv(fused, rotary) for layer in self.layers]

    def block_inputs(
        self, anchor_embeds: torch.Tensor, mask_embed: torch.Tensor, states: torch.Tensor | None
    ) -> torch.Tensor:
        """[N, γ, d] slot inputs of blocks `[anchor, MASK × (γ−1)]`; `states` [N, d] is H_ctx at
        anchor−1 (zeros where there is none), read when `state_input`."""
        n, block_len = anchor_embeds.shape[0], self.config.draft_block_size
        x = mask_embed.expand(n, block_len, -1).clone()
        x[:, 0] = anchor_embeds
        if self.config.state_input:
            x = linear(
                torch.cat((self.embed_norm(x), states.unsqueeze(1).expand(-1, block_len, -1)), -1),
                self.in_proj,
            )
        return x

    def blocks(
        self,
        context: list[KV],
        anchors: torch.Tensor,
        anchor_embeds: torch.Tensor,
        mask_embed: torch.Tensor,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed slot states [N, γ, d] of one block per row (inference): row i's context KV
        [N, L, ...] holds its own sequence, of which its block sees positions j < anchors[i]."""
        block_len = self.config.draft_block_size
        x = self.block_inputs(anchor_embeds, mask_embed, states)
        positions = anchors.unsqueeze(1) + torch.arange(block_len, device=anchors.device)
        context_len = context[0][0].shape[1]
        sees_context = torch.arange(context_len, device=anchors.device) < anchors.unsqueeze(1)
        mask = torch.cat(
            (
                sees_context.unsqueeze(1).expand(-1, block_len, -1),
                sees_context.new_ones(anchors.shape[0], block_len, block_len),
            ),
            -1,
        )
        return self.norm(self.run_layers(x, positions, context, mask))

    def fused_context_kv(
        self, features: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, list[KV]]:
        """(H_ctx [T, d], per-layer KV) of raw target features [T, m·d] at `positions`: `fuse` and
        `context_kv` as one C++ call (`kernels/cpu_draft_block.cpp`; bf16 inference where linear
        layers run our packed GEMM)."""
        attn = self.layers[0].self_attn
        fused, kv = cpu_attention.extension().draft_context(
            features,
            positions,
            packed_weight(self.fc),
            self.config.hidden_size,
            self.context_norm.weight,
            self.config.rms_norm_eps,
            self.rotary.inv_freq,
            [packed_weight(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in self.layers],
            [attn.config.num_kv_heads, attn.config.head_dim],
        )
        return fused, list(zip(kv[::2], kv[1::2]))

    def fused_block_logits(
        self,
        context: list[KV],
        anchors: torch.Tensor,
        anchor_embeds: torch.Tensor,
        mask_embed: torch.Tensor,
        states: torch.Tensor | None,
        head: nn.Linear,
        width: int,
        softcap: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`blocks` and the LM head `head` over their first `width` slots as one C++ call
        (`kernels/cpu_draft_block.cpp`; bf16 inference where linear layers run our packed GEMM):
        (final-normed slot states [N, width, d], fp32 logits [N, width, K])."""
        layer_weights = [layer.fused_weights() for layer in self.layers]
        attn = self.layers[0].self_attn.config
        return cpu_attention.extension().draft_block(
            anchor_embeds,
            mask_embed,
            anchors,
            self.config.draft_block_size,
            states,
            self.embed_norm.weight if self.config.state_input else None,
            packed_weight(self.in_proj) if self.config.state_input else None,
            self.rotary.inv_freq,
            [weights for weights, _ in layer_weights],
            layer_weights[0][1],
            [attn.num_heads, attn.num_kv_heads, attn.head_dim],
            self.config.rms_norm_eps,
            self.layers[0].mlp.gelu,
            [k for k, _ in context],
            [v for _, v in context],
            attn.head_dim**-0.5,
            self.norm.weight,
            packed_weight(head),
            head.weight.shape[0],
            width,
            softcap,
        )

    def packed_blocks(
        self,
        context: list[KV],
        anchors: torch.Tensor,
        anchor_embeds: torch.Tensor,
        mask_embed: torch.Tensor,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed slot states [B, N, γ, d] of many blocks per sequence (training: every block
        of sequence b packed into row b under `block_mask`, over its context KV [B, L, ...]);
        anchors [B, N], anchor_embeds and states [B, N, d]."""
        (rows, n), block_len = anchors.shape, self.config.draft_block_size
        flat_states = None if states is None else states.flatten(0, 1)
        x = self.block_inputs(anchor_embeds.flatten(0, 1), mask_embed, flat_states)
        positions = (anchors.unsqueeze(-1) + torch.arange(block_len, device=anchors.device)).view(rows, -1)
        mask = block_mask(anchors, context[0][0].shape[1], block_len)
        hidden = self.run_layers(x.view(rows, n * block_len, -1), positions, context, mask)
        return self.norm(hidden).view(rows, n, block_len, -1)

    def markov_code(self, prev: torch.Tensor, target: DecoderModel) -> torch.Tensor | None:
        """W1[x_{k−1}]: the r-dim code of the previous token that the Markov and confidence heads read."""
        if not self.config.markov_rank:
            return None
        if self.config.markov_tied:
            return self.markov_in(self.markov_norm(target.embed(prev).to(self.markov_in.weight.dtype)))
        return self.markov_w1(prev)

    def markov_bias(self, code: torch.Tensor, target: DecoderModel) -> torch.Tensor:
        """W2·W1[x_{k−1}] [.., K], the Markov head's logit correction over the output vocabulary."""
        if self.config.markov_tied:
            return F.linear(self.markov_out(code), self.output_head(target).to(code.dtype))
        return self.markov_w2(code)

    def markov_tables(self, target: DecoderModel) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W1 [V, r], W2 [K, r]) fp32, the tables the block sampler reads: W1 by previous token id,
        W2 by output column."""
        if not self.config.markov_rank:
            return None
        if not self.config.markov_tied:
            return self.markov_w1.weight.float(), self.markov_w2.weight.float()
        vocab = torch.arange(self.config.vocab_size, device=self.markov_in.weight.device)
        w1 = self.markov_code(vocab, target).float()
        w2 = self.output_head(target).float() @ self.markov_out.weight.float()
        return w1, w2

    def confidence_logits(self, hidden: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor | None:
        if not self.config.confidence:
            return None
        inputs = hidden if code is None else torch.cat((hidden, code), -1)
        return self.confidence_head(inputs).squeeze(-1)

    def training_outputs(
        self, features: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor, target: DecoderModel
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits [B, N, γ, K] over the output vocabulary and confidence logits
        [B, N, γ] for many anchors [B, N] of each of B sequences (features [B, L, m·d], ids [B, L];
        sequences shorter than L padded at the end, where no anchor's block reads them).

        Slot k's previous token is the true token at anchor+k (the anchor itself for k = 0): the
        Markov and confidence heads see what inference sees when the earlier drafts were accepted.
        """
        block_len = self.config.draft_block_size
        rows, length = ids.shape
        fused = self.fuse(features)
        context = self.context_kv(fused.flatten(0, 1), torch.arange(length, device=ids.device).repeat(rows))
        context = [(k.unflatten(0, (rows, length)), v.unflatten(0, (rows, length))) for k, v in context]
        mask_embed = target.embed(torch.tensor([self.config.mask_token_id], device=ids.device))[0]
        row = torch.arange(rows, device=ids.device).unsqueeze(1)
        states = torch.cat((torch.zeros_like(fused[:, :1]), fused), 1)[row, anchors]  # H_ctx at anchor−1
        hidden = self.packed_blocks(context, anchors, target.embed(ids[row, anchors]), mask_embed, states)
        prev_pos = (anchors.unsqueeze(-1) + torch.arange(block_len, device=ids.device)).clamp(max=length - 1)
        code = self.markov_code(ids[row.unsqueeze(-1), prev_pos], target)
        if code is not None and self.config.markov_tied and not target.config.final_logit_softcapping:
            # The tied bias is the head applied to B·code, and W·h + W·(B·code) = W·(h + B·code):
            # one pass through the head instead of two (inference samples the bias per slot instead).
            logits = self.output_logits(hidden + self.markov_out(code), target)
        else:
            logits = self.output_logits(hidden, target)
            if code is not None:
                logits = logits + self.markov_bias(code, target)
        return logits, self.confidence_logits(hidden, code)


@dataclass
class BlockLogits:
    """A batch of drafted blocks before sampling: what the Markov sampler reads."""

    hidden: torch.Tensor  # [N, w, d] final-normed slot states (w = the widest slot asked for)
    logits: torch.Tensor  # [N, w, K] fp32 backbone logits over the output columns
    anchors: torch.Tensor  # [N] the anchor tokens

    @property
    def width(self) -> int:
        return self.hidden.shape[1]


class DSparkDrafter(FeatureDrafter):
    """Serves a DSparkModel through the engine's drafter interface: one backbone forward, one LM
    head product and one block sampler call for all ready sequences of a proposal."""

    def __init__(self, model: DSparkModel, target: DecoderModel) -> None:
        with torch.inference_mode():
            # Before the model takes the drafting dtype: the sampler's tables stay exact fp32.
            tables = model.markov_tables(target)
        super().__init__(model, target)
        self.markov_tables = tables
        # Read by every proposal: built once.
        with torch.inference_mode():
            self.mask_embed = self._embed(torch.tensor([self.config.mask_token_id], device=self.device))[0]
            self.conf_temperatures = torch.tensor(self.config.confidence_temperatures, device=self.device)
            self.conf_shifts = torch.tensor(self.config.confidence_shifts, device=self.device)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        proposals = [DraftProposal(tokens=[]) for _ in requests]
        ready = self.ready(requests)
        if not ready:
            return proposals
        batch = [requests[i] for i in ready]
        blocks = self.block_logits(batch)
        temperature = torch.tensor([r.params.temperature for r in batch], device=self.device)
        draft = self.sample(blocks, temperature, self.uniforms(batch, blocks.width))
        for row, (i, r) in enumerate(zip(ready, batch)):
            proposals[i] = self.proposal(draft, row, r)
        return proposals

    def block_logits(self, batch: list[DraftRequest]) -> BlockLogits:
        """One backbone forward and one LM head product for the blocks of all `batch` requests."""
        device = self.device
        m, seq_ids = self.model, [r.seq_id for r in batch]
        anchor_pos = [len(r.token_ids) - 1 for r in batch]

        def project(features: torch.Tensor, positions: torch.Tensor, _: torch.Tensor) -> Projection:
            if self.fused:
                fused, kv = m.fused_context_kv(features, positions)
            else:
                fused = m.fuse(features)
                kv = m.context_kv(fused, positions)
            # H_ctx at anchor−1 is a context row too: kept with the KV, fused once.
            return Projection(kv, fused if self.config.state_input else None)

        context = self.cache.context_kv(seq_ids, anchor_pos, project)
        anchors = torch.tensor([r.token_ids[-1] for r in batch], device=device)
        states = (
            self.cache.states_at(seq_ids, [p - 1 for p in anchor_pos]) if self.config.state_input else None
        )
        positions = torch.tensor(anchor_pos, device=device)
        # Slot k's hidden state depends on the whole block (bidirectional attention), but nothing
        # after slot k depends on its logits: only the slots asked for get the LM head, a draft's
        # largest cost, so drafting to a smaller verify budget is cheaper.
        width = max(min(r.max_tokens, self.config.draft_block_size) for r in batch)
        anchor_embeds = self._embed(anchors)
        if self.fused:
            softcap = self.target.config.final_logit_softcapping or 0.0
            hidden, logits = m.fused_block_logits(
                context, positions, anchor_embeds, self.mask_embed, states, self.head, width, softcap
            )
            return BlockLogits(hidden, logits, anchors)
        hidden = m.blocks(context, positions, anchor_embeds, self.mask_embed, states)[:, :width]
        return BlockLogits(hidden, self.logits(hidden), anchors)

    def uniforms(self, batch: list[DraftRequest], width: int) -> torch.Tensor:
        """[N, width] draws from each request's own stream."""
        # A whole block's worth of draws whatever the width: a request's random stream advances alike.
        draws = [torch.rand(self.config.draft_block_size, generator=r.generator) for r in batch]
        return torch.stack(draws)[:, :width].to(self.device)

    def sample(self, blocks: BlockLogits, temperature: torch.Tensor, uniforms: torch.Tensor) -> MarkovDraft:
        """The blocks sampled slot by slot with the Markov head (argmax where temperature is 0)."""
        m = self.model
        w1, w2 = self.markov_tables or (None, None)
        return sample_markov_block(
            blocks.logits,
            blocks.anchors,
            temperature,
            uniforms,
            w1=w1,
            w2=w2,
            hidden=blocks.hidden,
            conf_weight=m.confidence_head.weight[0] if self.config.confidence else None,
            conf_bias=float(m.confidence_head.bias) if self.config.confidence else 0.0,
            conf_temperature=self.conf_temperatures[: blocks.width],
            conf_shift=self.conf_shifts[: blocks.width],
            return_probs=bool((temperature > 0).any()),
            token_ids=self.token_ids,
            candidates=self.config.markov_candidates or None,
        )

    def proposal(self, draft: MarkovDraft, row: int, request: DraftRequest) -> DraftProposal:
        """Row `row` of a sampled batch of blocks as `request`'s proposal."""
        k = min(request.max_tokens, self.config.draft_block_size)
        return DraftProposal(
            tokens=draft.tokens[row, :k].tolist(),
            probs=None if request.params.greedy else self.target_probs(draft.probs[row, :k]),
            confidence=draft.confidence[row, :k].tolist() if draft.confidence is not None else None,
        )
