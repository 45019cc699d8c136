"""Hybrid drafting: per request and step, the n-gram match or the DSpark block, whichever is expected
to get more drafts accepted. Either way the proposal carries a confidence profile, so Algorithm 1
schedules both alike.

A proposal with confidences c is expected to get Σ_j Π_{i≤j} c_i drafts accepted.
- The block's c_k are the DSpark drafter's calibrated confidences.
- An n-gram draft's c_k is the acceptance rate of n-gram drafts at position k after a suffix match
  of the same length n: a Beta prior centred on the rate `calibrate` measured on held-out data
  (worth PRIOR_WEIGHT observations; Beta(1, 1) when unmeasured), updated by this request's own
  outcomes. The evidence is the tokens the target commits after an n-gram proposal: a
  deterministic draft x passes with probability p_t(x) (1 or 0 at T = 0), the chance that the
  target's own token there is x. So each committed token up to the first mismatch is an unbiased
  observation, past a cut the scheduler made too, where the bonus token stands in for the
  unverified draft.

Where the n-gram's expected length beats the mean of the block's so far in this request, the block
is not drafted at all: on text that repeats its context most steps then cost n-gram lookup alone.

Reproducible: every choice reads the checkpoint and the request's own committed tokens only, never
another request's, so a seeded request samples the same text alone or in any batch.

Lossless: the choice must not depend on the random draws of the proposal it picks; a sampled token
that decides whether it is proposed biases the output (the argument behind DSpark's stop rule). So
the n-gram is compared with the block's greedy path, which depends on the context alone; a sampled
request then draws its block from its own stream, as the DSpark drafter does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from specray.workers.drafters.dspark import DSparkDrafter
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.confidence_scheduler import expected_accepted
from specray.workers.engine.drafter import Drafter, DraftProposal, DraftRequest

PRIOR_WEIGHT = 8  # pseudo-observations behind a measured n-gram acceptance rate


def count_outcome(counts: list[list[int]], draft: list[int], emitted: list[int]) -> None:
    """Add one n-gram proposal's outcome to counts[k] = [accepted, reached]: position k is reached
    when every earlier draft matched the committed token there."""
    for k, (token, target) in enumerate(zip(draft, emitted)):
        counts[k][1] += 1
        if token != target:
            break
        counts[k][0] += 1


@dataclass
class _Pending:
    """An n-gram proposal whose outcome is not read back yet."""

    base: int  # committed tokens when it was proposed
    tokens: list[int]
    match: int  # n, the length of the suffix it followed


@dataclass
class _RequestHistory:
    """What one request's own steps showed: n-gram outcomes and the block's expected lengths."""

    block_size: int
    outcomes: dict[int, list[list[int]]] = field(default_factory=dict)  # [n][k] → [accepted, reached]
    pending: _Pending | None = None
    block_steps: int = 0
    block_expected_sum: float = 0.0

    def counts(self, match: int) -> list[list[int]]:
        """[k] → [accepted, reached] of this request's n-gram drafts after a match of `match`."""
        if match not in self.outcomes:
            self.outcomes[match] = [[0, 0] for _ in range(self.block_size)]
        return self.outcomes[match]

    def block_expected(self) -> float | None:
        """The mean expected accepted length of the block's greedy paths so far (None before any)."""
        return self.block_expected_sum / self.block_steps if self.block_steps else None


