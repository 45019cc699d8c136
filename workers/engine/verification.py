"""Lossless verification of a batch of (sequence, drafts) against one target forward.

The single-process engine and the verifier deployment both call `verify_drafts`, so the cluster
accepts exactly what the engine accepts: same distributions, same per-request random stream.
"""

from __future__ import annotations

import torch

from specray.kernels import accept_drafts
from specray.workers.engine.drafter import DraftProposal
from specray.workers.engine.sampling import target_distribution
from specray.workers.engine.sequence import Sequence


def verify_drafts(
    seqs: list[Sequence], proposals: list[DraftProposal], logits: list[torch.Tensor]
) -> list[tuple[int, list[int]]]:
    """Accept drafts for every row in one call.

    `logits[i]` holds the target's logits at the anchor and each draft of row i ([k+1, V]).
    Returns (number of accepted drafts, emitted tokens = accepted drafts + correction/bonus) per row.
    """
    num_slots = max(len(p.tokens) for p in proposals)
    batch = len(seqs)
    vocab = logits[0].shape[-1]
    draft_tokens = torch.zeros(batch, num_slots, dtype=torch.long)
    num_drafts = torch.zeros(batch, dtype=torch.long)
    target_probs = torch.zeros(batch, num_slots + 1, vocab)
    uses_probs = any(p.probs is not None for p in proposals)
    draft_probs = torch.zeros(batch, num_slots, vocab) if uses_probs else None
    greedy = torch.zeros(batch, dtype=torch.bool)
    uniforms = torch.zeros(batch, num_slots + 1)
    for row, (seq, proposal, row_logits) in enumerate(zip(seqs, proposals, logits)):
        k = len(proposal.tokens)
        draft_tokens[row, :k] = torch.tensor(proposal.tokens, dtype=torch.long)
        num_drafts[row] = k
        target_probs[row, : k + 1] = target_distribution(row_logits, seq.params)
        if draft_probs is not None and k:
            if proposal.probs is not None:
                draft_probs[row, :k] = proposal.probs
            else:
                # A deterministic drafter's p_d is one-hot; left at zero, another session's probs in
                # the same batch would make every draft of this row pass the acceptance test.
                draft_probs[row, torch.arange(k), draft_tokens[row, :k]] = 1.0
        greedy[row] = seq.params.greedy
        # Each row draws k+1 numbers from its own stream, whatever else is in the batch, so a seeded
        # request gives the same output alone or batched: k acceptance tests, then the
        # correction/bonus sample (which accept_drafts reads at column γ).
        u = torch.rand(k + 1, generator=seq.generator)
        uniforms[row, :k] = u[:k]
        uniforms[row, num_slots] = u[k]
    num_accepted, emitted = accept_drafts(
        draft_tokens, num_drafts, target_probs, draft_probs, greedy, uniforms
    )
    return [(int(num_accepted[r]), emitted[r, : int(num_accepted[r]) + 1].tolist()) for r in range(batch)]
