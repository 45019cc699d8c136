"""Lossless acceptance of draft tokens over a ragged batch (plain-PyTorch reference and CPU path).

One rule covers every row of the batch:
- greedy rows accept while the draft equals the target argmax, then emit the argmax;
- sampled rows accept x_k with probability min(1, p_t(x_k) / p_d(x_k)); the first rejection is
  replaced by a sample from norm(max(0, p_t - p_d)); when every draft passes, a bonus token is
  sampled from p_t at the next position.
Autoregressive decoding is the same call with zero drafts: it emits one sample from p_t.

Randomness comes in as uniforms so that the caller owns the seeds (per request) and a kernel can
consume the very same numbers: `uniforms[b, k]` (k < γ) is the acceptance test of draft k and
`uniforms[b, γ]` drives the inverse-CDF sample of the correction or bonus token.
"""

from __future__ import annotations

import torch

# Below this residual mass p_t and p_d agree to rounding; sampling from p_t is then exact.
RESIDUAL_EPS = 1e-9


def sample_from_probs(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample of one token per row of `probs` [N, V] with `uniform` [N] in [0, 1)."""
    # A half-precision running sum stops growing long before the end of a large vocabulary.
    cdf = probs.float().cumsum(dim=-1)
    threshold = (uniform * cdf[:, -1]).unsqueeze(-1)
    token = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return token.clamp_(max=probs.shape[-1] - 1)


def accept_greedy(
    draft_tokens: torch.Tensor, num_drafts: torch.Tensor, target_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept_drafts` for a batch of greedy rows, from the target's argmax alone.

    target_tokens [B, γ+1] long: the target's argmax at each draft position and one past it; a
    greedy row needs no distribution, so the caller never forms one (no softmax over the vocabulary).
    Returns (num_accepted [B], emitted [B, γ+1]) exactly as `accept_drafts` does for greedy rows.
    """
    batch, num_slots = draft_tokens.shape
    device = draft_tokens.device
    positions = torch.arange(num_slots, device=device)
    valid = positions.unsqueeze(0) < num_drafts.unsqueeze(1)
    tokens = draft_tokens.clamp(min=0)
    passed = (tokens == target_tokens[:, :num_slots]) & valid
    num_accepted = passed.to(torch.long).cumprod(dim=1).sum(dim=1)
    rows = torch.arange(batch, device=device)
    emitted = torch.full((batch, num_slots + 1), -1, dtype=torch.long, device=device)
    emitted[:, :num_slots] = torch.where(positions.unsqueeze(0) < num_accepted.unsqueeze(1), tokens, -1)
    emitted[rows, num_accepted] = target_tokens[rows, num_accepted]
    return num_accepted, emitted


def accept_drafts(
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a ragged batch of drafts against the target.

    draft_tokens  [B, γ] long, padded past `num_drafts[b]`
    num_drafts    [B] long, 0..γ
    target_probs  [B, γ+1, V] the target's sampling distribution at each draft position and one past
                  it (greedy rows only need its argmax)
    draft_probs   [B, γ, V] the distribution each draft was sampled from, or None when every drafter
                  in the batch proposes deterministically (one-hot p_d, e.g. n-gram lookup)
    greedy        [B] bool
    uniforms      [B, γ+1] in [0, 1)

    Returns (num_accepted [B], emitted [B, γ+1]): row b emits `num_accepted[b] + 1` tokens, the
    accepted drafts followed by the correction or bonus token; the rest of the row is -1.
    """
    batch, num_slots = draft_tokens.shape
    device = draft_tokens.device
    positions = torch.arange(num_slots, device=device)
    valid = positions.unsqueeze(0) < num_drafts.unsqueeze(1)
    tokens = draft_tokens.clamp(min=0)

    p_target_draft = target_probs[:, :num_slots].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if draft_probs is None:
        p_draft_draft = torch.ones_like(p_target_draft)
    else:
        p_draft_draft = draft_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    target_argmax = target_probs.argmax(dim=-1)
    # Accept test per position: u < p_t / p_d  <=>  u * p_d < p_t (no division by a zero p_d).
    sampled_ok = uniforms[:, :num_slots] * p_draft_draft < p_target_draft
    greedy_ok = tokens == target_argmax[:, :num_slots]
    passed = torch.where(greedy.unsqueeze(1), greedy_ok, sampled_ok) & valid
    # Accepted length = length of the leading run of passes.
    num_accepted = passed.to(torch.long).cumprod(dim=1).sum(dim=1)

    rows = torch.arange(batch, device=device)
    # The residual is formed in fp32: max(0, p_t - p_d) of two half-precision numbers loses its small mass.
    p_t_next = target_probs[rows, num_accepted].float()
    rejected = num_accepted < num_drafts
    residual = p_t_next.clone()
    rejected_rows = rejected.nonzero().squeeze(-1)
    if rejected_rows.numel() > 0:
        k = num_accepted[rejected_rows]
        if draft_probs is None:
            residual[rejected_rows, tokens[rejected_rows, k]] = 0.0
        else:
            residual[rejected_rows] = (p_t_next[rejected_rows] - draft_probs[rejected_rows, k].float()).clamp(
                min=0.0
            )
        # A residual of ~zero mass means p_d covered p_t: fall back to p_t itself.
        empty = residual[rejected_rows].sum(dim=-1) <= RESIDUAL_EPS
        residual[rejected_rows[empty]] = p_t_next[rejected_rows[empty]]

    sampled_next = sample_from_probs(residual, uniforms[:, num_slots])
    next_token = torch.where(greedy, target_argmax[rows, num_accepted], sampled_next)

    emitted = torch.full((batch, num_slots + 1), -1, dtype=torch.long, device=device)
    emitted[:, :num_slots] = torch.where(positions.unsqueeze(0) < num_accepted.unsqueeze(1), tokens, -1)
    emitted[rows, num_accepted] = next_token
    return num_accepted, emitted