class HybridDrafter(Drafter):
    def __init__(self, block: DSparkDrafter, ngram: NgramDrafter | None = None) -> None:
        if not block.config.confidence:
            raise ValueError("a hybrid drafter needs a block drafter with a confidence head (dspark)")
        self.block = block
        self.ngram = ngram or NgramDrafter()
        self.name = f"hybrid-{block.name}"
        self.feature_layers = block.feature_layers
        self.prior = block.config.ngram_acceptance
        if self.prior and len(self.prior) < self.ngram.max_ngram:
            raise ValueError(
                f"{block.name} measured n-gram acceptance up to n = {len(self.prior)}, "
                f"the n-gram drafter matches up to n = {self.ngram.max_ngram}"
            )
        self._histories: dict[str, _RequestHistory] = {}
        self.choices: Counter[str] = Counter()  # proposals made from each source

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:
        self.block.observe(seq_id, features, start)

    def release(self, seq_id: str) -> None:
        self.block.release(seq_id)
        self._histories.pop(seq_id, None)

    def ngram_confidence(self, seq_id: str, match: int, length: int) -> list[float]:
        """c_k of an n-gram proposal of `length` tokens after a suffix match of `match` tokens."""
        history = self._histories.get(seq_id)
        counts = history.outcomes.get(match) if history is not None else None
        confidence = []
        for k in range(length):
            accepted, reached = counts[k] if counts is not None else (0, 0)
            rate, weight = (self.prior[match - 1][k], PRIOR_WEIGHT) if self.prior else (0.5, 2)
            confidence.append((rate * weight + accepted) / (weight + reached))
        return confidence

    def _history(self, seq_id: str) -> _RequestHistory:
        if seq_id not in self._histories:
            self._histories[seq_id] = _RequestHistory(self.block.config.draft_block_size)
        return self._histories[seq_id]

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        for r in requests:
            self._read_outcome(r)
        block_size = self.block.config.draft_block_size
        matches = [self.ngram.match(r.token_ids, min(r.max_tokens, block_size)) for r in requests]
        confidences = [
            self.ngram_confidence(r.seq_id, match, len(tokens))
            for r, (tokens, match) in zip(requests, matches)
        ]
        # The block's forward is skipped where the n-gram is expected to beat the block's typical
        # proposal in this request: most steps of text that repeats its context cost n-gram lookup
        # alone. The rule reads the context and past outcomes only, never this proposal's draws.
        typical = [
            h.block_expected() if (h := self._histories.get(r.seq_id)) is not None else None for r in requests
        ]
        ready = [
            i
            for i in self.block.ready(requests)
            if not matches[i][0] or typical[i] is None or expected_accepted(confidences[i]) <= typical[i]
        ]
        rows = {i: row for row, i in enumerate(ready)}
        if ready:
            batch = [requests[i] for i in ready]
            blocks = self.block.block_logits(batch)
            uniforms = self.block.uniforms(batch, blocks.width)
            greedy = self.block.sample(blocks, torch.zeros(len(batch), device=self.block.device), uniforms)
            temperature = torch.tensor([r.params.temperature for r in batch], device=self.block.device)
            drawn = (
                self.block.sample(blocks, temperature, uniforms) if bool((temperature > 0).any()) else greedy
            )
        proposals = []
        for i, (r, (tokens, match), confidence) in enumerate(zip(requests, matches, confidences)):
            if i in rows:
                row = rows[i]
                greedy_path = expected_accepted(
                    greedy.confidence[row, : min(r.max_tokens, block_size)].tolist()
                )
                history = self._history(r.seq_id)
                history.block_steps += 1
                history.block_expected_sum += greedy_path
                if not tokens or expected_accepted(confidence) <= greedy_path:
                    proposals.append(self.block.proposal(drawn, row, r))
                    self.choices["block"] += 1
                    continue
            if tokens and not r.ahead:
                # Only a proposal from committed tokens has an outcome to read back (a pipelined
                # draft worker also drafts ahead of its verifier's reply).
                self._history(r.seq_id).pending = _Pending(len(r.token_ids), tokens, match)
            proposals.append(DraftProposal(tokens, confidence=confidence if tokens else None))
            self.choices["ngram" if tokens else "none"] += 1
        return proposals

    def _read_outcome(self, request: DraftRequest) -> None:
        history = self._histories.get(request.seq_id)
        pending = history.pending if history is not None else None
        if pending is None or request.committed <= pending.base:
            return
        history.pending = None
        count_outcome(
            history.counts(pending.match), pending.tokens, request.token_ids[pending.base : request.committed]
        )
