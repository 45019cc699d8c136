"""What a benchmark's load run made its target do: request-steps, their drafts, forward passes.

The cluster's verifiers count them (their Stats RPC: totals since start-up, so a run is the
difference of two readings); the engine reference counts the same things in process.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCounters:
    """Request-steps and their drafts over one load run, and the target forwards that ran them."""

    steps: int  # decode request-steps (the verifiers' segments)
    proposed_drafts: int | None  # None where nothing counts them (the engine)
    verified_drafts: int
    accepted_drafts: int
    forwards: int  # target forward passes, prefills included

    def since(self, earlier: StepCounters) -> StepCounters:
        return StepCounters(
            self.steps - earlier.steps,
            None if self.proposed_drafts is None else self.proposed_drafts - (earlier.proposed_drafts or 0),
            self.verified_drafts - earlier.verified_drafts,
            self.accepted_drafts - earlier.accepted_drafts,
            self.forwards - earlier.forwards,
        )
