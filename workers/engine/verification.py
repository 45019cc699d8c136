"""Lossless verification of a batch of (sequence, drafts) against one target forward.

The single-process engine and the verifier deployment both call `verify_drafts`, so the cluster
accepts exactly what the engine accepts: same distributions, same per-request random stream, and
the same log-probabilities for every emitted token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.kernels import accept_drafts
from specray.workers.engine.drafter import DraftProposal
from specray.workers.engine.sampling import (
    TokenLogprob,
    apply_penalties,
    target_distribution,
    target_logprobs,
    token_logprobs,
)
from specray.workers.engine.sequence import Sequence


@dataclass
class Verdict:
    """One row's outcome: accepted drafts, emitted tokens (accepted drafts + correction/bonus) and,
    when the request asked for them, the target's log-probabilities of the emitted tokens."""

    num_accepted: int
    emitted: list[int]
    logprobs: list[TokenLogprob] | None = None


def verify_drafts(
    seqs: list[Sequence], proposals: list[DraftProposal], logits: list[torch.Tensor]
) -> list[Verdict]:
    """Accept drafts for every row in one call.

    `logits[i]` holds the target's logits at the anchor and each draft of row i ([k+1, V]).
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
    # Penalized logits of the rows that asked for logprobs, read once the emitted tokens are known.
    wants_logprobs: dict[int, torch.Tensor] = {}
    for row, (seq, proposal, row_logits) in enumerate(zip(seqs, proposals, logits)):
        k = len(proposal.tokens)
        draft_tokens[row, :k] = torch.tensor(proposal.tokens, dtype=torch.long)
        num_drafts[row] = k
        # Position j of the row follows the first j drafts, which count as output for its penalties.
        row_logits = apply_penalties(row_logits, seq.params, seq.prompt_ids, seq.output_ids, proposal.tokens)
        target_probs[row, : k + 1] = target_distribution(row_logits, seq.params)
        if seq.params.logprobs is not None:
            wants_logprobs[row] = row_logits
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
    verdicts = []
    for row, seq in enumerate(seqs):
        accepted = int(num_accepted[row])
        tokens = emitted[row, : accepted + 1].tolist()
        logprobs = None
        if row in wants_logprobs:
            # Emitted token j was accepted or sampled at position j: its logprob is that position's,
            # whether it came from the drafter, the residual or the bonus sample.
            rows = wants_logprobs[row][: accepted + 1]
            logprobs = token_logprobs(target_logprobs(rows, seq.params), tokens, seq.params.logprobs)
        verdicts.append(Verdict(accepted, tokens, logprobs))
    return verdicts
