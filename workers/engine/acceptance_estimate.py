"""What the drafts of a drafter without confidences (n-gram) are worth: their observed acceptance.

Algorithm 1 needs each draft's confidence c_k, the chance that draft k is accepted given drafts
1..k-1 were. A drafter without a confidence head gives none, so the scheduler estimates it per
draft position from the verify steps it ran: of the times drafts 1..k-1 were all accepted and draft
k was verified, the share in which draft k was accepted too. The configured prior counts as
`PRIOR_WEIGHT` drafts seen, so the estimate starts there and moves as evidence comes in; older
steps fade (`DECAY` per observation), so it follows a changing workload. It depends on earlier
steps only, never on the drafts being scheduled, so sampling stays lossless.
"""

from __future__ import annotations

PRIOR_WEIGHT = 8.0  # the prior counts as this many observed drafts at each position
DECAY = 0.995  # each observation at a position weighs the earlier ones down by this (~200 steps)


class AcceptanceEstimate:
    def __init__(self, prior: float) -> None:
        if not 0.0 <= prior <= 1.0:
            raise ValueError("the confidence prior must lie in [0, 1]")
        self.prior = prior
        self._verified: list[float] = []  # per position k: times k was verified after k-1 accepted
        self._accepted: list[float] = []  # ... and accepted too

    def record(self, num_verified: int, num_accepted: int) -> None:
        """One sequence's verify step: `num_verified` drafts checked, the first `num_accepted` kept."""
        if not 0 <= num_accepted <= num_verified:
            raise ValueError(f"{num_accepted} accepted of {num_verified} verified drafts")
        # Positions up to the first rejection: each was reached with all earlier ones accepted.
        for k in range(min(num_verified, num_accepted + 1)):
            if k == len(self._verified):
                self._verified.append(0.0)
                self._accepted.append(0.0)
            self._verified[k] = self._verified[k] * DECAY + 1.0
            self._accepted[k] = self._accepted[k] * DECAY + (1.0 if k < num_accepted else 0.0)

    def confidences(self, num_drafts: int) -> list[float]:
        """c_1..c_n: the estimated acceptance of each draft position, given the earlier ones."""
        out = []
        for k in range(num_drafts):
            seen = self._verified[k] if k < len(self._verified) else 0.0
            kept = self._accepted[k] if k < len(self._accepted) else 0.0
            out.append((kept + self.prior * PRIOR_WEIGHT) / (seen + PRIOR_WEIGHT))
        return out
