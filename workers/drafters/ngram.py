"""Prompt lookup (n-gram) drafting: no model, no training.

Find the most recent earlier occurrence of the context's last n tokens (longest n first) and propose
the tokens that followed it. Deterministic, so the engine verifies it with a one-hot p_d.
"""

from __future__ import annotations

from specray.workers.engine.drafter import Drafter, DraftProposal, DraftRequest


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        return [DraftProposal(tokens=self.lookup(r.token_ids, r.max_tokens)) for r in requests]

    def lookup(self, tokens: list[int], max_tokens: int) -> list[int]:
        return self.match(tokens, max_tokens)[0]

    def match(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """(the proposed tokens, the length n of the suffix they follow); ([], 0) without a match."""
        if max_tokens <= 0:
            return [], 0
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            suffix = tokens[-n:]
            # Scan right to left: the latest match best predicts what comes next.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == suffix:
                    follow = tokens[start + n : start + n + max_tokens]
                    if follow:
                        return follow, n
        return [], 0
