"""A drafter for tests that replays a known continuation, every third draft wrong."""

from __future__ import annotations

from specray.workers.engine.drafter import Drafter, DraftProposal, DraftRequest


class ReplayDrafter(Drafter):
    """Proposes a known continuation with every third draft wrong: many drafts are accepted (so a
    position's penalties must count the drafts accepted before it in the same step) and some rejected.
    An n-gram drafter copies the context, which these penalties reject almost always."""

    name = "replay"

    def __init__(self, prompts: list[list[int]], outputs: list[list[int]]) -> None:
        self.runs = list(zip(prompts, outputs))

    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        proposals = []
        for r in requests:
            prompt, output = next((p, o) for p, o in self.runs if r.token_ids[: len(p)] == p)
            done = len(r.token_ids) - len(prompt)
            tokens = output[done : done + r.max_tokens]
            proposals.append(DraftProposal([t + 1 if i % 3 == 2 else t for i, t in enumerate(tokens)]))
        return proposals
