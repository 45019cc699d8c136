"""How many of each sequence's drafts a step verifies: one policy object, chosen once by name.

`fixed` verifies every draft, `confidence` runs DSpark Algorithm 1 over the profiled step curve,
`off` verifies none (autoregressive decoding through the same machinery). Drafts without
confidences (n-gram) count their observed acceptance per position, starting from `prior`
(`acceptance_estimate.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from specray.workers.engine.acceptance_estimate import AcceptanceEstimate
from specray.workers.engine.confidence_scheduler import confidence_budget
from specray.workers.engine.step_curve import StepCurve


@dataclass(frozen=True)
class SchedulingPolicy(ABC):
    name: ClassVar[str]
    # Whether sequences draft at all (`off` does not, so it needs neither drafter nor features).
    drafts: ClassVar[bool] = True
    # Whether a step's token budget counts every draft when the batch is formed; otherwise the
    # policy spends what the anchors leave once the batch is known.
    counts_drafts_up_front: ClassVar[bool] = False
    needs_step_curve: ClassVar[bool] = False

    curve: StepCurve | None = None
    prior: float = 0.6
    # Observed acceptance of confidence-less drafts, which `record` feeds.
    acceptance: AcceptanceEstimate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.needs_step_curve and self.curve is None:
            raise ValueError(f"{self.name} scheduling needs a step curve")
        object.__setattr__(self, "acceptance", AcceptanceEstimate(self.prior))

    def record(self, num_verified: int, num_accepted: int) -> None:
        """A step verified `num_verified` confidence-less drafts of a sequence, accepted the first
        `num_accepted`."""
        self.acceptance.record(num_verified, num_accepted)

    def budgets(
        self,
        num_drafts: Sequence[int],
        confidences: Sequence[Sequence[float] | None],
        base_tokens: int | None = None,
        max_tokens: int | None = None,
    ) -> list[int]:
        """How many leading drafts of each sequence to verify (`base_tokens`: the step's tokens
        before any draft; `max_tokens`: the step's cap; only Algorithm 1 uses them)."""
        if len(num_drafts) != len(confidences):
            raise ValueError("one confidence list (or None) per request")
        return self._budgets(num_drafts, confidences, base_tokens, max_tokens)

    @abstractmethod
    def _budgets(
        self,
        num_drafts: Sequence[int],
        confidences: Sequence[Sequence[float] | None],
        base_tokens: int | None,
        max_tokens: int | None,
    ) -> list[int]:
        """Each policy's own rule, on inputs `budgets` has checked."""

    def next_draft_budget(self, num_speculative_tokens: int, verified: int | None) -> int:
        """Drafts a session should send next, given how many of its last segment the step verified
        (None: nothing known yet)."""
        return num_speculative_tokens

    def survival_inputs(
        self, num_drafts: Sequence[int], confidences: Sequence[Sequence[float] | None]
    ) -> list[list[float]]:
        """Each request's per-draft confidences; where the drafter has none, the acceptance observed
        at each draft position."""
        filled = []
        for n, cs in zip(num_drafts, confidences):
            if cs is not None and len(cs) != n:
                raise ValueError(f"{len(cs)} confidences for {n} drafts")
            filled.append(list(cs) if cs is not None else self.acceptance.confidences(n))
        return filled


class FixedScheduling(SchedulingPolicy):
    name = "fixed"
    counts_drafts_up_front = True

    def _budgets(self, num_drafts, confidences, base_tokens, max_tokens) -> list[int]:
        return list(num_drafts)


class ConfidenceScheduling(SchedulingPolicy):
    name = "confidence"
    needs_step_curve = True

    def _budgets(self, num_drafts, confidences, base_tokens, max_tokens) -> list[int]:
        return confidence_budget(
            self.survival_inputs(num_drafts, confidences), self.curve, base_tokens, max_tokens
        )

    def next_draft_budget(self, num_speculative_tokens: int, verified: int | None) -> int:
        # What the step verified plus one, so the budget grows back toward γ as load falls (and
        # shrinks to a single probe draft under saturation).
        if verified is None:
            return num_speculative_tokens
        return min(num_speculative_tokens, verified + 1)


class NoDrafts(SchedulingPolicy):
    name = "off"
    drafts = False

    def _budgets(self, num_drafts, confidences, base_tokens, max_tokens) -> list[int]:
        return [0] * len(num_drafts)

    def next_draft_budget(self, num_speculative_tokens: int, verified: int | None) -> int:
        return 0


POLICIES: dict[str, type[SchedulingPolicy]] = {
    policy.name: policy for policy in (ConfidenceScheduling, FixedScheduling, NoDrafts)
}


def policy_class(name: str) -> type[SchedulingPolicy]:
    """The policy called `name` (the one place a policy name is parsed)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"scheduling must be one of {tuple(POLICIES)}, got {name!r}") from None
