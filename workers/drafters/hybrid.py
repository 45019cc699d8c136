"""Hybrid drafting: per request and step, the n-gram match or the DSpark block, whichever is expected
to get more drafts accepted. Either way the proposal carries a confidence profile, so Algorithm 1
schedules both alike.

A proposal with confidences c is expected to get Σ_j Π_{i≤j} c_i drafts accepted.
- The block's c_k are the DSpark drafter's calibrated confidences.
- An n-gram draft's c_k is the acceptance rate this drafter has seen for n-gram drafts at position k
  after a suffix match of the same length n (a Beta(1, 1) prior: 0.5 before any evidence). The
  evidence is the tokens the target commits after an n-gram proposal: a deterministic draft x
  passes with probability p_t(x) (1 or 0 at T = 0), the chance that the target's own token there
  is x. So each committed token up to the first mismatch is an unbiased observation, past a cut
  the scheduler made too, where the bonus token stands in for the unverified draft.

Where the n-gram's expected length beats the mean of the block's so far, the block is not drafted
at all for that request: on text that repeats its context most steps then cost n-gram lookup alone.

Lossless: the choice must not depend on the random draws of the proposal it picks; a sampled token
that decides whether it is proposed biases the output (the argument behind DSpark's stop rule). So
the n-gram is compared with the block's greedy path, which depends on the context alone; a sampled
request then draws its block from its own stream, as the DSpark drafter does.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from specray.workers.drafters.dspark import DSparkDrafter
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.confidence_scheduler import expected_accepted
from specray.workers.engine.drafter import Drafter, DraftProposal, DraftRequest


@dataclass
class _Pending:
    """An n-gram proposal whose outcome is not read back yet."""

    base: int  # committed tokens when it was proposed
    tokens: list[int]
    match: int  # n, the length of the suffix it followed


class HybridDrafter(Drafter):
    def __init__(self, block: DSparkDrafter, ngram: NgramDrafter | None = None) -> None:
        if not block.config.confidence:
            raise ValueError("a hybrid drafter needs a block drafter with a confidence head (dspark)")
        self.block = block
        self.ngram = ngram or NgramDrafter()
        self.name = f"hybrid-{block.name}"
        self.feature_layers = block.feature_layers
        # [match length][position] → (accepted, reached) of n-gram drafts.
        self.outcomes: dict[int, list[list[int]]] = defaultdict(
            lambda: [[0, 0] for _ in range(block.config.draft_block_size)]
        )
        self._pending: dict[str, _Pending] = {}
        self.choices: Counter[str] = Counter()  # proposals made from each source
        self._block_expected = (0, 0.0)  # (count, sum) of the block's greedy expected lengths

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:
        self.block.observe(seq_id, features, start)

    def release(self, seq_id: str) -> None:
        self.block.release(seq_id)
        self._pending.pop(seq_id, None)

    def ngram_confidence(self, match: int, length: int) -> list[float]:
        """c_k of an n-gram proposal of `length` tokens after a suffix match of `match` tokens."""
        return [(accepted + 1) / (reached + 2) for accepted, reached in self.outcomes[match][:length]]

    def block_expected(self) -> float | None:
        """The mean expected accepted length of the block's greedy paths so far (None before any)."""
        count, total = self._block_expected
        return total / count if count else None

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        for r in requests:
            self._read_outcome(r)
        block_size = self.block.config.draft_block_size
        matches = [self.ngram.match(r.token_ids, min(r.max_tokens, block_size)) for r in requests]
        confidences = [self.ngram_confidence(match, len(tokens)) for tokens, match in matches]
        # The block's forward is skipped where the n-gram is expected to beat the block's typical
        # proposal: most steps of text that repeats its context cost n-gram lookup alone. The rule
        # reads the context and past outcomes only, never this proposal's draws, so it stays lossless.
        typical = self.block_expected()
        ready = [
            i
            for i in self.block.ready(requests)
            if not matches[i][0] or typical is None or expected_accepted(confidences[i]) <= typical
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
                self._block_expected = (self._block_expected[0] + 1, self._block_expected[1] + greedy_path)
                if not tokens or expected_accepted(confidence) <= greedy_path:
                    proposals.append(self.block.proposal(drawn, row, r))
                    self.choices["block"] += 1
                    continue
            if tokens and self._committed(r) == len(r.token_ids):
                # Only a proposal from committed tokens has an outcome to read back (a pipelined
                # draft worker also drafts ahead of its verifier's reply).
                self._pending[r.seq_id] = _Pending(len(r.token_ids), tokens, match)
            proposals.append(DraftProposal(tokens, confidence=confidence if tokens else None))
            self.choices["ngram" if tokens else "none"] += 1
        return proposals

    def _committed(self, request: DraftRequest) -> int:
        """Tokens of the request known committed: those with target features, and the anchor."""
        return min(len(request.token_ids), self.block.cache.num_features(request.seq_id) + 1)

    def _read_outcome(self, request: DraftRequest) -> None:
        pending = self._pending.get(request.seq_id)
        committed = self._committed(request)
        if pending is None or committed <= pending.base:
            return
        del self._pending[request.seq_id]
        emitted = request.token_ids[pending.base : committed]
        counts = self.outcomes[pending.match]
        for k, (draft, token) in enumerate(zip(pending.tokens, emitted)):
            counts[k][1] += 1
            if draft != token:
                break
            counts[k][0] += 1
