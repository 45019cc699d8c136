"""How many of each request's drafts to verify this step: DSpark Algorithm 1, or all of them.

Verifying a draft costs batch tokens (a slower step on the profiled step curve) and pays off only
if the draft survives; its survival `a_{r,j} = Π_{i≤j} c_{r,i}` is the expected number of tokens it
adds. Algorithm 1 admits drafts in survival order while expected tokens × steps/s still rises.
"""

from __future__ import annotations

from collections.abc import Sequence

from specray.workers.engine.step_curve import StepCurve


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


def expected_accepted(confidences: Sequence[float]) -> float:
    """Σ_j Π_{i≤j} c_i: the drafts a segment is expected to get accepted (its priority)."""
    survival, total = 1.0, 0.0
    for c in confidences:
        survival *= c
        total += survival
    return total
