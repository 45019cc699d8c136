"""Load and speculation counters of one draft-worker or verifier replica.

Two readers: the router's `/metrics` (the cumulative values, through Redis: `cluster/runtime/stats_board.py`)
and Serve's autoscaler (`record_autoscaling_stats`: per-report deltas, which Serve averages over its
look-back window for `cluster/runtime/autoscaling_policy.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from specray.cluster.runtime.autoscaling_policy import (
    ACCEPTED_TOKENS,
    BUDGET_UTILIZATION,
    DRAFT_TOKENS,
    SESSIONS,
)


@dataclass
class DraftWorkerStats:
    sessions: int = 0  # open sessions: the replica's queue depth
    segments: int = 0  # verify results of decode segments (prefills excluded)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafter_calls: int = 0  # drafter forward calls, each proposing for a batch of sessions
    drafter_proposals: int = 0  # proposals they made: ÷ calls is the sessions drafted per call
    drafter_seconds: float = 0.0  # time spent in the drafter
    _reported: tuple[int, int] = field(default=(0, 0), repr=False)

    def record(self, num_drafts: int, accepted: int) -> None:
        self.segments += 1
        self.draft_tokens += num_drafts
        self.accepted_tokens += accepted

    def record_drafting(self, num_proposals: int, seconds: float) -> None:
        self.drafter_calls += 1
        self.drafter_proposals += num_proposals
        self.drafter_seconds += seconds

    def snapshot(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if not k.startswith("_")}

    def autoscaling(self) -> dict[str, float]:
        """Sessions now, and the draft/accepted tokens since the previous call."""
        drafted, accepted = self._reported
        self._reported = (self.draft_tokens, self.accepted_tokens)
        return {
            SESSIONS: float(self.sessions),
            DRAFT_TOKENS: float(self.draft_tokens - drafted),
            ACCEPTED_TOKENS: float(self.accepted_tokens - accepted),
        }


@dataclass
class VerifierStats:
    token_budget: int  # max_num_batched_tokens: the tokens one step may carry
    sessions: int = 0
    queued_segments: int = 0  # waiting for a step: the replica's queue depth
    kv_cache_usage: float = 0.0  # the share of KV-cache blocks in use, 0 to 1
    batches: int = 0
    batch_tokens: int = 0  # tokens of all steps (prefill, pending and verified drafts)
    batch_sequences: int = 0
    # Tokens counted against the budget: a prefill longer than the budget runs alone and fills it.
    budget_tokens: int = 0
    _reported: tuple[int, int] = field(default=(0, 0), repr=False)

    def record_batch(self, num_sequences: int, num_tokens: int) -> None:
        self.batches += 1
        self.batch_sequences += num_sequences
        self.batch_tokens += num_tokens
        self.budget_tokens += min(num_tokens, self.token_budget)

    def snapshot(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if not k.startswith("_")}

    def autoscaling(self) -> dict[str, float]:
        """Sessions now, and the mean share of the token budget the steps since the previous call
        filled (0 when no step ran: an idle verifier uses none of it)."""
        batches, tokens = self._reported
        self._reported = (self.batches, self.budget_tokens)
        steps = self.batches - batches
        utilization = (self.budget_tokens - tokens) / (steps * self.token_budget) if steps else 0.0
        return {SESSIONS: float(self.sessions), BUDGET_UTILIZATION: utilization}
