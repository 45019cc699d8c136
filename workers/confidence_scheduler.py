"""How many of each request's drafts to verify this step: DSpark Algorithm 1, or all of them.

Verifying a draft costs batch tokens (a slower step on the profiled step curve) and pays off only
if the draft survives; its survival `a_{r,j} = Π_{i≤j} c_{r,i}` is the expected number of tokens it
adds. Algorithm 1 admits drafts in survival order while expected tokens × steps/s still rises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from specray.workers.step_curve import StepCurve

# `off` verifies no draft at all: autoregressive decoding through the same machinery.
SchedulingPolicy = Literal["fixed", "confidence", "off"]
POLICIES: tuple[SchedulingPolicy, ...] = ("fixed", "confidence", "off")


def survival_order(confidences: Sequence[Sequence[float]]) -> list[tuple[float, int, int]]:
    """Every candidate (survival a_{r,j}, j, r), in the order Algorithm 1 admits them."""
    # 1. Survival of every candidate (r, j): the chance drafts 1..j of request r all get accepted.
    candidates: list[tuple[float, int, int]] = []
    for r, cs in enumerate(confidences):
        survival = 1.0
        for j, c in enumerate(cs, start=1):
            survival *= c
            candidates.append((survival, j, r))
    # 2. Survival descending, ties by j: survival never grows along a request (c <= 1), so each
    # request's admitted set is a prefix of its drafts.
    return sorted(candidates, key=lambda cand: (-cand[0], cand[1]))


def confidence_budget(
    confidences: Sequence[Sequence[float]],
    curve: StepCurve,
    base_tokens: int | None = None,
    max_tokens: int | None = None,
) -> list[int]:
    """DSpark Algorithm 1: ℓ_r, the number of leading drafts of request r to verify this step.

    `base_tokens` is the step's batch size before any draft (default R, one anchor per request; a
    prefill or a committed tail not yet in the KV cache adds more); `max_tokens` caps the batch.
    """
    if any(not 0.0 <= c <= 1.0 for cs in confidences for c in cs):
        raise ValueError("confidences must lie in [0, 1]")
    num_requests = len(confidences)
    base = num_requests if base_tokens is None else base_tokens
    if base < num_requests:
        raise ValueError("base_tokens must count at least one anchor per request")
    cap = float("inf") if max_tokens is None else max_tokens
    candidates = survival_order(confidences)
    # 3. Every request verifies its anchor: B = R tokens (plus any prefill), R expected tokens.
    lengths = [0] * num_requests
    batch_tokens, expected_tokens = base, float(num_requests)
    best = expected_tokens * curve.sps(batch_tokens)
    # 4. Admit one candidate at a time while throughput Θ = τ*·SPS(B) rises.
    for survival, j, r in candidates:
        theta = (expected_tokens + survival) * curve.sps(batch_tokens + 1)
        if theta <= best or batch_tokens + 1 > cap:
            # Stop here, never skip ahead to a later candidate that would raise Θ. c_{r,j+1} is
            # computed from the sampled draft x_{r,j}, so looking past this point would let the
            # sampled tokens decide whether they get verified, and sampled output would no longer
            # follow the target distribution (DSpark's counterexample: SPS = {1.0, 0.5, 0.45},
            # a_1 = 0.8, p_t = (0.7, 0.3), p_d = (0.5, 0.5) turns the output into (0.85, 0.15)).
            # The token cap stops the same way: it depends on the count so far, never on a token.
            break
        batch_tokens, expected_tokens, best = batch_tokens + 1, expected_tokens + survival, theta
        lengths[r] = j
    return lengths


@dataclass(frozen=True)
class VerifyScheduler:
    """Per-step verify budgets under a policy: `fixed` verifies every draft, `confidence` runs
    Algorithm 1, `off` none. Drafters without confidences (n-gram) count `prior` per draft."""

    policy: SchedulingPolicy = "fixed"
    curve: StepCurve | None = None
    prior: float = 0.6

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}")
        if self.policy == "confidence" and self.curve is None:
            raise ValueError("confidence scheduling needs a step curve")
        if not 0.0 <= self.prior <= 1.0:
            raise ValueError("the confidence prior must lie in [0, 1]")

    def budgets(
        self,
        num_drafts: Sequence[int],
        confidences: Sequence[Sequence[float] | None],
        base_tokens: int | None = None,
        max_tokens: int | None = None,
    ) -> list[int]:
        """How many leading drafts of each request to verify (see `confidence_budget` for the
        optional batch accounting, which only the confidence policy uses)."""
        if len(num_drafts) != len(confidences):
            raise ValueError("one confidence list (or None) per request")
        if self.policy == "fixed":
            return list(num_drafts)
        if self.policy == "off":
            return [0] * len(num_drafts)
        return confidence_budget(
            self.survival_inputs(num_drafts, confidences), self.curve, base_tokens, max_tokens
        )

    def survival_inputs(
        self, num_drafts: Sequence[int], confidences: Sequence[Sequence[float] | None]
    ) -> list[list[float]]:
        """Each request's per-draft confidences, the prior standing in where the drafter has none."""
        filled = []
        for n, cs in zip(num_drafts, confidences):
            if cs is not None and len(cs) != n:
                raise ValueError(f"{len(cs)} confidences for {n} drafts")
            filled.append(list(cs) if cs is not None else [self.prior] * n)
        return filled


def expected_accepted(confidences: Sequence[float]) -> float:
    """Σ_j Π_{i≤j} c_i: the drafts a segment is expected to get accepted (its priority)."""
    survival, total = 1.0, 0.0
    for c in confidences:
        survival *= c
        total += survival
    return total
