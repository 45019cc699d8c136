"""Lossless verification of a batch of (sequence, drafts) against one target forward.

The single-process engine and the verifier deployment both call `verify_drafts`, so the cluster
accepts exactly what the engine accepts: same distributions, same per-request random stream, and
the same log-probabilities for every emitted token.

The batch is handled as a whole: penalties, temperature, top-k and top-p apply to all rows at once
with per-row parameter tensors, and greedy rows never form a distribution (their acceptance needs the
target's argmax only). Per-row Python is left where the inputs are per request: the drafts and their
probabilities, and each sampled request's draws from its own random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.kernels import accept_drafts, accept_greedy
from specray.workers.engine.drafter import DraftProposal
from specray.workers.engine.sampling import (
    SamplingRows,
    TokenLogprob,
    apply_batch_penalties,
    processed_logits,
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
    seqs: list[Sequence], proposals: list[DraftProposal], logits: torch.Tensor
) -> list[Verdict]:
    """Accept drafts for every row in one call.

    `logits` [Σ(k_i+1), V]: the target's logits at the anchor and each of the k_i drafts of row i,
    rows one after another (the runner's logits for the batch, in order).
    """
    batch = len(seqs)
    device, vocab = logits.device, logits.shape[-1]
    counts = [len(p.tokens) for p in proposals]
    num_rows = [k + 1 for k in counts]
    if logits.shape[0] != sum(num_rows):
        raise ValueError(f"{logits.shape[0]} logits rows for {sum(num_rows)} anchors and drafts")
    num_slots = max(counts)
    params = [s.params for s in seqs]
    # Position j of a row follows its first j drafts, which count as output for its penalties.
    logits = apply_batch_penalties(
        logits,
        params,
        [s.prompt_ids for s in seqs],
        [s.output_ids for s in seqs],
        [p.tokens for p in proposals],
        num_rows,
    )
    draft_tokens = (
        torch.tensor([p.tokens + [-1] * (num_slots - len(p.tokens)) for p in proposals], dtype=torch.long)
        .view(batch, num_slots)
        .to(device)
    )
    num_drafts = torch.tensor(counts, device=device)
    first_row = num_drafts.cumsum(0) + torch.arange(batch, device=device) - num_drafts
    # Row of each (sequence, position) in `logits`; positions past a sequence's drafts repeat its
    # last row (acceptance never reads them).
    slots = torch.arange(num_slots + 1, device=device)
    index = first_row.unsqueeze(1) + torch.minimum(slots.unsqueeze(0), num_drafts.unsqueeze(1))

    num_accepted = torch.zeros(batch, dtype=torch.long, device=device)
    emitted = torch.full((batch, num_slots + 1), -1, dtype=torch.long, device=device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if greedy:
        rows = _subset(greedy, batch, device)
        target_tokens = logits.argmax(dim=-1)[index[rows]]
        num_accepted[rows], emitted[rows] = accept_greedy(draft_tokens[rows], num_drafts[rows], target_tokens)
    if sampled:
        rows = _subset(sampled, batch, device)
        sampling = SamplingRows.of(
            [params[i] for i in sampled], [num_slots + 1] * len(sampled), vocab, device
        )
        target_probs = processed_logits(logits[index[rows]].view(-1, vocab), sampling).softmax(dim=-1)
        num_accepted[rows], emitted[rows] = accept_drafts(
            draft_tokens[rows],
            num_drafts[rows],
            target_probs.view(len(sampled), num_slots + 1, vocab),
            _draft_probs([proposals[i] for i in sampled], draft_tokens[rows], vocab),
            torch.zeros(len(sampled), dtype=torch.bool, device=device),
            _uniforms([seqs[i] for i in sampled], [counts[i] for i in sampled], num_slots).to(device),
        )

    accepted = num_accepted.tolist()
    tokens = [row[: a + 1] for row, a in zip(emitted.tolist(), accepted)]
    logprobs = _emitted_logprobs(seqs, logits, first_row, accepted, tokens)
    return [Verdict(a, t, lp) for a, t, lp in zip(accepted, tokens, logprobs)]


def _subset(rows: list[int], batch: int, device: torch.device) -> torch.Tensor | slice:
    """Index of these rows of the batch (a plain slice when they are all of it: no gather)."""
    return slice(None) if len(rows) == batch else torch.tensor(rows, device=device)


def _draft_probs(
    proposals: list[DraftProposal], draft_tokens: torch.Tensor, vocab: int
) -> torch.Tensor | None:
    """[B, γ, V] the distribution each draft was sampled from, or None when every drafter in the
    batch proposes deterministically."""
    if all(p.probs is None for p in proposals):
        return None
    batch, num_slots = draft_tokens.shape
    probs = torch.zeros(batch, num_slots, vocab, device=draft_tokens.device)
    for row, p in enumerate(proposals):
        if p.probs is not None and p.tokens:
            probs[row, : len(p.tokens)] = p.probs
    # A deterministic drafter's p_d is one-hot; left at zero, another session's probs in the same
    # batch would make every draft of this row pass the acceptance test.
    one_hot = torch.tensor([p.probs is None for p in proposals], device=draft_tokens.device)
    row, slot = (one_hot.unsqueeze(1) & (draft_tokens >= 0)).nonzero(as_tuple=True)
    probs[row, slot, draft_tokens[row, slot]] = 1.0
    return probs


def _uniforms(seqs: list[Sequence], counts: list[int], num_slots: int) -> torch.Tensor:
    """[B, γ+1] on the host. Each row draws k+1 numbers from its own stream, whatever else is in
    the batch, so a seeded request gives the same output alone or batched: k acceptance tests, then
    the correction/bonus sample (which accept_drafts reads at column γ)."""
    draws = torch.cat([torch.rand(k + 1, generator=s.generator) for s, k in zip(seqs, counts)])
    lengths = torch.tensor(counts) + 1
    row = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    position = torch.arange(len(draws)) - (lengths.cumsum(0) - lengths)[row]
    column = torch.where(position < lengths[row] - 1, position, num_slots)
    uniforms = torch.zeros(len(seqs), num_slots + 1)
    uniforms[row, column] = draws
    return uniforms


def _emitted_logprobs(
    seqs: list[Sequence],
    logits: torch.Tensor,
    first_row: torch.Tensor,
    accepted: list[int],
    tokens: list[list[int]],
) -> list[list[TokenLogprob] | None]:
    """For the rows that asked: emitted token j was accepted or sampled at position j, so its
    logprob is that position's, whether it came from the drafter, the residual or the bonus sample."""
    asking = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    result: list[list[TokenLogprob] | None] = [None] * len(seqs)
    if not asking:
        return result
    device = logits.device
    lengths = torch.tensor([accepted[i] + 1 for i in asking], device=device)
    owner = torch.repeat_interleave(torch.arange(len(asking), device=device), lengths)
    offset = torch.arange(len(owner), device=device) - (lengths.cumsum(0) - lengths)[owner]
    rows = first_row[torch.tensor(asking, device=device)][owner] + offset
    sampling = SamplingRows.of([seqs[i].params for i in asking], lengths.tolist(), logits.shape[-1], device)
    logprobs = processed_logits(logits[rows], sampling).log_softmax(dim=-1)
    start = 0
    for i, n in zip(asking, lengths.tolist()):
        result[i] = token_logprobs(logprobs[start : start + n], tokens[i], seqs[i].params.logprobs)
        start += n
    return result
